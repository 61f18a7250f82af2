"""Time Cronnx's own preprocessing (decode, resize, crop, normalise: one thread) of the bench photos
in an image, to compare its PIL build with another's. README "Container images" has the command:

    docker run --rm -i --network none -v "$PWD/bench/photos:/photos:ro" -v "$PWD/models:/models:ro" \\
        --entrypoint python cronnx:cpu - < docker/preprocess_speed.py

It prints the PIL build and, for the web-size photos and the 1600 px ones, the mean over the photos
of each photo's median time: the whole preprocessing, and its resize alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from cronnx.config import PreprocessConfig
from cronnx.models.spec import inspect_model
from cronnx.preprocessing.transform import Preprocessor, pil_build

PHOTOS = Path("/photos")
MODEL = "/models/mobilenetv2-demo.onnx"
WARMUP, RUNS = 5, 40


def median_ms(step: Callable[[], object]) -> float:
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    spec = inspect_model(MODEL)
    preprocess = Preprocessor(PreprocessConfig(), spec)
    out = np.empty((3, spec.height, spec.width), np.float32)
    groups = {"web-size": sorted(p for p in PHOTOS.glob("*.jpg") if not p.stem.endswith("-1600")),
              "1600 px": sorted(PHOTOS.glob("*-1600.jpg"))}
    results = []
    for group, paths in groups.items():
        whole, resize = [], []
        for data in (path.read_bytes() for path in paths):
            whole.append(median_ms(partial(preprocess, data, out)))
            decoded = preprocess.load_rgb(data)  # decoded as Cronnx does: JPEG draft mode included
            resize.append(median_ms(partial(preprocess.resize, decoded)))
        results.append(f"{group} ({len(paths)} photos) {statistics.mean(whole):.2f} ms "
                       f"(resize {statistics.mean(resize):.2f} ms)")
    print(f"{pil_build()}: " + ", ".join(results))


if __name__ == "__main__":
    main()
