"""aiohttp's handler of each connection, with Cronnx's error contract kept below the application
and a bound on how long a client may leave an answer untaken.

A client that sends requests and never reads their answers would hold its connection for ever:
aiohttp writes an answer and waits for the socket to drain below its high-water mark (64 KiB in
the transport, beyond what the kernel's buffers hold) before it handles the connection's next
request, and no timeout covers that wait. Here, once writing has paused, the bytes waiting in the
transport are looked at every `send_timeout_s`: if the client took none of them in that time the
connection is reset (RST, so that the kernel drops what it still buffers for the client too) and
counted; a client that took some, however slowly, keeps it (nginx's `send_timeout`: the time
between two successive writes). What one such connection holds meanwhile is bounded by aiohttp:
one answer being written, and at most 32 pipelined requests parsed behind it (aiohttp 3.14.5's
per-connection queue) before it stops reading the socket.

Two answers come from aiohttp's HTTP parser itself, before any handler or middleware runs:

- A request its parser refuses (a `Content-Length` that is not a number or is given twice, with
  `Transfer-Encoding` beside it, a header over 8190 bytes, a control character in a header, a
  request line that is not HTTP) gets aiohttp's own plain-text 400. Here it gets Cronnx's
  `{"error": "..."}` with an `X-Request-ID`, as every other error does.
- With aiohttp's C parser, chunked framing that breaks once the handler is reading the body is
  queued as an error for after the request, and the body it is reading is never ended: the
  request would wait for the request timeout and get a 408. (The pure-Python parser ends the body
  with the error.) Here the body is ended with the parser's error as well, so the handler answers
  400, "the request body cannot be read", at once.

Both reach into aiohttp's RequestHandler (its message queue and current request); the malformed
requests of tests/http/test_storm.py, on both parsers, are what holds this to aiohttp's behaviour.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import uuid
from collections.abc import Callable
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from cronnx.http.middleware import REQUEST_ID_HEADER, json_response

log = logging.getLogger("cronnx.http")

# The parser's message may quote the offending bytes.
_MAX_REASON_CHARS = 200


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp's RequestHandler (one per connection) whose own error answers are Cronnx's JSON,
    and which resets its connection when its client has taken none of an answer's waiting bytes
    for `send_timeout_s` seconds, calling `on_send_timeout()` (the module's docstring says how)."""

    __slots__ = ("_send_timeout_s", "_on_send_timeout", "_send_timer", "_unsent")

    def __init__(self, server: web.Server, send_timeout_s: float, on_send_timeout: Callable[[], None], **kwargs):
        super().__init__(server, **kwargs)
        self._send_timeout_s = send_timeout_s
        self._on_send_timeout = on_send_timeout
        self._send_timer: asyncio.TimerHandle | None = None
        self._unsent = 0  # the bytes waiting in the transport when the send timer was last armed

    def pause_writing(self) -> None:
        super().pause_writing()
        self._arm_send_timer()

    def _arm_send_timer(self) -> None:
        self._unsent = self.transport.get_write_buffer_size() if self.transport is not None else 0
        self._send_timer = self._loop.call_later(self._send_timeout_s, self._send_timed_out)

    def resume_writing(self) -> None:
        self._cancel_send_timer()
        super().resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_send_timer()
        super().connection_lost(exc)

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timed_out(self) -> None:
        self._send_timer = None
        transport = self.transport
        if transport is None:
            return
        unsent = transport.get_write_buffer_size()
        if unsent < self._unsent:
            self._arm_send_timer()  # the client took some of it: a slow reader, not a stalled one
            return
        peer = transport.get_extra_info("peername")
        log.info("connection closed: its client took none of an answer in server.send_timeout_s",
                 extra={"fields": {"remote": peer[0] if peer else None, "send_timeout_s": self._send_timeout_s,
                                   "unsent_bytes": unsent}})
        self._on_send_timeout()
        # A reset, not a close: a closed socket would keep trying to send the kernel's buffered
        # answer (megabytes) to a client that takes none of it, for minutes, before its FIN.
        sock = transport.get_extra_info("socket")
        try:
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # closed meanwhile: the abort below is all there is to do
        transport.abort()

    def data_received(self, data: bytes) -> None:
        request, queued = self._current_request, len(self._messages)
        super().data_received(data)
        if request is None or len(self._messages) == queued:
            return
        refused = self._messages[-1][0]
        content = request.content
        if isinstance(refused, _ErrInfo) and not content.is_eof() and content.exception() is None:
            # The C parser's framing error while this request's body is read: end the body with it
            # (the pure-Python parser has ended it with its own error already).
            content.set_exception(refused.exc)

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """The answer to a request the parser refused (status 400, `message` says why) or to what
        no middleware answered (aiohttp's 500 for an exception, 504 for a timeout; Cronnx's
        middleware answers both itself): {"error": ...} with a new request id, and the connection
        closed after it, as aiohttp does. Raises ConnectionError when part of a response was
        already sent (as aiohttp does; the connection is then dropped)."""
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already started: no error answer can follow it")
        request_id = uuid.uuid4().hex
        if status == 400:
            # The C parser's first line ends with ':' before the bytes it quotes on the next ones.
            reason = (message or "").strip().splitlines()[:1] or ["refused by the parser"]
            error = f"malformed HTTP request: {reason[0].rstrip(':')[:_MAX_REASON_CHARS]}"
            log.info("malformed HTTP request refused", extra={"fields": {
                "request_id": request_id, "remote": request.remote, "status": status, "error": error}})
        else:
            log.error("unexpected error handling a request from %s (request %s)", request.remote, request_id,
                      exc_info=exc)
            error = f"{HTTPStatus(status).phrase.lower()}; see the server log"
        response = json_response({"error": error}, status, {REQUEST_ID_HEADER: request_id})
        response.force_close()
        return response


def new_connection(server: web.Server, send_timeout_s: float,
                   on_send_timeout: Callable[[], None]) -> JsonErrorRequestHandler:
    """The handler of one new connection to `server` (aiohttp's low-level server), with the
    server's handler settings, as `server()` makes aiohttp's own (web.Server.__call__, less its
    fallback for settings RequestHandler does not take: Cronnx passes none)."""
    return JsonErrorRequestHandler(server, send_timeout_s, on_send_timeout, loop=server._loop, **server._kwargs)
