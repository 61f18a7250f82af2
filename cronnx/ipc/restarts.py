"""When a child process that exited is replaced: the pause after failed starts, and the record of
young deaths for a fixed set of children (preprocessing or front processes)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cronnx.ipc.child import ChildProcess

log = logging.getLogger("cronnx.process")


def restart_delay(failed_starts: int, max_s: float = 30.0) -> float:
    """Seconds to wait before replacing a child process (a worker, a preprocessing or a front
    process) that has failed to start `failed_starts` times in a row: none after one that had been
    serving (0), then 0.5 s doubling up to `max_s`, so that one that cannot start does not spin."""
    return min(max_s, 0.5 * 2 ** (failed_starts - 1)) if failed_starts else 0.0


class Replacements:
    """When to replace each of a fixed set of child processes (preprocessing or front processes)
    after it exits: at once after one that had been working, after `restart_delay` while they keep
    dying young (within `young_s` of their start, having done no work). `restarts` counts them."""

    def __init__(self, count: int, what: str, young_s: float):
        self.restarts = 0
        self._what = what
        self._young_s = young_s
        self._young_deaths = [0] * count

    def schedule(self, index: int, process: ChildProcess, worked: bool, restart: Callable[[int], None]) -> None:
        """Logs the exit of child `index` (`process`, which has exited; `worked`: it did some work)
        and calls `restart(index)` on the running loop after the pause its record of young deaths
        gives."""
        self.restarts += 1
        young = not worked and time.monotonic() - process.started_at < self._young_s
        self._young_deaths[index] = self._young_deaths[index] + 1 if young else 0
        delay = restart_delay(self._young_deaths[index])
        log.warning("%s %d (pid %d) %s; starting another in %.1fs",
                    self._what, index, process.pid, process.exit_reason, delay)
        asyncio.get_running_loop().call_later(delay, restart, index)
