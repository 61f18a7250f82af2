"""The names of the shared-memory segments a server start creates, and the clean-up of the ones
a killed start left behind.

Names are unique per start, not per pid: `cronnx_<pid>_<run>_<tag>`, `<run>` 8 random hex
digits drawn once per process. Two servers that share /dev/shm from separate PID namespaces
(containers of one pod, `docker run --ipc=host`) are both PID 1: named by the pid alone, the
second took the first one's rings as its own leftovers, unlinked and recreated them, and the
first then answered from memory nobody wrote.

A segment is removed only when it is provably a dead start's. Each start holds an exclusive
`flock` on its lock file, `cronnx_<pid>_<run>.lock` in the same folder, for as long as it lives:
the kernel releases it when the process ends, by kill -9 too, whatever its namespace. The lock
file gets that name only once it is locked (it is created under a temporary name and renamed),
so a clean-up never sees a start's lock free before the start holds it. A clean-up takes every
lock it can: a lock that is free belongs to a dead start, whose segments and lock file it
unlinks. Names without a lock file (an older Cronnx's, named by pid alone) are left alone.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import re
import secrets

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "cronnx"
_LOCK_FILE = re.compile(rf"^{SEGMENT_PREFIX}_(\d+_[0-9a-f]{{8}})\.lock$")


class _Run:
    """This process's claim on its names: the run id and the lock held on its lock file."""

    def __init__(self, shm_dir: str):
        self.run = f"{os.getpid()}_{secrets.token_hex(4)}"
        self.lock_path = os.path.join(shm_dir, f"{SEGMENT_PREFIX}_{self.run}.lock")
        claiming = os.path.join(shm_dir, f".{SEGMENT_PREFIX}_{self.run}.claiming")
        self._fd = os.open(claiming, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.rename(claiming, self.lock_path)

    def release(self) -> None:
        """Give the names up: the lock file goes, then the lock (the process's segments are
        unlinked already, by their rings)."""
        if self._fd < 0:
            return
        try:
            os.unlink(self.lock_path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = -1


_run: _Run | None = None


def segment_name(tag: str) -> str:
    """The name of this start's segment `tag` (characters a name cannot hold become `_`). The
    first call claims the start's names (its lock file in /dev/shm, held until `release_names`
    or the process's end); raises OSError when /dev/shm cannot hold a file."""
    global _run
    if _run is None:
        _run = _Run(SHM_DIR)
        atexit.register(_run.release)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)
    return f"{SEGMENT_PREFIX}_{_run.run}_{safe}"


def release_names() -> None:
    """Give up this start's claim (the server's last step, its rings closed); a later
    `segment_name` claims new names."""
    global _run
    if _run is not None:
        _run.release()
        _run = None


def remove_stale_segments(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink the segments, and the lock file, of every start whose lock is free (the module
    docstring); returns the names removed."""
    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        match = _LOCK_FILE.match(name)
        if match is None:
            continue
        path = os.path.join(shm_dir, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue  # removed meanwhile by another start's clean-up
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its start is alive
            prefix = f"{SEGMENT_PREFIX}_{match.group(1)}_"
            for segment in names:
                if segment.startswith(prefix) and _unlink(os.path.join(shm_dir, segment)):
                    removed.append(segment)
            if _unlink(path):
                removed.append(name)
        finally:
            os.close(fd)
    return removed


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except OSError:
        return False
    return True
