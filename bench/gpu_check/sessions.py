"""onnxruntime sessions made as a Cronnx worker makes them, one run bound to host memory as the
worker binds it, the photos as the model's input, and the rates of timed runs."""

from __future__ import annotations

import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from cronnx.config import CudaConfig, PreprocessConfig
from cronnx.models.spec import ModelSpec
from cronnx.preprocessing.transform import Preprocessor
from cronnx.workers.child import create_session

from .plan import CPU, CUDA


def make_session(path: Path, provider: str, tf32: bool = False, cuda_graph: bool = False):
    """A session as a Cronnx worker makes it (cronnx.workers.child.create_session), intra-op
    threads 1, Cronnx's CUDA options (use_tf32 as given); `cuda_graph`: with the CUDA EP option
    enable_cuda_graph "1" (no effect on the CPU EP). A CUDA session that came up without the CUDA
    EP (a library not found) is an error, not a silent CPU run."""
    cuda_options = CudaConfig(use_tf32=tf32).provider_options(0)
    if cuda_graph:
        cuda_options["enable_cuda_graph"] = "1"
    worker_spec = SimpleNamespace(
        model_path=str(path), providers=[CUDA, CPU] if provider == CUDA else [CPU], inter_op_threads=1,
        allow_spinning=False, cuda_options=cuda_options)
    session = create_session(worker_spec, 1)
    if provider == CUDA and CUDA not in session.get_providers():
        raise RuntimeError(f"the CUDA EP did not load (session providers {session.get_providers()}): "
                           "check LD_LIBRARY_PATH for the CUDA 13 and cuDNN libraries")
    return session


def infer(session, binding, spec: ModelSpec, x: np.ndarray, y: np.ndarray) -> None:
    """One run with IO binding on host memory, bound afresh as a Cronnx worker does each batch."""
    binding.bind_input(spec.input_name, "cpu", 0, x.dtype.type, list(x.shape), x.ctypes.data)
    binding.bind_output(spec.output_name, "cpu", 0, y.dtype.type, list(y.shape), y.ctypes.data)
    session.run_with_iobinding(binding)


def output_buffer(spec: ModelSpec, rows: int) -> np.ndarray:
    return np.empty((rows, *spec.output_item_shape), spec.output_dtype)


def photo_tensors(photo_paths: list[Path], spec: ModelSpec) -> np.ndarray:
    """The photos through Cronnx's preprocessing (default PreprocessConfig): [photos, C, H, W]."""
    preprocess = Preprocessor(PreprocessConfig(), spec)
    out = np.empty((len(photo_paths), *spec.input_item_shape), spec.input_dtype)
    for i, path in enumerate(photo_paths):
        preprocess(path.read_bytes(), out[i])
    return out


def tiled(tensors: np.ndarray, rows: int) -> np.ndarray:
    """`rows` items: the photos' tensors repeated in order."""
    return np.ascontiguousarray(np.resize(tensors, (rows, *tensors.shape[1:])))


def softmax(scores: np.ndarray, probabilities: bool) -> np.ndarray:
    """Rows of class probabilities in float64 (the model's own, or the softmax of its logits)."""
    scores = scores.reshape(len(scores), -1).astype(np.float64)
    if probabilities:
        return scores
    exp = np.exp(scores - scores.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def median_ms(times: list[float]) -> float:
    """The median of durations in seconds, in milliseconds."""
    return statistics.median(times) * 1000.0


def rate(batch: int, times: list[float]) -> dict:
    """ms per batch and images/s from the median of the timed runs (seconds each)."""
    ms = median_ms(times)
    return {"ms_per_batch": ms, "img_per_s": batch * 1000.0 / ms, "runs": len(times)}
