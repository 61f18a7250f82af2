"""The admission queue over HTTP, in both placements (one process, front processes): four times
more requests than ring slots wait their turn and each gets its own answer, none a 503; the
queue's gauge and `/models` show it empty again afterwards; a request's priority and queue
timeout, on both APIs, are checked against the model's policy (400 saying the range); the bodies
of waiting requests stay within server.max_queue_bytes."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import pytest

from support.client import TIMEOUT, post, predict_many
from support.images import encode, photo_like
from support.metrics import scrape, value
from support.models import tiny_classifier
from support.reference import DirectModel, assert_matches
from support.server import model_entry, server_config

SLOTS = 2


async def _until(session: aiohttp.ClientSession, url: str, predicate, what: str, timeout_s: float = 10.0) -> dict:
    """Poll `/models` until `predicate(first model's status)` holds; that status."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        async with session.get(f"{url}/models") as response:
            status = (await response.json())["models"][0]
        if predicate(status):
            return status
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {status}")
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    # Slow enough (tens of ms a batch) that requests sent together outnumber the free slots.
    return tiny_classifier(tmp_path_factory.mktemp("admission") / "slow.onnx", slow_layers=200, hidden=2048)


@pytest.mark.parametrize("front_processes", [1, 2], ids=["one-process", "front-processes"])
def test_four_times_the_slots_all_get_their_own_answer_and_none_a_503(start_server, slow_model, front_processes):
    server = start_server(server_config(model_entry("slow", slow_model, batch_size=SLOTS, ring_slots=SLOTS, workers=1),
                                        request_timeout_s=60, front_processes=front_processes))
    images = [encode(photo_like(64, 48, seed=i), "JPEG") for i in range(4 * SLOTS)]
    replies = asyncio.run(predict_many(f"{server.url}/predict/slow", images, concurrency=len(images)))
    assert [r.status for r in replies] == [200] * len(images), [r.body for r in replies]
    direct = DirectModel(slow_model)
    for image, reply in zip(images, replies):
        assert_matches(reply.body, direct.probabilities(image))
    # Those beyond the slots waited for one: the admission phase says how long.
    waited = sorted(r.body["timings_ms"]["admission"] for r in replies)
    assert waited[-1] > 1.0, waited
    metrics = scrape(server.url)
    assert value(metrics, "cronnx_requests_total", api="predict", model="slow", version=1,
                 outcome="success") == len(images)
    assert value(metrics, "cronnx_admission_queue_requests", model="slow", version=1) == 0
    assert value(metrics, "cronnx_request_phase_seconds_count", model="slow", version=1,
                 phase="admission") == len(images)
    status = server.get("/models")[1]["models"][0]
    assert status["queue"] == {"max_queue_size": 1000, "priority_levels": 0, "default_priority_level": 0,
                               "default_timeout_ms": None, "allow_timeout_override": False, "waiting": 0,
                               "waiting_bytes": 0}
    assert status["workers"][0]["slots_in_use"] == 0


def _v2(image: bytes, **parameters) -> bytes:
    return json.dumps({"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
                                   "data": [base64.b64encode(image).decode()]}],
                       **({"parameters": parameters} if parameters else {})}).encode()


@pytest.mark.parametrize("front_processes", [1, 2], ids=["one-process", "front-processes"])
def test_priority_and_queue_timeout_on_both_apis_are_checked_against_the_models_policy(start_server, tmp_path,
                                                                                      front_processes):
    model = tiny_classifier(tmp_path / "tiny.onnx")
    server = start_server(server_config(model_entry("tiny", model, priority_levels=2),
                                        front_processes=front_processes))
    image = encode(photo_like(64, 48, seed=3), "JPEG")
    predict, infer = f"{server.url}/predict/tiny", f"{server.url}/v2/models/tiny/infer"
    cases = [  # (url, body, content type, query, status, words in the error)
        (predict, image, "image/jpeg", {"priority": "1"}, 200, None),
        (predict, image, "image/jpeg", {"priority": "0"}, 200, None),
        (predict, image, "image/jpeg", {"priority": "3"}, 400, "0 to 2"),
        (predict, image, "image/jpeg", {"priority": "high"}, 400, "priority"),
        (predict, image, "image/jpeg", {"timeout_ms": "50"}, 400, "allow_timeout_override"),
        (predict, image, "image/jpeg", {"timeout_ms": "-1"}, 400, "timeout_ms"),
        (infer, _v2(image, priority=2), "application/json", None, 200, None),
        (infer, _v2(image, priority=3), "application/json", None, 400, "0 to 2"),
        (infer, _v2(image, priority="high"), "application/json", None, 400, "priority"),
        (infer, _v2(image, priority=10 ** 30), "application/json", None, 400, "priority"),
        (infer, _v2(image, timeout=1000), "application/json", None, 400, "allow_timeout_override"),
    ]

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            return [await post(session, url, body, kind, query) for url, body, kind, query, _, _ in cases]

    replies = asyncio.run(main())
    for (url, _, _, query, status, words), reply in zip(cases, replies):
        assert reply.status == status, (url, query, reply.body)
        if words is not None:
            assert words in reply.body["error"], (query, reply.body)


def test_requests_past_the_queue_timeout_get_504_and_are_counted_as_timeouts(start_server, slow_model):
    server = start_server(server_config(model_entry("slow", slow_model, batch_size=1, ring_slots=1, workers=1,
                                                    default_timeout_ms=20, priority_levels=3,
                                                    default_priority_level=2), request_timeout_s=60))
    assert server.get("/models")[1]["models"][0]["queue"] == {
        "max_queue_size": 1000, "priority_levels": 3, "default_priority_level": 2, "default_timeout_ms": 20.0,
        "allow_timeout_override": False, "waiting": 0, "waiting_bytes": 0}
    images = [encode(photo_like(64, 48, seed=i), "JPEG") for i in range(6)]
    replies = asyncio.run(predict_many(f"{server.url}/predict/slow", images, concurrency=len(images)))
    statuses = [r.status for r in replies]
    assert set(statuses) == {200, 504} and statuses.count(504) >= 2, statuses
    assert all("queue timeout" in r.body["error"] for r in replies if r.status == 504)
    metrics = scrape(server.url)
    assert value(metrics, "cronnx_admission_rejections_total", model="slow", version=1,
                 reason="timeout") == statuses.count(504)
    assert value(metrics, "cronnx_requests_total", api="predict", model="slow", version=1,
                 outcome="504") == statuses.count(504)



@pytest.mark.parametrize("front_processes", [1, 2], ids=["one-process", "front-processes"])
def test_a_body_past_the_servers_queue_bytes_gets_503_and_the_waiting_ones_their_answers(start_server, slow_model,
                                                                                          front_processes):
    # A request runs for about a quarter of a second alone: its slot stays taken while the
    # test fills the queue.
    model = slow_model
    image = encode(photo_like(320, 240, seed=5), "JPEG")
    size = len(image)
    server = start_server(server_config(model_entry("slow", model, batch_size=1, ring_slots=1, workers=1),
                                        request_timeout_s=60, front_processes=front_processes,
                                        max_body_bytes=size, max_queue_bytes=2 * size + size // 2))
    url = f"{server.url}/predict/slow"

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            running = asyncio.create_task(post(session, url, image))
            await _until(session, server.url, lambda m: m["workers"][0]["slots_in_use"] == 1, "the slot taken")
            waiting = [asyncio.create_task(post(session, url, image)) for _ in range(2)]
            queue = (await _until(session, server.url, lambda m: m["queue"]["waiting"] == 2, "two waiting"))["queue"]
            refused = await post(session, url, image)  # a third body would pass max_queue_bytes
            return queue, refused, await asyncio.gather(running, *waiting)

    queue, refused, answered = asyncio.run(main())
    assert queue["waiting_bytes"] == 2 * size
    assert refused.status == 503 and "max_queue_bytes" in refused.body["error"], refused.body
    assert refused.headers.get("Retry-After")
    assert [r.status for r in answered] == [200] * 3, [r.body for r in answered]
    expected = DirectModel(model).probabilities(image)
    for reply in answered:
        assert_matches(reply.body, expected)
    metrics = scrape(server.url)
    assert value(metrics, "cronnx_admission_rejections_total", model="slow", version=1, reason="queue_full") == 1
    assert value(metrics, "cronnx_admission_queue_bytes", model="slow", version=1) == 0
    assert value(metrics, "cronnx_requests_total", api="predict", model="slow", version=1, outcome="503") == 1
