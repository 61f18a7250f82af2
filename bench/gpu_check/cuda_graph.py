"""CUDA graphs per bucket (CUDA only): a session with the CUDA EP option enable_cuda_graph "1", its
input and output bound once to device buffers, against the same procedure without graphs.

Per batch the input is copied in (update_inplace), run (a graph replay once the first runs
captured it) and the output copied back to host, each timed in ms; and a check that a replay reads
the new input: the graph's output for other images equals the plain session's.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cronnx.models.spec import ModelSpec

from .plan import Plan
from .sessions import make_session, median_ms, rate


class DeviceBound:
    """A session whose input and output are bound once to buffers allocated once on `device`, as
    CUDA graphs need (a replay reads and writes the addresses it was captured with). Each batch is
    copied in with update_inplace and the output copied back to host (a new numpy array).

    From onnxruntime's CUDA EP documentation, "Using CUDA Graphs" (onnxruntime.ai/docs/execution-
    providers/CUDA-ExecutionProvider.html): provider option enable_cuda_graph "1"; inputs and outputs
    bound with IO binding to OrtValues on "cuda" whose addresses do not change; new inputs copied
    into the bound OrtValue with update_inplace; the first Run() allocates and captures, later ones
    replay; shapes fixed for the session's life; every node on the CUDA EP; one thread per session.
    """

    def __init__(self, session, spec: ModelSpec, batch: int, device: str = "cuda"):
        self.session = session
        in_type, out_type = np.dtype(spec.input_dtype).type, np.dtype(spec.output_dtype).type
        self.x = ort.OrtValue.ortvalue_from_shape_and_type([batch, *spec.input_item_shape], in_type, device, 0)
        self.y = ort.OrtValue.ortvalue_from_shape_and_type([batch, *spec.output_item_shape], out_type, device, 0)
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input(spec.input_name, self.x)
        self.binding.bind_ortvalue_output(spec.output_name, self.y)

    def step(self, x: np.ndarray) -> tuple[tuple[float, float, float], np.ndarray]:
        """One batch: (seconds to copy in, to run, to copy out), and the output on the host."""
        t0 = time.perf_counter()
        self.x.update_inplace(x)
        t1 = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        t2 = time.perf_counter()
        y = self.y.numpy()
        return (t1 - t0, t2 - t1, time.perf_counter() - t2), y

    def measure(self, x: np.ndarray, batch: int, seconds: float) -> dict:
        """Medians of each phase and of the whole, over the batches of about `seconds` (at least 3)."""
        phases: list[tuple[float, float, float]] = []
        end = time.perf_counter() + seconds
        while len(phases) < 3 or time.perf_counter() < end:
            phases.append(self.step(x)[0])
        copy_in, run, copy_out = (median_ms([p[i] for p in phases]) for i in range(3))
        return {"copy_in_ms": copy_in, "run_ms": run, "copy_out_ms": copy_out,
                **rate(batch, [sum(p) for p in phases])}


def graph_row(plan: Plan, path: Path, spec: ModelSpec, x: np.ndarray, batch: int, plain,
              device: str = "cuda") -> dict:
    """This bucket with CUDA graphs against the same procedure without (on `plain`, the bucket's
    session): input and output on device buffers bound once, each batch copied in, run, copied
    out. `device` "cpu" runs the same procedure on the CPU EP (the suite's check of this code)."""
    graph = DeviceBound(make_session(path, plan.provider, cuda_graph=True), spec, batch, device)
    # The CUDA EP runs regularly first (its arena allocates what the graph will use: no
    # allocation is allowed while capturing), then captures and replays within one Run(): at
    # the 2nd run where min_num_runs_before_cuda_graph_capture_ is 1 (older versions), the 3rd
    # where it is 2 (cuda_execution_provider.h). The graph belongs to the calling thread.
    first_runs_ms = [sum(graph.step(x)[0]) * 1000.0 for _ in range(4)]
    with_graph = graph.measure(x, batch, plan.shape_seconds)
    control = DeviceBound(plain, spec, batch, device)
    for _ in range(3):
        control.step(x)
    without = control.measure(x, batch, plan.shape_seconds)
    # A replay must read what was copied in since the capture: other images (mirrored) through both.
    # (Copies: on the CPU EP numpy() is a view of the bound output, which the next run overwrites.)
    other = np.ascontiguousarray(x[..., ::-1])
    graph_other = graph.step(other)[1].astype(np.float64)
    plain_other = control.step(other)[1].astype(np.float64)
    graph_same = graph.step(x)[1].astype(np.float64)
    row = {"graph": with_graph, "no_graph": without, "first_runs_ms": first_runs_ms,
           "speedup_total": without["ms_per_batch"] / with_graph["ms_per_batch"],
           "speedup_run": without["run_ms"] / with_graph["run_ms"],
           "max_abs_diff_vs_no_graph": float(np.abs(graph_other - plain_other).max()),
           "output_follows_input": bool(np.abs(graph_other - graph_same).max() > 0)}
    print(f"  batch {batch} CUDA graph: {with_graph['ms_per_batch']:.2f} ms per batch (run "
          f"{with_graph['run_ms']:.2f}) against {without['ms_per_batch']:.2f} (run {without['run_ms']:.2f}) "
          f"without; first runs {' / '.join(f'{ms:.0f}' for ms in first_runs_ms)} ms; max |diff| "
          f"{row['max_abs_diff_vs_no_graph']:.3g}", flush=True)
    return row
