"""Triton's own load generator, perf_analyzer, against Cronnx over HTTP and gRPC, beside
`cronnx bench` driving the same load the same way: both should report the same throughput and
latency (within 10%), and perf_analyzer reads Cronnx's statistics extension for its "Server:"
breakdown (queue, compute input / infer / output).

perf_analyzer comes from tritonclient 2.41's wheel (later wheels no longer carry it). It needs
Debian's libb64-0d and a CUDA runtime library, which the nvidia-cuda-runtime-cu12 wheel provides
(no GPU is used); `--setup` installs all three (apt needs root) into --tools.

    python bench/perf_analyzer.py --setup --seconds 8

It sends the model's input tensor (`--input-data zero`: its random data holds NaNs, which Cronnx
refuses as the protocol's checks say) with batch 1, synchronous calls, `--concurrency` clients.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from serving import REPO, Served, free_port

TRITONCLIENT = "tritonclient==2.41.0"
CUDA_RUNTIME = "nvidia-cuda-runtime-cu12"


def setup(tools: Path) -> None:
    """perf_analyzer and what it loads, in a venv at `tools`."""
    if subprocess.run(["dpkg", "-s", "libb64-0d"], capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "libb64-0d"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not (tools / "bin" / "perf_analyzer").exists():
        subprocess.run([sys.executable, "-m", "venv", str(tools)], check=True)
        subprocess.run([str(tools / "bin" / "pip"), "install", "-q", "--only-binary", ":all:", TRITONCLIENT,
                        CUDA_RUNTIME], check=True)


def perf_analyzer(tools: Path, model: str, address: str, protocol: str, concurrency: int, seconds: float) -> dict:
    """One perf_analyzer measurement: throughput (inferences/s) and client latency (ms) as it
    reports them, and its server-side averages (us) read from the statistics extension."""
    cudart = next(tools.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "pa.csv"
        done = subprocess.run(
            [str(tools / "bin" / "perf_analyzer"), "-m", model, "-u", address, "-i", protocol,
             "--input-data", "zero", "--concurrency-range", str(concurrency),
             "--measurement-interval", str(int(seconds * 1000)), "--verbose-csv", "-f", str(report)],
            capture_output=True, text=True, timeout=seconds * 20 + 120,
            env={**os.environ, "LD_LIBRARY_PATH": str(cudart)})
        if done.returncode != 0:
            raise SystemExit(f"perf_analyzer -i {protocol} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        (row,) = list(csv.DictReader(report.open()))
    return {"requests_per_s": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1000,
            "p99_ms": float(row["p99 latency"]) / 1000,
            "server_queue_us": float(row.get("Server Queue", 0) or 0),
            "server_compute_infer_us": float(row.get("Server Compute Infer", 0) or 0)}


def cronnx_bench(url: str, grpc_address: str, model: str, protocol: str, concurrency: int, seconds: float) -> dict:
    """`cronnx bench` with the same protocol, load and length."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "bench.json"
        command = [sys.executable, "-m", "cronnx", "bench", url, "--model", model, "--protocol", protocol,
                   "--concurrency", str(concurrency), "--duration", str(seconds), "--warmup", "2",
                   "--json", str(out)]
        if protocol == "grpc":
            command += ["--grpc-url", grpc_address]
        subprocess.run(command, check=True, cwd=REPO, capture_output=True, timeout=seconds * 4 + 120)
        (result,) = json.loads(out.read_text())
    return {"requests_per_s": result["requests_per_s"], "p50_ms": result["latency_ms"]["p50"],
            "p99_ms": result["latency_ms"]["p99"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "cronnx.yaml")
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=8.0, help="each measurement's length")
    parser.add_argument("--tools", type=Path, default=Path(tempfile.gettempdir()) / "cronnx-perf-analyzer")
    parser.add_argument("--setup", action="store_true", help="install perf_analyzer and what it needs first")
    args = parser.parse_args()
    if args.setup:
        setup(args.tools)
    http_port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{http_port}"
    command = [sys.executable, "-m", "cronnx", "serve", "--config", str(args.config.resolve()), "--port",
               str(http_port), "--grpc-port", str(grpc_port), "--log-level", "warning"]
    rows = []
    with Served("cronnx", command, url, "/ready"):
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            for pa_protocol, bench_protocol, address in (("http", "v2", f"127.0.0.1:{http_port}"),
                                                         ("grpc", "grpc", f"127.0.0.1:{grpc_port}")):
                pa = perf_analyzer(args.tools, args.model, address, pa_protocol, concurrency, args.seconds)
                ours = cronnx_bench(url, f"127.0.0.1:{grpc_port}", args.model, bench_protocol, concurrency,
                                    args.seconds)
                rows.append((pa_protocol, concurrency, pa, ours))
                print(f"{pa_protocol} {concurrency} clients: perf_analyzer {pa['requests_per_s']:.1f}/s p50 "
                      f"{pa['p50_ms']:.1f} ms; cronnx bench {ours['requests_per_s']:.1f}/s p50 {ours['p50_ms']:.1f} ms",
                      flush=True)
    print("\n| protocol | clients | perf_analyzer infer/s | cronnx bench req/s | ratio | perf_analyzer p50 ms "
          "| cronnx bench p50 ms | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for protocol, concurrency, pa, ours in rows:
        print(f"| {protocol} | {concurrency} | {pa['requests_per_s']:.1f} | {ours['requests_per_s']:.1f} | "
              f"{ours['requests_per_s'] / pa['requests_per_s']:.3f} | {pa['p50_ms']:.2f} | {ours['p50_ms']:.2f} | "
              f"{ours['p50_ms'] / pa['p50_ms']:.3f} |")


if __name__ == "__main__":
    main()
