"""The inference engine: one call runs one request through a model version, below any protocol.

`InferenceEngine.infer` is the only owner of a request's ring slot (ring rule 6): it acquires the
slot, places the preprocessing (threads or processes: `preprocessing/placement.py`), hands the
slot to the worker, awaits the answer, gives up on disconnect or deadline, copies the output out
and releases the slot on every path. Protocol handlers reach it through an `InferenceClient`
(`client.py`, `local.py`) and never see a worker, a ring or a slot index.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from cronnx.engine.client import NO_QUEUE_PARAMETERS, InferenceResult, QueueParameters
from cronnx.engine.pool import ModelPool
from cronnx.engine.registry import Registry
from cronnx.errors import DeadlineExceeded, InferenceFailed, QueueTimeout, ShuttingDown, WorkerLost
from cronnx.ipc.ring import SlotRing
from cronnx.observability.trace_context import TraceContext
from cronnx.preprocessing.placement import FillJob, Preprocessing
from cronnx.workers.channel import SlotReturn
from cronnx.workers.supervisor import Worker


class InferenceEngine:
    """Runs requests on the model versions of `registry`, decoding images with `preprocessing`."""

    def __init__(self, registry: Registry, preprocessing: Preprocessing):
        self.registry = registry
        self.preprocessing = preprocessing
        # Set when the server begins to shut down: no new request is taken.
        self.draining = False

    @contextmanager
    def select(self, model: str, version: int | None = None, routing_key: str | None = None) -> Iterator[ModelPool]:
        """The version that serves a request, counted as in flight in it until the block ends.

        Chosen once, on arrival: it serves this request even if a reload replaces it meanwhile
        (a replaced version drains: it finishes what chose it, then stops). `version` None picks by
        the model's traffic split, the same `routing_key` always getting the same version.
        Raises ModelNotFound, or ModelNotReady (the version asked for is loading).
        """
        pool = self.choose(model, version, routing_key)
        pool.enter()
        try:
            yield pool
        finally:
            pool.leave()

    def choose(self, model: str, version: int | None = None, routing_key: str | None = None) -> ModelPool:
        """The version that would serve a request naming `model`, `version` (None: by the traffic
        split, `routing_key` as in `select`), without counting it in flight: `select`'s choice, and
        the metrics' labels of a request that a front process refused before asking for one.
        Raises ModelNotFound or ModelNotReady."""
        if version is None:
            return self.registry.route(model).choose(routing_key)
        return self.registry.version(model, version)

    async def infer(self, pool: ModelPool, image: bytes, request_id: str, deadline: float,
                    queue: QueueParameters = NO_QUEUE_PARAMETERS, trace: TraceContext | None = None) -> InferenceResult:
        """Preprocess `image` (encoded bytes) into a slot of `pool`, run it, return its output.

        `deadline` is on the event loop's clock (`loop.time()`). A request that finds every slot
        taken waits for one in the version's admission queue. Raises ShuttingDown, NoLiveWorker or
        QueueFull (the queue is full) at once, InvalidImage or ImageTooLarge from
        preprocessing, WorkerLost if the worker dies or is killed meanwhile, InferenceFailed if
        onnxruntime raises on this input, DeadlineExceeded; CancelledError when the caller gives
        up. The slot is free again, or will be as soon as no thread or worker touches it, on every
        path. `trace`: the request's span, when it is traced, for its batch's span to link to.
        """
        async def preprocess(ring: SlotRing, slot: int) -> None:
            await _fill_by(self.preprocessing.submit(pool.preprocess, ring, slot, image), ring, slot)
        return await self._infer(pool, preprocess, len(image), request_id, deadline, queue, trace)

    async def infer_filled_by(self, pool: ModelPool, start_fill: Callable[[SlotRing, int], FillJob],
                              held_bytes: int, request_id: str, deadline: float,
                              queue: QueueParameters = NO_QUEUE_PARAMETERS,
                              trace: TraceContext | None = None) -> InferenceResult:
        """Run one request whose input another process writes into the slot (a front process,
        `fronts/manager.py`, that holds the image, `held_bytes` long, while it waits):
        `start_fill(ring, slot)` asks it to and returns the `FillJob` that resolves once it has
        stopped writing. Raises as `infer` does; `preprocess_s` is the fill's round trip."""
        async def fill(ring: SlotRing, slot: int) -> None:
            await _fill_by(start_fill(ring, slot), ring, slot)
        return await self._infer(pool, fill, held_bytes, request_id, deadline, queue, trace)

    async def infer_tensor(self, pool: ModelPool, row: np.ndarray, request_id: str, deadline: float,
                           queue: QueueParameters = NO_QUEUE_PARAMETERS,
                           trace: TraceContext | None = None) -> InferenceResult:
        """Run one row of the model's own input tensor (shape `spec.input_item_shape`, dtype
        `spec.input_dtype`: the caller checks both), copied into a slot as it is. Raises as `infer`
        does, less the preprocessing errors; `preprocess_s` is the copy."""
        async def copy(ring: SlotRing, slot: int) -> None:
            try:
                np.copyto(ring.inputs[slot], row, casting="no")
            except BaseException:
                ring.release(slot)
                raise
        return await self._infer(pool, copy, row.nbytes, request_id, deadline, queue, trace)

    async def _infer(self, pool: ModelPool, fill, held_bytes: int, request_id: str, deadline: float,
                     queue: QueueParameters, trace: TraceContext | None) -> InferenceResult:
        """Acquire a slot (waiting in the admission queue as `queue` asks, counted there as
        holding `held_bytes`), `await fill(ring, slot)` (which releases the slot itself when it
        fails: ring rule 4), hand it to the worker, await the answer, copy the output, release."""
        if self.draining:
            raise ShuttingDown("server is shutting down")
        admission = pool.admission
        level = admission.level(queue.priority)
        wait_limit_s = admission.wait_limit_s(queue.timeout_s)
        try:
            async with asyncio.timeout_at(deadline):
                arrived = time.perf_counter()
                worker, slot = await _admit(pool, level, held_bytes, wait_limit_s)
                ring = worker.ring
                started = time.perf_counter()
                await fill(ring, slot)
                preprocess_s = time.perf_counter() - started
                returned = await _run(pool, worker, slot, request_id, level, trace)  # after the fill: ring rule 1
        except TimeoutError:
            raise DeadlineExceeded("request did not complete before its deadline "
                                   "(server.request_timeout_s, or a gRPC call's own deadline)") from None
        try:
            if returned.outcome == "done":
                output = ring.outputs[slot].copy()  # ring rule 3: before the release below
        finally:
            ring.release(slot)
        if returned.outcome == "done":
            return InferenceResult(output, returned.batch_size, started - arrived, preprocess_s, returned.queue_s,
                                   returned.infer_s, returned.batch_trace)
        if returned.outcome == "failed":
            raise InferenceFailed(f"inference failed: {returned.error}")
        raise WorkerLost(returned.error or f"worker {worker.name} dropped the request")


async def _admit(pool: ModelPool, level: int, held_bytes: int, wait_limit_s: float | None) -> tuple[Worker, int]:
    """A slot from the version's admission queue at priority `level` for a request holding
    `held_bytes`, waiting at most `wait_limit_s` seconds (None: until the request's deadline);
    QueueTimeout after that."""
    if wait_limit_s is None:
        return await pool.admission.acquire(level, held_bytes)
    try:
        async with asyncio.timeout(wait_limit_s):
            return await pool.admission.acquire(level, held_bytes)
    except TimeoutError:
        raise QueueTimeout(f"no ring slot of model {pool.name!r} came free within {wait_limit_s * 1000:g} ms "
                           "(its queue timeout)") from None


async def _fill_by(job: FillJob, ring: SlotRing, slot: int) -> None:
    """Await a fill of the slot's input memory (a preprocessing thread or process, or a front
    process). On any failure the slot is released (at once, or when the writer is done: ring
    rule 4)."""
    try:
        # Shielded: giving up must not cancel `done`, which resolves only once nothing writes.
        await asyncio.shield(job.done)
    except asyncio.CancelledError:
        if job.done.cancelled() or not job.done.done():
            job.done.add_done_callback(lambda _: ring.release(slot))  # ring rule 4
            job.withdraw()  # a job not started yet is cancelled at once
        else:
            ring.release(slot)  # finished just as the request gave up
        raise
    except BaseException:
        ring.release(slot)  # the writer has returned, with its error
        raise


async def _run(pool: ModelPool, worker: Worker, slot: int, request_id: str, level: int,
               trace: TraceContext | None) -> SlotReturn:
    """Hand the filled slot to its worker and await the worker's answer for it.

    Returns with the slot still held by the caller, who releases it. If the caller gives up
    first (CancelledError), the slot is released when the worker answers (ring rule 5)."""
    ring = worker.ring
    if not worker.live:  # it died, or was killed, while the input was being prepared
        ring.release(slot)
        raise WorkerLost(f"worker {worker.name} {worker.last_exit or 'stopped'} before this request was sent; retry")
    answer = asyncio.get_running_loop().create_future()

    def on_return(returned: SlotReturn) -> None:
        if answer.done():  # the request gave up: nobody will read the output
            ring.release(slot)
        else:
            answer.set_result(returned)

    try:
        worker.submit(slot, pool.slots_in_use == 1, request_id, on_return, level, trace)
    except OSError:  # its pipe broke: it died and its exit is not handled yet
        ring.release(slot)
        raise WorkerLost(f"worker {worker.name} died before this request was sent; retry") from None
    ring.mark_sent(slot)
    try:
        return await answer
    except asyncio.CancelledError:
        if answer.cancelled():
            worker.cancel(slot, on_return)  # on_return frees the slot when the worker answers
        else:
            ring.release(slot)  # answered just as the request gave up
        raise
