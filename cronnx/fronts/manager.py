"""The server process's side of the front processes (`server.front_processes` > 1).

One event loop caps what one process can serve: HTTP parsing, body reading and the answer cost
about 1 ms of it per /predict request on this project's 2-core machine, so one process serving
HTTP tops out near 1,000 requests a second, below what one GPU and 16 cores of decoding can do
(the GPU targets; bench/README.md, "Front processes").
With front processes the HTTP, the body and the decode run in N processes that share one port
(SO_REUSEPORT: the kernel spreads connections over them), while the server process keeps what has
one owner: the registry, the rings and their slots, the workers and the metrics. Per request it
only passes a few small messages (`messages.py`) through the same `InferenceEngine` as
local requests, so ring rules, batching, deadlines and errors are the engine's, unchanged.

A front process that exits fails only what it held: its fills count as finished (nothing writes
any more: ring rule 4) and its requests in the engine are cancelled (their slots come back by
ring rule 5); it is replaced, after a growing pause if it dies young.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np

from cronnx.config import ServerConfig
from cronnx.engine.client import ModelView
from cronnx.engine.inference import InferenceEngine
from cronnx.engine.pool import ModelPool
from cronnx.errors import CronnxError, PreprocessingLost, to_wire
from cronnx.fronts.messages import (Abandon, Answer, Choose, Chosen, Completed, FrontStats, Drain, FrontSpec,
                                    Infer, Listening, Refused, decode_from_front, encode)
from cronnx.http.context import HttpSettings
from cronnx.ipc.child import ChildProcess
from cronnx.ipc.restarts import ChildSet
from cronnx.ipc.ring import SlotRing, pid_alive
from cronnx.observability.logs import LoggingSpec
from cronnx.observability.metrics import Metrics
from cronnx.preprocessing.messages import Fill, Filled, FillFailed, fill_error
from cronnx.preprocessing.placement import FillJob
from cronnx.preprocessing.rings import ClosedRingSweeper, MappedRings

log = logging.getLogger("cronnx.front_processes")

# A front that dies this soon after its start without serving failed to start: it is restarted
# after a growing pause (ipc.restarts.ChildSet).
YOUNG_DEATH_S = 2.0
# The folder of the server process's Unix socket: cronnx-<its pid>-<random> in the temp folder.
_SOCKET_DIR = re.compile(r"^cronnx-(\d+)-[^/]+$")


# The server process's Unix socket, in the folder `make_socket_dir` makes.
SOCKET_NAME = "server.sock"


def make_socket_dir() -> str:
    """A new folder for the server process's Unix socket, named for this process, removed by the
    server on every exit path it has (a SIGKILL leaves it: `remove_stale_socket_dirs`)."""
    return tempfile.mkdtemp(prefix=f"cronnx-{os.getpid()}-")


def remove_stale_socket_dirs() -> list[str]:
    """Remove the socket folders of server processes that no longer run (killed); returns them."""
    removed = []
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        match = _SOCKET_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.exists(os.path.join(path, SOCKET_NAME)) and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@dataclass(eq=False)
class _Front:
    """One front process and what the engine holds for it."""

    index: int
    process: ChildProcess = field(init=False)
    # Its requests in the engine, by the front's number for them.
    requests: dict[int, asyncio.Task] = field(default_factory=dict)
    # Fills sent and not answered: resolved by Filled/FillFailed, or by the front's exit.
    fills: dict[int, asyncio.Future] = field(default_factory=dict)
    rings: MappedRings = field(default_factory=MappedRings)  # what it maps
    # The pools (by generation) whose ModelView it has been sent.
    views: set[int] = field(default_factory=set)
    open_connections: int = 0
    served: int = 0
    listening: bool = False


class FrontProcesses(ChildSet[_Front]):
    """`count` front processes serving HTTP on `port` (already resolved) of `server.host`, and
    gRPC on `grpc_port` (resolved; None: not served),
    running their requests through `engine`; every other route they pass to the server
    process's app on the Unix socket `server_socket`. Create it on the running event loop;
    `drain()` stops them. `restarts` counts replacements; `pids` lists the live ones."""

    def __init__(self, count: int, server: ServerConfig, port: int, grpc_port: int | None, server_socket: str,
                 logging_spec: LoggingSpec, engine: InferenceEngine, metrics: Metrics):
        super().__init__(count, "front process", YOUNG_DEATH_S)
        self._server = server
        self._port = port
        self._grpc_port = grpc_port
        self._server_socket = server_socket
        self._logging = logging_spec
        self._engine = engine
        self._metrics = metrics
        self._loop = asyncio.get_running_loop()
        self._all_listening = self._loop.create_future()
        # Each front decodes in its share of the threads and accepts its share of the connections.
        self.threads = max(1, round(server.preprocess_threads / count))
        self._max_connections = max(1, server.max_connections // count)
        # Trace spans the fronts have dropped, by reason, in all (FrontStats).
        self.spans_dropped: dict[str, int] = {}
        for index in range(count):
            self._start(index)
        self._sweeper = ClosedRingSweeper(lambda: ((f.rings, f.process) for f in self._children if f is not None))

    def __str__(self) -> str:
        return f"{self.count} front processes, each decoding in {self.threads} thread{'s' * (self.threads != 1)}"

    @property
    def open_connections(self) -> int:
        """Connections open in all fronts, as last reported (every STATS_INTERVAL_S)."""
        return sum(f.open_connections for f in self._children if f is not None)

    async def listening(self, timeout_s: float = 60.0) -> None:
        """Wait until every front accepts connections on the port. Raises RuntimeError when one
        exits first (the port is taken by a process that does not share it, say) or none has
        within `timeout_s`."""
        try:
            await asyncio.wait_for(asyncio.shield(self._all_listening), timeout_s)
        except TimeoutError:
            raise RuntimeError(f"the front processes did not all listen within {timeout_s:g}s") from None

    def _start(self, index: int) -> None:
        spec = FrontSpec(index, HttpSettings.of(self._server), self._server.max_image_pixels, self._port,
                         self._grpc_port, self._server_socket, self.threads, self._max_connections, self._logging,
                         self._server.tracing)
        # Imported here: the front process's module pulls in what only a front needs.
        from cronnx.fronts.child import run_front_process
        front = _Front(index)
        front.process = ChildProcess(f"cronnx-front-{index}", f"front process {index}", run_front_process,
                                     (encode(spec),), encode, decode_from_front,
                                     functools.partial(self._on_message, front),
                                     functools.partial(self._on_exit, front), log, enlarge_outbox=True)
        self._children[index] = front
        log.info("front process %d starting (pid %d)", index, front.process.pid)

    def _send(self, front: _Front, message) -> None:
        try:
            front.process.send(message)
        except OSError:
            pass  # it died: its exit, handled next, answers for what it held

    def _on_message(self, front: _Front, message) -> None:
        kind = type(message)
        if kind is Infer:
            task = self._loop.create_task(self._serve(front, message))
            front.requests[message.request] = task
            task.add_done_callback(lambda _, r=message.request: front.requests.pop(r, None))
        elif kind is Filled or kind is FillFailed:
            done = front.fills.pop(message.job, None)
            if done is not None and not done.done():
                if kind is Filled:
                    done.set_result(None)
                else:
                    done.set_exception(fill_error(message))
        elif kind is Choose:
            try:
                pool = self._engine.choose(message.model, message.version, message.routing_key)
            except CronnxError as exc:
                self._send(front, Refused(message.request, to_wire(exc)))
            else:
                self._send(front, Chosen(message.request, pool.generation, _view_unless_sent(front, pool)))
        elif kind is Abandon:
            task = front.requests.get(message.request)
            if task is not None:
                task.cancel()
        elif kind is Completed:
            front.served += 1
            self._metrics.record_request(message.model, message.version, message.api, message.outcome,
                                         message.total_s, message.phases, message.rejection, message.trace)
        elif kind is Listening:
            front.listening = True
            if all(f is not None and f.listening for f in self._children) and not self._all_listening.done():
                self._all_listening.set_result(None)
        elif kind is FrontStats:
            front.open_connections = message.open
            if message.refused:
                self._metrics.connections_refused.inc(message.refused)
            if message.send_timeouts:
                self._metrics.send_timeouts.inc(message.send_timeouts)
            for reason, count in message.spans_dropped.items():
                self.spans_dropped[reason] = self.spans_dropped.get(reason, 0) + count

    async def _serve(self, front: _Front, message: Infer) -> None:
        """Run one of the front's requests through the engine and send it the answer."""
        loop = self._loop
        deadline = loop.time() + message.timeout_s
        self._metrics.in_flight.inc()
        pool = None
        try:
            with self._engine.select(message.model, message.version, message.routing_key) as pool:
                result = await self._engine.infer_filled_by(
                    pool, lambda ring, slot: self._start_fill(front, message.request, pool, ring, slot),
                    message.held_bytes, message.request_id, deadline, message.queue, message.trace)
                output: np.ndarray = result.output
                self._send(front, Answer(message.request, output.tobytes(), output.dtype.str, output.shape,
                                         result.batch_size, result.admission_s, result.queue_s, result.infer_s,
                                         pool.generation, _view_unless_sent(front, pool), result.batch_trace))
        except asyncio.CancelledError:
            pass  # abandoned by the front, or the front is gone: nobody reads an answer
        except Exception as exc:
            if not isinstance(exc, CronnxError):
                log.exception("request %s from front %d failed", message.request_id, front.index)
            self._send(front, _refusal(front, message.request, exc, pool))
        finally:
            self._metrics.in_flight.dec()

    def _start_fill(self, front: _Front, request: int, pool: ModelPool, ring: SlotRing, slot: int) -> FillJob:
        """Ask the front to decode the image it holds for `request` into `slot`: the job's `done`
        resolves on its answer (or its exit), which is when nothing writes the slot any more."""
        done = self._loop.create_future()
        front.fills[request] = done
        self._send(front, Fill(request, ring.layout.input_segment, slot, front.rings.setup_for(ring, pool.preprocess)))
        # Nothing to withdraw: the front holds the image and starts at once; its answer ends the job.
        return FillJob(done, lambda: None)

    def _on_exit(self, front: _Front, process: ChildProcess) -> None:
        # What it said before it died has been delivered (`_on_message`).
        self._children[front.index] = None
        # Nothing writes its slots any more (ring rule 4); nobody reads its answers.
        for done in front.fills.values():
            if not done.done():
                done.set_exception(PreprocessingLost("the front process exited while decoding this image"))
        front.fills.clear()
        for task in front.requests.values():
            task.cancel()
        if self._stopping:
            return
        if not self._all_listening.done():
            self._all_listening.set_exception(RuntimeError(
                f"front process {front.index} {process.exit_reason} before it listened "
                f"on port {self._port} (its log says why)"))
            return
        self._replace(front.index, process, front.served > 0)

    async def drain(self, timeout_s: float) -> None:
        """Tell every front to stop accepting and finish its requests; wait up to `timeout_s` for
        them to exit, then kill the rest."""
        self._stopping = True
        self._sweeper.cancel()
        await asyncio.gather(*(f.process.stop(Drain(), timeout_s) for f in self._children if f is not None))


def _view_unless_sent(front: _Front, pool: ModelPool) -> ModelView | None:
    """The pool's view if the front has not been sent it yet (and it now has), else None."""
    if pool.generation in front.views:
        return None
    front.views.add(pool.generation)
    return pool.view


def _refusal(front: _Front, request: int, exc: Exception, pool: ModelPool | None) -> Refused:
    """The Refused for `request`, naming the version chosen for it (`pool`) if one was."""
    if pool is None:
        return Refused(request, to_wire(exc))
    return Refused(request, to_wire(exc), pool.generation, _view_unless_sent(front, pool))
