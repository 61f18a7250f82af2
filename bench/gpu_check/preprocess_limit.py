"""The preprocessing limit on all cores: Cronnx's preprocessing (cronnx.preprocessing.transform,
default PreprocessConfig) of the photos in N threads of one process, and in N processes;
N = os.cpu_count(). img/s in all, and ms per image per worker with every worker busy."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import numpy as np

from cronnx.config import PreprocessConfig
from cronnx.models.spec import ModelSpec, inspect_model
from cronnx.preprocessing.transform import Preprocessor

from bench.processes import StartedProcesses

from .plan import Plan


def measure(plan: Plan, photo_paths: list[Path], started: StartedProcesses) -> dict:
    """The first model's input shape, decoded for plan.seconds in threads, then in processes."""
    spec = inspect_model(str(plan.model_paths[plan.models[0]]))
    paths = [str(p) for p in photo_paths]
    n = plan.cores
    out = {"workers": n, "model_input": list(spec.input_item_shape)}

    results: list[tuple[int, float]] = []
    start_line = threading.Barrier(n, timeout=120)
    threads = [threading.Thread(target=lambda: results.append(_preprocess_loop(paths, spec, start_line,
                                                                               plan.seconds)))
               for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["threads"] = _rate(results, n)

    context = multiprocessing.get_context("spawn")  # no fork of a process holding onnxruntime's threads
    start_line, queue = context.Barrier(n, timeout=120), context.Queue()
    procs = [context.Process(target=_preprocess_process, args=(paths, spec, start_line, plan.seconds, queue))
             for _ in range(n)]
    try:
        for p in procs:
            p.start()
            started.add([p.pid])
        results = [queue.get(timeout=120 + plan.seconds) for _ in procs]
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    out["processes"] = _rate(results, n)
    for how in ("threads", "processes"):
        print(f"  preprocessing, {n} {how}: {out[how]['img_per_s']:.1f} img/s", flush=True)
    return out


def _preprocess_loop(paths: list[str], spec: ModelSpec, start_line, seconds: float) -> tuple[int, float]:
    """Preprocess the photos round and round for `seconds` after every worker is warm; (images, seconds)."""
    photos = [Path(p).read_bytes() for p in paths]
    preprocess = Preprocessor(PreprocessConfig(), spec)
    out = np.empty(spec.input_item_shape, spec.input_dtype)
    for data in photos:
        preprocess(data, out)
    start_line.wait()
    began = time.perf_counter()
    end, count = began + seconds, 0
    while time.perf_counter() < end:
        preprocess(photos[count % len(photos)], out)
        count += 1
    return count, time.perf_counter() - began


def _preprocess_process(paths, spec, start_line, seconds, results) -> None:
    results.put(_preprocess_loop(paths, spec, start_line, seconds))


def _rate(results: list[tuple[int, float]], workers: int) -> dict:
    if len(results) != workers:
        raise RuntimeError(f"{workers - len(results)} of {workers} preprocessing workers failed")
    total = sum(count / seconds for count, seconds in results)
    return {"img_per_s": total, "ms_per_image_per_worker": workers * 1000.0 / total,
            "images": sum(count for count, _ in results)}
