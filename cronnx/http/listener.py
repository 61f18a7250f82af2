"""The listening socket, with a cap on open connections.

aiohttp has no limit on connections: a flood of clients that connect and send nothing (or trickle)
would hold a socket each until its idle timeout, and past the process's file-descriptor limit new
connections fail for everyone. Here each accepted connection goes to aiohttp's own connection
handler while fewer than `max_connections` are open; past that it gets a 503 with `Retry-After`
and is closed at once, without its request being read, and is counted. A connection whose client
takes none of an answer for `send_timeout_s` is reset and counted too (connection.py).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol

from aiohttp import web

from cronnx.http.connection import new_connection

_BODY = b'{"error":"the server has as many open connections as it takes (server.max_connections); retry"}'
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
           b"Connection: close\r\nContent-Length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


class _Refuse(asyncio.Protocol):
    """Answers 503 and closes, reading nothing."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(REFUSAL)
        transport.close()


class ConnectionEvents(Protocol):
    """Where a listener reports what it does to connections (the metrics, or a front process's
    reports to the server process)."""

    def refused(self) -> None:
        """A connection was answered 503 and closed: `max_connections` were open."""

    def send_timed_out(self) -> None:
        """A connection was reset: its client took none of an answer for `send_timeout_s`."""


class CappedProtocolFactory:
    """Hands each new connection to `server` (aiohttp's low-level server) while it has fewer than
    `max_connections` open, to aiohttp's connection handler with Cronnx's error answers and its
    `send_timeout_s` (seconds, connection.py); reports to `events` each connection turned away
    and each closed for its send timeout."""

    def __init__(self, server: web.Server, max_connections: int, send_timeout_s: float, events: ConnectionEvents):
        self._server = server
        self._max = max_connections
        self._send_timeout_s = send_timeout_s
        self._events = events

    def __call__(self) -> asyncio.Protocol:
        if len(self._server.connections) >= self._max:
            self._events.refused()
            return _Refuse()
        return new_connection(self._server, self._send_timeout_s, self._events.send_timed_out)


async def listen(runner: web.AppRunner, host: str, port: int, max_connections: int, send_timeout_s: float,
                 events: ConnectionEvents, reuse_port: bool = False) -> asyncio.AbstractServer:
    """Start accepting on host:port (0: a free port) for the set-up `runner`; the caller closes the
    returned server to stop accepting, then cleans up the runner (which finishes open requests).
    `reuse_port`: SO_REUSEPORT, so that several front processes share the port (the kernel
    spreads new connections over them)."""
    factory = CappedProtocolFactory(runner.server, max_connections, send_timeout_s, events)
    return await asyncio.get_running_loop().create_server(factory, host, port, backlog=512, reuse_port=reuse_port)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT but not listening: it holds the port for the
    front processes (which bind it the same way) and resolves port 0 to a free one, while no
    connection is ever queued on it. Raises OSError when the port is taken, by any process: the
    port is first bound without SO_REUSEPORT, which fails even where the holder shares it (another
    server of the same user with front processes would otherwise split the traffic with this one),
    though not in the seconds before that server's fronts listen. Both binds pass an earlier run's
    connections in TIME_WAIT (SO_REUSEADDR), as asyncio's listeners do."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    if port:
        with socket.socket(info[0], socket.SOCK_STREAM) as probe:
            # As asyncio's listeners do: connections of an earlier run in TIME_WAIT do not hold the port.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(info[4])
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(info[4])
    except BaseException:
        sock.close()
        raise
    return sock
