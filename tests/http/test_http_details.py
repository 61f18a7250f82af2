"""HTTP details a client relies on: content types, Expect: 100-continue, auth scheme case."""

from __future__ import annotations

import asyncio
import gzip
import json
import select
import socket
import time
import urllib.request
from urllib.parse import urlparse

import aiohttp
import numpy as np
import pytest

from support.client import TIMEOUT, GoodStream, post, predict_many
from support.images import encode, photo_like
from support.metrics import scrape, value
from support.models import tiny_classifier
from support.reference import DirectModel, assert_matches
from support.server import model_entry, server_config, wait_until

BODY_LIMIT = 64 * 1024
TOKEN = "s3cret-token"


@pytest.fixture
def server(start_server, tiny_model):
    config = server_config(model_entry("tiny", tiny_model), max_body_bytes=BODY_LIMIT)
    config["server"]["admin"] = {"enabled": True, "token": TOKEN}
    return start_server(config)


# Each registered type (and common alias) of a format Cronnx reads, with a body in that format.
TYPES = {
    "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/pjpeg": "JPEG",
    "image/png": "PNG", "image/x-png": "PNG", "image/apng": "PNG",
    "image/webp": "WEBP", "image/gif": "GIF",
    "image/bmp": "BMP", "image/x-bmp": "BMP", "image/x-ms-bmp": "BMP",
    "image/tiff": "TIFF", "image/x-tiff": "TIFF",
}


def test_every_type_of_a_readable_format_is_accepted_and_answered_correctly(server, tiny_model):
    direct = DirectModel(tiny_model)
    bodies = {fmt: encode(photo_like(96, 64, seed=4), fmt) for fmt in set(TYPES.values())}

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            return {t: await post(session, f"{server.url}/predict/tiny", bodies[fmt], t) for t, fmt in TYPES.items()}

    replies = asyncio.run(main())
    for content_type, reply in replies.items():
        assert reply.status == 200, (content_type, reply.body)
        assert_matches(reply.body, direct.probabilities(bodies[TYPES[content_type]]))


def _raw_exchange(url: str, request: bytes, read_s: float = 5.0) -> bytes:
    parts = urlparse(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=read_s) as conn:
        conn.sendall(request)
        return conn.recv(65536)


ROUTES = {"predict": ("/predict/tiny", "image/jpeg"), "v2": ("/v2/models/tiny/infer", "application/json")}


@pytest.mark.parametrize("api", sorted(ROUTES))
def test_a_body_declared_too_large_gets_413_without_an_invitation_to_send_it(server, api):
    path, kind = ROUTES[api]
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {BODY_LIMIT + 1}\r\nExpect: 100-continue\r\n\r\n").encode()
    answer = _raw_exchange(server.url, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"100 Continue" not in answer and b'"error"' in answer
    assert value(scrape(server.url), "cronnx_requests_total", api=api, model="tiny", version=1, outcome="413") == 1


@pytest.mark.parametrize("api", sorted(ROUTES))
def test_a_body_that_fits_is_invited_with_100_continue(server, api):
    path, kind = ROUTES[api]
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
            "Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n").encode()
    assert _raw_exchange(server.url, head).startswith(b"HTTP/1.1 100 Continue")


@pytest.mark.parametrize("api", sorted(ROUTES))
def test_an_unknown_expectation_gets_a_json_417_and_is_counted(server, api):
    path, kind = ROUTES[api]
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
            "Content-Length: 10\r\nExpect: 200-ok\r\n\r\n").encode()
    answer = _raw_exchange(server.url, head)
    assert answer.startswith(b"HTTP/1.1 417"), answer[:200]
    assert b'{"error":"unsupported Expect \'200-ok\'' in answer and b"X-Request-ID" in answer
    assert b"100 Continue" not in answer
    assert value(scrape(server.url), "cronnx_requests_total", api=api, model="tiny", version=1, outcome="417") == 1


def _chunked(body: bytes) -> bytes:
    return b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"


@pytest.mark.parametrize("api", sorted(ROUTES))
def test_a_transfer_coding_other_than_chunked_is_a_counted_501_and_http_1_0_framing_is_checked(server, api,
                                                                                            tiny_model):
    path, kind = ROUTES[api]
    image = encode(photo_like(64, 48, seed=8), "PNG")
    # gzip as a transfer coding: aiohttp undoes the chunks only; the handler would get gzip bytes.
    coded = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
             "Transfer-Encoding: gzip, chunked\r\n\r\n").encode() + _chunked(gzip.compress(image))
    answer = _raw_exchange(server.url, coded)
    assert answer.startswith(b"HTTP/1.1 501"), answer[:200]
    assert b"Transfer-Encoding 'gzip, chunked' is not implemented" in answer and b"Content-Encoding" in answer
    # An HTTP/1.0 request may not use Transfer-Encoding at all (RFC 9112, 6.1).
    old = (f"POST {path} HTTP/1.0\r\nContent-Type: {kind}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    answer = _raw_exchange(server.url, old + _chunked(image))
    assert answer.startswith(b"HTTP/1.0 400"), answer[:200]
    assert b"HTTP/1.0 request cannot carry Transfer-Encoding" in answer
    metrics = scrape(server.url)
    assert value(metrics, "cronnx_requests_total", api=api, model="tiny", version=1, outcome="501") == 1
    assert value(metrics, "cronnx_requests_total", api=api, model="tiny", version=1, outcome="400") == 1


def test_an_http_1_0_client_with_a_content_length_is_answered_in_http_1_0_and_the_connection_closed(server, tiny_model):
    image = encode(photo_like(64, 48, seed=9), "JPEG")
    request = (f"POST /predict/tiny HTTP/1.0\r\nContent-Type: image/jpeg\r\n"
               f"Content-Length: {len(image)}\r\n\r\n").encode() + image
    parts = urlparse(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):  # ends only when the server closes: 1.0 without keep-alive
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    assert b"transfer-encoding" not in head.lower()  # never chunked to a 1.0 client
    assert_matches(json.loads(body), DirectModel(tiny_model).probabilities(image))


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_admin_auth_scheme_is_case_insensitive(server, scheme):
    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async with session.post(f"{server.url}/admin/models/tiny/load",
                                    headers={"Authorization": f"{scheme} {TOKEN}"}) as r:
                return r.status

    assert asyncio.run(main()) == 200


def test_a_wrong_scheme_is_401_and_a_wrong_token_403(server):
    async def status(header: str) -> int:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async with session.post(f"{server.url}/admin/models/tiny/load", headers={"Authorization": header}) as r:
                return r.status

    assert asyncio.run(status(f"Basic {TOKEN}")) == 401
    assert asyncio.run(status("Bearer nope")) == 403


def test_stalled_uploads_get_408_at_the_request_timeout_while_good_requests_are_served(start_server, tiny_model):
    """200 clients send headers and 40 of 2048 body bytes, then nothing: each gets a JSON 408 when
    its request timeout runs out and its connection is closed; a good stream is served meanwhile."""
    server = start_server(server_config(model_entry("tiny", tiny_model), request_timeout_s=2))
    parts = urlparse(server.url)
    url = f"{server.url}/predict/tiny"
    head = (b"POST /predict/tiny HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 2048\r\n\r\n"
            + b"\xff\xd8" + b"\0" * 38)

    async def stalled():
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(head)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), 10)  # everything until the server closes
        finally:
            writer.close()

    async def main():
        good = GoodStream(url, encode(photo_like(320, 240, seed=1), "JPEG"))
        stream = asyncio.create_task(good.run())
        answers = await asyncio.gather(*(stalled() for _ in range(200)))
        good.stop()
        await stream
        return answers, good

    answers, good = asyncio.run(main())
    assert all(a.startswith(b"HTTP/1.1 408") and b"did not arrive within the request timeout" in a for a in answers), \
        answers[0][:300]
    assert good.statuses and set(good.statuses) == {200}, good.statuses
    m = scrape(server.url)
    assert value(m, "cronnx_requests_total", api="predict", model="tiny", version=1, outcome="408") == 200


def _compressed(encoding: str, data: bytes) -> bytes:
    import gzip
    import zlib

    import brotli
    from backports import zstd

    return {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress, "zstd": zstd.compress}[encoding](data)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_every_content_encoding_decodes_or_gets_a_json_400(server, tiny_model, encoding):
    image = encode(photo_like(96, 64, seed=6), "JPEG")

    async def send(body: bytes, coding: str):
        async with aiohttp.ClientSession(timeout=TIMEOUT, auto_decompress=False) as session:
            return await post(session, f"{server.url}/predict/tiny", body, "image/jpeg",
                              headers={"Content-Encoding": coding})

    good = asyncio.run(send(_compressed(encoding, image), encoding))
    assert good.status == 200, good.body
    assert_matches(good.body, DirectModel(tiny_model).probabilities(image))
    for _ in range(3):  # the same answer every time
        bad = asyncio.run(send(b"this is not compressed at all", encoding))
        assert bad.status == 400 and "cannot be read" in bad.body["error"], bad.body


def test_an_unknown_content_encoding_gets_415(server):
    async def send():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            return await post(session, f"{server.url}/predict/tiny", encode(photo_like(32, 32, seed=1), "JPEG"),
                              "image/jpeg", headers={"Content-Encoding": "compress"})

    reply = asyncio.run(send())
    assert reply.status == 415 and "Content-Encoding 'compress'" in reply.body["error"], reply.body


def test_connections_that_never_finish_their_headers_are_closed_after_the_idle_timeout(start_server, tiny_model):
    """Slow-headers clients (and idle ones) hold a socket for idle_timeout_s, not for ever."""
    server = start_server(server_config(model_entry("tiny", tiny_model), idle_timeout_s=1))
    parts = urlparse(server.url)

    async def slow_headers():
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(b"POST /predict/tiny HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        await writer.drain()
        try:
            started = asyncio.get_running_loop().time()
            data = await asyncio.wait_for(reader.read(), 10)
            return data, asyncio.get_running_loop().time() - started
        finally:
            writer.close()

    async def main():
        return await asyncio.gather(*(slow_headers() for _ in range(50)))

    for data, waited in asyncio.run(main()):
        assert data == b"" and waited < 8  # closed by the server, long before the client's 10 s
    (reply,) = asyncio.run(predict_many(f"{server.url}/predict/tiny", [encode(photo_like(64, 48, seed=1), "JPEG")]))
    assert reply.status == 200


def test_connections_over_the_cap_get_503_at_once_and_are_counted(start_server, tiny_model):
    server = start_server(server_config(model_entry("tiny", tiny_model), max_connections=12))
    parts = urlparse(server.url)
    image = encode(photo_like(64, 48, seed=1), "JPEG")

    async def main():
        idle = [await asyncio.open_connection(parts.hostname, parts.port) for _ in range(5)]
        await asyncio.sleep(0.2)
        opened = value(await asyncio.to_thread(scrape, server.url), "cronnx_open_connections")
        idle += [await asyncio.open_connection(parts.hostname, parts.port) for _ in range(7)]
        await asyncio.sleep(0.2)
        refused = await asyncio.to_thread(_raw_exchange, server.url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        for _, writer in idle:
            writer.close()
        await asyncio.sleep(0.3)
        return opened, refused

    opened, refused = asyncio.run(main())
    assert opened == 6  # the five idle ones and the scrape's own
    assert refused.startswith(b"HTTP/1.1 503") and b"server.max_connections" in refused, refused
    assert b"Retry-After: 1" in refused
    (reply,) = asyncio.run(predict_many(f"{server.url}/predict/tiny", [image]))
    assert reply.status == 200
    assert value(scrape(server.url), "cronnx_connections_refused_total") == 1


STALLED_CLIENTS = 4
PIPELINED = 40
SEND_TIMEOUT_S = 1.0


def _v2_request(rows: np.ndarray) -> bytes:
    """One V2 infer request for the wide model, `rows` (FP32, [N, 3, H, W]) in binary."""
    tensor = rows.astype(np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(tensor)}}]}).encode()
    return (f"POST /v2/models/wide/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(header) + len(tensor)}\r\n"
            f"\r\n").encode() + header + tensor


def _stalled_client(host: str, port: int, request: bytes) -> socket.socket:
    """A connection that pipelines PIPELINED requests and reads nothing (a small receive buffer,
    so that the server's side fills soon)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    sock.setblocking(False)
    for _ in range(PIPELINED):
        try:
            sock.send(request)
        except BlockingIOError:
            break
    return sock


def _seconds_until_reset(socks: list[socket.socket], timeout_s: float) -> list[float]:
    """Seconds until each socket is hung up or reset by the server, seen without reading its data."""
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLERR | select.POLLHUP)
    started, ended = time.monotonic(), {}
    while len(ended) < len(socks):
        waited = time.monotonic() - started
        assert waited < timeout_s, f"{len(socks) - len(ended)} stalled connections still open after {waited:.1f} s"
        for fd, _ in poller.poll(50):
            ended[fd] = time.monotonic() - started
            poller.unregister(fd)
    return [ended[sock.fileno()] for sock in socks]


@pytest.mark.parametrize("front_processes", [1, 2], ids=["one process", "two front processes"])
def test_clients_that_never_read_their_answers_are_closed_after_the_send_timeout(start_server, tmp_path,
                                                                                 front_processes):
    """Clients that pipeline requests and never read the answers held their connections for ever
    (every timeout then covers something else): each is closed once an answer has waited
    send_timeout_s, counted, and held no more than that one answer; a good stream beside them
    is served throughout and the connections they held are free again."""
    model = tiny_classifier(tmp_path / "wide.onnx", size=8, classes=50_000, hidden=16)  # ~200 kB answers
    server = start_server(server_config(model_entry("wide", model), send_timeout_s=SEND_TIMEOUT_S,
                                        idle_timeout_s=60, max_connections=6 * front_processes,
                                        front_processes=front_processes))
    parts = urlparse(server.url)
    request = _v2_request(np.zeros((1, 3, 8, 8), np.float32))
    head, body = request.split(b"\r\n\r\n", 1)
    with urllib.request.urlopen(urllib.request.Request(
            f"{server.url}/v2/models/wide/infer", data=body, headers=dict(
                line.split(": ", 1) for line in head.decode().splitlines()[1:] if not line.startswith("Host")))) as r:
        answer_bytes = len(r.read()) + len(str(r.headers))
    photo = encode(photo_like(64, 48, seed=1), "JPEG")

    async def main():
        good = GoodStream(f"{server.url}/predict/wide", photo)
        stream = asyncio.create_task(good.run())
        stalled = [_stalled_client(parts.hostname, parts.port, request) for _ in range(STALLED_CLIENTS)]
        try:
            waited = await asyncio.to_thread(_seconds_until_reset, stalled, SEND_TIMEOUT_S + 20)
        finally:
            for sock in stalled:
                sock.close()
        # The server has let them go once it counts only the good stream's connection and the
        # scrape's (a reset seen here may come before the server's side has closed).
        await asyncio.to_thread(wait_until, lambda: value(scrape(server.url), "cronnx_open_connections") <= 2,
                                timeout_s=10, what="the stalled connections to be closed")
        # As many clients as the stalled ones held, at once: each gets its connection.
        after = await predict_many(f"{server.url}/predict/wide", [photo] * STALLED_CLIENTS)
        good.stop()
        await asyncio.wait_for(stream, 30)
        return waited, after, good.statuses

    waited, after, statuses = asyncio.run(main())
    assert all(SEND_TIMEOUT_S * 0.9 <= w < SEND_TIMEOUT_S + 15 for w in waited), waited
    assert [r.status for r in after] == [200] * STALLED_CLIENTS
    assert statuses and set(statuses) == {200}, statuses
    # Front processes report their connections every second.
    wait_until(lambda: value(scrape(server.url), "cronnx_send_timeouts_total") >= STALLED_CLIENTS, timeout_s=5,
               what="the send timeouts to be counted")
    samples = scrape(server.url)
    assert value(samples, "cronnx_send_timeouts_total") == STALLED_CLIENTS
    assert value(samples, "cronnx_connections_refused_total") == 0
    # The server stopped answering them: far fewer answers than the requests they pipelined.
    answered = value(samples, "cronnx_requests_total", model="wide", version="1", api="v2", outcome="success")
    assert 1 + STALLED_CLIENTS <= answered < 1 + STALLED_CLIENTS * PIPELINED / 2
    closings = [json.loads(line) for line in server.log().splitlines() if "server.send_timeout_s" in line]
    assert len(closings) == STALLED_CLIENTS
    assert all(0 < c["unsent_bytes"] <= answer_bytes + 100 for c in closings), (answer_bytes, closings)


def _read_slowly(url: str, request: bytes, bytes_per_s: float) -> tuple[bytes, bytes, float]:
    """Send `request` and read its answer at about `bytes_per_s`: (head, body, seconds taken)."""
    parts = urlparse(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        started = time.monotonic()
        conn.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(16384)
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(body) < length:
            chunk = conn.recv(16384)
            assert chunk, f"the server closed the connection after {len(body)} of {length} bytes"
            body += chunk
            time.sleep(len(chunk) / bytes_per_s)
        return head, body, time.monotonic() - started


def test_a_client_that_reads_a_large_answer_slowly_keeps_its_connection(start_server, tmp_path):
    """The send timeout is for clients that take nothing: one reading an answer of megabytes at
    2 MB/s, for several send timeouts, gets all of it."""
    model = tiny_classifier(tmp_path / "wide.onnx", size=8, classes=50_000, hidden=16)
    server = start_server(server_config(model_entry("wide", model), send_timeout_s=SEND_TIMEOUT_S))
    rows = np.random.default_rng(3).random((8, 3, 8, 8), dtype=np.float32)
    head, body, seconds = _read_slowly(server.url, _v2_request(rows), bytes_per_s=2e6)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert len(body) > 6e6 and seconds > 3 * SEND_TIMEOUT_S, (len(body), seconds)
    outputs = json.loads(body)["outputs"][0]
    assert outputs["shape"] == [8, 50_000]
    assert value(scrape(server.url), "cronnx_send_timeouts_total") == 0

