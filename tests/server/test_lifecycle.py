"""Workers that die, servers that stop, clients that leave, requests that wait too long."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from support.client import TIMEOUT, post, predict_many
from support.images import encode, photo_like
from support.metrics import scrape, value
from support.models import tiny_classifier
from support.server import (REPO, model_entry, pid_alive, server_config, shm_lock_files, shm_segments,
                            wait_until)

IMAGE = encode(photo_like(320, 240, seed=1), "JPEG")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def quick_model(models_dir):
    """About 2 ms per image."""
    return tiny_classifier(models_dir / "quick.onnx", slow_layers=30)


@pytest.fixture(scope="module")
def slow_model(models_dir):
    """About 60 ms per image: requests queue up behind each other."""
    return tiny_classifier(models_dir / "slow.onnx", slow_layers=200, hidden=2048)


async def _load(url: str, clients: int, duration_s: float, outcomes: list) -> None:
    """Closed-loop clients for a bounded time; records (status, error text) or exception names."""
    deadline = time.monotonic() + duration_s

    async def client(session):
        while time.monotonic() < deadline:
            try:
                reply = await post(session, url, IMAGE)
                outcomes.append((reply.status, reply.body.get("error", "")))
            except aiohttp.ClientError as exc:
                outcomes.append((type(exc).__name__, str(exc)))
                await asyncio.sleep(0.01)

    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))


def test_killed_worker_fails_its_requests_with_503_and_is_replaced(start_server, quick_model):
    server = start_server(server_config(model_entry("quick", quick_model, batch_size=4)))
    url = f"{server.url}/predict/quick"
    (old_pid,) = server.worker_pids("quick")
    outcomes: list = []

    async def main():
        load = asyncio.create_task(_load(url, 8, 3.0, outcomes))
        await asyncio.sleep(0.7)
        os.kill(old_pid, signal.SIGKILL)
        await load

    asyncio.run(main())
    wait_until(lambda: server.models()["quick"]["workers"][0]["live"], what="replacement worker")
    worker = server.models()["quick"]["workers"][0]
    assert worker["pid"] != old_pid and worker["restarts"] == 1
    assert worker["restart_reasons"] == {"exited": 1} and worker["last_exit"] == "died with exit code -9"
    assert value(scrape(server.url), "cronnx_worker_restarts_total", model="quick", version=1, reason="exited") == 1

    statuses = {status for status, _ in outcomes}
    assert statuses <= {200, 503}, outcomes
    died = [error for status, error in outcomes if status == 503 and "died" in error]
    assert died, "requests in flight at the kill must fail with 503 saying the worker died"
    assert any(status == 200 for status, _ in outcomes)

    after = asyncio.run(predict_many(url, [IMAGE] * 10))
    assert [r.status for r in after] == [200] * 10
    assert server.models()["quick"]["workers"][0]["slots_in_use"] == 0


def test_sigterm_finishes_in_flight_requests_and_leaves_nothing_behind(start_server, slow_model):
    server = start_server(server_config(model_entry("slow", slow_model, batch_size=1, ring_slots=16),
                                        request_timeout_s=30))
    url = f"{server.url}/predict/slow"
    workers = server.worker_pids("slow")
    pid = server.proc.pid

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            in_flight = [asyncio.create_task(post(session, url, IMAGE)) for _ in range(6)]
            # Six requests of ~60 ms each, run one at a time: most are still queued at the signal.
            await asyncio.sleep(0.15)
            server.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*in_flight)

    replies = asyncio.run(main())
    assert [r.status for r in replies] == [200] * 6, replies
    assert server.proc.wait(30) == 0
    assert not any(pid_alive(w) for w in workers)
    assert shm_segments(pid) == [] and shm_lock_files(pid) == []  # the claim given up too


@pytest.mark.parametrize("placement", [{}, {"front_processes": 2}, {"preprocess_processes": 2}],
                         ids=["threads", "front-processes", "preprocessing-processes"])
def test_refused_images_leave_nothing_behind_and_the_stop_logs_only_json(start_server, quick_model, placement):
    """An image refused while its slot's memory was being written leaves no view of that memory
    behind: at the stop every ring unmaps, and nothing but JSON lines reaches the log."""
    server = start_server(server_config(model_entry("quick", quick_model), **placement))
    truncated = IMAGE[:len(IMAGE) // 3]
    v2 = json.dumps({"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": ["aGVsbG8="]}]})

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            replies = [await post(session, f"{server.url}/predict/quick", body) for body in (b"hello", truncated)]
            replies.append(await post(session, f"{server.url}/v2/models/quick/infer", v2.encode(), "application/json"))
            return replies

    replies = asyncio.run(main())
    assert [r.status for r in replies] == [400, 400, 400], replies
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    lines = [line for line in server.log().splitlines() if line.strip()]
    not_json = [line for line in lines if not line.startswith("{")]
    assert lines and not not_json, not_json
    assert all(json.loads(line)["level"] for line in lines)


def test_sigint_stops_cleanly_too(start_server, quick_model):
    server = start_server(server_config(model_entry("quick", quick_model)))
    workers = server.worker_pids("quick")
    assert server.stop(signal.SIGINT) == 0
    assert not any(pid_alive(w) for w in workers)
    assert shm_segments(server.proc.pid) == []


def test_sigterm_during_start_up_exits_0_at_once(tmp_path):
    """Before the event loop takes SIGTERM over, it ends the start-up (as a container's PID 1 it
    would otherwise be dropped). The labels file is a FIFO: reading it blocks the start-up there."""
    fifo = tmp_path / "labels.txt"
    os.mkfifo(fifo)
    model = tiny_classifier(tmp_path / "tiny.onnx")
    config = tmp_path / "cronnx.yaml"
    config.write_text(yaml.safe_dump(server_config(model_entry("blocked", model, labels=str(fifo)))))
    proc = subprocess.Popen([sys.executable, "-m", "cronnx", "serve", "--config", str(config), "--port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # Opening a FIFO with no writer waits in the kernel's wait_for_partner.
        wait_until(lambda: Path(f"/proc/{proc.pid}/wchan").read_text() == "wait_for_partner",
                   what="the start-up to block on the FIFO")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_request_waiting_longer_than_its_timeout_gets_504(start_server, slow_model):
    timeout_s = 1.0
    server = start_server(server_config(model_entry("slow", slow_model, batch_size=1, ring_slots=64),
                                        request_timeout_s=timeout_s))
    url = f"{server.url}/predict/slow"
    # The burst is sized from a warm request's run time, so that the first in line is answered and
    # the last cannot be, however fast or loaded the machine (a fixed count flaked on a slow one).
    warm = asyncio.run(predict_many(url, [IMAGE]))[0]
    assert warm.status == 200, warm
    run_s = warm.body["timings_ms"]["inference"] / 1000
    burst = min(64, max(16, math.ceil(3 * timeout_s / run_s)))
    replies = asyncio.run(predict_many(url, [IMAGE] * burst, concurrency=burst))
    statuses = [r.status for r in replies]
    assert 200 in statuses and 504 in statuses, (run_s, statuses)
    assert set(statuses) == {200, 504}
    assert all("timeout" in r.body["error"] for r in replies if r.status == 504)
    # Timed-out requests that had not run yet are dropped by the worker, not computed.
    wait_until(lambda: server.models()["slow"]["workers"][0]["slots_in_use"] == 0, what="slots freed")
    worker = server.models()["slow"]["workers"][0]
    assert worker["items_dropped"] > 0
    assert worker["items_run"] + worker["items_dropped"] == 1 + burst


def test_client_that_disconnects_costs_no_inference(start_server, slow_model):
    server = start_server(server_config(model_entry("slow", slow_model, batch_size=1, ring_slots=32),
                                        request_timeout_s=30))
    url = f"{server.url}/predict/slow"

    async def impatient():
        timeout = aiohttp.ClientTimeout(total=0.25)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            results = await asyncio.gather(*(post(session, url, IMAGE) for _ in range(12)), return_exceptions=True)
        return results

    results = asyncio.run(impatient())
    assert any(isinstance(r, asyncio.TimeoutError) for r in results)
    wait_until(lambda: server.models()["slow"]["workers"][0]["slots_in_use"] == 0, what="slots freed")
    worker = server.models()["slow"]["workers"][0]
    assert worker["items_dropped"] > 0
    assert worker["items_run"] + worker["items_dropped"] == 12
    # The server is still fine.
    assert [r.status for r in asyncio.run(predict_many(url, [IMAGE]))] == [200]


def test_a_full_admission_queue_answers_503_with_retry_after_at_once(start_server, slow_model):
    server = start_server(server_config(model_entry("slow", slow_model, batch_size=1, ring_slots=2, max_queue_size=1),
                                        request_timeout_s=30))

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            return await asyncio.gather(*(post(session, f"{server.url}/predict/slow", IMAGE) for _ in range(10)))

    replies = asyncio.run(main())
    full = [r for r in replies if r.status == 503]
    assert full and len(full) <= 7  # two slots and one place in the queue
    assert all(r.headers.get("Retry-After") == "1" and "capacity" in r.body["error"] for r in full)
    assert {r.status for r in replies} == {200, 503}


def test_computing_threads_are_marked_cpu_bound_and_the_event_loop_is_not(start_server, quick_model):
    """Workers (whose onnxruntime threads inherit it) and preprocessing threads run as SCHED_BATCH,
    so their wake-ups do not preempt each other mid-inference; the event loop keeps the default."""
    server = start_server(server_config(model_entry("quick", quick_model, workers=2)))
    asyncio.run(predict_many(f"{server.url}/predict/quick", [IMAGE] * 4))  # starts the preprocessing threads

    def policies(pid: int) -> dict[int, int]:
        return {int(tid): os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}

    for worker in server.worker_pids("quick"):
        assert policies(worker)[worker] == os.SCHED_BATCH, policies(worker)
    front = policies(server.proc.pid)
    assert front.pop(server.proc.pid) == os.SCHED_OTHER
    assert list(front.values()).count(os.SCHED_BATCH) == 2, front  # the 2 preprocessing threads


def test_hung_worker_is_killed_and_replaced_and_shows_in_models_logs_and_metrics(start_server, quick_model):
    """A worker that stops answering (here: stopped by SIGSTOP) is noticed by its missed pings: its
    request gets 503 naming the reason, a new worker serves, and the restart is counted by reason."""
    server = start_server(server_config(model_entry("quick", quick_model), request_timeout_s=20,
                                        worker_ping_interval_s=0.1, worker_ping_timeout_s=1.0))
    url = f"{server.url}/predict/quick"
    (old_pid,) = server.worker_pids("quick")
    os.kill(old_pid, signal.SIGSTOP)
    try:
        (reply,) = asyncio.run(predict_many(url, [IMAGE]))
    finally:
        if pid_alive(old_pid):
            os.kill(old_pid, signal.SIGCONT)
    assert reply.status == 503 and "ping_timeout" in reply.body["error"], reply
    assert reply.headers.get("Retry-After") == "1"

    wait_until(lambda: server.models()["quick"]["workers"][0]["live"], what="replacement worker")
    worker = server.models()["quick"]["workers"][0]
    assert worker["pid"] != old_pid and not pid_alive(old_pid)
    assert worker["restart_reasons"] == {"ping_timeout": 1} and "ping_timeout" in worker["last_exit"]
    m = scrape(server.url)
    assert value(m, "cronnx_worker_restarts_total", model="quick", version=1, reason="ping_timeout") == 1
    assert value(m, "cronnx_requests_total", api="predict", model="quick", version=1, outcome="503") == 1
    records = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any(r.get("reason") == "ping_timeout" and r.get("pid") == server.proc.pid for r in records), records
    assert [r.status for r in asyncio.run(predict_many(url, [IMAGE] * 4))] == [200] * 4
