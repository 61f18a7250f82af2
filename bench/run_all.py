"""The whole comparison in one run: in-process limit, then the server under load, side by side.

1. make sure the photos exist (bench/photos.py)
2. measure the in-process limit (bench/limit.py) while nothing else runs
3. start `python -m cronnx serve` on a free port and wait for GET /ready == 200
4. load it with `cronnx bench` at each concurrency, then stop it, whatever happened
5. print a markdown table: served throughput against the in-process full-path limit, and the
   concurrency-1 p50 minus the in-process single-image latency (what serving adds per request)

    python bench/run_all.py [--seconds S] [--config FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

import limit  # noqa: E402
from photos import DEFAULT_OUT, write_photos  # noqa: E402
from serving import Served, free_port, measure  # noqa: E402

def model_name(config: Path) -> str:
    from cronnx.config import ConfigError, load_config
    try:
        return load_config(config).models[0].name
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from None


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table(rounds: list[tuple[dict, list[dict]]], mode: str) -> str:
    """Medians over the rounds; each ratio is taken inside its round, then the median ratio."""
    limits = [lim for lim, _ in rounds]
    best = [lim["full_path_images_per_s"] for lim in limits]
    first = limits[0]
    cores, threads = first["cores"], first["threads"]["threads"]
    rows = [("run", "throughput (img/s)", "p50 (ms)", "p99 (ms)", "vs limit"),
            ("---", "---:", "---:", "---:", "---:")]
    for key, label in [("threads", f"in-process, {threads} threads x session(intra-op 1), batch 1"),
                       ("threads_batch8", f"in-process, {threads} threads x session(intra-op 1), batch 8"),
                       ("pool", f"in-process, session(intra-op {cores}) + {first['pool']['preprocess_threads']} "
                                "preprocessing threads")]:
        rates = [lim[key]["images_per_s"] for lim in limits]
        rows.append((label, _fmt(_median(rates)), "", "",
                     _fmt(_median([r / b for r, b in zip(rates, best)]), 2)))
    single_p50 = _median([lim["latency"]["p50_ms"] for lim in limits])
    rows.append((f"in-process, one image at a time (intra-op {cores})", _fmt(1000.0 / single_p50),
                 _fmt(single_p50, 2), _fmt(_median([lim["latency"]["p99_ms"] for lim in limits]), 2), ""))
    for i, first_run in enumerate(rounds[0][1]):
        runs = [served[i] for _, served in rounds]
        errors = sum(sum(r["errors_by_status"].values()) + sum(r["errors_by_exception"].values()) for r in runs)
        label = f"served, concurrency {first_run['concurrency']} ({mode})"
        rows.append((label + (f", {errors} errors" if errors else ""),
                     _fmt(_median([r["requests_per_s"] for r in runs])),
                     _fmt(_median([r["latency_ms"]["p50"] for r in runs]), 2),
                     _fmt(_median([r["latency_ms"]["p99"] for r in runs]), 2),
                     _fmt(_median([r["requests_per_s"] / b for r, b in zip(runs, best)]), 2)))
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    ones = [(served, lim) for lim, s in rounds for served in s if served["concurrency"] == 1]
    overheads = [served["latency_ms"]["p50"] - lim["latency"]["p50_ms"] for served, lim in ones
                 if served["latency_ms"]["p50"] is not None]
    lines.append("")
    if overheads:
        lines.append(f"Serving overhead at concurrency 1 (served p50 - in-process single-image p50, median of "
                     f"{len(overheads)} rounds): {_median(overheads):+.2f} ms per request.")
    lines.append(f"'vs limit' = throughput / best in-process full path of the same round "
                 f"(median limit {_median(best):.1f} img/s); medians over {len(rounds)} rounds.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "config" / "cronnx.yaml")
    parser.add_argument("--photos", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--glob", default="*.jpg", help="which photos: '*-1600.jpg' large ones only (default all)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring window of each load run")
    parser.add_argument("--limit-seconds", type=float, default=None, help="each in-process measurement (default --seconds)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each window opens")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated client counts")
    parser.add_argument("--mode", choices=["raw", "json"], default="raw")
    parser.add_argument("--rounds", type=int, default=3, help="limit + served runs, alternated")
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args()
    config = args.config.resolve()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    model = model_name(config)  # a bad config fails here, before minutes of measuring

    write_photos(args.photos)

    # SIGTERM would end us without running `finally`, leaving the server running: make it an exit.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rounds = []
    port = free_port()
    photos = sorted(args.photos.glob(args.glob))
    command = [sys.executable, "-m", "cronnx", "serve", "--config", str(config), "--port", str(port)]
    with Served("cronnx", command, f"http://127.0.0.1:{port}", "/ready"):
        url = f"http://127.0.0.1:{port}/predict/{model}"
        print(f"server ready at {url}; its idle workers do not spin")
        # The machine is shared and noisy: alternate limit and served runs, compare within a round.
        for round_no in range(1, args.rounds + 1):
            print(f"round {round_no} of {args.rounds}")
            lim = limit.measure(args.photos, args.glob, args.limit_seconds or args.seconds)
            served = [measure(url, model, args.mode, args.seconds, args.warmup, photos, concurrency=c)
                      for c in concurrencies]
            rounds.append((lim, served))

    print()
    print(table(rounds, args.mode))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rounds": [{"limit": lim, "served": served} for lim, served in rounds],
                                         "config": str(config), "cpu_count": os.cpu_count()}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
