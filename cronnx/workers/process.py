"""One worker process's lifecycle: spawned with its two pipes, read on the event loop, its exit
noticed on its sentinel, stopped politely or killed.

It knows nothing of rings, requests or restarts: every message it reads goes to `on_message`,
and its exit, once the messages it sent before dying are delivered, to `on_exit`.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from collections.abc import Callable

from cronnx.ipc.pipes import PipeReader, enlarge_pipe
from cronnx.workers import messages

log = logging.getLogger("cronnx.process")

_spawn = multiprocessing.get_context("spawn")
# The entry point a worker process runs: (spec_bytes, inbox, outbox) -> None.
WorkerTarget = Callable[..., None]


class WorkerProcess:
    """A spawned worker process (spawn, not fork: onnxruntime's thread pools do not survive fork).

    Three pipes: submits and cancels in, every answer out, and pings in (read by the worker's
    liveness thread). `on_message(msg)` gets each decoded `messages.FromWorker` message in order; `on_exit(process)`
    is called once, after the process has exited and every message it sent has been delivered.
    """

    def __init__(self, name: str, target: WorkerTarget, spec_bytes: bytes,
                 on_message: Callable[[object], None], on_exit: Callable[[WorkerProcess], None]):
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._on_message = on_message
        self._on_exit = on_exit
        self.started_at = time.monotonic()
        # It sent Ready: loaded and warmed up (set by its supervisor).
        self.ready = False
        # Why the front killed it: a short cause ("ping_timeout") and a sentence (None: it exited
        # by itself).
        self.kill_cause: str | None = None
        self.kill_reason: str | None = None
        self.exited = asyncio.Event()
        inbox_read, inbox_write = _spawn.Pipe(duplex=False)
        outbox_read, outbox_write = _spawn.Pipe(duplex=False)
        pings_read, pings_write = _spawn.Pipe(duplex=False)
        enlarge_pipe(inbox_write.fileno())
        self._process = _spawn.Process(target=target, args=(spec_bytes, inbox_read, outbox_write, pings_read),
                                       name=f"cronnx-worker-{name}", daemon=True)
        self._process.start()
        # The child has its own copies; closing ours lets EOF reach each side when the other dies.
        inbox_read.close()
        outbox_write.close()
        pings_read.close()
        self._inbox, self._outbox, self._pings = inbox_write, outbox_read, pings_write
        self._answers = PipeReader(outbox_read)
        self._loop.add_reader(outbox_read.fileno(), self._on_readable)
        self._loop.add_reader(self._process.sentinel, self._on_sentinel)
        log.info("worker %s starting (pid %d)", name, self.pid)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def exitcode(self) -> int | None:
        return self._process.exitcode

    def send(self, message) -> None:
        """Write one `messages.ToWorker` message; OSError when the worker is gone (its exit is
        then being handled, or about to be)."""
        self._inbox.send_bytes(messages.encode(message))

    def ping(self, seq: int) -> None:
        """Send Ping(seq) on the ping pipe (its own, so that it never waits behind submits)."""
        try:
            self._pings.send_bytes(messages.encode(messages.Ping(seq)))
        except OSError:
            pass  # it died: its exit is being handled

    def kill(self, cause: str, reason: str) -> None:
        """SIGKILL, remembering why; `on_exit` follows as for any death."""
        if self.kill_cause is None and not self.exited.is_set():
            self.kill_cause, self.kill_reason = cause, reason
            self._process.kill()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the worker to exit (it finishes nothing more); kill it if it has not within `timeout_s`."""
        if self.exited.is_set():
            return
        try:
            self.send(messages.Stop())
        except OSError:
            pass
        try:
            await asyncio.wait_for(self.exited.wait(), timeout_s)
        except TimeoutError:
            log.warning("worker %s did not stop in %.1fs; killing it", self.name, timeout_s)
            self._process.kill()
            await self.exited.wait()

    def _on_readable(self) -> None:
        for message in self._answers.read():
            self._on_message(messages.decode_from_worker(message))
        if self._answers.at_eof:
            self._loop.remove_reader(self._outbox.fileno())

    def _on_sentinel(self) -> None:
        self._loop.remove_reader(self._process.sentinel)
        # Answers the worker sent before it died are still valid: deliver them first.
        self._on_readable()
        self._loop.remove_reader(self._outbox.fileno())
        self._outbox.close()
        self._inbox.close()
        self._pings.close()
        self._process.join()
        self.exited.set()
        self._on_exit(self)
