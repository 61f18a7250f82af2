"""What every HTTP handler is given, whichever process serves it: the HTTP settings, the
inference client and the process's tracing (None when off), as keys of the aiohttp application."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from cronnx.config import ServerConfig
from cronnx.engine.client import InferenceClient

if TYPE_CHECKING:  # loaded only by a process that traces (observability/trace_settings.py)
    from cronnx.observability.tracing import Tracing


class HttpSettings(msgspec.Struct, frozen=True):
    """The part of `server` in the config that serving HTTP reads (all that a front process is
    given of it): where to listen (`host`), the body limit in bytes, the request timeout (from
    arrival to answer), the idle timeout of a connection without a request and the send timeout of
    an answer its client does not take, in seconds."""

    host: str
    max_body_bytes: int
    request_timeout_s: float
    idle_timeout_s: float
    send_timeout_s: float

    @classmethod
    def of(cls, server: ServerConfig) -> HttpSettings:
        """The settings of the config's `server` section."""
        return cls(server.host, server.max_body_bytes, server.request_timeout_s, server.idle_timeout_s,
                   server.send_timeout_s)


SETTINGS = web.AppKey("settings", HttpSettings)
CLIENT = web.AppKey("client", InferenceClient)
TRACING: web.AppKey[Tracing | None] = web.AppKey("tracing")
