"""Cronnx against the plain aiohttp peer (or against itself), head to head: throughput and CPU per request.

The machine's speed drifts by 10% and more within minutes, more than the differences worth
measuring here. So every server is started once and stays up (an idle server costs nothing), and
the load alternates between them in short windows, round after round; each round's ratio is
taken between windows seconds apart, and the median of the ratios is reported.

CPU per request says where a server spends what it spends: the user + system time of each of its
processes and threads (its event loop thread, its other threads, its child processes) is read from
/proc around every window and divided by the requests answered in it.

    python bench/head_to_head.py [--seconds 4] [--rounds 10] [--concurrency 32 | --rate R]
        [--config FILE ...] [--tree DIR ...] [--no-peer] [--model mobilenetv2] [--glob '*-1600.jpg']

--config adds a Cronnx server per config (default config/cronnx.yaml); --tree adds one that runs
the code of another checkout (a git worktree of an earlier commit, say) with the first config.
--rate compares latency at a fixed open-loop rate instead of throughput at a fixed concurrency.

CPU efficiency is the CPU that preprocessing alone takes per image (Cronnx's Preprocessor for the
first config's first model, on the same photos, measured before and after the rounds) over a
server's total CPU per request: the share of the cores a server uses that decoding and preprocessing
would need anyway. With a near-free model (bench/near_free_model.py) the rest is the server's own
overhead. It is given twice: with preprocessing measured on one thread of an idle machine, and with
it running on every core at once (one process per core), as it must at a served rate that takes all
the cores; the second is what the CPU-efficiency target calls "cores that preprocessing alone needs
at the served rate".
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import DEFAULT_OUT, write_photos  # noqa: E402
from processes import group_cpu  # noqa: E402
from serving import REPO, Served, free_port, measure  # noqa: E402

sys.path.insert(0, str(REPO))
from cronnx.config import load_config  # noqa: E402
from cronnx.models.spec import inspect_model  # noqa: E402
from cronnx.preprocessing.transform import Preprocessor  # noqa: E402
from cronnx.ipc.cpu import usable_cores  # noqa: E402

def cpu_by_part(group: int) -> dict[str, float]:
    """CPU seconds so far of a server's process group: its event loop (main) thread, its other
    threads, and its child processes."""
    parts = group_cpu(group)
    return {"event loop thread": parts["event loop thread"], "other threads": parts["other threads"],
            "child processes": parts["worker processes"] + parts["other child processes"]}


def preprocess_cpu_ms(config: Path, photos: list[Path], passes: int = 3, seconds: float | None = None,
                      start_at: float | None = None) -> float:
    """CPU milliseconds per image that Cronnx's preprocessing of `photos` takes alone, on this
    thread, for the first model of `config` (relative paths from the repo root): `passes` over the
    photos, or as many as fit in `seconds`, from `start_at` (time.time()) when given."""
    model = load_config(config).models[0]
    path = Path(model.path) if Path(model.path).is_absolute() else REPO / model.path
    preprocess = Preprocessor(model.preprocess, inspect_model(str(path)))
    data = [p.read_bytes() for p in photos]
    out = np.empty((1, *preprocess.spec.input_item_shape), preprocess.spec.input_dtype)
    for image in data:  # warm the caches and the allocator
        preprocess(image, out[0])
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    started, deadline, done = time.thread_time(), time.monotonic() + (seconds or 0.0), 0
    while done < passes * len(data) if seconds is None else time.monotonic() < deadline:
        preprocess(data[done % len(data)], out[0])
        done += 1
    return (time.thread_time() - started) * 1000 / done


def preprocess_cpu_ms_all_cores(config: Path, photos: list[Path], seconds: float = 3.0) -> float:
    """The same with every usable core busy: one process per core, each preprocessing the photos
    for `seconds` at once; the mean of their CPU milliseconds per image. That is what preprocessing
    alone costs at a rate that needs all the cores (shared caches, memory bandwidth, clocks), as a
    server's decoding under full load does."""
    cores = usable_cores()
    # All begin at once, after their start-up and warm-up (a spawned process imports in about a second).
    start_at = time.time() + 4.0
    with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("spawn")) as pool:
        return statistics.mean(pool.map(preprocess_cpu_ms, [config] * cores, [photos] * cores, [3] * cores,
                                        [seconds] * cores, [start_at] * cores))


def servers(py: str, configs: list[Path], trees: list[Path], peer: bool,
            model: str) -> list[tuple[str, list[str], str, Path]]:
    """(label, command with {port}, readiness path, working folder) for each server to compare."""
    out = [(f"cronnx {c}", [py, "-m", "cronnx", "serve", "--config", str(c.resolve()), "--port", "{port}"],
            "/ready", REPO) for c in configs]
    out += [(f"cronnx from {t}", [py, "-m", "cronnx", "serve", "--config", str(configs[0].resolve()),
                                  "--port", "{port}"], "/ready", t) for t in trees]
    if peer:
        out.append(("plain aiohttp", [py, str(REPO / "bench" / "peers" / "plain_aiohttp.py"), "--port", "{port}",
                                      "--model", str(REPO / "models" / f"{model}-demo.onnx")], "/health", REPO))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="each window")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=32, help="closed loop: clients")
    parser.add_argument("--rate", type=float, default=None, help="open loop instead: requests per second")
    parser.add_argument("--config", type=Path, action="append", help="a Cronnx config (repeatable)")
    parser.add_argument("--tree", type=Path, action="append", default=[], help="another checkout to run (repeatable)")
    parser.add_argument("--no-peer", action="store_true", help="leave out the plain aiohttp peer")
    parser.add_argument("--glob", default="*-1600.jpg",
                        help="which photos of bench/photos (web-size ones: '*[!0].jpg')")
    parser.add_argument("--model", default="mobilenetv2",
                        help="the model the configs serve; the peer serves models/MODEL-demo.onnx")
    args = parser.parse_args()
    write_photos(DEFAULT_OUT)
    photos = sorted(DEFAULT_OUT.glob(args.glob))
    configs = args.config or [REPO / "config" / "cronnx.yaml"]
    chosen = servers(sys.executable, configs, args.tree, not args.no_peer, args.model)
    preprocess_ms = [preprocess_cpu_ms(configs[0], photos)]
    preprocess_all_ms = [preprocess_cpu_ms_all_cores(configs[0], photos)]
    rates: dict[str, list[float]] = {label: [] for label, *_ in chosen}
    cpu: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in chosen}
    latency: dict[str, list[tuple[float, float]]] = {label: [] for label, *_ in chosen}  # (p50, p99) ms
    load = {"rate": args.rate} if args.rate else {"concurrency": args.concurrency}
    with contextlib.ExitStack() as stack:
        running = []
        for label, command, ready, folder in chosen:
            port = free_port()
            served = Served(label, [part.replace("{port}", str(port)) for part in command],
                            f"http://127.0.0.1:{port}", ready, cwd=folder)
            running.append((label, stack.enter_context(served), f"http://127.0.0.1:{port}/predict/{args.model}"))
        for label, _, url in running:  # warm each one up once
            measure(url, args.model, "raw", 2.0, 0.0, photos, quiet=True, **load)
        for round_no in range(1, args.rounds + 1):
            for label, served, url in running:
                before = cpu_by_part(served.process.pid)
                r = measure(url, args.model, "raw", args.seconds, 0.5, photos, quiet=True, **load)
                after = cpu_by_part(served.process.pid)
                # The CPU readings span the warm-up too: count its requests at the window's rate.
                answered = r["requests_per_s"] * (args.seconds + 0.5)
                rates[label].append(r["requests_per_s"])
                latency[label].append((r["latency_ms"]["p50"], r["latency_ms"]["p99"]))
                cpu[label].append({part: (after[part] - before[part]) * 1000 / answered for part in after})
            print(f"round {round_no}: " + ", ".join(f"{label} {rates[label][-1]:.1f}" for label in rates) + " req/s",
                  flush=True)
    preprocess_ms.append(preprocess_cpu_ms(configs[0], photos))
    preprocess_all_ms.append(preprocess_cpu_ms_all_cores(configs[0], photos))
    print(report(rates, latency, cpu, statistics.mean(preprocess_ms), statistics.mean(preprocess_all_ms),
                 open_loop=args.rate is not None))


def report(rates: dict[str, list[float]], latency: dict[str, list[tuple[float, float]]],
           cpu: dict[str, list[dict[str, float]]], preprocess_ms: float, preprocess_all_ms: float,
           open_loop: bool = False) -> str:
    """The table of medians, then the first server against each other one, round by round: its
    throughput ratio in closed loop, its p99 ratio at the open loop's fixed rate. CPU efficiency:
    preprocessing's own CPU per image over the total CPU per request, with preprocessing measured
    alone on one thread (`preprocess_ms`) and on all cores at once (`preprocess_all_ms`)."""
    med = statistics.median
    labels = list(rates)
    lines = ["| server | req/s | p50 ms | p99 ms | event loop | other threads | child processes | "
             "total CPU per request | CPU efficiency (one thread / all cores) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label in labels:
        parts = {part: med(c[part] for c in cpu[label]) for part in cpu[label][0]}
        total = med(sum(c.values()) for c in cpu[label])
        lines.append(f"| {label} | {med(rates[label]):.1f} | {med(p50 for p50, _ in latency[label]):.1f} | "
                     f"{med(p99 for _, p99 in latency[label]):.1f} | {parts['event loop thread']:.2f} ms | "
                     f"{parts['other threads']:.2f} ms | {parts['child processes']:.2f} ms | {total:.2f} ms | "
                     f"{preprocess_ms / total:.2f} / {preprocess_all_ms / total:.2f} |")
    lines.append(f"(medians of {len(rates[labels[0]])} rounds; preprocessing alone: {preprocess_ms:.2f} ms CPU "
                 f"per image on one thread, {preprocess_all_ms:.2f} ms with all {usable_cores()} cores busy)")
    lines.append("")
    first = labels[0]
    for label in labels[1:]:
        if open_loop:
            ratios = sorted(a[1] / b[1] for a, b in zip(latency[first], latency[label]))
            what, better = "p99", sum(r < 1 for r in ratios)
        else:
            ratios = sorted(a / b for a, b in zip(rates[first], rates[label]))
            what, better = "throughput", sum(r > 1 for r in ratios)
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        lines.append(f"{what}, {first} / {label}: median {med(ratios):.3f}x, quartiles "
                     f"{quartiles[0]:.3f}-{quartiles[2]:.3f}, better in {better} of {len(ratios)} rounds")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
