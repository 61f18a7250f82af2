"""What tracing costs: the same server three times in one run, tracing off, configured with a
sampling ratio of 0 (an endpoint set, nothing sampled), and at ratio 1 (every request traced and
exported over OTLP/HTTP to a receiver in this process), at 32 clients and at 1 client.

    python bench/tracing.py [--seconds 6] [--rounds 5] [--config config/cronnx.yaml] [--model mobilenetv2]

First it measures, in this process, the CPU a traced request's spans cost where they are made
(`Tracing.request`, `RequestTrace.finish` with six phases and `Tracing.batch`: the event loop's
share) and what the exporter's OTLP encoding of those 8 spans costs (its thread's share).

The three servers stay up (an idle one costs nothing) and the load alternates between them in
short windows, round after round, in a rotating order: each round's ratio to "off" is taken
between windows seconds apart, and the median over rounds is reported (the machine's speed drifts
more than the differences measured). The receiver decodes every export (and counts its spans), as
a collector would, on the same cores: its cost is part of "ratio 1".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from otlp_receiver import OtlpReceiver  # noqa: E402
from photos import DEFAULT_OUT, write_photos  # noqa: E402
from serving import REPO, Served, free_port, measure  # noqa: E402

LOADS = (32, 1)


def configurations(endpoint: str) -> dict[str, dict[str, str]]:
    """The environment of each server."""
    traced = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    return {"off": {},
            "ratio 0": {**traced, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
            "ratio 1": {**traced, "OTEL_TRACES_SAMPLER": "parentbased_always_on"}}


def cost_per_request(requests: int = 2000) -> tuple[float, float]:
    """Microseconds of CPU per traced request: making its 8 spans, and encoding them as OTLP."""
    os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_BSP_SCHEDULE_DELAY": "1000000000",
                       "OTEL_BSP_MAX_QUEUE_SIZE": str(10 * requests),
                       # Nothing leaves while measuring: the exporting thread never wakes.
                       "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": str(10 * requests)})
    sys.path.insert(0, str(REPO))
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from cronnx.config import TracingConfig
    from cronnx.observability.trace_context import TraceContext
    from cronnx.observability.tracing import Tracing
    tracing = Tracing(TracingConfig(), "bench")
    headers = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    phases = {"read": 5e-4, "admission": 1e-5, "preprocess": 9e-3, "queue": 1e-3, "inference": 6e-3, "respond": 2e-4}
    started = time.process_time()
    for _ in range(requests):
        trace = tracing.request("POST /predict/{model}", headers, time.time_ns(), {
            "http.request.method": "POST", "http.route": "/predict/{model}", "url.path": "/predict/m",
            "url.scheme": "http", "cronnx.api": "predict", "cronnx.request_id": "0" * 32})
        batch = TraceContext.new()
        tracing.batch(batch, [trace.context], time.monotonic(), 6e-3, {
            "cronnx.model": "m", "cronnx.version": "1", "cronnx.worker": "m:v1#0", "cronnx.batch.size": 1,
            "cronnx.batch.rows": 1, "cronnx.batch.padded_rows": 0, "cronnx.providers": ["CPUExecutionProvider"]})
        trace.finish(200, {"cronnx.model": "m", "cronnx.version": "1", "cronnx.batch_size": 1}, phases, 0.017,
                     [batch])
    making = (time.process_time() - started) / requests
    queue = tracing._processor._batch_processor._queue
    spans = [queue.pop() for _ in range(len(queue))]
    assert len(spans) == 8 * requests, len(spans)
    started = time.process_time()
    for first in range(0, len(spans), 512):
        encode_spans(spans[first:first + 512]).SerializePartialToString()
    encoding = (time.process_time() - started) / requests
    return making * 1e6, encoding * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="each window")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "cronnx.yaml")
    parser.add_argument("--model", default="mobilenetv2")
    args = parser.parse_args()
    making_us, encoding_us = cost_per_request()
    print(f"CPU per traced request: {making_us:.0f} us making its 8 spans (event loop), {encoding_us:.0f} us "
          "encoding them as OTLP (exporting thread)", flush=True)
    for variable in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_MAX_QUEUE_SIZE",
                     "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"):
        os.environ.pop(variable)  # the servers get only their own configuration's
    photos = write_photos(DEFAULT_OUT)
    receiver = OtlpReceiver(keep_spans=False)
    receiver.start()
    rates: dict[tuple[str, int], list[float]] = {}
    p50s: dict[tuple[str, int], list[float]] = {}
    servers = {}
    try:
        for name, env in configurations(receiver.url).items():
            port = free_port()
            command = [sys.executable, "-m", "cronnx", "serve", "--config", str(args.config.resolve()),
                       "--port", str(port), "--log-level", "warning"]
            servers[name] = Served(f"cronnx ({name})", command, f"http://127.0.0.1:{port}", "/ready", env=env)
            servers[name].__enter__()
        names = list(servers)
        for number in range(args.rounds):
            order = names[number % len(names):] + names[:number % len(names)]
            for load in LOADS:
                for name in order:
                    result = measure(f"{servers[name].base_url}/predict/{args.model}", args.model, "raw",
                                     args.seconds, 1.0, photos, concurrency=load, quiet=True)
                    rates.setdefault((name, load), []).append(result["requests_per_s"])
                    p50s.setdefault((name, load), []).append(result["latency_ms"]["p50"])
            print(f"round {number + 1}: " + ", ".join(
                f"{name} {rates[(name, 32)][-1]:.1f} req/s" for name in names), flush=True)
    finally:
        for served in servers.values():
            served.__exit__()
        receiver.stop()
    report(rates, p50s, receiver.exports, receiver.span_count)


def report(rates, p50s, exports: int, spans: int) -> None:
    print("\n| configuration | clients | req/s (median) | / off (median of rounds) | p50 ms | p50 - off, ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for load in LOADS:
        for name in ("off", "ratio 0", "ratio 1"):
            ratios = [r / off for r, off in zip(rates[(name, load)], rates[("off", load)])]
            deltas = [p - off for p, off in zip(p50s[(name, load)], p50s[("off", load)])]
            print(f"| {name} | {load} | {statistics.median(rates[(name, load)]):.1f} | {statistics.median(ratios):.3f} "
                  f"| {statistics.median(p50s[(name, load)]):.2f} | {statistics.median(deltas):+.2f} |")
    print(f"\nthe receiver got {spans} spans in {exports} exports")


if __name__ == "__main__":
    main()
