"""Which onnxruntime build serves: the CPU one (`onnxruntime`) or the CUDA one (`onnxruntime-gpu`).

Both distributions install the same `onnxruntime` package, so with both installed the files of
whichever was installed last win, and uninstalling either breaks the other. Cronnx depends on
neither directly: `pip install 'cronnx[cpu]'` or `'cronnx[gpu]'` picks one, and start-up says
which one runs, or refuses when there is none or both.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from cronnx.config import ConfigError

DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def installed() -> dict[str, str]:
    """The onnxruntime distributions installed, with their versions."""
    found = {}
    for name in DISTRIBUTIONS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def describe() -> str:
    """One line for the start-up log: "onnxruntime-gpu 1.31.1, providers CUDAExecutionProvider,
    CPUExecutionProvider". Raises ConfigError when no build, or two, are installed."""
    found = installed()
    if not found:
        raise ConfigError("onnxruntime is not installed: pip install 'cronnx[cpu]', or 'cronnx[gpu]' for CUDA")
    if len(found) > 1:
        raise ConfigError(f"both {' and '.join(f'{n} {v}' for n, v in found.items())} are installed; they write "
                          "the same package. Keep one: pip uninstall -y onnxruntime onnxruntime-gpu, then "
                          "pip install 'cronnx[cpu]' or 'cronnx[gpu]'")
    import onnxruntime as ort

    (name, release), = found.items()
    return f"{name} {release}, providers {', '.join(ort.get_available_providers())}"
