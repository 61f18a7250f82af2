"""OpenTelemetry traces, received by a real OTLP receiver on 127.0.0.1 (bench/otlp_receiver.py):
a request's server span with its incoming `traceparent` as parent, its phases as ordered
children, the batch's span linked to it and it to the batch, the trace id in the answer and the
log lines; in every placement. Sampling as the standard variables say; a collector that is down
or stalls never costs a request anything, and what it loses is counted."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request

import aiohttp
import numpy as np
import pytest

from support.client import TIMEOUT, post
from support.images import encode, photo_like
from support.metrics import scrape, value
from bench.otlp_receiver import GrpcOtlpReceiver, OtlpReceiver, quiet_for
from support.reference import DirectModel, assert_matches
from support.server import model_entry, server_config, wait_until

PHOTO = encode(photo_like(160, 120, seed=3), "JPEG", quality=90)
PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
PHASES = ["read", "admission", "preprocess", "queue", "inference", "respond"]
OPENMETRICS = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
# Export at once instead of every 5 s (the batch processor's schedule delay, ms).
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}


@pytest.fixture
def receiver():
    receiver = OtlpReceiver()
    receiver.start()
    yield receiver
    receiver.stop()


def traced_env(receiver: OtlpReceiver, **more: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SERVICE_NAME": "cronnx-under-test", **FAST_EXPORT,
            **more}


def traceparent(sampled: bool = True) -> str:
    return f"00-{PARENT_TRACE}-{PARENT_SPAN}-{'01' if sampled else '00'}"


async def send(url: str, body: bytes, headers: dict | None = None, content_type: str = "image/jpeg"):
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        return await post(session, url, body, content_type, headers=headers)


def log_lines(server, message: str | None = None) -> list[dict]:
    """The server's JSON log lines, those with `message` when one is given."""
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    return [line for line in lines if message is None or line["message"] == message]


PLACEMENTS = pytest.mark.parametrize("placement", [
    {}, {"preprocess_processes": 1}, {"front_processes": 2}],
    ids=["one process", "preprocessing processes", "two front processes"])


@PLACEMENTS
def test_a_traced_request_has_its_phases_and_is_linked_to_its_batch(start_server, tiny_model, receiver, placement):
    server = start_server(server_config(model_entry("tiny", tiny_model), **placement), env=traced_env(receiver))
    # Health, readiness and metrics are never traced; neither is what the server itself asks.
    for path in ("/health", "/ready", "/v2/health/ready", "/v2/health/live", "/metrics", "/models"):
        urllib.request.urlopen(server.url + path, timeout=10).read()
    reply = asyncio.run(send(f"{server.url}/predict/tiny", PHOTO, {"traceparent": traceparent()}))
    assert reply.status == 200
    assert_matches(reply.body, DirectModel(tiny_model).probabilities(PHOTO))

    spans = receiver.wait_for(lambda s: any(x.name == "batch" for x in s) and len(s) >= 8, what="8 spans")
    time.sleep(0.3)  # nothing more is coming: health and metrics made none
    spans = receiver.received()
    by_name = {s.name: s for s in spans}
    assert sorted(by_name) == sorted(["POST /predict/{model}", "batch", *PHASES]), [s.name for s in spans]
    assert len(spans) == 8
    root = by_name["POST /predict/{model}"]
    # The incoming traceparent is the parent; the answer names the server span.
    assert (root.trace_id, root.parent_span_id) == (PARENT_TRACE, PARENT_SPAN)
    assert reply.headers["traceparent"] == f"00-{PARENT_TRACE}-{root.span_id}-01"
    assert root.kind == 2  # SERVER
    assert root.attributes["http.request.method"] == "POST"
    assert root.attributes["http.route"] == "/predict/{model}" and root.attributes["url.path"] == "/predict/tiny"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["cronnx.model"] == "tiny" and root.attributes["cronnx.version"] == "1"
    assert root.attributes["cronnx.request_id"] == reply.headers["X-Request-ID"]
    assert root.resource["service.name"] == "cronnx-under-test"
    # Phases: children of the server span, in order, end to end, inside it.
    phases = [by_name[p] for p in PHASES]
    assert all(p.trace_id == PARENT_TRACE and p.parent_span_id == root.span_id for p in phases)
    assert phases[0].start_ns == root.start_ns and phases[-1].end_ns == root.end_ns
    for before, after in zip(phases, phases[1:]):
        assert before.start_ns <= before.end_ns <= after.start_ns <= after.end_ns
    timings = reply.body["timings_ms"]
    for name in ("read", "admission", "preprocess", "queue", "inference"):
        assert (by_name[name].end_ns - by_name[name].start_ns) / 1e6 == pytest.approx(timings[name], abs=0.01)
    # The batch: its own trace, linked to the request; the inference phase linked back to it.
    batch = by_name["batch"]
    assert batch.links == [(PARENT_TRACE, root.span_id)]
    assert by_name["inference"].links == [(batch.trace_id, batch.span_id)]
    assert batch.attributes["cronnx.batch.size"] == 1 and batch.attributes["cronnx.model"] == "tiny"
    assert batch.attributes["cronnx.batch.rows"] - batch.attributes["cronnx.batch.padded_rows"] == 1
    assert (batch.end_ns - batch.start_ns) / 1e6 == pytest.approx(timings["inference"], abs=0.01)
    # Its run lies within the request's inference phase, up to the clocks' conversion.
    assert by_name["queue"].start_ns - 2_000_000 <= batch.start_ns <= root.end_ns
    # The log lines carry the ids.
    (access,) = [line for line in log_lines(server, "request") if line["request_id"] == reply.headers["X-Request-ID"]]
    assert (access["trace_id"], access["span_id"]) == (PARENT_TRACE, root.span_id)
    (batch_line,) = [line for line in log_lines(server, "batch") if "trace_id" in line]
    assert (batch_line["trace_id"], batch_line["span_id"]) == (batch.trace_id, batch.span_id)
    assert any("tracing: OTLP http/protobuf to " + receiver.url in line["message"] for line in log_lines(server))
    # The latency histogram's exemplar names the trace, for a scraper that asks for OpenMetrics.
    exemplar = f'# {{span_id="{root.span_id}",trace_id="{PARENT_TRACE}"}}'
    wait_until(lambda: any(line.startswith("cronnx_request_duration_seconds_bucket") and exemplar in line
                           for line in openmetrics(server).splitlines()), timeout_s=5, what="the exemplar")
    assert exemplar not in urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()


def openmetrics(server) -> str:
    request = urllib.request.Request(server.url + "/metrics", headers={"Accept": OPENMETRICS})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        return response.read().decode()


def test_requests_batched_together_share_one_batch_span_linked_to_each(start_server, tiny_model, receiver):
    # A batch window long enough that the four requests sent at once ride in one batch.
    server = start_server(server_config(model_entry("tiny", tiny_model, batch_size=4, batch_timeout_ms=300)),
                          env=traced_env(receiver))

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            return await asyncio.gather(*(post(session, f"{server.url}/predict/tiny", PHOTO) for _ in range(4)))

    replies = asyncio.run(main())
    assert [r.body["batch_size"] for r in replies] == [4] * 4
    spans = receiver.wait_for(lambda s: sum(x.name == "POST /predict/{model}" for x in s) == 4
                              and any(x.name == "batch" for x in s), what="4 requests and their batch")
    roots = {(s.trace_id, s.span_id) for s in spans if s.name == "POST /predict/{model}"}
    (batch,) = [s for s in spans if s.name == "batch"]
    assert set(batch.links) == roots and len(batch.links) == 4
    assert {r.headers["traceparent"].split("-")[1] for r in replies} == {t for t, _ in roots}  # four traces
    inference = [s for s in spans if s.name == "inference"]
    assert [s.links for s in inference] == [[(batch.trace_id, batch.span_id)]] * 4


def test_v2_requests_are_traced_with_a_batch_span_per_batch_their_rows_ran_in(start_server, tiny_model, receiver):
    server = start_server(server_config(model_entry("tiny", tiny_model, batch_size=4)), env=traced_env(receiver))
    direct = DirectModel(tiny_model)
    rows = np.stack([direct.tensor(PHOTO)] * 3)
    body = json.dumps({"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                                   "data": rows.ravel().tolist()}]}).encode()
    reply = asyncio.run(send(f"{server.url}/v2/models/tiny/infer", body, {"traceparent": traceparent()},
                             "application/json"))
    assert reply.status == 200
    spans = receiver.wait_for(lambda s: any(x.name == "respond" for x in s)
                              and sum(x.attributes["cronnx.batch.size"] for x in s if x.name == "batch") == 3,
                              what="the V2 request and the batches of its three rows")
    (root,) = [s for s in spans if s.name == "POST /v2/models/{model}/infer"]
    batches = [s for s in spans if s.name == "batch"]
    # A batch links each traced request in it once, however many of its rows it holds.
    assert all(b.links == [(PARENT_TRACE, root.span_id)] for b in batches)
    (inference,) = [s for s in spans if s.name == "inference"]
    assert sorted(inference.links) == sorted((b.trace_id, b.span_id) for b in batches)
    assert root.attributes["cronnx.api"] == "v2"


@pytest.mark.parametrize("placement", [{}, {"front_processes": 2}], ids=["one process", "two front processes"])
def test_grpc_calls_are_traced_as_rpcs_with_their_phases_and_batch(start_server, tiny_model, receiver, placement):
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    server = start_server(server_config(model_entry("tiny", tiny_model), grpc_port=0, **placement),
                          env=traced_env(receiver))
    direct = DirectModel(tiny_model)
    row = direct.tensor(PHOTO)[None]
    request = service_pb2.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="input", datatype="FP32", shape=list(row.shape))
    request.raw_input_contents.append(row.tobytes())
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response, call = stub.ModelInfer.with_call(request, metadata=[("traceparent", traceparent())], timeout=30)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(service_pb2.ModelInferRequest(model_name="nope"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    logits = np.frombuffer(response.raw_output_contents[0], np.float32)
    expected = direct.session.run(None, {direct.spec.input_name: row})[0].ravel()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)

    name = "inference.GRPCInferenceService/ModelInfer"
    spans = receiver.wait_for(lambda s: sum(x.name == name for x in s) == 2 and any(x.name == "batch" for x in s)
                              and any(x.name == "respond" for x in s), what="two calls and a batch")
    (root,) = [s for s in spans if s.name == name and s.trace_id == PARENT_TRACE]
    (failed,) = [s for s in spans if s.name == name and s.trace_id != PARENT_TRACE]
    # The metadata's traceparent is the parent; the trailing metadata names the server span.
    assert root.parent_span_id == PARENT_SPAN and root.kind == 2  # SERVER
    assert (("traceparent", f"00-{PARENT_TRACE}-{root.span_id}-01")
            in [(m.key, m.value) for m in call.trailing_metadata()])
    assert {k: root.attributes[k] for k in ("rpc.system", "rpc.method", "rpc.grpc.status_code", "cronnx.api",
                                            "cronnx.model", "cronnx.version")} == {
        "rpc.system": "grpc", "rpc.method": "ModelInfer", "rpc.grpc.status_code": 0, "cronnx.api": "grpc",
        "cronnx.model": "tiny", "cronnx.version": "1"}
    assert failed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert failed.attributes["cronnx.model"] == "_unknown" and failed.status_code == 0  # the client's error
    # Its phases are children of the server span, in order; the batch and its inference phase link each other.
    phases = sorted((s for s in spans if s.trace_id == PARENT_TRACE and s.parent_span_id == root.span_id),
                    key=lambda s: PHASES.index(s.name))
    assert [p.name for p in phases][-2:] == ["inference", "respond"] and phases[0].start_ns == root.start_ns
    for before, after in zip(phases, phases[1:]):
        assert before.start_ns <= before.end_ns <= after.start_ns <= after.end_ns <= root.end_ns
    (batch,) = [s for s in spans if s.name == "batch"]
    assert batch.links == [(PARENT_TRACE, root.span_id)]
    assert phases[-2].links == [(batch.trace_id, batch.span_id)]


def test_errors_are_traced_and_a_5xx_is_an_error_span(start_server, tiny_model, receiver):
    server = start_server(server_config(model_entry("tiny", tiny_model)), env=traced_env(receiver))
    # An Accept header prometheus_client cannot read gets the default format, not a 500.
    odd = urllib.request.Request(server.url + "/metrics", headers={"Accept": "application/openmetrics-text; version=x"})
    with urllib.request.urlopen(odd, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain") and b"cronnx_requests_total" in response.read()
    bad = asyncio.run(send(f"{server.url}/predict/tiny", b"not an image"))
    unknown = asyncio.run(send(f"{server.url}/predict/nope", PHOTO))
    assert (bad.status, unknown.status) == (400, 404)
    spans = receiver.wait_for(lambda s: len(s) >= 2, what="two server spans")
    time.sleep(0.3)
    spans = receiver.received()
    assert sorted(s.attributes["http.response.status_code"] for s in spans) == [400, 404]
    assert all(s.status_code == 0 for s in spans)  # 4xx: the client's error, not the server's (UNSET)
    assert {s.attributes["cronnx.model"] for s in spans} == {"tiny", "_unknown"}


def test_ratio_zero_traces_nothing_but_a_sampled_parent(start_server, tiny_model, receiver):
    server = start_server(server_config(model_entry("tiny", tiny_model)), env=traced_env(
        receiver, OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0"))
    plain = asyncio.run(send(f"{server.url}/predict/tiny", PHOTO))
    unsampled = asyncio.run(send(f"{server.url}/predict/tiny", PHOTO, {"traceparent": traceparent(False)}))
    assert plain.status == unsampled.status == 200
    assert "traceparent" not in plain.headers and "traceparent" not in unsampled.headers
    assert quiet_for(receiver, 0.5) == []
    sampled = asyncio.run(send(f"{server.url}/predict/tiny", PHOTO, {"traceparent": traceparent()}))
    assert sampled.headers["traceparent"].startswith(f"00-{PARENT_TRACE}-")
    spans = receiver.wait_for(lambda s: len(s) == 8, what="the sampled request's 8 spans")
    assert {s.trace_id for s in spans if s.name != "batch"} == {PARENT_TRACE}
    (access,) = [line for line in log_lines(server, "request") if "trace_id" in line]
    assert access["request_id"] == sampled.headers["X-Request-ID"]


def test_otel_sdk_disabled_exports_nothing(start_server, tiny_model, receiver):
    server = start_server(server_config(model_entry("tiny", tiny_model)),
                          env=traced_env(receiver, OTEL_SDK_DISABLED="true"))
    reply = asyncio.run(send(f"{server.url}/predict/tiny", PHOTO, {"traceparent": traceparent()}))
    assert reply.status == 200 and "traceparent" not in reply.headers
    assert quiet_for(receiver, 0.5) == [] and receiver.exports == 0
    assert not any("tracing:" in line["message"] for line in log_lines(server))


def _answer_times(url: str, count: int) -> list[float]:
    async def main():
        times = []
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            for _ in range(count):
                started = time.perf_counter()
                reply = await post(session, url, PHOTO, headers={"traceparent": traceparent()})
                assert reply.status == 200, reply
                times.append(time.perf_counter() - started)
        return times
    return asyncio.run(main())


def test_a_collector_that_is_down_costs_requests_nothing_and_its_losses_are_counted(start_server, tiny_model):
    closed = OtlpReceiver()
    closed.start()
    closed.stop()  # its port is now closed
    server = start_server(server_config(model_entry("tiny", tiny_model)), env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": closed.url, "OTEL_EXPORTER_OTLP_TIMEOUT": "1", **FAST_EXPORT})
    times = _answer_times(f"{server.url}/predict/tiny", 20)
    assert np.median(times) < 0.5, times
    samples = scrape(server.url)
    assert value(samples, "cronnx_trace_spans_dropped_total", reason="queue_full") == 0
    # Each export fails at once (connection refused): its spans are counted, 8 per request.
    wait_until(lambda: value(scrape(server.url), "cronnx_trace_spans_dropped_total", reason="export_failed") >= 8,
               timeout_s=20, what="the failed exports to be counted")
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("placement", [{}, {"front_processes": 2}], ids=["one process", "two front processes"])
def test_a_collector_that_stalls_costs_requests_nothing_and_the_queue_drops_are_counted(start_server, tiny_model,
                                                                                         placement):
    stalled = OtlpReceiver(stall_s=60)
    stalled.start()
    try:
        server = start_server(server_config(model_entry("tiny", tiny_model), **placement,
                                            tracing={"shutdown_timeout_s": 1}), env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": stalled.url, "OTEL_BSP_MAX_QUEUE_SIZE": "16",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "8", **FAST_EXPORT})
        times = _answer_times(f"{server.url}/predict/tiny", 20)
        assert np.median(times) < 0.5, times
        # 20 requests of 8 spans: the first batch of 8 is stuck in export, 16 wait, the rest are dropped.
        wait_until(lambda: value(scrape(server.url), "cronnx_trace_spans_dropped_total", reason="queue_full") > 100,
                   timeout_s=10, what="the queue's drops to be counted")
        started = time.monotonic()
        assert server.stop() == 0
        # The drain gives the last spans 1 s (server.tracing.shutdown_timeout_s), not the export's 10 s.
        assert time.monotonic() - started < 8, server.log()[-2000:]
    finally:
        stalled.stop()


def test_spans_go_over_otlp_grpc_when_the_protocol_says_so(start_server, tiny_model):
    receiver = GrpcOtlpReceiver()
    receiver.start()
    try:
        server = start_server(server_config(model_entry("tiny", tiny_model)), env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", **FAST_EXPORT})
        reply = asyncio.run(send(f"{server.url}/predict/tiny", PHOTO, {"traceparent": traceparent()}))
        assert reply.status == 200
        spans = receiver.wait_for(lambda s: len(s) == 8, what="the request's 8 spans over gRPC")
        (root,) = [s for s in spans if s.name == "POST /predict/{model}"]
        assert reply.headers["traceparent"] == f"00-{PARENT_TRACE}-{root.span_id}-01"
        assert any("tracing: OTLP grpc to " + receiver.url in line["message"] for line in log_lines(server))
    finally:
        receiver.stop()


def test_an_otlp_protocol_cronnx_cannot_export_with_stops_the_start(start_server, tiny_model):
    with pytest.raises(RuntimeError, match=r"exited with 2(.|\n)*http/json"):
        start_server(server_config(model_entry("tiny", tiny_model)), env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


# --- In this process: the tracing module against the same receiver -------------------------------

@pytest.fixture
def in_process(receiver, monkeypatch):
    """A Tracing of this process exporting to `receiver`, shut down after the test."""
    from cronnx.config import TracingConfig
    from cronnx.observability.trace_settings import start_tracing
    from cronnx.observability.tracing import Tracing
    for key, setting in traced_env(receiver).items():
        monkeypatch.setenv(key, setting)
    made = []

    def make(**env: str) -> Tracing:
        for key, setting in env.items():
            monkeypatch.setenv(key, setting)
        made.append(start_tracing(TracingConfig(), "test"))
        return made[-1]
    yield make
    for tracing in made:
        if tracing is not None:
            tracing.shutdown()


def test_phases_longer_than_their_request_never_end_before_they_begin(in_process, receiver):
    # A V2 request's phases are its rows' longest: their sum may pass its total.
    tracing = in_process()
    trace = tracing.request("POST /v2/models/{model}/infer", {}, time.time_ns(), {})
    trace.finish(200, {}, {"read": 0.001, "queue": 0.010, "inference": 0.010, "respond": 0.001}, 0.012, [])
    tracing.shutdown()
    spans = receiver.wait_for(lambda s: len(s) == 5, what="the request and its 4 phases")
    (root,) = [s for s in spans if s.kind == 2]
    for span in spans:
        assert root.start_ns <= span.start_ns <= span.end_ns <= root.end_ns, span


def test_service_name_and_version_defaults_leave_the_operators_own(in_process):
    import cronnx
    assert in_process().resource.attributes["service.version"] == cronnx.__version__
    named = in_process(OTEL_SERVICE_NAME="", OTEL_RESOURCE_ATTRIBUTES="service.version=9.9,deployment.environment=test")
    assert named.resource.attributes["service.name"] == "cronnx"
    assert named.resource.attributes["service.version"] == "9.9"
    assert named.resource.attributes["deployment.environment"] == "test"


def test_tracestate_sent_in_several_header_lines_is_read_whole(in_process, receiver):
    from multidict import CIMultiDict
    tracing = in_process()
    headers = CIMultiDict([("traceparent", traceparent()), ("tracestate", "a=1"), ("tracestate", "b=2")])
    tracing.request("POST /predict/{model}", headers, time.time_ns(), {}).finish(400, {}, {}, 0.001, [])
    tracing.shutdown()
    (span,) = receiver.wait_for(lambda s: len(s) == 1)
    assert span.trace_state == "a=1,b=2"


def test_otel_traces_exporter_none_turns_tracing_off_and_another_exporter_is_refused(monkeypatch, receiver):
    from cronnx.config import ConfigError, TracingConfig
    from cronnx.observability.trace_settings import wanted
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    assert wanted(TracingConfig())
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not wanted(TracingConfig(enabled=True))
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER is 'console'"):
        wanted(TracingConfig())


def test_a_server_that_does_not_trace_never_loads_the_sdk():
    """Every module a server process, front process or worker loads without tracing, imported in a
    fresh interpreter: OpenTelemetry stays out (it is not on every machine Cronnx runs on, and
    costs start-up time and memory), and start_tracing loads it only when asked to trace."""
    import subprocess
    import sys
    script = ("import sys; import cronnx.cli, cronnx.server.main, cronnx.fronts.child, cronnx.workers.child; "
              "from cronnx.config import TracingConfig; from cronnx.observability.trace_settings import start_tracing; "
              "assert start_tracing(TracingConfig(enabled=False), 'test') is None; "
              "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
