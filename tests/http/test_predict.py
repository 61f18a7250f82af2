"""Predictions: the server answers exactly what onnxruntime computes on the same tensor."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from support.client import TIMEOUT, json_body, post, predict_many
from support.reference import DirectModel, assert_matches
from support.server import model_entry, server_config


@pytest.fixture(scope="module")
def direct(demo_model):
    return DirectModel(demo_model)


@pytest.fixture
def demo_server(start_server, demo_model):
    return start_server(server_config(model_entry("mobilenetv2", demo_model, batch_size=8, batch_timeout_ms=20, solo_intra_op_threads=2,
                                                  labels=None, demo=True)))


def test_lone_requests_match_direct_onnxruntime(demo_server, direct, photos):
    url = f"{demo_server.url}/predict/mobilenetv2"

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            return [await post(session, url, p.read_bytes()) for p in photos]

    replies = asyncio.run(main())
    tops = set()
    for photo, reply in zip(photos, replies):
        assert reply.status == 200, reply.body
        assert reply.body["model"] == "mobilenetv2" and reply.body["version"] == 1
        assert reply.body["batch_size"] == 1
        assert_matches(reply.body, direct.probabilities(photo.read_bytes()))
        tops.add(reply.body["predictions"][0]["class_id"])
        assert reply.body["predictions"][0]["label"] == f"demo_class_{reply.body['predictions'][0]['class_id']}"
    # The demo model is untrained but not degenerate: different photos, different answers.
    assert len(tops) > 1


def test_batched_requests_match_direct_onnxruntime(demo_server, direct, photos):
    bodies = [photos[i % len(photos)].read_bytes() for i in range(48)]
    replies = asyncio.run(predict_many(f"{demo_server.url}/predict/mobilenetv2", bodies, concurrency=32))
    assert [r.status for r in replies] == [200] * len(bodies)
    sizes = [r.body["batch_size"] for r in replies]
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 8, sizes
    expected = {p: direct.probabilities(p.read_bytes()) for p in photos}
    for i, reply in enumerate(replies):
        assert_matches(reply.body, expected[photos[i % len(photos)]])


def test_json_base64_body_gives_the_same_answer_as_raw_bytes(demo_server, direct, photos):
    url = f"{demo_server.url}/predict/mobilenetv2"
    image = photos[0].read_bytes()

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            return await post(session, url, json_body(image), "application/json")

    reply = asyncio.run(main())
    assert reply.status == 200, reply.body
    assert_matches(reply.body, direct.probabilities(image))


def test_top_k_query_parameter_sets_the_number_of_predictions(demo_server, direct, photos):
    url = f"{demo_server.url}/predict/mobilenetv2"
    image = photos[1].read_bytes()

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            return (await post(session, url + "?top_k=3", image), await post(session, url + "?top_k=0", image))

    three, zero = asyncio.run(main())
    assert three.status == 200
    assert_matches(three.body, direct.probabilities(image), top_k=3)
    assert zero.status == 400 and "top_k" in zero.body["error"]


def test_timings_are_reported_in_milliseconds(demo_server, photos):
    replies = asyncio.run(predict_many(f"{demo_server.url}/predict/mobilenetv2", [photos[0].read_bytes()]))
    timings = replies[0].body["timings_ms"]
    assert set(timings) == {"total", "read", "admission", "preprocess", "queue", "inference"}
    assert 0 < timings["inference"] < timings["total"]
    assert (timings["read"] + timings["admission"] + timings["preprocess"] + timings["queue"] + timings["inference"]
            <= timings["total"])
