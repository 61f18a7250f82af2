"""When a child process that exited is replaced: the pause after failed starts, and a fixed set of
children kept up (preprocessing or front processes)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from cronnx.ipc.child import ChildProcess

log = logging.getLogger("cronnx.process")

# A manager's record of one child: anything whose `process` is the child's ChildProcess.
Child = TypeVar("Child")


def restart_delay(failed_starts: int, max_s: float = 30.0) -> float:
    """Seconds to wait before replacing a child process (a worker, a preprocessing or a front
    process) that has failed to start `failed_starts` times in a row: none after one that had been
    serving (0), then 0.5 s doubling up to `max_s`, so that one that cannot start does not spin."""
    return min(max_s, 0.5 * 2 ** (failed_starts - 1)) if failed_starts else 0.0


class ChildSet(Generic[Child]):
    """A fixed set of `count` child processes (preprocessing or front processes), by index, each
    replaced when it exits: at once after one that had been working, after `restart_delay` while
    they keep dying young (within `young_s` of their start, having done no work).

    A manager subclasses it: its `_start(index)` spawns child `index` and puts the child's record
    in `_children[index]`; its exit handler empties that slot and calls `_replace` unless
    `_stopping`. `restarts` counts replacements; `pids` lists the live children.
    """

    def __init__(self, count: int, what: str, young_s: float):
        self.count = count
        self.restarts = 0
        self._what = what
        self._young_s = young_s
        self._young_deaths = [0] * count
        self._children: list[Child | None] = [None] * count
        # Set once the manager stops its children: none is replaced any more.
        self._stopping = False

    @property
    def pids(self) -> list[int]:
        """Process ids of the live children (for tests and `/models`)."""
        return [child.process.pid for child in self._children if child is not None]

    def _start(self, index: int) -> None:
        raise NotImplementedError

    def _replace(self, index: int, process: ChildProcess, worked: bool) -> None:
        """Logs the exit of child `index` (`process`, which has exited; `worked`: it did some work)
        and starts another on the running loop after the pause its record of young deaths gives."""
        self.restarts += 1
        young = not worked and time.monotonic() - process.started_at < self._young_s
        self._young_deaths[index] = self._young_deaths[index] + 1 if young else 0
        delay = restart_delay(self._young_deaths[index])
        log.warning("%s %d (pid %d) %s; starting another in %.1fs",
                    self._what, index, process.pid, process.exit_reason, delay)
        asyncio.get_running_loop().call_later(delay, self._restart, index)

    def _restart(self, index: int) -> None:
        if self._stopping or self._children[index] is not None:
            return
        try:
            self._start(index)
        except OSError as exc:  # no descriptor or process left now: try again after a longer pause
            self._young_deaths[index] += 1
            delay = restart_delay(self._young_deaths[index])
            log.error("%s %d could not be started (%s); trying again in %.1fs", self._what, index, exc, delay)
            asyncio.get_running_loop().call_later(delay, self._restart, index)
