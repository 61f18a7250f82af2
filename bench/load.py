"""A closed-loop HTTP load client: N coroutines, each sends its next request when the last answers.

The client shares the machine with the server, so it is kept light: photos are read once,
JSON bodies are base64-encoded once per photo, and one ClientSession is reused.

    python bench/load.py --url http://127.0.0.1:3000/predict/mobilenetv2 --concurrency 32 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import DEFAULT_OUT, read_photos  # noqa: E402

DEFAULT_URL = "http://127.0.0.1:3000/predict/mobilenetv2"


def request_bodies(photos: list[tuple[str, bytes]], mode: str) -> tuple[list[bytes], str]:
    """The request bodies, encoded once here so the load loop does no per-request work."""
    if mode == "raw":
        return [data for _, data in photos], "image/jpeg"
    return [json.dumps({"image": base64.b64encode(data).decode()}).encode() for _, data in photos], "application/json"


class Recorder:
    """What finished inside the measuring window [start, end)."""

    def __init__(self, start: float, end: float):
        self.start, self.end = start, end
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()

    def record(self, sent: float, done: float, status: str, batch_size: int | None) -> None:
        # Completions are counted in the window whenever they were sent: throughput is the
        # completion rate, and requests cut by the window's edges balance out.
        if not self.start <= done < self.end:
            return
        self.statuses[status] += 1
        if status == "200":
            self.latencies.append(done - sent)
            if batch_size is not None:
                self.batch_sizes[batch_size] += 1

    def summary(self) -> dict:
        seconds = self.end - self.start
        ok = len(self.latencies)
        latencies_ms = np.array(self.latencies) * 1000.0
        # No successful request has no latency: null in the JSON rather than a non-standard NaN.
        percentile = (lambda q: float(np.percentile(latencies_ms, q))) if ok else (lambda q: None)
        return {
            "seconds": seconds,
            "requests": sum(self.statuses.values()),
            "ok": ok,
            "throughput": ok / seconds,
            "p50_ms": percentile(50),
            "p90_ms": percentile(90),
            "p99_ms": percentile(99),
            "errors": {s: n for s, n in sorted(self.statuses.items()) if s != "200"},
            "batch_sizes": {str(b): n for b, n in sorted(self.batch_sizes.items())},
        }


async def client(session: aiohttp.ClientSession, url: str, bodies: list[bytes], headers: dict,
                 first: int, step: int, stop_at: float, recorder: Recorder) -> None:
    i = first
    while (sent := time.perf_counter()) < stop_at:
        body = bodies[i % len(bodies)]
        i += step  # clients walk the photos interleaved, so all photos are sent
        batch_size = None
        try:
            async with session.post(url, data=body, headers=headers) as response:
                reply = await response.read()
                status = str(response.status)
                if response.status == 200:
                    batch_size = json.loads(reply).get("batch_size")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            status = type(exc).__name__
            await asyncio.sleep(0.01)  # a refused connection must not become a busy loop
        recorder.record(sent, time.perf_counter(), status, batch_size)


async def run_load(url: str, bodies: list[bytes], content_type: str, concurrency: int,
                   seconds: float, warmup: float, timeout_s: float = 30.0) -> dict:
    headers = {"Content-Type": content_type}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter() + warmup
        recorder = Recorder(start, start + seconds)
        await asyncio.gather(*(client(session, url, bodies, headers, k, concurrency, recorder.end, recorder)
                               for k in range(concurrency)))
    return {"url": url, "concurrency": concurrency, "warmup": warmup, **recorder.summary()}


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_summary(result: dict) -> str:
    errors = ", ".join(f"{s}: {n}" for s, n in result["errors"].items()) or "none"
    batches = ", ".join(f"{b}: {n}" for b, n in result["batch_sizes"].items()) or "-"
    return (f"concurrency {result['concurrency']}, {result['mode']}: {result['throughput']:.1f} req/s, "
            f"p50 {ms(result['p50_ms'])} ms, p90 {ms(result['p90_ms'])} ms, p99 {ms(result['p99_ms'])} ms; "
            f"{result['ok']} ok, errors {errors}; batch sizes {batches}")


def measure(url: str, photos_dir: Path, pattern: str, concurrency: int, seconds: float,
            warmup: float, mode: str) -> dict:
    bodies, content_type = request_bodies(read_photos(photos_dir, pattern), mode)
    result = asyncio.run(run_load(url, bodies, content_type, concurrency, seconds, warmup))
    return {**result, "mode": mode, "photos": len(bodies), "pattern": pattern}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--photos", type=Path, default=DEFAULT_OUT, help="folder of photos (bench/photos.py)")
    parser.add_argument("--glob", default="*.jpg", help="which photos: '*-1600.jpg' large ones only (default all)")
    parser.add_argument("--concurrency", type=int, default=1, help="clients, each with one request in flight")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring window")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the window opens")
    parser.add_argument("--mode", choices=["raw", "json"], default="raw",
                        help="raw: JPEG bytes as image/jpeg; json: {\"image\": base64}")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    result = measure(args.url, args.photos, args.glob, args.concurrency, args.seconds, args.warmup, args.mode)
    print(format_summary(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
