"""The hardening's standing guard: a storm of malformed and hostile requests, all kinds at once
and interleaved, beside a stream of good requests to the same server.

Every hostile request gets its documented status and a JSON error naming what was wrong; every
odd but valid image gets 200 with the answer of a direct onnxruntime run; every good request
of the stream is answered correctly throughout. Afterwards nothing is left behind: no slot in
use, nothing in flight, every prediction request counted once, and a clean stop (exit 0, no
process, no shared memory).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import random
import re
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import aiohttp
import numpy as np
import pytest
from PIL import Image

from support.client import TIMEOUT, Reply
from support.images import encode, exif_block, photo_like
from support.metrics import scrape, total, value
from support.models import tiny_classifier
from support.reference import DirectModel, assert_matches
from support.server import children_of, model_entry, pid_alive, server_config, shm_segments, wait_until

BODY_LIMIT = 128 * 1024
PIXEL_LIMIT = 1_000_000
TOKEN = "storm-admin-token"
COPIES = 6             # of each kind, all sent at once
GOOD_STREAMS = 3       # concurrent clients sending good requests throughout
GOOD_MAX_PER_STREAM = 300
STORM_SEED = 11


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("storm-models") / "tiny.onnx")


# --- The requests ------------------------------------------------------------------------------

@dataclass
class Kind:
    """One kind of request. `status` is what the README documents for it; an error's text must
    hold `words` (case-insensitive); a 200 must match a direct run on `image` with `top_k`.
    `counted`: it reaches the predict handler, so it is one of cronnx_requests_total, under
    `model_label`."""

    content_type: str | None = "image/jpeg"
    body: bytes | None = b""
    status: int = 400
    words: str = ""
    method: str = "POST"
    path: str = "/predict/tiny"
    params: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)
    chunked: bool = False
    image: bytes | None = None
    top_k: int = 5
    counted: bool = True
    model_label: str = "tiny"


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _animated_gif() -> bytes:
    frames = [photo_like(64, 48, seed=s).convert("P") for s in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).n_frames == 3
    return data


def _sixteen_bit_png() -> bytes:
    grey = np.asarray(photo_like(64, 48, seed=12).convert("L")).astype(np.uint16) * 257
    data = encode(Image.fromarray(grey), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    return data


def _odd_exif_jpeg() -> bytes:
    # An orientation of 6 beside resolutions a phone wrote as -1/0 and 0/0 (Pillow cannot write
    # them back), and a count that runs past the file.
    exif = exif_block([(0x0112, 3, [6]), (0x011A, 10, [(-1, 0)]), (0x011B, 5, [(0, 0)]),
                       (0x0131, 2, b"odd camera\0", 0x7FFFFFFF)])
    return encode(photo_like(64, 48, seed=13), "JPEG", quality=90, exif=exif)


def _rgba_png() -> bytes:
    rgb = np.asarray(photo_like(60, 40, seed=14))
    alpha = np.linspace(0, 255, 60 * 40).round().astype(np.uint8).reshape(40, 60)
    return encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG")


def _wrapped_base64(data: bytes, newline: str) -> str:
    text = _b64(data)
    return newline.join(text[i:i + 76] for i in range(0, len(text), 76)) + newline


def storm_kinds() -> dict[str, Kind]:
    photo = encode(photo_like(160, 120, seed=21), "JPEG", quality=90)
    png = encode(photo_like(160, 120, seed=22), "PNG")
    cmyk = encode(photo_like(64, 48, seed=23).convert("CMYK"), "JPEG", quality=90)
    assert Image.open(io.BytesIO(cmyk)).mode == "CMYK"
    one_pixel = encode(Image.new("RGB", (1, 1), (200, 30, 90)), "PNG")
    wide = encode(photo_like(4000, 1, seed=24), "PNG")
    tall = encode(photo_like(1, 4000, seed=25), "JPEG", quality=90)
    # 3000 x 3000 (9 Mpx) and 1100 x 1100 (1.21 Mpx) against a limit of 1 Mpx: Pillow raises
    # above twice the limit and only warns between the two; both are refused.
    bomb = encode(Image.new("L", (3000, 3000)), "PNG")
    small_bomb = encode(Image.new("L", (1100, 1100)), "PNG")
    assert len(bomb) < BODY_LIMIT and len(small_bomb) < BODY_LIMIT
    gif = _animated_gif()
    kinds = {
        # The body itself.
        "invalid json": Kind("application/json", b'{"image": "abc', words="not valid JSON"),
        "json without image": Kind("application/json", _json({"picture": _b64(photo)}),
                                   words="missing required field `image`"),
        "json array": Kind("application/json", _json([_b64(photo)]), words="expected `object`"),
        "image not a string": Kind("application/json", _json({"image": 12345}), words="expected `str`"),
        "image null": Kind("application/json", _json({"image": None}), words="expected `str`"),
        "invalid base64": Kind("application/json", _json({"image": "not*base64!"}), words="not valid base64"),
        "base64 of a non-image": Kind("application/json", _json({"image": _b64(b"hello, world")}),
                                      words="not an image"),
        "json with an empty image": Kind("application/json", _json({"image": ""}), words="not an image"),
        "empty body": Kind("image/png", b"", words="empty"),
        "empty json body": Kind("application/json", b"", words="empty"),
        "truncated jpeg": Kind("image/jpeg", photo[: len(photo) // 2], words="truncated"),
        "truncated png": Kind("image/png", png[: len(png) // 2], words="truncated"),
        "text as image/jpeg": Kind("image/jpeg", b"Dear server,\nthis is a letter, not a picture.\n",
                                   words="not an image"),
        "eps as image/jpeg": Kind("image/jpeg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
                                  words="not an image"),
        "decompression bomb": Kind("image/png", bomb, 413, "too large"),
        "bomb in pillow's warning range": Kind("image/png", small_bomb, 413, "too large"),
        "body over the limit": Kind("image/jpeg", b"\xff" * (BODY_LIMIT + 1), 413, "larger than the limit"),
        "chunked body over the limit": Kind("image/jpeg", b"\xff" * (BODY_LIMIT * 2), 413, "larger than the limit",
                                            chunked=True),
        # Headers.
        "text/plain": Kind("text/plain", photo, 415, "Content-Type 'text/plain'"),
        "multipart": Kind("multipart/form-data; boundary=x", b"--x--\r\n", 415, "Content-Type 'multipart/form-data'"),
        "unknown content-encoding": Kind("image/jpeg", photo, 415, "Content-Encoding 'compress'",
                                         headers={"Content-Encoding": "compress"}),
        "gzip that is not gzip": Kind("image/jpeg", photo, 400, "cannot be read", headers={"Content-Encoding": "gzip"}),
        # Parameters and routes.
        "top_k 0": Kind("image/jpeg", photo, 400, "top_k must be a positive integer", params={"top_k": "0"}),
        "top_k -1": Kind("image/jpeg", photo, 400, "top_k must be a positive integer", params={"top_k": "-1"}),
        "top_k x": Kind("image/jpeg", photo, 400, "top_k must be a positive integer", params={"top_k": "x"}),
        "unknown model": Kind("image/jpeg", photo, 404, "unknown model 'nope'", path="/predict/nope",
                              model_label="_unknown"),
        "unknown version": Kind("image/jpeg", photo, 404, "version 7 of model 'tiny' is not served",
                                path="/predict/tiny/versions/7", model_label="_unknown"),
        "get on predict": Kind(None, None, 405, "method not allowed", method="GET", counted=False),
        "put on predict": Kind("image/jpeg", photo, 405, "method not allowed", method="PUT", counted=False),
        "unknown route": Kind("image/jpeg", photo, 404, "not found", path="/predictions/tiny", counted=False),
        "non-numeric version route": Kind("image/jpeg", photo, 404, "not found", path="/predict/tiny/versions/v1",
                                          counted=False),
        "admin without a token": Kind(None, None, 401, "Bearer", path="/admin/models/tiny/reload", counted=False),
        "admin with a wrong token": Kind(None, None, 403, "wrong token", path="/admin/models/tiny/unload",
                                         headers={"Authorization": "Bearer not-the-token"}, counted=False),
        # Odd but valid: answered like any picture.
        "exif-odd jpeg": Kind("image/jpeg", _odd_exif_jpeg(), 200),
        "cmyk jpeg": Kind("image/jpeg", cmyk, 200),
        "16-bit png": Kind("image/png", _sixteen_bit_png(), 200),
        "animated gif": Kind("image/gif", gif, 200),
        "rgba png": Kind("image/png", _rgba_png(), 200),
        "1x1 png": Kind("image/png", one_pixel, 200),
        # Nothing in the README or preprocessing/transform.py refuses an elongated picture: crop
        # mode takes the centre of the short side (here a fraction of one pixel), so it is answered.
        "4000x1 png": Kind("image/png", wide, 200),
        "1x4000 jpeg": Kind("image/jpeg", tall, 200),
        "base64 with newlines": Kind("application/json", _json({"image": _wrapped_base64(png, "\n")}), 200, image=png),
        "base64 with crlf": Kind("application/json", _json({"image": _wrapped_base64(photo, "\r\n")}), 200,
                                 image=photo),
        "real gzip": Kind("image/jpeg", gzip.compress(photo), 200, image=photo, headers={"Content-Encoding": "gzip"}),
        "octet-stream with top_k 3": Kind("application/octet-stream", photo, 200, params={"top_k": "3"}, top_k=3),
    }
    for kind in kinds.values():
        if kind.status == 200 and kind.image is None:
            kind.image = kind.body
    return kinds


# --- Sending -----------------------------------------------------------------------------------

async def send(session: aiohttp.ClientSession, base: str, kind: Kind) -> tuple[int, dict | str]:
    headers = dict(kind.headers)
    if kind.content_type is not None:
        headers["Content-Type"] = kind.content_type
    data = kind.body
    if kind.chunked:
        async def pieces(body=kind.body, size=16 * 1024):
            for start in range(0, len(body), size):
                yield body[start:start + size]
        data = pieces()
    async with session.request(kind.method, base + kind.path, data=data, params=kind.params or None,
                               headers=headers) as response:
        raw = await response.read()
        if kind.chunked:
            assert "Content-Length" not in response.request_info.headers
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode(errors="replace")  # not JSON: the assertion shows it


class GoodTraffic:
    """GOOD_STREAMS clients sending good requests back to back (raw JPEG, raw PNG, JSON), each
    reply kept with its times; bounded in count, stopped when the storm is over."""

    def __init__(self, url: str, bodies: list[tuple[str, bytes, bytes]]):
        self.url, self.bodies = url, bodies
        self.replies: list[tuple[int, Reply, float, float]] = []  # body index, reply, sent, answered
        self._stop = asyncio.Event()
        self.first_answer = asyncio.Event()

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            await asyncio.gather(*(self._stream(session, s) for s in range(GOOD_STREAMS)))

    async def _stream(self, session: aiohttp.ClientSession, stream: int) -> None:
        for n in range(GOOD_MAX_PER_STREAM):
            if self._stop.is_set():
                return
            index = (n + stream) % len(self.bodies)
            content_type, body, _ = self.bodies[index]
            sent = time.monotonic()
            async with session.post(self.url, data=body, headers={"Content-Type": content_type}) as r:
                reply = Reply(r.status, await r.json(content_type=None), r.headers)
            self.replies.append((index, reply, sent, time.monotonic()))
            self.first_answer.set()

    def stop(self) -> None:
        self._stop.set()


# --- The test ----------------------------------------------------------------------------------

# The direct run reads the odd EXIF too, and Pillow warns of the tag that runs past the file.
@pytest.mark.filterwarnings("ignore:Tag data larger than file:UserWarning")
# The server process serving HTTP itself, and two front processes that read and decode every
# request and pass the rest to it (tests/http/test_placements.py compares the two directly).
@pytest.mark.parametrize("front_processes", [1, 2], ids=["one process", "two front processes"])
def test_storm_of_hostile_requests_beside_good_traffic(start_server, tiny_model, front_processes):
    config = server_config(model_entry("tiny", tiny_model, ring_slots=512, batch_size=8),
                           max_body_bytes=BODY_LIMIT, max_image_pixels=PIXEL_LIMIT, request_timeout_s=30,
                           front_processes=front_processes)
    config["server"]["admin"] = {"enabled": True, "token": TOKEN}
    server = start_server(config)
    direct = DirectModel(tiny_model)
    kinds = storm_kinds()
    assert len([k for k in kinds.values() if k.status != 200]) >= 25

    good_photo = encode(photo_like(320, 240, seed=1), "JPEG", quality=90)
    good_png = encode(photo_like(200, 150, seed=2), "PNG")
    good_bodies = [("image/jpeg", good_photo, good_photo), ("image/png", good_png, good_png),
                   ("application/json", _json({"image": _b64(good_photo)}), good_photo)]
    expected_good = [direct.probabilities(image) for _, _, image in good_bodies]

    # Every copy of every kind, shuffled so that the kinds interleave, sent at once.
    order = [name for name in kinds for _ in range(COPIES)]
    random.Random(STORM_SEED).shuffle(order)
    sequential = list(kinds)
    random.Random(STORM_SEED + 1).shuffle(sequential)

    async def main():
        good = GoodTraffic(f"{server.url}/predict/tiny", good_bodies)
        stream = asyncio.create_task(good.run())
        await asyncio.wait_for(good.first_answer.wait(), 30)
        connector = aiohttp.TCPConnector(limit=0)  # every request on the wire at once
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as session:
            storm_start = time.monotonic()
            answers = await asyncio.gather(*(send(session, server.url, kinds[name]) for name in order))
            storm_end = time.monotonic()
        # Then every kind in turn on one keep-alive connection: an error answered before its body
        # was read (413, 415, a bad top_k) must not leave that body to be read as the next request.
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=1)) as session:
            answers += [await send(session, server.url, kinds[name]) for name in sequential]
        good.stop()
        await asyncio.wait_for(stream, 60)
        return answers, good, storm_start, storm_end

    answers, good, storm_start, storm_end = asyncio.run(main())

    # Each request got its documented status and, for errors, a JSON error naming the problem.
    problems = []
    assert len(answers) == len(order) + len(sequential)
    order += sequential
    for name, (status, body) in zip(order, answers):
        kind = kinds[name]
        if status != kind.status or not isinstance(body, dict):
            problems.append((name, status, body))
        elif status == 200:
            try:
                assert body["model"] == "tiny" and body["version"] == 1
                assert_matches(body, direct.probabilities(kind.image), top_k=kind.top_k)
            except AssertionError as exc:
                problems.append((name, status, f"wrong answer: {exc}"))
        elif set(body) != {"error"} or kind.words.lower() not in body["error"].lower():
            problems.append((name, status, body))
    assert not problems, problems

    # The good stream ran through the storm and every answer is right.
    assert good.replies, "no good request was answered"
    for index, reply, _, _ in good.replies:
        assert reply.status == 200, reply
        assert_matches(reply.body, expected_good[index])
    during = [r for r in good.replies if r[2] < storm_end and r[3] > storm_start]
    assert during, "no good request overlapped the storm: it proved nothing"
    assert len(good.replies) < GOOD_STREAMS * GOOD_MAX_PER_STREAM, "the good stream ran out before the storm ended"

    # Nothing left in use, every prediction request counted once, by model and outcome.
    described = server.models()["tiny"]
    assert described["workers"] and all(w["slots_in_use"] == 0 for w in described["workers"]), described
    assert all(w["restarts"] == 0 and w["live"] for w in described["workers"]), described
    expected_counts: dict[tuple[str, str], int] = {}
    for name in order:
        kind = kinds[name]
        if kind.counted:
            key = (kind.model_label, "success" if kind.status == 200 else str(kind.status))
            expected_counts[key] = expected_counts.get(key, 0) + 1
    expected_counts[("tiny", "success")] = expected_counts.get(("tiny", "success"), 0) + len(good.replies)
    expected_total = sum(1 for n in order if kinds[n].counted) + len(good.replies)
    # A front process reports each request to the server process after answering it: wait until
    # all are counted (at once with one process).
    wait_until(lambda: total(scrape(server.url), "cronnx_requests_total") >= expected_total, timeout_s=10,
               what="every request counted")
    samples = scrape(server.url)
    assert value(samples, "cronnx_in_flight_requests") == 0
    assert total(samples, "cronnx_ring_slots_in_use") == 0
    counted = {(dict(labels)["model"], dict(labels)["outcome"]): v
               for (metric, labels), v in samples.items() if metric == "cronnx_requests_total" and v}
    assert counted == expected_counts
    assert total(samples, "cronnx_requests_total") == expected_total

    # A clean stop: exit 0, no process of the server alive (workers and front processes are its
    # children), no shared memory left.
    pid = server.proc.pid
    descendants = _descendants(pid)
    assert set(server.worker_pids("tiny")) <= set(descendants)
    fronts = server.get("/models")[1]["front_processes"]
    assert fronts["count"] == front_processes and fronts["restarts"] == 0, fronts
    assert len(fronts["pids"]) == (front_processes if front_processes > 1 else 0), fronts
    assert set(fronts["pids"]) <= set(descendants), (fronts, descendants)
    assert shm_segments(pid), "the server had no segments to clean up: the check below proves nothing"
    assert server.stop() == 0, server.log()[-3000:]
    wait_until(lambda: not any(pid_alive(p) for p in descendants), timeout_s=10, what="the server's processes to end")
    assert shm_segments(pid) == []


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo and len(found) < 1000:
        for kid in children_of(todo.pop()):
            found.append(kid)
            todo.append(kid)
    return found


# --- Malformed HTTP below the application ------------------------------------------------------
#
# Not part of the storm above: each request here breaks HTTP itself, on one connection of its own,
# with aiohttp's C parser (the default), with its pure-Python one, and through front processes.

HTTP_TIMEOUT_S = 2  # the request timeout of these servers: a hang shows as a 408 after it


def _http_server(tmp_path_factory, tiny_model, name: str, env: dict[str, str], **server):
    from support.server import ServerProcess

    process = ServerProcess(tmp_path_factory.mktemp(name), server_config(
        model_entry("tiny", tiny_model), max_body_bytes=BODY_LIMIT, request_timeout_s=HTTP_TIMEOUT_S, **server))
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the server process inherits this environment
    try:
        process.start()
    except BaseException:
        process.cleanup()
        raise
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
    return process


@pytest.fixture(scope="module")
def http_servers(tmp_path_factory, tiny_model):
    """The same server with aiohttp's C HTTP parser (the default), with its pure-Python one (what
    runs where the C extension is not built: AIOHTTP_NO_EXTENSIONS=1), and with two front
    processes (C parser), whose connections are theirs, not the server process's."""
    servers = {}
    try:
        servers["c"] = _http_server(tmp_path_factory, tiny_model, "http-c", {})
        servers["python"] = _http_server(tmp_path_factory, tiny_model, "http-python", {"AIOHTTP_NO_EXTENSIONS": "1"})
        servers["fronts"] = _http_server(tmp_path_factory, tiny_model, "http-fronts", {}, front_processes=2)
        yield servers
    finally:
        for server in servers.values():
            server.cleanup()


def exchange(url: str, parts: list[bytes], pause_s: float = 0.0) -> tuple[int, dict[str, str], dict | str]:
    """Send `parts` on one connection (`pause_s` between them) and read the answer: its status,
    headers (lower-case names) and body (parsed when JSON)."""
    address = urlparse(url)
    with socket.create_connection((address.hostname, address.port), timeout=HTTP_TIMEOUT_S + 8) as connection:
        for i, part in enumerate(parts):
            if i:
                time.sleep(pause_s)
            connection.sendall(part)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < _answer_size(answer):
            data = connection.recv(65536)
            if not data:
                break
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    try:
        return int(status_line.split(" ", 2)[1]), headers, json.loads(body)
    except ValueError:
        return int(status_line.split(" ", 2)[1]), headers, body.decode(errors="replace")


def _answer_size(answer: bytes) -> int:
    head, _, _ = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, length = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + 4 + int(length)
    return 1 << 30  # no length: read until the server closes


HEAD = b"POST /predict/tiny HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
# name: the request in parts, sent 0.3 s apart. The first seven are refused by aiohttp's parser
# before any handler runs (cronnx/http/connection.py answers them); in the next two the framing
# breaks while the handler reads the body (with the C parser that body was never ended: a 408
# after the request timeout, before http/connection.py ended it with the parser's error).
MALFORMED = {
    "content-length not a number": [HEAD + b"Content-Length: abc\r\n\r\nabc"],
    "two content-lengths": [HEAD + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"],
    "content-length and chunked": [HEAD + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   b"3\r\nabc\r\n0\r\n\r\n"],
    "header over 8190 bytes": [HEAD + b"X-Long: " + b"a" * 9000 + b"\r\nContent-Length: 0\r\n\r\n"],
    "control character in a header": [HEAD + b"X-Request-ID: a\x01b\r\nContent-Length: 3\r\n\r\nabc"],
    "not an http request line": [b"HELLO THERE\r\n\r\n"],
    "bad chunk size with the headers": [CHUNKED + b"zz\r\nabc\r\n0\r\n\r\n"],
    "bad chunk size after the headers": [CHUNKED, b"zz\r\nabc\r\n0\r\n\r\n"],
    "chunk longer than its size after the headers": [CHUNKED, b"3\r\nabcdef\r\n0\r\n\r\n"],
    # Control: a body the handler reads and cannot decode.
    "gzip that is not gzip after the headers": [
        HEAD + b"Content-Encoding: gzip\r\nConnection: close\r\nContent-Length: 10\r\n\r\n", b"notgzip!!!"],
}


@pytest.mark.parametrize("parser", ["c", "python", "fronts"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_http_gets_a_json_400(http_servers, case, parser):
    server = http_servers[parser]
    status, headers, body = exchange(server.url, MALFORMED[case], pause_s=0.3)
    assert status == 400 and isinstance(body, dict) and set(body) == {"error"} and body["error"], (status, body)
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert re.fullmatch(r"[0-9a-f]{32}", headers.get("x-request-id", "")), headers  # none sent: a new one
    # And the server serves on.
    photo = encode(photo_like(64, 48, seed=3), "JPEG")
    status, _, body = exchange(server.url, [HEAD + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(photo)
                                            + photo])
    assert status == 200 and len(body["predictions"]) == 5, body
