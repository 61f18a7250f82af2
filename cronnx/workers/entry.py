"""The worker process's entry point, importable without onnxruntime: the server process names it
as the target of each worker it spawns, and the import of the worker's own code (and onnxruntime)
happens in the child."""

from __future__ import annotations

from multiprocessing.connection import Connection


def run_worker(spec_bytes: bytes, inbox: Connection, outbox: Connection, pings: Connection) -> None:
    """The worker process's entry point, named here so that the server process can start a worker
    without importing `workers/child.py` (and onnxruntime) itself: the import happens in the
    child. `inbox` carries `ToWorker` messages, `pings` carries Ping, `outbox` every `FromWorker`
    message."""
    from cronnx.workers.child import worker_main

    worker_main(spec_bytes, inbox, outbox, pings)
