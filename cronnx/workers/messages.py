"""The contract between the server process and a worker process: what a worker is started
with, how it finds its ring, and the messages on its two pipes.

Both sides import this module and nothing of each other: the server process never imports
`workers/child.py` (which loads onnxruntime) and the worker never imports the server process's
modules.

Each pipe has one writer at a time (the worker serialises its batch loop and its liveness
thread), so a message is never interleaved with another. The order of the messages on a pipe
is what orders every hand-over of a ring slot (see `ipc/ring.py`).
"""

from __future__ import annotations

import msgspec

from cronnx.ipc.ring import RingLayout
from cronnx.models.spec import ModelSpec
from cronnx.observability.logs import LoggingSpec
from cronnx.observability.trace_context import TraceContext


class WorkerSpec(msgspec.Struct, frozen=True):
    """What one worker process runs: sent to it msgpack-encoded as its only start-up argument.

    `batch_size` is the effective batch size (a model's fixed batch dimension wins over the
    config); `batch_buckets` the batch sizes its sessions run ([]: one session for any size);
    `batch_timeout_s` the batch window in seconds; `cuda_options` the CUDAExecutionProvider's
    options (device, TF32, ...), used when that provider is in `providers`; `device_buffers` the
    device ("cuda") whose memory holds each session's input and output, bound once, with
    `device_id` (CUDA graphs replay fixed addresses), or None: ring memory is bound at each run;
    `pinned_host_memory`: the ring's segments and the staging buffers are page-locked
    (cuda.pinned_ring_memory, on CUDA only)."""

    model: str
    version: int
    index: int
    # The version's own copy of its bytes (`/proc/<server pid>/fd/<n>`, models/snapshot.py), not
    # the model file, which may hold other bytes by the time a worker is restarted.
    model_path: str
    model_spec: ModelSpec
    ring: RingLayout
    batch_size: int
    batch_buckets: list[int]
    batch_timeout_s: float
    providers: list[str]
    cuda_options: dict[str, str]
    intra_op_threads: int
    inter_op_threads: int
    solo_intra_op_threads: int | None
    allow_spinning: bool
    logging: LoggingSpec
    device_buffers: str | None = None
    device_id: int = 0
    pinned_host_memory: bool = False


# A worker whose session fails even on the warm-up input exits with this; the server process
# replaces it.
EXIT_SESSION_BROKEN = 3


# Server process -> worker.

class Submit(msgspec.Struct, tag="submit", array_like=True):
    """The input of `slot` is written; `enqueued` (time.monotonic, shared by all processes
    on the machine) starts the batch window. `filling` counts the other slots of this ring
    being preprocessed right now: when it is 0 no request is on its way, and waiting for one
    would only add latency. `alone`: no other request of the model is in flight anywhere.
    `priority`: its admission queue level (1 first; 0 with no levels): when more slots wait than
    a batch holds, the batch takes the lowest level first. `traced`: the request is traced, so
    its batch gets a span (whose ids the worker chooses and logs)."""

    slot: int
    enqueued: float
    filling: int
    alone: bool
    request_id: str
    priority: int = 0
    traced: bool = False


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    """The client gave up: drop `slot` if it has not run yet (answered by Dropped, or by the
    Done or Failed of the batch it already ran in)."""

    slot: int


class Ping(msgspec.Struct, tag="ping", array_like=True):
    """Liveness, on the worker's own ping pipe: a thread of the worker answers Pong(seq) at once,
    even while a batch runs (onnxruntime releases the GIL), unless the process is frozen."""

    seq: int


class Stop(msgspec.Struct, tag="stop", array_like=True):
    """Finish nothing more; exit."""


# Worker -> server process.

class Ready(msgspec.Struct, tag="ready", array_like=True):
    """The session is created and warmed up; the worker takes submits from now on."""

    pid: int
    providers: list[str]


class LoadFailed(msgspec.Struct, tag="load_failed", array_like=True):
    """The worker could not create or warm up its sessions: `error` is the exception's text. It
    exits right after."""

    error: str


class Done(msgspec.Struct, tag="done", array_like=True):
    """The outputs of `slots` are written. `queue_s[i]`: seconds slot i waited from its Submit
    to the batch's start; `infer_s`: seconds the batch ran; `rows`: the batch dimension it ran
    with (its bucket: len(slots) plus zero padding); `started`: the batch's start
    (time.monotonic); `trace`: the ids of the batch's span when a request in it is traced (the
    worker's batch log line carries them too)."""

    slots: list[int]
    queue_s: list[float]
    infer_s: float
    rows: int
    started: float = 0.0
    trace: TraceContext | None = None


class Dropped(msgspec.Struct, tag="dropped", array_like=True):
    """A cancelled slot left the batcher without running."""

    slot: int


class Failed(msgspec.Struct, tag="failed", array_like=True):
    """onnxruntime raised while running these slots (each alone, after their batch failed):
    their requests fail with `errors` (one message per slot); the worker goes on."""

    slots: list[int]
    errors: list[str]


class Pong(msgspec.Struct, tag="pong", array_like=True):
    """The answer to Ping(seq). `busy_s`: seconds the worker's batch loop has spent on its current
    step (a batch, or the messages before it); 0 while it waits for work."""

    seq: int
    busy_s: float


ToWorker = Submit | Cancel | Stop
FromWorker = Ready | LoadFailed | Done | Dropped | Failed | Pong

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_ping = msgspec.msgpack.Decoder(Ping)
_from_worker = msgspec.msgpack.Decoder(FromWorker)

encode = _encoder.encode
decode_to_worker = _to_worker.decode
decode_ping = _ping.decode
decode_from_worker = _from_worker.decode
