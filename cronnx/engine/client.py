"""What a protocol handler asks of the engine, wherever the handler runs: `InferenceClient`.

A handler chooses a model version (`select`), reads its view (`ModelView`), runs rows on it
(`infer`) and reports the request when it has answered (`finished`); it never sees a pool, a
ring, a registry or the metrics. In the server process the engine answers directly
(`engine.local.LocalClient`); in a front process the link to the server process answers over
its pipes (`fronts.link.EngineLink`). Either way the same errors come back (`errors.py`).

A front process loads this module: it imports only msgspec, numpy, the errors and the model spec.
"""

from __future__ import annotations

from typing import Protocol

import msgspec
import numpy as np

from cronnx.models.spec import ModelSpec
from cronnx.observability.trace_context import TraceContext

# Requests for a model that does not exist share one label value: a client must not be able
# to create a time series per name it makes up.
UNKNOWN_MODEL = "_unknown"


class ModelView(msgspec.Struct, frozen=True):
    """What a handler reads of a model version to check a request and answer it: its name and
    version, the default number of predictions (`top_k`), whether its output is already
    probabilities (else logits), a label per class, its tensors (`spec`), and the most rows one
    request may hold (`batch_size`). Crosses the pipe to a front process once per version."""

    name: str
    version: int
    top_k: int
    outputs_probabilities: bool
    labels: list[str]
    spec: ModelSpec
    batch_size: int


class InferenceResult(msgspec.Struct):
    """One row's answer: `output` is a copy of the model's output row for it (shape
    `spec.output_item_shape`, dtype `spec.output_dtype`, scores as the model gives them);
    `batch_size` the number of rows in the batch it ran in. Seconds: `admission_s` waiting for a
    ring slot (the version's admission queue; 0 when one was free), `preprocess_s` writing the
    row into its slot (decoding an image, including any wait for a thread; or copying a tensor
    row), `queue_s` from the hand-over to the batch's start, `infer_s` the batch's run.
    `batch_trace`: the batch's span when the request was traced (observability/tracing.py)."""

    output: np.ndarray
    batch_size: int
    admission_s: float
    preprocess_s: float
    queue_s: float
    infer_s: float
    batch_trace: TraceContext | None = None


class QueueParameters(msgspec.Struct, frozen=True, array_like=True):
    """What a request asks of its model version's admission queue (Triton's request parameters):
    `priority`, a level (1 is served first; None or 0: the model's default_priority_level), and
    `timeout_s`, how long it may wait for a ring slot in seconds (None: the model's
    default_timeout_ms). Checked against the version's policy by the engine (400 when outside it)."""

    priority: int | None = None
    timeout_s: float | None = None


NO_QUEUE_PARAMETERS = QueueParameters()


class Selection(Protocol):
    """One request's choice of a model version, held from `select` until `finished`. `view` is
    the version's view once chosen: at once in the server process, with the first row's answer
    (or `InferenceClient.view`) in a front process."""

    @property
    def view(self) -> ModelView | None: ...


class RequestReport(Protocol):
    """What `finished` reads of an answered request (`protocol.record.RequestRecord`): the API it came
    by ("predict", "v2", "grpc"), the version's labels (UNKNOWN_MODEL and "" when none was chosen), its
    outcome ("success" or the status code), its phases in seconds, the admission queue's reason
    for refusing it ("queue_full", "timeout"; "" when it did not), and its span when it is traced
    (an exemplar of the latency histogram)."""

    api: str
    model: str
    version: str
    phases: dict[str, float]
    rejection: str
    trace: TraceContext | None

    @property
    def outcome(self) -> str: ...


class InferenceClient(Protocol):
    """The engine as a protocol handler sees it (module docstring)."""

    def select(self, model: str, version: int | None, routing_key: str | None) -> Selection:
        """Begin a request for `model`: `version` None chooses by the model's traffic split, the
        same `routing_key` always getting the same version. The choice holds for the request
        even if a reload replaces the version meanwhile. Raises ModelNotFound or ModelNotReady,
        here or (a front process chooses with the first row, saving a round trip) from the
        first `view` or `infer`."""
        ...

    async def view(self, selection: Selection) -> ModelView:
        """The chosen version's view. Raises as `select` does; in a front process also
        Unavailable when the server process has gone, and CancelledError when the caller gives up."""
        ...

    async def infer(self, selection: Selection, row: bytes | np.ndarray, request_id: str, deadline: float,
                    queue: QueueParameters = NO_QUEUE_PARAMETERS, trace: TraceContext | None = None) -> InferenceResult:
        """Run one row on the chosen version: an encoded image (bytes; decoded and preprocessed
        as the version says), or one row of its input tensor (shape `spec.input_item_shape`,
        dtype `spec.input_dtype`: the caller checks both). `deadline` is on the event loop's
        clock; `request_id` goes into the worker's log; `queue` is what it asks of the admission
        queue; `trace` the request's span when it is traced (its batch's span links to it).
        Raises ShuttingDown, NoLiveWorker or QueueFull at once (backpressure), InvalidRequest (a
        priority or queue timeout the version does not allow), QueueTimeout (504), InvalidImage or
        ImageTooLarge, WorkerLost, InferenceFailed, DeadlineExceeded, the errors of `select`;
        CancelledError when the caller gives up."""
        ...

    def finished(self, selection: Selection | None, report: RequestReport, total_s: float) -> None:
        """The request has answered (`selection` None: refused before a version was chosen):
        counted in the metrics with its time `total_s` (seconds), the version let go."""
        ...
