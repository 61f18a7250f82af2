"""The Open Inference Protocol's calls other than infer, answered by the server process (KServe
V2; Triton's HTTP/REST and gRPC APIs): server metadata and health, the repository index, and each
model's metadata, readiness, Triton's model configuration and Triton's statistics. The bodies
are made once, here (`ServerMetadata`), for the HTTP routes below and for the gRPC service
(`grpc/service.py`). Infer is `http/v2.py`'s and `grpc/infer.py`'s."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from aiohttp import web

from cronnx.engine.pool import ModelPool
from cronnx.errors import ModelNotReady
from cronnx.http.middleware import json_response
from cronnx.http.v2 import EXTENSIONS
from cronnx.protocol.record import requested_version
from cronnx.protocol.v2_inputs import DATATYPES
from cronnx.server.state import STATE, ServerState


def _server_version() -> str:
    try:
        return version("cronnx")
    except PackageNotFoundError:
        return "unknown"


class ServerMetadata:
    """The protocol's metadata bodies read from `state` (protocol.metadata.MetadataSource)."""

    def __init__(self, state: ServerState):
        self._state = state

    async def server_metadata(self) -> dict:
        """Name, version and the protocol extensions supported: infer's, and Triton's statistics."""
        return {"name": "cronnx", "version": _server_version(), "extensions": [*EXTENSIONS, "statistics"]}

    async def server_ready(self) -> bool:
        return self._state.ready()

    async def repository_index(self) -> list[dict]:
        """Every model version with workers, a load failure, or a first load still to begin, and its
        state (Triton's repository index)."""
        registry = self._state.registry
        index = [{"name": pool.name, "version": str(pool.version), "state": pool.state.upper()}
                 for pool in registry.pools()]
        index += [{"name": name, "version": str(version), "state": "UNAVAILABLE", "reason": reason}
                  for (name, version), reason in registry.failed.items()]
        index += [{"name": name, "version": str(version), "state": "LOADING"} for name, version in registry.pending]
        return sorted(index, key=lambda entry: (entry["name"], entry["version"]))

    def _pool(self, name: str, version: str | None) -> ModelPool:
        """The version a metadata request names, or else the model's highest ready version (not a
        traffic-split draw: metadata must not change from one call to the next)."""
        registry = self._state.registry
        number = requested_version(name, version)
        if number is not None:
            return registry.version(name, number)
        route = registry.route(name)
        if not route.versions:
            raise ModelNotReady(f"model {name!r} has no ready version (loading)")
        return route.versions[max(route.versions)]

    async def model_ready(self, name: str, version: str | None) -> bool:
        try:
            return self._pool(name, version).live_workers > 0
        except ModelNotReady:
            return False

    async def model_metadata(self, name: str, version: str | None) -> dict:
        pool = self._pool(name, version)
        spec = pool.spec
        route = self._state.registry.routes.get(pool.name)
        return {
            "name": pool.name,
            "versions": [str(v) for v in sorted(route.versions)] if route else [str(pool.version)],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": spec.input_name, "datatype": DATATYPES[spec.input_dtype],
                        "shape": [spec.fixed_batch or -1, *spec.input_item_shape]}],
            "outputs": [{"name": spec.output_name, "datatype": DATATYPES[spec.output_dtype],
                         "shape": [spec.fixed_batch or -1, *spec.output_item_shape]}],
        }

    async def model_config(self, name: str, version: str | None) -> dict:
        """Triton's model configuration, as its clients read it (`max_batch_size`: the dims exclude the batch)."""
        pool = self._pool(name, version)
        spec = pool.spec
        config = pool.config
        return {
            "name": pool.name,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "max_batch_size": pool.batch_size,
            "input": [{"name": spec.input_name, "data_type": f"TYPE_{DATATYPES[spec.input_dtype]}",
                       "format": f"FORMAT_{spec.layout}", "dims": list(spec.input_item_shape)}],
            "output": [{"name": spec.output_name, "data_type": f"TYPE_{DATATYPES[spec.output_dtype]}",
                        "dims": list(spec.output_item_shape)}],
            "dynamic_batching": {"max_queue_delay_microseconds": int(config.batch_timeout_ms * 1000),
                                 "preferred_batch_size": pool.batch_buckets or [pool.batch_size]},
            "instance_group": [{"count": config.worker_count,
                                "kind": "KIND_GPU" if config.devices else "KIND_CPU",
                                **({"gpus": list(config.devices)} if config.devices else {})}],
        }

    async def model_statistics(self, name: str | None, version: str | None) -> dict:
        """Triton's statistics extension (observability/statistics.py) of every version with
        workers, of the model's, or of the one named."""
        registry, statistics = self._state.registry, self._state.metrics.statistics
        number = requested_version(name, version) if name is not None else None
        if name is None:
            pools = list(registry.pools())
        elif number is not None:
            pools = [registry.version(name, number)]
        else:
            registry.route(name)  # ModelNotFound for a model not served
            pools = [pool for pool in registry.pools() if pool.name == name]
        keys = sorted({(pool.name, pool.version) for pool in pools})
        return {"model_stats": [statistics.version(model, str(number)).to_json(model, str(number))
                                for model, number in keys]}


# The HTTP routes. The health answers carry a body as well as their status: Triton's clients
# read the status alone, KServe's Python SDK reads `live` / `ready` from the JSON (the protocol
# allows both).

def _source(request: web.Request) -> ServerMetadata:
    return ServerMetadata(request.app[STATE])


def _names(request: web.Request) -> tuple[str, str | None]:
    return request.match_info["model"], request.match_info.get("version")


async def server_metadata(request: web.Request) -> web.Response:
    """`GET /v2`."""
    return json_response(await _source(request).server_metadata())


async def server_live(request: web.Request) -> web.Response:
    """`GET /v2/health/live`: 200 `{"live": true}` while the process answers."""
    return json_response({"live": True})


async def server_ready(request: web.Request) -> web.Response:
    """`GET /v2/health/ready`: 200 `{"ready": true}` when `/ready` would be, else 503 `{"ready": false}`."""
    ready = await _source(request).server_ready()
    return json_response({"ready": ready}, 200 if ready else 503)


async def repository_index(request: web.Request) -> web.Response:
    """`POST /v2/repository/index`."""
    return json_response(await _source(request).repository_index())


async def model_metadata(request: web.Request) -> web.Response:
    """`GET /v2/models/{m}[/versions/{v}]`: 404 for an unknown model or version, 503 while it loads."""
    return json_response(await _source(request).model_metadata(*_names(request)))


async def model_ready(request: web.Request) -> web.Response:
    """`GET .../ready`: 200 `{"name", "ready": true}` when the version has a live worker, 503 with
    `"ready": false` otherwise (404 if unknown)."""
    ready = await _source(request).model_ready(*_names(request))
    return json_response({"name": request.match_info["model"], "ready": ready}, 200 if ready else 503)


async def model_config(request: web.Request) -> web.Response:
    """`GET .../config`: Triton's model configuration."""
    return json_response(await _source(request).model_config(*_names(request)))


async def model_statistics(request: web.Request) -> web.Response:
    """`GET /v2/models[/{m}[/versions/{v}]]/stats`: 404 for an unknown model or version."""
    return json_response(await _source(request).model_statistics(request.match_info.get("model"),
                                                                 request.match_info.get("version")))


def add_metadata_routes(app: web.Application) -> None:
    """The V2 routes of this module, beside infer on the same application."""
    router = app.router
    router.add_get("/v2", server_metadata)
    router.add_get("/v2/health/live", server_live)
    router.add_get("/v2/health/ready", server_ready)
    router.add_post("/v2/repository/index", repository_index)
    # Before /v2/models/{model}, which would take "stats" for a model's name.
    router.add_get("/v2/models/stats", model_statistics)
    for base in ("/v2/models/{model}", r"/v2/models/{model}/versions/{version:\d+}"):
        router.add_get(base, model_metadata)
        router.add_get(base + "/ready", model_ready)
        router.add_get(base + "/config", model_config)
        router.add_get(base + "/stats", model_statistics)
