"""A served run's server CPU (from /proc) and GPU (from nvidia-smi), sampled in the background and
read afterwards over the run's measuring window."""

from __future__ import annotations

import statistics
import threading
import time

from bench.processes import group_cpu

from .gpu import query_gpu

SAMPLE_S = 0.5


class Sampler(threading.Thread):
    """Every SAMPLE_S: the CPU seconds of a server's process group (processes.group_cpu), and the
    GPU's utilisation (%) and memory used (MiB) when nvidia-smi exists."""

    def __init__(self, group: int, nvidia_smi: str | None, workers: set[int]):
        super().__init__(daemon=True)
        self.group, self.nvidia_smi, self.workers = group, nvidia_smi, workers
        self.samples: list[tuple[float, dict[str, float], tuple[float, float] | None]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            t = time.monotonic()
            cpu = group_cpu(self.group, self.workers)
            gpu = None
            if self.nvidia_smi:
                values = query_gpu(self.nvidia_smi)
                try:
                    gpu = (float(values[0]), float(values[1])) if values else None
                except ValueError:  # "[N/A]"
                    gpu = None
            self.samples.append((t, cpu, gpu))
            self.stopping.wait(SAMPLE_S)

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)

    def over(self, start: float, end: float) -> dict:
        """Between two time.monotonic() readings: the server's CPU in cores (in all and by part)
        and the GPU's mean and peak utilisation and peak memory."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:  # a short window: the samples around it
            before = [s for s in self.samples if s[0] < start][-1:]
            after = [s for s in self.samples if s[0] > end][:1]
            inside = before + inside + after
        if len(inside) < 2:
            return {"server_cpu_cores": None, "gpu": None}
        (t0, cpu0, _), (t1, cpu1, _) = inside[0], inside[-1]
        span = t1 - t0
        parts = {part: (cpu1[part] - cpu0[part]) / span for part in cpu1}
        gpu = [g for _, _, g in inside if g is not None]
        return {"interval_s": span, "server_cpu_cores": sum(parts.values()), "server_cpu_by_part_cores": parts,
                "gpu": None if not gpu else {
                    "util_mean_pct": statistics.mean(u for u, _ in gpu), "util_max_pct": max(u for u, _ in gpu),
                    "memory_used_max_mib": max(m for _, m in gpu), "samples": len(gpu)}}
