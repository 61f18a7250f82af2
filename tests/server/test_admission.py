"""The admission queue over HTTP, in both placements (one process, front processes): four times
more requests than ring slots wait their turn and each gets its own answer, none a 503; the
queue's gauge and `/models` show it empty again afterwards."""

from __future__ import annotations

import asyncio

import pytest

from support.client import predict_many
from support.images import encode, photo_like
from support.metrics import scrape, value
from support.models import tiny_classifier
from support.reference import DirectModel, assert_matches
from support.server import model_entry, server_config

SLOTS = 2


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
    assert waited[0] >= 0 and waited[-1] > 1.0, waited
    metrics = scrape(server.url)
    assert value(metrics, "cronnx_requests_total", api="predict", model="slow", version=1,
                 outcome="success") == len(images)
    assert value(metrics, "cronnx_admission_queue_requests", model="slow", version=1) == 0
    assert value(metrics, "cronnx_request_phase_seconds_count", model="slow", version=1,
                 phase="admission") == len(images)
    assert value(metrics, "cronnx_ring_full_rejections_total", model="slow", version=1) == 0
    status = server.get("/models")[1]["models"][0]
    assert status["queue"] == {"max_queue_size": 1000, "waiting": 0}
    assert status["workers"][0]["slots_in_use"] == 0
