"""Metrics count each request once, per model, version and outcome; logs carry request ids."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from support.client import TIMEOUT, post
from support.images import encode, photo_like
from support.metrics import scrape, total, value
from support.models import tiny_classifier
from support.server import model_entry, server_config

IMAGE = encode(photo_like(320, 240, seed=1), "JPEG")
PHASES = ("read", "admission", "preprocess", "queue", "inference", "respond")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    tiny_classifier(folder / "a.onnx", slow_layers=10)
    tiny_classifier(folder / "b.onnx", classes=7)
    return folder


@pytest.fixture
def server(start_server, models_dir):
    return start_server(server_config(
        model_entry("alpha", models_dir / "a.onnx", workers=2, batch_size=4, batch_timeout_ms=10),
        model_entry("beta", models_dir / "b.onnx", version=3, workers=2)))


async def _send(url: str, plan: list[tuple[str, bytes, str]], concurrency: int = 16) -> list[int]:
    limit = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async def one(path, body, content_type):
            async with limit:
                return (await post(session, url + path, body, content_type)).status
        return await asyncio.gather(*(one(*item) for item in plan))


def test_counters_and_histograms_equal_what_was_sent(server):
    plan = ([("/predict/alpha", IMAGE, "image/jpeg")] * 40 + [("/predict/beta", IMAGE, "image/jpeg")] * 15
            + [("/predict/alpha", b"not an image", "image/jpeg")] * 6
            + [("/predict/alpha", IMAGE, "text/plain")] * 4
            + [("/predict/nosuchmodel", IMAGE, "image/jpeg")] * 3)
    statuses = asyncio.run(_send(server.url, plan))
    assert statuses.count(200) == 55 and statuses.count(400) == 6 and statuses.count(415) == 4
    assert statuses.count(404) == 3

    m = scrape(server.url)
    assert value(m, "cronnx_requests_total", api="predict", model="alpha", version=1, outcome="success") == 40
    assert value(m, "cronnx_requests_total", api="predict", model="beta", version=3, outcome="success") == 15
    assert value(m, "cronnx_requests_total", api="predict", model="alpha", version=1, outcome="400") == 6
    assert value(m, "cronnx_requests_total", api="predict", model="alpha", version=1, outcome="415") == 4
    assert value(m, "cronnx_requests_total", api="predict", model="_unknown", version="", outcome="404") == 3
    assert total(m, "cronnx_requests_total") == len(plan)

    assert value(m, "cronnx_request_duration_seconds_count", model="alpha", version=1) == 50
    assert value(m, "cronnx_request_duration_seconds_count", model="beta", version=3) == 15
    for phase in PHASES:
        assert value(m, "cronnx_request_phase_seconds_count", model="alpha", version=1, phase=phase) == 40
        assert value(m, "cronnx_request_phase_seconds_count", model="beta", version=3, phase=phase) == 15

    # Batch sizes, recorded from both workers of each model, add up to the images served.
    assert value(m, "cronnx_batch_size_sum", model="alpha", version=1) == 40
    assert value(m, "cronnx_batch_size_sum", model="beta", version=3) == 15
    batches = value(m, "cronnx_batch_size_count", model="alpha", version=1)
    assert 10 <= batches <= 40  # batch_size 4: at least 10 batches
    assert value(m, "cronnx_batch_fill_seconds_count", model="alpha", version=1) == batches

    assert value(m, "cronnx_live_workers", model="alpha", version=1) == 2
    assert total(m, "cronnx_ring_slots_in_use") == 0
    assert value(m, "cronnx_in_flight_requests") == 0
    assert value(m, "cronnx_model_state", model="beta", version=3, state="ready") == 1
    assert value(m, "cronnx_model_load_seconds", model="alpha", version=1) > 0
    assert total(m, "cronnx_worker_restarts_total") == 0


def test_request_id_is_echoed_and_reaches_front_and_worker_logs(server):
    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async with session.post(f"{server.url}/predict/alpha", data=IMAGE,
                                    headers={"Content-Type": "image/jpeg", "X-Request-ID": "trace-42"}) as r:
                given = (r.status, r.headers.get("X-Request-ID"))
            async with session.post(f"{server.url}/predict/alpha", data=IMAGE,
                                    headers={"Content-Type": "image/jpeg"}) as r:
                generated = r.headers.get("X-Request-ID")
            async with session.post(f"{server.url}/predict/nosuch", data=IMAGE,
                                    headers={"Content-Type": "image/jpeg", "X-Request-ID": "trace-43"}) as r:
                error = (r.status, r.headers.get("X-Request-ID"))
        return given, generated, error

    given, generated, error = asyncio.run(main())
    assert given == (200, "trace-42")
    assert generated and len(generated) == 32 and generated != "trace-42"
    assert error == (404, "trace-43")

    server.stop()
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "cronnx.access" and line["request_id"] == "trace-42"]
    assert len(access) == 1
    assert access[0]["status"] == 200 and access[0]["model"] == "alpha" and access[0]["batch_size"] >= 1
    assert set(access[0]["phases_ms"]) == set(PHASES)
    batches = [line for line in lines if line["logger"] == "cronnx.worker" and "trace-42" in line["request_ids"]]
    assert len(batches) == 1 and batches[0]["pid"] != access[0]["pid"]
    failed = [line for line in lines if line["logger"] == "cronnx.access" and line["request_id"] == "trace-43"]
    assert failed[0]["status"] == 404 and "nosuch" in failed[0]["error"]


def test_text_log_format_is_readable(start_server, models_dir):
    server = start_server(server_config(model_entry("alpha", models_dir / "a.onnx"), log_format="text"))
    asyncio.run(_send(server.url, [("/predict/alpha", IMAGE, "image/jpeg")]))
    server.stop()
    lines = server.log().splitlines()
    assert not any(line.startswith("{") for line in lines)
    assert any("cronnx.access" in line and "status=200" in line and "request_id=" in line for line in lines)


def test_admission_rejections_are_counted_by_reason(start_server, tmp_path):
    slow = tiny_classifier(tmp_path / "slow.onnx", slow_layers=200, hidden=2048)
    server = start_server(server_config(model_entry("slow", slow, batch_size=1, ring_slots=2, max_queue_size=1),
                                        request_timeout_s=30))
    statuses = asyncio.run(_send(server.url, [("/predict/slow", IMAGE, "image/jpeg")] * 10))
    m = scrape(server.url)
    assert statuses.count(503) > 0
    assert value(m, "cronnx_admission_rejections_total", model="slow", version=1,
                 reason="queue_full") == statuses.count(503)
    assert value(m, "cronnx_requests_total", api="predict", model="slow", version=1, outcome="503") == statuses.count(503)


def test_start_up_log_names_the_onnxruntime_build_and_its_providers(server):
    from importlib.metadata import version

    import onnxruntime

    build = f"onnxruntime {version('onnxruntime')}, providers {', '.join(onnxruntime.get_available_providers())}"
    first = next(json.loads(line) for line in server.log().splitlines()
                 if line.startswith("{") and "config " in json.loads(line)["message"])
    assert build in first["message"], first
