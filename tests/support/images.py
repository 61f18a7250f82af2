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


# TIFF field types (EXIF 2.3, 4.6.2) -> struct codes of one value; ASCII (2) and UNDEFINED (7) take bytes.
EXIF_TYPES = {1: "B", 3: "H", 4: "I", 5: "II", 8: "h", 9: "i", 10: "ii", 11: "f", 12: "d"}


def exif_block(entries: list[tuple], big_endian: bool = False) -> bytes:
    """An EXIF block built byte by byte, so that it can hold what cameras write and Image.Exif
    cannot express (a signed rational -1/0, an orientation stored as a float or as text, a count
    that lies). Each entry is (tag, type, values) or (tag, type, values, count): values is a list
    of numbers (pairs for rationals) or, for ASCII and UNDEFINED, bytes."""
    import struct

    order = ">" if big_endian else "<"
    data_start = 8 + 2 + 12 * len(entries) + 4  # header, entry count, entries, next-IFD offset
    table, extra = struct.pack(order + "H", len(entries)), b""
    for tag, kind, values, *count in entries:
        if isinstance(values, bytes):
            payload, n = values, len(values)
        else:
            code = EXIF_TYPES[kind]
            flat = [v for value in values for v in (value if isinstance(value, tuple) else (value,))]
            payload, n = struct.pack(order + code[0] * len(flat), *flat), len(values)
        n = count[0] if count else n
        if len(payload) <= 4:
            table += struct.pack(order + "HHI", tag, kind, n) + payload.ljust(4, b"\0")
        else:
            table += struct.pack(order + "HHII", tag, kind, n, data_start + len(extra))
            extra += payload
    table += struct.pack(order + "I", 0)
    header = (b"MM" if big_endian else b"II") + struct.pack(order + "HI", 42, 8)
    return b"Exif\x00\x00" + header + table + extra


def with_alpha(rgb: np.ndarray, alpha: np.ndarray) -> Image.Image:
    """An RGBA image from H x W x 3 colours and an H x W alpha (both uint8)."""
    return Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA")


def over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The documented composite: colour * a + white * (1 - a), rounded to the nearest level."""
    a = alpha.astype(np.float64) / 255.0
    if colour.ndim == 3:
        a = a[..., None]
    return np.round(colour * a + 255.0 * (1.0 - a)).astype(np.uint8)
