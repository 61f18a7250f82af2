"""`server.front_processes`: several processes serve HTTP on one port, one server process behind them.

Served answers equal a direct onnxruntime run whichever front takes the connection; every other
route is the server process's own answer (bad requests, as in one process: test_bad_input.py); the metrics count what the fronts served; a killed front is replaced
without losing the other's requests or a slot; SIGTERM leaves no process, segment or socket.
"""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import os
import signal
import socket
import tempfile
import urllib.error
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import yaml

from support.bad_requests import BODY_LIMIT
from support.client import TIMEOUT, post, predict_many
from support.images import encode, photo_like
from support.metrics import scrape
from support.reference import DirectModel, assert_matches
from support.server import (mapped_segments, model_entry, pid_alive, server_config, shm_lock_files, shm_segments,
                            wait_until)
from cronnx.config import PreprocessConfig
from cronnx.fronts.messages import Abandon, Infer, decode_from_front
from cronnx.fronts.messages import encode as encode_message
from cronnx.fronts.link import EngineLink
from cronnx.http.listener import reserve_port
from cronnx.models.spec import inspect_model
from cronnx.preprocessing.messages import Fill, FillFailed, Setup
from cronnx.ipc.ring import SlotRing

PHOTOS = [encode(photo_like(320 + 16 * i, 240, seed=i), "JPEG", quality=90) for i in range(6)]
SUCCESS = ("cronnx_requests_total", frozenset({("api", "predict"), ("model", "tiny"), ("outcome", "success"),
                                               ("version", "1")}))


@pytest.fixture
def server(start_server, tiny_model):
    config = server_config(model_entry("tiny", tiny_model, workers=1, ring_slots=32), front_processes=2,
                           max_body_bytes=BODY_LIMIT, max_image_pixels=4_000_000)
    return start_server(config)


def front_pids(server) -> list[int]:
    return server.get("/models")[1]["front_processes"]["pids"]


def access_lines(server) -> list[dict]:
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "cronnx.access"]


def test_answers_equal_a_direct_run_from_every_front_and_are_counted(server, tiny_model):
    url = f"{server.url}/predict/tiny"
    fronts = front_pids(server)
    assert len(fronts) == 2 and server.proc.pid not in fronts
    assert "in 2 front processes, each decoding in 1 thread" in server.log()
    assert server.get("/models")[1]["preprocessing"] == {"placement": "front processes", "count": 2, "restarts": 0,
                                                         "pids": sorted(fronts)}
    direct = DirectModel(tiny_model)
    bodies = PHOTOS * 8
    replies = asyncio.run(predict_many(url, bodies, concurrency=24))
    for photo, reply in zip(bodies, replies):
        assert reply.status == 200, reply
        assert_matches(reply.body, direct.probabilities(photo))
    assert max(r.body["batch_size"] for r in replies) > 1  # requests from both fronts shared batches
    # The kernel spread the 24 connections over both fronts, and each logged what it answered.
    served_by = {line["pid"] for line in access_lines(server) if line["status"] == 200}
    assert served_by == set(fronts)
    wait_until(lambda: scrape(server.url).get(SUCCESS) == len(bodies), timeout_s=5,
               what="every answer counted in the server process's metrics")
    assert all(w["slots_in_use"] == 0 for w in server.models()["tiny"]["workers"])


def test_v2_infer_is_served_by_a_front_and_other_routes_by_the_engine_process(server, tiny_model):
    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            answers = {}
            for path in ("/health", "/ready", "/models", "/v2/health/ready", "/v2/models/tiny", "/nothing-here"):
                async with session.get(server.url + path, headers={"X-Request-ID": "abc-123"}) as r:
                    answers[path] = (r.status, await r.json(), r.headers["X-Request-ID"])
            infer = {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
                                 "data": [base64.b64encode(PHOTOS[1]).decode()]}], "outputs": [{"name": "logits"}]}
            async with session.post(f"{server.url}/v2/models/tiny/infer", json=infer) as r:
                answers["infer"] = (r.status, await r.json(), r.headers["X-Request-ID"])
            return answers

    answers = asyncio.run(main())
    assert answers["/health"][:2] == (200, {"status": "alive"})
    assert answers["/ready"][0] == 200 and answers["/ready"][1]["models"] == {"tiny": 1}
    assert answers["/models"][1]["front_processes"]["count"] == 2
    assert answers["/v2/health/ready"][:2] == (200, {"ready": True}) and answers["/v2/models/tiny"][1]["name"] == "tiny"
    assert answers["/nothing-here"][0] == 404 and "error" in answers["/nothing-here"][1]
    assert all(a[2] == "abc-123" for path, a in answers.items() if path != "infer")  # the client's id, both hops
    status, body, _ = answers["infer"]
    assert status == 200, body
    direct = DirectModel(tiny_model)
    batch = np.repeat(direct.tensor(PHOTOS[1])[None], direct.spec.fixed_batch or 1, axis=0)
    logits = direct.session.run(None, {direct.spec.input_name: batch})[0][0].reshape(-1)
    np.testing.assert_allclose(body["outputs"][0]["data"], logits, rtol=0, atol=1e-5)
    # The infer was answered (and logged) by a front; the server process counted it.
    v2_lines = [line for line in access_lines(server) if line["api"] == "v2"]
    assert len(v2_lines) == 1 and v2_lines[0]["pid"] in front_pids(server) and v2_lines[0]["model"] == "tiny"
    v2 = ("cronnx_requests_total", frozenset({("api", "v2"), ("model", "tiny"), ("outcome", "success"),
                                              ("version", "1")}))
    wait_until(lambda: scrape(server.url).get(v2) == 1, timeout_s=5, what="the V2 request counted")


def test_a_killed_front_is_replaced_without_losing_the_others_requests(server):
    url = f"{server.url}/predict/tiny"
    before = front_pids(server)
    os.kill(before[0], signal.SIGKILL)

    def replaced() -> bool:
        try:
            pids = front_pids(server)
        except (ConnectionError, urllib.error.URLError):
            return False  # a connection queued at the killed front's listener is reset with it
        return len(pids) == 2 and before[0] not in pids

    wait_until(replaced, what="a new front process")
    # Both fronts serve again (a new client's connections reach the new one too).
    replies = asyncio.run(predict_many(url, PHOTOS * 4, concurrency=24))
    assert [r.status for r in replies] == [200] * len(replies)
    status = server.get("/models")[1]["front_processes"]
    assert status["restarts"] == 1 and before[0] not in status["pids"] and before[1] in status["pids"]
    assert all(w["slots_in_use"] == 0 for w in server.models()["tiny"]["workers"])


def test_clients_that_give_up_leave_no_slot_held(server):
    url = f"{server.url}/predict/tiny"

    async def give_up():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.005)) as session:
            for _ in range(3):
                await asyncio.gather(*(post(session, url, photo) for photo in PHOTOS * 4), return_exceptions=True)

    asyncio.run(give_up())
    wait_until(lambda: all(w["slots_in_use"] == 0 for w in server.models()["tiny"]["workers"]), timeout_s=10,
               what="every slot back")
    assert [r.status for r in asyncio.run(predict_many(url, PHOTOS))] == [200] * len(PHOTOS)


def test_sigterm_stops_every_process_and_leaves_nothing(server):
    assert [r.status for r in asyncio.run(predict_many(f"{server.url}/predict/tiny", PHOTOS))] == [200] * 6
    processes = front_pids(server) + server.worker_pids("tiny")
    sockets = [p for p in Path("/tmp").glob("cronnx-*/server.sock") if _listening_by(p, server.proc.pid)]
    assert len(sockets) == 1
    assert server.stop(signal.SIGTERM) == 0
    assert not any(pid_alive(pid) for pid in processes)
    assert shm_segments(server.proc.pid) == []
    assert not sockets[0].parent.exists()


def _listening_by(path: Path, pid: int) -> bool:
    """Whether the Unix socket at `path` is one of `pid`'s open sockets."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == str(path) and fields[6] in inodes:
            return True
    return False


def test_the_reserved_port_is_held_and_resolves_port_zero():
    reserved = reserve_port("127.0.0.1", 0)
    try:
        port = reserved.getsockname()[1]
        assert port > 0
        other = socket.socket()
        with pytest.raises(OSError):  # a process not sharing the port cannot take it
            other.bind(("127.0.0.1", port))
        other.close()
        # Once a front listens on it, neither can a second server that would share it.
        front = socket.socket()
        front.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        front.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        front.bind(("127.0.0.1", port))
        front.listen()
        with pytest.raises(OSError):
            reserve_port("127.0.0.1", port)
        front.close()
        # Nothing queues on it: a connection is refused until a front listens.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        reserved.close()


def test_a_fill_for_a_request_given_up_is_still_answered(tiny_model):
    """The engine frees a slot only on the front's answer to its Fill (ring rule 4): a Fill that
    reaches a front after its client went away gets FillFailed at once, and nothing is written."""
    async def main():
        to_front_read, to_front_write = multiprocessing.Pipe(duplex=False)
        from_front_read, from_front_write = multiprocessing.Pipe(duplex=False)
        loop = asyncio.get_running_loop()
        link = EngineLink(to_front_read, from_front_write, threads=1)
        spec = inspect_model(str(tiny_model))
        ring = SlotRing("test_front_fill", 2, spec.input_item_shape, spec.input_dtype, spec.output_item_shape,
                        spec.output_dtype)
        try:
            choice = link.select("tiny", None, None)
            request = asyncio.create_task(link.infer(choice, PHOTOS[0], "req-1", loop.time() + 5))
            infer = decode_from_front(await loop.run_in_executor(None, from_front_read.recv_bytes))
            assert type(infer) is Infer and infer.request_id == "req-1" and 4 < infer.timeout_s <= 5
            request.cancel()  # the client went away before the engine's Fill arrived
            with pytest.raises(asyncio.CancelledError):
                await request
            assert decode_from_front(from_front_read.recv_bytes()) == Abandon(infer.request)
            ring.inputs[0].fill(7.0)
            setup = Setup(ring.layout, PreprocessConfig(), spec)
            to_front_write.send_bytes(encode_message(Fill(infer.request, ring.layout.input_segment, 0, setup)))
            answer = decode_from_front(await loop.run_in_executor(None, from_front_read.recv_bytes))
            assert type(answer) is FillFailed and answer.job == infer.request and "given up" in answer.error.message
            assert (ring.inputs[0] == 7.0).all()
        finally:
            link.close()
            ring.close()

    asyncio.run(main())


def test_a_reload_serves_the_new_version_and_the_fronts_unmap_the_old_rings(server):
    """An unlinked segment's memory (it counts against /dev/shm) is freed only when no process maps
    it: after a reload replaces the version, the fronts let go of its rings and serve the new one."""
    url = f"{server.url}/predict/tiny"
    assert [r.status for r in asyncio.run(predict_many(url, PHOTOS * 4, concurrency=24))] == [200] * 24
    fronts = front_pids(server)
    old = set(shm_segments(server.proc.pid))
    assert old and all(mapped_segments(pid) & old for pid in fronts)  # both filled slots
    config = yaml.safe_load(server.config_path.read_text())
    config["models"][0]["batch_timeout_ms"] = 3  # a new fingerprint: the version is replaced
    server.config_path.write_text(yaml.safe_dump(config))
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: not old & set(shm_segments(server.proc.pid)), what="the old rings to be unlinked")
    wait_until(lambda: not any(mapped_segments(pid) & old for pid in fronts), timeout_s=10,
               what="the front processes to unmap the old rings")
    assert front_pids(server) == fronts  # the same processes, still serving
    assert [r.status for r in asyncio.run(predict_many(url, PHOTOS * 4, concurrency=24))] == [200] * 24
    new = set(shm_segments(server.proc.pid))
    assert new and not new & old and all(mapped_segments(pid) & new for pid in fronts)


def test_after_the_main_process_is_killed_the_fronts_exit_and_the_next_start_tidies_up(start_server, tiny_model):
    config = server_config(model_entry("tiny", tiny_model, workers=1, ring_slots=32), front_processes=2)
    first = start_server(config)
    fronts = front_pids(first)
    folders = list(Path(tempfile.gettempdir()).glob(f"cronnx-{first.proc.pid}-*"))
    assert len(folders) == 1 and (folders[0] / "server.sock").exists()
    left = shm_segments(first.proc.pid) + shm_lock_files(first.proc.pid)
    assert left and any(name.endswith(".lock") for name in left)
    first.proc.kill()
    first.proc.wait(10)
    # Their pipe to the server process closed: they stop serving and exit by themselves.
    wait_until(lambda: not any(pid_alive(pid) for pid in fronts), timeout_s=20, what="the fronts to exit")
    assert folders[0].exists()  # nothing ran to remove it
    second = start_server(config)
    assert not folders[0].exists()
    assert f"removed the socket folders of killed runs: {folders[0]}" in second.log()
    # Its segments (unlinked by its resource tracker, or by this start) and its lock file: its
    # lock died with it, so they were provably its own.
    assert not any((Path("/dev/shm") / name).exists() for name in left)
    assert next(name for name in left if name.endswith(".lock")) in second.log()
    assert [r.status for r in asyncio.run(predict_many(f"{second.url}/predict/tiny", PHOTOS))] == [200] * 6


def test_the_port_of_a_run_that_just_stopped_can_be_reserved():
    """A server restarted at once finds its port held only by the last run's connections in
    TIME_WAIT (the side that closed first keeps them for a minute): that must not stop it."""
    listener = socket.create_server(("127.0.0.1", 0))  # SO_REUSEADDR, as asyncio's listeners
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=2)
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: its end goes to TIME_WAIT
    client.recv(1)
    client.close()
    listener.close()
    assert f"127.0.0.1:{port}" in _time_wait_sockets()
    reserve_port("127.0.0.1", port).close()


def _time_wait_sockets() -> set[str]:
    """Local addresses of this machine's IPv4 TCP sockets in TIME_WAIT (state 06 in /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "06":
            address, port = fields[1].split(":")
            ip = ".".join(str(b) for b in reversed(bytes.fromhex(address)))
            found.add(f"{ip}:{int(port, 16)}")
    return found

