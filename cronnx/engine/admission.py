"""The admission queue of one model version: requests that find no free ring slot wait here for
one, instead of being refused.

A ring slot is precious (it holds a decoded tensor in shared memory); a waiting request is cheap
(a future and the body it has read). A slot that frees goes straight to the next waiter, in
priority order (level 1 first, as Triton's priority levels) and first come first served within a
level: no polling, no thundering herd. Only past `max_queue_size` waiters is a request refused
(QueueFull: 503 with Retry-After), and that refusal costs no more than today's.

It never frees a slot it did not hand out: a waiter that gives up after its slot was handed to
it releases that slot (ring rule 6), which hands it to the next waiter.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Sequence

from cronnx.errors import NoLiveWorker, QueueFull
from cronnx.workers.supervisor import Worker


class AdmissionQueue:
    """The waiters for a slot of `workers` (the live one with the most free slots serves each),
    at most `max_queue_size` of them (0: no bound, as Triton's). `name` names the model in errors.
    Call `slot_freed` whenever a slot may have become available (a release, a worker turning
    live). Used on the event loop only."""

    def __init__(self, name: str, workers: Sequence[Worker], max_queue_size: int):
        self._name = name
        self._workers = workers
        self.max_queue_size = max_queue_size
        # (priority level, arrival, future): the smallest first; a future already done (given up,
        # or served) is skipped when it comes up.
        self._heap: list[tuple[int, int, asyncio.Future]] = []
        self._arrivals = itertools.count()
        # Requests waiting now: neither served nor given up (a given-up entry stays in the heap
        # until it comes up, uncounted).
        self.depth = 0

    async def acquire(self, priority: int) -> tuple[Worker, int]:
        """A slot for one request (its worker and index): at once when one is free, else after
        every waiter before it. Raises NoLiveWorker at once when no worker is live, QueueFull at
        once when `max_queue_size` requests wait already; CancelledError when the caller gives up
        (its deadline, its client gone), with any slot handed to it meanwhile passed on."""
        taken = self._take()
        if taken is not None:
            return taken
        if not any(w.live for w in self._workers):
            raise NoLiveWorker(f"model {self._name!r} has no live worker (starting or restarting)")
        if self.max_queue_size and self.depth >= self.max_queue_size:
            raise QueueFull(f"model {self._name!r} is at capacity: every ring slot is taken and "
                            f"{self.max_queue_size} requests wait for one (max_queue_size)")
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (priority, next(self._arrivals), waiter))
        self.depth += 1
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():  # still waiting: it leaves the queue (its entry is skipped)
                self.depth -= 1
            else:  # served just as it gave up: the slot goes to the next waiter
                worker, slot = waiter.result()
                worker.ring.release(slot)
            raise

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
