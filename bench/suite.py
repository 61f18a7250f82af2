"""The benchmark suite: the limit, Cronnx and its peers, side by side in one run, one table.

For the demo MobileNetV2 and the demo ResNet-50 (built the same way) in turn:

1. the in-process limit (bench/limit.py): decode + preprocess + onnxruntime, best layout;
2. `cronnx serve` (default config) driven by `cronnx bench`: closed loop at 1, 8, 32 and 64
   clients, then open loop at 50%, 80% and 95% of the closed-loop peak;
3. the peers, same model, same preprocessing code, same photos, same client: a plain aiohttp
   server with onnxruntime in run_in_executor (bench/peers/plain_aiohttp.py) and LitServe with
   its batching (bench/peers/litserve_server.py, needs `pip install '.[bench]'`), each at 32
   clients; LitServe takes JSON, so Cronnx is measured with JSON bodies at 32 clients as well.
   BentoML, Ray Serve and MLServer run from environments of their own when those exist
   (bench/README.md says how to make them), and are skipped otherwise. One more row, not a
   peer configured like Cronnx: the plain aiohttp server with a tutorial's preprocessing
   (full-size decode), what a user's own server would most likely do.

    python bench/suite.py [--seconds 10] [--warmup 2] [--rounds 3] [--models mobilenetv2,resnet50] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import msgspec
import msgspec.yaml

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent / "peers")]
import limit  # noqa: E402
from mlserver_peer import request_body  # noqa: E402
from photos import DEFAULT_OUT, write_photos  # noqa: E402
from serving import BENCH, REPO, Served, free_port, measure  # noqa: E402

from cronnx.config import load_config  # noqa: E402

PHOTOS = "*-1600.jpg"
BENTOML_VENV = "/tmp/bentovenv"
RAY_VENV = "/tmp/rayvenv"
MLSERVER_VENV = "/tmp/mlsvenv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--models", default="mobilenetv2,resnet50", help="demo models to run, in turn")
    parser.add_argument("--rounds", type=int, default=3, help="the whole comparison, repeated")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    write_photos(DEFAULT_OUT)
    results: dict[str, list] = {}
    # The machine's speed drifts: the whole comparison is repeated, and compared within each round.
    for round_no in range(1, args.rounds + 1):
        for name in args.models.split(","):
            print(f"round {round_no} of {args.rounds}: {name}", flush=True)
            results.setdefault(name, []).append(run_model(name, args))
    for name, rounds in results.items():
        print(f"\n{name}\n")
        print(table(rounds))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({name: [{"limit": lim, "rows": rows} for lim, rows in rounds]
                                         for name, rounds in results.items()}, indent=2) + "\n")


def demo_config(name: str, model: Path, folder: Path) -> Path:
    """The default config with its model swapped for another demo model."""
    config = load_config(REPO / "config" / "cronnx.yaml")
    entry = msgspec.structs.replace(config.models[0], name=name, path=str(model), demo=False)
    path = folder / f"{name}.yaml"
    path.write_bytes(msgspec.yaml.encode(msgspec.structs.replace(config, models=[entry])))
    return path


def run_model(name: str, args) -> tuple[dict, list[tuple[str, dict]]]:
    py = sys.executable
    model = limit.ensure_model(REPO / "models" / f"{name}-demo.onnx")
    rows: list[tuple[str, dict]] = []  # label, `cronnx bench` result
    lim = limit.measure(DEFAULT_OUT, PHOTOS, args.seconds, model=model)
    photos = sorted(DEFAULT_OUT.glob(PHOTOS))
    run = lambda url, mode, **load: measure(url, name, mode, args.seconds, args.warmup, photos, **load)  # noqa: E731

    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        command = [py, "-m", "cronnx", "serve", "--config", str(demo_config(name, model, Path(folder))),
                   "--port", str(port)]
        with Served("cronnx", command, f"http://127.0.0.1:{port}", "/ready"):
            url = f"http://127.0.0.1:{port}/predict/{name}"
            closed = {c: run(url, "raw", concurrency=c) for c in (1, 8, 32, 64)}
            peak = max(r["requests_per_s"] for r in closed.values())
            rows += [(f"Cronnx, closed loop, {c} clients (raw)", r) for c, r in closed.items()]
            for share in (0.5, 0.8, 0.95):
                rows.append((f"Cronnx, open loop, {share:.0%} of peak (raw)", run(url, "raw", rate=share * peak)))
            rows.append(("Cronnx, closed loop, 32 clients (JSON)", run(url, "json", concurrency=32)))

    for peer in peers(py, model, name):
        if peer.venv and not Path(peer.venv).exists():
            print(f"  skipped: {peer.label} (no {peer.venv})")
            continue
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        try:
            with Served(peer.label, [part.replace("{port}", str(port)) for part in peer.command], base, peer.ready,
                        env=peer.env):
                rows.append((peer.label, run(base + peer.predict, peer.mode, concurrency=32, encode=peer.encode)))
        except SystemExit as exc:  # one that does not start (LitServe not installed, say) is left out
            print(f"  skipped: {exc}")
    return lim, rows


class Peer(NamedTuple):
    label: str  # its row in the table
    command: list[str]  # "{port}" becomes the port
    ready: str  # answers 200 once the model is loaded
    predict: str
    mode: str  # request bodies: "raw" or "json"
    venv: str | None = None  # its own environment, when it brings its own dependency set (bench/README.md)
    env: dict | None = None
    encode: Callable[[bytes], bytes] | None = None  # a JSON body of its own shape


def peers(py: str, model: Path, name: str) -> list[Peer]:
    plain = [py, str(BENCH / "peers" / "plain_aiohttp.py"), "--port", "{port}", "--model", str(model)]
    return [
        Peer("plain aiohttp + onnxruntime, 32 clients (raw)", plain, "/health", f"/predict/{name}", "raw"),
        # What a user's own server would most likely do: a tutorial's preprocessing (full-size decode).
        Peer("plain aiohttp, tutorial preprocessing, 32 clients (raw)", [*plain, "--textbook"], "/health",
             f"/predict/{name}", "raw"),
        Peer("LitServe batch 4 x 2 workers, 32 clients (JSON)",
             [py, str(BENCH / "peers" / "litserve_server.py"), "--port", "{port}", "--model", str(model)],
             "/health", "/predict", "json"),
        Peer("BentoML batch 4 x 2 workers, 32 clients (JSON)",
             ["bash", str(BENCH / "peers" / "bentoml_server.sh"), "{port}"], "/readyz", "/predict", "json",
             venv=BENTOML_VENV, env={"CRONNX_PEER_MODEL": str(model)}),
        Peer("Ray Serve batch 4 x 2 replicas, 32 clients (raw)",
             [f"{RAY_VENV}/bin/python", str(BENCH / "peers" / "rayserve_app.py"), "--port", "{port}",
              "--model", str(model), "--name", name], "/predict", "/predict", "raw", venv=RAY_VENV),
        Peer("MLServer batch 4 x 2 workers, 32 clients (JSON)",
             [f"{MLSERVER_VENV}/bin/python", str(BENCH / "peers" / "mlserver_peer.py"), "--port", "{port}",
              "--model", str(model), "--name", name], f"/v2/models/{name}/ready", f"/v2/models/{name}/infer",
             "json", venv=MLSERVER_VENV, encode=request_body),
    ]


def table(rounds: list[tuple[dict, list[tuple[str, dict]]]]) -> str:
    """Medians over the rounds; every ratio is taken inside its round, then the median ratio."""
    med = statistics.median
    limits = [lim for lim, _ in rounds]
    best = [lim["full_path_images_per_s"] for lim in limits]
    p50s = [lim["latency"]["p50_ms"] for lim in limits]
    lines = ["| run | img/s | p50 ms | p99 ms | vs limit |", "| --- | ---: | ---: | ---: | ---: |",
             f"| in-process limit (best full path) | {med(best):.1f} | | | 1.00 |",
             f"| in-process, one image at a time | {1000 / med(p50s):.1f} | {med(p50s):.2f} | "
             f"{med([lim['latency']['p99_ms'] for lim in limits]):.2f} | |"]
    per_label: dict[str, list[tuple[dict, float]]] = {}
    for (_, rows), limit_rate in zip(rounds, best):
        for label, r in rows:
            per_label.setdefault(label, []).append((r, limit_rate))

    def rate(label: str) -> list[float]:
        return [r["requests_per_s"] for r, _ in per_label[label]]

    for label, runs in per_label.items():
        lines.append(f"| {label} | {med(rate(label)):.1f} | {med([r['latency_ms']['p50'] for r, _ in runs]):.2f} | "
                     f"{med([r['latency_ms']['p99'] for r, _ in runs]):.2f} | "
                     f"{med([r['requests_per_s'] / b for r, b in runs]):.2f} |")
    lines.append("")
    for label in per_label:
        if not label.startswith("Cronnx"):
            own = rate("Cronnx, closed loop, 32 clients (JSON)" if "(JSON)" in label
                       else "Cronnx, closed loop, 32 clients (raw)")
            ratios = [a / b for a, b in zip(own, rate(label))]
            lines.append(f"Cronnx / {label.split(', 32 clients')[0]}: {med(ratios):.2f}x at 32 clients "
                         f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    tails = [r["latency_ms"]["p99"] / r["latency_ms"]["p50"] for r, _ in per_label["Cronnx, open loop, 80% of peak (raw)"]]
    lines.append(f"Open loop at 80% of peak: p99 / p50 = {med(tails):.2f} (rounds: "
                 f"{', '.join(f'{x:.2f}' for x in tails)}; target <= 3)")
    lines.append(f"Medians of {len(rounds)} round(s).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
