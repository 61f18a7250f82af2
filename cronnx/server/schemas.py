"""The JSON of the server process's own routes (`/ready`, `/models`, admin), as typed msgspec structs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from cronnx.engine.admission import AdmissionQueue
    from cronnx.engine.pool import ModelPool


class Health(msgspec.Struct, omit_defaults=True):
    """`/ready` and `/health`: the status, live workers per serving model, and the reason of each
    model version that failed to load ("name vN": reason)."""

    status: str
    models: dict[str, int] = {}
    failed: dict[str, str] = {}


class PreprocessingStatus(msgspec.Struct):
    """`/models`' `preprocessing`: where images are decoded ("threads" of the server process,
    "processes", or "front processes", in their threads), how many (processes, or threads in
    all), how many processes were replaced, and their pids (none for threads)."""

    placement: str
    count: int
    restarts: int
    pids: list[int]


class FrontProcessesStatus(msgspec.Struct):
    """`/models`' `front_processes`: how many processes serve HTTP (1: the server process itself,
    no pids listed), how many were replaced, and the live ones' pids (server.front_processes)."""

    count: int
    restarts: int
    pids: list[int]


class WorkerStatus(msgspec.Struct):
    pid: int | None
    live: bool
    restarts: int
    # Restarts by reason (see cronnx_worker_restarts_total), and how the last process ended.
    restart_reasons: dict[str, int]
    last_exit: str | None
    providers: list[str]
    slots_in_use: int
    items_run: int
    items_dropped: int
    items_failed: int
    # Batches run by this worker, by the batch dimension they ran with (their bucket).
    bucket_runs: dict[int, int]


class QueueStatus(msgspec.Struct):
    """A version's admission queue: its policy (the model's max_queue_size, 0: no bound;
    priority_levels and the default level, 0 with no levels; default_timeout_ms, None: the
    request timeout; allow_timeout_override), the requests waiting for a ring slot now and the
    bytes they hold (bodies or tensor rows, counted against server.max_queue_bytes)."""

    max_queue_size: int
    priority_levels: int
    default_priority_level: int
    default_timeout_ms: float | None
    allow_timeout_override: bool
    waiting: int
    waiting_bytes: int


class ModelStatus(msgspec.Struct, omit_defaults=True):
    """One version of a model: loading, ready, draining, or failed with the reason."""

    name: str
    version: int
    state: str
    reason: str | None = None
    traffic_weight: float | None = None
    input: str | None = None
    input_shape: list[int | str] | None = None
    input_layout: str | None = None
    input_dtype: str | None = None
    output: str | None = None
    output_shape: list[int | str] | None = None
    outputs_probabilities: bool | None = None
    num_classes: int | None = None
    batch_size: int | None = None
    batch_buckets: list[int] | None = None
    ring_slots: int | None = None
    queue: QueueStatus | None = None
    description: str | None = None
    workers: list[WorkerStatus] | None = None


def failed_status(name: str, version: int, reason: str) -> ModelStatus:
    return ModelStatus(name=name, version=version, state="failed", reason=reason)


def pending_status(name: str, version: int) -> ModelStatus:
    """A configured version whose load has not begun (its file is still being built): nothing
    about it is known yet but its name and version."""
    return ModelStatus(name=name, version=version, state="loading")


def model_status(pool: ModelPool, traffic_weight: float | None) -> ModelStatus:
    spec = pool.spec
    workers = [WorkerStatus(w.pid, w.live, w.restarts.total(), dict(w.restarts), w.last_exit, w.providers,
                            w.ring.in_use, *w.items, dict(w.bucket_runs)) for w in pool.workers]
    return ModelStatus(
        name=pool.name, version=pool.version, state=pool.state, traffic_weight=traffic_weight,
        input=spec.input_name, input_shape=[spec.fixed_batch or "batch", *spec.input_item_shape],
        input_layout=spec.layout, input_dtype=spec.input_dtype, output=spec.output_name,
        output_shape=[spec.fixed_batch or "batch", *spec.output_item_shape],
        outputs_probabilities=pool.outputs_probabilities, num_classes=spec.num_classes, batch_size=pool.batch_size,
        batch_buckets=pool.batch_buckets, ring_slots=pool.config.ring_slots, queue=_queue_status(pool.admission),
        description=spec.description, workers=workers)


def _queue_status(queue: AdmissionQueue) -> QueueStatus:
    timeout_ms = None if queue.default_timeout_s is None else queue.default_timeout_s * 1000.0
    return QueueStatus(queue.max_queue_size, queue.priority_levels, queue.default_priority_level, timeout_ms,
                       queue.allow_timeout_override, queue.depth, queue.held_bytes)
