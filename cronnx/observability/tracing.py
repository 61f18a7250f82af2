"""OpenTelemetry traces: a span per inference request, with a child per phase, and a span per
worker batch linked to the requests it served (docs/architecture.md, "Tracing").

Spans are made from the timings Cronnx measures anyway, once they are known: the request's
server span begins on arrival (so that its ids go into the response's `traceparent`, the access
log and the batch's links), its phase spans are laid out from the phases' measured durations when
it answers, and a batch's span is made in the server process from the worker's `Done` (the
batch's start on the machine's monotonic clock and its run time), with the ids the worker chose
and logged. So only the processes that serve HTTP (the server process, each front process) load
the SDK and export; workers and preprocessing processes never do.

What the operator sets is OpenTelemetry's own environment: `OTEL_SDK_DISABLED`,
`OTEL_TRACES_EXPORTER` (otlp, or none), `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER` / `_ARG` (the SDK's default, `parentbased_always_on`, unless set),
`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`, `_PROTOCOL` (`http/protobuf`, the specification's default,
or `grpc`), `_HEADERS`, `_TIMEOUT`, and the batch processor's `OTEL_BSP_SCHEDULE_DELAY`,
`_MAX_QUEUE_SIZE` and `_MAX_EXPORT_BATCH_SIZE`; `server.tracing` turns it on or off where the
environment does not. The propagation is W3C Trace Context's, whatever `OTEL_PROPAGATORS` says.

Spans never wait for the collector: ended spans go to the SDK's batch processor, whose queue is
bounded (`OTEL_BSP_MAX_QUEUE_SIZE`, 2048); when it is full the oldest queued span is dropped, as
are the spans of an export that fails, and both are counted (`SpanDrops`). The shutdown gives the
last spans `shutdown_timeout_s`. Making spans never fails a request: an error is logged once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import cronnx
from cronnx.config import TracingConfig
from cronnx.observability.trace_context import TraceContext
from cronnx.observability.trace_settings import ENDPOINT_VARIABLES, first_set, protocol

log = logging.getLogger("cronnx.tracing")

# The phases a request may report, in the order they happen; `respond` ends with the request.
PHASES = ("read", "admission", "preprocess", "queue", "inference", "respond")
_SCOPE = "cronnx"
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)


class SpanDrops:
    """Spans lost, by reason: `queue_full` (the batch processor's queue was full when a span
    ended: the oldest queued one is dropped), `export_failed` (the collector refused them, or could
    not be reached in time), `shutdown` (still queued when the stop's shutdown_timeout_s ran out,
    or ended after it). Each counter has one writer: the event loop's thread (`queue_full`,
    `shutdown`), or the exporting thread (`export_failed`)."""

    def __init__(self) -> None:
        self.queue_full = 0
        self.export_failed = 0
        self.shutdown = 0

    def by_reason(self) -> dict[str, int]:
        return {"queue_full": self.queue_full, "export_failed": self.export_failed, "shutdown": self.shutdown}


class _CountingExporter(SpanExporter):
    """The OTLP exporter, counting the spans of every export that does not succeed."""

    def __init__(self, exporter: SpanExporter, drops: SpanDrops):
        self._exporter, self._drops = exporter, drops

    def export(self, spans: Sequence) -> SpanExportResult:
        try:
            result = self._exporter.export(spans)
        except Exception:
            self._drops.export_failed += len(spans)
            raise
        if result is not SpanExportResult.SUCCESS:
            self._drops.export_failed += len(spans)
        return result

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


class _CountingProcessor(BatchSpanProcessor):
    """The SDK's batch processor, counting the spans its full queue drops and those its shutdown
    leaves. It reads the queue from the SDK's own processor (not public: the collector-stalls test
    of tests/observability/test_tracing.py holds it to the SDK's behaviour); should the SDK change
    it, drops go uncounted (logged once) and spans still flow."""

    def __init__(self, exporter: SpanExporter, drops: SpanDrops):
        super().__init__(exporter)
        self._drops = drops
        self._counting = True

    def on_end(self, span) -> None:
        if self._counting:
            try:
                batch = self._batch_processor
                if batch._shutdown:
                    self._drops.shutdown += 1
                elif len(batch._queue) >= batch._max_queue_size:
                    self._drops.queue_full += 1
            except AttributeError:
                self._counting = False
                log.warning("tracing: this OpenTelemetry SDK hides its batch queue; dropped spans go uncounted")
        super().on_end(span)

    def shutdown(self, timeout_millis: float = 30000) -> None:
        """Export what is queued within `timeout_millis` (the SDK's own shutdown waits 30 s);
        what is left is counted as dropped."""
        self._batch_processor.shutdown(timeout_millis)
        if self._counting:
            try:
                self._drops.shutdown += len(self._batch_processor._queue)
            except AttributeError:
                pass


def _exporter(protocol: str) -> SpanExporter:
    """The OTLP span exporter for `protocol` (see `protocol()`); it reads its endpoint, headers
    and timeout from the environment itself. Each is imported only when chosen: the gRPC one
    loads grpcio."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )
        return GrpcSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


class _HeaderGetter(Getter):
    """Every value of a header, as W3C Trace Context asks of `tracestate` sent in several header
    lines (the SDK's default getter reads only the first of an aiohttp request's)."""

    def get(self, carrier, key: str) -> list[str] | None:
        getall = getattr(carrier, "getall", None)
        values = getall(key, None) if getall is not None else carrier.get(key)
        if values is None:
            return None
        return [values] if isinstance(values, str) else list(values)

    def keys(self, carrier) -> list[str]:
        return list(carrier.keys())


_HEADERS = _HeaderGetter()


class RequestTrace:
    """The server span of one sampled request, begun on its arrival; `finish` ends it with its
    phases. `context` is its ids (for the batch's link), `traceparent` its W3C header value."""

    __slots__ = ("_tracing", "_span", "_start_ns", "context", "traceparent")

    def __init__(self, tracing: Tracing, span, start_ns: int):
        self._tracing, self._span, self._start_ns = tracing, span, start_ns
        ids = span.get_span_context()
        self.context = TraceContext.of(ids.trace_id, ids.span_id)
        self.traceparent = f"00-{ids.trace_id:032x}-{ids.span_id:016x}-{ids.trace_flags:02x}"

    def finish(self, status: int, attributes: Mapping[str, object], phases: Mapping[str, float], total_s: float,
               batches: Sequence[TraceContext], error: str = "", *,
               status_attribute: str = "http.response.status_code", failed: bool | None = None) -> None:
        """End the request's span `total_s` seconds after its arrival, with its `status` (HTTP's;
        gRPC's code with `status_attribute` "rpc.grpc.status_code"), more `attributes`, and a
        child span per phase (seconds by name, as in PHASES), laid out end to end from the
        arrival, `respond` ending with the request; the `inference` phase links to the `batches`
        its rows ran in. It is an error when `failed` (None: a 5xx, OpenTelemetry's HTTP server
        conventions); `error` then says why."""
        try:
            span, start_ns = self._span, self._start_ns
            end_ns = start_ns + int(total_s * 1e9)
            if phases:
                self._tracing.phase_spans(span, start_ns, end_ns, phases, batches)
            span.set_attribute(status_attribute, status)
            for key, value in attributes.items():
                span.set_attribute(key, value)
            if failed if failed is not None else status >= 500:
                span.set_attribute("error.type", str(status))
                span.set_status(Status(StatusCode.ERROR, error or None))
            span.end(end_time=end_ns)
        except Exception:
            _failed("a request's spans")  # the request has answered: tracing never fails it


class Tracing:
    """The tracing of one process that serves HTTP (the server process or a front process): its
    tracer provider (the environment's sampler) for the requests' server spans, ended spans made
    directly for their phases and for batches (`_ended`), the W3C propagator, the batch processor
    they all go to, and the counts of dropped spans."""

    def __init__(self, config: TracingConfig, process: str):
        self.drops = SpanDrops()
        self._shutdown_timeout_s = config.shutdown_timeout_s
        resource = Resource.create({"cronnx.process": process})
        attributes = dict(resource.attributes)
        # What neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES says: the service is Cronnx, of this version.
        if str(attributes.get("service.name", "")).startswith("unknown_service"):
            attributes["service.name"] = "cronnx"
        attributes.setdefault("service.version", cronnx.__version__)
        self.resource = Resource(attributes, resource.schema_url)
        self._processor = _CountingProcessor(_CountingExporter(_exporter(protocol()), self.drops), self.drops)
        self._provider = TracerProvider(resource=self.resource, shutdown_on_exit=False)
        self._provider.add_span_processor(self._processor)
        self._tracer = self._provider.get_tracer(_SCOPE, cronnx.__version__)
        self._scope = InstrumentationScope(_SCOPE, cronnx.__version__)
        self._ids = RandomIdGenerator()
        self._propagator = TraceContextTextMapPropagator()
        self.sampler = self._provider.sampler.get_description()

    def describe(self) -> str:
        """Where spans go and how they are sampled, for the start-up log."""
        endpoint = first_set(ENDPOINT_VARIABLES, "the exporter's default (localhost)")
        return (f"tracing: OTLP {protocol()} to {endpoint}, service {self.resource.attributes.get('service.name')}, "
                f"sampler {self.sampler}")

    def request(self, name: str, headers: Mapping[str, str], start_ns: int,
                attributes: Mapping[str, object]) -> RequestTrace | None:
        """Begin the server span `name` of a request that arrived at `start_ns` (time.time_ns)
        with `headers` (HTTP headers or gRPC metadata, lower-case names or not: its `traceparent`
        and `tracestate`, if any, are the parent: with a `parentbased_` sampler a sampled parent
        is always traced); None when the sampler leaves it out. OpenTelemetry's conventions name
        it "{method} {route}" for HTTP, "{service}/{method}" for gRPC."""
        parent = self._propagator.extract(headers, getter=_HEADERS)
        span = self._tracer.start_span(name, context=parent, kind=SpanKind.SERVER,
                                       start_time=start_ns, attributes=attributes)
        if not span.get_span_context().trace_flags.sampled:
            span.end()  # recorded, perhaps, but never exported: nothing to link or to name
            return None
        return RequestTrace(self, span, start_ns)

    def phase_spans(self, parent, start_ns: int, end_ns: int, phases: Mapping[str, float],
                    batches: Sequence[TraceContext]) -> None:
        """A child span of `parent` for each phase in `phases` (seconds): end to end from
        `start_ns`, `respond` last, ending at `end_ns`; `inference` linked to `batches`."""
        ids = parent.get_span_context()
        at = start_ns
        for phase in PHASES:
            seconds = phases.get(phase)
            if seconds is None:
                continue
            length = int(seconds * 1e9)
            # Never past the request's end: a V2 request's phases are its rows' longest, whose sum
            # may pass its total when its rows ran in different batches.
            begins = min(max(at, end_ns - length) if phase == "respond" else at, end_ns)
            ends = min(begins + length, end_ns)
            links = [_link(b) for b in batches] if phase == "inference" else []
            own = SpanContext(ids.trace_id, self._ids.generate_span_id(), False, ids.trace_flags, ids.trace_state)
            self._ended(phase, own, ids, begins, ends, {}, links)
            at = ends

    def _ended(self, name: str, ids: SpanContext, parent: SpanContext | None, start_ns: int, end_ns: int,
               attributes: Mapping[str, object], links: list[Link]) -> None:
        """Hand the processor a span that is over already: a phase or a batch, whose times were
        measured, made as the SDK makes an ended span (a ReadableSpan) without the Tracer's work
        for a span still running (its sampler, lock and limits: three quarters of a span's cost
        here). A phase is traced when its request is (every standard sampler decides a child as
        its sampled root), a batch when one of its requests is."""
        self._processor.on_end(ReadableSpan(name, ids, parent, self.resource, dict(attributes), (), links,
                                            SpanKind.INTERNAL, None, _UNSET, start_ns, end_ns, self._scope))

    def batch(self, ids: TraceContext, requests: Sequence[TraceContext], started_monotonic: float, run_s: float,
              attributes: Mapping[str, object]) -> None:
        """The span of a worker batch: ids `ids` (chosen and logged by the worker), from
        `started_monotonic` (time.monotonic, which every process shares) for `run_s` seconds,
        linked to the server span of each traced request in it."""
        start_ns = time.time_ns() - int((time.monotonic() - started_monotonic) * 1e9)
        try:
            own = SpanContext(int.from_bytes(ids.trace_id, "big"), int.from_bytes(ids.span_id, "big"), False, _SAMPLED)
            self._ended("batch", own, None, start_ns, start_ns + int(run_s * 1e9), attributes,
                        [_link(r) for r in requests])
        except Exception:
            _failed("a batch's span")  # called among a worker's answers: none of them may be lost

    def shutdown(self) -> None:
        """Export what is queued, waiting at most server.tracing.shutdown_timeout_s, and stop."""
        started = time.monotonic()
        self._processor.shutdown(timeout_millis=self._shutdown_timeout_s * 1000)
        dropped = self.drops.by_reason()
        if any(dropped.values()):
            log.warning("tracing: spans dropped", extra={"fields": dropped})
        log.debug("tracing stopped in %.3f s", time.monotonic() - started)


_failures_logged = False


def _failed(what: str) -> None:
    """Log (once per process, with the traceback) that making spans raised; the caller goes on."""
    global _failures_logged
    if not _failures_logged:
        _failures_logged = True
        log.exception("tracing: making %s failed; requests are served, their spans may be missing", what)


def _link(ids: TraceContext) -> Link:
    return Link(SpanContext(int.from_bytes(ids.trace_id, "big"), int.from_bytes(ids.span_id, "big"), is_remote=True,
                            trace_flags=_SAMPLED))
