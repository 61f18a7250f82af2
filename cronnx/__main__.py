from cronnx.cli import main

main()
