"""`cronnx serve`: check every model, start the HTTP front and the workers, reload, shut down cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal

from aiohttp import web

from cronnx import inference_protocol
from cronnx.config import Config, ConfigError, NotInConfig, load_config
from cronnx.engine.inference import InferenceEngine
from cronnx.engine.registry import Registry
from cronnx.front import ServerState, make_app
from cronnx.fronts.manager import (
    FrontProcesses,
    make_socket_dir,
    remove_stale_socket_dirs,
)
from cronnx.http.listener import listen, reserve_port
from cronnx.ipc.ring import remove_stale_segments
from cronnx.models import catalog, runtime
from cronnx.models.catalog import ModelVersion, PreparedVersion
from cronnx.observability.logs import LoggingSpec
from cronnx.observability.metrics import Metrics
from cronnx.preprocessing.placement import start as start_preprocessing
from cronnx.preprocessing.transform import pil_build, set_max_image_pixels
from cronnx.workers.supervisor import Liveness

log = logging.getLogger("cronnx.server")


def _stop_starting(signum, frame) -> None:
    raise SystemExit(0)


def run_server(config: Config, config_path: str) -> int:
    # A SIGHUP before the server can reload would end the process: ignore it until then.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # SIGTERM and SIGINT before the event loop takes them over (to drain) end the start-up: nothing
    # is served yet. As a container's PID 1 a signal without a handler would be dropped by the
    # kernel, and `docker stop` would wait out its timeout and kill.
    signal.signal(signal.SIGTERM, _stop_starting)
    signal.signal(signal.SIGINT, _stop_starting)
    set_max_image_pixels(config.server.max_image_pixels)
    removed = remove_stale_segments()
    if removed:
        log.warning("removed %d shared-memory segments left by a killed run: %s", len(removed), ", ".join(removed))
    removed = remove_stale_socket_dirs()
    if removed:
        log.warning("removed the socket folders of killed runs: %s", ", ".join(removed))
    onnxruntime_build = runtime.describe()
    # At start-up every model must be servable: any problem is a config error (exit 2). A demo
    # model still to be built is built once the port is open, so that /ready answers 503
    # ("loading") meanwhile instead of the port being closed.
    versions = catalog.all_versions(config, config_path)
    to_build = [v for v in versions if catalog.needs_demo_build(v)]
    prepared = [catalog.prepare(v) for v in versions if not catalog.needs_demo_build(v)]
    log.info("config %s; %s; %s", config_path, pil_build(), onnxruntime_build)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(config, config_path, prepared, to_build))
    else:
        uvloop.run(_serve(config, config_path, prepared, to_build))
    return 0


class Reloader:
    """Re-reads the config and applies it to the registry: on SIGHUP, and for the admin API."""

    def __init__(self, registry: Registry, config_path: str):
        self.registry = registry
        self.config_path = config_path

    async def reload(self, only: str | None = None, force: bool = False) -> None:
        """Serve what the config file says now (for one model, or all). Raises ConfigError when the
        file is unusable; a model that fails is recorded in the registry and changes nothing else."""
        config = await asyncio.to_thread(load_config, self.config_path)
        models = await asyncio.to_thread(catalog.model_configs, config, self.config_path)
        if only is not None:
            models = [(m, where) for m, where in models if m.name == only]
            if not models:
                raise NotInConfig(f"{self.config_path}: model {only!r} is not in the config")
        prepared: list[PreparedVersion] = []
        failed: dict[tuple[str, int], str] = {}
        for model, where in models:
            try:
                versions = catalog.versions_of(model, where)
            except ConfigError as exc:
                failed[(model.name, model.version)] = str(exc)
                continue
            for version in versions:
                try:
                    # Opening a model (or building the demo) takes a while: not on the event loop.
                    prepared.append(await asyncio.to_thread(catalog.prepare, version))
                except ConfigError as exc:
                    failed[(version.name, version.version)] = str(exc)
        names = {m.name for m, _ in models}
        if only is None:
            # Models gone from the file are unloaded, and their old load failures forgotten.
            names |= set(self.registry.routes) | {name for name, _ in self.registry.failed}
        await self.registry.apply(prepared, failed, names, force=force)

    async def on_sighup(self) -> None:
        log.info("SIGHUP: reloading %s", self.config_path)
        try:
            await self.reload()
        except ConfigError as exc:
            log.error("reload failed, keeping the models served now: %s", exc)
        except Exception:
            log.exception("reload failed, keeping the models served now")


async def _first_load(registry: Registry, prepared: list[PreparedVersion], to_build: list[ModelVersion]) -> None:
    """Build the demo models still missing, then load every model; /ready answers 503 until done."""
    failed: dict[tuple[str, int], str] = {}
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
    await registry.apply(prepared, failed, {p.model.name for p in prepared} | {name for name, _ in failed})


def _may_use_cuda(providers: list[str] | str) -> bool:
    """A model still to be built will run on CUDA (its providers are resolved when it is built)."""
    try:
        return "CUDAExecutionProvider" in catalog.resolve_providers(providers)
    except ConfigError:
        return False  # its load will fail and say why


async def _serve(config: Config, config_path: str, prepared: list[PreparedVersion],
                 to_build: list[ModelVersion]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = config.server
    on_cuda = any("CUDAExecutionProvider" in p.providers for p in prepared) or any(
        _may_use_cuda(v.config.providers) for v in to_build)
    if server.front_processes > 1:
        # The fronts decode every image: the engine's own preprocessing (one thread) is not used.
        preprocessing = start_preprocessing(0, 1, on_cuda, server.max_image_pixels, server.request_timeout_s)
    else:
        preprocessing = start_preprocessing(server.preprocess_processes, server.preprocess_threads, on_cuda,
                                            server.max_image_pixels, server.request_timeout_s)
        log.info("preprocessing in %s", preprocessing)
    fronts: FrontProcesses | None = None

    def open_connections() -> int:
        if fronts is not None:
            return fronts.open_connections
        return len(runner.server.connections) if runner.server else 0

    # Metrics read the registry's pools at each scrape; the registry reports batches to metrics.
    metrics = Metrics(lambda: registry.pools(), tuple(server.latency_buckets_s), open_connections=open_connections,
                      preprocessing_restarts=lambda: preprocessing.restarts)
    liveness = Liveness(server.worker_ping_interval_s, server.worker_ping_timeout_s, server.batch_run_timeout_s)
    registry = Registry(LoggingSpec(server.log_level, server.log_format), metrics.batch_recorder,
                        server.model_load_timeout_s, liveness)
    reloader = Reloader(registry, config_path)
    engine = InferenceEngine(registry, preprocessing)
    state = ServerState(server, engine, reloader, metrics)
    background: set[asyncio.Task] = set()

    def in_background(coro) -> None:
        task = loop.create_task(coro)
        background.add(task)
        task.add_done_callback(background.discard)

    try:
        # lingering_time: after an early answer (a 408 for a stalled upload, a 413), aiohttp keeps
        # reading the unsent body for this long before closing; its 10 s default would let stalled
        # clients hold their sockets that much longer.
        # keepalive_timeout: aiohttp closes a connection with no request in progress after it, from
        # the connection's start too (so slow headers are covered); its own default is an hour.
        app = make_app(state)
        inference_protocol.add_routes(app)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=config.server.request_timeout_s + 1.0, lingering_time=1.0,
                               keepalive_timeout=config.server.idle_timeout_s)
        await runner.setup()
        listening = reserved = socket_dir = None
        try:
            if server.front_processes == 1:
                listening = await listen(runner, server.host, server.port, server.max_connections,
                                         metrics.connections_refused.inc)
                host, port = listening.sockets[0].getsockname()[:2]
                log.info("serving on http://%s:%d", host, port)
            else:
                # The fronts serve the port; this process answers them (and every route they pass
                # on) on a Unix socket of its own.
                reserved = reserve_port(server.host, server.port)
                host, port = reserved.getsockname()[:2]
                socket_dir = make_socket_dir()
                engine_socket = os.path.join(socket_dir, "engine.sock")
                await web.UnixSite(runner, engine_socket).start()
                fronts = state.fronts = FrontProcesses(server.front_processes, server, port, engine_socket,
                                                       LoggingSpec(server.log_level, server.log_format), engine,
                                                       metrics)
                await fronts.listening()
                log.info("serving on http://%s:%d in %s", host, port, fronts)
            in_background(_first_load(registry, prepared, to_build))
            loop.add_signal_handler(signal.SIGHUP, lambda: in_background(reloader.on_sighup()))
            await stop.wait()
            # /ready answers 503 from here on; the listener closes and in-flight requests finish.
            engine.draining = True
            log.info("shutting down: finishing in-flight requests")
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            if fronts is not None:
                # They stop accepting and finish their requests, which this process still serves.
                await fronts.drain(server.request_timeout_s + 5.0)
            if reserved is not None:
                reserved.close()
            if listening is not None:
                listening.close()  # no new connections; the runner then finishes the open ones
            await runner.cleanup()
            if socket_dir is not None:
                shutil.rmtree(socket_dir, ignore_errors=True)
    finally:
        for task in list(background):
            task.cancel()
        # Preprocessing writes into ring memory: let started fills finish before the rings go.
        await preprocessing.close()
        await registry.close()
        log.info("stopped")
