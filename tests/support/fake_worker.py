"""The real worker process (`cronnx.workers.child`, real onnxruntime session, real ring and pipes) with
faults injected by its input.

The engine tests serve `channel_mean_model` with identity preprocessing, so the first value of
an input row is the red value of the image. Each marker below makes every batch holding such a
row misbehave where onnxruntime would run; any other row runs normally.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

HANG = 1    # never returns (stuck in a driver call, say)
FAIL = 2    # onnxruntime raises
DIE = 3     # the process exits in the middle of the batch
SLOW = 4    # the batch takes SLOW_S
JITTER = 5  # the batch takes a random 0-3 ms
SLOW_S = 0.4
DIE_CODE = 7
# A folder where the worker leaves one file per SLOW or HANG batch it starts: a test knows the
# batch is running (not waiting) without guessing from time.
STARTED_DIR_ENV = "CRONNX_TEST_STARTED_DIR"


def _mark_started() -> None:
    folder = os.environ.get(STARTED_DIR_ENV)
    if folder:
        Path(folder, f"{os.getpid()}-{time.monotonic_ns()}").touch()


def main(spec_bytes: bytes, inbox, outbox, pings) -> None:
    from cronnx.workers import child as worker

    run = worker.BatchRunner._infer

    def infer_with_faults(self, bound, inputs, outputs) -> None:
        markers = set(inputs[:, 0, 0, 0].tolist())
        if HANG in markers or SLOW in markers:
            _mark_started()
        if HANG in markers:
            time.sleep(3600)
        if DIE in markers:
            os._exit(DIE_CODE)
        if FAIL in markers:
            raise RuntimeError("injected failure")
        if SLOW in markers:
            time.sleep(SLOW_S)
        if JITTER in markers:
            time.sleep(random.random() * 0.003)
        run(self, bound, inputs, outputs)

    worker.BatchRunner._infer = infer_with_faults
    worker.worker_main(spec_bytes, inbox, outbox, pings)
