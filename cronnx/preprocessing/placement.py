"""Where images are decoded into ring slots: threads of the front, or preprocessing processes.

Both give the engine the same thing: `submit(preprocessor, ring, slot, image) -> FillJob`. A
`FillJob.done` future resolves only once nothing writes the slot any more (ring rule 4): with
None (the input is complete), with the fill's error, or cancelled when `withdraw()` took the job
back before any writing began. The engine alone releases the slot (ring rule 6).

Threads share the front's GIL: Pillow's decode and resize and numpy's arithmetic release it, the
rest of each fill does not, and neither does the event loop. Processes decode outside it, at the
price of one pipe round trip per image and the encoded bytes copied once through the pipe.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Protocol

from cronnx.errors import PreprocessingLost
from cronnx.ipc.cpu import mark_cpu_bound, usable_cores
from cronnx.ipc.pipes import PipeReader, enlarge_pipe
from cronnx.ipc.restarts import Replacements
from cronnx.ipc.ring import SlotRing
from cronnx.preprocessing.child import run_preprocess_process
from cronnx.preprocessing.messages import (
    Fill,
    Filled,
    Forget,
    Stop,
    decode_from_preprocess,
    encode,
    fill_error,
)
from cronnx.preprocessing.rings import MappedRings
from cronnx.preprocessing.transform import Preprocessor

log = logging.getLogger("cronnx.preprocessing")

_spawn = multiprocessing.get_context("spawn")
# A process that dies this soon after its start without filling anything failed to start: it is
# restarted after a growing pause (process.Replacements).
YOUNG_DEATH_S = 1.0
# How often processes are told to unmap the rings of versions that have gone.
FORGET_INTERVAL_S = 1.0


def start(processes: int | None, threads: int, any_on_cuda: bool, max_image_pixels: int,
          fill_timeout_s: float) -> Preprocessing:
    """The preprocessing the config asks for (server.preprocess_processes, preprocess_threads), on
    the running event loop. `processes` None: one process per usable core when a model runs on
    CUDA, threads otherwise. Measured on 2 cores (bench/README.md, "Preprocessing processes"):
    processes served 1.08x threads when decoding is all the CPU does (a near-free model, as when
    a GPU infers), threads 1.02x processes when onnxruntime shares the cores (the demo MobileNetV2
    on the CPU); on 16 cores processes decoded 1.42x what threads did (issue 10)."""
    if processes is None:
        processes = usable_cores() if any_on_cuda else 0
    if processes:
        return ProcessPreprocessing(processes, max_image_pixels, fill_timeout_s)
    return ThreadPreprocessing(threads)


@dataclass(eq=False)
class FillJob:
    """One slot being filled. `done` resolves once nothing writes the slot any more (never
    cancel it directly: call `withdraw`, which takes the job back only if it has not started)."""

    done: asyncio.Future
    withdraw: Callable[[], None]


class Preprocessing(Protocol):
    placement: str  # "threads" or "processes"
    count: int
    restarts: int  # processes replaced after an exit (threads: 0)
    pids: list[int]  # the live processes' (threads: none)

    def submit(self, preprocessor: Preprocessor, ring: SlotRing, slot: int, image: bytes) -> FillJob: ...

    async def close(self) -> None: ...


class ThreadPreprocessing:
    """Fills in a pool of `threads` threads of the front process."""

    placement = "threads"
    restarts = 0  # threads are never replaced

    def __init__(self, threads: int):
        self.count = threads
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="cronnx-preprocess", initializer=mark_cpu_bound)

    def submit(self, preprocessor: Preprocessor, ring: SlotRing, slot: int, image: bytes) -> FillJob:
        work = self._executor.submit(preprocessor, image, ring.inputs[slot])
        # The asyncio future follows the thread's future: cancelled only if `work.cancel()` took
        # it back before a thread picked it up.
        return FillJob(asyncio.wrap_future(work), work.cancel)

    @property
    def pids(self) -> list[int]:
        return []  # threads of the front: no processes of their own

    def __str__(self) -> str:
        return f"{self.count} threads"

    async def close(self) -> None:
        """Wait for every started fill (they write into ring memory), then end the threads."""
        await asyncio.to_thread(self._executor.shutdown, wait=True)


@dataclass(eq=False)
class _Job:
    id: int
    preprocessor: Preprocessor
    ring: SlotRing
    slot: int
    image: bytes
    done: asyncio.Future


@dataclass(eq=False)
class _Process:
    """One preprocessing process and the fill it is doing (at most one at a time)."""

    index: int
    process: multiprocessing.Process
    inbox: Connection
    outbox: Connection
    answers: PipeReader  # reads `outbox`
    started_at: float
    job: _Job | None = None
    # Kills the process if `job` runs past the fill timeout; cancelled when it answers.
    watchdog: asyncio.TimerHandle | None = None
    kill_reason: str | None = None
    fills: int = 0
    rings: MappedRings = field(default_factory=MappedRings)  # what it maps


class ProcessPreprocessing:
    """Fills in `count` preprocessing processes (`preprocess_process.py`), each given one image at
    a time: an image waits in the front's queue, not in a pipe, so a process that dies takes only
    its own image with it (that request gets PreprocessingLost, 503) and is replaced.

    `max_image_pixels` is Pillow's decompression-bomb limit (server.max_image_pixels). A process
    still on one image after `fill_timeout_s` (server.request_timeout_s: its request has been
    answered 504 by then) is killed and replaced. Create it on the running event loop; `close()`
    stops the processes. `restarts` counts replacements.
    """

    placement = "processes"

    def __init__(self, count: int, max_image_pixels: int, fill_timeout_s: float):
        self.count = count
        self._fill_timeout_s = fill_timeout_s
        self._replacements = Replacements(count, "preprocessing process", YOUNG_DEATH_S)
        self._max_image_pixels = max_image_pixels
        self._loop = asyncio.get_running_loop()
        self._queue: deque[_Job] = deque()
        self._ids = itertools.count()
        self._closing = False
        self._processes: list[_Process | None] = [None] * count
        for index in range(count):
            self._start(index)
        self._sweeper = self._loop.call_later(FORGET_INTERVAL_S, self._forget_closed_rings)

    def __str__(self) -> str:
        return f"{self.count} processes"

    @property
    def restarts(self) -> int:
        """Processes replaced after an exit."""
        return self._replacements.restarts

    @property
    def pids(self) -> list[int]:
        """Process ids of the live processes (for tests and `/models`)."""
        return [p.process.pid for p in self._processes if p is not None]

    def submit(self, preprocessor: Preprocessor, ring: SlotRing, slot: int, image: bytes) -> FillJob:
        job = _Job(next(self._ids), preprocessor, ring, slot, image, self._loop.create_future())
        idle = next((p for p in self._processes if p is not None and p.job is None), None)
        if idle is None:
            self._queue.append(job)
        else:
            self._dispatch(idle, job)
        return FillJob(job.done, lambda: self._withdraw(job))

    def _withdraw(self, job: _Job) -> None:
        """Take back a job still in the queue; one a process has started runs to its answer."""
        try:
            self._queue.remove(job)
        except ValueError:
            return
        job.done.cancel()

    def _forget_closed_rings(self) -> None:
        """Tell every process to unmap the rings closed since (a replaced or unloaded version's):
        an unlinked segment's memory, which counts against /dev/shm, is freed only once no process
        maps it. Runs every FORGET_INTERVAL_S; a busy process reads it after its fill."""
        for proc in self._processes:
            if proc is None:
                continue
            for name in proc.rings.closed():
                try:
                    proc.inbox.send_bytes(encode(Forget(name)))
                except OSError:
                    pass  # it died: its mappings went with it
        self._sweeper = self._loop.call_later(FORGET_INTERVAL_S, self._forget_closed_rings)

    def _dispatch(self, proc: _Process, job: _Job) -> None:
        proc.job = job
        proc.watchdog = self._loop.call_later(self._fill_timeout_s, self._overdue, proc, job)
        try:
            setup = proc.rings.setup_for(job.ring, job.preprocessor)
            proc.inbox.send_bytes(encode(Fill(job.id, job.ring.layout.input_segment, job.slot, setup)))
            # The process is idle, reading: an image above the pipe's 1 MiB blocks the event loop
            # only while it drains the rest.
            proc.inbox.send_bytes(job.image)
        except OSError:
            pass  # it died: its exit, handled next, answers for this job
        job.image = b""  # sent: the front's copy is not needed any more

    def _overdue(self, proc: _Process, job: _Job) -> None:
        """The fill has run past the request timeout: its request has had its 504, and the process
        is stuck (a decoder that never returns). Kill it; it is replaced like any that exits."""
        if proc.job is job and proc.process.exitcode is None:
            proc.kill_reason = f"killed after {self._fill_timeout_s:g} s on one image (server.request_timeout_s)"
            log.warning("preprocessing process %d (pid %d) %s", proc.index, proc.process.pid, proc.kill_reason)
            proc.process.kill()

    def _start(self, index: int) -> None:
        inbox_read, inbox_write = _spawn.Pipe(duplex=False)
        outbox_read, outbox_write = _spawn.Pipe(duplex=False)
        enlarge_pipe(inbox_write.fileno())
        process = _spawn.Process(target=run_preprocess_process, args=(self._max_image_pixels, inbox_read, outbox_write),
                                 name=f"cronnx-preprocess-{index}", daemon=True)
        process.start()
        inbox_read.close()
        outbox_write.close()
        proc = _Process(index, process, inbox_write, outbox_read, PipeReader(outbox_read), time.monotonic())
        self._processes[index] = proc
        self._loop.add_reader(outbox_read.fileno(), self._on_readable, proc)
        self._loop.add_reader(process.sentinel, self._on_exit, proc)
        log.debug("preprocessing process %d started (pid %d)", index, process.pid)
        # Work that queued while no process was free (or alive) starts here.
        if self._queue:
            self._dispatch(proc, self._queue.popleft())

    def _on_readable(self, proc: _Process) -> None:
        for message in proc.answers.read():
            self._answer(proc, decode_from_preprocess(message))
        if proc.answers.at_eof:
            self._loop.remove_reader(proc.outbox.fileno())

    def _answer(self, proc: _Process, message) -> None:
        job, proc.job = proc.job, None
        proc.watchdog.cancel()
        proc.fills += 1
        if not job.done.done():
            if type(message) is Filled:
                job.done.set_result(None)
            else:
                job.done.set_exception(fill_error(message))
        if self._queue and not self._closing:
            self._dispatch(proc, self._queue.popleft())

    def _on_exit(self, proc: _Process) -> None:
        self._loop.remove_reader(proc.process.sentinel)
        self._on_readable(proc)  # answers sent before it died still count
        self._loop.remove_reader(proc.outbox.fileno())
        proc.process.join()
        proc.inbox.close()
        proc.outbox.close()
        self._processes[proc.index] = None
        if proc.job is not None:
            proc.watchdog.cancel()
            how = proc.kill_reason or f"exited (code {proc.process.exitcode})"
            proc.job.done.set_exception(PreprocessingLost(
                f"the preprocessing process {how} while decoding this image"))
            proc.job = None
        if self._closing:
            return
        self._replacements.schedule(proc.index, proc.process, proc.started_at, proc.fills > 0, self._restart)

    def _restart(self, index: int) -> None:
        if not self._closing and self._processes[index] is None:
            self._start(index)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Let started fills finish (they write into ring memory), stop every process (killing one
        that has not exited within `timeout_s`), and fail what is still queued."""
        self._closing = True
        self._sweeper.cancel()
        while self._queue:
            self._queue.popleft().done.cancel()
        deadline = time.monotonic() + timeout_s
        while any(p is not None and p.job is not None for p in self._processes) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for proc in self._processes:
            if proc is not None:
                try:
                    proc.inbox.send_bytes(encode(Stop()))
                except OSError:
                    pass
        while any(p is not None for p in self._processes):
            if time.monotonic() > deadline:
                for proc in self._processes:
                    if proc is not None:
                        proc.process.kill()
                deadline = float("inf")
            await asyncio.sleep(0.01)
