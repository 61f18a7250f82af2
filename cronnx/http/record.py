"""What every request for a model goes through, whichever protocol it speaks: its version chosen,
its outcome recorded, one metrics record (through the inference client), one access-log line
(logger "cronnx.access") and, when it is traced, its spans."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from aiohttp import web

from cronnx.config import version_number
from cronnx.engine.client import UNKNOWN_MODEL, InferenceClient, ModelView, Selection
from cronnx.errors import CronnxError, ModelNotFound, QueueFull, QueueTimeout
from cronnx.http.context import CLIENT, TRACING
from cronnx.http.middleware import TRACEPARENT, error_status
from cronnx.observability.trace_context import TraceContext

if TYPE_CHECKING:
    from cronnx.observability.tracing import RequestTrace

access_log = logging.getLogger("cronnx.access")

# Requests with the same key get the same version of a model whose traffic is split.
ROUTING_KEY_HEADER = "X-Cronnx-Key"


class RequestRecord:
    """What one request for a model did, for its metrics, its log line and its spans: the API it
    came by, the version's labels (UNKNOWN_MODEL and "" until one is chosen), its status and
    error, for an answer its batch size, phases (seconds by name) and the spans of the batches
    its rows ran in; `trace` its own span when it is traced (what its rows' batches link to)."""

    def __init__(self, request_id: str, api: str, model: str, version: str, trace: TraceContext | None = None):
        self.request_id, self.api, self.model, self.version = request_id, api, model, version
        self.trace = trace
        # 499: the client closed the connection first (nginx's convention).
        self.status = 500
        self.error = ""
        self.rejection = ""
        self.batch_size = 0
        self.phases: dict[str, float] = {}
        self.batches: list[TraceContext] = []

    @property
    def outcome(self) -> str:
        """The metrics' outcome label: "success", or the status code."""
        return "success" if self.status == 200 else str(self.status)


# A protocol's work once its request has a selection: (request, client, selection, record,
# started: the arrival, perf_counter) -> the answer. It fills in the record's batch size and phases.
ModelHandler = Callable[[web.Request, InferenceClient, Selection, RequestRecord, float], Awaitable[web.Response]]


async def model_request(request: web.Request, api: str, handle: ModelHandler) -> web.Response:
    """Serve a request for the model its route names (`api`: "predict", "v2"): the version
    selected, `handle`, then the request reported to the client, logged and, when traced, its
    spans ended."""
    started = time.perf_counter()
    client = request.app[CLIENT]
    trace = _begin_trace(request, api)
    record = RequestRecord(request["request_id"], api, UNKNOWN_MODEL, "", trace and trace.context)
    selection = None
    try:
        with outcome_into(record):
            selection = client.select(request.match_info["model"], requested_version(request),
                                      request.headers.get(ROUTING_KEY_HEADER))
            return await handle(request, client, selection, record, started)
    finally:
        total_s = time.perf_counter() - started
        try:
            if selection is not None:
                view = selection.view
                if view is None:
                    view = await _chosen(client, selection)
                if view is not None:
                    record.model, record.version = view.name, str(view.version)
        finally:
            # Counted and logged even if the wait above is cancelled (a drain's shutdown timeout).
            client.finished(selection, record, total_s)
            log_request(record, total_s)
            if trace is not None:
                trace.finish(record.status, {"cronnx.model": record.model, "cronnx.version": record.version,
                                             "cronnx.batch_size": record.batch_size},
                             record.phases, total_s, record.batches, record.error)


def _begin_trace(request: web.Request, api: str) -> RequestTrace | None:
    """The request's server span, begun now, when the process traces and the sampler (or a
    sampled `traceparent`) says so; its `traceparent` then goes into the answer."""
    tracing = request.app[TRACING]
    if tracing is None:
        return None
    route = request.match_info.route.resource.canonical
    trace = tracing.request(request.method, route, request.headers, time.time_ns(), {
        "http.request.method": request.method, "http.route": route, "url.path": request.path, "url.scheme": "http",
        "cronnx.api": api, "cronnx.request_id": request["request_id"]})
    if trace is not None:
        request[TRACEPARENT] = trace.traceparent
    return trace


async def _chosen(client: InferenceClient, selection: Selection) -> ModelView | None:
    """The version a request refused before its first row was chosen for (a front process
    chooses with the first row): its labels are the version's, as where the choice comes first.
    None when no version would serve it, or the answer cannot be had (the server process gone)."""
    try:
        # Shielded: cancelling this wait leaves the round trip (a front process's Choose) to end on its own.
        return await asyncio.shield(client.view(selection))
    except Exception:
        return None


@contextmanager
def outcome_into(record: RequestRecord) -> Iterator[None]:
    """Sets `record`'s status by how the block ends: 200, the error's status and message (a
    CronnxError), or 499 when the client went away (nginx's convention). Errors pass through."""
    try:
        yield
    except CronnxError as exc:
        record.status, record.error = error_status(exc), exc.message
        record.rejection = ("queue_full" if isinstance(exc, QueueFull)
                            else "timeout" if isinstance(exc, QueueTimeout) else "")
        raise
    except asyncio.CancelledError:
        record.status, record.error = 499, "the client closed the connection"
        raise
    record.status = 200


def log_request(record: RequestRecord, total_s: float) -> None:
    """The request's access-log line (logger "cronnx.access")."""
    fields = {"request_id": record.request_id, "api": record.api, "model": record.model, "version": record.version,
              "status": record.status, "total_ms": total_s * 1000.0}
    if record.batch_size:
        fields["batch_size"] = record.batch_size
    if record.phases:
        fields["phases_ms"] = {phase: seconds * 1000.0 for phase, seconds in record.phases.items()}
    if record.error:
        fields["error"] = record.error
    if record.trace is not None:
        fields["trace_id"], fields["span_id"] = record.trace.trace_id_hex, record.trace.span_id_hex
    access_log.info("request", extra={"fields": fields})


def requested_version(request: web.Request) -> int | None:
    """The version a route names (`.../versions/{version}`, digits), None when it names none.
    Raises ModelNotFound for a number no version can have (0, or beyond int64: see
    config.MAX_VERSION), as for any version not served."""
    text = request.match_info.get("version")
    if text is None:
        return None
    number = version_number(text)
    if number is None:
        digits = text.lstrip("0") or "0"
        raise ModelNotFound(f"version {digits[:24]}{'...' if len(digits) > 24 else ''} of model "
                            f"{request.match_info['model']!r} is not served")
    return number
