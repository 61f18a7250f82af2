"""`/health`, `/ready`, `/models` and `/metrics`: what the server process knows of itself."""

from __future__ import annotations

from aiohttp import web

from cronnx.engine.registry import Registry
from cronnx.http.middleware import json_response
from cronnx.server.schemas import (FrontProcessesStatus, Health, PreprocessingStatus, failed_status, model_status,
                                   pending_status)
from cronnx.server.state import STATE


async def health(request: web.Request) -> web.Response:
    return json_response(Health("alive"))


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    registry = state.registry
    live = {name: sum(p.live_workers for p in route.versions.values()) for name, route in registry.routes.items()}
    failed = {f"{name} v{version}": reason for (name, version), reason in registry.failed.items()}
    if state.engine.draining:
        return json_response(Health("draining", live, failed), 503)
    if state.ready():
        return json_response(Health("ready", live, failed))
    if not registry.loaded_once:
        return json_response(Health("loading", live, failed), 503)
    # Loaded, and no model serves: every one failed, or all were unloaded.
    return json_response(Health("failed" if failed else "no models", live, failed), 503)


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    p, f = state.engine.preprocessing, state.fronts
    if f is None:
        fronts = FrontProcessesStatus(1, 0, [])
        preprocessing = PreprocessingStatus(p.placement, p.count, p.restarts, sorted(p.pids))
    else:  # the fronts decode every image, in their threads
        fronts = FrontProcessesStatus(f.count, f.restarts, sorted(f.pids))
        preprocessing = PreprocessingStatus("front processes", f.count * f.threads, f.restarts, sorted(f.pids))
    return json_response({"models": models_status(state.registry), "preprocessing": preprocessing,
                          "front_processes": fronts})


def models_status(registry: Registry, only: str | None = None) -> list:
    """Every version with workers, a load failure, or a first load still to begin (of model
    `only`, or all), sorted by name, version and state."""
    statuses = []
    for pool in registry.pools():
        route = registry.routes.get(pool.name)
        weight = (route.traffic or {}).get(pool.version) if route and route.versions.get(pool.version) is pool else None
        statuses.append(model_status(pool, weight))
    statuses += [failed_status(name, version, reason) for (name, version), reason in registry.failed.items()]
    statuses += [pending_status(name, version) for name, version in registry.pending]
    statuses = [s for s in statuses if only is None or s.name == only]
    return sorted(statuses, key=lambda s: (s.name, s.version, s.state))


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[STATE].metrics.render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})
