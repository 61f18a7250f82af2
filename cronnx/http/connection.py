"""aiohttp's handler of each connection, with Cronnx's error contract kept below the application.

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

import logging
import uuid
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from cronnx.http.middleware import REQUEST_ID_HEADER, json_response

log = logging.getLogger("cronnx.http")

# The parser's message may quote the offending bytes.
_MAX_REASON_CHARS = 200


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp's RequestHandler (one per connection) whose own error answers are Cronnx's JSON."""

    __slots__ = ()

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


def new_connection(server: web.Server) -> JsonErrorRequestHandler:
    """The handler of one new connection to `server` (aiohttp's low-level server), with the
    server's handler settings, as `server()` makes aiohttp's own (web.Server.__call__, less its
    fallback for settings RequestHandler does not take: Cronnx passes none)."""
    return JsonErrorRequestHandler(server, loop=server._loop, **server._kwargs)
