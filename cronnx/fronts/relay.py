"""Every route a front process does not serve itself (health, readiness, metrics, models, admin, V2
metadata), passed to the server process's own app on its Unix socket, so that each has one owner
and every front answers alike; and the same routes read for the gRPC service's metadata calls
(`RelayedMetadata`)."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import aiohttp
from aiohttp import web
from yarl import URL

from cronnx.errors import CronnxError, InvalidRequest, ModelNotFound, ModelNotReady, Unavailable
from cronnx.http.body import read_body
from cronnx.http.context import SETTINGS
from cronnx.http.middleware import REQUEST_ID_HEADER
from cronnx.protocol.record import requested_version

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


# The error a relayed metadata route's status stands for (protocol.status's table read back).
_ERROR_OF_STATUS: dict[int, type[CronnxError]] = {400: InvalidRequest, 404: ModelNotFound, 503: ModelNotReady}


class RelayedMetadata:
    """The protocol's metadata (protocol.metadata.MetadataSource) read from the server process's
    V2 routes over `session` (`server_session`): the bodies, and errors with their messages, are
    the server process's own."""

    def __init__(self, session: aiohttp.ClientSession):
        self._session = session

    async def server_metadata(self) -> dict:
        return (await self._get("GET", "/v2"))[1]

    async def server_ready(self) -> bool:
        return (await self._get("GET", "/v2/health/ready", ok=(200, 503)))[0] == 200

    async def model_ready(self, name: str, version: str | None) -> bool:
        return (await self._get("GET", _model_path(name, version) + "/ready", ok=(200, 503)))[0] == 200

    async def model_metadata(self, name: str, version: str | None) -> dict:
        return (await self._get("GET", _model_path(name, version)))[1]

    async def model_config(self, name: str, version: str | None) -> dict:
        return (await self._get("GET", _model_path(name, version) + "/config"))[1]

    async def model_statistics(self, name: str | None, version: str | None) -> dict:
        path = "/v2/models/stats" if name is None else _model_path(name, version) + "/stats"
        return (await self._get("GET", path))[1]

    async def repository_index(self) -> list[dict]:
        return (await self._get("POST", "/v2/repository/index"))[1]

    async def _get(self, method: str, path: str, ok: tuple[int, ...] = (200,)) -> tuple[int, object]:
        """(status, decoded JSON body) of the server process's answer. Raises the error its
        status stands for with its message (Unavailable for any other, or no answer)."""
        try:
            async with self._session.request(method, URL("http://cronnx" + path, encoded=True)) as answer:
                body = await answer.json(content_type=None)
        except (aiohttp.ClientError, ValueError) as exc:
            raise Unavailable(f"the server process did not answer: {exc}") from None
        if answer.status in ok:
            return answer.status, body
        message = body.get("error", "") if isinstance(body, dict) else ""
        raise _ERROR_OF_STATUS.get(answer.status, Unavailable)(message or f"the server process answered {answer.status}")


def _model_path(name: str, version: str | None) -> str:
    """The V2 path of a model (and version). Raises ModelNotFound, as the server process would,
    for a version no model can have."""
    number = requested_version(name, version)
    path = f"/v2/models/{quote(name, safe='')}"
    return path if number is None else f"{path}/versions/{number}"
