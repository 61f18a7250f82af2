"""The inference engine below HTTP: every request gets the answer for its own input, and every
ring slot comes back on every path (ring rules 1-6 in cronnx/ipc/ring.py).

Real registry, supervisor, rings, pipes and worker processes running onnxruntime; faults are
injected by the input (tests/support/fake_worker.py). After each test no slot is in use and no
worker holds a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import multiprocessing
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from PIL import Image

from cronnx.models import catalog
from cronnx.models.catalog import ModelVersion
from cronnx.config import ModelConfig, PreprocessConfig
from cronnx.observability.logs import LoggingSpec
from cronnx.engine.admission import QueueMemory
from cronnx.engine.inference import InferenceEngine
from cronnx.engine.client import NO_QUEUE_PARAMETERS, QueueParameters
from cronnx.errors import (DeadlineExceeded, InferenceFailed, InvalidImage, InvalidRequest, PreprocessingLost,
                           QueueFull, QueueTimeout, WorkerLost)
from cronnx.preprocessing.placement import ProcessPreprocessing, ThreadPreprocessing
from cronnx.engine.registry import Registry
from cronnx.workers.supervisor import Liveness
from support import fake_worker
from support.fake_worker import DIE, FAIL, HANG, JITTER, SLOW
from support.models import channel_mean_model
from support.server import pid_alive

pytestmark = pytest.mark.timeout(120)

# Pixels reach the model as they are: the channel-mean model answers an image's own colour.
IDENTITY = PreprocessConfig(resize="stretch", scale=1.0, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
QUIET = Liveness(ping_interval_s=0.05, ping_timeout_s=5.0, batch_run_timeout_s=5.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return channel_mean_model(tmp_path_factory.mktemp("engine") / "mean.onnx")


def png(rgb: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(out, "PNG")
    return out.getvalue()


def expected(rgb) -> list[float]:
    return [float(c) for c in rgb]


class Harness:
    def __init__(self, engine: InferenceEngine, registry: Registry, batches: list[int], started_dir: Path):
        self.engine, self.registry, self.batches = engine, registry, batches
        self._started_dir = started_dir

    def slow_batches_started(self) -> int:
        """SLOW or HANG batches the workers have begun to run."""
        return len(os.listdir(self._started_dir))

    @property
    def pool(self):
        return self.registry.route("m").versions[1]

    @property
    def worker(self):
        return self.pool.workers[0]

    async def infer(self, rgb, timeout_s: float = 10.0, image: bytes | None = None,
                    queue: QueueParameters = NO_QUEUE_PARAMETERS):
        deadline = asyncio.get_running_loop().time() + timeout_s
        return await self.engine.infer(self.pool, image or png(rgb), f"req-{rgb}", deadline, queue)

    async def slow_requests_holding_every_slot(self) -> list[asyncio.Task]:
        """One SLOW request per slot of the (one) worker, each colour (SLOW, i, i), all holding
        their slots when this returns."""
        slots = self.worker.ring.slots
        tasks = [asyncio.create_task(self.infer((SLOW, i, i))) for i in range(slots)]
        await self.until(lambda: self.pool.slots_in_use == slots, "every slot taken")
        return tasks

    async def until(self, predicate, what: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.005)

    def settled(self) -> bool:
        return self.pool.slots_in_use == 0 and all(w.channel is None or w.channel.held == 0 for w in self.pool.workers)

    async def replaced(self, old_pid: int, cause: str, colour: tuple[int, int, int]) -> None:
        """A new worker took the old one's place, its restart counted under `cause`, and it serves."""
        await self.until(lambda: self.worker.live, "the replacement worker")
        assert self.worker.pid != old_pid and self.worker.restarts == {cause: 1}
        assert (await self.infer(colour)).output.tolist() == expected(colour)

    async def settle(self) -> None:
        """Every slot free and nothing held by a worker."""
        await self.until(self.settled, "every slot to come back")
        assert all(w.ring.filling_count == 0 for w in self.pool.workers)


@asynccontextmanager
async def serving(model_path, workers: int = 1, batch_size: int = 4, ring_slots: int = 8,
                  batch_timeout_ms: float = 5.0, liveness: Liveness = QUIET, threads: int = 2, processes: int = 0,
                  fill_timeout_s: float = 30.0, queue_bytes: int = 0, **queue_policy):
    """The engine on a real registry; images decoded by `threads` threads, or by `processes`
    preprocessing processes when that is above 0; `queue_bytes`: the server's max_queue_bytes;
    `queue_policy`: the model's admission queue fields (max_queue_size, priority_levels, ...)."""
    config = ModelConfig(name="m", path=str(model_path), batch_size=batch_size, batch_timeout_ms=batch_timeout_ms,
                         workers=workers, ring_slots=ring_slots, intra_op_threads=1, preprocess=IDENTITY,
                         **queue_policy)
    prepared = catalog.prepare(ModelVersion("m", 1, str(model_path), config, "test"))
    batches: list[int] = []
    started_dir = Path(tempfile.mkdtemp(prefix="cronnx-started-"))
    os.environ[fake_worker.STARTED_DIR_ENV] = str(started_dir)  # inherited by the spawned workers
    quiet = LoggingSpec("critical", "text")
    registry = Registry(quiet, lambda name, version: lambda worker, done, traced: batches.append(len(done.slots)),
                        60.0, liveness, QueueMemory(queue_bytes), fake_worker.main)
    preprocessing = (ProcessPreprocessing(processes, 1_000_000, fill_timeout_s, quiet) if processes
                     else ThreadPreprocessing(threads))
    try:
        await registry.apply([prepared], {}, {"m"})
        harness = Harness(InferenceEngine(registry, preprocessing), registry, batches, started_dir)
        harness.preprocessing = preprocessing
        yield harness
        await harness.settle()
    finally:
        await preprocessing.close()
        await registry.close()
        del os.environ[fake_worker.STARTED_DIR_ENV]
        shutil.rmtree(started_dir)


def test_each_request_gets_the_answer_for_its_own_input(model):
    colours = [(10 + i, 200 - i, (7 * i) % 256) for i in range(48)]

    async def main():
        async with serving(model, workers=2, ring_slots=32) as h:
            results = await asyncio.gather(*(h.infer(c) for c in colours))
            assert [r.output.tolist() for r in results] == [expected(c) for c in colours]
            assert max(h.batches) > 1 and sum(h.batches) == len(colours)
            assert {r.batch_size for r in results} == set(h.batches)

    asyncio.run(main())


def test_cancel_during_fill_frees_the_slot_only_when_its_thread_is_done(model):
    async def main():
        async with serving(model) as h:
            decode = h.pool.preprocess
            entered, go_on = threading.Event(), threading.Event()

            def slow_decode(image, out):
                entered.set()
                go_on.wait(10)
                decode(image, out)

            h.pool.preprocess = slow_decode
            task = asyncio.create_task(h.infer((10, 20, 30)))
            assert await asyncio.to_thread(entered.wait, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # Ring rule 4: the thread still writes into the slot, so the slot stays taken.
            assert h.pool.slots_in_use == 1
            go_on.set()
            await h.settle()
            h.pool.preprocess = decode
            assert (await h.infer((40, 50, 60))).output.tolist() == expected((40, 50, 60))

    asyncio.run(main())


def test_cancel_of_a_waiting_request_is_dropped_by_the_worker(model):
    async def main():
        async with serving(model, batch_size=1) as h:
            running = asyncio.create_task(h.infer((SLOW, 1, 2)))
            await h.until(lambda: h.slow_batches_started() == 1, "the slow batch to start")
            waiting = asyncio.create_task(h.infer((10, 11, 12)))
            await h.until(lambda: h.worker.channel.held == 2, "the second request to be sent")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            # Ring rule 5: sending Cancel frees nothing; the worker's Dropped does.
            assert h.pool.slots_in_use == 2
            assert (await running).output.tolist() == expected((SLOW, 1, 2))
            await h.settle()
            assert h.worker.items == (1, 1, 0)

    asyncio.run(main())


def test_cancel_of_a_running_request_frees_its_slot_when_its_batch_is_done(model):
    async def main():
        async with serving(model) as h:
            task = asyncio.create_task(h.infer((SLOW, 3, 4)))
            await h.until(lambda: h.slow_batches_started() == 1, "the batch to start")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert h.pool.slots_in_use == 1  # the worker is computing into it
            await h.settle()
            assert h.worker.items == (1, 0, 0)
            assert (await h.infer((9, 8, 7))).output.tolist() == expected((9, 8, 7))

    asyncio.run(main())


def test_deadline_expiry_raises_and_the_slot_comes_back_after_the_batch(model):
    async def main():
        async with serving(model) as h:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await h.infer((SLOW, 5, 6), timeout_s=0.1)
            assert time.monotonic() - started < fake_worker.SLOW_S
            assert h.pool.slots_in_use == 1
            await h.settle()
            assert (await h.infer((12, 13, 14))).output.tolist() == expected((12, 13, 14))

    asyncio.run(main())


def test_one_failing_item_fails_alone_and_its_batch_mates_are_answered(model):
    colours = [(FAIL, 1, 1), (20, 21, 22), (30, 31, 32), (40, 41, 42)]

    async def main():
        async with serving(model, batch_timeout_ms=200) as h:
            results = await asyncio.gather(*(h.infer(c) for c in colours), return_exceptions=True)
            assert isinstance(results[0], InferenceFailed) and "injected failure" in results[0].message
            assert [r.output.tolist() for r in results[1:]] == [expected(c) for c in colours[1:]]
            assert h.batches == [3]  # the three good ones answered as one batch
            assert h.worker.items == (3, 0, 1) and not h.worker.restarts and h.worker.live

    asyncio.run(main())


def test_worker_death_mid_batch_fails_its_requests_and_a_new_worker_serves(model):
    async def main():
        async with serving(model, batch_timeout_ms=200) as h:
            old_pid = h.worker.pid
            results = await asyncio.gather(h.infer((DIE, 1, 1)), h.infer((50, 51, 52)), return_exceptions=True)
            assert all(isinstance(r, WorkerLost) for r in results), results
            assert f"died with exit code {fake_worker.DIE_CODE}" in results[0].message
            await h.settle()
            await h.replaced(old_pid, "exited", (60, 61, 62))

    asyncio.run(main())


def test_hung_batch_is_killed_by_the_watchdog_and_its_request_fails_with_the_reason(model):
    async def main():
        liveness = Liveness(ping_interval_s=0.05, ping_timeout_s=5.0, batch_run_timeout_s=0.5)
        async with serving(model, liveness=liveness) as h:
            old_pid = h.worker.pid
            started = time.monotonic()
            with pytest.raises(WorkerLost, match="batch_timeout"):
                await h.infer((HANG, 1, 1))
            assert time.monotonic() - started < 5.0
            await h.settle()
            await h.replaced(old_pid, "batch_timeout", (70, 71, 72))

    asyncio.run(main())


def test_worker_that_stops_answering_pings_is_killed_and_replaced(model):
    async def main():
        liveness = Liveness(ping_interval_s=0.05, ping_timeout_s=0.5, batch_run_timeout_s=30.0)
        async with serving(model, liveness=liveness) as h:
            old_pid = h.worker.pid
            os.kill(old_pid, signal.SIGSTOP)  # alive, holding its pipe, answering nothing
            try:
                with pytest.raises(WorkerLost, match="ping_timeout"):
                    await h.infer((80, 81, 82))
            finally:
                with contextlib.suppress(ProcessLookupError):  # killed, as it should be
                    os.kill(old_pid, signal.SIGCONT)
            await h.replaced(old_pid, "ping_timeout", (90, 91, 92))

    asyncio.run(main())


def test_a_full_queue_refuses_at_once_and_takes_requests_again_when_slots_free(model):
    async def main():
        async with serving(model, batch_size=1, ring_slots=2, max_queue_size=1) as h:
            first = await h.slow_requests_holding_every_slot()
            waiting = asyncio.create_task(h.infer((9, 9, 9)))
            await h.until(lambda: h.pool.admission.depth == 1, "one request waiting")
            with pytest.raises(QueueFull, match="max_queue_size"):
                await h.infer((10, 10, 10))
            assert not any(t.done() for t in first)  # refused while both slots were still taken
            assert [(await t).output.tolist() for t in first] == [expected((SLOW, i, i)) for i in range(2)]
            assert (await waiting).output.tolist() == expected((9, 9, 9))
            assert (await h.infer((11, 12, 13))).output.tolist() == expected((11, 12, 13))

    asyncio.run(main())


def test_waiting_bodies_past_the_servers_byte_budget_are_refused_and_leave_it_when_they_go(model):
    images = {c: png(c) for c in [(9, 9, 9), (10, 10, 10), (11, 11, 11), (12, 12, 12)]}
    size = max(len(i) for i in images.values())

    async def main():
        async with serving(model, batch_size=1, ring_slots=2, queue_bytes=2 * size) as h:
            queue = h.pool.admission
            first = await h.slow_requests_holding_every_slot()
            waiting = [asyncio.create_task(h.infer(c, image=images[c])) for c in [(9, 9, 9), (10, 10, 10)]]
            await h.until(lambda: queue.depth == 2, "two requests waiting")
            assert queue.held_bytes == len(images[(9, 9, 9)]) + len(images[(10, 10, 10)])
            with pytest.raises(QueueFull, match="max_queue_bytes"):  # a third body would not fit
                await h.infer((11, 11, 11), image=images[(11, 11, 11)])
            waiting[0].cancel()  # its client gone: its body no longer counts
            await h.until(lambda: queue.depth == 1, "the one that gave up gone from the queue")
            assert queue.held_bytes == len(images[(10, 10, 10)])
            waiting.append(asyncio.create_task(h.infer((12, 12, 12), image=images[(12, 12, 12)])))
            await h.until(lambda: queue.depth == 2, "a new request waiting in its place")
            assert [(await t).output.tolist() for t in waiting[1:]] == [expected((10, 10, 10)), expected((12, 12, 12))]
            await asyncio.gather(*first)
            assert queue.held_bytes == 0 and queue.depth == 0

    asyncio.run(main())


def test_four_times_the_slots_wait_their_turn_and_each_gets_its_own_answer(model):
    colours = [(20 + i, 100 + i, 3 * i) for i in range(8)]

    async def main():
        async with serving(model, batch_size=2, ring_slots=2) as h:
            results = await asyncio.gather(*(h.infer(c) for c in colours))
            assert [r.output.tolist() for r in results] == [expected(c) for c in colours]
            assert h.pool.admission.depth == 0
            assert sum(h.batches) == len(colours)  # each ran once

    asyncio.run(main())


def test_a_deadline_in_the_queue_is_504_and_nothing_runs_for_it(model):
    async def main():
        async with serving(model, batch_size=1, ring_slots=2) as h:
            first = await h.slow_requests_holding_every_slot()
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await h.infer((7, 7, 7), timeout_s=0.1)
            assert time.monotonic() - started < 0.3  # on time, not when a slot freed (SLOW_S later)
            await asyncio.gather(*first)
            assert h.pool.admission.depth == 0 and sum(h.batches) == 2  # only the two slow ones ran

    asyncio.run(main())


def test_a_request_that_gives_up_in_the_queue_passes_its_turn_on(model):
    async def main():
        async with serving(model, batch_size=1, ring_slots=2) as h:
            first = await h.slow_requests_holding_every_slot()
            gone = asyncio.create_task(h.infer((5, 5, 5)))
            next_one = asyncio.create_task(h.infer((6, 6, 6)))
            await h.until(lambda: h.pool.admission.depth == 2, "two requests waiting")
            gone.cancel()
            await h.until(lambda: h.pool.admission.depth == 1, "the one that gave up gone from the queue")
            assert (await next_one).output.tolist() == expected((6, 6, 6))
            await asyncio.gather(*first)
            assert sum(h.batches) == 3  # nothing ran for the request that gave up

    asyncio.run(main())


def test_freed_slots_go_to_the_highest_priority_first_and_in_arrival_order_within_one(model):
    async def main():
        async with serving(model, batch_size=1, ring_slots=2) as h:
            queue = h.pool.admission
            held = [await queue.acquire(0, 0) for _ in range(2)]  # every slot taken, nothing sent
            order = []

            async def wait(priority: int, name: str):
                taken = await queue.acquire(priority, 0)
                order.append(name)
                return taken

            waiters = []
            for priority, name in [(2, "low-1"), (1, "high-1"), (2, "low-2"), (1, "high-2")]:
                waiters.append(asyncio.create_task(wait(priority, name)))
                await asyncio.sleep(0)  # queued in this order
            await h.until(lambda: queue.depth == 4, "four waiting")
            served = []
            for _ in range(4):
                worker, slot = held.pop(0)
                worker.ring.release(slot)  # hands the slot to the next waiter
                await h.until(lambda: len(order) == len(served) + 1, "the next waiter served")
                task = next(t for t in waiters if t.done() and t not in served)
                served.append(task)
                held.append(task.result())
            assert order == ["high-1", "high-2", "low-1", "low-2"]
            for worker, slot in held:
                worker.ring.release(slot)

    asyncio.run(main())


def test_a_higher_priority_request_gets_the_next_slot_before_an_earlier_lower_one(model):
    async def main():
        async with serving(model, batch_size=1, ring_slots=2, priority_levels=2) as h:
            first = await h.slow_requests_holding_every_slot()  # they run one after the other
            low = asyncio.create_task(h.infer((11, 12, 13), queue=QueueParameters(priority=2)))
            await h.until(lambda: h.pool.admission.depth == 1, "the low-priority request waiting")
            high = asyncio.create_task(h.infer((14, 15, 16), queue=QueueParameters(priority=1)))
            await h.until(lambda: h.pool.admission.depth == 2, "both waiting")
            done, _ = await asyncio.wait([low, high], return_when=asyncio.FIRST_COMPLETED)
            assert done == {high} and not low.done()
            assert (await low).output.tolist() == expected((11, 12, 13))
            assert (await high).output.tolist() == expected((14, 15, 16))
            assert high.result().admission_s < low.result().admission_s
            await asyncio.gather(*first)

    asyncio.run(main())


def test_a_worker_with_more_slots_waiting_than_a_batch_holds_runs_the_higher_priority_first(model):
    async def main():
        async with serving(model, batch_size=2, ring_slots=6, priority_levels=2) as h:
            finished = []

            def start(colour, priority):
                task = asyncio.create_task(h.infer(colour, queue=QueueParameters(priority=priority)))
                task.add_done_callback(lambda _: finished.append(colour))
                return task

            slow = [start((SLOW, i, i), 2) for i in range(2)]
            await h.until(lambda: h.slow_batches_started() == 1, "the slow batch running")
            low = [start((30 + i, 30, 30), 2) for i in range(2)]
            await h.until(lambda: h.worker.channel.held == 4, "the low-priority rows sent to the worker")
            high = [start((40 + i, 40, 40), 1) for i in range(2)]
            await h.until(lambda: h.worker.channel.held == 6, "the high-priority rows sent too")
            results = await asyncio.gather(*slow, *low, *high)
            assert [r.output.tolist() for r in results] == [expected(c) for c in
                                                           [(SLOW, 0, 0), (SLOW, 1, 1), (30, 30, 30), (31, 30, 30),
                                                            (40, 40, 40), (41, 40, 40)]]
            # After the slow batch, the high-priority pair ran before the pair that came first.
            assert set(finished[2:4]) == {(40, 40, 40), (41, 40, 40)}, finished
            assert h.batches == [2, 2, 2]

    asyncio.run(main())


def test_the_queue_timeout_ends_the_wait_and_a_request_may_only_shorten_it_where_allowed(model):
    async def main():
        async with serving(model, batch_size=1, ring_slots=2, default_timeout_ms=100.0,
                           allow_timeout_override=True) as h:
            first = await h.slow_requests_holding_every_slot()
            started = time.monotonic()
            with pytest.raises(QueueTimeout, match="100 ms"):
                await h.infer((17, 17, 17))
            with pytest.raises(QueueTimeout, match="20 ms"):
                await h.infer((17, 17, 17), queue=QueueParameters(timeout_s=0.02))
            with pytest.raises(QueueTimeout, match="100 ms"):  # asking for more gets the model's
                await h.infer((17, 17, 17), queue=QueueParameters(timeout_s=5.0))
            assert time.monotonic() - started < 0.39  # all before a slot freed
            await asyncio.gather(*first)
            assert sum(h.batches) == 2  # nothing ran for them

    asyncio.run(main())


def test_a_priority_or_timeout_the_model_does_not_allow_is_refused_before_any_wait(model):
    async def main():
        async with serving(model, priority_levels=2) as h:
            with pytest.raises(InvalidRequest, match="0 to 2"):
                await h.infer((21, 21, 21), queue=QueueParameters(priority=3))
            with pytest.raises(InvalidRequest, match="allow_timeout_override"):
                await h.infer((21, 21, 21), queue=QueueParameters(timeout_s=1.0))
            answer = await h.infer((21, 21, 21), queue=QueueParameters(priority=2))
            assert answer.output.tolist() == expected((21, 21, 21))
            assert h.batches == [1]

    asyncio.run(main())


@pytest.mark.parametrize("placement", [{"threads": 3}, {"processes": 2}], ids=["threads", "processes"])
def test_stress_random_cancels_and_deadlines_never_cross_answers_or_leak_slots(model, placement):
    """Several producers, thousands of requests, random cancels, deadlines and worker delays.
    Replay a failure with CRONNX_STRESS_SEED=<the printed seed>."""
    seed = int(os.environ.get("CRONNX_STRESS_SEED", random.randrange(2 ** 32)))
    print(f"stress seed {seed}")
    rng = random.Random(seed)
    colours = [(rng.choice([JITTER, rng.randrange(10, 256)]), rng.randrange(256), rng.randrange(256))
               for _ in range(64)]
    images = {c: png(c) for c in colours}
    counts = {"ok": 0, "cancelled": 0, "deadline": 0, "full": 0}

    async def producer(h: Harness, n: int, prng: random.Random) -> None:
        for _ in range(n):
            colour = prng.choice(colours)
            action = prng.random()
            timeout_s = prng.random() * 0.004 if action < 0.15 else 10.0
            task = asyncio.create_task(h.infer(colour, timeout_s, images[colour]))
            if 0.15 <= action < 0.3:
                await asyncio.sleep(prng.random() * 0.003)
                task.cancel()
            try:
                result = await task
            except asyncio.CancelledError:
                counts["cancelled"] += 1
            except DeadlineExceeded:
                counts["deadline"] += 1
            except QueueFull:
                counts["full"] += 1
                await asyncio.sleep(0.001)
            else:
                assert result.output.tolist() == expected(colour), f"seed {seed}: wrong answer for {colour}"
                counts["ok"] += 1
            if prng.random() < 0.1:
                await asyncio.sleep(prng.random() * 0.002)

    async def main():
        async with serving(model, workers=2, batch_size=4, ring_slots=8, batch_timeout_ms=1.0, **placement) as h:
            await asyncio.gather(*(producer(h, 400, random.Random(rng.random())) for _ in range(6)))
            await h.settle()
            assert all(not w.restarts for w in h.pool.workers)

    asyncio.run(main())
    print(f"stress seed {seed}: {counts}")
    assert sum(counts.values()) == 2400
    assert counts["ok"] > 1000 and counts["cancelled"] > 0 and counts["deadline"] > 0


def test_preprocessing_processes_fill_slots_with_each_requests_own_image(model):
    colours = [(30 + i, 100 + i, (11 * i) % 256) for i in range(40)]

    async def main():
        async with serving(model, workers=2, ring_slots=32, processes=2) as h:
            results = await asyncio.gather(*(h.infer(c) for c in colours))
            assert [r.output.tolist() for r in results] == [expected(c) for c in colours]
            with pytest.raises(InvalidImage, match="not an image"):
                await h.infer((1, 2, 3), image=b"not an image at all")
            assert (await h.infer((4, 5, 6))).output.tolist() == expected((4, 5, 6))
            assert h.preprocessing.restarts == 0

    asyncio.run(main())


def test_cancel_during_a_process_fill_frees_the_slot_only_when_the_process_answers(model):
    """Ring rule 4 across processes: a stopped (SIGSTOP) process keeps its slot taken after the
    request gives up, and frees it when it has written and answered."""
    async def main():
        async with serving(model, processes=1) as h:
            pid = h.preprocessing.pids[0]
            os.kill(pid, signal.SIGSTOP)
            try:
                task = asyncio.create_task(h.infer((10, 20, 30)))
                queued = asyncio.create_task(h.infer((70, 80, 90)))  # waits in ProcessPreprocessing's queue
                await h.until(lambda: h.pool.slots_in_use == 2, "both requests to take slots")
                task.cancel()
                queued.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                with pytest.raises(asyncio.CancelledError):
                    await queued
                # The queued job was taken back (its slot freed on the next loop turn); the started
                # one holds its slot for as long as its process may write.
                await h.until(lambda: h.pool.slots_in_use == 1, "the queued request's slot to come back")
                await asyncio.sleep(0.2)
                assert h.pool.slots_in_use == 1
            finally:
                os.kill(pid, signal.SIGCONT)
            await h.settle()
            assert (await h.infer((40, 50, 60))).output.tolist() == expected((40, 50, 60))

    asyncio.run(main())


def test_killed_preprocessing_process_fails_only_its_own_request_and_is_replaced(model):
    colours = [(50 + i, 60, 70) for i in range(12)]

    async def main():
        async with serving(model, workers=1, ring_slots=16, processes=2) as h:
            victim, survivor = h.preprocessing.pids
            os.kill(victim, signal.SIGSTOP)
            doomed = asyncio.create_task(h.infer((1, 1, 1)))
            await h.until(lambda: h.pool.slots_in_use == 1, "the request to reach the stopped process")
            # The other process serves everything else meanwhile, and after the kill.
            others = [asyncio.create_task(h.infer(c)) for c in colours]
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(PreprocessingLost, match="was killed by SIGKILL"):
                await doomed
            assert [r.output.tolist() for r in await asyncio.gather(*others)] == [expected(c) for c in colours]
            await h.until(lambda: len(h.preprocessing.pids) == 2, "the replacement process")
            assert survivor in h.preprocessing.pids and victim not in h.preprocessing.pids
            assert h.preprocessing.restarts == 1
            assert (await h.infer((9, 8, 7))).output.tolist() == expected((9, 8, 7))

    asyncio.run(main())


def test_a_preprocessing_process_stuck_past_the_fill_timeout_is_killed_and_replaced(model):
    """A decoder that never returns (here: SIGSTOP) would hold its process forever: after the fill
    timeout (the request timeout, whose 504 its request has had) it is killed and replaced, and its
    slot comes back."""
    async def main():
        async with serving(model, processes=1, fill_timeout_s=0.5) as h:
            (stuck,) = h.preprocessing.pids
            os.kill(stuck, signal.SIGSTOP)
            with pytest.raises(DeadlineExceeded):
                await h.infer((5, 6, 7), timeout_s=0.2)
            assert h.pool.slots_in_use == 1  # ring rule 4: the stopped process might still write
            await h.until(lambda: h.preprocessing.pids and h.preprocessing.pids != [stuck], "the replacement")
            await h.settle()
            assert h.preprocessing.restarts == 1 and not pid_alive(stuck)
            assert (await h.infer((8, 9, 10))).output.tolist() == expected((8, 9, 10))

    asyncio.run(main())


def test_two_files_for_one_version_are_both_refused_and_the_other_versions_load(model, tmp_path):
    """The registry loads a version under its (name, version): a second file under the same key
    would take the first's place while both load, and leave the first's worker with no owner."""
    copy = tmp_path / "copy.onnx"
    shutil.copy(model, copy)
    config = ModelConfig(name="m", path=str(model), batch_size=4, ring_slots=8, intra_op_threads=1, preprocess=IDENTITY)
    versions = [ModelVersion("m", 1, str(model), config, "test"), ModelVersion("m", 1, str(copy), config, "test"),
                ModelVersion("m", 2, str(model), config, "test")]

    async def main():
        registry = Registry(LoggingSpec("critical", "text"), lambda name, version: lambda worker, done, traced: None, 60.0, QUIET,
                            QueueMemory(0))
        try:
            await asyncio.wait_for(registry.apply([catalog.prepare(v) for v in versions], {}, {"m"}), 60)
            assert sorted(registry.route("m").versions) == [2] and not registry.loading
            assert registry.failed == {("m", 1): f"2 model files are this version: {model}, {copy}"}
            assert len(multiprocessing.active_children()) == 1  # version 2's worker only
        finally:
            await registry.close()
        assert multiprocessing.active_children() == []

    asyncio.run(main())
