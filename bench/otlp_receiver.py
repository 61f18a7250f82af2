"""Real OTLP trace receivers on 127.0.0.1, each keeping the spans of every
`ExportTraceServiceRequest` (OpenTelemetry's protobuf, `opentelemetry-proto`) it decodes:
`OtlpReceiver`, an aiohttp endpoint (OTLP/HTTP) in a thread of its own, and `GrpcOtlpReceiver`,
grpcio's server of the collector's TraceService (OTLP/gRPC). `stall_s` makes the HTTP one hold
every export that long before answering: a slow collector. The tests' collector
(tests/observability/test_tracing.py), and bench/tracing.py's."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                        ExportTraceServiceResponse)


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
    trace_state: str = ""


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def _attributes(pairs) -> dict:
    return {pair.key: _value(pair.value) for pair in pairs}


def _spans(export: ExportTraceServiceRequest) -> list[Span]:
    spans = []
    for resource_spans in export.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append(Span(s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.kind,
                                  s.start_time_unix_nano, s.end_time_unix_nano, _attributes(s.attributes),
                                  [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                                  s.status.code, resource, s.trace_state))
    return spans


class _Received:
    """What a receiver has been sent: `spans` (unless `keep_spans` is False: then only counted, as
    a collector that forwards them would spend no more than the decoding), `span_count`, and
    `exports`, the number of requests."""

    def __init__(self, keep_spans: bool = True) -> None:
        self.keep_spans = keep_spans
        self.spans: list[Span] = []
        self.span_count = 0
        self.exports = 0
        self._lock = threading.Lock()
        self.url = ""

    def keep(self, export: ExportTraceServiceRequest) -> None:
        """Keep (or count) the spans of one export."""
        if self.keep_spans:
            spans = _spans(export)
            count = len(spans)
        else:
            spans, count = [], sum(len(s.spans) for r in export.resource_spans for s in r.scope_spans)
        with self._lock:
            self.spans.extend(spans)
            self.span_count += count
            self.exports += 1

    def received(self) -> list[Span]:
        with self._lock:
            return list(self.spans)

    def wait_for(self, predicate, timeout_s: float = 15.0, what: str = "spans") -> list[Span]:
        """The spans once `predicate(spans)` holds; AssertionError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not predicate(spans := self.received()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; received {[s.name for s in spans]}")
            time.sleep(0.05)
        return spans


class OtlpReceiver(_Received):
    """OTLP/HTTP. Start with `start()` (returns the endpoint URL for OTEL_EXPORTER_OTLP_ENDPOINT),
    stop with `stop()`."""

    def __init__(self, stall_s: float = 0.0, keep_spans: bool = True):
        super().__init__(keep_spans)
        self.stall_s = stall_s
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="otlp-receiver", daemon=True)

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
        self.keep(export)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

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


class GrpcOtlpReceiver(_Received):
    """OTLP/gRPC: grpcio's server of the collector's TraceService on a free port (`start()`
    returns its `http://127.0.0.1:PORT` for OTEL_EXPORTER_OTLP_ENDPOINT), stopped by `stop()`."""

    def __init__(self) -> None:
        super().__init__()
        self._server = None

    def start(self) -> str:
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        receiver = self

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 (the service's method name)
                receiver.keep(request)
                return ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(10)
