"""How every answer leaves: JSON bodies, the request id on each, and the one table that maps the
errors below HTTP (`errors.py`) to status codes."""

from __future__ import annotations

import logging
import re
import uuid

import msgspec
from aiohttp import web

from cronnx.errors import (BodyTimeout, CronnxError, DeadlineExceeded, ExpectationFailed, ImageTooLarge,
                           InferenceFailed, InvalidRequest, ModelControlFailed, ModelNotFound, NotAuthenticated,
                           PermissionDenied, RequestTooLarge, TransferCodingNotImplemented, Unavailable,
                           UndecodableBody, UnsupportedMediaType)
from cronnx.http.schemas import JSON_TYPE

log = logging.getLogger("cronnx.http")

REQUEST_ID_HEADER = "X-Request-ID"
# A traced request's answer names its server span, as W3C Trace Context writes it: the trace id
# to look for in the tracing backend (http/record.py sets it).
TRACEPARENT = "traceparent"
# A client's request id is echoed into headers and logs: keep it short and printable.
_VALID_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")

_json = msgspec.json.Encoder()

# Every error below HTTP becomes one status here; the most specific class listed wins.
ERROR_STATUS: dict[type[CronnxError], int] = {
    InvalidRequest: 400,
    BodyTimeout: 408,
    NotAuthenticated: 401,
    PermissionDenied: 403,
    ModelNotFound: 404,
    ImageTooLarge: 413,
    RequestTooLarge: 413,
    UnsupportedMediaType: 415,
    ExpectationFailed: 417,
    TransferCodingNotImplemented: 501,
    InferenceFailed: 500,
    ModelControlFailed: 500,
    Unavailable: 503,
    DeadlineExceeded: 504,
}


def error_status(exc: CronnxError) -> int:
    """`exc`'s status: that of its most specific class in ERROR_STATUS, else 500."""
    for cls in type(exc).__mro__:
        status = ERROR_STATUS.get(cls)
        if status is not None:
            return status
    return 500


def json_response(body: msgspec.Struct | dict | list, status: int = 200, headers: dict | None = None) -> web.Response:
    """`body` encoded as JSON (msgspec) with `status` and any more `headers`."""
    return web.Response(body=_json.encode(body), status=status, headers=headers, content_type=JSON_TYPE)


@web.middleware
async def request_ids_and_json_errors(request: web.Request, handler):
    """Every answer carries the request id (and a traced request's `traceparent`); every error
    leaves as {"error": "..."} with its status."""
    request_id = request.headers.get(REQUEST_ID_HEADER, "")
    if not _VALID_REQUEST_ID.match(request_id):
        request_id = uuid.uuid4().hex
    request["request_id"] = request_id
    try:
        response = await handler(request)
    except CronnxError as exc:
        status = error_status(exc)
        response = json_response({"error": exc.message}, status, {"Retry-After": "1"} if status == 503 else None)
        if isinstance(exc, (BodyTimeout, UndecodableBody)):
            response.force_close()  # the rest of the body may still come: not on this connection
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = json_response({"error": exc.reason}, exc.status, {k: v for k, v in exc.headers.items()
                                                                      if k != "Content-Type"})
    except Exception:
        log.exception("unexpected error on %s %s (request %s)", request.method, request.path, request_id)
        response = json_response({"error": "internal error; see the server log"}, 500)
    response.headers[REQUEST_ID_HEADER] = request_id
    traceparent = request.get(TRACEPARENT)
    if traceparent is not None:
        response.headers[TRACEPARENT] = traceparent
    return response
