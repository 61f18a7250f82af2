"""Pinned against pageable host memory per bucket (CUDA only): the run with its input and output
bound to page-locked host buffers against the host-input row (pageable numpy arrays), and the
host-to-device copy of the input alone from each kind of memory, in ms.

Page-locked memory two ways: onnxruntime's own (an OrtValue from the CUDA EP device's
HOST_ACCESSIBLE memory info, onnxruntime 1.23+), and a shared mapping like the ring's, page-locked
with cudaHostRegister through the libcudart onnxruntime loaded. Where a way cannot be had in this
build, the row says "not measurable from Python" and why, instead of a number.
"""

from __future__ import annotations

import mmap

import numpy as np
import onnxruntime as ort

from cronnx.models.spec import ModelSpec
from cronnx.workers import pinned_memory

from bench.limit import Bench

from .failures import describe, guarded
from .plan import CUDA, Plan
from .sessions import infer, median_ms, output_buffer, rate


class Unavailable(Exception):
    """Page-locked host memory cannot be had this way here; the message says why."""


def loaded_cudart():
    """The CUDA runtime onnxruntime's CUDA EP loaded (cronnx.workers.pinned_memory.loaded_cudart),
    checked by page-locking one page; Unavailable when there is none or it cannot page-lock (no driver)."""
    try:
        lib = pinned_memory.loaded_cudart()
    except pinned_memory.CudaHostError as exc:
        raise Unavailable(str(exc)) from None
    try:
        with Registered(lib, (mmap.PAGESIZE,), "uint8"):  # a runtime without a driver or device fails here
            pass
    except RuntimeError as exc:
        raise Unavailable(f"{exc} ({lib.path})") from None
    return lib


class Registered:
    """A shared anonymous mapping (page-aligned, shmem-backed: the kind of memory the ring is),
    page-locked as a worker page-locks the ring (cronnx.workers.pinned_memory.PageLocked) for as
    long as the `with` lasts; `.array` is its numpy view. RuntimeError (CudaHostError) when CUDA refuses."""

    def __init__(self, cudart, shape: tuple[int, ...], dtype: str):
        self.cudart = cudart
        self.memory = mmap.mmap(-1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
        self.array = np.frombuffer(self.memory, dtype).reshape(shape)
        self.locked = None

    def __enter__(self) -> "Registered":
        try:
            self.locked = pinned_memory.PageLocked({"a shared mapping": self.array}, self.cudart)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.locked is not None:
            self.locked.close()
            self.locked = None
        self.array = None  # the view must go before the mapping can close
        try:
            self.memory.close()
        except BufferError:  # a view still alive somewhere: the mapping goes with it
            pass


def onnxruntime_pinned_memory_info():
    """The CUDA EP device's HOST_ACCESSIBLE (pinned) memory info, for
    OrtValue.ortvalue_from_shape_and_type(..., memory_info=...); Unavailable when this build has none.

    onnxruntime's Python API names no pinned device: OrtDevice.make and the device strings of
    bind_input / ortvalue_from_shape_and_type know "cpu", "cuda", "cann", "dml", "webgpu", "gpu",
    "npu" (onnxruntime_inference_collection.py, get_ort_device_type, 1.31.1 and 1.32.0), always with
    the default memory type. From 1.23 on, an EP device (ort.get_ep_devices()) may offer
    memory_info(OrtDeviceMemoryType.HOST_ACCESSIBLE), and ortvalue_from_shape_and_type takes
    memory_info= ("allows allocating HOST_ACCESSIBLE memory", its docstring in 1.31.1); whether the
    CUDA EP of a given build lists a device with one is what this finds out.

    The onnxruntime-gpu 1.31.1 wheel lists none: its CUDA EP is the built-in one, and only a
    registered EP library adds EP devices (the library's CreateEpFactories, cuda_provider_factory.cc,
    gives each GPU a device with HOST_ACCESSIBLE memory info). Registering it here
    (ort.register_execution_provider_library) is not done: the 1.31.1 Python binding would then make
    every later "CUDAExecutionProvider" session through the registered library (it looks one up by
    name and device_id first: "No registered plugin EP device found for 'CUDAExecutionProvider'",
    onnxruntime_pybind_state.cc), not as a Cronnx worker makes it, and the rest of the run would
    measure that instead.
    """
    get_devices, kinds = getattr(ort, "get_ep_devices", None), getattr(ort, "OrtDeviceMemoryType", None)
    if get_devices is None or kinds is None:
        raise Unavailable(f"onnxruntime {ort.__version__} has no get_ep_devices() / OrtDeviceMemoryType (1.23+)")
    devices = get_devices()
    cuda = [d for d in devices if d.ep_name == CUDA]
    if not cuda:
        raise Unavailable(f"ort.get_ep_devices() lists no {CUDA} device (it lists "
                          f"{sorted({d.ep_name for d in devices}) or 'none'}): this build's CUDA EP is built in, "
                          "not registered as an EP library, so there is no HOST_ACCESSIBLE memory info to "
                          "allocate from (registering it would change how every later CUDA session is made)")
    info = cuda[0].memory_info(kinds.HOST_ACCESSIBLE)
    if info is None:
        raise Unavailable(f"the {CUDA} EP device offers no HOST_ACCESSIBLE memory info")
    try:
        ort.OrtValue.ortvalue_from_shape_and_type([1], np.float32, memory_info=info)
    except TypeError as exc:  # an OrtValue API without memory_info=
        raise Unavailable(f"OrtValue.ortvalue_from_shape_and_type takes no memory_info here: {describe(exc)}") from None
    except Exception as exc:
        raise Unavailable(f"allocating from the HOST_ACCESSIBLE memory info failed: {describe(exc)}") from None
    return info


class PinnedSources:
    """How page-locked host memory can be had from Python here, found once (after a CUDA session
    exists, since both ways look at what onnxruntime's CUDA EP loaded)."""

    WAYS = (("onnxruntime_pinned", onnxruntime_pinned_memory_info), ("cuda_host_register", loaded_cudart))

    def __init__(self):
        self._found: dict | None = None

    def found(self) -> dict:
        """For each way, its memory info or CUDA runtime, or "not measurable from Python: <why>"."""
        if self._found is None:
            self._found = {}
            for key, find in self.WAYS:
                try:
                    self._found[key] = find()
                except Unavailable as exc:
                    self._found[key] = f"not measurable from Python: {exc}"
                except Exception as exc:
                    self._found[key] = f"not measurable from Python: {describe(exc)}"
        return self._found

    def status(self) -> dict:
        """For each way, None when it can, else "not measurable from Python: <why>" (for the JSON)."""
        return {key: value if isinstance(value, str) else None for key, value in self.found().items()}


def host_memory_row(plan: Plan, sources: PinnedSources, session, spec: ModelSpec, x: np.ndarray, batch: int,
                    pageable: dict, device: str = "cuda") -> dict:
    """The bucket's run with its input and output in page-locked host memory (IO binding as the
    worker binds the ring), against `pageable` (the host-input row: numpy arrays); and the
    host-to-device copy of the input alone from each kind of memory. `device` "cpu" runs the same
    procedure on the CPU EP (the suite's check of this code)."""
    found = sources.found()
    reference = output_buffer(spec, batch)
    infer(session, session.io_binding(), spec, x, reference)
    on_device = ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), x.dtype.type, device, 0)
    copy_in = median_ms(Bench._repeat(lambda: on_device.update_inplace(x), plan.copy_seconds))
    row = {"pageable": {"run": pageable, "copy_in_ms": copy_in}}
    for key, measure in (("onnxruntime_pinned", _onnxruntime_pinned), ("cuda_host_register", _registered)):
        source = found[key]
        if isinstance(source, str):
            row[key] = {"status": source}
        else:
            row[key] = guarded(f"batch {batch} {key}", lambda: measure(
                plan, source, session, spec, x, batch, on_device, reference))
    print(f"  batch {batch} host memory: run " + ", ".join(
        f"{key} {row[key]['run']['ms_per_batch']:.2f} ms" for key in row if "run" in row[key])
        + "; copy in " + ", ".join(f"{key} {row[key]['copy_in_ms']:.3f} ms"
                                   for key in row if "copy_in_ms" in row[key]),
        flush=True)
    return row


def _onnxruntime_pinned(plan: Plan, memory_info, session, spec: ModelSpec, x: np.ndarray, batch: int, on_device,
                        reference: np.ndarray) -> dict:
    """Input and output as OrtValues of onnxruntime's pinned (HOST_ACCESSIBLE) allocator."""
    pinned_x = ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), x.dtype.type, memory_info=memory_info)
    pinned_y = ort.OrtValue.ortvalue_from_shape_and_type(list(reference.shape), reference.dtype.type,
                                                         memory_info=memory_info)
    pinned_x.update_inplace(x)
    binding = session.io_binding()
    binding.bind_ortvalue_input(spec.input_name, pinned_x)
    binding.bind_ortvalue_output(spec.output_name, pinned_y)
    out = {"device_name": pinned_x.device_name(),
           "run": rate(batch, Bench._repeat(lambda: session.run_with_iobinding(binding), plan.shape_seconds)),
           "copy_in_ms": median_ms(Bench._repeat(lambda: on_device.update_inplace(pinned_x), plan.copy_seconds))}
    try:
        out["max_abs_diff_vs_pageable"] = float(np.abs(pinned_y.numpy().astype(np.float64) - reference).max())
    except Exception as exc:  # the timing stands without the check
        out["max_abs_diff_vs_pageable"] = None
        out["check_error"] = describe(exc)
    return out


def _registered(plan: Plan, cudart, session, spec: ModelSpec, x: np.ndarray, batch: int, on_device,
                reference: np.ndarray) -> dict:
    """Input and output in shared mappings page-locked with cudaHostRegister, bound as host
    memory: what registering the ring's memory would give a worker."""
    with Registered(cudart, x.shape, x.dtype.str) as x_in, Registered(cudart, reference.shape,
                                                                      reference.dtype.str) as y_out:
        x_in.array[:] = x
        binding = session.io_binding()
        run = rate(batch, Bench._repeat(lambda: infer(session, binding, spec, x_in.array, y_out.array),
                                        plan.shape_seconds))
        copy_in = median_ms(Bench._repeat(lambda: on_device.update_inplace(x_in.array), plan.copy_seconds))
        diff = float(np.abs(y_out.array.astype(np.float64) - reference).max())
    return {"library": cudart.path, "run": run, "copy_in_ms": copy_in, "max_abs_diff_vs_pageable": diff}
