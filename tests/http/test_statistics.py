"""Triton's statistics extension (`GET /v2/models[/{m}[/versions/{v}]]/stats`): after a known mix
of requests its counts are exactly those requests, rows and batches, its durations are the
phases the server measured, and Triton's own client reads it; in both placements."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import numpy as np
import pytest
import tritonclient.http as triton

from support.client import TIMEOUT, post
from support.images import encode, photo_like
from support.reference import DirectModel
from support.server import model_entry, server_config, wait_until

PHOTO = encode(photo_like(160, 120, seed=8), "JPEG", quality=90)
PLACEMENTS = pytest.mark.parametrize("front_processes", [1, 2], ids=["one process", "two front processes"])
PREDICTS, V2_REQUESTS, V2_ROWS, BAD = 5, 3, 2, 4


def _v2_body(direct: DirectModel) -> bytes:
    rows = np.stack([direct.tensor(PHOTO)] * V2_ROWS)
    return json.dumps({"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                                   "data": rows.ravel().tolist()}]}).encode()


@PLACEMENTS
def test_statistics_count_exactly_the_requests_rows_and_batches_served(start_server, tiny_model, front_processes):
    server = start_server(server_config(model_entry("tiny", tiny_model), front_processes=front_processes))
    body = _v2_body(DirectModel(tiny_model))
    before_ms = time.time_ns() // 1_000_000

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            replies = [await post(session, f"{server.url}/predict/tiny", PHOTO) for _ in range(PREDICTS)]
            replies += [await post(session, f"{server.url}/v2/models/tiny/infer", body, "application/json")
                        for _ in range(V2_REQUESTS)]
            replies += [await post(session, f"{server.url}/predict/tiny", b"not an image") for _ in range(BAD)]
            replies += [await post(session, f"{server.url}/predict/nope", PHOTO)]  # no model: no statistics
            return replies

    replies = asyncio.run(main())
    assert [r.status for r in replies] == [200] * (PREDICTS + V2_REQUESTS) + [400] * BAD + [404]
    succeeded = PREDICTS + V2_REQUESTS

    def stats() -> dict:
        status, answer = server.get("/v2/models/tiny/versions/1/stats")
        assert status == 200, answer
        (entry,) = answer["model_stats"]
        return entry

    # Front processes report each request after answering it.
    wait_until(lambda: stats()["inference_stats"]["fail"]["count"] == BAD, timeout_s=10, what="the failures counted")
    entry = stats()
    inference = entry["inference_stats"]
    assert (entry["name"], entry["version"]) == ("tiny", "1")
    assert inference["success"]["count"] == succeeded and inference["fail"]["count"] == BAD
    assert entry["inference_count"] == PREDICTS + V2_REQUESTS * V2_ROWS  # rows run
    assert [r.body["batch_size"] for r in replies[:PREDICTS]] == [1] * PREDICTS  # sent one at a time
    assert PREDICTS + V2_REQUESTS <= entry["execution_count"] <= PREDICTS + V2_REQUESTS * V2_ROWS
    assert sum(b["compute_infer"]["count"] * b["batch_size"] for b in entry["batch_stats"]) == entry["inference_count"]
    assert sum(b["compute_infer"]["count"] for b in entry["batch_stats"]) == entry["execution_count"]
    for name in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[name]["count"] == succeeded and inference[name]["ns"] > 0, (name, inference[name])
    assert inference["cache_hit"] == inference["cache_miss"] == {"count": 0, "ns": 0}
    # The durations are the phases the answers reported (/predict's timings_ms), to a microsecond each.
    predict_infer_ns = sum(r.body["timings_ms"]["inference"] for r in replies[:PREDICTS]) * 1e6
    assert inference["compute_infer"]["ns"] >= predict_infer_ns - PREDICTS * 1000
    assert inference["success"]["ns"] >= inference["compute_infer"]["ns"]
    assert before_ms <= entry["last_inference"] <= time.time_ns() // 1_000_000

    # Every version, the model's, and refusals for what is not served.
    status, every = server.get("/v2/models/stats")
    assert status == 200 and [e["name"] for e in every["model_stats"]] == ["tiny"]
    assert server.get("/v2/models/tiny/stats")[1] == {"model_stats": [stats()]}
    status, missing = server.get("/v2/models/nope/stats")
    assert status == 404 and "unknown model 'nope'" in missing["error"]
    assert server.get("/v2/models/tiny/versions/7/stats")[0] == 404
    assert "statistics" in server.get("/v2")[1]["extensions"]

    # Triton's own client reads it.
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        read = client.get_inference_statistics("tiny", "1")
    finally:
        client.close()
    assert read["model_stats"][0]["inference_stats"]["success"]["count"] == succeeded


def test_a_version_that_served_nothing_has_statistics_of_zero(start_server, tiny_model):
    server = start_server(server_config(model_entry("tiny", tiny_model)))
    status, answer = server.get("/v2/models/tiny/stats")
    assert status == 200
    (entry,) = answer["model_stats"]
    assert entry["inference_count"] == entry["execution_count"] == entry["last_inference"] == 0
    assert entry["batch_stats"] == [] and all(d == {"count": 0, "ns": 0} for d in entry["inference_stats"].values())
