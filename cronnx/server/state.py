"""What the server process's own routes read: the engine (and through it the models), the config,
the reloader, the metrics and the front processes."""

from __future__ import annotations

from aiohttp import web

from cronnx.config import ServerConfig
from cronnx.engine.inference import InferenceEngine
from cronnx.engine.registry import Registry
from cronnx.fronts.manager import FrontProcesses
from cronnx.observability.metrics import Metrics
from cronnx.server.reload import Reloader


class ServerState:
    """The server process's parts as its routes see them. `fronts` is the front processes
    (server.front_processes > 1), set once they start; None while this process serves HTTP."""

    def __init__(self, config: ServerConfig, engine: InferenceEngine, reloader: Reloader, metrics: Metrics):
        self.config = config
        self.engine = engine
        self.registry: Registry = engine.registry
        self.reloader = reloader
        self.metrics = metrics
        self.fronts: FrontProcesses | None = None

    def ready(self) -> bool:
        return not self.engine.draining and self.registry.ready()


STATE = web.AppKey("state", ServerState)
