"""One served model: its spec, preprocessing, labels, and the worker handles that run it."""

from __future__ import annotations

import asyncio
import logging as _logging
from pathlib import Path

from .config import ConfigError, ModelConfig
from .errors import RingFull, Unavailable
from .model_spec import ModelSpec
from .preprocess import Preprocessor
from .ring import SlotRing
from .supervisor import BatchObserver, WorkerHandle
from .worker import LoggingSpec, WorkerSpec

log = _logging.getLogger("cronnx.pool")


def resolve_providers(requested: list[str] | str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    missing = [p for p in requested if p not in available]
    if missing:
        raise ConfigError(f"providers {missing} are not available in this onnxruntime build; available: {available}")
    return list(requested)


def load_labels(path: str | None, num_classes: int, default_prefix: str) -> list[str]:
    if path is None:
        return [f"{default_prefix}{i}" for i in range(num_classes)]
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"labels file {path}: {exc.strerror}") from None
    labels = [line.strip() for line in lines if line.strip()]
    if len(labels) != num_classes:
        raise ConfigError(f"labels file {path} has {len(labels)} labels; the model has {num_classes} classes")
    return labels


class ModelPool:
    def __init__(self, config: ModelConfig, spec: ModelSpec, providers: list[str], labels: list[str],
                 logging: LoggingSpec, on_batch: BatchObserver):
        self.config = config
        self.spec = spec
        self.name = config.name
        self.version = config.version
        self.labels = labels
        self.top_k = config.top_k
        # A fixed batch dimension is the batch size: that many rows run, however many are waiting.
        self.batch_size = spec.fixed_batch or config.batch_size
        self.outputs_probabilities = (spec.outputs_probabilities if config.outputs == "auto"
                                      else config.outputs == "probabilities")
        self.preprocess = Preprocessor(config.preprocess, spec)
        self.workers: list[WorkerHandle] = []
        try:
            for index in range(config.worker_count):
                ring = SlotRing(f"{config.name}_v{config.version}_w{index}", config.ring_slots,
                                spec.input_item_shape, spec.input_dtype, spec.output_item_shape, spec.output_dtype)
                self.workers.append(WorkerHandle(self._worker_spec(index, ring, providers, logging), ring, on_batch))
        except BaseException:
            self.close()
            raise

    def _worker_spec(self, index: int, ring: SlotRing, providers: list[str], logging: LoggingSpec) -> WorkerSpec:
        c = self.config
        return WorkerSpec(
            model=c.name, version=c.version, index=index, model_path=str(Path(c.path).resolve()),
            model_spec=self.spec, ring=ring.layout, batch_size=self.batch_size,
            batch_timeout_s=c.batch_timeout_ms / 1000.0, providers=providers,
            device_id=c.devices[index] if c.devices else None,
            intra_op_threads=c.intra_op_threads, inter_op_threads=c.inter_op_threads,
            solo_intra_op_threads=c.solo_intra_op_threads, allow_spinning=c.allow_spinning, logging=logging)

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    @property
    def live_workers(self) -> int:
        return sum(w.live for w in self.workers)

    @property
    def state(self) -> str:
        return "ready" if self.live_workers else "loading"

    def acquire(self) -> tuple[WorkerHandle, int]:
        """A slot in the live worker with the most free slots; 503 at once when none is free."""
        best = None
        for worker in self.workers:
            if worker.live and (best is None or worker.ring.free_count > best.ring.free_count):
                best = worker
        if best is None:
            raise Unavailable(f"model {self.name!r} has no live worker (starting or restarting)")
        slot = best.ring.acquire()
        if slot is None:
            raise RingFull(f"model {self.name!r} is at capacity ({self.config.ring_slots} queued per worker)")
        return best, slot

    def submit(self, worker: WorkerHandle, slot: int, request_id: str) -> asyncio.Future:
        """Hand the filled slot to its worker, saying whether it is the model's only request."""
        in_use = sum(w.ring.slots - w.ring.free_count for w in self.workers)
        return worker.submit(slot, in_use == 1, request_id)

    async def stop(self) -> None:
        for worker in self.workers:
            await worker.stop()

    def close(self) -> None:
        for worker in self.workers:
            worker.ring.close()

