"""One child process's lifecycle, whatever it runs (a worker, a preprocessing process, a front
process): spawned with its pipes, read on the event loop, its exit noticed on its sentinel with
what it said before dying delivered first, stopped politely or killed.

It knows nothing of what its messages mean: its manager gives it the encoder and decoder of its
kind's messages (each kind's `messages.py`) and keeps the policy (how many, when to replace, what
an exit costs).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from cronnx.ipc.pipes import PipeReader, enlarge_pipe

# Spawn, not fork: onnxruntime's thread pools do not survive fork, and a forked child would
# inherit the server process's event loop, sockets and shared-memory mappings.
_spawn = multiprocessing.get_context("spawn")


class ChildProcess:
    """A spawned child process running `target(*args, inbox, outbox, *extra_inboxes)` (read end,
    write end, read ends), named `name` (multiprocessing's process name).

    The parent writes encoded messages to the inbox (`send`) and to the `extra_inboxes` further
    inboxes (a worker's pings, which must never wait behind its submits); it reads the outbox on
    the running event loop with `PipeReader`, and hands each message, decoded with `decode`, to
    `on_message` in the order it was written. Once the process has exited and every message it
    wrote before is delivered, `on_exit(self)` is called, once. The inbox (and the outbox when
    `enlarge_outbox`) holds 1 MiB (`enlarge_pipe`) so that a burst of writes does not block the
    writer's loop. `label` names it in log lines ("worker m:v1#0"), written on `log`.
    Create it on the running event loop.
    """

    def __init__(self, name: str, label: str, target: Callable[..., None], args: tuple,
                 encode: Callable[[object], bytes], decode: Callable[[bytes], object],
                 on_message: Callable[[object], None], on_exit: Callable[[ChildProcess], None],
                 log: logging.Logger, extra_inboxes: int = 0, enlarge_outbox: bool = False):
        self._label = label
        self._loop = asyncio.get_running_loop()
        self._encode = encode
        self._decode = decode
        self._on_message = on_message
        self._on_exit = on_exit
        self._log = log
        # What the parent said when it killed the process (None: it did not).
        self.kill_reason: str | None = None
        # Its exit code, kept when it has exited and the process object is closed.
        self._exitcode: int | None = None
        self.exited = asyncio.Event()
        pipes: list[tuple[Connection, Connection]] = []
        try:
            for _ in range(2 + extra_inboxes):
                pipes.append(_spawn.Pipe(duplex=False))
            (inbox_read, inbox_write), (outbox_read, outbox_write), *extra = pipes
            enlarge_pipe(inbox_write.fileno())
            if enlarge_outbox:
                enlarge_pipe(outbox_write.fileno())
            self.started_at = time.monotonic()
            self._process = _spawn.Process(target=target, name=name, daemon=True,
                                           args=(*args, inbox_read, outbox_write, *(read for read, _ in extra)))
            self._process.start()
        except BaseException:
            # No process (no descriptor or process left for it): its pipes close now, not when
            # the traceback that holds them is collected.
            for read, write in pipes:
                read.close()
                write.close()
            raise
        # The child has its own copies; closing ours lets EOF reach each side when the other dies.
        inbox_read.close()
        outbox_write.close()
        for read, _ in extra:
            read.close()
        self._inboxes: list[Connection] = [inbox_write, *(write for _, write in extra)]
        self._outbox = outbox_read
        self._reader = PipeReader(outbox_read)
        self._loop.add_reader(outbox_read.fileno(), self._on_readable)
        self._loop.add_reader(self._process.sentinel, self._on_sentinel)
        self._pid = self._process.pid

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def exitcode(self) -> int | None:
        """multiprocessing's: the code it exited with, minus the signal that ended it, or None while it runs."""
        return self._exitcode if self._exitcode is not None else self._process.exitcode

    @property
    def exit_reason(self) -> str | None:
        """How it ended, as the predicate of a sentence about it: the reason the parent gave
        `kill`, "exited with code N", or "was killed by SIGNAME" for a signal from elsewhere (the
        OOM killer, a person); None while it runs."""
        code = self.exitcode
        if code is None:
            return None
        if self.kill_reason is not None:
            return self.kill_reason
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def send(self, message: object, inbox: int = 0) -> None:
        """Write one message on inbox `inbox` (0: the inbox; 1 on: the extra ones). Raises OSError
        when the process is gone (its exit is then being handled, or about to be)."""
        self._inboxes[inbox].send_bytes(self._encode(message))

    def send_bytes(self, data: bytes) -> None:
        """Write `data` as it is, as one message on the inbox (bytes that follow a message, never
        encoded). Raises OSError as `send` does."""
        self._inboxes[0].send_bytes(data)

    def kill(self, reason: str) -> None:
        """SIGKILL, remembering `reason` (what happened, as the predicate of a sentence: "was killed
        after ..."; see `exit_reason`); `on_exit` follows as for any exit. Nothing if it has exited
        or been killed already."""
        if self.kill_reason is None and not self.exited.is_set():
            self.kill_reason = reason
            self._process.kill()

    async def stop(self, message: object, timeout_s: float) -> None:
        """Send `message` (its kind's stop or drain), wait up to `timeout_s` seconds for the exit,
        then kill it (logged as a warning). Returns once `on_exit` has run."""
        if self.exited.is_set():
            return
        try:
            self.send(message)
        except OSError:
            pass  # it died: its exit is being handled
        try:
            await asyncio.wait_for(self.exited.wait(), timeout_s)
        except TimeoutError:
            self._log.warning("%s did not stop in %.1fs; killing it", self._label, timeout_s)
            self.kill(f"was killed: it did not stop within {timeout_s:g}s")
            await self.exited.wait()

    def _on_readable(self) -> None:
        on_message, decode = self._on_message, self._decode
        for message in self._reader.read():
            on_message(decode(message))
        if self._reader.at_eof:
            self._loop.remove_reader(self._outbox.fileno())

    def _on_sentinel(self) -> None:
        self._loop.remove_reader(self._process.sentinel)
        # What it wrote before it died is still valid (answers, slots it finished): deliver it first.
        self._on_readable()
        self._loop.remove_reader(self._outbox.fileno())
        self._outbox.close()
        for inbox in self._inboxes:
            inbox.close()
        self._process.join()
        self._exitcode = self._process.exitcode
        if self._exitcode is not None:  # (None only if something else reaped it)
            # Its sentinel and the end of the pipe its spawn was written to close now, not when
            # the process object is collected (a failed load's pool may outlive it).
            self._process.close()
        self.exited.set()
        self._on_exit(self)
