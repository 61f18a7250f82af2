"""A served version is the bytes it was loaded from: a model file overwritten under it changes
nothing until a reload, and a reload takes the new bytes even when the file's size and time are
the old ones."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal

from support.client import predict_many
from support.images import encode, photo_like
from support.models import image_classifier
from support.reference import DirectModel, assert_matches
from support.server import model_entry, server_config, wait_until

IMAGE = encode(photo_like(160, 120, seed=2), "JPEG")


def _assert_answers(server, expected) -> dict:
    """One /predict of IMAGE: a 200 with the `expected` probabilities; its body."""
    reply = asyncio.run(predict_many(f"{server.url}/predict/m", [IMAGE]))[0]
    assert reply.status == 200, reply.body
    assert_matches(reply.body, expected)
    return reply.body


def _serving_pid(server) -> int | None:
    """The pid of m's one live worker in its serving version, or None."""
    ready = [m for m in server.versions() if m["name"] == "m" and m["state"] == "ready"]
    live = [w["pid"] for m in ready for w in m["workers"] if w["live"]]
    return live[0] if len(ready) == 1 and len(live) == 1 else None


def _kill_worker(server) -> None:
    """kill -9 m's worker and wait for its replacement to serve."""
    pid = _serving_pid(server)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: _serving_pid(server) not in (None, pid), 60, "the worker's replacement")


def _same_bytes_size_and_time(path, replacement) -> None:
    """Copy `replacement` over `path` as `cp` does (the same file, rewritten) and put its
    modification time back: only the bytes tell it changed."""
    before = os.stat(path)
    shutil.copyfile(replacement, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


def test_a_version_serves_its_own_bytes_until_a_reload_reads_new_ones(start_server, tmp_path):
    path = image_classifier(tmp_path / "model.onnx", seed=1)
    original = DirectModel(shutil.copyfile(path, tmp_path / "original.onnx"))
    other_file = image_classifier(tmp_path / "other.onnx", seed=2)
    other = DirectModel(other_file)
    # Negative control: the two models answer differently, so a mix-up cannot pass unseen.
    assert original.probabilities(IMAGE).argmax() != other.probabilities(IMAGE).argmax()
    server = start_server(server_config(model_entry("m", path)))
    _assert_answers(server, original.probabilities(IMAGE))

    # The file now holds other weights, of the same size, with the old time; a worker restarts.
    _same_bytes_size_and_time(path, other_file)
    _kill_worker(server)
    _assert_answers(server, original.probabilities(IMAGE))

    # A reload reads the bytes: version 1 is now the other model.
    before = _serving_pid(server)
    os.kill(server.proc.pid, signal.SIGHUP)
    wait_until(lambda: _serving_pid(server) not in (None, before), 60, "version 1 replaced by the new bytes")
    assert _assert_answers(server, other.probabilities(IMAGE))["version"] == 1
    assert server.stop() == 0


def test_a_broken_file_under_a_served_version_neither_stops_it_nor_replaces_it(start_server, tmp_path):
    path = image_classifier(tmp_path / "model.onnx", seed=1)
    original = DirectModel(shutil.copyfile(path, tmp_path / "original.onnx"))
    server = start_server(server_config(model_entry("m", path)))

    with open(path, "r+b") as f:  # garbage in the same file, as an interrupted copy leaves it
        f.write(b"not an onnx model")
    _kill_worker(server)
    _assert_answers(server, original.probabilities(IMAGE))

    # A reload refuses the garbage with the reason, and version 1 keeps serving its bytes.
    serving = _serving_pid(server)
    os.kill(server.proc.pid, signal.SIGHUP)
    wait_until(lambda: any(m["state"] == "failed" for m in server.versions()), 60, "the reload refused v1")
    failed, = [m for m in server.versions() if m["state"] == "failed"]
    assert failed["version"] == 1 and "cannot load" in failed["reason"] and str(path) in failed["reason"]
    assert _serving_pid(server) == serving
    assert server.get("/ready")[0] == 200
    _assert_answers(server, original.probabilities(IMAGE))
    assert server.stop() == 0
