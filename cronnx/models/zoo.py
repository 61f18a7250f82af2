"""`cronnx models pull`: pretrained classifiers of the ONNX Model Zoo, verified by a pinned sha256."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import msgspec

DEFAULT_BASE_URL = "https://github.com/onnx/models/raw/main/validated/vision/classification"
# Where the zoo's URLs point; a mirror (or a test's local server) can stand in for it.
BASE_URL_ENV = "CRONNX_ZOO_URL"
LABELS_PATH = "synset.txt"


class ZooEntry(msgspec.Struct, frozen=True):
    name: str
    path: str  # below the base URL
    sha256: str
    size: int


# sha256 and size are those of the zoo's Git LFS objects.
ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("mobilenetv2-7", "mobilenet/model/mobilenetv2-7.onnx",
             "c1c513582d56afceff8516c73804e484c81c6a830712ab6d682253f4a3cd042f", 14246826),
    ZooEntry("resnet50-v1-12", "resnet/model/resnet50-v1-12.onnx",
             "ab65bdc02c5b3123eb3cdf6dac01742438517d8635d4f233913b2be1c70db3b6", 102576419),
    ZooEntry("squeezenet1.1-7", "squeezenet/model/squeezenet1.1-7.onnx",
             "1eeff551a67ae8d565ca33b572fc4b66e3ef357b0eb2863bb9ff47a918cc4088", 4956208),
]}


class PullError(Exception):
    pass


def base_url() -> str:
    return os.environ.get(BASE_URL_ENV, DEFAULT_BASE_URL).rstrip("/")


def pull(entry: ZooEntry, dest_dir: Path, base: str | None = None, timeout_s: float = 30.0) -> Path:
    """Download into dest_dir/NAME.onnx, verify size and sha256, and only then move into place."""
    base = (base or base_url()).rstrip("/")
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / f"{entry.name}.onnx"
    if target.exists() and _sha256(target) == entry.sha256:
        return target
    url = f"{base}/{entry.path}"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        digest = _download(url, tmp, timeout_s)
        got = tmp.stat().st_size
        if got != entry.size or digest != entry.sha256:
            raise PullError(f"{url}: checksum mismatch: got sha256 {digest} ({got} bytes), "
                            f"expected {entry.sha256} ({entry.size} bytes); the file was not kept")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def pull_labels(dest_dir: Path, base: str | None = None, timeout_s: float = 30.0) -> Path:
    """The ImageNet labels the zoo's classifiers use, one per line ('n01440764 tench, ...')."""
    base = (base or base_url()).rstrip("/")
    target = dest_dir / "imagenet-synset.txt"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        _download(f"{base}/{LABELS_PATH}", tmp, timeout_s)
        lines = [line for line in tmp.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(lines) != 1000:
            raise PullError(f"{base}/{LABELS_PATH}: expected 1000 labels, got {len(lines)}; the file was not kept")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _download(url: str, dest: Path, timeout_s: float) -> str:
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(dest, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except urllib.error.HTTPError as exc:
        raise PullError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        # Point at a mirror, unless the user already has: then the mirror is what failed.
        hint = (f"check the mirror in {BASE_URL_ENV}" if os.environ.get(BASE_URL_ENV)
                else f"set {BASE_URL_ENV} to use a mirror")
        raise PullError(f"{url}: cannot download ({reason}); is this machine offline? {hint}") from None
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
