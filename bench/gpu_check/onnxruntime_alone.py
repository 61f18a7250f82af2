"""onnxruntime alone, per batch bucket (powers_of_two_up_to(batch size): 1, 2, 4, ... 64 on CUDA).

For each bucket a session that only ever runs that shape, as a Cronnx worker has (same session
options): img/s and ms per batch, the median of timed runs after warm-up (limit.Bench._repeat), with
the input bound from host memory with IO binding (what the worker does) and, on CUDA, already on
the device (an OrtValue on "cuda"); on CUDA also the bucket's CUDA graph row (cuda_graph.py) and
host-memory row (host_memory.py), "n/a on CPU" otherwise. Then one session alternating among the
bucket shapes against the fixed-shape sessions: what a change of input shape costs (why a worker
keeps a session a bucket).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cronnx.models.spec import ModelSpec, inspect_model

from bench.limit import Bench

from .cuda_graph import graph_row
from .failures import guarded
from .host_memory import PinnedSources, host_memory_row
from .plan import NA_CPU, Plan
from .sessions import infer, make_session, median_ms, output_buffer, photo_tensors, rate, tiled


def measure(plan: Plan, photo_paths: list[Path], name: str, sources: PinnedSources) -> dict:
    """One model's rows: a row per bucket, the alternating shapes, and the CUDA-only rows' status."""
    path = plan.model_paths[name]
    spec = inspect_model(str(path))
    photos = photo_tensors(photo_paths, spec)
    rows = []
    for batch in plan.buckets:
        row = _bucket(plan, sources, path, spec, tiled(photos, batch), batch)
        rows.append(row)
        print(f"  {name} batch {batch}: " + ", ".join(
            f"{where} input {row[where]['img_per_s']:.1f} img/s ({row[where]['ms_per_batch']:.2f} ms)"
            for where in ("host", "device") if "img_per_s" in row.get(where, {})), flush=True)
    fixed = {r["batch"]: r["host"]["ms_per_batch"] for r in rows}
    out = {"buckets": rows, "alternating": _alternating(plan, path, spec, photos, fixed)}
    if plan.cuda:
        out["cuda_graph"] = row_status(rows, "cuda_graph")
        out["host_memory"] = {**row_status(rows, "host_memory"), "sources": sources.status()}
    else:
        out["cuda_graph"] = {"status": NA_CPU}
        out["host_memory"] = {"status": NA_CPU}
    return out


def row_status(rows: list[dict], key: str) -> dict:
    """Whether every bucket's `key` row was measured, with the errors of those that were not."""
    errors = [f"batch {r['batch']}: {r[key]['error']}" for r in rows if r.get(key, {}).get("error")]
    status = "measured" if not errors else f"failed in {len(errors)} of {len(rows)} buckets"
    return {"status": status, "errors": errors}


def _bucket(plan: Plan, sources: PinnedSources, path: Path, spec: ModelSpec, x: np.ndarray, batch: int) -> dict:
    """A session that only ever runs this batch size (its sessions go when this returns)."""
    y = output_buffer(spec, batch)
    session = make_session(path, plan.provider)
    binding = session.io_binding()
    row = {"batch": batch,
           "host": rate(batch, Bench._repeat(lambda: infer(session, binding, spec, x, y), plan.shape_seconds))}
    if plan.cuda:
        where = f"batch {batch}"
        row["device"] = guarded(f"{where} device input", lambda: _device_input(plan, session, spec, x, y, batch))
        row["cuda_graph"] = guarded(f"{where} CUDA graph", lambda: graph_row(plan, path, spec, x, batch, session))
        row["host_memory"] = guarded(f"{where} host memory", lambda: host_memory_row(
            plan, sources, session, spec, x, batch, row["host"]))
    return row


def _device_input(plan: Plan, session, spec: ModelSpec, x: np.ndarray, y: np.ndarray, batch: int) -> dict:
    """The bucket's run with its input already on the GPU (no host-to-device copy in the timing)."""
    on_device = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
    bound = session.io_binding()
    bound.bind_ortvalue_input(spec.input_name, on_device)
    bound.bind_output(spec.output_name, "cpu", 0, y.dtype.type, list(y.shape), y.ctypes.data)
    return rate(batch, Bench._repeat(lambda: session.run_with_iobinding(bound), plan.shape_seconds))


def _alternating(plan: Plan, path: Path, spec: ModelSpec, photos: np.ndarray, fixed_ms: dict[int, float]) -> dict:
    """One session running the bucket shapes in turn, each run after a run of another shape:
    ms per batch against `fixed_ms` (the fixed-shape sessions'), and img/s over a whole cycle."""
    if len(plan.buckets) < 2:
        return {"rows": [], "note": "one bucket: nothing to alternate"}
    session = make_session(path, plan.provider)
    binding = session.io_binding()
    io = {b: (tiled(photos, b), output_buffer(spec, b)) for b in plan.buckets}
    for b in plan.buckets * 2:  # every shape seen (and cuDNN's algorithm search done) before timing
        infer(session, binding, spec, *io[b])
    times: dict[int, list[float]] = {b: [] for b in plan.buckets}
    end = time.perf_counter() + plan.shape_seconds * len(plan.buckets)
    cycles = 0
    while cycles < 3 or time.perf_counter() < end:
        for b in plan.buckets:
            began = time.perf_counter()
            infer(session, binding, spec, *io[b])
            times[b].append(time.perf_counter() - began)
        cycles += 1
    rows = [{"batch": b, "ms_alternating": median_ms(times[b]), "ms_fixed": fixed_ms[b],
             "slowdown": median_ms(times[b]) / fixed_ms[b]} for b in plan.buckets]
    images = sum(plan.buckets)
    return {"rows": rows, "cycles": cycles,
            "cycle_img_per_s_alternating": images * 1000.0 / sum(r["ms_alternating"] for r in rows),
            "cycle_img_per_s_fixed": images * 1000.0 / sum(fixed_ms.values())}
