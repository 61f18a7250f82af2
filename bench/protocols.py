"""Every way in, on one server: gRPC's ModelInfer with `raw_input_contents`, V2 infer over HTTP
with the binary tensor data extension, and `/predict` with photos, at 32 clients and at 1 client.

    python bench/protocols.py [--seconds 6] [--rounds 5] [--config config/cronnx.yaml] [--glob '*[!0].jpg']

One `cronnx serve --grpc-port` stays up; the load alternates between the protocols in short
windows, round after round, in a rotating order, each window a `cronnx bench` run in this process
(what `cronnx bench --protocol P` runs). gRPC runs twice at 32 clients: a channel (connection) per
client, as each HTTP client keeps a connection, and one channel that the 32 clients share; at 1
client the two are the same. V2 and gRPC send the model's input tensor (from its metadata, fixed
values); `/predict` sends the photos, so its server decodes and preprocesses each (the others
skip that work). Per window, the server's CPU per request is read from /proc by part (its event
loop thread, its other threads, its workers), and each round's ratios are taken within the round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import urllib.request
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import group_cpu, reap_group  # noqa: E402
from serving import REPO, Served, free_port  # noqa: E402

from cronnx.loadgen import bench as loadgen  # noqa: E402
from cronnx.loadgen import payloads  # noqa: E402
from cronnx.loadgen.runner import LoadSpec  # noqa: E402

LOADS = (32, 1)
RUNS = ("grpc", "grpc shared", "v2", "predict")


def runs_at(load: int) -> list[str]:
    return list(RUNS) if load > 1 else [r for r in RUNS if r != "grpc shared"]


def targets(base_url: str, grpc_url: str, model: str, photos: list[Path]) -> dict[str, payloads.Target]:
    grpc = payloads.grpc_target(grpc_url, model, None)
    return {"grpc": grpc, "grpc shared": grpc, "v2": payloads.v2_target(base_url, model, None),
            "predict": payloads.predict_target(base_url, model, None, photos, "raw")}


def window(run: str, target: payloads.Target, base_url: str, model: str, load: int, seconds: float,
           warmup: float, server_pid: int, workers: list[int]) -> dict:
    protocol = run.split()[0]
    spec = LoadSpec(url=target.url, bodies=target.bodies, content_type=target.headers.get("Content-Type", ""),
                    protocol=protocol, headers=target.headers, grpc_channels=1 if run == "grpc shared" else None,
                    concurrency=load, duration_s=seconds, warmup_s=warmup)
    before = group_cpu(server_pid, workers)
    result = msgspec.to_builtins(loadgen.run(spec, 1, model, http_url=base_url))
    after = group_cpu(server_pid, workers)
    # The server's CPU over the whole window (warm-up included), per request answered in it.
    answered = result["ok"] * (seconds + warmup) / seconds
    result["server_cpu_ms"] = {part: (after[part] - before[part]) * 1000 / max(1.0, answered) for part in after}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="each window")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "cronnx.yaml")
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--glob", default="*[!0].jpg", help="photos of bench/photos for /predict (web size)")
    parser.add_argument("--json", type=Path, default=None, help="every window's result")
    args = parser.parse_args()
    photos = sorted((REPO / "bench" / "photos").glob(args.glob))
    if not photos:
        raise SystemExit(f"no photos match bench/photos/{args.glob}: run bench/photos.py")
    port, grpc_port = free_port(), free_port()
    while grpc_port == port:
        grpc_port = free_port()
    base_url, grpc_url = f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
    command = [sys.executable, "-m", "cronnx", "serve", "--config", str(args.config.resolve()), "--port", str(port),
               "--grpc-port", str(grpc_port), "--log-level", "warning"]
    results: dict[tuple[str, int], list[dict]] = {}
    served = Served("cronnx", command, base_url, "/ready")
    served.__enter__()
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=10) as response:
            listed = msgspec.json.decode(response.read())["models"]
        workers = [w["pid"] for m in listed for w in m["workers"]]
        loads = targets(base_url, grpc_url, args.model, photos)
        for number in range(args.rounds):
            for load in LOADS:
                names = runs_at(load)
                order = names[number % len(names):] + names[:number % len(names)]
                for run in order:
                    result = window(run, loads[run], base_url, args.model, load, args.seconds, args.warmup,
                                    served.process.pid, workers)
                    results.setdefault((run, load), []).append(result)
            print(f"round {number + 1}: " + ", ".join(
                f"{run} {results[(run, 32)][-1]['requests_per_s']:.1f}" for run in runs_at(32)) + " req/s at 32; "
                + ", ".join(f"{run} p50 {results[(run, 1)][-1]['latency_ms']['p50']:.2f}" for run in runs_at(1))
                + " ms at 1", flush=True)
    finally:
        served.__exit__()
        leftovers = reap_group(served.process)
        if leftovers["killed_leftover_pids"] or leftovers["removed_shm"]:
            print(f"after the server: {leftovers}", flush=True)
    if args.json:
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(
            [{"run": run, "clients": load, "rounds": rs} for (run, load), rs in results.items()])))
    report(results, args.rounds)


def report(results: dict[tuple[str, int], list[dict]], rounds: int) -> None:
    def med(run: str, load: int, read) -> float:
        return statistics.median(read(r) for r in results[(run, load)])

    print("\n| protocol | clients | req/s | p50 ms | p99 ms | errors | server CPU per request: event loop, "
          "other threads, workers (ms) | client CPU |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for load in LOADS:
        for run in runs_at(load):
            cpu = [med(run, load, lambda r, part=part: r["server_cpu_ms"][part])
                   for part in ("event loop thread", "other threads", "worker processes")]
            errors = sum(sum(r["errors_by_status"].values()) + sum(r["errors_by_exception"].values())
                         for r in results[(run, load)])
            print(f"| {run} | {load} | {med(run, load, lambda r: r['requests_per_s']):.1f} "
                  f"| {med(run, load, lambda r: r['latency_ms']['p50']):.2f} "
                  f"| {med(run, load, lambda r: r['latency_ms']['p99']):.2f} | {errors} "
                  f"| {cpu[0]:.2f}, {cpu[1]:.2f}, {cpu[2]:.2f} "
                  f"| {med(run, load, lambda r: r['client_cpu_per_process'][0]):.0%} |")
    print()
    for a, b in (("grpc", "v2"), ("grpc shared", "v2"), ("grpc", "grpc shared"), ("grpc", "predict"),
                 ("v2", "predict")):
        ratios = [x["requests_per_s"] / y["requests_per_s"] for x, y in zip(results[(a, 32)], results[(b, 32)])]
        print(f"32 clients, {a} / {b} throughput: median {statistics.median(ratios):.3f} "
              f"(rounds {', '.join(f'{x:.3f}' for x in ratios)}; >= 1 in {sum(x >= 1 for x in ratios)} of {rounds})")
    for a, b in (("grpc", "v2"), ("grpc", "predict"), ("v2", "predict")):
        deltas = [x["latency_ms"]["p50"] - y["latency_ms"]["p50"] for x, y in zip(results[(a, 1)], results[(b, 1)])]
        print(f"1 client, {a} - {b} p50: median {statistics.median(deltas):+.2f} ms "
              f"(rounds {', '.join(f'{x:+.2f}' for x in deltas)}; <= 0 in {sum(x <= 0 for x in deltas)} of {rounds})")


if __name__ == "__main__":
    main()
