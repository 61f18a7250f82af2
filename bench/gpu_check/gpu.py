"""The GPU as nvidia-smi sees it: its name, and its utilisation and memory during each served run
(sampled by sampling.Sampler); "n/a" without nvidia-smi."""

from __future__ import annotations

import subprocess


def query_gpu(nvidia_smi: str, fields: str = "utilization.gpu,memory.used") -> list[str] | None:
    """GPU 0's values of `fields` (nvidia-smi --query-gpu: utilisation in %, memory in MiB), or
    None when nvidia-smi fails."""
    try:
        out = subprocess.run([nvidia_smi, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return None
    return [v.strip() for v in lines[0].split(",")]


def gpu_name(nvidia_smi: str | None) -> str | None:
    """GPU 0's name, driver version and total memory, as one string; None without nvidia-smi."""
    if not nvidia_smi:
        return None
    values = query_gpu(nvidia_smi, "name,driver_version,memory.total")
    return ", ".join(values) if values else None


def during_served_runs(nvidia_smi: str | None, name: str | None, served: dict) -> dict:
    """The GPU part: a row per served run (model, placement, clients) with its GPU sample."""
    if not nvidia_smi:
        return {"status": "n/a", "note": "no nvidia-smi on this machine"}
    rows = [{"model": model, "preprocessing": run["preprocessing"], "clients": run["clients"], **(run["gpu"] or {})}
            for model, m in served.get("models", {}).items()
            for p in m.get("placements", {}).values() for run in p.get("runs", [])]
    return {"status": "sampled", "gpu_name": name, "runs": rows}
