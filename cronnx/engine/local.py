"""The `InferenceClient` of the server process: requests run on its own `InferenceEngine`, and are
counted in its metrics (in flight from selection to answer, then recorded)."""

from __future__ import annotations

from collections.abc import Awaitable

import numpy as np

from cronnx.engine.client import NO_QUEUE_PARAMETERS, InferenceResult, ModelView, QueueParameters, RequestReport
from cronnx.engine.inference import InferenceEngine
from cronnx.engine.pool import ModelPool
from cronnx.observability.metrics import Metrics
from cronnx.observability.trace_context import TraceContext


class LocalClient:
    """Runs a handler's requests on `engine`; a request's selection is the `ModelPool` chosen (its
    `view` read by the handler), counted in flight in it until `finished`."""

    def __init__(self, engine: InferenceEngine, metrics: Metrics):
        self._engine = engine
        self._metrics = metrics
        self._in_flight = metrics.in_flight

    def select(self, model: str, version: int | None, routing_key: str | None) -> ModelPool:
        self._in_flight.inc()
        try:
            pool = self._engine.choose(model, version, routing_key)
        except BaseException:
            self._in_flight.dec()
            raise
        pool.enter()  # drained only once this request has answered
        return pool

    async def view(self, selection: ModelPool) -> ModelView:
        return selection.view

    def infer(self, selection: ModelPool, row: bytes | np.ndarray, request_id: str, deadline: float,
              queue: QueueParameters = NO_QUEUE_PARAMETERS, trace: TraceContext | None = None
              ) -> Awaitable[InferenceResult]:
        # The engine's own coroutine, not one wrapping it: one frame less per row.
        if isinstance(row, bytes):
            return self._engine.infer(selection, row, request_id, deadline, queue, trace)
        return self._engine.infer_tensor(selection, row, request_id, deadline, queue, trace)

    def finished(self, selection: ModelPool | None, report: RequestReport, total_s: float) -> None:
        if selection is not None:
            selection.leave()
            self._in_flight.dec()
        self._metrics.record_request(report.model, report.version, report.api, report.outcome, total_s,
                                     report.phases, report.rejection, report.trace)
