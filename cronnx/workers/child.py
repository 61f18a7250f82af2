"""A worker process: one onnxruntime session that runs batches straight from the ring memory.

Started with `spawn`: onnxruntime's thread pools do not survive fork, so the session is
created here, after the process starts.
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import msgspec
import numpy as np

from cronnx.ipc.cpu import mark_cpu_bound
from cronnx.ipc.ring import AttachedRing
from cronnx.observability.logs import setup_logging
from cronnx.observability.trace_context import TraceContext
from cronnx.workers import messages
from cronnx.workers.batcher import Batcher
from cronnx.workers.messages import WorkerSpec
from cronnx.workers.pinned_memory import PageLocked, page_aligned_zeros

log = logging.getLogger("cronnx.worker")


@functools.cache
def _preload_cuda_libraries() -> None:
    """The CUDA and cuDNN libraries of `pip install 'cronnx[gpu]'` (NVIDIA's wheels, under
    site-packages/nvidia) are on no loader path: onnxruntime loads them from there (or from the
    default paths) before its CUDA provider needs them. Once per process; nothing on the CPU build."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def create_session(spec: WorkerSpec, intra_op_threads: int):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in spec.providers:
        _preload_cuda_libraries()
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = spec.inter_op_threads
    options.log_severity_level = 3
    spinning = "1" if spec.allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    providers = [(name, spec.cuda_options) if name == "CUDAExecutionProvider" else name for name in spec.providers]
    return ort.InferenceSession(spec.model_path, options, providers=providers)


class BatchRunner:
    """Runs a list of slots through onnxruntime with IO binding.

    With buckets, each bucket has a session that only ever runs that batch size: a batch of n
    runs on the smallest bucket >= n, padded with zero rows (on the CUDA EP every change of a
    session's input shape is slow; a model's fixed batch dimension is its one bucket). Without,
    one session runs every batch at its own size. A lone request runs on the solo session (more
    threads, shaped like the smallest bucket) when there is one.

    Adjacent slots of a batch that needs no padding form one contiguous [n, C, H, W] block of
    ring memory, bound as is; other batches are gathered once into a staging buffer. With
    `spec.device_buffers` (CUDA graphs), each session's input and output are instead buffers on
    that device, bound once: the batch is copied in before the run and out after it. With
    `spec.pinned_host_memory`, the ring's segments and the staging buffers are page-locked for the
    runner's life (`pinned_memory.py`); CudaHostError when CUDA refuses, which fails the model's
    load.
    """

    def __init__(self, spec: WorkerSpec, ring: AttachedRing, new_session: Callable[[int], object]):
        """`new_session(intra_op_threads)` builds one onnxruntime session of the model."""
        self.ring = ring
        self.input_name = spec.model_spec.input_name
        self.output_name = spec.model_spec.output_name
        self.buckets = spec.batch_buckets
        import onnxruntime as ort

        sizes = self.buckets or [None]
        device = spec.device_buffers
        if device is not None and not self.buckets:
            raise ValueError("device buffers need batch buckets: one input shape per session")

        def bound(threads: int, size: int | None) -> _Bound:
            session = new_session(threads)
            binding = session.io_binding()
            fits = _declared_output_fits(session.get_outputs()[0].shape, ring.outputs.shape[1:])
            if device is None:
                return _Bound(session, binding, output_fits=fits)
            if not fits:
                raise ValueError(f"output {self.output_name!r} is declared {session.get_outputs()[0].shape} but "
                                 f"computes [N, {', '.join(map(str, ring.outputs.shape[1:]))}]: device buffers "
                                 "(CUDA graphs) need the declared shape; fix the model's output shape, or turn "
                                 "cuda.enable_cuda_graph off")
            x = ort.OrtValue.ortvalue_from_shape_and_type([size, *ring.inputs.shape[1:]], ring.inputs.dtype.type,
                                                          device, spec.device_id)
            y = ort.OrtValue.ortvalue_from_shape_and_type([size, *ring.outputs.shape[1:]], ring.outputs.dtype.type,
                                                          device, spec.device_id)
            binding.bind_ortvalue_input(self.input_name, x)
            binding.bind_ortvalue_output(self.output_name, y)
            return _Bound(session, binding, x, y)

        self._sessions = {size: bound(spec.intra_op_threads, size) for size in sizes}
        self._solo = (bound(spec.solo_intra_op_threads, self.rows_for(1)) if spec.solo_intra_op_threads else None)
        rows = spec.batch_size
        zeros = page_aligned_zeros if spec.pinned_host_memory else np.zeros
        self.stage_in = zeros((rows, *ring.inputs.shape[1:]), ring.inputs.dtype)
        self.stage_out = zeros((rows, *ring.outputs.shape[1:]), ring.outputs.dtype)
        # After the sessions: the CUDA EP has loaded the CUDA runtime by then.
        self._page_locked = PageLocked({"the ring's inputs": ring.inputs, "the ring's outputs": ring.outputs,
                                        "the input staging buffer": self.stage_in,
                                        "the output staging buffer": self.stage_out}) \
            if spec.pinned_host_memory else None

        # A failed run is reported by its exception, which the worker logs as JSON; onnxruntime's
        # own copy of it would be a second, unstructured line on stderr.
        self.run_options = ort.RunOptions()
        self.run_options.log_severity_level = 4

    def close(self) -> None:
        """Unlocks the page-locked memory, if any (before the ring is unmapped)."""
        if self._page_locked is not None:
            self._page_locked.close()

    @property
    def providers(self) -> list[str]:
        return next(iter(self._sessions.values())).session.get_providers()

    def rows_for(self, n: int) -> int:
        """The batch dimension a batch of n requests runs with: its bucket, or n without buckets."""
        if not self.buckets:
            return n
        return self.buckets[bisect.bisect_left(self.buckets, n)]

    def run(self, slots: list[int], solo: bool = False) -> int:
        """Run the slots' inputs into their outputs; returns the batch dimension it ran with."""
        n = len(slots)
        rows = self.rows_for(n)
        bound = self._solo if solo and self._solo is not None else self._sessions[rows if self.buckets else None]
        if rows == n and _is_run(slots):
            first = min(slots)
            self._infer(bound, self.ring.inputs[first:first + n], self.ring.outputs[first:first + n])
            return rows
        np.take(self.ring.inputs, slots, axis=0, out=self.stage_in[:n])
        if rows > n:
            self.stage_in[n:rows] = 0  # padding rows: each row's result depends on its own input only
        self._infer(bound, self.stage_in[:rows], self.stage_out[:rows])
        self.ring.outputs[slots] = self.stage_out[:n]
        return rows

    def run_isolating_failures(self, slots: list[int], solo: bool = False) -> tuple[int, dict[int, str]]:
        """Run the batch; if onnxruntime fails, run its items one by one, so that only the items
        that fail by themselves fail. Returns the batch dimension the batch ran with, and what
        onnxruntime said for each failed slot."""
        try:
            return self.run(slots, solo), {}
        except Exception as exc:  # onnxruntime's errors derive from Exception only
            if len(slots) == 1:
                return self.rows_for(1), {slots[0]: _short(exc)}
        failed = {}
        for slot in slots:
            try:
                self.run([slot])
            except Exception as exc:
                failed[slot] = _short(exc)
        return self.rows_for(1), failed

    def healthy(self) -> bool:
        """Whether the smallest session still runs a zero input: after a device error (a CUDA
        fault, say) it may fail everything, and only a new process recovers."""
        rows = self.rows_for(1)
        # The staging rows may still hold the input that just failed: check on zeros.
        self.stage_in[:rows] = 0
        try:
            self._infer(self._sessions[rows if self.buckets else None], self.stage_in[:rows], self.stage_out[:rows])
            return True
        except Exception:
            return False

    def _infer(self, bound: _Bound, inputs: np.ndarray, outputs: np.ndarray) -> None:
        """Run `inputs` (host memory, [rows, ...]) into `outputs`, on `bound`'s session."""
        binding = bound.binding
        if bound.device_input is None:
            binding.bind_input(self.input_name, "cpu", 0, inputs.dtype.type, list(inputs.shape), inputs.ctypes.data)
            if not bound.output_fits:  # onnxruntime allocates the output, and it is copied over
                binding.bind_output(self.output_name, "cpu")
                bound.session.run_with_iobinding(binding, self.run_options)
                outputs[...] = binding.get_outputs()[0].numpy().reshape(outputs.shape)
                return
            binding.bind_output(self.output_name, "cpu", 0, outputs.dtype.type, list(outputs.shape),
                                outputs.ctypes.data)
            bound.session.run_with_iobinding(binding, self.run_options)
            return
        bound.device_input.update_inplace(inputs)  # host -> device, into the address the graph reads
        bound.session.run_with_iobinding(binding, self.run_options)
        outputs[...] = bound.device_output.numpy()  # device -> host (on "cpu", a view: copied now)

    def warm_up(self) -> None:
        """Runs on zeros (staging memory, not the ring) of every shape a session will see, before
        the worker says Ready, so that no request pays for a session's first runs. Three runs
        each: onnxruntime captures a CUDA graph on a session's second or third run (by version)."""
        self.stage_in[:] = 0
        for size, bound in self._sessions.items():
            shapes = [size] if size is not None else [1, len(self.stage_in)]
            for rows in shapes * 3:
                self._infer(bound, self.stage_in[:rows], self.stage_out[:rows])
        if self._solo is not None:
            rows = self.rows_for(1)
            for _ in range(3):
                self._infer(self._solo, self.stage_in[:rows], self.stage_out[:rows])


class _Bound(msgspec.Struct):
    """A session with its IO binding and, with device buffers, the input and output OrtValues
    bound to it once. `output_fits`: the model's declared output shape admits the computed one
    (`_declared_output_fits`), so the output can be bound to ring memory as it is."""

    session: object
    binding: object
    device_input: object = None
    device_output: object = None
    output_fits: bool = True


def _declared_output_fits(declared: list, item_shape: tuple[int, ...]) -> bool:
    """Whether onnxruntime accepts an output buffer of shape [rows, *item_shape] for an output
    declared `declared` (the graph's shape: ints, and names or None for symbolic dimensions).
    With IO binding it checks a bound buffer against the declaration and fails the run ("Got
    invalid dimensions for output") where a plain run only warns: a declaration that shape
    inference could not correct (an output reshaped to a computed shape) would fail every batch.
    The batch dimension is the runner's own business."""
    return len(declared) == 1 + len(item_shape) and all(
        not isinstance(d, int) or d == c for d, c in zip(declared[1:], item_shape))


# Enough of onnxruntime's message to say which node failed and why.
MAX_ERROR_CHARS = 600


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


def _is_run(slots: list[int]) -> bool:
    return max(slots) - min(slots) == len(slots) - 1


class LoopClock:
    """When the batch loop began its current step (time.monotonic), None while it waits for work:
    what the liveness thread reports. One attribute, written by the loop, read by the thread."""

    def __init__(self):
        self.busy_since: float | None = None

    def busy_s(self) -> float:
        since = self.busy_since
        return 0.0 if since is None else max(0.0, time.monotonic() - since)


Send = Callable[[bytes], None]


def serialised_sender(outbox: Connection) -> Send:
    """Two threads write the outbox (the batch loop and the liveness thread), and a message above
    PIPE_BUF (a Failed with long errors) takes several write() calls: one writer at a time."""
    lock = threading.Lock()
    send_bytes = outbox.send_bytes

    def send(message: bytes) -> None:
        with lock:
            send_bytes(message)
    return send


def answer_pings(pings: Connection, send: Send, clock: LoopClock) -> None:
    """The liveness thread: answers each Ping at once with how long the loop has been busy."""
    try:
        while True:
            ping = messages.decode_ping(pings.recv_bytes())
            send(messages.encode(messages.Pong(ping.seq, clock.busy_s())))
    except (EOFError, OSError):
        pass  # the server process is gone


def serve_batches(inbox: Connection, send: Send, batcher: Batcher, runner: BatchRunner,
                  spec: WorkerSpec, clock: LoopClock) -> None:
    """Collect submits into batches and run them until told to stop or the server process goes
    away."""
    decode = messages.decode_to_worker
    encode = messages.encode
    request_ids: dict[int, str] = {}
    traced: set[int] = set()  # slots whose requests are traced: their batch gets a span
    log_batches = log.isEnabledFor(logging.INFO)

    def report_failures(failed: dict[int, str], batch_size: int) -> None:
        send(encode(messages.Failed(list(failed), list(failed.values()))))
        for slot, error in failed.items():
            log.error("inference failed", extra={"fields": {
                "model": spec.model, "version": spec.version, "worker": spec.index, "batch_size": batch_size,
                "request_id": request_ids.pop(slot, ""), "error": error}})

    def read_available() -> bool:
        """Apply every message already in the pipe; False when told to stop."""
        while True:
            msg = decode(inbox.recv_bytes())
            if type(msg) is messages.Submit:
                batcher.add(msg.slot, msg.enqueued, msg.filling, msg.alone, msg.priority)
                request_ids[msg.slot] = msg.request_id
                if msg.traced:
                    traced.add(msg.slot)
                elif traced:
                    traced.discard(msg.slot)
            elif type(msg) is messages.Cancel:
                if batcher.cancel(msg.slot):
                    request_ids.pop(msg.slot, None)
                    traced.discard(msg.slot)
                    send(encode(messages.Dropped(msg.slot)))
            else:
                return False
            if not inbox.poll(0):
                return True

    while True:
        now = clock.busy_since = time.monotonic()
        wait = batcher.wait_time(now)
        if wait != 0.0:
            # Sleep until a message comes or the oldest request's window closes.
            clock.busy_since = None
            ready = inbox.poll(wait)
            clock.busy_since = time.monotonic()
            if ready:
                if not read_available():
                    return
                continue
        elif inbox.poll(0):
            # A batch is due, but cancels that already arrived must not be computed.
            if not read_available():
                return
            if batcher.wait_time(time.monotonic()) != 0.0:
                continue
        slots, enqueued, solo = batcher.take()
        started = time.monotonic()
        rows, failed = runner.run_isolating_failures(slots, solo)
        infer_s = time.monotonic() - started
        queue_s = [started - t for t in enqueued]
        if failed:
            report_failures(failed, len(slots))
            traced.difference_update(failed)
            kept = [i for i, slot in enumerate(slots) if slot not in failed]
            slots, queue_s = [slots[i] for i in kept], [queue_s[i] for i in kept]
        if slots:
            trace = None
            if traced and not traced.isdisjoint(slots):
                trace = TraceContext.new()
                traced.difference_update(slots)
            # Ring rule 2: the outputs are written (run returned); from here the server process may
            # reuse the slots.
            send(encode(messages.Done(slots, queue_s, infer_s, rows, started, trace)))
            ids = [request_ids.pop(slot, "") for slot in slots]
            if log_batches:
                fields = {"model": spec.model, "version": spec.version, "worker": spec.index, "batch_size": len(slots),
                          "rows": rows, "solo": solo, "infer_ms": infer_s * 1000.0,
                          "oldest_wait_ms": max(queue_s) * 1000.0, "request_ids": ids}
                if trace is not None:
                    fields["trace_id"], fields["span_id"] = trace.trace_id_hex, trace.span_id_hex
                log.info("batch", extra={"fields": fields})
        if failed and not runner.healthy():
            log.error("the session fails on the warm-up input too; exiting so that a new worker replaces this one",
                      extra={"fields": {"model": spec.model, "version": spec.version, "worker": spec.index}})
            raise SystemExit(messages.EXIT_SESSION_BROKEN)


def worker_main(spec_bytes: bytes, inbox: Connection, outbox: Connection, pings: Connection) -> None:
    # Ctrl-C and SIGTERM reach the whole process group; the server process decides when a
    # worker stops (after in-flight work is answered), by a Stop message or by closing the pipe.
    # SIGHUP asks the server process to reload; a terminal's hangup reaches the whole group too.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    spec = msgspec.msgpack.decode(spec_bytes, type=WorkerSpec)
    mark_cpu_bound()
    setup_logging(spec.logging.level, spec.logging.format)
    send = serialised_sender(outbox)
    ring = AttachedRing(spec.ring)
    runner = None
    try:
        try:
            runner = BatchRunner(spec, ring, lambda threads: create_session(spec, threads))
            runner.warm_up()
        except Exception as exc:
            # The server process logs this text and shows it as the reason the model did not load.
            send(messages.encode(messages.LoadFailed(_short(exc))))
            raise SystemExit(1) from None
        clock = LoopClock()
        send(messages.encode(messages.Ready(os.getpid(), runner.providers)))
        threading.Thread(target=answer_pings, args=(pings, send, clock), name="cronnx-liveness", daemon=True).start()
        serve_batches(inbox, send, Batcher(spec.batch_size, spec.batch_timeout_s), runner, spec, clock)
    except (EOFError, BrokenPipeError):
        pass  # the server process is gone: nobody is waiting for answers
    finally:
        if runner is not None:
            runner.close()
        ring.close()
