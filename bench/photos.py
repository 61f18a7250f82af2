"""Real photographs for the benchmarks, fetched only through PyPI.

scikit-image's wheel ships a few classic test photographs in skimage/data/. We download the
wheel with pip (a registry download, nothing else), pull those files out of the zip, and
write them as JPEGs: once at native size (web-size photos, 300-800 px) and once upscaled
so the longer side is 1600 px at quality 92, which gives the "several hundred kB" photos
that a phone or a web upload sends.

    python bench/photos.py [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from PIL import Image

WHEEL_SPEC = "scikit-image==0.26.0"
SOURCES = ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png",
           "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg"]
LONG_SIDE = 1600
QUALITY = 92
DEFAULT_OUT = Path(__file__).resolve().parent / "photos"


def output_names(source: str) -> tuple[str, str]:
    """(native-size JPEG, 1600 px JPEG) file names for one source photo."""
    stem = Path(source).stem
    return f"{stem}.jpg", f"{stem}-{LONG_SIDE}.jpg"


def missing(out: Path) -> list[str]:
    return [s for s in SOURCES if not all((out / n).exists() for n in output_names(s))]


def fetch_sources(names: list[str]) -> dict[str, bytes]:
    """Download the wheel to a temporary folder and return the requested files' bytes."""
    with tempfile.TemporaryDirectory(prefix="cronnx-photos-") as tmp:
        # --no-deps: we only want this one wheel's data files, not scikit-image's dependencies.
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--quiet", WHEEL_SPEC, "-d", tmp], check=True)
        wheels = list(Path(tmp).glob("scikit_image-*.whl"))
        if not wheels:
            raise SystemExit(f"pip download of {WHEEL_SPEC} produced no wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            return {name: wheel.read(f"skimage/data/{name}") for name in names}


def save_jpeg(image: Image.Image, path: Path) -> None:
    # Write to a temporary name first so an interrupted run never leaves a half file
    # that the idempotence check would then accept.
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, "JPEG", quality=QUALITY)
    tmp.replace(path)


def write_photos(out: Path) -> list[Path]:
    """Make sure every photo exists in `out`; return the paths of all of them."""
    out.mkdir(parents=True, exist_ok=True)
    todo = missing(out)
    if todo:
        for source, data in fetch_sources(todo).items():
            # Some sources are RGBA/greyscale PNGs; a JPEG photo is RGB.
            image = Image.open(io.BytesIO(data)).convert("RGB")
            native, large = output_names(source)
            save_jpeg(image, out / native)
            scale = LONG_SIDE / max(image.size)
            size = (round(image.width * scale), round(image.height * scale))
            save_jpeg(image.resize(size, Image.LANCZOS), out / large)
    return [out / name for source in SOURCES for name in output_names(source)]


def read_photos(folder: Path, pattern: str = "*.jpg") -> list[tuple[str, bytes]]:
    """(name, bytes) of the photos in `folder` that match `pattern`, read once up front."""
    paths = sorted(Path(folder).glob(pattern))
    if not paths:
        raise SystemExit(f"no photos matching {pattern!r} in {folder}; run: python bench/photos.py --out {folder}")
    return [(path.name, path.read_bytes()) for path in paths]


def describe(path: Path) -> str:
    with Image.open(path) as image:
        w, h = image.size
    return f"{path.name:32s} {w:5d} x {h:<5d} {path.stat().st_size / 1024:7.0f} kB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args()
    todo = missing(args.out)
    paths = write_photos(args.out)
    print(f"{'wrote' if todo else 'already present'}: {len(paths)} photos in {args.out}")
    for path in paths:
        print("  " + describe(path))


if __name__ == "__main__":
    main()
