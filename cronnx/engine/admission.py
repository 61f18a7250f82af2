"""The admission queue of one model version: requests that find no free ring slot wait here for
one, instead of being refused.

A ring slot is precious (it holds a decoded tensor in shared memory); a waiting request is cheap
(a future and the body it has read). A slot that frees goes straight to the next waiter, in
priority order (level 1 first, as Triton's priority levels) and first come first served within a
level: no polling, no thundering herd. Only past `max_queue_size` waiters, or past the bytes all
the server's waiters may hold (`QueueMemory`, server.max_queue_bytes), is a request refused
(QueueFull: 503 with Retry-After), and that refusal costs no more than today's.

It never frees a slot it did not hand out: a waiter that gives up after its slot was handed to
it releases that slot (ring rule 6), which hands it to the next waiter.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Sequence

from cronnx.config import ModelConfig
from cronnx.errors import InvalidRequest, NoLiveWorker, QueueFull
from cronnx.workers.supervisor import Worker


class QueueMemory:
    """The bytes that the requests waiting in every admission queue of the server hold (each
    request's body, or its tensor row), against `limit` (server.max_queue_bytes; 0: no bound).

    A waiting request is cheap in CPU but holds its body; counting requests alone would let
    max_queue_size bodies of max_body_bytes each wait (1000 x 20 MiB by default), far more than a
    pod's memory. One budget for all versions, because they share the pod. Used on the event loop
    only."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0

    def fits(self, nbytes: int) -> bool:
        return not self.limit or self.held + nbytes <= self.limit


class AdmissionQueue:
    """The waiters for a slot of `workers` (the live one with the most free slots serves each),
    under the policy of `config` (the model's max_queue_size, priority levels and queue timeout,
    named as Triton's queue policy) and the server's `memory` budget for waiting bodies. `name`
    names the model in errors. Call `slot_freed` whenever a slot may have become available (a
    release, a worker turning live). Used on the event loop only."""

    def __init__(self, name: str, workers: Sequence[Worker], config: ModelConfig, memory: QueueMemory):
        self._name = name
        self._workers = workers
        self._memory = memory
        self.max_queue_size = config.max_queue_size
        self.priority_levels = config.priority_levels
        self.default_priority_level = config.default_priority_level or config.priority_levels
        self.default_timeout_s = None if config.default_timeout_ms is None else config.default_timeout_ms / 1000.0
        self.allow_timeout_override = config.allow_timeout_override
        # (priority level, arrival, future): the smallest first; a future already done (given up,
        # or served) is skipped when it comes up.
        self._heap: list[tuple[int, int, asyncio.Future]] = []
        self._arrivals = itertools.count()
        # Requests waiting now: neither served nor given up (a given-up entry stays in the heap
        # until it comes up, uncounted).
        self.depth = 0
        # The bytes those requests hold (their part of `memory.held`).
        self.held_bytes = 0

    async def acquire(self, priority: int, nbytes: int) -> tuple[Worker, int]:
        """A slot for one request holding `nbytes` (its body or tensor row, in bytes): its worker
        and slot index, at once when one is free, else after every waiter before it. Raises
        NoLiveWorker at once when no worker is live, QueueFull at once when `max_queue_size`
        requests wait already or its bytes would take the server's waiters past
        server.max_queue_bytes; CancelledError when the caller gives up (its deadline, its client
        gone), with any slot handed to it meanwhile passed on."""
        taken = self._take()
        if taken is not None:
            return taken
        if not any(w.live for w in self._workers):
            raise NoLiveWorker(f"model {self._name!r} has no live worker (starting or restarting)")
        if self.max_queue_size and self.depth >= self.max_queue_size:
            raise QueueFull(f"model {self._name!r} is at capacity: every ring slot is taken and "
                            f"{self.max_queue_size} requests wait for one (max_queue_size)")
        memory = self._memory
        if not memory.fits(nbytes):
            raise QueueFull(f"model {self._name!r} is at capacity: every ring slot is taken and the requests "
                            f"waiting for one hold {memory.held} of the {memory.limit} bytes they may "
                            "(server.max_queue_bytes)")
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (priority, next(self._arrivals), waiter))
        self.depth += 1
        self.held_bytes += nbytes
        memory.held += nbytes
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():  # still waiting: it leaves the queue (its entry is skipped)
                self.depth -= 1
            else:  # served just as it gave up: the slot goes to the next waiter
                worker, slot = waiter.result()
                worker.ring.release(slot)
            raise
        finally:
            self.held_bytes -= nbytes
            memory.held -= nbytes

    def level(self, priority: int | None) -> int:
        """The queue level of a request asking for `priority` (None or 0: the model's default, as
        Triton's). Raises InvalidRequest (400) beyond priority_levels."""
        if not priority:
            return self.default_priority_level
        if priority > self.priority_levels:
            allowed = (f"0 to {self.priority_levels}" if self.priority_levels
                       else "0: the model has no priority levels (priority_levels)")
            raise InvalidRequest(f"priority {priority} is out of range for model {self._name!r}: {allowed}")
        return priority

    def wait_limit_s(self, timeout_s: float | None) -> float | None:
        """How long a request asking for `timeout_s` (None: nothing) may wait for a slot, in
        seconds; None: until its request timeout. A request may only shorten the model's
        default_timeout_ms, and only where allow_timeout_override is set; InvalidRequest (400)
        otherwise."""
        if timeout_s is None:
            return self.default_timeout_s
        if not self.allow_timeout_override:
            raise InvalidRequest(f"model {self._name!r} does not let a request set its queue timeout "
                                 "(allow_timeout_override)")
        return timeout_s if self.default_timeout_s is None else min(timeout_s, self.default_timeout_s)

    def slot_freed(self) -> None:
        """Hand free slots to the waiters, first in order first, while both remain."""
        heap = self._heap
        while heap:
            waiter = heap[0][2]
            if waiter.done():  # gave up
                heapq.heappop(heap)
                continue
            taken = self._take_any()
            if taken is None:
                return
            heapq.heappop(heap)
            self.depth -= 1
            waiter.set_result(taken)

    def _take(self) -> tuple[Worker, int] | None:
        """A slot of the live worker with the most free slots, None when none is free. Waiters go
        first: a newcomer takes a free slot only when nobody waits."""
        if self.depth:
            return None
        return self._take_any()

    def _take_any(self) -> tuple[Worker, int] | None:
        best = None
        for worker in self._workers:
            free = worker.ring.free_count
            if worker.live and free and (best is None or free > best.ring.free_count):
                best = worker
        if best is None:
            return None
        return best, best.ring.acquire()
