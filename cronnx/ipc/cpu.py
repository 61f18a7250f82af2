"""CPU scheduling hints for the threads that compute (preprocessing threads and workers), and how
many cores this process may use.

Under load the preprocessing threads (of the server process or of each front process) and the
workers are always runnable, more of them than there are cores, and with the default policy
every wake-up of one may preempt another mid-inference. SCHED_BATCH tells Linux they are
CPU-bound: same share of the CPU (the nice value is unchanged), but their wake-ups do not
preempt, so each runs longer between switches. The event loop thread keeps the default policy
and still preempts them as soon as I/O arrives.
Measured on 2 cores at 32 clients (bench/README.md): workers preempted about 165 instead of 270
times a second, 1-2% more throughput.
"""

from __future__ import annotations

import math
import os


def mark_cpu_bound() -> None:
    """Put the calling thread in SCHED_BATCH; nothing where the OS has no such policy."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))  # 0: the calling thread
    except OSError:
        pass  # refused by a sandbox (seccomp) or a container policy: run as we are


def usable_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The cores this process may use, at least 1: its CPU affinity, capped by its cgroup's CPU
    quota rounded up (a container's `--cpus`, a Kubernetes pod's CPU limit). `os.cpu_count()` says
    how many the machine has, which in a container is often far more than it may use.

    Reads cgroup v2's `cpu.max` ("max 100000" or "<quota> <period>", microseconds) or cgroup v1's
    `cpu/cpu.cfs_quota_us` and `cpu.cfs_period_us` (quota -1: none) under `cgroup_root`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota(root: str) -> float | None:
    """CPU quota in cores, None when there is none or it cannot be read."""
    try:
        quota, period = open(f"{root}/cpu.max").read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(open(f"{root}/cpu/cpu.cfs_quota_us").read())
        period = int(open(f"{root}/cpu/cpu.cfs_period_us").read())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period
