"""The Open Inference Protocol's routes the server process answers (KServe V2; Triton's HTTP/REST
API): server metadata and health, the repository index, and each model's metadata, readiness,
Triton's model configuration and Triton's statistics. Infer is `http/v2.py`'s."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from aiohttp import web

from cronnx.engine.pool import ModelPool
from cronnx.errors import ModelNotReady
from cronnx.http.middleware import json_response
from cronnx.http.record import requested_version
from cronnx.http.v2 import EXTENSIONS
from cronnx.http.v2_inputs import DATATYPES
from cronnx.server.state import STATE


def _server_version() -> str:
    try:
        return version("cronnx")
    except PackageNotFoundError:
        return "unknown"


async def repository_index(request: web.Request) -> web.Response:
    """Every model version with workers, a load failure, or a first load still to begin, and its
    state (Triton's repository index)."""
    registry = request.app[STATE].registry
    index = [{"name": pool.name, "version": str(pool.version), "state": pool.state.upper()}
             for pool in registry.pools()]
    index += [{"name": name, "version": str(version), "state": "UNAVAILABLE", "reason": reason}
              for (name, version), reason in registry.failed.items()]
    index += [{"name": name, "version": str(version), "state": "LOADING"} for name, version in registry.pending]
    return json_response(sorted(index, key=lambda entry: (entry["name"], entry["version"])))


async def server_metadata(request: web.Request) -> web.Response:
    """`GET /v2`: name, version and the protocol extensions supported: infer's, and Triton's
    statistics (served here)."""
    return json_response({"name": "cronnx", "version": _server_version(), "extensions": [*EXTENSIONS, "statistics"]})


# The health answers carry a body as well as their status: Triton's clients read the status
# alone, KServe's Python SDK reads `live` / `ready` from the JSON (the protocol allows both).


async def server_live(request: web.Request) -> web.Response:
    """`GET /v2/health/live`: 200 `{"live": true}` while the process answers."""
    return json_response({"live": True})


async def server_ready(request: web.Request) -> web.Response:
    """`GET /v2/health/ready`: 200 `{"ready": true}` when `/ready` would be, else 503 `{"ready": false}`."""
    ready = request.app[STATE].ready()
    return json_response({"ready": ready}, 200 if ready else 503)


def _pool(request: web.Request) -> ModelPool:
    """The version a metadata request names, or else the model's highest ready version (not a
    traffic-split draw: metadata must not change from one call to the next)."""
    registry = request.app[STATE].registry
    name, version = request.match_info["model"], requested_version(request)
    if version is not None:
        return registry.version(name, version)
    route = registry.route(name)
    if not route.versions:
        raise ModelNotReady(f"model {name!r} has no ready version (loading)")
    return route.versions[max(route.versions)]


async def model_metadata(request: web.Request) -> web.Response:
    """`GET /v2/models/{m}[/versions/{v}]`: the input and output tensors, -1 for a dynamic batch.
    404 for an unknown model or version, 503 while it loads."""
    pool = _pool(request)
    spec = pool.spec
    route = request.app[STATE].registry.routes.get(pool.name)
    return json_response({
        "name": pool.name,
        "versions": [str(v) for v in sorted(route.versions)] if route else [str(pool.version)],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": spec.input_name, "datatype": DATATYPES[spec.input_dtype],
                    "shape": [spec.fixed_batch or -1, *spec.input_item_shape]}],
        "outputs": [{"name": spec.output_name, "datatype": DATATYPES[spec.output_dtype],
                     "shape": [spec.fixed_batch or -1, *spec.output_item_shape]}],
    })


async def model_ready(request: web.Request) -> web.Response:
    """`GET .../ready`: 200 `{"name", "ready": true}` when the version has a live worker, 503 with
    `"ready": false` otherwise (404 if unknown)."""
    name = request.match_info["model"]
    try:
        ready = _pool(request).live_workers > 0
    except ModelNotReady:
        ready = False
    return json_response({"name": name, "ready": ready}, 200 if ready else 503)


async def model_config(request: web.Request) -> web.Response:
    """Triton's model configuration, as its clients read it (`max_batch_size`: the dims exclude the batch)."""
    pool = _pool(request)
    spec = pool.spec
    config = pool.config
    return json_response({
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
    })


async def model_statistics(request: web.Request) -> web.Response:
    """`GET /v2/models[/{m}[/versions/{v}]]/stats`: Triton's statistics extension
    (observability/statistics.py) of every version with workers, of the model's, or of the one
    named; 404 for an unknown model or version."""
    state = request.app[STATE]
    registry, statistics = state.registry, state.metrics.statistics
    name, version = request.match_info.get("model"), requested_version(request)
    if name is None:
        pools = list(registry.pools())
    elif version is not None:
        pools = [registry.version(name, version)]
    else:
        registry.route(name)  # 404 for a model not served
        pools = [pool for pool in registry.pools() if pool.name == name]
    keys = sorted({(pool.name, pool.version) for pool in pools})
    return json_response({"model_stats": [statistics.version(model, str(number)).to_json(model, str(number))
                                          for model, number in keys]})


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
