"""The front's side of one worker: its process, its pipes, its ring and its in-flight slots.

The handle notices a worker's death the moment its process sentinel becomes readable, fails
that worker's in-flight requests with 503, takes their slots back and starts a replacement
on the same ring (the ring's memory belongs to the front and outlives any worker).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from collections.abc import Callable

import msgspec
import numpy as np

from . import protocol
from .errors import InferenceFailed, Unavailable
from .ring import SlotRing
from .worker import WorkerSpec, worker_main

log = logging.getLogger("cronnx.supervisor")

_spawn = multiprocessing.get_context("spawn")
MAX_RESTART_DELAY_S = 30.0


class Completion(msgspec.Struct):
    """One request's answer from the worker: its output row (a copy) and timings in seconds."""

    output: np.ndarray
    queue_s: float
    infer_s: float
    batch_size: int


# Called with each Done message: the front records batch metrics from it.
BatchObserver = Callable[[protocol.Done], None]


PIPE_BYTES = 1 << 20


def _enlarge_pipe(fd: int) -> None:
    """The front writes submits on its event loop: a full pipe would block it. 64 KiB holds a few
    hundred submits; 1 MiB holds far more than a ring can have slots."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        pass  # not Linux, or above /proc/sys/fs/pipe-max-size: the default size stays


class WorkerHandle:
    def __init__(self, spec: WorkerSpec, ring: SlotRing, on_batch: BatchObserver):
        self.spec = spec
        self.ring = ring
        self._on_batch = on_batch
        # Seconds the last start took until the worker was ready (session created, warmed up).
        self.load_seconds = 0.0
        self._started_at = 0.0
        self.live = False
        self.restarts = 0
        # Items the worker ran, dropped on request, and failed to run, since the front started.
        self.items_run = 0
        self.items_dropped = 0
        self.items_failed = 0
        self.providers: list[str] = []
        self._loop = asyncio.get_running_loop()
        self._in_flight: dict[int, asyncio.Future] = {}
        self._process = None
        self._inbox = self._outbox = None
        self._stopping = False
        self.failed_starts = 0
        self.last_exit_code: int | None = None
        self._exited = asyncio.Event()

    @property
    def name(self) -> str:
        return f"{self.spec.model}:v{self.spec.version}#{self.spec.index}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        inbox_read, inbox_write = _spawn.Pipe(duplex=False)
        outbox_read, outbox_write = _spawn.Pipe(duplex=False)
        _enlarge_pipe(inbox_write.fileno())
        process = _spawn.Process(
            target=worker_main,
            args=(msgspec.msgpack.encode(self.spec), inbox_read, outbox_write),
            name=f"cronnx-worker-{self.name}",
            daemon=True,
        )
        self._started_at = time.monotonic()
        process.start()
        # The child has its own copies; closing ours lets EOF reach each side when the other dies.
        inbox_read.close()
        outbox_write.close()
        self._process, self._inbox, self._outbox = process, inbox_write, outbox_read
        self._exited.clear()
        self._loop.add_reader(outbox_read.fileno(), self._on_readable)
        self._loop.add_reader(process.sentinel, self._on_exit)
        log.info("worker %s starting (pid %d)", self.name, process.pid)

    def submit(self, slot: int, alone: bool, request_id: str) -> asyncio.Future:
        """Hand a filled slot to the worker; the future resolves with its Completion."""
        if not self.live:
            self.ring.release(slot)
            raise Unavailable(f"worker {self.name} is restarting")
        submit = protocol.Submit(slot, time.monotonic(), self.ring.filling_count - 1, alone, request_id)
        try:
            self._inbox.send_bytes(protocol.encode(submit))
        except OSError:  # the worker died and its exit is not handled yet
            self.ring.release(slot)
            raise Unavailable(f"worker {self.name} is restarting") from None
        future = self._loop.create_future()
        self._in_flight[slot] = future
        self.ring.mark_sent(slot)
        return future

    def cancel(self, slot: int) -> None:
        """The request gave up: ask the worker to drop the slot. The slot is freed when the
        worker answers (Dropped, or Done if it had already run), never before."""
        if slot in self._in_flight and self.live:
            try:
                self._inbox.send_bytes(protocol.encode(protocol.Cancel(slot)))
            except OSError:
                pass  # the worker died: its exit handling frees the slot

    def _on_readable(self) -> None:
        outbox = self._outbox
        try:
            while outbox.poll():
                self._handle(protocol.decode_from_worker(outbox.recv_bytes()))
        except (EOFError, OSError):
            self._loop.remove_reader(outbox.fileno())

    def _handle(self, msg) -> None:
        if type(msg) is protocol.Done:
            batch_size = len(msg.slots)
            self.items_run += batch_size
            self._on_batch(msg)
            outputs = self.ring.outputs
            for slot, queue_s in zip(msg.slots, msg.queue_s):
                future = self._in_flight.pop(slot, None)
                if future is not None and not future.done():
                    future.set_result(Completion(outputs[slot].copy(), queue_s, msg.infer_s, batch_size))
                self.ring.release(slot)
        elif type(msg) is protocol.Failed:
            self.items_failed += len(msg.slots)
            for slot, error in zip(msg.slots, msg.errors):
                future = self._in_flight.pop(slot, None)
                if future is not None and not future.done():
                    future.set_exception(InferenceFailed(f"inference failed: {error}"))
                self.ring.release(slot)
        elif type(msg) is protocol.Dropped:
            self.items_dropped += 1
            self._in_flight.pop(slot := msg.slot, None)
            self.ring.release(slot)
        elif type(msg) is protocol.Ready:
            self.live = True
            self.failed_starts = 0
            self.load_seconds = time.monotonic() - self._started_at
            self.providers = msg.providers
            log.info("worker %s ready (pid %d, providers %s)", self.name, msg.pid, ",".join(msg.providers))

    def _on_exit(self) -> None:
        process = self._process
        self._loop.remove_reader(process.sentinel)
        # Answers the worker sent before it died are still valid: deliver them first.
        self._on_readable()
        self._loop.remove_reader(self._outbox.fileno())
        self._outbox.close()
        self._inbox.close()
        process.join()
        was_live = self.live
        self.live = False
        lost = list(self._in_flight.items())
        self._in_flight.clear()
        for slot, future in lost:
            if not future.done():
                future.set_exception(Unavailable(
                    f"worker {self.name} (pid {process.pid}) died with exit code {process.exitcode} "
                    "while running this request; retry"))
            self.ring.release(slot)
        self._exited.set()
        if self._stopping:
            return
        self.restarts += 1
        self.last_exit_code = process.exitcode
        self.failed_starts = 0 if was_live else self.failed_starts + 1
        delay = 0.0 if was_live else min(MAX_RESTART_DELAY_S, 0.5 * 2 ** (self.failed_starts - 1))
        log.error("worker %s (pid %d) exited with code %s; %d in-flight requests failed; restarting in %.1fs",
                  self.name, process.pid, process.exitcode, len(lost), delay)
        self._loop.call_later(delay, self._restart)

    def _restart(self) -> None:
        if not self._stopping:
            self.start()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the worker to exit after the front has stopped sending; kill it if it will not."""
        self._stopping = True
        if self._process is None or self._exited.is_set():
            return
        try:
            self._inbox.send_bytes(protocol.encode(protocol.Stop()))
        except OSError:
            pass
        try:
            await asyncio.wait_for(self._exited.wait(), timeout_s)
        except TimeoutError:
            log.warning("worker %s did not stop in %.1fs; killing it", self.name, timeout_s)
            self._process.kill()
            await self._exited.wait()
