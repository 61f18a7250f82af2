"""How a worker process is started: the signature of its entry point, and its `ChildProcess`,
with three pipes: submits and cancels in, every answer out, and pings in (read by the worker's
liveness thread, so that a ping never waits behind submits)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from cronnx.ipc.child import ChildProcess
from cronnx.workers import messages

log = logging.getLogger("cronnx.process")

# The entry point a worker process runs: (spec_bytes, inbox, outbox, pings) -> None.
WorkerTarget = Callable[..., None]
# The ping pipe's number among a worker process's inboxes (`ChildProcess.send(ping, PINGS)`).
PINGS = 1


def start_worker(name: str, target: WorkerTarget, spec_bytes: bytes, on_message: Callable[[object], None],
                 on_exit: Callable[[ChildProcess], None]) -> ChildProcess:
    """Spawn worker `name` running `target(spec_bytes, inbox, outbox, pings)`: `on_message` gets
    each `messages.FromWorker` message, `on_exit` its exit (see `ChildProcess`)."""
    process = ChildProcess(f"cronnx-worker-{name}", f"worker {name}", target, (spec_bytes,), messages.encode,
                           messages.decode_from_worker, on_message, on_exit, log, extra_inboxes=1)
    log.info("worker %s starting (pid %d)", name, process.pid)
    return process
