"""A front process (`server.front_processes` > 1): HTTP on the shared port (and gRPC on its
shared port when `server.grpc_port` is set), rows written here.

It serves /predict and the Open Inference Protocol's infer (HTTP and gRPC) with the same
handlers as the server process (`http/`, `grpc/`), over its link to the server process
(`link.py`): it reads the body, the server process chooses the version and names a slot for
each row, and this process writes the row in its own threads straight into the slot (an image
decoded, or a tensor row copied) and answers from the output rows it gets back. Every other
route is relayed to the server process (`relay.py`), and gRPC's metadata calls read the same
routes (`relay.RelayedMetadata`). It is given only what it serves with (`messages.FrontSpec`).

The server process decides when a front stops (`Drain`, or its pipe closing); SIGINT, SIGTERM and
SIGHUP are ignored here.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from cronnx.fronts.link import EngineLink
from cronnx.fronts.messages import FrontSpec, FrontStats, Listening
from cronnx.fronts.relay import SERVER, RelayedMetadata, relay, server_session
from cronnx.http.app import make_app, make_runner
from cronnx.http.listener import listen
from cronnx.observability.logs import setup_logging
from cronnx.observability.trace_settings import start_tracing
from cronnx.preprocessing.transform import set_max_image_pixels

if TYPE_CHECKING:
    from cronnx.observability.tracing import Tracing

log = logging.getLogger("cronnx.front_process")

# How often a front reports its open and refused connections to the server process.
STATS_INTERVAL_S = 1.0


def run_front_process(spec_bytes: bytes, inbox: Connection, outbox: Connection) -> None:
    """Entry point: serve HTTP until the server process says `Drain` or its pipe closes."""
    spec = msgspec.msgpack.decode(spec_bytes, type=FrontSpec)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    setup_logging(spec.logging.level, spec.logging.format)
    set_max_image_pixels(spec.max_image_pixels)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(spec, inbox, outbox))
    else:
        uvloop.run(_serve(spec, inbox, outbox))


class _Reports:
    """This front's open connections, those it refused or closed for their send timeout since the
    last report (its listener's ConnectionEvents), and the trace spans it dropped since then,
    sent to the server process every STATS_INTERVAL_S from `start` until `stop`."""

    def __init__(self, link: EngineLink, runner: web.AppRunner, tracing: Tracing | None):
        self._link, self._runner, self._tracing = link, runner, tracing
        self._refused = self._send_timeouts = 0
        self._spans_reported: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def refused(self) -> None:
        self._refused += 1

    def send_timed_out(self) -> None:
        self._send_timeouts += 1

    def start(self) -> None:
        self.send()
        self._timer = asyncio.get_running_loop().call_later(STATS_INTERVAL_S, self.start)

    def send(self) -> None:
        """Report now (and once more after `stop`, with what the stop itself counted)."""
        server = self._runner.server  # None once the runner is cleaned up: no connection is open
        self._link.send(FrontStats(len(server.connections) if server is not None else 0, self._refused,
                                   self._send_timeouts, self._spans_dropped()))
        self._refused = self._send_timeouts = 0

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _spans_dropped(self) -> dict[str, int]:
        """Spans dropped since the last report, by reason."""
        if self._tracing is None:
            return {}
        now = self._tracing.drops.by_reason()
        since = {reason: count - self._spans_reported.get(reason, 0) for reason, count in now.items()}
        self._spans_reported = now
        return {reason: count for reason, count in since.items() if count}


async def _serve(spec: FrontSpec, inbox: Connection, outbox: Connection) -> None:
    settings = spec.http
    link = EngineLink(inbox, outbox, spec.preprocess_threads)
    tracing = start_tracing(spec.tracing, f"front-{spec.index}")
    app = make_app(link, settings, tracing)
    app[SERVER] = server = server_session(spec.server_socket)
    app.router.add_route("*", "/{tail:.*}", relay)
    runner = make_runner(app, settings)
    await runner.setup()
    reports = _Reports(link, runner, tracing)
    listening = grpc_server = None
    try:
        listening = await listen(runner, settings.host, spec.port, spec.max_connections, settings.send_timeout_s,
                                 reports, reuse_port=True)
        if spec.grpc_port is not None:
            from cronnx.grpc.server import start_grpc  # only where gRPC is served (server/main.py says why)
            grpc_server, _ = await start_grpc(link, RelayedMetadata(server), settings.host, spec.grpc_port,
                                              settings.max_body_bytes, settings.request_timeout_s,
                                              settings.idle_timeout_s, spec.max_connections, tracing, reuse_port=True)
        log.info("front process %d serving on port %d%s", spec.index, spec.port,
                 f" and gRPC on port {spec.grpc_port}" if grpc_server is not None else "")
        link.send(Listening())
        reports.start()
        await link.drained.wait()
    finally:
        reports.stop()
        if listening is not None:
            listening.close()
        # Finishes the calls and requests in progress (the server process still answers them).
        await asyncio.gather(runner.cleanup(), *([grpc_server.stop(settings.request_timeout_s)]
                                                  if grpc_server is not None else []))
        await server.close()
        if tracing is not None:
            await asyncio.to_thread(tracing.shutdown)  # every request has answered: its spans leave now
        if listening is not None:
            reports.send()  # the last of its counts, the stop's own included
        link.close()
