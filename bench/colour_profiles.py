"""What converting colour profiles to sRGB costs the preprocessing, per image, and where in the
pipeline it belongs.

The same photos (bench/photos.py) encoded four ways with the same pixels: untagged, tagged sRGB,
tagged Display P3 (JPEG and, undrafted, PNG) and CMYK with a press profile. Each is preprocessed
for a 224 x 224 model with the conversion ("on") and with it replaced by a no-op ("off": the
preprocessing as it was before profiles were read), in interleaved rounds on one thread; the
median of every round's per-image time is reported. Then the alternative order: convert after the
resize instead of before, its time and how far its pixels land from converting first.

    .venv/bin/python bench/colour_profiles.py [--rounds 15] [--photos bench/photos]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms

ROOT = Path(__file__).resolve().parent.parent
# This checkout's cronnx, and the tests' ICC profile builder.
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from cronnx.config import PreprocessConfig  # noqa: E402
from cronnx.models.spec import ModelSpec  # noqa: E402
from cronnx.preprocessing import colour, transform  # noqa: E402
from support.icc import cmyk_profile, press_lab, rgb_profile  # noqa: E402

SPEC = ModelSpec(input_name="x", layout="NCHW", input_dtype="uint8", height=224, width=224, fixed_batch=None,
                 output_name="y", output_dtype="float32", output_item_shape=(10,), num_classes=10)
SRGB_BYTES = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
P3_BYTES = rgb_profile()
PRESS_BYTES = cmyk_profile(press_lab)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def variants(photo: Image.Image) -> dict[str, bytes]:
    return {
        "untagged JPEG": encode(photo, "JPEG", quality=92),
        "sRGB JPEG": encode(photo, "JPEG", quality=92, icc_profile=SRGB_BYTES),
        "Display P3 JPEG": encode(photo, "JPEG", quality=92, icc_profile=P3_BYTES),
        "untagged PNG": encode(photo, "PNG", compress_level=1),
        "Display P3 PNG": encode(photo, "PNG", compress_level=1, icc_profile=P3_BYTES),
        "CMYK JPEG + profile": encode(photo.convert("CMYK"), "JPEG", quality=92, icc_profile=PRESS_BYTES),
    }


def no_conversion(image: Image.Image, profile: bytes | None) -> Image.Image:
    return image


def convert_after_resize(preprocess: transform.Preprocessor, data: bytes, profile: bytes) -> np.ndarray:
    """Decode and resize as if untagged, then convert the 224 x 224 result."""
    transform.to_srgb = no_conversion
    try:
        small = preprocess.resize(preprocess.load_rgb(data))
    finally:
        transform.to_srgb = colour.to_srgb
    return np.asarray(colour.to_srgb(small, profile))


def per_image_ms(run, items: list[bytes], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        for data in items:
            run(data)
    return (time.perf_counter() - start) * 1000 / (repeat * len(items))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=ROOT / "bench" / "photos")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    photos = sorted(args.photos.glob("*.jpg"))
    if not photos:
        raise SystemExit(f"no photos in {args.photos}: run bench/photos.py first")
    by_size = {"web-size": [p for p in photos if not p.stem.endswith("-1600")],
               "1600 px": [p for p in photos if p.stem.endswith("-1600")]}
    sets = {(size, kind): [] for size in by_size for kind in variants(Image.new("RGB", (8, 8)))}
    for size, paths in by_size.items():
        for path in paths:
            for kind, data in variants(Image.open(path).convert("RGB")).items():
                sets[size, kind].append(data)

    preprocess = transform.Preprocessor(PreprocessConfig(), SPEC)
    out = np.empty(SPEC.input_item_shape, np.uint8)

    def run(data: bytes) -> None:
        preprocess(data, out)

    for items in sets.values():  # builds and caches the transforms, warms the decoders
        for data in items:
            run(data)
    times = {(key, state): [] for key in sets for state in ("off", "on")}
    after = {key: [] for key in sets if "P3" in key[1]}
    for _ in range(args.rounds):
        for key, items in sets.items():
            transform.to_srgb = no_conversion
            times[key, "off"].append(per_image_ms(run, items, args.repeat))
            transform.to_srgb = colour.to_srgb
            times[key, "on"].append(per_image_ms(run, items, args.repeat))
            if key in after:
                later = per_image_ms(lambda d: convert_after_resize(preprocess, d, P3_BYTES), items, args.repeat)
                after[key].append(later)

    print(f"{PreprocessConfig().resize} to 224 x 224 uint8, one thread, median of {args.rounds} rounds "
          f"(ms per image); PIL {transform.pil_build()}")
    print(f"{'photos':<10} {'file':<22} {'off':>7} {'on':>7} {'on - off':>9} {'convert after resize':>22}")
    for key in sets:
        off, on = (statistics.median(times[key, s]) for s in ("off", "on"))
        later = f"{statistics.median(after[key]):>22.3f}" if key in after else ""
        print(f"{key[0]:<10} {key[1]:<22} {off:7.3f} {on:7.3f} {on - off:+9.3f}{later}")

    print("\nconvert after resize against before (levels of 255, uint8 model input):")
    for key in after:
        diffs = []
        for data in sets[key]:
            run(data)
            first = out.transpose(1, 2, 0).astype(int)
            diffs.append(np.abs(convert_after_resize(preprocess, data, P3_BYTES).astype(int) - first))
        every = np.concatenate([d.reshape(-1) for d in diffs])
        print(f"  {key[0]:<10} {key[1]:<18} max {every.max():3d}, mean {every.mean():.3f}, "
              f"over 1 level: {(every > 1).mean():.2%} of values")

    digest_us = check_cost_us(SRGB_BYTES)
    print(f"\nthe check on an sRGB-tagged image, cached ({len(SRGB_BYTES)} byte profile): {digest_us:.1f} us")


def check_cost_us(profile: bytes, count: int = 20000) -> float:
    colour.TRANSFORMS.get(profile, "RGB")
    copies = [bytes(bytearray(profile)) for _ in range(count)]  # new objects: no cached hash
    start = time.perf_counter()
    for data in copies:
        colour.TRANSFORMS.get(data, "RGB")
    return (time.perf_counter() - start) * 1e6 / count


if __name__ == "__main__":
    main()
