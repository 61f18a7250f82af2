"""A model version's bytes, kept for the version's whole life.

A version is the bytes its file held when it was prepared. Its workers do not open the model file
by its name: a worker that is restarted later (after a crash or a kill) would load whatever the
file holds then, another model or garbage. Each version instead keeps a private copy of the bytes,
and every worker of the version opens that copy.

The copy is an unnamed file on disk (`tempfile.TemporaryFile`: O_TMPFILE, or a file unlinked as
soon as it is made, in TMPDIR), open in the server process. Nothing but the server process can
reach it, and workers open it through `/proc/<server pid>/fd/<n>`. The kernel frees it when the
server process closes it, or when the process ends, even by SIGKILL, so no run leaves one behind.
The alternatives cost more or protect less:

- the bytes in memory (InferenceSession accepts them): 100-500 MB of RAM per version, held
  for as long as it serves, besides the copy each worker's session keeps anyway;
- a hard link or an open descriptor of the original file: `cp other.onnx model.onnx` rewrites the
  same inode, so both would see the new bytes;
- a digest that the worker checks: a worker restarted after an overwrite could never load again,
  so the version would answer 503 for good.

The copy costs the file's size in disk space per distinct file being served (a reload holds the
old and the new one for as long as the old one drains), and page cache that the kernel can evict.
On a host where TMPDIR is a tmpfs, it costs memory instead: point TMPDIR to a disk there.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import weakref
from typing import IO

_CHUNK = 1 << 20
# The copies held now, by the SHA-256 of their bytes: a file that a version being served already
# holds (a reload of an unchanged model) is hashed but not copied again. An entry goes when the
# last version holding it does.
_held: weakref.WeakValueDictionary[str, ModelBytes] = weakref.WeakValueDictionary()
_held_lock = threading.Lock()  # versions are prepared in threads, several reloads at once


class ModelBytes:
    """The bytes of a model file as they were when `keep` read them: a private copy that a later
    overwrite, rename or deletion of the file cannot change. `path` opens it in the server process
    and in its child processes; `digest` is the SHA-256 of the bytes. The copy is freed once no
    one refers to this object (its file is closed) or the server process ends. `kept` is False
    for a model whose weights live in external data files (`keep`): `path` is then the file's
    own, and nothing is copied."""

    def __init__(self, file: IO[bytes] | None, digest: str, path: str | None = None):
        self._file = file
        self.digest = digest
        self.kept = file is not None
        self.size = os.fstat(file.fileno()).st_size if file is not None else os.path.getsize(path)
        self.path = f"/proc/{os.getpid()}/fd/{file.fileno()}" if file is not None else path


def keep(path: str) -> ModelBytes:
    """The bytes the file at `path` holds now, kept (see `ModelBytes`). Bytes that an earlier call
    kept and that something still holds are not copied again: the same `ModelBytes` comes back.
    A model whose weights live in external data files is not copied (onnxruntime finds those
    files beside the model's own path, which a copy has not): its `kept` is False. Raises OSError
    when the file cannot be read or the copy cannot be written (a full disk)."""
    digest, may_be_external = _digest(path)
    external = _external_data_files(path) if may_be_external else []
    if external:
        # Not copied, so the version is what the files hold: their sizes and times join the
        # digest, and a reload after replacing them replaces the version.
        stamps = [f"{name}:{os.stat(name).st_size}:{os.stat(name).st_mtime_ns}" for name in external
                  if os.path.exists(name)]
        return ModelBytes(None, hashlib.sha256("\n".join([digest, *stamps]).encode()).hexdigest(), path)
    with _held_lock:
        held = _held.get(digest)
    if held is not None:
        return held
    # The file may change between the two readings: the digest kept is the copy's own.
    copy = _copy(path)
    with _held_lock:
        return _held.setdefault(copy.digest, copy)


# Every tensor that keeps its data outside the model names its file under this key, which the
# protobuf encoding stores as it is: a model without it needs no parsing to know it has none.
_EXTERNAL_KEY = b"location"


def _digest(path: str) -> tuple[str, bool]:
    """The SHA-256 of the file at `path`, and whether its bytes hold `_EXTERNAL_KEY` anywhere (a
    model without it is self-contained), in one reading."""
    digest = hashlib.sha256()
    found, tail = False, b""
    with open(path, "rb") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            if not found:
                found = _EXTERNAL_KEY in tail + chunk
                tail = chunk[-(len(_EXTERNAL_KEY) - 1):]
    return digest.hexdigest(), found


def _external_data_files(path: str) -> list[str]:
    """The files, beside the model at `path`, where its tensors keep their data (any tensor:
    initializers, Constant attributes, subgraphs'); empty for a self-contained model."""
    import onnx
    from onnx import external_data_helper

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model onnx reads: inspection says why
        return []
    files = set()
    for tensor in external_data_helper._get_all_tensors(model):  # noqa: SLF001 - onnx's own walk of every tensor
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location:
                files.add(os.path.join(os.path.dirname(path), location))
    return sorted(files)


def _copy(path: str) -> ModelBytes:
    file = tempfile.TemporaryFile(prefix="cronnx-model-")
    try:
        digest = hashlib.sha256()
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        with open(path, "rb") as source:
            while n := source.readinto(buffer):
                digest.update(view[:n])
                file.write(view[:n])
        file.flush()
        return ModelBytes(file, digest.hexdigest())
    except BaseException:
        file.close()
        raise
