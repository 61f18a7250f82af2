"""The aiohttp application every HTTP process serves, with the routes written once for every
placement: `/predict` and V2 infer, over whichever inference client the process has."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from cronnx.engine.client import InferenceClient
from cronnx.http.body import continue_unless_too_large
from cronnx.http.context import CLIENT, SETTINGS, TRACING, HttpSettings
from cronnx.http.middleware import request_ids_and_json_errors
from cronnx.http.predict import predict
from cronnx.http.v2 import add_infer_routes

if TYPE_CHECKING:
    from cronnx.observability.tracing import Tracing


def make_app(client: InferenceClient, settings: HttpSettings, tracing: Tracing | None) -> web.Application:
    """An application answering `/predict` and V2 infer through `client`, tracing them with
    `tracing` (None: off); the process adds its other routes."""
    app = web.Application(middlewares=[request_ids_and_json_errors], client_max_size=settings.max_body_bytes)
    app[CLIENT] = client
    app[SETTINGS] = settings
    app[TRACING] = tracing
    expect = continue_unless_too_large(settings.max_body_bytes)
    app.router.add_post("/predict/{model}", predict, expect_handler=expect)
    app.router.add_post(r"/predict/{model}/versions/{version:\d+}", predict, expect_handler=expect)
    add_infer_routes(app, expect)
    return app


def make_runner(app: web.Application, settings: HttpSettings) -> web.AppRunner:
    """The runner of `app` (set up by the caller, then `listener.listen`): a handler is cancelled
    when its client goes away; aiohttp's access log is off (Cronnx writes its own).

    lingering_time: after an early answer (a 408 for a stalled upload, a 413), aiohttp keeps
    reading the unsent body for this long before closing; its 10 s default would let stalled
    clients hold their sockets that much longer. keepalive_timeout: aiohttp closes a connection
    with no request in progress after it, from the connection's start too (so slow headers are
    covered); its own default is an hour."""
    return web.AppRunner(app, handler_cancellation=True, access_log=None,
                         shutdown_timeout=settings.request_timeout_s + 1.0, lingering_time=1.0,
                         keepalive_timeout=settings.idle_timeout_s)
