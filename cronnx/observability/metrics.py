"""Prometheus metrics, all recorded in the server process.

Workers report each batch through their pipe, and the server process records it here (through the
observer `batch_recorder` gives each model version), so `/metrics` is one view in which every
request is counted exactly once, and there are no multiprocess files that a previous run could
leave behind. Values that
describe the present (ring occupancy, live workers, state) are read from the pools when
Prometheus scrapes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from cronnx.config import DEFAULT_LATENCY_BUCKETS_S
from cronnx.observability.statistics import Statistics
from cronnx.observability.trace_context import TraceContext

if TYPE_CHECKING:
    from cronnx.engine.pool import ModelPool

# A `_created` series per counter and histogram doubles the output and no dashboard reads it.
disable_created_metrics()


class Metrics:
    """The server's Prometheus registry. `pools()` yields every model version with workers
    (serving, loading or draining), read at each scrape."""

    def __init__(self, pools: Callable[[], Iterable[ModelPool]], latency_buckets_s=DEFAULT_LATENCY_BUCKETS_S,
                 open_connections: Callable[[], int] = lambda: 0,
                 preprocessing_restarts: Callable[[], int] = lambda: 0,
                 spans_dropped: Callable[[], dict[str, int]] = dict):
        self.registry = registry = CollectorRegistry(auto_describe=True)
        labels = ["model", "version"]
        self.requests = Counter("cronnx_requests", "Requests by API (predict, v2, grpc) and outcome: success, or the "
                                "HTTP status of the error", [*labels, "api", "outcome"], registry=registry)
        self.duration = Histogram("cronnx_request_duration_seconds", "End-to-end time of a request in the server",
                                  labels, buckets=latency_buckets_s, registry=registry)
        self.phase = Histogram("cronnx_request_phase_seconds",
                               "Time of each phase of a successful request: read (body read and decode), "
                               "admission (waiting for a ring slot), preprocess, queue (waiting in the ring), "
                               "inference, respond (encoding)",
                               [*labels, "phase"], buckets=latency_buckets_s, registry=registry)
        self.batch_size = Histogram("cronnx_batch_size", "Images in each executed batch", labels,
                                    buckets=[2.0 ** i for i in range(11)], registry=registry)
        self.batch_fill = Histogram("cronnx_batch_fill_seconds",
                                    "How long a batch's oldest request waited for the batch to start",
                                    labels, buckets=latency_buckets_s, registry=registry)
        self.rejections = Counter("cronnx_admission_rejections",
                                  "Requests refused by the admission queue, by reason: queue_full (every ring slot "
                                  "taken and max_queue_size waiting: 503), timeout (no slot within the queue "
                                  "timeout: 504)", [*labels, "reason"], registry=registry)
        self.in_flight = Gauge("cronnx_in_flight_requests", "Requests being handled by the server", registry=registry)
        connections = Gauge("cronnx_open_connections", "HTTP connections open now", registry=registry)
        connections.set_function(open_connections)
        self.connections_refused = Counter("cronnx_connections_refused",
                                           "Connections answered 503 and closed at once: server.max_connections "
                                           "were open", registry=registry)
        self.send_timeouts = Counter("cronnx_send_timeouts",
                                     "Connections reset because their client took none of an answer for "
                                     "server.send_timeout_s", registry=registry)
        self.pools = pools
        registry.register(_PoolCollector(self))
        registry.register(_CounterFunction("cronnx_preprocess_process_restarts",
                                           "Preprocessing processes replaced after they exited "
                                           "(server.preprocess_processes)", preprocessing_restarts))
        registry.register(_CounterFunction("cronnx_trace_spans_dropped",
                                           "Trace spans lost, by reason: queue_full (the exporter's queue, "
                                           "OTEL_BSP_MAX_QUEUE_SIZE, was full), export_failed (the collector refused "
                                           "them or could not be reached in time), shutdown (left when a front "
                                           "process's stop ran out of server.tracing.shutdown_timeout_s)",
                                           spans_dropped, "reason"))
        self._versions: dict[tuple[str, str], _VersionSeries] = {}
        # Triton's statistics extension, from the same records (GET /v2/models/.../stats).
        self.statistics = Statistics()

    def record_request(self, model: str, version: str, api: str, outcome: str, total_s: float,
                       phases: dict[str, float], rejection: str, trace: TraceContext | None = None) -> None:
        """One answered inference request: the API it came by ("predict", "v2", "grpc"), its outcome
        ("success" or the error's status), its time and, when it succeeded, each phase's time;
        `rejection` the admission queue's reason for refusing it ("queue_full", "timeout"; ""
        when it did not); `trace` its span when it was traced: the exemplar of its bucket of
        cronnx_request_duration_seconds (shown to a scraper that asks for OpenMetrics)."""
        series = self._versions.get((model, version))
        if series is None:
            series = self._versions[(model, version)] = _VersionSeries(self, model, version)
        series.outcome(api, outcome).inc()
        if trace is None:
            series.duration.observe(total_s)
        else:
            series.duration.observe(total_s, {"trace_id": trace.trace_id_hex, "span_id": trace.span_id_hex})
        for phase, seconds in phases.items():
            series.phase(phase).observe(seconds)
        if rejection:
            series.rejection(rejection).inc()
        if series.statistics is not None:
            series.statistics.request(outcome == "success", total_s, phases)

    def batch_recorder(self, model: str, version: str) -> Callable[[int, float, float], None]:
        """What to call with each batch a worker ran for this model version: the requests in it,
        the seconds its oldest request waited, and the seconds it ran."""
        size = self.batch_size.labels(model, version)
        fill = self.batch_fill.labels(model, version)
        statistics = self.statistics.version(model, version)

        def record(batch_size: int, oldest_wait_s: float, run_s: float) -> None:
            size.observe(batch_size)
            fill.observe(oldest_wait_s)
            statistics.batch(batch_size, run_s)
        return record

    def render(self, accept: str) -> tuple[bytes, str]:
        """The registry in the format a scraper's `Accept` header asks for, and its content type:
        OpenMetrics (with the exemplars) when it asks for it, else Prometheus' text format."""
        try:
            encode, content_type = choose_encoder(accept)
        except (TypeError, ValueError):  # an Accept prometheus_client cannot read: its default format
            encode, content_type = choose_encoder("")
        return encode(self.registry), content_type


class _VersionSeries:
    """One model version's request series, labelled once: `labels()` per request would cost more
    than the observation itself."""

    def __init__(self, metrics: Metrics, model: str, version: str):
        self._metrics, self._labels = metrics, (model, version)
        self.duration = metrics.duration.labels(model, version)
        # None for requests that named no served model or version (model "_unknown", version "").
        self.statistics = metrics.statistics.version(model, version) if version else None
        self._rejections: dict[str, Counter] = {}
        self._outcomes: dict[tuple[str, str], Counter] = {}
        self._phases: dict[str, Histogram] = {}

    def outcome(self, api: str, outcome: str) -> Counter:
        child = self._outcomes.get((api, outcome))
        if child is None:
            child = self._outcomes[(api, outcome)] = self._metrics.requests.labels(*self._labels, api, outcome)
        return child

    def rejection(self, reason: str) -> Counter:
        child = self._rejections.get(reason)
        if child is None:
            child = self._rejections[reason] = self._metrics.rejections.labels(*self._labels, reason)
        return child

    def phase(self, phase: str) -> Histogram:
        child = self._phases.get(phase)
        if child is None:
            child = self._phases[phase] = self._metrics.phase.labels(*self._labels, phase)
        return child


class _PoolCollector:
    """Gauges and counters read from the live pools at scrape time.

    During a forced reload two pools of the same version coexist (the new one serving, the old one
    draining); their series are merged, so that a scrape never holds one label set twice."""

    STATES = ("loading", "ready", "draining")

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        in_use: dict[tuple[str, str, str], float] = defaultdict(float)
        capacity: dict[tuple[str, str, str], float] = defaultdict(float)
        live: dict[tuple[str, str], float] = defaultdict(float)
        waiting: dict[tuple[str, str], float] = defaultdict(float)
        waiting_bytes: dict[tuple[str, str], float] = defaultdict(float)
        restarts: dict[tuple[str, str, str], float] = defaultdict(float)
        load: dict[tuple[str, str], float] = defaultdict(float)
        states: dict[tuple[str, str], set[str]] = defaultdict(set)
        for pool in self.metrics.pools():
            key = (pool.name, str(pool.version))
            for worker in pool.workers:
                slot_key = (*key, str(worker.spec.index))
                in_use[slot_key] += worker.ring.in_use
                capacity[slot_key] += worker.ring.slots
                for reason, count in worker.restarts.items():
                    restarts[(*key, reason)] += count
            live[key] += pool.live_workers
            waiting[key] += pool.admission.depth
            waiting_bytes[key] += pool.admission.held_bytes
            load[key] = max([load[key], *(w.load_seconds for w in pool.workers)])
            states[key].add(pool.state)
        yield _family(GaugeMetricFamily, "cronnx_ring_slots_in_use", "Ring slots holding a request, per worker",
                      ["model", "version", "worker"], in_use)
        yield _family(GaugeMetricFamily, "cronnx_ring_slots", "Ring slots per worker", ["model", "version", "worker"],
                      capacity)
        labels = ["model", "version"]
        yield _family(GaugeMetricFamily, "cronnx_live_workers", "Workers that are up and serving", labels, live)
        yield _family(GaugeMetricFamily, "cronnx_admission_queue_requests",
                      "Requests waiting for a ring slot in the version's admission queue", labels, waiting)
        yield _family(GaugeMetricFamily, "cronnx_admission_queue_bytes",
                      "Bytes held by the requests waiting in the version's admission queue (bodies or tensor rows); "
                      "all versions together are bounded by server.max_queue_bytes", labels, waiting_bytes)
        yield _family(CounterMetricFamily, "cronnx_worker_restarts",
                      "Workers replaced, by reason: exited, session_broken, load_failed (died while loading), "
                      "ping_timeout or batch_timeout (killed as unresponsive)", [*labels, "reason"], restarts)
        yield _family(GaugeMetricFamily, "cronnx_model_load_seconds",
                      "Time the last worker start took to load and warm up", labels, load)
        state = {(*key, name): 1.0 if name in present else 0.0 for key, present in states.items()
                 for name in self.STATES}
        yield _family(GaugeMetricFamily, "cronnx_model_state", "1 for the states each model version is in",
                      ["model", "version", "state"], state)


class _CounterFunction:
    """A counter whose value is read from `read()` at each scrape: a number, or with a `label`,
    a number per value of the label."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int] | Callable[[], dict[str, int]],
                 label: str | None = None):
        self.name, self.documentation, self.read, self.label = name, documentation, read, label

    def describe(self):
        return []

    def collect(self):
        if self.label is None:
            family = CounterMetricFamily(self.name, self.documentation)
            family.add_metric([], self.read())
        else:
            family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
            for value, count in self.read().items():
                family.add_metric([value], count)
        yield family


def _family(kind, name: str, documentation: str, labels: list[str], values: dict[tuple[str, ...], float]):
    family = kind(name, documentation, labels=labels)
    for label_values, value in values.items():
        family.add_metric(list(label_values), value)
    return family
