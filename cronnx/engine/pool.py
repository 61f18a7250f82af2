"""One served model version: what it is (spec, labels, preprocessing), its workers and their rings
(kept alive by its `Supervisor`), and the requests that chose it (so that it can drain)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from cronnx.engine.admission import AdmissionQueue, QueueMemory
from cronnx.engine.client import ModelView
from cronnx.ipc.ring import SharedMemoryFull, SlotRing
from cronnx.observability.logs import LoggingSpec
from cronnx.preprocessing.transform import Preprocessor
from cronnx.workers.entry import run_worker
from cronnx.workers.messages import WorkerSpec
from cronnx.workers.process import WorkerTarget
from cronnx.workers.supervisor import BatchObserver, Liveness, Supervisor, Worker

if TYPE_CHECKING:
    from cronnx.models.catalog import PreparedVersion


class VersionLoadFailed(Exception):
    """A version's workers could not start; the message says why."""


class ModelPool:
    """One version of one model: its rings and workers, and the requests it is serving.

    `worker_target` is the function each worker process runs (`workers.entry.run_worker`: the real
    worker; tests start a worker with faults injected). `queue_memory` is the server's budget for
    the bodies of waiting requests, shared by every version.
    """

    def __init__(self, prepared: PreparedVersion, generation: int, logging: LoggingSpec, on_batch: BatchObserver,
                 liveness: Liveness, queue_memory: QueueMemory, worker_target: WorkerTarget = run_worker):
        model = prepared.model
        config = model.config
        spec = prepared.spec
        self.model = model
        self.config = config
        self.spec = spec
        self.name = model.name
        self.version = model.version
        self.generation = generation  # unique among the pools of one registry
        self.fingerprint = prepared.fingerprint
        # The bytes every worker of this version loads, its restarts included: held as long as
        # the pool, so that no overwrite of the model file reaches a worker started later.
        self.file = prepared.file
        self.labels = prepared.labels
        self.top_k = config.top_k
        self.batch_size = prepared.batch_size
        self.batch_buckets = prepared.batch_buckets
        self.outputs_probabilities = (spec.outputs_probabilities if config.outputs == "auto"
                                      else config.outputs == "probabilities")
        self.preprocess = Preprocessor(config.preprocess, spec)
        # What protocol handlers read of it (the `Selection` a request gets in this process).
        self.view = ModelView(self.name, self.version, self.top_k, self.outputs_probabilities, self.labels, spec,
                              self.batch_size)
        # Requests that chose this version and have not answered yet; a draining pool stops
        # once it reaches zero.
        self.in_flight = 0
        # Set once its registry routes requests to it: until then it is "loading", even with its
        # workers live (the others of its reload may still be loading).
        self.serving = False
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.workers: list[Worker] = []
        try:
            for index in range(config.worker_count):
                ring = SlotRing(f"{model.name}_v{model.version}_g{generation}_w{index}", config.ring_slots,
                                spec.input_item_shape, spec.input_dtype, spec.output_item_shape, spec.output_dtype)
                self.workers.append(Worker(self._worker_spec(index, ring, prepared.providers, logging), ring))
        except SharedMemoryFull as exc:
            self.close()
            raise VersionLoadFailed(str(exc)) from None
        except OSError as exc:  # no file descriptor or memory left for it: this version fails alone
            self.close()
            raise VersionLoadFailed(f"its rings could not be made: {exc}") from None
        except BaseException:
            self.close()
            raise
        # Requests that find every slot taken wait here; each freed slot, and each worker turning
        # live, hands slots on to them.
        self.admission = AdmissionQueue(model.name, self.workers, config, queue_memory)
        for worker in self.workers:
            worker.ring.on_release = self.admission.slot_freed
        self.supervisor = Supervisor(self.workers, worker_target, liveness, on_batch, self.admission.slot_freed)

    def _worker_spec(self, index: int, ring: SlotRing, providers: list[str], logging: LoggingSpec) -> WorkerSpec:
        c = self.config
        device = c.devices[index] if c.devices else None
        cuda = "CUDAExecutionProvider" in providers
        graphs = c.cuda.enable_cuda_graph and cuda
        return WorkerSpec(
            model=self.name, version=self.version, index=index, model_path=self.file.path,
            model_spec=self.spec, ring=ring.layout, batch_size=self.batch_size, batch_buckets=self.batch_buckets,
            batch_timeout_s=c.batch_timeout_ms / 1000.0, providers=providers,
            cuda_options=c.cuda.provider_options(device), device_buffers="cuda" if graphs else None,
            device_id=device or 0, pinned_host_memory=c.cuda.pinned_ring_memory and cuda,
            intra_op_threads=c.intra_op_threads, inter_op_threads=c.inter_op_threads,
            solo_intra_op_threads=c.solo_intra_op_threads, allow_spinning=c.allow_spinning, logging=logging)

    def start(self) -> None:
        """Spawn its workers. Raises VersionLoadFailed when one cannot be started (no file
        descriptor or process left); those already started stop when the pool is drained."""
        try:
            self.supervisor.start()
        except OSError as exc:
            raise VersionLoadFailed(f"its workers could not be started: {exc}") from None

    async def wait_ready(self, timeout_s: float) -> None:
        """Until every worker has loaded and warmed up; VersionLoadFailed if one exits first or time runs out."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not all(w.live for w in self.workers):
            failed = next((w for w in self.workers if w.failed_starts), None)
            if failed is not None:
                raise VersionLoadFailed(f"worker {failed.name} {failed.last_exit}")
            if asyncio.get_running_loop().time() > deadline:
                raise VersionLoadFailed(f"workers not ready after {timeout_s:g}s")
            await asyncio.sleep(0.02)

    @property
    def live_workers(self) -> int:
        return sum(w.live for w in self.workers)

    @property
    def slots_in_use(self) -> int:
        """Slots of this version's rings holding a request (filling or sent)."""
        return sum(w.ring.in_use for w in self.workers)

    @property
    def state(self) -> str:
        """"draining"; "ready" while requests are routed to it and a worker is live; else "loading"."""
        if self.draining:
            return "draining"
        return "ready" if self.serving and self.live_workers else "loading"

    def enter(self) -> None:
        """A request chose this version."""
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self) -> None:
        """Stop being chosen (the registry already removed it), finish in-flight requests, stop."""
        self.draining = True
        await self._idle.wait()
        # An abandoned fill's preprocessing thread may still be writing into its slot (ring rule 4).
        while any(w.ring.filling_count for w in self.workers):
            await asyncio.sleep(0.01)
        await self.supervisor.stop()
        self.close()

    def close(self) -> None:
        for worker in self.workers:
            worker.ring.close()
