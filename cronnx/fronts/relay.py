"""Every route a front process does not serve itself (health, readiness, metrics, models, admin, V2
metadata), passed to the server process's own app on its Unix socket, so that each has one owner
and every front answers alike."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from yarl import URL

from cronnx.errors import Unavailable
from cronnx.http.body import read_body
from cronnx.http.context import SETTINGS
from cronnx.http.middleware import REQUEST_ID_HEADER

# Headers that belong to one connection (RFC 9110, 7.6.1), or that aiohttp sets itself on the
# hop it makes: not passed between the client and the server process.
_NOT_FORWARDED = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                            "upgrade", "content-length", "content-encoding", "host", "expect", "date", "server"})

SERVER = web.AppKey("server", aiohttp.ClientSession)


def server_session(socket_path: str) -> aiohttp.ClientSession:
    """A client of the server process's app on `socket_path`. Its answers are read whole (no
    timeout of its own: the request timeout there bounds them); auto_decompress off keeps their
    Content-Encoding as sent."""
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path), auto_decompress=False,
                                 timeout=aiohttp.ClientTimeout(total=None))


async def relay(request: web.Request) -> web.Response:
    """Any route not served here: passed to the server process (its body read and decoded here,
    within the same limits), its answer passed back."""
    settings = request.app[SETTINGS]
    body = None
    if request.body_exists:
        deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
        body = await read_body(request, settings, deadline)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
    headers[REQUEST_ID_HEADER] = request["request_id"]
    url = URL("http://cronnx" + request.raw_path, encoded=True)
    try:
        async with request.app[SERVER].request(request.method, url, headers=headers, data=body,
                                               allow_redirects=False) as answer:
            payload = await answer.read()
            return web.Response(status=answer.status, body=payload,
                                headers={k: v for k, v in answer.headers.items() if k.lower() not in _NOT_FORWARDED})
    except aiohttp.ClientError as exc:
        raise Unavailable(f"the server process did not answer: {exc}") from None
