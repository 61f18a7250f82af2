#!/usr/bin/env bash
# Build stage, step 2 (Dockerfile and Dockerfile.cuda): Cronnx in the venv VENV with exactly one
# onnxruntime build and exactly one PIL distribution, checked by check_venv.py.
#
# usage: install_venv.sh VENV SOURCE_DIR cpu|gpu PIL_DIST WHEEL_DIR
set -euo pipefail

venv=$1 src=$2 build=$3 pil_dist=$4 wheel_dir=$5
case $build in
    # The gpu extra is onnxruntime-gpu[cuda,cudnn]: NVIDIA's CUDA and cuDNN wheels of the versions
    # it was built against, so the image needs no CUDA libraries from its base.
    gpu) requirements=("${src}[gpu]") ;;
    cpu) requirements=("${src}[cpu]") ;;
    *) echo "the onnxruntime build must be cpu or gpu, not '$build'" >&2; exit 2 ;;
esac

python3 -m venv "$venv"
"$venv/bin/pip" install --no-cache-dir "${requirements[@]}"
if [ "$pil_dist" = pillow-simd ]; then
    # Cronnx requires pillow; pillow-simd installs the same PIL package under its own name.
    # Installed over Pillow they would share files, so Pillow goes first.
    "$venv/bin/pip" uninstall -y pillow
    "$venv/bin/pip" install --no-cache-dir --no-deps "$wheel_dir"/pillow_simd-*.whl
fi
"$venv/bin/python" "$(dirname "$0")/check_venv.py" "$pil_dist" "$build"
