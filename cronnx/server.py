"""`cronnx serve`: check every model, start the workers and the HTTP front, shut down cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import msgspec
from aiohttp import web

from .config import Config, ConfigError, ModelConfig
from .demo_model import DEMO_DESCRIPTION, write_demo_model
from .front import ServerState, make_app
from .metrics import Metrics
from .model_spec import ModelSpec, ModelSpecError, inspect_model
from .pool import ModelPool, load_labels, resolve_providers
from .preprocess import pil_build, set_max_image_pixels
from .protocol import Done
from .ring import remove_stale_segments
from .worker import LoggingSpec

log = logging.getLogger("cronnx.server")


class PreparedModel(msgspec.Struct):
    config: ModelConfig
    spec: ModelSpec
    providers: list[str]
    labels: list[str]


def prepare_models(config: Config, config_path: str) -> list[PreparedModel]:
    """Everything that can be wrong with a model is found here, before any process starts."""
    prepared = []
    for index, model in enumerate(config.models):
        where = f"{config_path}: models[{index}] ({model.name})"
        path = Path(model.path)
        if not path.is_file():
            if not model.demo:
                raise ConfigError(f"{where}.path: model file {str(path)!r} does not exist")
            log.warning("building the demo model at %s (untrained, deterministic; takes a few seconds)", path)
            write_demo_model(path)
        try:
            spec = inspect_model(str(path), model.preprocess.size)
        except ModelSpecError as exc:
            raise ConfigError(f"{where}.path: {exc}") from None
        try:
            providers = resolve_providers(model.providers)
            labels = load_labels(model.labels, spec.num_classes, "demo_class_" if model.demo else "class_")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if spec.description == DEMO_DESCRIPTION:
            log.warning("model %s is the UNTRAINED DEMO model: its predictions carry no meaning", model.name)
        prepared.append(PreparedModel(model, spec, providers, labels))
    return prepared


def _batch_recorder(metrics: Metrics, model: str, version: str):
    def record(done: Done) -> None:
        metrics.observe_batch(model, version, done.batch_size, max(done.queue_s))
    return record


def run_server(config: Config, config_path: str) -> int:
    set_max_image_pixels(config.server.max_image_pixels)
    removed = remove_stale_segments()
    if removed:
        log.warning("removed %d shared-memory segments left by a killed run: %s", len(removed), ", ".join(removed))
    prepared = prepare_models(config, config_path)
    log.info("config %s; %s", config_path, pil_build())
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(config, prepared))
    else:
        uvloop.run(_serve(config, prepared))
    return 0


async def _serve(config: Config, prepared: list[PreparedModel]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pools: dict[str, ModelPool] = {}
    state = None
    try:
        metrics = Metrics(tuple(config.server.latency_buckets_s), max(m.config.batch_size for m in prepared))
        logging_spec = LoggingSpec(config.server.log_level, config.server.log_format)
        for model in prepared:
            c = model.config
            pools[c.name] = ModelPool(c, model.spec, model.providers, model.labels, logging_spec,
                                      _batch_recorder(metrics, c.name, str(c.version)))
            log.info("model %s v%d: %s, input %s %s %s %s, batch %d / %.1f ms, %d worker(s), providers %s",
                     c.name, c.version, c.path, model.spec.input_name, model.spec.layout, model.spec.input_dtype,
                     list(model.spec.input_item_shape),
                     model.spec.fixed_batch or c.batch_size, c.batch_timeout_ms, c.worker_count,
                     ",".join(model.providers))
        metrics.pools = list(pools.values())
        for pool in pools.values():
            pool.start()
        state = ServerState(config.server, pools, metrics)
        runner = web.AppRunner(make_app(state), handler_cancellation=True, access_log=None,
                               shutdown_timeout=config.server.request_timeout_s + 1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.server.host, config.server.port)
            await site.start()
            host, port = runner.addresses[0][:2]
            log.info("serving on http://%s:%d", host, port)
            await stop.wait()
            # /ready answers 503 from here on; the listener closes and in-flight requests finish.
            state.draining = True
            log.info("shutting down: finishing in-flight requests")
        finally:
            await runner.cleanup()
    finally:
        for pool in pools.values():
            await pool.stop()
            pool.close()
        if state is not None:
            state.executor.shutdown(wait=True)
        log.info("stopped")
