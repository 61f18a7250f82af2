"""Overlapping reloads, loads and unloads: the last one started decides each model, whatever
order they end in. The earlier reload is kept in progress by a labels file that is a FIFO: reading
the model's labels blocks until the test writes them."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import time

import aiohttp
import yaml

from support.client import TIMEOUT
from support.images import encode, photo_like
from support.models import LABEL_NAMES, image_classifier
from support.server import model_entry, server_config, wait_until

IMAGE = encode(photo_like(160, 120, seed=2), "JPEG")
TOKEN = "s3cret-token"
# What the registry logs when a reload ends after a later request started for its models.
SUPERSEDED = "this one changes nothing of them"


def _status(url: str, model: str) -> int:
    async def one():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async with session.post(f"{url}/predict/{model}", data=IMAGE,
                                    headers={"Content-Type": "image/jpeg"}) as r:
                return r.status
    return asyncio.run(one())


def _unload(url: str, model: str) -> int:
    async def one():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async with session.post(f"{url}/admin/models/{model}/unload",
                                    headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                return r.status
    return asyncio.run(one())


def _reading(fifo, timeout_s: float = 30.0) -> int:
    """A write end of `fifo`, opened once the server is blocked reading it (an open for writing
    that does not block fails while no one reads)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _release(writer: int) -> None:
    """Let the blocked reload read its labels and go on."""
    os.write(writer, "\n".join(LABEL_NAMES).encode())
    os.close(writer)


def _reload(server, config: dict) -> None:
    server.config_path.write_text(yaml.safe_dump(config))
    os.kill(server.proc.pid, signal.SIGHUP)


def _ready_pids(server, model: str) -> list[int] | None:
    ready = [m for m in server.versions() if m["name"] == model and m["state"] == "ready"]
    return sorted(w["pid"] for m in ready for w in m["workers"]) if len(ready) == 1 else None


def _served(server) -> set[str]:
    """The models with a version loading or ready (not one draining after an unload)."""
    return {m["name"] for m in server.versions() if m["state"] in ("loading", "ready")}


def _ended_or_served(server, model: str) -> bool:
    """The earlier reload has ended, giving up `model` (it logs so), or has served it."""
    return SUPERSEDED in server.log() or model in _served(server)


def test_the_later_of_two_reloads_wins_when_the_earlier_ends_last(start_server, tmp_path):
    a, b = image_classifier(tmp_path / "a.onnx", seed=1), image_classifier(tmp_path / "b.onnx", seed=2)
    fifo = tmp_path / "b_labels.txt"
    os.mkfifo(fifo)
    server = start_server(server_config(model_entry("a", a)))
    first_pids = _ready_pids(server, "a")

    # The first reload serves a and b; it stays in progress, reading b's labels.
    _reload(server, server_config(model_entry("a", a), model_entry("b", b, labels=str(fifo))))
    writer = _reading(fifo)
    try:
        # The second serves only a, with another setting, which replaces a's workers.
        _reload(server, server_config(model_entry("a", a, batch_timeout_ms=3)))
        wait_until(lambda: _ready_pids(server, "a") not in (None, first_pids), 60, "the second reload applied")
        second_pids = _ready_pids(server, "a")
    finally:
        _release(writer)
    wait_until(lambda: _ended_or_served(server, "b"), 60, "the first reload to end")

    assert "b" not in _served(server)
    assert _status(server.url, "b") == 404
    assert _ready_pids(server, "a") == second_pids  # a's settings are the second reload's
    assert _status(server.url, "a") == 200
    assert server.stop() == 0


def test_an_unload_during_an_earlier_reload_stays_until_a_later_reload(start_server, tmp_path):
    a, b = image_classifier(tmp_path / "a.onnx", seed=1), image_classifier(tmp_path / "b.onnx", seed=2)
    labels = tmp_path / "b_labels.txt"
    os.mkfifo(labels)
    config = server_config(model_entry("a", a), model_entry("b", b), admin={"enabled": True, "token": TOKEN})
    server = start_server(config)
    config["models"][1]["labels"] = str(labels)

    _reload(server, config)  # in progress while it reads b's labels
    writer = _reading(labels)
    try:
        assert _unload(server.url, "b") == 200
        assert _status(server.url, "b") == 404
    finally:
        _release(writer)
    wait_until(lambda: _ended_or_served(server, "b"), 60, "the earlier reload to end")
    assert "b" not in _served(server)
    assert _status(server.url, "b") == 404
    assert _status(server.url, "a") == 200

    # A reload that starts after the unload loads b again.
    labels.unlink()
    labels.write_text("\n".join(LABEL_NAMES))
    _reload(server, config)
    wait_until(lambda: _ready_pids(server, "b") is not None, 60, "b loaded again")
    assert _status(server.url, "b") == 200
    assert server.stop() == 0
