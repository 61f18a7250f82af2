"""The listening socket, with a cap on open connections.

aiohttp has no limit on connections: a flood of clients that connect and send nothing (or trickle)
would hold a socket each until its idle timeout, and past the process's file-descriptor limit new
connections fail for everyone. Here each accepted connection goes to aiohttp's own protocol while
fewer than `max_connections` are open; past that it gets a 503 with `Retry-After` and is closed at
once, without its request being read, and is counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

_BODY = b'{"error":"the server has as many open connections as it takes (server.max_connections); retry"}'
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
           b"Connection: close\r\nContent-Length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


class _Refuse(asyncio.Protocol):
    """Answers 503 and closes, reading nothing."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(REFUSAL)
        transport.close()


class CappedProtocolFactory:
    """Hands each new connection to `server` (aiohttp's low-level server, a protocol factory) while
    it has fewer than `max_connections` open; `on_refused()` is called for each one turned away."""

    def __init__(self, server: web.Server, max_connections: int, on_refused: Callable[[], None]):
        self._server = server
        self._max = max_connections
        self._on_refused = on_refused

    def __call__(self) -> asyncio.Protocol:
        if len(self._server.connections) >= self._max:
            self._on_refused()
            return _Refuse()
        return self._server()


async def listen(runner: web.AppRunner, host: str, port: int, max_connections: int,
                 on_refused: Callable[[], None]) -> asyncio.AbstractServer:
    """Start accepting on host:port (0: a free port) for the set-up `runner`; the caller closes the
    returned server to stop accepting, then cleans up the runner (which finishes open requests)."""
    factory = CappedProtocolFactory(runner.server, max_connections, on_refused)
    return await asyncio.get_running_loop().create_server(factory, host, port, backlog=512)
