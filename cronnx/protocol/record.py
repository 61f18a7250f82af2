"""What every request for a model goes through, whichever protocol it speaks (HTTP's handlers
through `http/model_request.py`, gRPC's `ModelInfer`): its version chosen, its outcome recorded,
one metrics record (through the inference client), one access-log line (logger "cronnx.access")
and, when it is traced, its spans ended."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from cronnx.config import version_number
from cronnx.engine.client import InferenceClient, ModelView, Selection
from cronnx.errors import CronnxError, ModelNotFound, QueueFull, QueueTimeout
from cronnx.observability.trace_context import TraceContext
from cronnx.protocol.status import error_status

access_log = logging.getLogger("cronnx.access")

# A client's request id is echoed into headers, metadata and logs: keep it short and printable.
_VALID_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def request_id_from(sent: str | None) -> str:
    """The request id a client sent (`X-Request-ID`, gRPC's `x-request-id`) when it is 1 to 128
    printable ASCII characters, else a new one (32 hex digits)."""
    return sent if sent is not None and _VALID_REQUEST_ID.match(sent) else uuid.uuid4().hex


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


T = TypeVar("T")

# A protocol's work once its request has a selection: (selection, record) -> the answer. It fills
# in the record's batch size and phases.
ModelHandler = Callable[[Selection, RequestRecord], Awaitable[T]]


# Ends a traced request's spans once it has answered: (its record, its time in seconds) -> None.
TraceEnd = Callable[[RequestRecord, float], None]


async def serve_model_request(client: InferenceClient, record: RequestRecord, model: str, version: str | None,
                              routing_key: str | None, end_trace: TraceEnd | None, started: float,
                              handle: ModelHandler[T]) -> T:
    """Serve a request for `model` (`version`: the digits the request names, None for the
    model's traffic split, where `routing_key` keeps a client on one version): the version
    selected, `handle`, then the request reported to the client, logged and, when it is traced,
    its spans ended by `end_trace`. `started`: its arrival (perf_counter). Raises what `handle`
    or the selection raises (CronnxError, CancelledError), with the record's outcome set from it."""
    selection = None
    try:
        with outcome_into(record):
            selection = client.select(model, requested_version(model, version), routing_key)
            return await handle(selection, record)
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
            if end_trace is not None:
                end_trace(record, total_s)


def trace_attributes(record: RequestRecord) -> dict[str, object]:
    """What a request's span says of its answer, on every protocol."""
    return {"cronnx.model": record.model, "cronnx.version": record.version, "cronnx.batch_size": record.batch_size}


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


def requested_version(model: str, text: str | None) -> int | None:
    """The version a request names (`text`: its digits), None when it names none. Raises
    ModelNotFound for a text that names no version a model can have (not ASCII digits, 0, or
    beyond int64: see config.MAX_VERSION), as for any version not served."""
    if text is None:
        return None
    number = version_number(text) if text.isascii() and text.isdigit() else None
    if number is None:
        digits = text.lstrip("0") or "0"
        raise ModelNotFound(f"version {digits[:24]}{'...' if len(digits) > 24 else ''} of model "
                            f"{model!r} is not served")
    return number
