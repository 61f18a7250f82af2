"""Fail an image build whose venv is not what it should be: exactly one PIL distribution (the one
asked for, with the codecs Cronnx reads), exactly one onnxruntime build (the one asked for), and
no other unmet requirement.

    python check_venv.py pillow-simd|pillow cpu|gpu
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

ONNXRUNTIME = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}
# The formats of README's API section: JPEG and PNG (zlib), WebP, compressed TIFF (libtiff); and
# littleCMS, by which ImageCms converts colour-profiled photos to sRGB.
CODECS = ("jpg", "zlib", "webp", "libtiff", "littlecms2")
# pip's complaint when pillow-simd stands in for the Pillow that Cronnx requires.
PILLOW_SIMD_STANDS_IN = "requires pillow, which is not installed."


def installed(*names: str) -> list[str]:
    """Those of `names` that are installed distributions."""
    found = []
    for name in names:
        try:
            version(name)
        except PackageNotFoundError:
            continue
        found.append(name)
    return found


def problems(pil_dist: str, build: str) -> list[str]:
    """What is wrong with the running interpreter's environment; empty when nothing is."""
    from PIL import features

    from cronnx.models import runtime
    from cronnx.config import ConfigError
    from cronnx.preprocessing.transform import pil_build

    found = []
    pils = installed("pillow", "pillow-simd")
    if pils != [pil_dist]:
        found.append(f"PIL distributions installed: {pils}, expected [{pil_dist!r}]")
    if not pil_build().startswith(f"{'pillow-simd' if pil_dist == 'pillow-simd' else 'Pillow'} "):
        found.append(f"Cronnx's start-up log would say {pil_build()!r}, expected {pil_dist}")
    missing = [codec for codec in CODECS if not features.check(codec)]
    if missing:
        found.append(f"PIL lacks {missing}")
    try:
        onnxruntime = runtime.describe()
    except ConfigError as exc:
        found.append(str(exc))
    else:
        if not onnxruntime.startswith(f"{ONNXRUNTIME[build]} "):
            found.append(f"onnxruntime build {onnxruntime!r}, expected {ONNXRUNTIME[build]}")
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    unmet = [line for line in check.stdout.splitlines()
             if "No broken requirements" not in line
             and not (pil_dist == "pillow-simd" and line.endswith(PILLOW_SIMD_STANDS_IN))]
    found += [f"pip check: {line}" for line in unmet]
    return found


def main() -> None:
    pil_dist, build = sys.argv[1:]
    found = problems(pil_dist, build)
    if found:
        sys.exit("the image's venv is wrong:\n  " + "\n  ".join(found))
    from cronnx.models import runtime
    from cronnx.preprocessing.transform import pil_build

    print(f"venv ok: {pil_build()}; {runtime.describe()}")


if __name__ == "__main__":
    main()
