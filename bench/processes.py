"""The processes a benchmark starts, read from /proc: who is alive, what CPU they used, what they left.

The one copy of these helpers for bench/ (head_to_head.py, soak.py and the GPU check use them; the
tests may import them, bench/ never imports the tests). Linux only: everything is read from
/proc/<pid>/stat (proc(5): field 3 the state, 4 the parent pid, 5 the process group, 14 and 15
utime and stime in clock ticks) and /dev/shm.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Collection
from pathlib import Path

TICK_S = 1 / os.sysconf("SC_CLK_TCK")
# What group_cpu splits a server's process group into.
CPU_PARTS = ("event loop thread", "other threads", "worker processes", "other child processes")
# Indexes into stat_fields(): the fields after the command name, so proc(5)'s field n is n - 3.
_STATE, _PARENT, _GROUP, _UTIME, _STIME = 0, 1, 2, 11, 12


def stat_fields(path: Path) -> list[str] | None:
    """The fields of a /proc stat file after the command name; None when the process is gone."""
    try:
        text = path.read_text()
    except OSError:  # gone between listing and reading
        return None
    # The thread name may hold spaces and parentheses: the fields start after the last ')'.
    return text[text.rindex(")") + 2:].split()


def _cpu_s(fields: list[str]) -> float:
    return (int(fields[_UTIME]) + int(fields[_STIME])) * TICK_S


def _live_processes(field: int, value: int) -> list[int]:
    """Processes (not zombies) whose stat field `field` equals `value`."""
    found = []
    for proc in Path("/proc").iterdir():
        fields = stat_fields(proc / "stat") if proc.name.isdigit() else None
        if fields is not None and int(fields[field]) == value and fields[_STATE] != "Z":
            found.append(int(proc.name))
    return found


def alive_in_group(group: int) -> list[int]:
    """Processes (not zombies) whose process group is `group`."""
    return _live_processes(_GROUP, group)


def children_of(pid: int) -> list[int]:
    """Live (not zombie) child processes of `pid`."""
    return _live_processes(_PARENT, pid)


def pid_alive(pid: int) -> bool:
    """A zombie is dead for our purposes."""
    fields = stat_fields(Path(f"/proc/{pid}/stat"))
    return fields is not None and fields[_STATE] != "Z"


def shm_segments(pid: int) -> list[str]:
    """The shared-memory segments a Cronnx server process `pid` owns (it names them
    cronnx_<pid>_<run>_*), less the lock file that claims them (`shm_lock_files`)."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"cronnx_{pid}_") and not n.endswith(".lock"))


def shm_lock_files(pid: int) -> list[str]:
    """The lock file by which a Cronnx server process `pid` claims its segment names
    (cronnx_<pid>_<run>.lock, cronnx/ipc/segments.py): one while it runs, none after a clean stop."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"cronnx_{pid}_") and n.endswith(".lock"))


def server_children(server: int, workers: Collection[int]) -> list[int]:
    """A server's children that are neither its workers nor multiprocessing's resource tracker:
    its preprocessing processes or its front processes."""
    found = []
    for child in children_of(server):
        try:
            tracker = b"resource_tracker" in Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if child not in workers and not tracker:
            found.append(child)
    return found


def group_cpu(group: int, workers: Collection[int] = ()) -> dict[str, float]:
    """CPU seconds (user + system) so far of a server's process group, by CPU_PARTS: the leader's
    event loop (main) thread, its other threads, its worker processes (`workers`), and its other
    children (preprocessing or front processes, and multiprocessing's resource tracker, which idles)."""
    out = dict.fromkeys(CPU_PARTS, 0.0)
    for proc in Path("/proc").iterdir():
        fields = stat_fields(proc / "stat") if proc.name.isdigit() else None
        if fields is None or int(fields[_GROUP]) != group:
            continue
        pid = int(proc.name)
        if pid != group:  # a child: the whole process, its threads that exited included
            out["worker processes" if pid in workers else "other child processes"] += _cpu_s(fields)
            continue
        try:
            tasks = list((proc / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            t = stat_fields(task / "stat")
            if t is not None:
                out["event loop thread" if task.name == proc.name else "other threads"] += _cpu_s(t)
    return out


def reap_group(process: subprocess.Popen) -> dict:
    """After a server leading its own process group was stopped: anything of its group still alive
    after 10 s is killed (by pid) and its shared-memory segments are removed; both are reported
    (they should be empty), with its exit code."""
    if process.poll() is None:  # the stop did not get to it
        process.kill()
        process.wait()
    deadline = time.monotonic() + 10
    while alive_in_group(process.pid) and time.monotonic() < deadline:  # workers exiting after the leader
        time.sleep(0.1)
    killed = alive_in_group(process.pid)
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    removed = shm_segments(process.pid) + shm_lock_files(process.pid)
    for segment in removed:
        os.unlink(f"/dev/shm/{segment}")
    return {"exit_code": process.returncode, "killed_leftover_pids": killed, "removed_shm": removed}


class StartedProcesses:
    """Every process a run started (and whether it leads a process group of its own), so that the
    run can make sure at its very end that none of them is left."""

    def __init__(self):
        self.started: list[tuple[int, bool]] = []

    def add(self, pids, leads_group: bool = False) -> None:
        self.started += [(pid, leads_group) for pid in pids]

    @property
    def pids(self) -> list[int]:
        return [pid for pid, _ in self.started]

    def kill_leftovers(self) -> list[int]:
        """Kill whatever is still alive of them and of the groups they lead; the pids killed."""
        leftover = set()
        for pid, leads_group in self.started:
            leftover.update(alive_in_group(pid) if leads_group else [])
            if pid_alive(pid):
                leftover.add(pid)
        for pid in sorted(leftover):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return sorted(leftover)
