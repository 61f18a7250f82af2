"""The workers of one model version, kept alive: started, watched, replaced.

Each `Worker` is the server process's record of one worker slot of the pool: its ring (memory
the server process owns, which outlives any worker process), its current process, the request
channel to it, and its health.
The `Supervisor` starts them, restarts one that exits (at once if it had been serving, with
exponential backoff if it died while loading), and watches the live ones (liveness): each gets
a Ping every `ping_interval_s` once it has answered the last one, on a pipe of its own that a
thread of the worker answers at once, even mid-batch. A worker

- that has not answered a ping for `ping_timeout_s` is killed ("ping_timeout"): the process is
  frozen, or holds the GIL forever;
- whose pong says its batch loop has been busy on one step (a batch) for more than
  `batch_run_timeout_s` is killed too ("batch_timeout"): stuck in onnxruntime, a driver call or
  a deadlock.

No message per batch is needed: the loop's progress travels with the pongs.

Either way its requests get 503 with the reason (`WorkerLost`), and the restart is counted by
reason: "exited", "session_broken", "load_failed", "ping_timeout", "batch_timeout".
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable

import msgspec

from cronnx.ipc.child import ChildProcess
from cronnx.ipc.restarts import restart_delay
from cronnx.ipc.ring import SlotRing
from cronnx.observability.trace_context import TraceContext
from cronnx.workers import messages
from cronnx.workers.channel import RequestChannel
from cronnx.workers.process import PINGS, WorkerTarget, start_worker

log = logging.getLogger("cronnx.supervisor")

# Called with each batch a worker ran: (the worker, its Done, the spans of the traced requests in it).
BatchObserver = Callable[["Worker", messages.Done, list[TraceContext]], None]


class Liveness(msgspec.Struct, frozen=True):
    """When a live worker counts as hung, in seconds: server.worker_ping_interval_s,
    server.worker_ping_timeout_s and server.batch_run_timeout_s (their defaults are the config's)."""

    ping_interval_s: float
    ping_timeout_s: float
    batch_run_timeout_s: float


class Worker:
    """One worker of a pool: ring, process, request channel, health and counts."""

    def __init__(self, spec: messages.WorkerSpec, ring: SlotRing):
        self.spec = spec
        self.ring = ring
        self.name = f"{spec.model}:v{spec.version}#{spec.index}"
        self.process: ChildProcess | None = None
        self.channel: RequestChannel | None = None
        # The current process said Ready: loaded and warmed up.
        self.ready = False
        # Takes submits: Ready came and it has not exited nor been killed since.
        self.live = False
        # Why the supervisor killed the current process, as a restart reason ("ping_timeout"), or None.
        self.kill_cause: str | None = None
        self.providers: list[str] = []
        # Seconds the last start took until the worker was ready (session created, warmed up).
        self.load_seconds = 0.0
        self.restarts: Counter[str] = Counter()
        self.failed_starts = 0
        # How the last process ended: "died with exit code 1", "was killed: <why>", "failed to load: <why>".
        self.last_exit: str | None = None
        # What the current process said when it could not load (LoadFailed).
        self.load_error: str | None = None
        # Batches run, by the batch dimension they ran with (their bucket).
        self.bucket_runs: Counter[int] = Counter()
        # Liveness: the ping awaiting its pong (sequence number, time sent).
        self.ping_seq = 0
        self.ping_sent: float | None = None
        # Counts of the processes before the current one (the channel counts the current one's).
        self._past_items = (0, 0, 0)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def items(self) -> tuple[int, int, int]:
        """Requests run, dropped on request, and failed, by every process of this worker."""
        run, dropped, failed = self._past_items
        c = self.channel
        return (run + c.items_run, dropped + c.items_dropped, failed + c.items_failed) if c else self._past_items

    def close_channel(self, reason: str) -> int:
        """The process is gone: every request it held comes back lost with `reason`; its counts
        are kept. Returns how many were lost."""
        channel = self.channel
        self._past_items = self.items
        self.channel = None
        return channel.lose_all(reason)

    def submit(self, slot: int, alone: bool, request_id: str, on_return, priority: int = 0,
               trace: TraceContext | None = None) -> None:
        """Hand a filled slot to the worker (see `RequestChannel.submit`); OSError if it is gone."""
        self.channel.submit(slot, self.ring.filling_count - 1, alone, request_id, on_return, priority, trace)

    def cancel(self, slot: int, on_return) -> None:
        """Ask the worker to drop `slot` if it still holds it for `on_return` (see `RequestChannel.cancel`)."""
        if self.channel is not None:
            self.channel.cancel(slot, on_return)


def _exit_reason(worker: Worker, process: ChildProcess) -> tuple[str, str]:
    """Why a worker process ended: the restart reason (a metric label) and a sentence for people."""
    if worker.kill_cause is not None:
        return worker.kill_cause, process.exit_reason
    if not worker.ready:
        if worker.load_error is not None:
            return "load_failed", f"failed to load: {worker.load_error}"
        return "load_failed", f"died with exit code {process.exitcode} while loading"
    if process.exitcode == messages.EXIT_SESSION_BROKEN:
        return "session_broken", f"died with exit code {process.exitcode}"
    return "exited", f"died with exit code {process.exitcode}"


class Supervisor:
    """Starts, watches and restarts the workers of one model version: `on_batch` gets each batch a
    worker ran, `on_live` is called each time a worker turns live (its ring's free slots can be
    handed out again)."""

    def __init__(self, workers: list[Worker], target: WorkerTarget, liveness: Liveness, on_batch: BatchObserver,
                 on_live: Callable[[], None] = lambda: None):
        self.workers = workers
        self._on_live = on_live
        self._target = target
        self._liveness = liveness
        self._on_batch = on_batch
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._watch: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Spawn every worker (each says Ready once its sessions are warm) and begin the liveness checks."""
        for worker in self.workers:
            self._start(worker)
        self._watch = self._loop.call_later(self._liveness.ping_interval_s, self._check_liveness)

    def _start(self, worker: Worker) -> None:
        process = start_worker(worker.name, self._target, msgspec.msgpack.encode(worker.spec),
                               functools.partial(self._on_message, worker), functools.partial(self._on_exit, worker))
        worker.process = process
        worker.channel = RequestChannel(process.send)
        worker.ready = False
        worker.kill_cause = None
        worker.ping_sent = None
        worker.load_error = None

    def _on_message(self, worker: Worker, msg) -> None:
        kind = type(msg)
        if kind is messages.Done:
            worker.bucket_runs[msg.rows] += 1
            self._on_batch(worker, msg, worker.channel.deliver(msg))
        elif kind is messages.Failed or kind is messages.Dropped:
            worker.channel.deliver(msg)
        elif kind is messages.Pong:
            if msg.seq == worker.ping_seq:
                worker.ping_sent = None
                limit = self._liveness.batch_run_timeout_s
                if msg.busy_s > limit and worker.live:
                    self._kill(worker, "batch_timeout", f"a batch ran longer than {limit:g}s")
        elif kind is messages.LoadFailed:
            worker.load_error = msg.error
            log.error("worker %s could not load: %s", worker.name, msg.error)
        elif kind is messages.Ready:
            worker.ready = worker.live = True
            worker.failed_starts = 0
            worker.load_seconds = time.monotonic() - worker.process.started_at
            worker.providers = msg.providers
            log.info("worker %s ready (pid %d, providers %s)", worker.name, msg.pid, ",".join(msg.providers))
            self._on_live()

    def _on_exit(self, worker: Worker, process: ChildProcess) -> None:
        was_live = worker.ready
        worker.live = False
        cause, how = _exit_reason(worker, process)
        lost = worker.close_channel(f"worker {worker.name} (pid {process.pid}) {how} while running this request; retry")
        if self._stopping:
            return
        worker.restarts[cause] += 1
        worker.last_exit = how
        worker.failed_starts = 0 if was_live else worker.failed_starts + 1
        delay = restart_delay(worker.failed_starts)
        log.error("worker %s (pid %d) %s; %d in-flight requests failed; restarting in %.1fs",
                  worker.name, process.pid, how, lost, delay,
                  extra={"fields": {"worker": worker.name, "worker_pid": process.pid, "reason": cause,
                                    "exit_code": process.exitcode, "lost_requests": lost}})
        self._loop.call_later(delay, self._restart, worker)

    def _restart(self, worker: Worker) -> None:
        if self._stopping:
            return
        try:
            self._start(worker)
        except OSError as exc:  # no descriptor or process left now: try again after a longer pause
            worker.failed_starts += 1
            worker.last_exit = f"could not be started: {exc}"
            delay = restart_delay(worker.failed_starts)
            log.error("worker %s could not be started (%s); trying again in %.1fs", worker.name, exc, delay,
                      extra={"fields": {"worker": worker.name, "reason": "start_failed"}})
            self._loop.call_later(delay, self._restart, worker)

    def _check_liveness(self) -> None:
        liveness = self._liveness
        now = time.monotonic()
        for worker in self.workers:
            if not worker.live:
                continue
            if worker.ping_sent is not None:
                if now - worker.ping_sent > liveness.ping_timeout_s:
                    self._kill(worker, "ping_timeout", f"no answer to a ping for {liveness.ping_timeout_s:g}s")
                continue
            worker.ping_seq += 1
            worker.ping_sent = now
            try:
                worker.process.send(messages.Ping(worker.ping_seq), PINGS)
            except OSError:
                pass  # it died: its exit is being handled
        self._watch = self._loop.call_later(liveness.ping_interval_s, self._check_liveness)

    def _kill(self, worker: Worker, cause: str, reason: str) -> None:
        # No more submits from now on; the exit handler fails what it holds.
        worker.live = False
        log.error("worker %s (pid %d) is unresponsive (%s: %s); killing it", worker.name, worker.pid, cause, reason)
        if worker.process.exitcode is None:
            worker.kill_cause = cause
            worker.process.kill(f"was killed: {cause}: {reason}")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop every worker (the engine has stopped sending); kill any that will not stop."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        for worker in self.workers:
            worker.live = False
            if worker.process is not None:
                await worker.process.stop(messages.Stop(), timeout_s)
