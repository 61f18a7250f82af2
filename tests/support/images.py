"""Real image files for tests: photo-like content (smooth colour, edges, texture) in every mode."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """An RGB image with a photo's mix of gradients, shapes and sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    xx /= width
    yy /= height
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.5, 6), rng.uniform(0.5, 6), rng.uniform(0, 6.28)
        img[..., c] = 0.5 + 0.35 * np.sin(6.28 * (fx * xx + fy * yy) + phase)
    for _ in range(4):
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.3)
        mask = (xx - cx) ** 2 + ((yy - cy) * height / width) ** 2 < r * r
        img[mask] = rng.uniform(0, 1, 3)
    img += rng.normal(0, 0.03, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=92, exif=exif.tobytes())


def write_photo_set(folder: Path, count: int = 6) -> list[Path]:
    """JPEGs of several sizes, like web photos, and a PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(640, 480), (480, 640), (1024, 768), (300, 300), (800, 533), (1200, 900)]
    paths = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        path = folder / f"photo{i}.jpg"
        path.write_bytes(encode(photo_like(w, h, seed=i), "JPEG", quality=90))
        paths.append(path)
    png = folder / "photo_png.png"
    png.write_bytes(encode(photo_like(500, 375, seed=99), "PNG"))
    paths.append(png)
    return paths
