"""`cronnx serve`: check every model, start the server process's parts in order, serve until
SIGTERM or SIGINT, reload on SIGHUP, and stop the parts in reverse order."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

from aiohttp import web

from cronnx.config import Config, ConfigError, ServerConfig
from cronnx.engine.admission import QueueMemory
from cronnx.engine.inference import InferenceEngine
from cronnx.engine.local import LocalClient
from cronnx.engine.pool import ModelPool
from cronnx.engine.registry import Registry
from cronnx.fronts.manager import SOCKET_NAME, FrontProcesses, make_socket_dir, remove_stale_socket_dirs
from cronnx.http.app import make_app, make_runner
from cronnx.http.context import HttpSettings
from cronnx.http.listener import listen, reserve_port
from cronnx.ipc.segments import release_names, remove_stale_segments
from cronnx.models import catalog, runtime
from cronnx.models.catalog import Key, ModelVersion, PreparedVersion
from cronnx.observability.logs import LoggingSpec
from cronnx.observability.metrics import Metrics
from cronnx.observability.trace_context import TraceContext
from cronnx.observability.trace_settings import protocol, start_tracing, wanted
from cronnx.preprocessing.placement import Preprocessing
from cronnx.preprocessing.placement import start as start_preprocessing
from cronnx.preprocessing.transform import pil_build, set_max_image_pixels
from cronnx.server.metadata import ServerMetadata
from cronnx.server.reload import Reloader
from cronnx.server.routes import add_server_routes
from cronnx.server.state import ServerState
from cronnx.workers import messages
from cronnx.workers.supervisor import BatchObserver, Liveness, Worker

if TYPE_CHECKING:
    import grpc

    from cronnx.observability.tracing import Tracing

log = logging.getLogger("cronnx.server")


def _stop_starting(signum, frame) -> None:
    raise SystemExit(0)


def run_server(config: Config, config_path: str, overrides: dict[str, object] | None = None) -> int:
    """Serve `config` (read from `config_path` with the command line's `overrides`, which every
    reload applies again) until SIGTERM or SIGINT; 0 when stopped. Raises ConfigError for a model
    the config names that cannot be served, before anything starts."""
    # A SIGHUP before the server can reload would end the process: ignore it until then.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # SIGTERM and SIGINT before the event loop takes them over (to drain) end the start-up: nothing
    # is served yet. As a container's PID 1 a signal without a handler would be dropped by the
    # kernel, and `docker stop` would wait out its timeout and kill.
    signal.signal(signal.SIGTERM, _stop_starting)
    signal.signal(signal.SIGINT, _stop_starting)
    set_max_image_pixels(config.server.max_image_pixels)
    if wanted(config.server.tracing):
        protocol()  # a protocol Cronnx cannot export with is a config error, before anything starts
    removed = remove_stale_segments()
    if removed:
        log.warning("removed %d shared-memory segments and lock files left by killed runs: %s", len(removed),
                    ", ".join(removed))
    removed = remove_stale_socket_dirs()
    if removed:
        log.warning("removed the socket folders of killed runs: %s", ", ".join(removed))
    onnxruntime_build = runtime.describe()
    # At start-up every model the config names must be servable: any problem is a config error
    # (exit 2). A model found in the model repository was named by no one: one that cannot be
    # served is refused alone (failed, with the reason) and the others serve. A demo model still
    # to be built is built once the port is open, so that /ready answers 503 ("loading")
    # meanwhile instead of the port being closed.
    versions, failed = catalog.all_versions(config, config_path)
    to_build = [v for v in versions if catalog.needs_demo_build(v)]
    prepared: list[PreparedVersion] = []
    for version in versions:
        if catalog.needs_demo_build(version):
            continue
        try:
            prepared.append(catalog.prepare(version))
        except ConfigError as exc:
            if not version.in_repository:
                raise
            failed[(version.name, version.version)] = str(exc)
    log.info("config %s; %s; %s", config_path, pil_build(), onnxruntime_build)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(config.server, config_path, overrides or {}, prepared, to_build, failed))
    else:
        uvloop.run(_serve(config.server, config_path, overrides or {}, prepared, to_build, failed))
    return 0


async def _first_load(registry: Registry, prepared: list[PreparedVersion], to_build: list[ModelVersion],
                      failed: dict[Key, str]) -> None:
    """Build the demo models still missing, then load every model, and record the models already
    refused (`failed`); /ready answers 503 until done. An admin unload answered meanwhile wins
    over this load (`Registry.begin`)."""
    ticket = registry.begin()
    failed = dict(failed)
    for version in to_build:
        try:
            prepared.append(await asyncio.to_thread(catalog.prepare, version))
        except ConfigError as exc:
            failed[(version.name, version.version)] = str(exc)
    for p in prepared:
        c = p.model.config
        log.info("model %s v%d: %s, input %s %s %s %s, batch %d / %.1f ms, %d worker(s), providers %s",
                 p.model.name, p.model.version, p.model.path, p.spec.input_name, p.spec.layout,
                 p.spec.input_dtype, list(p.spec.input_item_shape), p.batch_size,
                 c.batch_timeout_ms, c.worker_count, ",".join(p.providers))
    await registry.apply(prepared, failed, {p.model.name for p in prepared} | {name for name, _ in failed}, ticket)


def _may_use_cuda(providers: list[str] | str) -> bool:
    """A model still to be built will run on CUDA (its providers are resolved when it is built)."""
    try:
        return "CUDAExecutionProvider" in catalog.resolve_providers(providers)
    except ConfigError:
        return False  # its load will fail and say why


async def _serve(server: ServerConfig, config_path: str, overrides: dict[str, object],
                 prepared: list[PreparedVersion], to_build: list[ModelVersion], failed: dict[Key, str]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    on_cuda = any("CUDAExecutionProvider" in p.providers for p in prepared) or any(
        _may_use_cuda(v.config.providers) for v in to_build)
    parts = ServerProcess(server, config_path, overrides)
    try:
        parts.start_preprocessing(on_cuda)
        parts.start_engine()
        await parts.listen()
        parts.load(prepared, to_build, failed)
        await stop.wait()
        parts.drain()
    finally:
        await parts.stop()


class ServerProcess:
    """The server process's parts, each started by one step, in this order: preprocessing, the
    engine (metrics, registry, reloader), the listener (this process's port, or the front
    processes and the Unix socket they pass routes to), the models' first load. `stop` undoes
    whichever steps ran, in reverse order."""

    def __init__(self, server: ServerConfig, config_path: str, overrides: dict[str, object]):
        self.server = server
        self.config_path = config_path
        self.overrides = overrides
        self.loop = asyncio.get_running_loop()
        self.preprocessing: Preprocessing | None = None
        self.metrics: Metrics | None = None
        self.registry: Registry | None = None
        self.reloader: Reloader | None = None
        self.engine: InferenceEngine | None = None
        self.state: ServerState | None = None
        self.tracing: Tracing | None = None  # observability.tracing's, when this server traces
        self.runner: web.AppRunner | None = None
        # This process listens on the port (`listening`), or front processes do (`fronts`) on
        # the ports `reserved` holds for them (HTTP's, then gRPC's), and pass other routes on to
        # a socket in `socket_dir`.
        self.listening: asyncio.AbstractServer | None = None
        self.fronts: FrontProcesses | None = None
        self.reserved: list[socket.socket] = []
        # This process's gRPC server (front processes serve gRPC themselves).
        self.grpc: grpc.aio.Server | None = None
        self.socket_dir: str | None = None
        self._background: set[asyncio.Task] = set()

    def start_preprocessing(self, on_cuda: bool) -> None:
        server = self.server
        if server.front_processes > 1:
            # The fronts decode every image: the engine's own preprocessing (one thread) is not used.
            self.preprocessing = start_preprocessing(0, 1, on_cuda, server.max_image_pixels, server.request_timeout_s,
                                                     self._logging())
        else:
            self.preprocessing = start_preprocessing(server.preprocess_processes, server.preprocess_threads, on_cuda,
                                                     server.max_image_pixels, server.request_timeout_s,
                                                     self._logging())
            log.info("preprocessing in %s", self.preprocessing)

    def start_engine(self) -> None:
        """The metrics, the registry (no model yet), the reloader and the engine over them."""
        server = self.server
        self.tracing = start_tracing(server.tracing, "server")
        if self.tracing is not None:
            log.info(self.tracing.describe())
        # Metrics read the registry's pools at each scrape; the registry reports batches to metrics.
        self.metrics = Metrics(self._pools, tuple(server.latency_buckets_s), open_connections=self._open_connections,
                               preprocessing_restarts=lambda: self.preprocessing.restarts,
                               spans_dropped=self._spans_dropped)
        liveness = Liveness(server.worker_ping_interval_s, server.worker_ping_timeout_s, server.batch_run_timeout_s)
        self.registry = Registry(self._logging(), self._batch_observer, server.model_load_timeout_s, liveness,
                                 QueueMemory(server.max_queue_bytes))
        self.reloader = Reloader(self.registry, self.config_path, self.overrides)
        self.engine = InferenceEngine(self.registry, self.preprocessing)
        self.state = ServerState(server, self.engine, self.reloader, self.metrics)

    async def listen(self) -> None:
        """Serve HTTP: on the port from this process, or from the front processes (started here,
        and awaited until they all listen)."""
        server = self.server
        settings = HttpSettings.of(server)
        client = LocalClient(self.engine, self.metrics)
        app = make_app(client, settings, self.tracing)
        add_server_routes(app, self.state)
        self.runner = make_runner(app, settings)
        await self.runner.setup()
        if server.front_processes == 1:
            self.listening = await listen(self.runner, server.host, server.port, server.max_connections,
                                          server.send_timeout_s, _CountedConnections(self.metrics))
            host, port = self.listening.sockets[0].getsockname()[:2]
            log.info("serving on http://%s:%d", host, port)
            if server.grpc_port is not None:
                # Imported only to serve it: grpcio and the generated modules cost start-up time
                # and memory, and the GPU machine's check runs without them.
                from cronnx.grpc.server import start_grpc
                self.grpc, grpc_port = await start_grpc(
                    client, ServerMetadata(self.state), server.host, server.grpc_port, server.max_body_bytes,
                    server.request_timeout_s, server.idle_timeout_s, server.max_connections, self.tracing,
                    reuse_port=False)
                log.info("serving gRPC on %s:%d", host, grpc_port)
            return
        # The fronts serve the ports; this process answers them (and every route they pass on) on
        # a Unix socket of its own.
        self.reserved = [reserve_port(server.host, server.port)]
        host, port = self.reserved[0].getsockname()[:2]
        grpc_port = None
        if server.grpc_port is not None:
            self.reserved.append(reserve_port(server.host, server.grpc_port))
            grpc_port = self.reserved[1].getsockname()[1]
        self.socket_dir = make_socket_dir()
        server_socket = os.path.join(self.socket_dir, SOCKET_NAME)
        await web.UnixSite(self.runner, server_socket).start()
        self.fronts = self.state.fronts = FrontProcesses(server.front_processes, server, port, grpc_port,
                                                         server_socket, self._logging(), self.engine, self.metrics)
        await self.fronts.listening()
        log.info("serving on http://%s:%d in %s", host, port, self.fronts)
        if grpc_port is not None:
            log.info("serving gRPC on %s:%d in the front processes", host, grpc_port)

    def load(self, prepared: list[PreparedVersion], to_build: list[ModelVersion], failed: dict[Key, str]) -> None:
        """Load the models (in the background: /ready answers 503 meanwhile, and each model's
        routes 503 "loading"), `failed` being those refused already with the reason; reload on
        SIGHUP from now on."""
        self.registry.pending = {(p.model.name, p.model.version) for p in prepared} | {
            (v.name, v.version) for v in to_build}
        self._in_background(_first_load(self.registry, prepared, to_build, failed))
        self.loop.add_signal_handler(signal.SIGHUP, lambda: self._in_background(self.reloader.on_sighup()))

    def drain(self) -> None:
        """/ready answers 503 from here on, and no new request is taken."""
        self.engine.draining = True
        log.info("shutting down: finishing in-flight requests")

    async def stop(self) -> None:
        """Stop what runs, in reverse order: requests in progress finish first (those of front
        processes too, which this process still serves), then the listener, the models and the
        preprocessing."""
        self.loop.remove_signal_handler(signal.SIGHUP)
        try:
            if self.fronts is not None:
                # They stop accepting and finish their requests, which this process still serves.
                await self.fronts.drain(self.server.request_timeout_s + self.server.tracing.shutdown_timeout_s + 5.0)
            for reserved in self.reserved:
                reserved.close()
            if self.listening is not None:
                self.listening.close()  # no new connections; the runner then finishes the open ones
            # Calls and requests in progress finish (new ones are refused), on both protocols at once.
            await asyncio.gather(*(
                [self.grpc.stop(self.server.request_timeout_s)] if self.grpc is not None else []),
                *([self.runner.cleanup()] if self.runner is not None else []))
            if self.socket_dir is not None:
                shutil.rmtree(self.socket_dir, ignore_errors=True)
            if self.tracing is not None:
                # Every request has answered, so every span has ended: the last ones leave now.
                await asyncio.to_thread(self.tracing.shutdown)
        finally:
            for task in list(self._background):
                task.cancel()
            # Preprocessing writes into ring memory: let started fills finish before the rings go.
            if self.preprocessing is not None:
                await self.preprocessing.close()
            if self.registry is not None:
                await self.registry.close()
            release_names()  # every ring is closed: the names of this start are free
            log.info("stopped")

    def _logging(self) -> LoggingSpec:
        return LoggingSpec(self.server.log_level, self.server.log_format)

    def _pools(self) -> Iterator[ModelPool]:
        return self.registry.pools()

    def _batch_observer(self, model: str, version: str) -> BatchObserver:
        """What a model version's supervisor calls with each batch: its metrics, and its span when
        a request in it is traced."""
        record = self.metrics.batch_recorder(model, version)
        spans = self.tracing

        def observe(worker: Worker, done: messages.Done, traced: list[TraceContext]) -> None:
            record(len(done.slots), max(done.queue_s), done.infer_s)
            if traced and spans is not None and done.trace is not None:
                spans.batch(done.trace, traced, done.started, done.infer_s, {
                    "cronnx.model": model, "cronnx.version": version, "cronnx.worker": worker.name,
                    "cronnx.batch.size": len(done.slots), "cronnx.batch.rows": done.rows,
                    "cronnx.batch.padded_rows": done.rows - len(done.slots), "cronnx.providers": worker.providers})
        return observe

    def _spans_dropped(self) -> dict[str, int]:
        """Spans dropped by reason, by this process and its front processes."""
        drops = self.tracing.drops.by_reason() if self.tracing is not None else {}
        if self.fronts is not None:
            for reason, count in self.fronts.spans_dropped.items():
                drops[reason] = drops.get(reason, 0) + count
        return drops

    def _open_connections(self) -> int:
        if self.fronts is not None:
            return self.fronts.open_connections
        return len(self.runner.server.connections) if self.runner is not None and self.runner.server else 0

    def _in_background(self, coro) -> None:
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _CountedConnections:
    """The listener's connection events (http/listener.ConnectionEvents), counted in the metrics."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def refused(self) -> None:
        self._metrics.connections_refused.inc()

    def send_timed_out(self) -> None:
        self._metrics.send_timeouts.inc()
