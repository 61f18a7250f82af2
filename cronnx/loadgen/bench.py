"""One `cronnx bench` run: bodies, client processes, server stats, and the summary of it all."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from pathlib import Path

import msgspec

from . import server_stats
from .histogram import LatencyHistogram
from .runner import LoadResult, LoadSpec, run_in_process, run_load
from .transports import SUCCESS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
# A client process using more than this share of a core is itself the bottleneck.
CLIENT_CPU_WARNING = 0.85
PERCENTILES = {"p50": 50, "p90": 90, "p95": 95, "p99": 99, "p99_9": 99.9}


class BenchResult(msgspec.Struct):
    url: str  # what was loaded: an HTTP URL, or gRPC's host:port
    protocol: str  # "predict", "v2" or "grpc"
    loop: str  # "closed" or "open"
    concurrency: int | None
    rate: float | None
    procs: int
    window_s: float
    ok: int
    requests_per_s: float
    images_per_s: float
    latency_ms: dict[str, float | None]
    errors_by_status: dict[str, int]
    errors_by_exception: dict[str, int]
    late_sends: int
    sent: int
    client_cpu_per_process: list[float]
    server: server_stats.ServerStats | None
    warnings: list[str]


def image_files(images: list[str], folder: str | None) -> list[Path]:
    paths = [Path(p) for p in images]
    if folder:
        paths += sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError("no images: give --image FILE (repeatable) or --images DIR")
    return paths


def _split(total: int | None, parts: int) -> list[int | None]:
    if total is None:
        return [None] * parts
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run(spec: LoadSpec, procs: int, model: str, http_url: str | None = None) -> BenchResult:
    """Run the load; the server's metrics are read when the measuring window opens and after it,
    from the server's HTTP side (`http_url`, any URL of it; by default the spec's URL)."""
    # Client processes need about a second to spawn and import before they can start together.
    start_at = time.monotonic() + (3.0 if procs > 1 else 0.1)
    spec = msgspec.structs.replace(spec, start_at=start_at)
    outcome: list = []
    runner = threading.Thread(target=lambda: outcome.append(_run_clients(spec, procs)), daemon=True)
    runner.start()
    metrics_url = server_stats.metrics_url(http_url or spec.url)
    time.sleep(max(0.0, start_at + spec.warmup_s - time.monotonic()))
    before = server_stats.scrape(metrics_url)
    runner.join()
    after = server_stats.scrape(metrics_url)
    if not outcome:
        raise RuntimeError("the load clients failed; see the error above")
    result = summarize(spec, outcome[0], server_stats.difference(before, after, model))
    capacity = server_stats.capacity(http_url or spec.url, model)
    if capacity is not None and spec.concurrency is not None:
        result.warnings.extend(server_stats.capacity_warnings(spec.concurrency, *capacity))
    return result


def _run_clients(spec: LoadSpec, procs: int) -> list[LoadResult]:
    if spec.concurrency is not None:
        procs = min(procs, spec.concurrency)  # every process needs at least one client
    if procs == 1:
        return [asyncio.run(run_load(spec))]
    concurrencies = _split(spec.concurrency, procs)
    requests = _split(spec.requests, procs)
    specs = [msgspec.structs.replace(
        spec, concurrency=concurrencies[i], requests=requests[i], rate=spec.rate / procs if spec.rate else None,
        seed=spec.seed + i, progress=spec.progress and i == 0) for i in range(procs)]
    with multiprocessing.get_context("spawn").Pool(len(specs)) as pool:
        encoded = pool.map(run_in_process, [msgspec.msgpack.encode(s) for s in specs])
    return [msgspec.msgpack.decode(e, type=LoadResult) for e in encoded]


def summarize(spec: LoadSpec, results: list[LoadResult], server) -> BenchResult:
    histogram = LatencyHistogram()
    statuses: dict[str, int] = {}
    exceptions: dict[str, int] = {}
    for r in results:
        histogram.merge(r.histogram())
        for k, v in r.statuses.items():
            statuses[k] = statuses.get(k, 0) + v
        for k, v in r.exceptions.items():
            exceptions[k] = exceptions.get(k, 0) + v
    window = max(r.window_s for r in results)
    ok = sum(r.ok for r in results)
    latency = {name: _ms(histogram.percentile(q)) for name, q in PERCENTILES.items()}
    latency["max"] = _ms(histogram.max_s if ok else None)
    latency["mean"] = _ms(histogram.mean())
    cpu = [r.cpu_s / r.window_s for r in results]
    warnings = [f"client process {i} used {c:.0%} of a core: the client may be the bottleneck; use --procs"
                for i, c in enumerate(cpu) if c > CLIENT_CPU_WARNING]
    warnings += sorted({r.stopped_early for r in results if r.stopped_early})
    late = sum(r.late for r in results)
    sent = sum(r.sent for r in results)
    if spec.rate and late > 0.01 * sent:
        warnings.append(f"{late} of {sent} sends were more than 2 ms late: the client could not keep the rate")
    return BenchResult(
        url=spec.url, protocol=spec.protocol, loop="open" if spec.rate else "closed", concurrency=spec.concurrency,
        rate=spec.rate, procs=len(results), window_s=window, ok=ok, requests_per_s=ok / window, images_per_s=ok / window,
        latency_ms=latency, errors_by_status={k: v for k, v in statuses.items() if k not in SUCCESS},
        errors_by_exception=exceptions, late_sends=late, sent=sent, client_cpu_per_process=cpu,
        server=server, warnings=warnings)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0
