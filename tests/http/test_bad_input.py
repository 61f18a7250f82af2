"""Every bad input gets its status and a JSON error, while good requests keep being served."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from PIL import Image

from support.bad_requests import BAD_REQUESTS, BODY_LIMIT
from support.client import TIMEOUT, GoodStream, Reply, post, predict_many
from support.images import encode, photo_like
from support.metrics import scrape, value
from support.models import failing_on_bright_images
from support.reference import DirectModel, assert_matches
from support.server import model_entry, server_config, wait_until

@pytest.fixture
def server(start_server, tiny_model):
    config = server_config(model_entry("tiny", tiny_model), max_body_bytes=BODY_LIMIT, max_image_pixels=4_000_000)
    return start_server(config)


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_its_status_while_good_requests_succeed(server, case):
    content_type, body, status, words = BAD_REQUESTS[case]
    url = f"{server.url}/predict/tiny"
    good = GoodStream(url, encode(photo_like(320, 240, seed=1), "JPEG"))

    async def main():
        stream = asyncio.create_task(good.run())
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            replies = [await post(session, url, body, content_type) for _ in range(3)]
        await asyncio.sleep(0.1)
        good.stop()
        await stream
        return replies

    replies = asyncio.run(main())
    for reply in replies:
        assert reply.status == status, reply.body
        assert words.lower() in reply.body["error"].lower(), reply.body
    assert good.statuses and set(good.statuses) == {200}
    assert all(w["slots_in_use"] == 0 for w in server.models()["tiny"]["workers"])


@pytest.mark.parametrize("front_processes", [1, 2], ids=["one process", "two front processes"])
def test_every_bad_request_beside_good_ones_is_answered_and_counted_under_its_version(start_server, tiny_model,
                                                                                      front_processes):
    """All the bad requests in a row, beside a good stream, in either placement: each gets its
    status and JSON, and is counted once under the version that serves its model (those refused
    before their body was read or their image decoded too); only a model or version that is not
    served is counted without one."""
    server = start_server(server_config(model_entry("tiny", tiny_model, workers=1, ring_slots=32),
                                        front_processes=front_processes, max_body_bytes=BODY_LIMIT,
                                        max_image_pixels=4_000_000))
    url = f"{server.url}/predict/tiny"
    photo = encode(photo_like(320, 240, seed=1), "JPEG")
    good = GoodStream(url, photo)

    async def bad_beside_good():
        stream = asyncio.create_task(good.run())
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            replies = {case: await post(session, url, body, content_type)
                       for case, (content_type, body, _, _) in sorted(BAD_REQUESTS.items())}
            replies["unknown model"] = await post(session, f"{server.url}/predict/nope", photo)
            replies["bad top_k"] = await post(session, url, photo, params={"top_k": "0"})
            replies["version beyond int64"] = await post(session, f"{url}/versions/{'9' * 25}", photo)
        good.stop()
        await stream
        return replies

    replies = asyncio.run(bad_beside_good())
    expected = {**{case: (status, words) for case, (_, _, status, words) in BAD_REQUESTS.items()},
                "unknown model": (404, "tiny"), "bad top_k": (400, "top_k"), "version beyond int64": (404, "not served")}
    for case, (status, words) in expected.items():
        reply = replies[case]
        assert reply.status == status and words.lower() in reply.body["error"].lower(), (case, reply)
        assert reply.headers["X-Request-ID"]
    assert good.statuses and set(good.statuses) == {200}
    assert all(w["slots_in_use"] == 0 for w in server.models()["tiny"]["workers"])

    def counted() -> dict[str, float]:
        return {dict(labels)["model"] + " " + dict(labels)["version"] + " " + dict(labels)["outcome"]: count
                for (name, labels), count in scrape(server.url).items() if name == "cronnx_requests_total"}

    # A front process reports each request over its pipe: wait until all are in.
    wait_until(lambda: sum(counted().values()) == len(expected) + len(good.statuses), timeout_s=10,
               what="every request counted")
    counts = counted()
    assert counts.pop("tiny 1 success") == len(good.statuses)
    assert counts == {"tiny 1 400": 8, "tiny 1 413": 3, "tiny 1 415": 1, "_unknown  404": 2}


def test_unknown_model_is_404_with_the_served_names(server):
    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            return await post(session, f"{server.url}/predict/nope", b"x")

    reply = asyncio.run(main())
    assert reply.status == 404
    assert "nope" in reply.body["error"] and "tiny" in reply.body["error"]


def test_unknown_route_answers_json(server):
    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async with session.get(f"{server.url}/nothing-here") as r:
                return r.status, await r.json()

    status, body = asyncio.run(main())
    assert status == 404 and "error" in body


def test_chunked_body_is_read_whole_and_cut_off_past_the_limit(server):
    """A body without Content-Length (chunked transfer) is served like any other below the limit,
    and refused with 413 once it passes the limit, without reading the rest."""
    photo = encode(photo_like(320, 240, seed=5), "JPEG")

    async def chunked(data: bytes, piece: int = 7000):
        for start in range(0, len(data), piece):
            yield data[start:start + piece]

    async def main():
        url = f"{server.url}/predict/tiny"
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            whole = await post(session, url, photo)
            async with session.post(url, data=chunked(photo), headers={"Content-Type": "image/jpeg"}) as r:
                assert "Content-Length" not in r.request_info.headers
                streamed = Reply(r.status, await r.json(), r.headers)
            async with session.post(url, data=chunked(b"\xff" * (BODY_LIMIT * 2), 64 * 1024),
                                    headers={"Content-Type": "image/jpeg"}) as r:
                too_large = Reply(r.status, await r.json(), r.headers)
        return whole, streamed, too_large

    whole, streamed, too_large = asyncio.run(main())
    assert whole.status == streamed.status == 200, (whole, streamed)
    assert streamed.body["predictions"] == whole.body["predictions"]
    assert too_large.status == 413 and "limit" in too_large.body["error"], too_large


@pytest.fixture(scope="module")
def fragile_model(tmp_path_factory):
    return failing_on_bright_images(tmp_path_factory.mktemp("fragile") / "fragile.onnx")


def test_input_that_onnxruntime_fails_on_gets_500_alone_and_the_worker_stays(start_server, fragile_model):
    """A white picture makes the model's run fail. Its request gets 500 with onnxruntime's reason;
    the photos batched with it are run again without it and answered correctly; the worker is
    not restarted."""
    config = server_config(model_entry("fragile", fragile_model, batch_size=4, batch_timeout_ms=300))
    server = start_server(config)
    (pid,) = server.worker_pids("fragile")
    direct = DirectModel(fragile_model)
    white = encode(Image.new("RGB", (64, 64), "white"), "PNG")
    photos = [encode(photo_like(320, 240, seed=seed), "JPEG") for seed in range(3)]
    url = f"{server.url}/predict/fragile"

    def shared_batch_failures() -> int:
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        return sum(1 for line in lines if line["message"] == "inference failed" and line["batch_size"] > 1)

    rounds = 0
    # The white request usually shares the batch with the photos; try a few times until it has.
    while rounds < 4 and (rounds == 0 or shared_batch_failures() == 0):
        rounds += 1
        *good, bad = asyncio.run(predict_many(url, photos + [white]))
        assert bad.status == 500, bad
        assert bad.body["error"].startswith("inference failed:") and "Reshape" in bad.body["error"], bad.body
        for photo, reply in zip(photos, good):
            assert reply.status == 200, reply
            assert_matches(reply.body, direct.probabilities(photo))
    assert shared_batch_failures() >= 1, "the failing image never shared a batch: the test proved nothing"
    assert server.worker_pids("fragile") == [pid]
    worker = server.models()["fragile"]["workers"][0]
    assert worker["restarts"] == 0
    assert worker["items_failed"] == rounds and worker["items_run"] == 3 * rounds
    samples = scrape(server.url)
    assert value(samples, "cronnx_requests_total", api="predict", model="fragile", version="1", outcome="500") == rounds
    assert value(samples, "cronnx_requests_total", api="predict", model="fragile", version="1", outcome="success") == 3 * rounds
