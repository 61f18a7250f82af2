"""The JSON the HTTP API reads and writes, as typed msgspec structs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from .pool import ModelPool

JSON_TYPE = "application/json"


class ImageRequest(msgspec.Struct):
    image: str


class Prediction(msgspec.Struct):
    class_id: int
    label: str
    confidence: float


class Timings(msgspec.Struct):
    total: float
    read: float
    preprocess: float
    queue: float
    inference: float


class PredictResponse(msgspec.Struct):
    model: str
    version: int
    predictions: list[Prediction]
    batch_size: int
    timings_ms: Timings


class Health(msgspec.Struct):
    status: str
    models: dict[str, int] = {}


class WorkerStatus(msgspec.Struct):
    pid: int | None
    live: bool
    restarts: int
    providers: list[str]
    slots_in_use: int
    items_run: int
    items_dropped: int


class ModelStatus(msgspec.Struct):
    name: str
    version: int
    state: str
    input: str
    input_shape: list[int | str]
    input_layout: str
    input_dtype: str
    output: str
    output_shape: list[int | str]
    outputs_probabilities: bool
    num_classes: int
    batch_size: int
    description: str
    workers: list[WorkerStatus]


def model_status(pool: ModelPool) -> ModelStatus:
    spec = pool.spec
    workers = [WorkerStatus(w.pid, w.live, w.restarts, w.providers, w.ring.slots - w.ring.free_count,
                            w.items_run, w.items_dropped) for w in pool.workers]
    return ModelStatus(
        name=pool.name, version=pool.version, state=pool.state,
        input=spec.input_name, input_shape=[spec.fixed_batch or "batch", *spec.input_item_shape],
        input_layout=spec.layout, input_dtype=spec.input_dtype, output=spec.output_name,
        output_shape=[spec.fixed_batch or "batch", *spec.output_item_shape],
        outputs_probabilities=pool.outputs_probabilities, num_classes=spec.num_classes, batch_size=pool.batch_size,
        description=spec.description, workers=workers)
