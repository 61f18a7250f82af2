"""Whole messages from a child's pipe, read on the event loop without a selector per message.

`Connection.poll()` builds a selector, registers the fd and polls it on every call, and a reader
loop calls it once per message and once more to find the pipe empty. In the server process of
a server with front processes every request takes three messages from its front and the worker's
answers: py-spy put those polls at a third of that event loop's time (bench/README.md, "Front
processes"). Here the read end is made non-blocking and drained with `os.read`, and the bytes are
split into the messages `Connection.send_bytes` framed (CPython's multiprocessing.connection: a
4-byte big-endian signed length, or -1 and then an 8-byte length for 2 GiB and more).
"""

from __future__ import annotations

import os
from multiprocessing.connection import Connection

PIPE_BYTES = 1 << 20


def enlarge_pipe(fd: int) -> None:
    """A process writes to its children's pipes (and a front process to the server process's) on
    its event loop: a full pipe would block it. 64 KiB holds a few hundred submits; 1 MiB holds
    far more than a ring can have slots, and most images."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        pass  # not Linux, or above /proc/sys/fs/pipe-max-size: the default size stays


# One read's size: far above what a child sends between two event-loop turns.
_CHUNK = 1 << 20


class PipeReader:
    """The read end `conn` of a pipe a child writes with `send_bytes`, read without blocking.
    Use only this reader on it from now on (the fd is non-blocking: `conn.recv_bytes` would fail)."""

    def __init__(self, conn: Connection):
        self._conn = conn  # holds the fd open
        self._fd = conn.fileno()
        os.set_blocking(self._fd, False)
        self._buffer = bytearray()
        self.at_eof = False

    def read(self) -> list[bytes]:
        """Every whole message readable now, oldest first (possibly none). Sets `at_eof` once the
        writer has closed its end (or the pipe has been closed here); a message the writer had not
        finished by then is dropped."""
        buffer = self._buffer
        while not self.at_eof:
            try:
                chunk = os.read(self._fd, _CHUNK)
            except BlockingIOError:
                break
            except OSError:  # closed here
                self.at_eof = True
                break
            if not chunk:
                self.at_eof = True
                break
            buffer += chunk
            if len(chunk) < _CHUNK:
                break  # drained: spare the read that would find it empty
        messages, start, end = [], 0, len(buffer)
        while end - start >= 4:
            size = int.from_bytes(buffer[start:start + 4], "big", signed=True)
            header = 4
            if size == -1:
                if end - start < 12:
                    break
                size, header = int.from_bytes(buffer[start + 4:start + 12], "big"), 12
            if end - start - header < size:
                break
            messages.append(bytes(buffer[start + header:start + header + size]))
            start += header + size
        del buffer[:start]
        return messages
