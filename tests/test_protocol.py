"""HTTP details a client relies on: content types, Expect: 100-continue, auth scheme case."""

from __future__ import annotations

import asyncio
import socket
from urllib.parse import urlparse

import aiohttp
import pytest

from reference import DirectModel, assert_matches
from support.client import TIMEOUT, post
from support.images import encode, photo_like
from support.models import tiny_classifier
from support.server import model_entry, server_config

BODY_LIMIT = 64 * 1024
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("models") / "tiny.onnx")


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


def test_a_body_declared_too_large_gets_413_without_an_invitation_to_send_it(server):
    head = (f"POST /predict/tiny HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {BODY_LIMIT + 1}\r\nExpect: 100-continue\r\n\r\n").encode()
    answer = _raw_exchange(server.url, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"100 Continue" not in answer and b'"error"' in answer


def test_a_body_that_fits_is_invited_with_100_continue(server):
    head = (f"POST /predict/tiny HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n").encode()
    assert _raw_exchange(server.url, head).startswith(b"HTTP/1.1 100 Continue")


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
