"""Messages between the front and a worker: small msgpack records over a pipe.

Every message is far below PIPE_BUF (4096 bytes), and multiprocessing's Connection writes a
message that small with a single write, so a message is never interleaved or split.
"""

from __future__ import annotations

import msgspec


class Submit(msgspec.Struct, tag="submit", array_like=True):
    """The input of `slot` is written; `enqueued` (time.monotonic, shared by all processes
    on the machine) starts the batch window. `filling` counts the other slots of this ring
    being preprocessed right now: when it is 0 no request is on its way, and waiting for one
    would only add latency. `alone`: no other request of the model is in flight anywhere."""

    slot: int
    enqueued: float
    filling: int
    alone: bool
    request_id: str


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    """The client gave up: drop `slot` if it has not run yet."""

    slot: int


class Stop(msgspec.Struct, tag="stop", array_like=True):
    """Finish nothing more; exit."""


class Ready(msgspec.Struct, tag="ready", array_like=True):
    pid: int
    providers: list[str]


class Done(msgspec.Struct, tag="done", array_like=True):
    """The outputs of `slots` are written. Times in seconds."""

    slots: list[int]
    queue_s: list[float]
    infer_s: float


class Dropped(msgspec.Struct, tag="dropped", array_like=True):
    slot: int


class Failed(msgspec.Struct, tag="failed", array_like=True):
    """onnxruntime raised while running these slots (each alone, after their batch failed):
    their requests fail with `errors` (one message per slot); the worker goes on."""

    slots: list[int]
    errors: list[str]


ToWorker = Submit | Cancel | Stop
FromWorker = Ready | Done | Dropped | Failed

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)

encode = _encoder.encode
decode_to_worker = _to_worker.decode
decode_from_worker = _from_worker.decode
