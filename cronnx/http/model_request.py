"""An HTTP request for a model (`/predict`, V2 infer): its route's model and version, its request
id, routing key and trace begun here, then served as every protocol serves one
(`protocol.record.serve_model_request`)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from cronnx.engine.client import UNKNOWN_MODEL, InferenceClient, Selection
from cronnx.http.context import CLIENT, TRACING
from cronnx.http.middleware import TRACEPARENT
from cronnx.protocol.record import RequestRecord, serve_model_request, trace_attributes

if TYPE_CHECKING:
    from cronnx.observability.tracing import RequestTrace

# Requests with the same key get the same version of a model whose traffic is split.
ROUTING_KEY_HEADER = "X-Cronnx-Key"

# An HTTP handler's work once its request has a selection: (request, client, selection, record,
# started: the arrival, perf_counter) -> the answer. It fills in the record's batch size and phases.
HttpModelHandler = Callable[[web.Request, InferenceClient, Selection, RequestRecord, float], Awaitable[web.Response]]


async def model_request(request: web.Request, api: str, handle: HttpModelHandler) -> web.Response:
    """Serve a request for the model its route names (`api`: "predict", "v2") with `handle`."""
    started = time.perf_counter()
    client = request.app[CLIENT]
    trace = _begin_trace(request, api)
    record = RequestRecord(request["request_id"], api, UNKNOWN_MODEL, "", trace and trace.context)
    end_trace = None
    if trace is not None:
        def end_trace(record: RequestRecord, total_s: float) -> None:
            trace.finish(record.status, trace_attributes(record), record.phases, total_s, record.batches, record.error)
    return await serve_model_request(
        client, record, request.match_info["model"], request.match_info.get("version"),
        request.headers.get(ROUTING_KEY_HEADER), end_trace, started,
        lambda selection, record: handle(request, client, selection, record, started))


def _begin_trace(request: web.Request, api: str) -> RequestTrace | None:
    """The request's server span, begun now, when the process traces and the sampler (or a
    sampled `traceparent`) says so; its `traceparent` then goes into the answer."""
    tracing = request.app[TRACING]
    if tracing is None:
        return None
    route = request.match_info.route.resource.canonical
    trace = tracing.request(f"{request.method} {route}", request.headers, time.time_ns(), {
        "http.request.method": request.method, "http.route": route, "url.path": request.path, "url.scheme": "http",
        "cronnx.api": api, "cronnx.request_id": request["request_id"]})
    if trace is not None:
        request[TRACEPARENT] = trace.traceparent
    return trace
