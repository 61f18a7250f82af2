"""Where images are decoded into ring slots: threads of the server process, or preprocessing
processes.

Both give the engine the same thing: `submit(preprocessor, ring, slot, image) -> FillJob`. A
`FillJob.done` future resolves only once nothing writes the slot any more (ring rule 4): with
None (the input is complete), with the fill's error, or cancelled when `withdraw()` took the job
back before any writing began. The engine alone releases the slot (ring rule 6).

Threads share the server process's GIL: Pillow's decode and resize and numpy's arithmetic release
it, the rest of each fill does not, and neither does the event loop. Processes decode outside
it, at the price of one pipe round trip per image and the encoded bytes copied once through the
pipe.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cronnx.errors import CronnxError, PreprocessingLost
from cronnx.ipc.child import ChildProcess
from cronnx.ipc.cpu import mark_cpu_bound, usable_cores
from cronnx.ipc.restarts import ChildSet
from cronnx.ipc.ring import SlotRing
from cronnx.observability.logs import LoggingSpec
from cronnx.preprocessing.child import run_preprocess_process
from cronnx.preprocessing.messages import Fill, Filled, Stop, decode_from_preprocess, encode, fill_error
from cronnx.preprocessing.rings import ClosedRingSweeper, MappedRings
from cronnx.preprocessing.transform import Preprocessor

log = logging.getLogger("cronnx.preprocessing")

# A process that dies this soon after its start without filling anything failed to start: it is
# restarted after a growing pause (ipc.restarts.ChildSet).
YOUNG_DEATH_S = 1.0


def start(processes: int | None, threads: int, any_on_cuda: bool, max_image_pixels: int,
          fill_timeout_s: float, logging_spec: LoggingSpec) -> Preprocessing:
    """The preprocessing the config asks for (server.preprocess_processes, preprocess_threads), on
    the running event loop. `processes` None: one process per usable core when a model runs on
    CUDA, threads otherwise. Measured on 2 cores (bench/README.md, "Preprocessing processes"):
    processes served 1.08x threads when decoding is all the CPU does (a near-free model, as when
    a GPU infers), threads 1.02x processes when onnxruntime shares the cores (the demo MobileNetV2
    on the CPU); on the 16-core GPU machine processes decoded 1.42x what threads did."""
    if processes is None:
        processes = usable_cores() if any_on_cuda else 0
    if processes:
        return ProcessPreprocessing(processes, max_image_pixels, fill_timeout_s, logging_spec)
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
    """Fills in a pool of `threads` threads of the server process."""

    placement = "threads"
    restarts = 0  # threads are never replaced

    def __init__(self, threads: int):
        self.count = threads
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="cronnx-preprocess", initializer=mark_cpu_bound)

    def submit(self, preprocessor: Preprocessor, ring: SlotRing, slot: int, image: bytes) -> FillJob:
        work = self._executor.submit(_fill, preprocessor, image, ring.inputs[slot])
        # The asyncio future follows the thread's future: cancelled only if `work.cancel()` took
        # it back before a thread picked it up.
        return FillJob(asyncio.wrap_future(work), work.cancel)

    @property
    def pids(self) -> list[int]:
        return []  # threads of the server process: no processes of their own

    def __str__(self) -> str:
        return f"{self.count} threads"

    async def close(self) -> None:
        """Wait for every started fill (they write into ring memory), then end the threads."""
        await asyncio.to_thread(self._executor.shutdown, wait=True)


def _fill(preprocessor: Preprocessor, image: bytes, out: np.ndarray) -> None:
    """`preprocessor(image, out)`, where a refusal (InvalidImage, ImageTooLarge) leaves without any
    frame that holds `out`, a view of ring memory: neither in its traceback nor in that of the
    error it replaced (Pillow's, whose frames reach this call's through their callers). The
    refusal travels on in futures that the request's own frames reference, a cycle only the
    garbage collector frees: until then the view kept the ring's memory exported, and a ring
    closed meanwhile (at shutdown) could not unmap it ("cannot close exported pointers exist"). A
    refusal's message says all there is to say; a bug keeps its traceback for the log."""
    try:
        preprocessor(image, out)
        return
    except CronnxError as exc:
        refusal = exc
    del out
    refusal.__context__ = refusal.__cause__ = None
    raise refusal.with_traceback(None)


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
    process: ChildProcess = field(init=False)
    job: _Job | None = None
    # Kills the process if `job` runs past the fill timeout; cancelled when it answers.
    watchdog: asyncio.TimerHandle | None = None
    fills: int = 0
    rings: MappedRings = field(default_factory=MappedRings)  # what it maps


class ProcessPreprocessing(ChildSet[_Process]):
    """Fills in `count` preprocessing processes (`preprocessing/child.py`), each given one image at
    a time: an image waits in this queue, not in a pipe, so a process that dies takes only
    its own image with it (that request gets PreprocessingLost, 503) and is replaced.

    `max_image_pixels` is Pillow's decompression-bomb limit (server.max_image_pixels). A process
    still on one image after `fill_timeout_s` (server.request_timeout_s: its request has been
    answered 504 by then) is killed and replaced. The processes log as `logging_spec` says. Create
    it on the running event loop; `close()` stops the processes. `restarts` counts replacements,
    `pids` lists the live processes.
    """

    placement = "processes"

    def __init__(self, count: int, max_image_pixels: int, fill_timeout_s: float, logging_spec: LoggingSpec):
        super().__init__(count, "preprocessing process", YOUNG_DEATH_S)
        self._fill_timeout_s = fill_timeout_s
        self._max_image_pixels = max_image_pixels
        self._logging_spec = logging_spec
        self._loop = asyncio.get_running_loop()
        self._queue: deque[_Job] = deque()
        self._ids = itertools.count()
        for index in range(count):
            self._start(index)
        self._sweeper = ClosedRingSweeper(lambda: ((p.rings, p.process) for p in self._children if p is not None))

    def __str__(self) -> str:
        return f"{self.count} processes"

    def submit(self, preprocessor: Preprocessor, ring: SlotRing, slot: int, image: bytes) -> FillJob:
        job = _Job(next(self._ids), preprocessor, ring, slot, image, self._loop.create_future())
        idle = next((p for p in self._children if p is not None and p.job is None), None)
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

    def _dispatch(self, proc: _Process, job: _Job) -> None:
        proc.job = job
        proc.watchdog = self._loop.call_later(self._fill_timeout_s, self._overdue, proc, job)
        try:
            setup = proc.rings.setup_for(job.ring, job.preprocessor)
            proc.process.send(Fill(job.id, job.ring.layout.input_segment, job.slot, setup))
            # The process is idle, reading: an image above the pipe's 1 MiB blocks the event loop
            # only while it drains the rest.
            proc.process.send_bytes(job.image)
        except OSError:
            pass  # it died: its exit, handled next, answers for this job
        job.image = b""  # sent: this process's copy is not needed any more

    def _overdue(self, proc: _Process, job: _Job) -> None:
        """The fill has run past the request timeout: its request has had its 504, and the process
        is stuck (a decoder that never returns). Kill it; it is replaced like any that exits."""
        if proc.job is job and proc.process.exitcode is None:
            reason = f"killed after {self._fill_timeout_s:g} s on one image (server.request_timeout_s)"
            log.warning("preprocessing process %d (pid %d) %s", proc.index, proc.process.pid, reason)
            proc.process.kill(reason)

    def _start(self, index: int) -> None:
        proc = _Process(index)
        proc.process = ChildProcess(f"cronnx-preprocess-{index}", f"preprocessing process {index}",
                                    run_preprocess_process, (self._max_image_pixels, self._logging_spec),
                                    encode, decode_from_preprocess,
                                    functools.partial(self._answer, proc), functools.partial(self._on_exit, proc), log)
        self._children[index] = proc
        log.debug("preprocessing process %d started (pid %d)", index, proc.process.pid)
        # Work that queued while no process was free (or alive) starts here.
        if self._queue:
            self._dispatch(proc, self._queue.popleft())

    def _answer(self, proc: _Process, message) -> None:
        job, proc.job = proc.job, None
        proc.watchdog.cancel()
        proc.fills += 1
        if not job.done.done():
            if type(message) is Filled:
                job.done.set_result(None)
            else:
                job.done.set_exception(fill_error(message))
        if self._queue and not self._stopping:
            self._dispatch(proc, self._queue.popleft())

    def _on_exit(self, proc: _Process, process: ChildProcess) -> None:
        # Its answers sent before it died have been delivered (`_answer`).
        self._children[proc.index] = None
        if proc.job is not None:
            proc.watchdog.cancel()
            proc.job.done.set_exception(PreprocessingLost(
                f"the preprocessing process {process.exit_reason} while decoding this image"))
            proc.job = None
        if not self._stopping:
            self._replace(proc.index, process, proc.fills > 0)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Let started fills finish (they write into ring memory), stop every process (killing one
        that has not exited within `timeout_s`), and fail what is still queued."""
        self._stopping = True
        self._sweeper.cancel()
        while self._queue:
            self._queue.popleft().done.cancel()
        deadline = time.monotonic() + timeout_s
        while any(p is not None and p.job is not None for p in self._children) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        left_s = max(0.0, deadline - time.monotonic())
        await asyncio.gather(*(p.process.stop(Stop(), left_s) for p in self._children if p is not None))
