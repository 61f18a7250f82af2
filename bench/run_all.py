"""The whole comparison in one run: in-process limit, then the server under load, side by side.

1. make sure the photos exist (bench/photos.py)
2. measure the in-process limit (bench/limit.py) while nothing else runs
3. start `python -m cronnx serve --port 0`, wait for "serving on ..." and GET /ready == 200
4. load it (bench/load.py) at each concurrency, then stop it with SIGTERM, whatever happened
5. print a markdown table: served throughput against the in-process full-path limit, and the
   concurrency-1 p50 minus the in-process single-image latency (what serving adds per request)

    python bench/run_all.py [--seconds S] [--config FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

import limit  # noqa: E402
import load  # noqa: E402
from photos import DEFAULT_OUT, write_photos  # noqa: E402

SERVING = re.compile(r"serving on http://(\S+):(\d+)")
START_TIMEOUT_S = 180.0  # the first start may build the demo model
STOP_TIMEOUT_S = 30.0


class Server:
    """`python -m cronnx serve` as a child process; its output is drained by a thread so it never blocks."""

    def __init__(self, config: Path):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cronnx", "serve", "--config", str(config), "--port", "0"],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: deque[str] = deque(maxlen=200)
        self.address: tuple[str, int] | None = None
        self.announced = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.log.append(line.rstrip())
            if self.address is None and (match := SERVING.search(line)):
                self.address = match.group(1), int(match.group(2))
                self.announced.set()
        self.announced.set()  # the process ended: wake the waiter

    def base_url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def wait_ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        self.announced.wait(START_TIMEOUT_S)
        if self.address is None:
            self.fail("did not log 'serving on http://HOST:PORT'")
        url = self.base_url()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.fail(f"exited with code {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:
                    if response.status == 200:
                        return url
            except (urllib.error.URLError, OSError):
                pass  # 503 while workers load, or not listening yet
            time.sleep(0.1)
        self.fail("/ready did not answer 200 in time")

    def fail(self, why: str):
        tail = "\n".join(list(self.log)[-30:])
        raise SystemExit(f"server {why}; its last output:\n{tail}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"server did not stop {STOP_TIMEOUT_S:g} s after SIGTERM: killing it", file=sys.stderr)
                self.process.kill()
                self.process.wait()
        return self.process.returncode


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


def table(rounds: list[tuple[dict, list[dict]]]) -> str:
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
        errors = sum(sum(r["errors"].values()) for r in runs)
        label = f"served, concurrency {first_run['concurrency']} ({first_run['mode']})"
        rows.append((label + (f", {errors} errors" if errors else ""),
                     _fmt(_median([r["throughput"] for r in runs])), _fmt(_median([r["p50_ms"] for r in runs]), 2),
                     _fmt(_median([r["p99_ms"] for r in runs]), 2),
                     _fmt(_median([r["throughput"] / b for r, b in zip(runs, best)]), 2)))
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    ones = [(served, lim) for lim, s in rounds for served in s if served["concurrency"] == 1]
    overheads = [served["p50_ms"] - lim["latency"]["p50_ms"] for served, lim in ones if served["p50_ms"] is not None]
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
    server = Server(config)
    try:
        url = f"{server.wait_ready()}/predict/{model}"
        print(f"server ready at {url} (pid {server.process.pid}); its idle worker does not spin")
        # The machine is shared and noisy: alternate limit and served runs, compare within a round.
        for round_no in range(1, args.rounds + 1):
            print(f"round {round_no} of {args.rounds}")
            lim = limit.measure(args.photos, args.glob, args.limit_seconds or args.seconds)
            served = []
            for concurrency in concurrencies:
                result = load.measure(url, args.photos, args.glob, concurrency, args.seconds, args.warmup, args.mode)
                print("  " + load.format_summary(result))
                served.append(result)
            rounds.append((lim, served))
    finally:
        code = server.stop()
        print(f"server stopped (exit code {code})")

    print()
    print(table(rounds))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rounds": [{"limit": lim, "served": served} for lim, served in rounds],
                                         "config": str(config), "cpu_count": os.cpu_count()}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
