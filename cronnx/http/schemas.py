"""The JSON that `/predict` reads and writes, as typed msgspec structs."""

from __future__ import annotations

import msgspec

JSON_TYPE = "application/json"


class ImageRequest(msgspec.Struct):
    image: str


class Prediction(msgspec.Struct):
    class_id: int
    label: str
    confidence: float


class Timings(msgspec.Struct):
    """/predict's `timings_ms`: the request's phases in milliseconds (README, "POST /predict")."""

    total: float
    read: float
    admission: float
    preprocess: float
    queue: float
    inference: float


class PredictResponse(msgspec.Struct):
    model: str
    version: int
    predictions: list[Prediction]
    batch_size: int
    timings_ms: Timings
