"""What a front process and the server process say to each other, and nothing else.

With `server.front_processes` > 1 the HTTP is served by that many front processes on one port
(SO_REUSEPORT); each reads a request's body and keeps its rows (encoded images, or tensor rows),
and the server process runs each row through its `InferenceEngine` (`manager.py`). Per row, on
the front's pipe pair:

    front  -> server   Infer         choose the version (or run on the one named), take a slot
    server -> front    Fill          write the row you hold into this slot (Setup the first time
                                     a ring is named to this front, as for a preprocessing
                                     process: `preprocessing/messages.py`)
    front  -> server   Filled / FillFailed   the slot's input is written, or nothing more will be
    server -> front    Answer / Refused      the output row, or the error (`errors.to_wire`)
    front  -> server   Completed     the request's status and phases, for the metrics (once per request)

`Choose` / `Chosen` ask which version serves a request before its rows run (V2 checks the
request's tensors against it). `Abandon` (the client went away) may come at any point after
`Infer`; a `Fill` is always answered (it is what tells the server process that the writing is
over: ring rule 4), even for a request the front has given up. The slot stays the server
process's (ring rule 6): a front process only writes a slot's input while a `Fill` of it is
unanswered. Every STATS_INTERVAL_S a front sends `FrontStats` (its connections and dropped spans).
"""

from __future__ import annotations

import msgspec

from cronnx.config import TracingConfig
from cronnx.engine.client import NO_QUEUE_PARAMETERS, ModelView, QueueParameters
from cronnx.errors import WireError
from cronnx.http.context import HttpSettings
from cronnx.observability.logs import LoggingSpec
from cronnx.observability.trace_context import TraceContext
from cronnx.preprocessing.messages import Fill, Filled, FillFailed, Forget


class FrontSpec(msgspec.Struct, frozen=True):
    """What a front process is started with, and all it is given of the config: `http`, the
    settings it serves with; `max_image_pixels`, the decoder's limit; `port` the resolved port
    (never 0: every front binds the same one), `grpc_port` gRPC's (None: not served);
    `server_socket` the Unix socket where the server
    process answers every route a front does not serve itself; `preprocess_threads` this front's
    decoding threads; `max_connections` this front's share of server.max_connections; `tracing`
    server.tracing (the front exports its requests' spans itself)."""

    index: int
    http: HttpSettings
    max_image_pixels: int
    port: int
    grpc_port: int | None
    server_socket: str
    preprocess_threads: int
    max_connections: int
    logging: LoggingSpec
    tracing: TracingConfig


class Infer(msgspec.Struct, tag="infer", array_like=True):
    """Run request `request` (the front's number for it) on `model` (`version` None: the route
    chooses, by `routing_key` when traffic is split). `timeout_s`: what is left of its request
    timeout; `request_id` goes into the worker's logs; `held_bytes` is what the front holds for it
    (the image, or the tensor row), counted against server.max_queue_bytes while it waits for a
    slot; `queue` what it asks of the admission queue; `trace` the request's span when the front
    traces it (its batch's span links to it)."""

    request: int
    request_id: str
    model: str
    version: int | None
    routing_key: str | None
    timeout_s: float
    held_bytes: int
    queue: QueueParameters = NO_QUEUE_PARAMETERS
    trace: TraceContext | None = None


class Abandon(msgspec.Struct, tag="abandon", array_like=True):
    """The front gave up on `request` (its client went away): nothing will read its answer."""

    request: int


class Completed(msgspec.Struct, tag="completed", array_like=True):
    """A request answered by a front: for `cronnx_requests_total` and the latency histograms.
    `outcome` is "success" or the status code; seconds throughout. `model` and `version` label
    the version chosen for it, or engine.client.UNKNOWN_MODEL and "" when none was; `rejection`
    the admission queue's reason for refusing it ("queue_full", "timeout", or ""); `trace` its
    span when the front traced it (the latency histogram's exemplar)."""

    api: str
    model: str
    version: str
    outcome: str
    total_s: float
    phases: dict[str, float]
    rejection: str
    trace: TraceContext | None = None


class FrontStats(msgspec.Struct, tag="stats", array_like=True):
    """The front's open connections now, and since its last report (sent every STATS_INTERVAL_S)
    how many connections it has refused (server.max_connections) and closed for their send
    timeout (server.send_timeout_s), and how many trace spans it has dropped, by reason
    (observability/tracing.SpanDrops)."""

    open: int
    refused: int
    send_timeouts: int
    spans_dropped: dict[str, int] = {}


class Listening(msgspec.Struct, tag="listening", array_like=True):
    """The front accepts connections on the port (sent once, after its start)."""


class Drain(msgspec.Struct, tag="drain", array_like=True):
    """Stop accepting connections, finish the requests in progress, and exit."""


class Choose(msgspec.Struct, tag="choose", array_like=True):
    """Which version would serve `model` (as Infer chooses it): the Open Inference Protocol checks
    a request's tensors against the version, and runs all its rows on it."""

    request: int
    model: str
    version: int | None
    routing_key: str | None


class Chosen(msgspec.Struct, tag="chosen", array_like=True):
    """The answer to Choose: the version's view key (and the view, the first time)."""

    request: int
    view_key: int
    view: ModelView | None = None


class Answer(msgspec.Struct, tag="answer", array_like=True):
    """Request `request` ran: `output` is its output row's bytes (dtype `dtype`, shape `shape`),
    `batch_size` the batch it ran in, seconds `admission_s`, `queue_s` and `infer_s` and the
    batch's span `batch_trace` as in InferenceResult.
    `view_key` names its version's ModelView; `view` is that view when the front has not been
    sent it yet."""

    request: int
    output: bytes
    dtype: str
    shape: tuple[int, ...]
    batch_size: int
    admission_s: float
    queue_s: float
    infer_s: float
    view_key: int
    view: ModelView | None = None
    batch_trace: TraceContext | None = None


class Refused(msgspec.Struct, tag="refused", array_like=True):
    """Request `request` failed: `error` is its wire form (the front raises the same,
    `errors.from_wire`). `view_key` names the version chosen for it (None when none was), for
    its metrics and log line; `view` is that version's view when the front has not been sent it
    yet."""

    request: int
    error: WireError
    view_key: int | None = None
    view: ModelView | None = None


FromFront = Infer | Choose | Filled | FillFailed | Abandon | Completed | FrontStats | Listening
ToFront = Fill | Forget | Answer | Chosen | Refused | Drain

encode = msgspec.msgpack.Encoder().encode
decode_from_front = msgspec.msgpack.Decoder(FromFront).decode
decode_to_front = msgspec.msgpack.Decoder(ToFront).decode
