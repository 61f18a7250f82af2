"""`server.preprocess_processes`: images decoded by preprocessing processes, end to end over HTTP.

Served answers equal a direct onnxruntime run, bad images get their 400/413 from the processes
beside a good stream, a killed process is replaced without losing other requests, and SIGTERM
leaves no process and no shared memory behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp
import pytest
import yaml

from bench.processes import server_children
from cronnx.ipc.cpu import usable_cores
from cronnx.observability.logs import LoggingSpec
from cronnx.preprocessing.placement import start
from support.bad_requests import BAD_REQUESTS, BODY_LIMIT
from support.client import TIMEOUT, GoodStream, post, predict_many
from support.images import encode, photo_like
from support.metrics import scrape
from support.reference import DirectModel, assert_matches
from support.server import mapped_segments, model_entry, pid_alive, server_config, shm_segments, wait_until

RESTARTS = ("cronnx_preprocess_process_restarts_total", frozenset())
PHOTOS = [encode(photo_like(320 + 16 * i, 240, seed=i), "JPEG", quality=90) for i in range(6)]


@pytest.fixture
def server(start_server, tiny_model):
    config = server_config(model_entry("tiny", tiny_model, workers=1, ring_slots=32), preprocess_processes=2,
                           max_body_bytes=BODY_LIMIT, max_image_pixels=4_000_000)
    return start_server(config)


def test_default_placement_is_processes_per_core_on_cuda_and_threads_on_the_cpu():
    async def main():
        quiet = LoggingSpec("critical", "text")
        chosen = [start(None, 3, True, 10 ** 6, 10.0, quiet), start(None, 3, False, 10 ** 6, 10.0, quiet),
                  start(0, 3, True, 10 ** 6, 10.0, quiet), start(2, 3, False, 10 ** 6, 10.0, quiet)]
        try:
            return [str(p) for p in chosen]
        finally:
            for p in chosen:
                await p.close()

    assert asyncio.run(main()) == [f"{usable_cores()} processes", "3 threads", "3 threads", "2 processes"]


def test_the_start_up_log_names_the_placement(start_server, tiny_model):
    threads = start_server(server_config(model_entry("tiny", tiny_model)))
    assert "preprocessing in 2 threads" in threads.log()  # server_config's preprocess_threads, on the CPU
    assert threads.get("/models")[1]["preprocessing"] == {"placement": "threads", "count": 2, "restarts": 0,
                                                          "pids": []}


def preprocessing_pids(server) -> list[int]:
    """The server process's preprocessing processes: its children less its workers and
    multiprocessing's resource tracker."""
    return server_children(server.proc.pid, server.worker_pids("tiny"))


def test_answers_equal_a_direct_run_and_bad_images_get_their_status(server, tiny_model):
    url = f"{server.url}/predict/tiny"
    direct = DirectModel(tiny_model)
    replies = asyncio.run(predict_many(url, PHOTOS * 4))
    for photo, reply in zip(PHOTOS * 4, replies):
        assert reply.status == 200, reply
        assert_matches(reply.body, direct.probabilities(photo))
    good = GoodStream(url, PHOTOS[0])

    async def bad_beside_good():
        stream = asyncio.create_task(good.run())
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            replies = {case: await post(session, url, body, content_type)
                       for case, (content_type, body, _, _) in sorted(BAD_REQUESTS.items())}
        good.stop()
        await stream
        return replies

    for case, reply in asyncio.run(bad_beside_good()).items():
        _, _, status, words = BAD_REQUESTS[case]
        assert reply.status == status and words.lower() in reply.body["error"].lower(), (case, reply)
    assert good.statuses and set(good.statuses) == {200}
    assert len(preprocessing_pids(server)) == 2 and "preprocessing in 2 processes" in server.log()
    assert server.get("/models")[1]["preprocessing"] == {"placement": "processes", "count": 2, "restarts": 0,
                                                         "pids": sorted(preprocessing_pids(server))}
    assert RESTARTS in scrape(server.url) and scrape(server.url).get(RESTARTS) == 0


def test_a_process_logs_as_the_server_does(server):
    """What a preprocessing process logs (here a colour profile it cannot use) is a line in the
    server's format (JSON), once per process however many images carry the profile."""
    data = encode(photo_like(200, 150, seed=7), "JPEG", quality=90, icc_profile=b"not an ICC profile (processes)")
    replies = asyncio.run(predict_many(f"{server.url}/predict/tiny", [data] * 8))
    assert [r.status for r in replies] == [200] * 8, replies
    lines = [json.loads(line) for line in server.log().splitlines() if "ICC colour profile" in line]
    assert 1 <= len(lines) <= 2, lines
    assert all(line["level"] == "warning" and line["logger"] == "cronnx.preprocessing" for line in lines)
    pids = [line["pid"] for line in lines]
    assert len(set(pids)) == len(pids) and set(pids) <= set(preprocessing_pids(server))


def test_a_replaced_versions_rings_are_unmapped_by_the_processes(server):
    """An unlinked segment's memory (it counts against /dev/shm) is freed only when no process maps
    it: after a reload replaces the version, idle preprocessing processes let go of its rings."""
    url = f"{server.url}/predict/tiny"
    assert [r.status for r in asyncio.run(predict_many(url, PHOTOS * 4))] == [200] * 24
    pids = preprocessing_pids(server)
    old = set(shm_segments(server.proc.pid))
    assert old and all(mapped_segments(pid) & old for pid in pids)  # both filled slots
    config = yaml.safe_load(server.config_path.read_text())
    config["models"][0]["batch_timeout_ms"] = 3  # a new fingerprint: the version is replaced
    server.config_path.write_text(yaml.safe_dump(config))
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: not old & set(shm_segments(server.proc.pid)), what="the old rings to be unlinked")
    wait_until(lambda: not any(mapped_segments(pid) & old for pid in pids), timeout_s=10,
               what="the preprocessing processes to unmap the old rings")
    assert preprocessing_pids(server) == pids  # the same processes, still serving
    assert [r.status for r in asyncio.run(predict_many(url, PHOTOS))] == [200] * 6


def test_killed_process_is_replaced_and_sigterm_leaves_nothing(server, tiny_model):
    url = f"{server.url}/predict/tiny"
    before = preprocessing_pids(server)
    assert len(before) == 2
    os.kill(before[0], signal.SIGKILL)
    wait_until(lambda: len(preprocessing_pids(server)) == 2 and before[0] not in preprocessing_pids(server),
               what="a new preprocessing process")
    replies = asyncio.run(predict_many(url, PHOTOS * 3))
    assert [r.status for r in replies] == [200] * len(replies)
    assert scrape(server.url).get(RESTARTS) == 1
    status = server.get("/models")[1]["preprocessing"]
    assert status["restarts"] == 1 and status["pids"] == sorted(preprocessing_pids(server))
    assert before[0] not in status["pids"]

    processes = preprocessing_pids(server) + server.worker_pids("tiny")
    assert server.stop(signal.SIGTERM) == 0
    assert not any(pid_alive(pid) for pid in processes)
    assert shm_segments(server.proc.pid) == []
