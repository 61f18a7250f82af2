"""The batch window of one worker: which waiting slots run next, and when.

The window is measured from the oldest waiting request, so a later arrival never restarts
it: a full batch runs at once, a partial one when the oldest has waited `timeout_s`, or
at once when the server process reports that no other request is being prepared for this
worker (at low load the window would then only add latency). When more slots wait than a batch
holds, it takes the lowest priority level first (the admission queue's, 1 first), oldest first
within a level.
"""

from __future__ import annotations

from collections import OrderedDict


class Batcher:
    def __init__(self, batch_size: int, timeout_s: float):
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        # slot -> (time it was enqueued, alone in the model when submitted, priority level), oldest first.
        self._waiting: OrderedDict[int, tuple[float, bool, int]] = OrderedDict()
        self._more_coming = False

    def add(self, slot: int, enqueued: float, filling: int, alone: bool = False, priority: int = 0) -> None:
        self._waiting[slot] = (enqueued, alone, priority)
        self._more_coming = filling > 0

    def cancel(self, slot: int) -> bool:
        """Remove a waiting slot; False when it is not waiting (already run or never seen)."""
        return self._waiting.pop(slot, None) is not None

    def wait_time(self, now: float) -> float | None:
        """Seconds until the next batch is due: 0 when due now, None when nothing waits."""
        if not self._waiting:
            return None
        if len(self._waiting) >= self.batch_size or not self._more_coming:
            return 0.0
        oldest = next(iter(self._waiting.values()))[0]
        return max(0.0, oldest + self.timeout_s - now)

    def take(self) -> tuple[list[int], list[float], bool]:
        """The next batch's slots (at most batch_size: the lowest priority level first, oldest
        first within one), their enqueue times, and whether the batch is a lone request that had
        the model to itself."""
        waiting = self._waiting
        count = min(self.batch_size, len(waiting))
        if count < len(waiting) and len({level for _, _, level in waiting.values()}) > 1:
            # sorted() keeps arrival order within a level.
            chosen = sorted(waiting, key=lambda slot: waiting[slot][2])[:count]
            items = [(slot, waiting.pop(slot)) for slot in chosen]
        else:
            items = [waiting.popitem(last=False) for _ in range(count)]
        slots = [slot for slot, _ in items]
        enqueued = [entry[0] for _, entry in items]
        return slots, enqueued, count == 1 and items[0][1][1]
