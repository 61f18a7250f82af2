"""How every answer leaves: JSON bodies, the request id on each, errors with their status
(`protocol/status.py`)."""

from __future__ import annotations

import logging

import msgspec
from aiohttp import web

from cronnx.errors import BodyTimeout, CronnxError, UndecodableBody
from cronnx.http.schemas import JSON_TYPE
from cronnx.protocol.record import request_id_from
from cronnx.protocol.status import error_status

log = logging.getLogger("cronnx.http")

REQUEST_ID_HEADER = "X-Request-ID"
# A traced request's answer names its server span, as W3C Trace Context writes it: the trace id
# to look for in the tracing backend (http/model_request.py sets it).
TRACEPARENT = "traceparent"

_json = msgspec.json.Encoder()


def json_response(body: msgspec.Struct | dict | list, status: int = 200, headers: dict | None = None) -> web.Response:
    """`body` encoded as JSON (msgspec) with `status` and any more `headers`."""
    return web.Response(body=_json.encode(body), status=status, headers=headers, content_type=JSON_TYPE)


@web.middleware
async def request_ids_and_json_errors(request: web.Request, handler):
    """Every answer carries the request id (and a traced request's `traceparent`); every error
    leaves as {"error": "..."} with its status."""
    request["request_id"] = request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
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
