"""gRPC calls that wait for a slow model: past a full admission queue a call is UNAVAILABLE at once;
a call whose deadline passes while it waits is DEADLINE_EXCEEDED and runs nothing; a call the
client cancels while its row waits gives its slot back unrun (the model then takes as many calls at
once as before) and is counted as 499; SIGTERM under gRPC load answers every call in flight and
leaves no process and no shared memory behind, in both placements."""

from __future__ import annotations

import asyncio
import json
import signal

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.processes import children_of
from support.metrics import scrape, value
from support.server import (ServerProcess, model_entry, pid_alive, server_config, shm_lock_files, shm_segments,
                            wait_until)

SLOTS, QUEUE = 2, 1
TIMEOUT_S = 30.0
# A row of the slow model takes ~0.2 ms a step on one core here: 1,500 steps, about 0.3 s.
STEPS = 1500
SHAPE = (1, 3, 32, 32)


def slow_on_demand(path, hidden: int = 1024, size: int = 32, classes: int = 10):
    """A classifier that runs MatMul+Tanh over its hidden layer as many times as its input's
    largest value (a Loop): zeros, as its load and warm-up run it, take no time, and a row full of
    STEPS as long as the tests need. A model slow on every input loaded and warmed up for seconds."""
    rng = np.random.default_rng(9)
    features = 3 * size * size
    inits = [numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(features), (features, hidden)).astype(np.float32),
                                     "project"),
             numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(hidden), (hidden, hidden)).astype(np.float32), "square"),
             numpy_helper.from_array(rng.normal(0, 3 / np.sqrt(hidden), (hidden, classes)).astype(np.float32), "head"),
             numpy_helper.from_array(np.array(True), "keep_going")]
    step = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["h_in", "square"], ["m"]),
         helper.make_node("Tanh", ["m"], ["h_out"])], "step",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "project"], ["m0"]),
             helper.make_node("Tanh", ["m0"], ["h0"]),
             helper.make_node("ReduceMax", ["input"], ["largest"], keepdims=0),
             helper.make_node("Cast", ["largest"], ["steps"], to=TensorProto.INT64),
             helper.make_node("Loop", ["steps", "keep_going", "h0"], ["h"], body=step),
             helper.make_node("MatMul", ["h", "head"], ["logits"])]
    graph = helper.make_graph(
        nodes, "slow_on_demand", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    return slow_on_demand(tmp_path_factory.mktemp("grpc-slow") / "slow.onnx")


@pytest.fixture(scope="module")
def server(tmp_path_factory, slow_model):
    """Two ring slots, one row a batch, one place in the admission queue: three calls in, the fourth
    refused."""
    config = server_config(model_entry("slow", slow_model, batch_size=1, ring_slots=SLOTS, max_queue_size=QUEUE),
                           grpc_port=0, request_timeout_s=60)
    with ServerProcess.running(tmp_path_factory.mktemp("grpc-slow-server"), config) as server:
        yield server


def row_request(steps: int = STEPS) -> service_pb2.ModelInferRequest:
    """One row of the slow model, `steps` long (about 0.2 ms each)."""
    request = service_pb2.ModelInferRequest(model_name="slow")
    request.inputs.add(name="input", datatype="FP32", shape=list(SHAPE))
    request.raw_input_contents.append(np.full(SHAPE, steps, np.float32).tobytes())
    return request


def model_status(server: ServerProcess) -> dict:
    """The model's slots in use, rows waiting for one, and rows its worker ran and dropped."""
    model = server.get("/models")[1]["models"][0]
    (worker,) = model["workers"]
    return {"in_use": worker["slots_in_use"], "waiting": model["queue"]["waiting"], "run": worker["items_run"],
            "dropped": worker["items_dropped"]}


async def until(server: ServerProcess, predicate, what: str) -> dict:
    """Poll the model's status (off the event loop, so that the calls in flight go on) until
    `predicate(status)` holds."""
    for _ in range(400):
        status = await asyncio.to_thread(model_status, server)
        if predicate(status):
            return status
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}: {status}")


async def call_held(server, stub, steps: int = STEPS, **options) -> grpc.aio.Call:
    """A call of one row (`steps` long), returned once it is held (in a slot or in the queue) or
    has ended."""
    held = await asyncio.to_thread(model_status, server)
    call = stub.ModelInfer(row_request(steps), **{"timeout": TIMEOUT_S, **options})
    await until(server, lambda s: call.done() or s["in_use"] + s["waiting"] > held["in_use"] + held["waiting"],
                "the call held")
    return call


async def taken_at_once(server, stub) -> tuple[int, grpc.aio.AioRpcError]:
    """How many one-row calls the model holds at once: sent one by one, each held before the next,
    until one is refused (its error returned); then every held call answered OK."""
    calls = []
    while len(calls) <= SLOTS + QUEUE + 1:
        call = await call_held(server, stub)
        if call.done():
            try:
                await call
            except grpc.aio.AioRpcError as refused:
                answers = [await c for c in calls]
                assert all(len(a.raw_output_contents) == 1 for a in answers)
                return len(calls), refused
            raise AssertionError("a row ran to its end before the next call was sent: the model is too fast here")
        calls.append(call)
    raise AssertionError(f"{len(calls)} calls held at once")


async def with_stub(server, main):
    async with grpc.aio.insecure_channel(server.grpc_address) as channel:
        return await main(service_pb2_grpc.GRPCInferenceServiceStub(channel))


def requests_total(server, outcome: str) -> float:
    return value(scrape(server.url), "cronnx_requests_total", api="grpc", model="slow", version=1, outcome=outcome)


def test_past_a_full_queue_a_call_is_unavailable_at_once(server):
    before = requests_total(server, "503")
    taken, refused = asyncio.run(with_stub(server, lambda stub: taken_at_once(server, stub)))
    assert taken == SLOTS + QUEUE
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert "model 'slow' is at capacity" in refused.details() and "(max_queue_size)" in refused.details()
    # gRPC's Retry-After, as HTTP's 503 says Retry-After: 1.
    assert ("grpc-retry-pushback-ms", "1000") in tuple(refused.trailing_metadata())
    assert requests_total(server, "503") - before == 1
    assert value(scrape(server.url), "cronnx_admission_rejections_total", model="slow", version=1,
                 reason="queue_full") >= 1


def test_a_call_whose_deadline_passes_while_it_waits_runs_nothing(server):
    before = model_status(server)
    expired_before = requests_total(server, "504")
    rows_before = server.get("/v2/models/slow/stats")[1]["model_stats"][0]["inference_count"]

    async def main(stub):
        # A row twenty times the usual (seconds long) runs first, so that the late call's
        # deadline passes while it waits in the queue on a fast machine and on a busy one alike
        # (with rows of 0.3 s and a deadline of 0.1 s it once found a slot and was dropped there).
        running = await call_held(server, stub, steps=20 * STEPS)
        ready = await call_held(server, stub)
        # Behind a row running and one ready for the worker: waiting in the queue. Its deadline
        # (0.5 s) lets it reach the server first on a busy machine.
        late = await call_held(server, stub, timeout=0.5)
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await late
        return expired.value, [await running, await ready]

    expired, answers = asyncio.run(with_stub(server, main))
    assert expired.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(answers) == 2
    after = asyncio.run(until(server, lambda s: s["in_use"] == 0, "every slot free"))
    assert (after["run"] - before["run"], after["dropped"] - before["dropped"]) == (2, 0)
    assert server.get("/v2/models/slow/stats")[1]["model_stats"][0]["inference_count"] - rows_before == 2
    assert requests_total(server, "504") - expired_before == 1  # the server gave up on it too


def test_a_cancelled_call_gives_its_slot_back_unrun_and_is_counted_as_499(server):
    cancelled_before = requests_total(server, "499")

    async def main(stub):
        taken_before, _ = await taken_at_once(server, stub)
        before = await until(server, lambda s: s["in_use"] == 0, "every slot free")
        running = await call_held(server, stub)
        cancelled = await call_held(server, stub, metadata=[("x-request-id", "cancelled-1")])
        waiting = await asyncio.to_thread(model_status, server)
        cancelled.cancel()
        answer = await running
        after = await until(server, lambda s: s["in_use"] == 0, "every slot free")
        taken_after, _ = await taken_at_once(server, stub)
        return taken_before, before, waiting, cancelled, answer, after, taken_after

    taken_before, before, waiting, cancelled, answer, after, taken_after = asyncio.run(with_stub(server, main))
    assert waiting["in_use"] == 2 and waiting["waiting"] == 0  # its row was in a slot, ready for the worker
    assert cancelled.cancelled() and len(answer.raw_output_contents) == 1
    assert (after["run"] - before["run"], after["dropped"] - before["dropped"]) == (1, 1)
    assert taken_after == taken_before == SLOTS + QUEUE
    wait_until(lambda: requests_total(server, "499") - cancelled_before == 1, timeout_s=10,
               what="the cancelled call counted")
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    (line,) = [line for line in lines if line.get("request_id") == "cancelled-1" and line["logger"] == "cronnx.access"]
    assert (line["api"], line["status"]) == ("grpc", 499)


@pytest.mark.parametrize("front_processes", [1, 2], ids=["one process", "two front processes"])
def test_sigterm_answers_every_call_in_flight_and_leaves_nothing_behind(start_server, slow_model, front_processes):
    server = start_server(server_config(model_entry("slow", slow_model, batch_size=1, ring_slots=16),
                                        request_timeout_s=30, front_processes=front_processes),
                          args=("--grpc-port", "0"))
    pid = server.proc.pid
    children = children_of(pid)

    async def main(stub):
        calls = [stub.ModelInfer(row_request(), timeout=TIMEOUT_S) for _ in range(6)]
        # In flight: every call's row in a slot of the ring, or run already. Six rows run one at a
        # time: most still wait for the worker at the signal. (A call still being read when the
        # drain begins is refused, UNAVAILABLE "server is shutting down", as HTTP's requests are.)
        await until(server, lambda s: s["in_use"] + s["run"] == 6, "every call's row in the ring")
        server.proc.send_signal(signal.SIGTERM)
        return await asyncio.gather(*calls, return_exceptions=True)

    answers = asyncio.run(with_stub(server, main))
    assert [type(a).__name__ for a in answers] == ["ModelInferResponse"] * 6, answers
    assert server.proc.wait(30) == 0
    # The fronts and workers have exited; multiprocessing's resource tracker follows once the last
    # of them has closed its pipe.
    assert children
    wait_until(lambda: not any(pid_alive(child) for child in children), timeout_s=10, what="every child gone")
    assert shm_segments(pid) == [] and shm_lock_files(pid) == []
