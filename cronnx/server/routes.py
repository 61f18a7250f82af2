"""The routes only the server process answers, added to the application that serves `/predict`
and V2 infer (in front processes, these reach it through their relay)."""

from __future__ import annotations

from aiohttp import web

from cronnx.server.admin import admin
from cronnx.server.metadata import add_metadata_routes
from cronnx.server.state import STATE, ServerState
from cronnx.server.status import health, list_models, metrics, ready


def add_server_routes(app: web.Application, state: ServerState) -> None:
    """Add the routes only the server process answers (health, readiness, models, metrics, V2
    metadata, and the admin API when enabled) to `app`, reading `state`."""
    app[STATE] = state
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/models", list_models)
    app.router.add_get("/metrics", metrics)
    if state.config.admin.enabled:
        app.router.add_post("/admin/models/{model}/{action:load|unload|reload}", admin)
    add_metadata_routes(app)
