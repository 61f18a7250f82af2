"""The in-process limit: what this machine can do with no server, no IPC and no HTTP.

Same preprocessing as the server (cronnx.preprocessing.transform.Preprocessor, default
PreprocessConfig, 224 x 224) and the same demo model. Measures:

  infer      onnxruntime alone on ready tensors, batch 1/2/4/8, intra-op threads = cores
  threads    full path (decode + preprocess + infer), T threads each with its own session
             of one intra-op thread, at batch 1 and 8 (each thread preprocesses a batch, then
             runs it): no hand-offs at all, the ideal for a CPU server
  pool       full path, one session with intra-op threads = cores fed by a preprocessing
             thread pool: the shape of a single-process server with run_in_executor
  latency    one image at a time on one thread, session intra-op threads = cores

Throughputs: for threads, each thread's batch over its median step time, summed; for the pool,
the median over equal intervals of the measuring window. Latencies are medians.

    python bench/limit.py [--photos DIR] [--seconds S] [--model FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]  # run from anywhere without installing cronnx

from cronnx.config import PreprocessConfig  # noqa: E402
from cronnx.models.spec import inspect_model  # noqa: E402
from cronnx.preprocessing.transform import Preprocessor, pil_build  # noqa: E402

from photos import DEFAULT_OUT, read_photos  # noqa: E402

MODEL = REPO / "models" / "mobilenetv2-demo.onnx"
RESNET50 = REPO / "models" / "resnet50-demo.onnx"
SIZE = 224
BATCH_SIZES = (1, 2, 4, 8)
INTERVALS = 5  # the window is cut into this many pieces; the median piece is reported
WARMUP_RUNS = 3


def ensure_model(path: Path = MODEL) -> Path:
    """The demo model at `path` (models/<arch>-demo.onnx), built when missing."""
    if not path.exists():
        from cronnx.models.demo import write_demo_model
        print(f"building the demo model at {path}", file=sys.stderr)
        write_demo_model(path, path.name.split("-")[0])
    return path


def make_session(path: Path, intra_threads: int, spinning: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_threads
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def median_rate(done_at: list[float], start: float, end: float) -> float:
    """Events per second: the median over INTERVALS equal pieces of [start, end)."""
    width = (end - start) / INTERVALS
    counts = [0] * INTERVALS
    for t in done_at:
        if start <= t < end:
            counts[min(int((t - start) / width), INTERVALS - 1)] += 1
    return statistics.median(counts) / width


class Bench:
    def __init__(self, photos: list[tuple[str, bytes]], model: Path, seconds: float, spinning: bool):
        self.photos = [data for _, data in photos]
        self.model = model
        self.seconds = seconds
        self.spinning = spinning
        self.cores = os.cpu_count() or 1
        self.preprocess = Preprocessor(PreprocessConfig(), inspect_model(str(model)))

    def new_buffer(self, batch: int = 1) -> np.ndarray:
        return np.empty((batch, 3, SIZE, SIZE), np.float32)

    def infer_only(self) -> dict[str, float]:
        """onnxruntime alone: images/s per batch size, from the median run time."""
        session = make_session(self.model, self.cores, self.spinning)
        name = session.get_inputs()[0].name
        tensors = self.new_buffer(len(self.photos))
        for i, data in enumerate(self.photos):
            self.preprocess(data, tensors[i])
        result = {}
        for batch in BATCH_SIZES:
            inputs = np.ascontiguousarray(np.resize(tensors, (batch, 3, SIZE, SIZE)))
            times = self._repeat(lambda: session.run(None, {name: inputs}), self.seconds / len(BATCH_SIZES))
            result[str(batch)] = batch / statistics.median(times)
        return result

    def threads(self, count: int, batch: int = 1) -> float:
        """Full path, `count` threads each with its own single-threaded session, `batch` images a run."""
        sessions = [make_session(self.model, 1, self.spinning) for _ in range(count)]
        durations: list[list[float]] = [[] for _ in range(count)]
        window: list[float] = []

        def open_window() -> None:  # runs once, when every thread has warmed up
            start = time.perf_counter()
            window[:] = [start, start + self.seconds]

        start_line = threading.Barrier(count, action=open_window)

        def loop(k: int) -> None:
            session, out = sessions[k], self.new_buffer(batch)
            name = session.get_inputs()[0].name

            def step(i: int) -> None:
                for b in range(batch):
                    self.preprocess(self.photos[(i + b * count) % len(self.photos)], out[b])
                session.run(None, {name: out})

            for i in range(WARMUP_RUNS):
                step(k + i)
            start_line.wait()
            i, end, record = k, window[1], durations[k].append
            while (began := time.perf_counter()) < end:
                step(i)
                record(time.perf_counter() - began)
                i += count * batch  # threads walk the photos interleaved, so all photos are used

        workers = [threading.Thread(target=loop, args=(k,)) for k in range(count)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        # Each thread's rate from its median step, summed: counting completed steps per interval
        # would be quantised when a step is long (ResNet-50 at batch 8: 0.7 s a step).
        return sum(batch / statistics.median(d) for d in durations)

    def pool(self, preprocess_threads: int) -> float:
        """Full path, one session with intra-op threads = cores, fed by a preprocessing pool."""
        session = make_session(self.model, self.cores, self.spinning)
        name = session.get_inputs()[0].name
        depth = 2 * preprocess_threads  # enough decoded images queued that inference never waits
        buffers = [self.new_buffer() for _ in range(depth)]
        done_at: list[float] = []
        with ThreadPoolExecutor(preprocess_threads) as executor:
            # Buffer k is refilled only after its image went through the session: no copies.
            pending = deque((k, executor.submit(self.preprocess, self.photos[k % len(self.photos)], buffers[k][0]))
                            for k in range(depth))
            i, start, end = depth, None, None
            while True:
                k, job = pending.popleft()
                job.result()
                session.run(None, {name: buffers[k]})
                now = time.perf_counter()
                if start is None and i >= depth + WARMUP_RUNS:
                    start, end = now, now + self.seconds
                if start is not None:
                    if now >= end:
                        break
                    done_at.append(now)
                pending.append((k, executor.submit(self.preprocess, self.photos[i % len(self.photos)], buffers[k][0])))
                i += 1
            for _, job in pending:
                job.result()
        return median_rate(done_at, start, end)

    def latency(self) -> dict[str, float]:
        """One image at a time: decode + preprocess + infer on one thread, ms."""
        session = make_session(self.model, self.cores, self.spinning)
        name = session.get_inputs()[0].name
        out = self.new_buffer()
        i = 0

        def one() -> None:
            nonlocal i
            self.preprocess(self.photos[i % len(self.photos)], out[0])
            session.run(None, {name: out})
            i += 1

        times = np.array(self._repeat(one, self.seconds)) * 1000.0
        return {"p50_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)),
                "p99_ms": float(np.percentile(times, 99)), "runs": len(times)}

    @staticmethod
    def _repeat(fn, seconds: float) -> list[float]:
        """Run `fn` for about `seconds` after a short warm-up; the duration of each run."""
        for _ in range(WARMUP_RUNS):
            fn()
        times = []
        end = time.perf_counter() + seconds
        while (start := time.perf_counter()) < end:
            fn()
            times.append(time.perf_counter() - start)
        return times


def measure(photos_dir: Path, pattern: str, seconds: float, threads: int | None = None,
            spinning: bool = True, log=print, model: Path = MODEL) -> dict:
    photos = read_photos(photos_dir, pattern)
    bench = Bench(photos, ensure_model(model), seconds, spinning)
    threads = threads or bench.cores
    log(f"in-process limit: {len(photos)} photos ({pattern}), {bench.cores} cores, onnxruntime {ort.__version__}, "
        f"{pil_build()}, {seconds:g} s per measurement, spinning {'on' if spinning else 'off'}")
    result: dict = {"cores": bench.cores, "photos": len(photos), "pattern": pattern, "seconds": seconds,
                    "onnxruntime": ort.__version__, "pil": pil_build(), "spinning": spinning}
    result["infer_images_per_s"] = bench.infer_only()
    log("  onnxruntime alone, intra-op %d: %s" % (bench.cores, ", ".join(
        f"batch {b}: {r:.1f} img/s" for b, r in result["infer_images_per_s"].items())))
    result["threads"] = {"threads": threads, "images_per_s": bench.threads(threads)}
    log(f"  full path, {threads} threads x session(intra-op 1): {result['threads']['images_per_s']:.1f} img/s")
    result["threads_batch8"] = {"threads": threads, "batch": 8, "images_per_s": bench.threads(threads, 8)}
    log(f"  full path, {threads} threads x session(intra-op 1), batch 8: "
        f"{result['threads_batch8']['images_per_s']:.1f} img/s")
    result["pool"] = {"preprocess_threads": bench.cores, "images_per_s": bench.pool(bench.cores)}
    log(f"  full path, session(intra-op {bench.cores}) + {bench.cores} preprocessing threads: "
        f"{result['pool']['images_per_s']:.1f} img/s")
    result["full_path_images_per_s"] = max(result[k]["images_per_s"] for k in ("threads", "threads_batch8", "pool"))
    result["latency"] = bench.latency()
    log(f"  single image, 1 thread, intra-op {bench.cores}: p50 {result['latency']['p50_ms']:.2f} ms, "
        f"p90 {result['latency']['p90_ms']:.2f} ms over {result['latency']['runs']} runs")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=DEFAULT_OUT, help="folder of photos (bench/photos.py)")
    parser.add_argument("--glob", default="*.jpg", help="which photos: '*-1600.jpg' large ones only (default all)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each measurement")
    parser.add_argument("--threads", type=int, default=None, help="threads for the 'threads' run (default: cores)")
    parser.add_argument("--no-spinning", action="store_true", help="turn off onnxruntime's spinning idle threads")
    parser.add_argument("--model", type=Path, default=MODEL, help="an .onnx model (models/resnet50-demo.onnx ...)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    result = measure(args.photos, args.glob, args.seconds, args.threads, spinning=not args.no_spinning,
                     model=args.model)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
