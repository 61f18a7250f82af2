"""GPU check: onnxruntime alone per batch bucket, the preprocessing limit, Cronnx served, parity.

One prepared run, side by side, for a session that has a GPU machine (one NVIDIA H200, 16 cores:
about 5 minutes with the defaults, an estimate part by part in bench/README.md, not timed on a GPU
yet; --preprocessing processes saves about 75 s), on the seven 1600 px photos of bench/photos.py
and the demo MobileNetV2 and ResNet-50 (models/<arch>-demo.onnx, built when missing: 15-25 s each):

  onnxruntime  onnxruntime alone, per batch bucket (powers_of_two_up_to(batch size): 1, 2, 4, ... 64
               on CUDA): for each bucket a session that only ever runs that shape, as a Cronnx worker
               has (same session options: cronnx.worker.create_session), img/s and ms per batch, the
               median of timed runs after warm-up; the input bound from host memory with IO binding
               (what the worker does) and, on CUDA, already on the device (an OrtValue on "cuda").
               Then one session alternating among the bucket shapes against the fixed-shape
               sessions: what a change of input shape costs (why a worker keeps a session a bucket).
               On CUDA only, per bucket ("n/a on CPU" otherwise):
               - CUDA graphs: a session with the CUDA EP option enable_cuda_graph "1", its input and
                 output bound to device buffers allocated once; per batch the input copied in
                 (update_inplace), the run (a graph replay after the first runs captured it) and
                 the output copied back to host, each timed; against the same procedure on the
                 bucket's session without graphs, and the host- and device-input rows. A check that
                 a replay reads the new input: the graph's output for other images equals the
                 plain session's.
               - pinned against pageable host memory for the copies: the run with its input and
                 output bound to page-locked host buffers, against the host-input row (pageable
                 numpy arrays); page-locked memory two ways: onnxruntime's own (an OrtValue from
                 the CUDA EP device's HOST_ACCESSIBLE memory info, onnxruntime 1.23+; where this
                 build has none, the JSON and the table say "not measurable from Python" and why)
                 and a shared mapping like the ring's, page-locked with cudaHostRegister (through
                 the libcudart onnxruntime loaded). Also the host-to-device copy alone from each.
  preprocess   the preprocessing limit on all cores: Cronnx's preprocessing (cronnx.preprocess) of
               the photos in N threads of one process, and in N processes; N = os.cpu_count().
  served       `cronnx serve` (a generated config: the model, 1 worker, devices [0] on CUDA, the batch
               size and its buckets, ring_slots >= clients) on 127.0.0.1, once per preprocessing
               placement (--preprocessing, default processes,fronts): threads (preprocess_threads =
               cores, in the front), processes (preprocess_processes = cores) or fronts
               (front_processes = cores / 2, --fronts, each decoding in its share of cores threads);
               each loaded by `cronnx bench` (closed loop,
               raw bodies) at 1 and 256 clients (256 spread over --procs client processes): img/s,
               p50, p99, errors, the server's batch sizes and phases as `cronnx bench` reports them,
               the server's CPU use (user + system of its process tree from /proc, in cores: the
               event loop thread, the front's other threads, the worker, the other children, i.e.
               the preprocessing processes), the batches each bucket ran (/models), and the
               preprocessing processes seen under the server and their restarts (/metrics).
  gpu          GPU utilisation and memory during each served run (nvidia-smi every 0.5 s); "n/a"
               without nvidia-smi.
  parity       softmax probabilities of the provider under test (CUDA with use_tf32 0, Cronnx's
               default, and with use_tf32 1; the CPU EP itself with --provider cpu) against the CPU
               EP on the photos, at batch 1 and at the batch size: max abs difference; and the served
               /predict answers (top-5 confidences) of each placement against a direct CPU run.

A part that fails records its error in the JSON and the run goes on (so does a CUDA graph or a
host-memory row of one bucket); the JSON and the markdown are rewritten after every part, so a run
stopped early still leaves what it measured. Every server is stopped
(its process group, by pid) and its shared memory (/dev/shm/cronnx_<pid>_*) checked and removed;
the processes this run started are listed in the JSON, with any found alive at the end.

Run it here (CPU EP; the smoke run, well under a minute on 2 cores):

    .venv/bin/python bench/gpu_check.py --quick --provider cpu --json /tmp/gpu_check.json

On the GPU machine. It has Python 3.12, onnxruntime 1.30 (CPU), CUDA 13 libraries (the nvidia-*
packages of its PyTorch) and the rest of Cronnx's dependencies, but neither msgspec nor
onnxruntime-gpu, and no network. Here, once: bench/gpu_parts.sh (onnxruntime-gpu 1.31.1 and
msgspec, recompressed and cut into .whl/aa .. .whl/ad, each small enough for one call). There:
calls with carry [".whl/aa"], [".whl/ab"], [".whl/ac"] (command `true`) while the machine stays
warm, then the run, with carry [".whl/ad", "bench/photos", "models/mobilenetv2-demo.onnx"] (the
ResNet-50, 97 MiB, is built there in about 25 s) and timeout_s 600:

    bash bench/gpu_device_run.sh --json $OUT/gpu_check.json --markdown $OUT/gpu_check.md

which checks the parts, installs both packages ahead of the machine's onnxruntime, puts NVIDIA's
libraries on LD_LIBRARY_PATH and runs this script with those arguments (bench/README.md, "GPU
check").

With --provider auto (the default) it runs on CUDA when onnxruntime lists CUDAExecutionProvider;
a CUDA session that comes up without it (a missing library) is an error, not a silent CPU run.

Outputs: progress and the time of each part on stdout, then the markdown tables (also written to
--markdown FILE, for bench/README.md); --json FILE: everything, per part, with its error (null when
it ran), its seconds, and the raw `cronnx bench` results.

    python bench/gpu_check.py [--provider auto|cuda|cpu] [--quick] [--models mobilenetv2,resnet50]
        [--seconds S] [--clients 1,256] [--procs 4] [--preprocessing processes,fronts] [--fronts N]
        [--cuda-graph] [--pinned-ring-memory] [--parts onnxruntime,preprocess,served,gpu,parity]
        [--batch-size N] [--photos DIR] [--glob '*-1600.jpg'] [--json FILE] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import mmap
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import msgspec
import numpy as np
import onnxruntime as ort

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]  # run from anywhere without installing cronnx

from cronnx.models.catalog import powers_of_two_up_to  # noqa: E402
from cronnx.config import CudaConfig, PreprocessConfig  # noqa: E402
from cronnx.loadgen import server_stats  # noqa: E402
from cronnx.models.spec import ModelSpec, inspect_model  # noqa: E402
from cronnx.preprocessing.transform import Preprocessor, pil_build  # noqa: E402
from cronnx.workers import pinned_memory  # noqa: E402
from cronnx.workers.child import create_session  # noqa: E402

from head_to_head import TICK_S, _stat_fields  # noqa: E402
from limit import Bench, ensure_model  # noqa: E402
from photos import DEFAULT_OUT, write_photos  # noqa: E402
from serving import Served, free_port  # noqa: E402

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
MODELS = ("mobilenetv2", "resnet50")
# Where the served runs decode: threads of the one front (server.preprocess_threads), preprocessing
# processes (server.preprocess_processes), or front processes, each reading bodies and decoding in
# its own threads (server.front_processes). The default runs the two that use every core.
PLACEMENTS = ("threads", "processes", "fronts")
# The parts a run may be limited to (--parts); the models are always set up first.
PARTS = ("onnxruntime", "preprocess", "served", "gpu", "parity")
DEFAULT_PLACEMENTS = ("processes", "fronts")
NA_CPU = "n/a on CPU (CUDA EP only)"
SAMPLE_S = 0.5  # nvidia-smi and /proc, during the served runs
SERVED_PHOTOS = 3  # photos whose served answers are compared with a direct CPU run
TOP_K = 5


class Terminated(BaseException):
    """SIGTERM: not a failure of one part, so no part catches it; the finally blocks still run."""


def _terminate(signum, frame) -> None:
    raise Terminated(f"signal {signum}")


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:2000]


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000.0


def rate(batch: int, times: list[float]) -> dict:
    """ms per batch and images/s from the median of the timed runs."""
    ms = median_ms(times)
    return {"ms_per_batch": ms, "img_per_s": batch * 1000.0 / ms, "runs": len(times)}


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


def infer(session, binding, spec: ModelSpec, x: np.ndarray, y: np.ndarray) -> None:
    """One run with IO binding on host memory, bound afresh as a Cronnx worker does each batch."""
    binding.bind_input(spec.input_name, "cpu", 0, x.dtype.type, list(x.shape), x.ctypes.data)
    binding.bind_output(spec.output_name, "cpu", 0, y.dtype.type, list(y.shape), y.ctypes.data)
    session.run_with_iobinding(binding)


def output_buffer(spec: ModelSpec, rows: int) -> np.ndarray:
    return np.empty((rows, *spec.output_item_shape), spec.output_dtype)


def _live_processes(field: int, value: int) -> list[int]:
    """Processes (not zombies) whose /proc stat field `field` (1: parent pid, 2: process group) is `value`."""
    found = []
    for proc in Path("/proc").iterdir():
        fields = _stat_fields(proc / "stat") if proc.name.isdigit() else None
        if fields is not None and int(fields[field]) == value and fields[0] != "Z":
            found.append(int(proc.name))
    return found


def alive_in_group(group: int) -> list[int]:
    """Processes (not zombies) whose process group is `group`."""
    return _live_processes(2, group)


def pid_alive(pid: int) -> bool:
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return fields is not None and fields[0] != "Z"


def shm_segments(pid: int) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"cronnx_{pid}_"))


def children_of(pid: int) -> list[int]:
    """Live (not zombie) child processes of `pid`."""
    return _live_processes(1, pid)


def preprocessing_processes(server: int, workers: set[int]) -> list[int]:
    """The server's children that are neither workers nor multiprocessing's resource tracker."""
    found = []
    for child in children_of(server):
        try:
            tracker = b"resource_tracker" in Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if child not in workers and not tracker:
            found.append(child)
    return found


SERVER_CPU_PARTS = ("event loop thread", "other threads", "worker processes", "other child processes")


def server_cpu(group: int, workers: set[int]) -> dict[str, float]:
    """CPU seconds so far of a server's process group: its event loop (main) thread, its other
    threads, its worker processes, and its other children (the preprocessing processes, and
    multiprocessing's resource tracker, which idles)."""
    out = dict.fromkeys(SERVER_CPU_PARTS, 0.0)
    for proc in Path("/proc").iterdir():
        fields = _stat_fields(proc / "stat") if proc.name.isdigit() else None
        if fields is None or int(fields[2]) != group:  # fields[2]: the process group
            continue
        pid = int(proc.name)
        if pid != group:
            out["worker processes" if pid in workers else "other child processes"] += (
                (int(fields[11]) + int(fields[12])) * TICK_S)  # utime, stime of the whole process
            continue
        try:
            tasks = list((proc / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            t = _stat_fields(task / "stat")
            if t is not None:
                part = "event loop thread" if task.name == proc.name else "other threads"
                out[part] += (int(t[11]) + int(t[12])) * TICK_S
    return out


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


class Unavailable(Exception):
    """Page-locked host memory cannot be had this way here; the message says why."""


def loaded_cudart():
    """The CUDA runtime onnxruntime's CUDA EP loaded (cronnx.workers.pinned_memory.loaded_cudart), checked by
    page-locking one page; Unavailable when there is none or it cannot page-lock (no driver)."""
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
    page-locked as a worker page-locks the ring (cronnx.workers.pinned_memory.PageLocked) for as long as the
    `with` lasts; `.array` is its numpy view. RuntimeError (CudaHostError) when CUDA refuses."""

    def __init__(self, cudart, shape: tuple[int, ...], dtype: str):
        self.cudart = cudart
        self.nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.memory = mmap.mmap(-1, self.nbytes)
        self.array = np.frombuffer(self.memory, dtype).reshape(shape)
        self.address = self.array.ctypes.data
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


def query_gpu(nvidia_smi: str, fields: str = "utilization.gpu,memory.used") -> list[str] | None:
    """GPU 0's values of `fields`, or None when nvidia-smi fails."""
    try:
        out = subprocess.run([nvidia_smi, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return None
    return [v.strip() for v in lines[0].split(",")]


class Sampler(threading.Thread):
    """Every SAMPLE_S: the CPU seconds of a server's process group, and the GPU's utilisation and
    memory when nvidia-smi exists; read afterwards over any interval."""

    def __init__(self, group: int, nvidia_smi: str | None, workers: set[int]):
        super().__init__(daemon=True)
        self.group, self.nvidia_smi, self.workers = group, nvidia_smi, workers
        self.samples: list[tuple[float, dict[str, float], tuple[float, float] | None]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            t = time.monotonic()
            cpu = server_cpu(self.group, self.workers)
            gpu = None
            if self.nvidia_smi:
                values = query_gpu(self.nvidia_smi)
                try:
                    gpu = (float(values[0]), float(values[1])) if values else None
                except ValueError:  # "[N/A]"
                    gpu = None
            self.samples.append((t, cpu, gpu))
            self.stopping.wait(SAMPLE_S)

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)

    def over(self, start: float, end: float) -> dict:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:  # a short window: the samples around it
            before = [s for s in self.samples if s[0] < start][-1:]
            after = [s for s in self.samples if s[0] > end][:1]
            inside = before + inside + after
        if len(inside) < 2:
            return {"server_cpu_cores": None, "gpu": None}
        (t0, cpu0, _), (t1, cpu1, _) = inside[0], inside[-1]
        span = t1 - t0
        parts = {part: (cpu1[part] - cpu0[part]) / span for part in cpu1}
        gpu = [g for _, _, g in inside if g is not None]
        return {"interval_s": span, "server_cpu_cores": sum(parts.values()), "server_cpu_by_part_cores": parts,
                "gpu": None if not gpu else {
                    "util_mean_pct": statistics.mean(u for u, _ in gpu), "util_max_pct": max(u for u, _ in gpu),
                    "memory_used_max_mib": max(m for _, m in gpu), "samples": len(gpu)}}


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


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.quick = args.quick
        available = ort.get_available_providers()
        wanted = args.provider
        if wanted == "auto":
            wanted = "cuda" if CUDA in available else "cpu"
        self.cuda = wanted == "cuda"
        self.provider = CUDA if self.cuda else CPU
        self.cores = os.cpu_count() or 1
        self.batch_size = args.batch_size or (64 if self.cuda else 4)
        self.buckets = powers_of_two_up_to(self.batch_size)
        self.models = [m for m in (args.models or ("mobilenetv2" if self.quick else ",".join(MODELS))).split(",") if m]
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown:
            raise SystemExit(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
        self.model_paths = {m: REPO / "models" / f"{m}-demo.onnx" for m in self.models}
        # Sized to the 5 minutes the GPU machine gives this run (an estimate: bench/README.md). The
        # fixed costs cannot shrink (cuDNN's exhaustive search on every new session and shape, four
        # server starts, the ResNet-50 build), the windows can: 3 s served still holds hundreds of
        # images at 1 client and thousands at 256; 0.25 s of onnxruntime alone is still a dozen
        # runs at batch 64 of ResNet-50 (about 20 ms a batch with its copies), and on CUDA each
        # bucket of each model times 5 of them and 2 copy windows of half that (14 buckets).
        self.seconds = args.seconds or (2.0 if self.quick else 3.0)
        self.shape_seconds = 0.25  # each timed measurement of onnxruntime alone
        self.clients = [int(c) for c in (args.clients or ("1,16" if self.quick else "1,256")).split(",")]
        self.procs = args.procs or (2 if self.quick else 4)
        # --quick (the suite's CPU run) serves every placement, so that each is tested.
        placements = args.preprocessing or ",".join(PLACEMENTS if self.quick else DEFAULT_PLACEMENTS)
        self.placements = [p for p in placements.split(",") if p]
        self.parts = set(args.parts.split(",")) if args.parts else set(PARTS)
        if self.parts - set(PARTS):
            raise SystemExit(f"unknown parts {sorted(self.parts - set(PARTS))}; choose from {', '.join(PARTS)}")
        if "served" in self.parts:
            self.parts.add("gpu")  # the GPU's utilisation during the served runs
        # One front process per 2 cores, each with its event loop and 2 decoding threads. A front
        # holds its GIL about 1.8 ms per request (HTTP, the GIL-held parts of decoding, the answer:
        # py-spy --gil, 1600 px photos, bench/README.md), so one caps near 550 requests a second
        # here; 16 cores feeding a GPU at about 2,000 img/s keep 8 fronts' GILs under half busy,
        # where 4 would be near saturated.
        self.fronts = args.fronts or max(2, self.cores // 2)
        unknown = sorted(set(self.placements) - set(PLACEMENTS))
        if unknown or not self.placements:
            raise SystemExit(f"unknown preprocessing placements {unknown}; choose from {', '.join(PLACEMENTS)}")
        self.copy_seconds = self.shape_seconds / 2  # each timed host-to-device copy alone
        self.nvidia_smi = shutil.which("nvidia-smi")
        self.photo_paths: list[Path] = []
        self.started: list[tuple[int, bool]] = []  # (pid, whether it leads a process group of its own)
        self.served_answers: dict[str, dict[str, list[dict]]] = {}  # model -> placement -> /predict answers
        self.served_runs: dict[str, list[dict]] = {}  # model -> runs of every placement
        self._pinned_sources: dict | None = None  # how page-locked host memory can be had: found once
        self.checkpoint = lambda: None  # called after each part (main writes what there is so far)
        self.result: dict = {"meta": self.meta(available), "parts": {}, "timings_s": {}}

    def meta(self, available: list[str]) -> dict:
        meta = {"provider": self.provider, "available_providers": available, "onnxruntime": ort.__version__,
                "pil": pil_build(), "numpy": np.__version__, "python": platform.python_version(),
                "cores": self.cores, "batch_size": self.batch_size, "buckets": self.buckets, "models": self.models,
                "quick": self.quick, "served_seconds": self.seconds, "shape_seconds": self.shape_seconds,
                "clients": self.clients, "client_procs": self.procs, "preprocessing_placements": self.placements,
                "nvidia_smi": self.nvidia_smi, "gpu_name": None, "parts": sorted(self.parts),
                "served_cuda_settings": [s for s, on in (("enable_cuda_graph", self.args.cuda_graph),
                                                         ("pinned_ring_memory", self.args.pinned_ring_memory)) if on]}
        if self.nvidia_smi:
            values = query_gpu(self.nvidia_smi, "name,driver_version,memory.total")
            meta["gpu_name"] = ", ".join(values) if values else None
        return meta

    # --- the run ------------------------------------------------------------------------------

    def run(self) -> dict:
        began = time.monotonic()
        m = self.result["meta"]
        print(f"[gpu_check] {m['provider']} ({m['gpu_name'] or 'no GPU seen'}), {self.cores} cores, onnxruntime "
              f"{ort.__version__}, batch {self.batch_size}, buckets {self.buckets}, models {', '.join(self.models)}",
              flush=True)
        try:
            self.part("setup", self.setup)  # the models: every other part needs them
            for name, fn in (("onnxruntime", lambda: self.per_model(self.onnxruntime_alone)),
                             ("preprocess", self.preprocess_limit),
                             ("served", lambda: self.per_model(self.served)),
                             ("gpu", self.gpu),
                             ("parity", lambda: self.per_model(self.parity))):
                if name in self.parts:
                    self.part(name, fn)
        finally:
            self.result["leftover_processes"] = self.reap_all()
            self.result["started_pids"] = [pid for pid, _ in self.started]
            self.result["total_s"] = time.monotonic() - began
        print(f"[gpu_check] total {self.result['total_s']:.1f} s", flush=True)
        return self.result

    def part(self, name: str, fn) -> None:
        print(f"[gpu_check] {name} ...", flush=True)
        began = time.monotonic()
        try:
            data = fn()
            error = data.pop("error", None)
        except (Exception, SystemExit) as exc:  # serving.Served says a failed start with SystemExit
            traceback.print_exc()
            data, error = {}, describe(exc)
        except Terminated as exc:
            self.result["parts"][name] = {"error": f"terminated ({exc})", "seconds": time.monotonic() - began}
            raise
        seconds = time.monotonic() - began
        self.result["parts"][name] = {"error": error, "seconds": seconds, **data}
        self.result["timings_s"][name] = seconds
        print(f"[gpu_check] {name}: {seconds:.1f} s" + (f"  ERROR {error}" if error else ""), flush=True)
        self.checkpoint()

    def per_model(self, fn) -> dict:
        """fn(model name) for each model; one model's failure is recorded and the others still run.
        A model's result may carry an "error" of its own (a placement that failed, say): the part's
        error names it too."""
        out, errors = {}, []
        for name in self.models:
            try:
                out[name] = fn(name)
            except (Exception, SystemExit) as exc:
                traceback.print_exc()
                out[name] = {"error": describe(exc)}
            if out[name].get("error"):
                errors.append(f"{name}: {out[name]['error']}")
        return {"models": out, "error": "; ".join(errors) or None}

    @staticmethod
    def guarded(what: str, fn) -> dict:
        """fn()'s dict, or {"error": ...} when it raises: one failing row does not end its part."""
        try:
            return fn()
        except Exception as exc:
            traceback.print_exc()
            print(f"  {what}: ERROR {describe(exc)}", flush=True)
            return {"error": describe(exc)}

    # --- setup --------------------------------------------------------------------------------

    def setup(self) -> dict:
        photos_dir = self.args.photos
        if photos_dir.resolve() == DEFAULT_OUT.resolve() and not list(photos_dir.glob(self.args.glob)):
            write_photos(photos_dir)  # from the scikit-image wheel on PyPI: carry bench/photos where offline
        self.photo_paths = sorted(photos_dir.glob(self.args.glob))
        if not self.photo_paths:
            raise RuntimeError(f"no photos matching {self.args.glob!r} in {photos_dir}")
        built = {}
        for name, path in self.model_paths.items():
            began = time.monotonic()
            existed = path.exists()
            ensure_model(path)
            built[name] = None if existed else time.monotonic() - began
        return {"photos": [p.name for p in self.photo_paths], "models_built_s": built}

    def tensors(self, spec: ModelSpec) -> np.ndarray:
        """The photos through Cronnx's preprocessing: [photos, C, H, W]."""
        preprocess = Preprocessor(PreprocessConfig(), spec)
        out = np.empty((len(self.photo_paths), *spec.input_item_shape), spec.input_dtype)
        for i, path in enumerate(self.photo_paths):
            preprocess(path.read_bytes(), out[i])
        return out

    def session(self, path: Path, provider: str | None = None, tf32: bool = False, cuda_graph: bool = False):
        """A session as a Cronnx worker makes it (cronnx.worker.create_session), intra-op threads 1;
        `cuda_graph`: with the CUDA EP option enable_cuda_graph "1" (no effect on the CPU EP)."""
        provider = provider or self.provider
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

    # --- 1: onnxruntime alone -----------------------------------------------------------------

    def onnxruntime_alone(self, name: str) -> dict:
        path = self.model_paths[name]
        spec = inspect_model(str(path))
        photos = self.tensors(spec)
        rows = []
        for batch in self.buckets:
            row = self.bucket(path, spec, tiled(photos, batch), batch)
            rows.append(row)
            print(f"  {name} batch {batch}: " + ", ".join(
                f"{where} input {row[where]['img_per_s']:.1f} img/s ({row[where]['ms_per_batch']:.2f} ms)"
                for where in ("host", "device") if "img_per_s" in row.get(where, {})), flush=True)
        fixed = {r["batch"]: r["host"]["ms_per_batch"] for r in rows}
        out = {"buckets": rows, "alternating": self.alternating(path, spec, photos, fixed)}
        if self.cuda:
            out["cuda_graph"] = self.row_status(rows, "cuda_graph")
            out["host_memory"] = {**self.row_status(rows, "host_memory"), "sources": self.pinned_sources()}
        else:
            out["cuda_graph"] = {"status": NA_CPU}
            out["host_memory"] = {"status": NA_CPU}
        return out

    @staticmethod
    def row_status(rows: list[dict], key: str) -> dict:
        errors = [f"batch {r['batch']}: {r[key]['error']}" for r in rows if r.get(key, {}).get("error")]
        status = "measured" if not errors else f"failed in {len(errors)} of {len(rows)} buckets"
        return {"status": status, "errors": errors}

    def bucket(self, path: Path, spec: ModelSpec, x: np.ndarray, batch: int) -> dict:
        """A session that only ever runs this batch size (its sessions go when this returns)."""
        y = output_buffer(spec, batch)
        session = self.session(path)
        binding = session.io_binding()
        row = {"batch": batch,
               "host": rate(batch, Bench._repeat(lambda: infer(session, binding, spec, x, y), self.shape_seconds))}
        if self.cuda:
            where = f"batch {batch}"
            row["device"] = self.guarded(f"{where} device input", lambda: self.device_input(session, spec, x, y, batch))
            row["cuda_graph"] = self.guarded(f"{where} CUDA graph",
                                             lambda: self.cuda_graph_row(path, spec, x, batch, session))
            row["host_memory"] = self.guarded(f"{where} host memory",
                                              lambda: self.host_memory_row(session, spec, x, batch, row["host"]))
        return row

    def device_input(self, session, spec: ModelSpec, x: np.ndarray, y: np.ndarray, batch: int) -> dict:
        on_device = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        bound = session.io_binding()
        bound.bind_ortvalue_input(spec.input_name, on_device)
        bound.bind_output(spec.output_name, "cpu", 0, y.dtype.type, list(y.shape), y.ctypes.data)
        return rate(batch, Bench._repeat(lambda: session.run_with_iobinding(bound), self.shape_seconds))

    def cuda_graph_row(self, path: Path, spec: ModelSpec, x: np.ndarray, batch: int, plain,
                       device: str = "cuda") -> dict:
        """This bucket with CUDA graphs against the same procedure without (on `plain`, the bucket's
        session): input and output on device buffers bound once, each batch copied in, run, copied
        out. `device` "cpu" runs the same procedure on the CPU EP (the suite's check of this code)."""
        graph = DeviceBound(self.session(path, cuda_graph=True), spec, batch, device)
        # The CUDA EP runs regularly first (its arena allocates what the graph will use: no
        # allocation is allowed while capturing), then captures and replays within one Run(): at
        # the 2nd run where min_num_runs_before_cuda_graph_capture_ is 1 (older versions), the 3rd
        # where it is 2 (cuda_execution_provider.h). The graph belongs to the calling thread.
        first_runs_ms = [sum(graph.step(x)[0]) * 1000.0 for _ in range(4)]
        with_graph = graph.measure(x, batch, self.shape_seconds)
        control = DeviceBound(plain, spec, batch, device)
        for _ in range(3):
            control.step(x)
        without = control.measure(x, batch, self.shape_seconds)
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

    def pinned_sources(self) -> dict:
        """How page-locked host memory can be had from Python here, found once (after a CUDA session
        exists): for each way, None when it can, else "not measurable from Python: <why>"."""
        if self._pinned_sources is None:
            sources = {}
            ways = (("onnxruntime_pinned", onnxruntime_pinned_memory_info), ("cuda_host_register", loaded_cudart))
            for key, find in ways:
                try:
                    sources[key] = find()
                except Unavailable as exc:
                    sources[key] = f"not measurable from Python: {exc}"
                except Exception as exc:
                    sources[key] = f"not measurable from Python: {describe(exc)}"
            self._pinned_sources = sources
        return {key: value if isinstance(value, str) else None for key, value in self._pinned_sources.items()}

    def host_memory_row(self, session, spec: ModelSpec, x: np.ndarray, batch: int, pageable: dict,
                        device: str = "cuda") -> dict:
        """The bucket's run with its input and output in page-locked host memory (IO binding as the
        worker binds the ring), against `pageable` (the host-input row: numpy arrays); and the
        host-to-device copy of the input alone from each kind of memory."""
        self.pinned_sources()
        reference = output_buffer(spec, batch)
        infer(session, session.io_binding(), spec, x, reference)
        on_device = ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), x.dtype.type, device, 0)
        copy_in = median_ms(Bench._repeat(lambda: on_device.update_inplace(x), self.copy_seconds))
        row = {"pageable": {"run": pageable, "copy_in_ms": copy_in}}
        for key, measure in (("onnxruntime_pinned", self.onnxruntime_pinned), ("cuda_host_register", self.registered)):
            source = self._pinned_sources[key]
            if isinstance(source, str):
                row[key] = {"status": source}
            else:
                row[key] = self.guarded(f"batch {batch} {key}", lambda: measure(
                    source, session, spec, x, batch, on_device, reference))
        print(f"  batch {batch} host memory: run " + ", ".join(
            f"{key} {row[key]['run']['ms_per_batch']:.2f} ms" for key in row if "run" in row[key])
            + "; copy in " + ", ".join(f"{key} {row[key]['copy_in_ms']:.3f} ms"
                                       for key in row if "copy_in_ms" in row[key]),
            flush=True)
        return row

    def onnxruntime_pinned(self, memory_info, session, spec: ModelSpec, x: np.ndarray, batch: int, on_device,
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
               "run": rate(batch, Bench._repeat(lambda: session.run_with_iobinding(binding), self.shape_seconds)),
               "copy_in_ms": median_ms(Bench._repeat(lambda: on_device.update_inplace(pinned_x), self.copy_seconds))}
        try:
            out["max_abs_diff_vs_pageable"] = float(np.abs(pinned_y.numpy().astype(np.float64) - reference).max())
        except Exception as exc:  # the timing stands without the check
            out["max_abs_diff_vs_pageable"] = None
            out["check_error"] = describe(exc)
        return out

    def registered(self, cudart, session, spec: ModelSpec, x: np.ndarray, batch: int, on_device,
                   reference: np.ndarray) -> dict:
        """Input and output in shared mappings page-locked with cudaHostRegister, bound as host
        memory: what registering the ring's memory would give a worker."""
        with Registered(cudart, x.shape, x.dtype.str) as x_in, Registered(cudart, reference.shape,
                                                                          reference.dtype.str) as y_out:
            x_in.array[:] = x
            binding = session.io_binding()
            run = rate(batch, Bench._repeat(lambda: infer(session, binding, spec, x_in.array, y_out.array),
                                            self.shape_seconds))
            copy_in = median_ms(Bench._repeat(lambda: on_device.update_inplace(x_in.array), self.copy_seconds))
            diff = float(np.abs(y_out.array.astype(np.float64) - reference).max())
        return {"library": cudart.path, "run": run, "copy_in_ms": copy_in, "max_abs_diff_vs_pageable": diff}

    def alternating(self, path: Path, spec: ModelSpec, photos: np.ndarray, fixed_ms: dict[int, float]) -> dict:
        """One session running the bucket shapes in turn, each run after a run of another shape."""
        if len(self.buckets) < 2:
            return {"rows": [], "note": "one bucket: nothing to alternate"}
        session = self.session(path)
        binding = session.io_binding()
        io = {b: (tiled(photos, b), output_buffer(spec, b)) for b in self.buckets}
        for b in self.buckets * 2:  # every shape seen (and cuDNN's algorithm search done) before timing
            infer(session, binding, spec, *io[b])
        times: dict[int, list[float]] = {b: [] for b in self.buckets}
        end = time.perf_counter() + self.shape_seconds * len(self.buckets)
        cycles = 0
        while cycles < 3 or time.perf_counter() < end:
            for b in self.buckets:
                began = time.perf_counter()
                infer(session, binding, spec, *io[b])
                times[b].append(time.perf_counter() - began)
            cycles += 1
        rows = [{"batch": b, "ms_alternating": median_ms(times[b]), "ms_fixed": fixed_ms[b],
                 "slowdown": median_ms(times[b]) / fixed_ms[b]} for b in self.buckets]
        images = sum(self.buckets)
        return {"rows": rows, "cycles": cycles,
                "cycle_img_per_s_alternating": images * 1000.0 / sum(r["ms_alternating"] for r in rows),
                "cycle_img_per_s_fixed": images * 1000.0 / sum(fixed_ms.values())}

    # --- 2: the preprocessing limit -----------------------------------------------------------

    def preprocess_limit(self) -> dict:
        spec = inspect_model(str(self.model_paths[self.models[0]]))
        paths = [str(p) for p in self.photo_paths]
        n = self.cores
        out = {"workers": n, "model_input": list(spec.input_item_shape)}

        results: list[tuple[int, float]] = []
        start_line = threading.Barrier(n, timeout=120)
        threads = [threading.Thread(target=lambda: results.append(_preprocess_loop(paths, spec, start_line,
                                                                                   self.seconds)))
                   for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["threads"] = self.preprocess_rate(results, n)

        context = multiprocessing.get_context("spawn")  # no fork of a process holding onnxruntime's threads
        start_line, queue = context.Barrier(n, timeout=120), context.Queue()
        procs = [context.Process(target=_preprocess_process, args=(paths, spec, start_line, self.seconds, queue))
                 for _ in range(n)]
        try:
            for p in procs:
                p.start()
                self.started.append((p.pid, False))
            results = [queue.get(timeout=120 + self.seconds) for _ in procs]
            for p in procs:
                p.join(30)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        out["processes"] = self.preprocess_rate(results, n)
        for how in ("threads", "processes"):
            print(f"  preprocessing, {n} {how}: {out[how]['img_per_s']:.1f} img/s", flush=True)
        return out

    @staticmethod
    def preprocess_rate(results: list[tuple[int, float]], workers: int) -> dict:
        if len(results) != workers:
            raise RuntimeError(f"{workers - len(results)} of {workers} preprocessing workers failed")
        total = sum(count / seconds for count, seconds in results)
        return {"img_per_s": total, "ms_per_image_per_worker": workers * 1000.0 / total,
                "images": sum(count for count, _ in results)}

    # --- 3: served ----------------------------------------------------------------------------

    def served_config(self, name: str, port: int, placement: str) -> dict:
        model = {"name": name, "path": str(self.model_paths[name]), "batch_size": self.batch_size,
                 "batch_buckets": self.buckets, "workers": 1,
                 "providers": [CUDA, CPU] if self.cuda else [CPU],
                 # Every client's request holds a slot: fewer slots than clients would answer 503.
                 "ring_slots": min(4096, max(64, 2 * self.batch_size, max(self.clients) + self.batch_size))}
        if self.cuda:
            model["devices"] = [0]
            cuda = {"enable_cuda_graph": self.args.cuda_graph, "pinned_ring_memory": self.args.pinned_ring_memory}
            model["cuda"] = {key: True for key, on in cuda.items() if on}
        server = {"host": "127.0.0.1", "port": port}
        # Both set explicitly: unset, a model on CUDA would get processes in either placement.
        if placement == "processes":
            server["preprocess_processes"] = self.cores
        elif placement == "fronts":
            server.update(front_processes=self.fronts, preprocess_threads=self.cores)
        else:
            server.update(preprocess_processes=0, preprocess_threads=self.cores)
        return {"server": server, "models": [model]}

    def served(self, name: str) -> dict:
        """The model served once per preprocessing placement; one placement's failure is recorded
        and the next still runs."""
        placements, errors = {}, []
        for placement in self.placements:
            try:
                placements[placement] = self.served_with(name, placement)
            except (Exception, SystemExit) as exc:
                traceback.print_exc()
                placements[placement] = {"error": describe(exc)}
                errors.append(f"{placement}: {describe(exc)}")
        return {"placements": placements, "error": "; ".join(errors) or None}

    def served_with(self, name: str, placement: str) -> dict:
        where = f"{self.fronts} front processes, {self.cores} threads in all" if placement == "fronts" else \
            f"{self.cores} {placement}"
        print(f"  {name}, preprocessing in {where}:", flush=True)
        with tempfile.TemporaryDirectory(prefix="cronnx-gpu-check-") as tmp:
            workdir = Path(tmp)
            port = free_port()
            config = self.served_config(name, port, placement)
            config_path = workdir / "cronnx.yaml"
            config_path.write_bytes(msgspec.yaml.encode(config))
            log = workdir / "server.log"
            # sh execs the server with its output in the log: the pid is the server's.
            command = ["sh", "-c", 'exec "$@" >"$0" 2>&1', str(log), sys.executable, "-m", "cronnx", "serve",
                       "--config", str(config_path)]
            base = f"http://127.0.0.1:{port}"
            server = Served(f"cronnx serve ({name}, {placement})", command, base, "/ready")
            sampler = None
            try:
                began = time.monotonic()
                with server:
                    ready_s = time.monotonic() - began
                    status = self.models_status(base, name)
                    workers = {w["pid"] for w in status["workers"] if w.get("pid")}
                    self.started += [(pid, False) for pid in workers]
                    preprocessors = preprocessing_processes(server.process.pid, workers)
                    self.started += [(pid, False) for pid in preprocessors]
                    sampler = Sampler(server.process.pid, self.nvidia_smi, workers)
                    sampler.start()
                    answers = [self.predict(base, name, p) for p in self.photo_paths[:SERVED_PHOTOS]]
                    self.served_answers.setdefault(name, {})[placement] = answers
                    runs = [{"preprocessing": placement, **self.load(base, name, clients, sampler, workdir)}
                            for clients in self.clients]
                    status = self.models_status(base, name)
                    after = preprocessing_processes(server.process.pid, {w["pid"] for w in status["workers"]})
                    self.started += [(pid, False) for pid in after if pid not in preprocessors]
                    metrics = server_stats.scrape(server_stats.metrics_url(base + "/"))
            except (Exception, SystemExit) as exc:
                raise RuntimeError(f"{describe(exc)}; server log: {self.log_tail(log)}") from None
            finally:
                if sampler is not None:
                    sampler.stop()
                process = getattr(server, "process", None)
                if process is not None:
                    self.started.append((process.pid, True))
                cleanup = self.reap_server(process)
            self.served_runs.setdefault(name, []).extend(runs)
            worker = status["workers"][0] if status["workers"] else {}
            restarts = None if metrics is None else metrics.get(("cronnx_preprocess_process_restarts_total",
                                                                  frozenset()))
            restarts = None if restarts is None else int(restarts)
            return {"preprocessing": {
                        "placement": placement, "configured": self.fronts if placement == "fronts" else self.cores,
                        # Children of the server other than its worker and the resource tracker.
                        "processes_at_start": len(preprocessors), "processes_at_end": len(after),
                        "process_restarts": restarts},
                    "server_pid": process.pid, "ready_s": ready_s, "config": config, "runs": runs,
                    "worker_providers": worker.get("providers"), "bucket_runs": worker.get("bucket_runs"),
                    "items_failed": worker.get("items_failed"), "restarts": worker.get("restarts"), "cleanup": cleanup}

    @staticmethod
    def log_tail(log: Path, lines: int = 15) -> str:
        try:
            return " | ".join(log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(none)"

    @staticmethod
    def models_status(base: str, name: str) -> dict:
        with urllib.request.urlopen(f"{base}/models", timeout=10) as response:
            models = json.loads(response.read())["models"]
        return next(m for m in models if m["name"] == name)

    @staticmethod
    def predict(base: str, name: str, photo: Path) -> dict:
        request = urllib.request.Request(f"{base}/predict/{name}?top_k={TOP_K}", data=photo.read_bytes(),
                                         headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
        return {"photo": photo.name, "predictions": body["predictions"], "batch_size": body["batch_size"]}

    def load(self, base: str, name: str, clients: int, sampler: Sampler, workdir: Path) -> dict:
        """One `cronnx bench` run (a subprocess of its own group), with the server's CPU and the GPU
        over its measuring window, and the server's own count of answered requests."""
        procs = 1 if clients == 1 else min(self.procs, clients)
        warmup = 0.5 if self.quick else (1.0 if clients == 1 else 2.0)
        out = workdir / f"bench_{clients}.json"
        command = [sys.executable, "-m", "cronnx", "bench", base, "--model", name, "--mode", "raw",
                   "--concurrency", str(clients), "--duration", str(self.seconds), "--warmup", str(warmup),
                   "--procs", str(procs), "--json", str(out)]
        for photo in self.photo_paths:
            command += ["--image", str(photo)]
        metrics = server_stats.metrics_url(base + "/")
        before = server_stats.scrape(metrics)
        launched = time.monotonic()
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.started.append((proc.pid, True))
        try:
            text, _ = proc.communicate(timeout=120 + warmup + self.seconds)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        exited = time.monotonic()
        after = server_stats.scrape(metrics)
        if proc.returncode != 0:
            raise RuntimeError(f"cronnx bench exited with {proc.returncode}: {text[-1500:]}")
        r = json.loads(out.read_text())[0]
        # The window ended before the last answers came in and the client wrote its report; the
        # load ran the same during the warm-up before it, so the interval may reach into that.
        p99_s = (r["latency_ms"]["p99"] or 0.0) / 1000.0
        end = exited - 0.3 - p99_s
        start = max(end - r["window_s"], launched + 1.0 + (3.0 if procs > 1 else 0.1))
        answered = None
        if before is not None and after is not None:
            answered = int(server_stats._sum(after, "cronnx_requests_total", model=name, outcome="success")
                           - server_stats._sum(before, "cronnx_requests_total", model=name, outcome="success"))
        server = r["server"] or {}
        run = {"clients": clients, "procs": r["procs"], "img_per_s": r["images_per_s"], "ok": r["ok"],
               "sent": r["sent"], "p50_ms": r["latency_ms"]["p50"], "p99_ms": r["latency_ms"]["p99"],
               "errors": sum(r["errors_by_status"].values()) + sum(r["errors_by_exception"].values()),
               "mean_batch": server.get("mean_batch_size"), "batch_sizes": server.get("batch_sizes"),
               "phases_ms": {k: v * 1000.0 for k, v in (server.get("phase_means_s") or {}).items()},
               "server_answered_incl_warmup": answered, **sampler.over(start, end), "bench": r}
        print(f"    {clients} clients: {run['img_per_s']:.1f} img/s, p50 {run['p50_ms']:.2f} ms, "
              f"p99 {run['p99_ms']:.2f} ms, {run['ok']}/{run['sent']} ok, mean batch "
              f"{run['mean_batch'] or 0:.2f}, server CPU {run['server_cpu_cores'] or 0:.2f} cores"
              + (f", GPU {run['gpu']['util_mean_pct']:.0f}%" if run["gpu"] else ""), flush=True)
        return run

    def reap_server(self, process) -> dict:
        """After the server's `with`: anything of its group still alive is killed (by pid) and its
        shared-memory segments are removed; both are reported (they should be empty)."""
        if process is None:
            return {}
        if process.poll() is None:  # Served's exit did not get to it
            process.kill()
            process.wait()
        deadline = time.monotonic() + 10
        while alive_in_group(process.pid) and time.monotonic() < deadline:  # workers exiting after the front
            time.sleep(0.1)
        killed = alive_in_group(process.pid)
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        removed = shm_segments(process.pid)
        for segment in removed:
            os.unlink(f"/dev/shm/{segment}")
        return {"exit_code": process.returncode, "killed_leftover_pids": killed, "removed_shm": removed}

    def reap_all(self) -> list[int]:
        """At the very end: every process this run started, and their groups, must be gone."""
        leftover = set()
        for pid, leads_group in self.started:
            leftover.update(alive_in_group(pid) if leads_group else [])
            if pid_alive(pid):
                leftover.add(pid)
        for pid in sorted(leftover):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return sorted(leftover)

    # --- 4: the GPU during the served runs ----------------------------------------------------

    def gpu(self) -> dict:
        if not self.nvidia_smi:
            return {"status": "n/a", "note": "no nvidia-smi on this machine"}
        rows = [{"model": name, "preprocessing": run["preprocessing"], "clients": run["clients"], **(run["gpu"] or {})}
                for name, runs in self.served_runs.items() for run in runs]
        return {"status": "sampled", "gpu_name": self.result["meta"]["gpu_name"], "runs": rows}

    # --- 5: parity ----------------------------------------------------------------------------

    def parity(self, name: str) -> dict:
        path = self.model_paths[name]
        spec = inspect_model(str(path))
        photos = self.tensors(spec)
        rows = self.batch_size
        reference = self.probabilities(self.session(path, CPU), spec, photos, 1)  # CPU EP, one photo a run
        variants = ([("CUDA EP, use_tf32 0", CUDA, False), ("CUDA EP, use_tf32 1", CUDA, True)] if self.cuda
                    else [("CPU EP", CPU, False)])
        out = {"photos": len(photos), "against": "CPU EP, batch 1", "variants": []}
        for label, provider, tf32 in variants:
            session = self.session(path, provider, tf32)
            single = self.probabilities(session, spec, photos, 1)
            batched = self.probabilities(session, spec, tiled(photos, rows), rows)
            expected = tiled(reference, rows)
            out["variants"].append({
                "label": label, "max_abs_diff_batch1": float(np.abs(single - reference).max()),
                f"max_abs_diff_batch{rows}": float(np.abs(batched - expected).max()),
                "max_abs_diff": float(max(np.abs(single - reference).max(), np.abs(batched - expected).max())),
                "top1_agree": int((single.argmax(1) == reference.argmax(1)).sum())})
        by_name = {p.name: i for i, p in enumerate(self.photo_paths)}
        out["served"] = {}  # placement -> the served answers against the CPU EP
        for placement, answers in self.served_answers.get(name, {}).items():
            diffs, ids_match = [], 0
            for answer in answers:
                probs = reference[by_name[answer["photo"]]]
                expected_ids = [int(i) for i in np.argsort(-probs, kind="stable")[:TOP_K]]
                served_ids = [p["class_id"] for p in answer["predictions"]]
                ids_match += served_ids == expected_ids
                diffs += [abs(p["confidence"] - probs[p["class_id"]]) for p in answer["predictions"]]
            out["served"][placement] = {"answers": len(answers), "top5_ids_match": ids_match,
                                        "max_abs_diff_top5": float(max(diffs)) if diffs else None}
        for v in out["variants"]:
            print(f"  {name} {v['label']} vs CPU EP: max |diff| {v['max_abs_diff']:.3g}", flush=True)
        return out

    def probabilities(self, session, spec: ModelSpec, photos: np.ndarray, rows: int) -> np.ndarray:
        """Probabilities of every photo, run `rows` at a time."""
        binding = session.io_binding()
        out = []
        for first in range(0, len(photos), rows):
            x = np.ascontiguousarray(photos[first:first + rows])
            y = output_buffer(spec, len(x))
            infer(session, binding, spec, x, y)
            out.append(softmax(y, spec.outputs_probabilities))
        return np.concatenate(out)


# --- the markdown --------------------------------------------------------------------------------

def _f(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _g(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _error_line(part: dict) -> list[str]:
    return [f"**error**: {part['error']}", ""] if part.get("error") else []


def issue10_targets(parts: dict) -> list[dict]:
    """Issue 10's GPU targets, per model, from this run's parts (all three need the onnxruntime,
    preprocess and served parts; a target whose figures are missing is left out):

    - throughput: the best placement's img/s at the most clients, at least 0.85 of the bound,
      min(onnxruntime alone at its best bucket with host input, as the worker binds it; the
      preprocessing limit, the better of threads and processes on all cores);
    - latency: each placement's p50 at 1 client at most preprocessing (ms per image per worker,
      all cores busy) + onnxruntime alone at batch 1 + 1 ms;
    - GPU time per batch: the served runs' inference ms per batch at the most clients at most 1.2x
      onnxruntime alone at the bucket that holds their mean batch.
    Each entry: model, target, placement, measured, limit, met."""
    ort_part, pre, served = parts.get("onnxruntime", {}), parts.get("preprocess", {}), parts.get("served", {})
    limits = [pre[how]["img_per_s"] for how in ("threads", "processes") if how in pre]
    out = []
    for name, m in served.get("models", {}).items():
        buckets = {row["batch"]: row["host"] for row in ort_part.get("models", {}).get(name, {}).get("buckets", [])
                   if "host" in row and not row["host"].get("error")}
        runs = [(placement, run) for placement, p in m.get("placements", {}).items() for run in p.get("runs", [])]
        if not buckets or not limits or not runs:
            continue
        most = max(run["clients"] for _, run in runs)
        bound = min(max(row["img_per_s"] for row in buckets.values()), max(limits))
        placement, best = max(((p, r) for p, r in runs if r["clients"] == most), key=lambda pr: pr[1]["img_per_s"])
        out.append({"model": name, "target": f"img/s at {most} clients >= 0.85 x {bound:.0f}", "placement": placement,
                    "measured": best["img_per_s"], "limit": 0.85 * bound, "met": best["img_per_s"] >= 0.85 * bound})
        if 1 in buckets:
            budget = pre["threads" if "threads" in pre else "processes"]["ms_per_image_per_worker"] \
                + buckets[1]["ms_per_batch"] + 1.0
            for placement, run in runs:
                if run["clients"] == 1:
                    out.append({"model": name, "target": "p50 ms at 1 client <= preprocessing + batch 1 + 1 ms",
                                "placement": placement, "measured": run["p50_ms"], "limit": budget,
                                "met": run["p50_ms"] <= budget})
        for placement, run in runs:
            mean = run.get("mean_batch") or 0
            bucket = min((b for b in buckets if b >= mean), default=None)
            inference = (run.get("phases_ms") or {}).get("inference")
            if run["clients"] == most and bucket is not None and inference is not None:
                alone = buckets[bucket]["ms_per_batch"]
                out.append({"model": name, "target": f"inference ms per batch <= 1.2 x alone at bucket {bucket}",
                            "placement": placement, "measured": inference, "limit": 1.2 * alone,
                            "met": inference <= 1.2 * alone})
    return out


def _targets_table(meta: dict, parts: dict) -> list[str]:
    targets = issue10_targets(parts)
    if not targets:
        return []
    on_cpu = "" if meta["provider"] == CUDA else " (set for a GPU: on the CPU EP they only show the arithmetic)"
    lines = ["", f"Issue 10's targets, from this run (`issue10_targets`){on_cpu}:", "",
             "| model | target | placement | measured | limit | met |", "| --- | --- | --- | ---: | ---: | --- |"]
    for t in targets:
        lines.append(f"| {t['model']} | {t['target']} | {t['placement']} | {t['measured']:.1f} | {t['limit']:.1f} | "
                     f"{'yes' if t['met'] else '**no**'} |")
    return lines


def _cell_error(cell: dict) -> str:
    return f"error: {cell['error'][:160]}" if cell.get("error") else ""


def _onnxruntime_tables(meta: dict, ort_part: dict) -> list[str]:
    device = meta["provider"] == CUDA
    lines = ["onnxruntime alone, one session per bucket (intra-op 1, IO binding; medians of timed runs):", ""]
    lines += _error_line(ort_part)
    lines += ["| model | batch | host input ms | host input img/s |"
              + (" device input ms | device input img/s |" if device else "")
              + " alternating shapes ms | slowdown |",
              "| --- | ---: | ---: | ---: |" + (" ---: | ---: |" if device else "") + " ---: | ---: |"]
    models = ort_part.get("models", {})
    for name, m in models.items():
        alternating = {r["batch"]: r for r in m.get("alternating", {}).get("rows", [])}
        for row in m.get("buckets", []):
            alt = alternating.get(row["batch"], {})
            cells = [name, str(row["batch"]), _f(row["host"]["ms_per_batch"], 2), _f(row["host"]["img_per_s"])]
            if device:
                dev = row.get("device", {})
                cells += ([_cell_error(dev), ""] if dev.get("error")
                          else [_f(dev.get("ms_per_batch"), 2), _f(dev.get("img_per_s"))])
            cells += [_f(alt.get("ms_alternating"), 2), _f(alt.get("slowdown"), 2) + "x" if alt else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        if m.get("alternating", {}).get("rows"):
            a = m["alternating"]
            lines.append(f"| {name} | all buckets in turn | | {_f(a['cycle_img_per_s_alternating'])} "
                         f"(fixed shapes: {_f(a['cycle_img_per_s_fixed'])}) |" + (" | |" if device else "") + " | |")
        if m.get("error"):
            lines.append(f"| {name} | error: {m['error'][:200]} |")
    lines.append("")

    graphs = [(name, m) for name, m in models.items() if isinstance(m.get("cuda_graph"), dict)]
    if graphs and all(m["cuda_graph"].get("status") == NA_CPU for _, m in graphs):
        lines += [f"CUDA graphs: {NA_CPU}.", ""]
    elif graphs:
        lines += ["CUDA graphs (`enable_cuda_graph` 1; a session per bucket, input and output bound once to "
                  "device buffers; per batch: copy in with `update_inplace`, run, copy out to a numpy array; "
                  "medians), against the same on the bucket's session without graphs, and the rows above:", "",
                  "| model | batch | graph: copy in / run / copy out ms | graph ms per batch | graph img/s "
                  "| no graph: run ms | no graph ms per batch | speed-up (per batch / run) | host input ms "
                  "| device input ms | first four runs ms | max abs diff, no graph |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, m in graphs:
            for row in m.get("buckets", []):
                g = row.get("cuda_graph", {})
                if g.get("error") or "graph" not in g:
                    lines.append(f"| {name} | {row['batch']} | {_cell_error(g) or '-'} |")
                    continue
                w, wo = g["graph"], g["no_graph"]
                lines.append(
                    f"| {name} | {row['batch']} | {_f(w['copy_in_ms'], 3)} / {_f(w['run_ms'], 3)} / "
                    f"{_f(w['copy_out_ms'], 3)} | {_f(w['ms_per_batch'], 3)} | {_f(w['img_per_s'])} | "
                    f"{_f(wo['run_ms'], 3)} | {_f(wo['ms_per_batch'], 3)} | {_f(g['speedup_total'], 2)}x / "
                    f"{_f(g['speedup_run'], 2)}x | {_f(row['host']['ms_per_batch'], 3)} | "
                    f"{_f(row.get('device', {}).get('ms_per_batch'), 3)} | "
                    f"{' / '.join(_f(ms, 0) for ms in g['first_runs_ms'])} | {_g(g['max_abs_diff_vs_no_graph'])}"
                    + ("" if g["output_follows_input"] else " (**output did not follow the input**)") + " |")
        lines.append("")

    memories = [(name, m) for name, m in models.items() if isinstance(m.get("host_memory"), dict)]
    if memories and all(m["host_memory"].get("status") == NA_CPU for _, m in memories):
        lines += [f"Pinned against pageable host memory: {NA_CPU}.", ""]
    elif memories:
        lines += ["Host memory of the input and output (CUDA): the run with both bound in pageable memory (the "
                  "host-input row above: numpy arrays), in onnxruntime's pinned memory (OrtValues of the CUDA EP "
                  "device's HOST_ACCESSIBLE memory info), and in a shared mapping like the ring's, page-locked with "
                  "`cudaHostRegister`; and the host-to-device copy of the input alone (`update_inplace` into a "
                  "device OrtValue) from each:", ""]
        sources = next((m["host_memory"].get("sources") for _, m in memories if m["host_memory"].get("sources")), {})
        for key, label in (("onnxruntime_pinned", "onnxruntime pinned"), ("cuda_host_register", "cudaHostRegister")):
            if sources.get(key):
                lines += [f"- {label}: {sources[key]}"]
        if any(sources.values()):
            lines.append("")
        lines += ["| model | batch | run ms: pageable | onnxruntime pinned | cudaHostRegister "
                  "| copy in ms: pageable | onnxruntime pinned | cudaHostRegister |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, m in memories:
            for row in m.get("buckets", []):
                h = row.get("host_memory", {})
                if h.get("error") or "pageable" not in h:
                    lines.append(f"| {name} | {row['batch']} | {_cell_error(h) or '-'} |")
                    continue

                def run(key: str, h=h) -> str:
                    cell = h.get(key, {})
                    if "status" in cell:
                        return "not measurable"
                    return _cell_error(cell) or _f(cell["run"]["ms_per_batch"], 3)

                def copy(key: str, h=h) -> str:
                    cell = h.get(key, {})
                    return "-" if "copy_in_ms" not in cell else _f(cell["copy_in_ms"], 3)

                keys = ("pageable", "onnxruntime_pinned", "cuda_host_register")
                lines.append(f"| {name} | {row['batch']} | " + " | ".join(run(k) for k in keys) + " | "
                             + " | ".join(copy(k) for k in keys) + " |")
        lines.append("")
    return lines


def markdown(result: dict) -> str:
    meta, parts = result["meta"], result["parts"]
    lines = [f"Provider {meta['provider']} ({meta['gpu_name'] or 'no GPU'}), {meta['cores']} cores, onnxruntime "
             f"{meta['onnxruntime']}, {meta['pil']}, batch size {meta['batch_size']}, buckets {meta['buckets']}"
             + (", `--quick`" if meta["quick"] else "")
             + "".join(f", served with `cuda.{s}`" + ("" if meta["provider"] == CUDA else " (ignored on the CPU EP)")
                       for s in meta.get("served_cuda_settings", [])) + ".", ""]
    if "onnxruntime" in parts:
        lines += _onnxruntime_tables(meta, parts.get("onnxruntime", {}))

    if "preprocess" in parts:
        pre = parts.get("preprocess", {})
        lines += ["Preprocessing limit (Cronnx's preprocessing of the photos, all cores):", ""]
        lines += _error_line(pre)
        lines += ["| how | img/s | ms per image per worker |", "| --- | ---: | ---: |"]
        for how in ("threads", "processes"):
            if how in pre:
                lines.append(f"| {pre['workers']} {how} | {_f(pre[how]['img_per_s'])} | "
                             f"{_f(pre[how]['ms_per_image_per_worker'], 2)} |")
        lines.append("")

    if "served" in parts:
        served = parts.get("served", {})
        lines += ["Served (`cronnx serve`, 1 worker, `cronnx bench` closed loop, raw bodies); preprocessing in the "
                  "front's threads, in preprocessing processes, or in front processes (their threads); server CPU in "
                  "cores: all (event loop thread of the main process / worker / other children, i.e. preprocessing or "
                  "front processes):", ""]
        lines += _error_line(served)
        lines += ["| model | preprocessing | clients | img/s | p50 ms | p99 ms | ok / sent | errors | mean batch "
                  "| batches by size | phases ms (pre / queue / infer) | server CPU cores (loop / worker / children) "
                  "| GPU util % mean / max | GPU MiB |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |"]
        notes = []
        for name, m in served.get("models", {}).items():
            for placement, p in m.get("placements", {}).items():
                pre_info = p.get("preprocessing", {})
                label = f"{pre_info.get('configured', '')} {placement}".strip()
                for run in p.get("runs", []):
                    sizes = ", ".join(f"<={float(b):g}: {n}" for b, n in (run["batch_sizes"] or {}).items())
                    ph = run["phases_ms"]
                    phases = " / ".join(_f(ph.get(k), 2) for k in ("preprocess", "queue", "inference"))
                    gpu = run["gpu"] or {}
                    by_part = run.get("server_cpu_by_part_cores") or {}
                    cpu = " / ".join(_f(by_part.get(k), 2) for k in ("event loop thread", "worker processes",
                                                                      "other child processes"))
                    lines.append(f"| {name} | {label} | {run['clients']} | {_f(run['img_per_s'])} | "
                                 f"{_f(run['p50_ms'], 2)} | {_f(run['p99_ms'], 2)} | {run['ok']} / {run['sent']} | "
                                 f"{run['errors']} | {_f(run['mean_batch'], 2)} | {sizes or '-'} | {phases} | "
                                 f"{_f(run['server_cpu_cores'], 2)} ({cpu}) | "
                                 f"{_f(gpu.get('util_mean_pct'), 0)} / {_f(gpu.get('util_max_pct'), 0)} | "
                                 f"{_f(gpu.get('memory_used_max_mib'), 0)} |")
                if p.get("error"):
                    lines.append(f"| {name} | {placement} | error: {p['error'][:200]} |")
                if placement == "processes" and pre_info:
                    notes.append(f"{name}: {pre_info['processes_at_start']} preprocessing processes under the server "
                                 f"at the start, {pre_info['processes_at_end']} at the end, "
                                 f"{_f(pre_info['process_restarts'], 0)} restarted.")
            if m.get("error") and not m.get("placements"):
                lines.append(f"| {name} | | error: {m['error'][:200]} |")
        if notes:
            lines += [""] + notes
        gpu_part = parts.get("gpu", {})
        if gpu_part.get("status") == "n/a":
            lines += ["", "GPU utilisation: n/a (no nvidia-smi)."]
        lines.append("")

    if "parity" in parts:
        parity = parts.get("parity", {})
        lines += ["Parity (softmax probabilities against the CPU EP, batch 1, on the photos):", ""]
        lines += _error_line(parity)
        lines += ["| model | provider | max abs diff, batch 1 | max abs diff, batch size | top-1 agree |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for name, m in parity.get("models", {}).items():
            for v in m.get("variants", []):
                batched = next(v[k] for k in v if k.startswith("max_abs_diff_batch") and k != "max_abs_diff_batch1")
                lines.append(f"| {name} | {v['label']} | {v['max_abs_diff_batch1']:.3g} | {batched:.3g} | "
                             f"{v['top1_agree']} / {m['photos']} |")
            for placement, s in (m.get("served") or {}).items():
                lines.append(f"| {name} | served `/predict` top-5, preprocessing {placement} | "
                             f"{_g(s['max_abs_diff_top5'])} | | ids match {s['top5_ids_match']} / {s['answers']} |")
    lines += _targets_table(meta, parts)
    total = result.get("total_s")
    lines += ["", "Time per part: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["timings_s"].items())
              + (f"; total {total:.1f} s." if total is not None else "; (run not finished).")]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (`argv`, default sys.argv[1:]) as Check takes it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when onnxruntime lists CUDAExecutionProvider")
    parser.add_argument("--quick", action="store_true",
                        help="seconds per measurement, MobileNetV2 only, 16 clients: a CPU-only smoke run")
    parser.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--seconds", type=float, default=None,
                        help="each served window and preprocessing measurement (default 3, --quick 2)")
    parser.add_argument("--clients", default=None, help="closed-loop clients of the served runs (default 1,256)")
    parser.add_argument("--procs", type=int, default=None, help="client processes for more than one client (4)")
    parser.add_argument("--preprocessing", default=None,
                        help="where the served runs decode, comma-separated: threads, processes, fronts "
                             "(default processes,fronts; --quick all three)")
    parser.add_argument("--fronts", type=int, default=None,
                        help="front processes of the fronts placement (default cores / 2, at least 2)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="serve with cuda.enable_cuda_graph (CUDA only): to compare with a run without")
    parser.add_argument("--pinned-ring-memory", action="store_true",
                        help="serve with cuda.pinned_ring_memory (CUDA only): to compare with a run without")
    parser.add_argument("--parts", default=None,
                        help=f"only these parts, comma-separated, of {', '.join(PARTS)} (default all; served "
                             "brings gpu): a second, shorter run, e.g. --parts served --pinned-ring-memory")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 on CUDA, 4 on the CPU")
    parser.add_argument("--photos", type=Path, default=DEFAULT_OUT, help="folder of photos (bench/photos.py)")
    parser.add_argument("--glob", default="*-1600.jpg", help="which photos of the folder")
    parser.add_argument("--json", type=Path, help="write everything here (also after every part)")
    parser.add_argument("--markdown", type=Path, help="write the tables here too (also after every part)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    faulthandler.enable()  # a crash in native code still says where, on stderr
    signal.signal(signal.SIGTERM, _terminate)
    check = Check(args)
    check.checkpoint = lambda: write_outputs(check.result, args, final=False)
    try:
        result = check.run()
    except Terminated:  # what was measured is still written
        result = check.result
        result["terminated"] = True
    table = write_outputs(result, args, final=True)
    print(table)
    if result.get("terminated"):
        sys.exit(143)


def write_outputs(result: dict, args: argparse.Namespace, final: bool) -> str:
    """The JSON (first: it holds everything) and the markdown, to the files asked for; the
    markdown's text. Before the end, the JSON says "partial": true."""
    result["partial"] = not final
    try:
        table = markdown(result)
    except Exception as exc:  # the JSON must not be lost to a table that cannot be drawn
        traceback.print_exc()
        table = f"(no tables: {describe(exc)})"
    for path, text in ((args.json, json.dumps(result, indent=1, default=str)), (args.markdown, table)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
            if final:
                print(f"wrote {path}", flush=True)
    return table


if __name__ == "__main__":
    main()
