"""One worker process's lifecycle: spawned with its two pipes, read on the event loop, its exit
noticed on its sentinel, stopped politely or killed.

It knows nothing of rings, requests or restarts: every message it reads goes to `on_message`,
and its exit, once the messages it sent before dying are delivered, to `on_exit`.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from collections.abc import Callable

from . import contract
from .pipe_reader import PipeReader

log = logging.getLogger("cronnx.process")

_spawn = multiprocessing.get_context("spawn")
PIPE_BYTES = 1 << 20
# The entry point a worker process runs: (spec_bytes, inbox, outbox) -> None.
WorkerTarget = Callable[..., None]


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

    def schedule(self, index: int, process, started_at: float, worked: bool, restart: Callable[[int], None]) -> None:
        """Logs the exit of child `index` (`process`: its multiprocessing.Process, started at
        `started_at` on time.monotonic()) and calls `restart(index)` on the running loop after the
        pause its record of young deaths gives."""
        self.restarts += 1
        young = not worked and time.monotonic() - started_at < self._young_s
        self._young_deaths[index] = self._young_deaths[index] + 1 if young else 0
        delay = restart_delay(self._young_deaths[index])
        log.warning("%s %d (pid %d) exited with code %s; starting another in %.1fs",
                    self._what, index, process.pid, process.exitcode, delay)
        asyncio.get_running_loop().call_later(delay, restart, index)


def enlarge_pipe(fd: int) -> None:
    """The front writes to its children's pipes on its event loop: a full pipe would block it. 64 KiB
    holds a few hundred submits; 1 MiB holds far more than a ring can have slots, and most images."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        pass  # not Linux, or above /proc/sys/fs/pipe-max-size: the default size stays


class WorkerProcess:
    """A spawned worker process (spawn, not fork: onnxruntime's thread pools do not survive fork).

    Three pipes: submits and cancels in, every answer out, and pings in (read by the worker's
    liveness thread). `on_message(msg)` gets each decoded `contract.FromWorker` message in order; `on_exit(process)`
    is called once, after the process has exited and every message it sent has been delivered.
    """

    def __init__(self, name: str, target: WorkerTarget, spec_bytes: bytes,
                 on_message: Callable[[object], None], on_exit: Callable[[WorkerProcess], None]):
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._on_message = on_message
        self._on_exit = on_exit
        self.started_at = time.monotonic()
        # It sent Ready: loaded and warmed up (set by its supervisor).
        self.ready = False
        # Why the front killed it: a short cause ("ping_timeout") and a sentence (None: it exited
        # by itself).
        self.kill_cause: str | None = None
        self.kill_reason: str | None = None
        self.exited = asyncio.Event()
        inbox_read, inbox_write = _spawn.Pipe(duplex=False)
        outbox_read, outbox_write = _spawn.Pipe(duplex=False)
        pings_read, pings_write = _spawn.Pipe(duplex=False)
        enlarge_pipe(inbox_write.fileno())
        self._process = _spawn.Process(target=target, args=(spec_bytes, inbox_read, outbox_write, pings_read),
                                       name=f"cronnx-worker-{name}", daemon=True)
        self._process.start()
        # The child has its own copies; closing ours lets EOF reach each side when the other dies.
        inbox_read.close()
        outbox_write.close()
        pings_read.close()
        self._inbox, self._outbox, self._pings = inbox_write, outbox_read, pings_write
        self._answers = PipeReader(outbox_read)
        self._loop.add_reader(outbox_read.fileno(), self._on_readable)
        self._loop.add_reader(self._process.sentinel, self._on_sentinel)
        log.info("worker %s starting (pid %d)", name, self.pid)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def exitcode(self) -> int | None:
        return self._process.exitcode

    def send(self, message) -> None:
        """Write one `contract.ToWorker` message; OSError when the worker is gone (its exit is
        then being handled, or about to be)."""
        self._inbox.send_bytes(contract.encode(message))

    def ping(self, seq: int) -> None:
        """Send Ping(seq) on the ping pipe (its own, so that it never waits behind submits)."""
        try:
            self._pings.send_bytes(contract.encode(contract.Ping(seq)))
        except OSError:
            pass  # it died: its exit is being handled

    def kill(self, cause: str, reason: str) -> None:
        """SIGKILL, remembering why; `on_exit` follows as for any death."""
        if self.kill_cause is None and not self.exited.is_set():
            self.kill_cause, self.kill_reason = cause, reason
            self._process.kill()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the worker to exit (it finishes nothing more); kill it if it has not within `timeout_s`."""
        if self.exited.is_set():
            return
        try:
            self.send(contract.Stop())
        except OSError:
            pass
        try:
            await asyncio.wait_for(self.exited.wait(), timeout_s)
        except TimeoutError:
            log.warning("worker %s did not stop in %.1fs; killing it", self.name, timeout_s)
            self._process.kill()
            await self.exited.wait()

    def _on_readable(self) -> None:
        for message in self._answers.read():
            self._on_message(contract.decode_from_worker(message))
        if self._answers.at_eof:
            self._loop.remove_reader(self._outbox.fileno())

    def _on_sentinel(self) -> None:
        self._loop.remove_reader(self._process.sentinel)
        # Answers the worker sent before it died are still valid: deliver them first.
        self._on_readable()
        self._loop.remove_reader(self._outbox.fileno())
        self._outbox.close()
        self._inbox.close()
        self._pings.close()
        self._process.join()
        self.exited.set()
        self._on_exit(self)
