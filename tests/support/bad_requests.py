"""The bad requests every HTTP placement must refuse alike: for each, its Content-Type, body,
status and words its error must hold, against a server whose body limit is BODY_LIMIT bytes and
whose pixel limit is 4,000,000."""

from __future__ import annotations

import base64
import json

from PIL import Image

from support.images import encode, photo_like

BODY_LIMIT = 256 * 1024


def _bomb() -> bytes:
    # 5000 x 5000 = 25 Mpx, far above the limit, yet a few kB as PNG.
    return encode(Image.new("L", (5000, 5000)), "PNG")


def _truncated_jpeg() -> bytes:
    data = encode(photo_like(400, 300, seed=3), "JPEG", quality=90)
    return data[: len(data) // 2]


BAD_REQUESTS = {
    "invalid base64": ("application/json", json.dumps({"image": "not*base64!"}).encode(), 400, "base64"),
    "json without image field": ("application/json", json.dumps({"picture": "AAAA"}).encode(), 400, "image"),
    "body is not json": ("application/json", b"{not json", 400, "JSON"),
    "not an image": ("image/jpeg", b"plain text, no picture here", 400, "image"),
    "base64 of a non-image": ("application/json", json.dumps({"image": base64.b64encode(b"hello").decode()}).encode(), 400, "image"),
    "truncated jpeg": ("image/jpeg", _truncated_jpeg(), 400, "image"),
    "empty body": ("image/png", b"", 400, "empty"),
    "unsupported content type": ("text/plain", b"hello", 415, "Content-Type"),
    "body over the limit": ("image/jpeg", b"\xff" * (BODY_LIMIT + 1), 413, "limit"),
    # Above twice the limit (Pillow's error) and just above it (Pillow's warning): both name the
    # configured limit, not Pillow's doubled one.
    "decompression bomb": ("image/png", _bomb(), 413, "(25,000,000 pixels): the limit is 4,000,000 pixels"),
    "image just over the pixel limit": ("image/png", encode(Image.new("L", (2500, 2000)), "PNG"), 413,
                                        "(5,000,000 pixels): the limit is 4,000,000 pixels"),
}
