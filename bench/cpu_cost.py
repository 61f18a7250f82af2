"""CPU time per request, process by process, for Cronnx and the plain aiohttp peer side by side.

On a CPU-bound machine throughput is cores / (CPU per request), so this says where a server
spends what it spends: each server runs in its own process group, and the user + system time of
every process (and every thread of the front) is read from /proc before and after a closed-loop
`cronnx bench` run, then divided by the requests answered. Rounds alternate the servers.

    python bench/cpu_cost.py [--seconds 8] [--warmup 2] [--rounds 3] [--concurrency 32] [--config FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import DEFAULT_OUT, write_photos  # noqa: E402
from serving import REPO, Served, free_port, measure  # noqa: E402

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _stat_fields(path: Path) -> list[str] | None:
    try:
        text = path.read_text()
    except OSError:  # gone between listing and reading
        return None
    # comm may hold spaces and parentheses: split after the last ')'.
    name = text[text.index("(") + 1:text.rindex(")")]
    return [name] + text[text.rindex(")") + 2:].split()


def cpu_by_thread(group: int) -> dict[str, float]:
    """CPU seconds of every thread of every process in the process group, keyed 'process/thread'."""
    out: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        fields = _stat_fields(proc / "stat")
        if fields is None or int(fields[4]) != group:  # fields[4]: pgrp
            continue
        leader = int(proc.name) == group
        for task in (proc / "task").iterdir():
            t = _stat_fields(task / "stat")
            if t is not None:
                # The server's main thread runs its event loop; its other threads are pools.
                if leader:
                    key = "server: event loop thread" if task.name == proc.name else "server: other threads"
                else:
                    key = "child processes"
                out[key] = out.get(key, 0.0) + (int(t[12]) + int(t[13])) * TICK_S  # utime, stime
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--config", type=Path, action="append",
                        help="a Cronnx config to measure (repeatable); default config/cronnx.yaml")
    parser.add_argument("--no-peer", action="store_true", help="leave out the plain aiohttp peer")
    args = parser.parse_args()
    write_photos(DEFAULT_OUT)
    photos = sorted(DEFAULT_OUT.glob("*-1600.jpg"))
    py = sys.executable
    results: dict[str, list[tuple[float, dict[str, float]]]] = {}
    for round_no in range(1, args.rounds + 1):
        print(f"round {round_no} of {args.rounds}", flush=True)
        for name, command, ready, model in servers(py, args.config or [REPO / "config" / "cronnx.yaml"], args.no_peer):
            port = free_port()
            command = [part.replace("{port}", str(port)) for part in command]
            with Served(name, command, f"http://127.0.0.1:{port}", ready) as served:
                url = f"http://127.0.0.1:{port}/predict/{model}"
                measure(url, model, "raw", 1.0, 0.0, photos, concurrency=args.concurrency)  # warm
                before = cpu_by_thread(served.process.pid)
                r = measure(url, model, "raw", args.seconds, args.warmup, photos, concurrency=args.concurrency)
                after = cpu_by_thread(served.process.pid)
            # `cronnx bench` counts requests in its window only; warm-up CPU is in the delta too,
            # so the per-request figure uses every request answered between the two readings.
            answered = r["ok"] * (args.seconds + args.warmup) / args.seconds
            per_request = {k: (after[k] - before.get(k, 0.0)) * 1000 / answered for k in after}
            results.setdefault(name, []).append((r["requests_per_s"], per_request))
    for name, runs in results.items():
        print(f"\n{name}: {statistics.median(r for r, _ in runs):.1f} req/s (median of {len(runs)})")
        keys = sorted({k for _, per in runs for k in per})
        total = [sum(per.values()) for _, per in runs]
        for k in keys:
            print(f"  {k:40s} {statistics.median(per.get(k, 0.0) for _, per in runs):6.2f} core-ms/request")
        print(f"  {'total':40s} {statistics.median(total):6.2f} core-ms/request")


def servers(py: str, configs: list[Path], no_peer: bool):
    for config in configs:
        yield (f"cronnx {config}", [py, "-m", "cronnx", "serve", "--config", str(config), "--port", "{port}"],
               "/ready", "mobilenetv2")
    if not no_peer:
        yield ("plain aiohttp", [py, "bench/peers/plain_aiohttp.py", "--port", "{port}"], "/health", "mobilenetv2")


if __name__ == "__main__":
    main()
