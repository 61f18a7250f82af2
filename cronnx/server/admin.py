"""`POST /admin/models/{model}/{load|unload|reload}`: model control, behind a bearer token."""

from __future__ import annotations

import asyncio
import hmac
import logging

from aiohttp import web

from cronnx.config import ConfigError, NotInConfig
from cronnx.errors import ModelControlFailed, ModelNotFound, NotAuthenticated, PermissionDenied
from cronnx.http.middleware import json_response
from cronnx.server.state import STATE
from cronnx.server.status import models_status

log = logging.getLogger("cronnx.admin")


async def admin(request: web.Request) -> web.Response:
    """Model control: load (what the config says), unload, reload (load again even if unchanged).
    Raises NotAuthenticated (401) or PermissionDenied (403) for a missing or wrong token,
    ModelNotFound (404) for a model the config does not name, ModelControlFailed (500) when the
    config or the model cannot be read."""
    state = request.app[STATE]
    _check_token(request, state.config.admin.resolved_token())
    name, action = request.match_info["model"], request.match_info["action"]
    log.info("admin: %s model %s", action, name)
    try:
        # Shielded: a client that hangs up must not cancel a load half-way.
        if action == "unload":
            await asyncio.shield(state.registry.unload(name))
        else:
            await asyncio.shield(state.reloader.reload(only=name, force=action == "reload"))
    except NotInConfig as exc:
        raise ModelNotFound(str(exc)) from None
    except ConfigError as exc:
        raise ModelControlFailed(str(exc)) from None
    return json_response({"model": name, "action": action, "versions": models_status(state.registry, name)})


def _check_token(request: web.Request, token: str) -> None:
    given = request.headers.get("Authorization", "")
    scheme, _, credentials = given.partition(" ")
    if scheme.lower() != "bearer":  # auth schemes are case-insensitive (RFC 9110, 11.1)
        raise NotAuthenticated("admin API: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(credentials.strip().encode("utf-8", "surrogateescape"), token.encode()):
        raise PermissionDenied("admin API: wrong token")
