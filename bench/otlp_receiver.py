"""A real OTLP/HTTP trace receiver on 127.0.0.1: an aiohttp endpoint, in a thread of its own,
that decodes each `ExportTraceServiceRequest` (OpenTelemetry's protobuf, `opentelemetry-proto`)
and keeps its spans. `stall_s` makes it hold every export that long before answering: a slow
collector."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                        ExportTraceServiceResponse)

from support.server import wait_until


@dataclass
class Span:
    """One received span; ids in hex, times in nanoseconds since the epoch."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict
    links: list[tuple[str, str]]
    status_code: int
    resource: dict = field(default_factory=dict)


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def _attributes(pairs) -> dict:
    return {pair.key: _value(pair.value) for pair in pairs}


class OtlpReceiver:
    """Start with `start()` (returns the endpoint URL for OTEL_EXPORTER_OTLP_ENDPOINT), stop with
    `stop()`; `spans` holds what arrived, `exports` how many requests."""

    def __init__(self, stall_s: float = 0.0):
        self.stall_s = stall_s
        self.spans: list[Span] = []
        self.exports = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="otlp-receiver", daemon=True)
        self.url = ""

    def start(self) -> str:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self.url

    async def _serve(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._export)
        # A stalled export is cut short at the stop.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.stall_s:
            await asyncio.sleep(self.stall_s)
        export = ExportTraceServiceRequest.FromString(body)
        spans = []
        for resource_spans in export.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    spans.append(Span(s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.kind,
                                      s.start_time_unix_nano, s.end_time_unix_nano, _attributes(s.attributes),
                                      [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                                      s.status.code, resource))
        with self._lock:
            self.spans.extend(spans)
            self.exports += 1
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def received(self) -> list[Span]:
        with self._lock:
            return list(self.spans)

    def wait_for(self, predicate, timeout_s: float = 15.0, what: str = "spans") -> list[Span]:
        """The spans once `predicate(spans)` holds; AssertionError after `timeout_s`."""
        wait_until(lambda: predicate(self.received()), timeout_s=timeout_s, what=what)
        return self.received()

    def clear(self) -> None:
        with self._lock:
            self.spans.clear()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def quiet_for(receiver: OtlpReceiver, seconds: float) -> list[Span]:
    """What arrives within `seconds` (for checks that nothing does)."""
    time.sleep(seconds)
    return receiver.received()
