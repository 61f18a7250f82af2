"""The benchmark suite: the limit, Cronnx and its peers, side by side in one run, one table.

For the demo MobileNetV2 and the demo ResNet-50 (built the same way) in turn:

1. the in-process limit (bench/limit.py): decode + preprocess + onnxruntime, best layout;
2. `cronnx serve` (default config) driven by `cronnx bench`: closed loop at 1, 8, 32 and 64
   clients, then open loop at 50%, 80% and 95% of the closed-loop peak;
3. the peers, same model, same preprocessing code, same photos, same client: a plain aiohttp
   server with onnxruntime in run_in_executor (bench/peers/plain_aiohttp.py) and LitServe with
   its batching (bench/peers/litserve_server.py, needs `pip install '.[bench]'`), each at 32
   clients; LitServe takes JSON, so Cronnx is measured with JSON bodies at 32 clients as well.

    python bench/suite.py [--seconds 10] [--warmup 2] [--json bench/results/suite.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import msgspec
import msgspec.yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import limit  # noqa: E402
from photos import DEFAULT_OUT, write_photos  # noqa: E402
from serving import BENCH, REPO, Served, free_port, measure  # noqa: E402

from cronnx.config import load_config  # noqa: E402

PHOTOS = "*-1600.jpg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--models", default="mobilenetv2,resnet50", help="demo models to run, in turn")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    write_photos(DEFAULT_OUT)
    results = {}
    for name in args.models.split(","):
        lim, rows = run_model(name, args)
        results[name] = {"limit": lim, "rows": rows}
        print(f"\n{name}\n")
        print(table(lim, rows, lim["full_path_images_per_s"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


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

    port = free_port()
    with Served("plain aiohttp", [py, "bench/peers/plain_aiohttp.py", "--port", str(port), "--model", str(model)],
                f"http://127.0.0.1:{port}", "/health"):
        rows.append(("plain aiohttp + onnxruntime, 32 clients (raw)",
                     run(f"http://127.0.0.1:{port}/predict/{name}", "raw", concurrency=32)))

    port = free_port()
    litserve = BENCH / "peers" / "litserve_server.py"
    try:
        with Served("LitServe", [py, str(litserve), "--port", str(port), "--model", str(model)],
                    f"http://127.0.0.1:{port}", "/health"):
            rows.append(("LitServe batch 4 x 2 workers, 32 clients (JSON)",
                         run(f"http://127.0.0.1:{port}/predict", "json", concurrency=32)))
    except SystemExit as exc:
        print(f"  LitServe skipped: {exc}")
    return lim, rows


def table(lim: dict, rows, best: float) -> str:
    lines = ["| run | img/s | p50 ms | p99 ms | vs limit |", "| --- | ---: | ---: | ---: | ---: |",
             f"| in-process limit (best full path) | {best:.1f} | | | 1.00 |",
             f"| in-process, one image at a time | {1000 / lim['latency']['p50_ms']:.1f} | "
             f"{lim['latency']['p50_ms']:.2f} | {lim['latency']['p99_ms']:.2f} | |"]
    for label, r in rows:
        lines.append(f"| {label} | {r['requests_per_s']:.1f} | {r['latency_ms']['p50']:.2f} | "
                     f"{r['latency_ms']['p99']:.2f} | {r['requests_per_s'] / best:.2f} |")
    by_label = dict(rows)
    raw32 = by_label["Cronnx, closed loop, 32 clients (raw)"]["requests_per_s"]
    json32 = by_label["Cronnx, closed loop, 32 clients (JSON)"]["requests_per_s"]
    lines.append("")
    for label, r in rows:
        if not label.startswith("Cronnx"):
            own = json32 if "(JSON)" in label else raw32
            lines.append(f"Cronnx / {label.split(',')[0]}: {own / r['requests_per_s']:.2f}x at 32 clients")
    open80 = by_label["Cronnx, open loop, 80% of peak (raw)"]["latency_ms"]
    lines.append(f"Open loop at 80% of peak: p99 / p50 = {open80['p99'] / open80['p50']:.2f} (target <= 3)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
