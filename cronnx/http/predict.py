"""`POST /predict/{model}[/versions/{version}]`: one image in (raw, or base64 in JSON), the top
classes out with their labels and probabilities."""

from __future__ import annotations

import time

from aiohttp import web

from cronnx.engine.client import (NO_QUEUE_PARAMETERS, InferenceClient, InferenceResult, ModelView, QueueParameters,
                                  Selection)
from cronnx.errors import InvalidRequest
from cronnx.http.body import read_image, request_deadline
from cronnx.http.context import SETTINGS
from cronnx.http.middleware import json_response
from cronnx.http.model_request import model_request
from cronnx.protocol.record import RequestRecord
from cronnx.http.schemas import Prediction, PredictResponse, Timings
from cronnx.models.postprocess import top_k


async def predict(request: web.Request) -> web.Response:
    return await model_request(request, "predict", _predict)


async def _predict(request: web.Request, client: InferenceClient, selection: Selection, record: RequestRecord,
                   started: float) -> web.Response:
    settings = request.app[SETTINGS]
    k = top_k_param(request)
    queue = queue_parameters(request)
    deadline = request_deadline(settings, started)
    image = await read_image(request, settings, deadline)
    read_s = time.perf_counter() - started
    result = await client.infer(selection, image, record.request_id, deadline, queue, record.trace)
    return predict_response(record, selection.view, k, result, started, read_s)


def predict_response(record: RequestRecord, view: ModelView, k: int | None, result: InferenceResult,
                     started: float, read_s: float) -> web.Response:
    """/predict's answer for `result` (one image's output on the version `view`): the top `k`
    classes (None: the version's default) with their labels and probabilities, the batch it ran
    in and its phases. `started` is the request's arrival (perf_counter), `read_s` the body's read
    in seconds. Fills in `record`'s batch size, phases and batch span. Raises NonFiniteOutput."""
    respond_started = time.perf_counter()
    labels = view.labels
    predictions = [Prediction(i, labels[i], p)
                   for i, p in top_k(result.output, k or view.top_k, view.outputs_probabilities)]
    timings = Timings(total=(respond_started - started) * 1000.0, read=read_s * 1000.0,
                      admission=result.admission_s * 1000.0, preprocess=result.preprocess_s * 1000.0,
                      queue=result.queue_s * 1000.0, inference=result.infer_s * 1000.0)
    response = json_response(PredictResponse(model=view.name, version=view.version, predictions=predictions,
                                             batch_size=result.batch_size, timings_ms=timings))
    record.batch_size = result.batch_size
    if result.batch_trace is not None:
        record.batches = [result.batch_trace]
    record.phases = {"read": read_s, "admission": result.admission_s, "preprocess": result.preprocess_s,
                     "queue": result.queue_s, "inference": result.infer_s,
                     "respond": time.perf_counter() - respond_started}
    return response


def top_k_param(request: web.Request) -> int | None:
    """The `top_k` query parameter, None when absent; InvalidRequest unless a positive integer."""
    raw = request.query.get("top_k")
    if raw is None:
        return None
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if k < 1:
        raise InvalidRequest(f"top_k must be a positive integer, got {raw!r}")
    return k


def queue_parameters(request: web.Request) -> QueueParameters:
    """The `priority` (a level: 1 is served first, 0 the model's default) and `timeout_ms` (how
    long the request may wait for a ring slot, in milliseconds) query parameters; InvalidRequest
    unless a non-negative integer and a positive number. The model's policy checks them next."""
    priority = request.query.get("priority")
    timeout_ms = request.query.get("timeout_ms")
    if priority is None and timeout_ms is None:
        return NO_QUEUE_PARAMETERS
    level = None
    if priority is not None:
        if not priority.isdigit() or len(priority) > 3:
            raise InvalidRequest(f"priority must be a priority level, 0 to 100, got {priority!r}")
        level = int(priority)
    timeout_s = None
    if timeout_ms is not None:
        try:
            timeout_s = float(timeout_ms) / 1000.0
        except ValueError:
            timeout_s = 0.0
        if not 0 < timeout_s < float("inf"):
            raise InvalidRequest(f"timeout_ms must be a positive number of milliseconds, got {timeout_ms!r}")
    return QueueParameters(level, timeout_s)
