"""Models that misbehave: their requests get a clear error, /ready and /models say why, and the
models beside them keep serving."""

from __future__ import annotations

import asyncio
import math
import os
import re
import resource
import signal

import aiohttp
import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from bench.processes import children_of
from support.client import TIMEOUT, predict_many
from support.images import encode, photo_like
from support.metrics import scrape, value
from support.models import batch_one_only_model, channel_mean_model, tiny_classifier
from support.reference import DirectModel, assert_matches
from support.server import model_entry, server_config, wait_until

IMAGE = encode(photo_like(320, 240, seed=5), "JPEG")


def overflowing_model(path) -> str:
    """Scores divided by zero: +inf, -inf, and NaN where the score is exactly 0 (the first class's
    weights are zero), as an fp16 model that overflows gives."""
    w = np.ones((3, 10), np.float32)
    w[:, 0] = 0.0
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros((1,), np.float32), "zero")]
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "w"], ["scores"]),
             helper.make_node("Div", ["scores", "zero"], ["logits"])]
    graph = helper.make_graph(nodes, "overflow",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("good") / "good.onnx")


def test_non_finite_scores_get_500_with_the_reason_and_are_counted_as_errors(start_server, tmp_path, good_model):
    server = start_server(server_config(model_entry("overflow", overflowing_model(tmp_path / "overflow.onnx")),
                                        model_entry("good", good_model)))
    bad = asyncio.run(predict_many(f"{server.url}/predict/overflow", [IMAGE] * 5))
    good = asyncio.run(predict_many(f"{server.url}/predict/good", [IMAGE] * 5))
    assert [r.status for r in bad] == [500] * 5
    assert all("non-finite scores (1 NaN, 9 infinite of 10)" in r.body["error"] for r in bad), bad[0].body
    assert [r.status for r in good] == [200] * 5
    m = scrape(server.url)
    assert value(m, "cronnx_requests_total", api="predict", model="overflow", version=1, outcome="500") == 5
    assert value(m, "cronnx_requests_total", api="predict", model="overflow", version=1, outcome="success") == 0


def test_ready_states_the_failure_when_the_only_model_cannot_load(start_server, tmp_path):
    model = batch_one_only_model(tmp_path / "batch1.onnx")
    server = start_server(server_config(model_entry("b1", model, batch_size=4)), wait_ready=False)
    wait_until(lambda: server.get("/ready")[1]["status"] != "loading", what="the first load to end")
    status, body = server.get("/ready")
    assert status == 503 and body["status"] == "failed", body
    assert "invalid dimensions for output" in body["failed"]["b1 v1"], body


def test_rings_larger_than_dev_shm_fail_their_model_with_the_reason_and_the_others_serve(start_server, tmp_path,
                                                                                        good_model):
    """Reserved when made (cronnx/ipc/ring.py): a ring /dev/shm cannot hold fails its model's load
    with the sizes and the fix, instead of a SIGBUS under load."""
    stat = os.statvfs("/dev/shm")
    slots = 4096  # the most a ring may have: its input is made large enough not to fit
    size = math.isqrt(stat.f_bavail * stat.f_frsize // (slots * 3 * 4)) + 1
    huge = channel_mean_model(tmp_path / "huge.onnx", size=size)
    server = start_server(server_config(model_entry("good", good_model),
                                        model_entry("huge", huge, ring_slots=slots, top_k=3)))
    (huge,) = [v for v in server.versions() if v["name"] == "huge"]
    assert huge["state"] == "failed" and "no room in /dev/shm" in huge["reason"], huge
    status, body = server.get("/ready")
    assert status == 200 and "--shm-size" in body["failed"]["huge v1"], body
    assert [r.status for r in asyncio.run(predict_many(f"{server.url}/predict/good", [IMAGE] * 3))] == [200] * 3
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"cronnx_{server.proc.pid}_huge")]


def test_a_failed_model_removed_from_the_config_is_forgotten_on_reload(start_server, tmp_path, good_model):
    broken = batch_one_only_model(tmp_path / "batch1.onnx")
    config = server_config(model_entry("good", good_model), model_entry("b1", broken, batch_size=4))
    server = start_server(config)
    # The failed load's workers may still be stopping ("draining") as the server turns ready.
    wait_until(lambda: all(v["state"] != "draining" for v in server.versions()), what="the failed load to stop")
    assert [v["state"] for v in server.versions() if v["name"] == "b1"] == ["failed"]
    status, body = server.get("/ready")
    assert status == 200 and body["status"] == "ready" and "b1 v1" in body["failed"], body

    config["models"] = config["models"][:1]
    server.config_path.write_text(yaml.safe_dump(config))
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: not any(v["name"] == "b1" for v in server.versions()), what="the failure to be forgotten")
    status, body = server.get("/ready")
    assert status == 200 and "failed" not in body, body
    assert [r.status for r in asyncio.run(predict_many(f"{server.url}/predict/good", [IMAGE] * 3))] == [200] * 3


def test_the_port_answers_503_loading_while_the_demo_model_is_built(start_server, tmp_path):
    """The first start builds the demo model (about 15 s): the port is open meanwhile, and the
    model is known: its routes answer 503 "loading" with Retry-After, not 404."""
    demo = tmp_path / "demo.onnx"
    server = start_server(server_config(model_entry("demo", demo, demo=True)), wait_ready=False)
    status, body = server.get("/ready")
    assert status == 503 and body["status"] == "loading", body

    async def while_building():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            answers = {}
            for method, path, data in [("POST", "/predict/demo", IMAGE), ("POST", "/predict/demo/versions/1", IMAGE),
                                       ("POST", "/v2/models/demo/infer", b'{"inputs": []}'),
                                       ("GET", "/v2/models/demo", None), ("GET", "/v2/models/demo/ready", None),
                                       ("POST", "/predict/other", IMAGE)]:
                async with session.request(method, server.url + path, data=data) as r:
                    answers[path] = (r.status, await r.json(), r.headers.get("Retry-After"))
            async with session.post(f"{server.url}/v2/repository/index", data=b"{}") as r:
                index = await r.json()
            async with session.get(f"{server.url}/models") as r:
                models = (await r.json())["models"]
            return answers, index, models

    answers, index, models = asyncio.run(while_building())
    assert not demo.is_file(), "the demo model was built before the test looked: nothing was checked"
    for path in ("/predict/demo", "/predict/demo/versions/1", "/v2/models/demo/infer", "/v2/models/demo"):
        status, body, retry = answers[path]
        assert status == 503 and "loading" in body["error"] and retry, (path, answers[path])
    assert answers["/v2/models/demo/ready"][:2] == (503, {"name": "demo", "ready": False})
    assert answers["/predict/other"][0] == 404  # a model that is not configured is still unknown
    assert index == [{"name": "demo", "version": "1", "state": "LOADING"}]
    assert models == [{"name": "demo", "version": 1, "state": "loading"}]
    # A reload that fails (an unreadable config) decides nothing: the first load still finishes.
    good = server.config_path.read_text()
    server.config_path.write_text("models: [\n")
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in server.log(), timeout_s=10, what="the reload to fail")
    server.config_path.write_text(good)
    server.wait_ready()
    assert demo.is_file()
    assert [r.status for r in asyncio.run(predict_many(f"{server.url}/predict/demo", [IMAGE]))] == [200]


def misdeclared_model(path) -> str:
    """Computes [N, 10, 1, 1] (a 1x1 convolution of pooled features) but declares [N, 10], as
    exporters leave it: onnxruntime runs it (warning about the merge)."""
    w = np.random.default_rng(3).normal(0, 2, (10, 3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Conv", ["pooled", "w"], ["logits"])]
    return _save_declaring(path, nodes, w, ["batch", 10])


def reshaped_model(path) -> str:
    """Computes [N, 10] but declares [N, 5], its output a Reshape to a shape computed at run time
    (which shape inference cannot see through): a plain onnxruntime run warns, an IO-bound run
    with a buffer of the computed shape fails ("Got invalid dimensions for output")."""
    w = np.random.default_rng(4).normal(0, 2, (3, 10)).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "w"], ["scores"]),
             helper.make_node("Shape", ["scores"], ["shape"]),
             helper.make_node("Reshape", ["scores", "shape"], ["logits"])]
    return _save_declaring(path, nodes, w, ["batch", 5])


def _save_declaring(path, nodes: list, w: np.ndarray, declared: list) -> str:
    """The graph of `nodes` (input [batch, 3, 32, 32], weight `w`, output "logits" declared
    `declared`) saved at `path`."""
    graph = helper.make_graph(nodes, "declared",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, declared)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


@pytest.mark.parametrize("build, computed", [(misdeclared_model, ["batch", 10, 1, 1]), (reshaped_model, ["batch", 10])],
                         ids=["shape-inference-corrects-it", "reshaped-at-run-time"])
def test_a_model_whose_declared_output_shape_differs_from_what_it_computes_is_served(start_server, tmp_path, build,
                                                                                     computed):
    model = build(tmp_path / "misdeclared.onnx")
    server = start_server(server_config(model_entry("mis", model, batch_size=4, batch_timeout_ms=20)))
    images = [encode(photo_like(320, 240, seed=s), "JPEG") for s in range(6)]
    replies = asyncio.run(predict_many(f"{server.url}/predict/mis", images))
    direct = DirectModel(model)
    for image, reply in zip(images, replies):
        assert reply.status == 200, reply.body
        assert_matches(reply.body, direct.probabilities(image))
    assert server.models()["mis"]["output_shape"] == computed


def test_a_version_whose_rings_or_workers_cannot_be_made_fails_alone_and_leaves_nothing(start_server, tmp_path,
                                                                                       good_model):
    """The server process runs out of file descriptors while a reload loads a second model: at
    each limit tried, from one more descriptor than it holds upward, that model fails with the
    reason (its ring segments, or its workers' pipes, cannot be made) and nothing of it stays
    behind (no version left "loading", no descriptor, process or segment); the first model serves
    throughout; once a reload can make everything, it loads."""
    config = server_config(model_entry("good", good_model))
    server = start_server(config)
    pid = server.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    config["models"].append(model_entry("late", tiny_classifier(tmp_path / "late.onnx"), workers=2))
    server.config_path.write_text(yaml.safe_dump(config))
    children = sorted(children_of(pid))
    reasons = []
    ended = re.compile(r"model late version 1 (not loaded|failed to load|is serving)|reload failed")
    for spare in range(1, 60):
        held = len(os.listdir(f"/proc/{pid}/fd"))
        before = len(ended.findall(server.log()))
        # Nothing may connect meanwhile (a connection takes a descriptor): the log says when it ends.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (_limit_leaving(pid, spare), hard))
        try:
            server.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: len(ended.findall(server.log())) > before, what="the reload to end")
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        # A failed load's workers may still be stopping ("draining") beside its failure.
        wait_until(lambda: len([v for v in server.versions() if v["name"] == "late"]) == 1,
                   what="one state of the late model")
        (late,) = [v for v in server.versions() if v["name"] == "late"]
        assert [r.status for r in asyncio.run(predict_many(f"{server.url}/predict/good", [IMAGE] * 2))] == [200] * 2
        if late["state"] == "ready":
            break
        assert late["state"] == "failed", late  # not "loading" for ever
        reasons.append(late["reason"])
        # What it made is gone: its workers, its descriptors and its ring segments.
        wait_until(lambda: sorted(children_of(pid)) == children, what="its workers to stop")
        wait_until(lambda: len(os.listdir(f"/proc/{pid}/fd")) <= held, what="its descriptors to close")
        assert not [n for n in os.listdir("/dev/shm") if "_late_v1_" in n and n.startswith(f"cronnx_{pid}_")]
    else:
        raise AssertionError(f"never loaded: {reasons}")
    # (A worker started under the limit keeps it: one may fail to load for want of descriptors.)
    assert all("Too many open files" in r or r.startswith("worker late:v1") for r in reasons), reasons
    # Both kinds were met on the way.
    assert any(r.startswith("its rings could not be made") for r in reasons), reasons
    assert any(r.startswith("its workers could not be started") for r in reasons), reasons
    (reply,) = asyncio.run(predict_many(f"{server.url}/predict/late", [IMAGE]))
    assert reply.status == 200
    assert_matches(reply.body, DirectModel(tmp_path / "late.onnx").probabilities(IMAGE))


def _limit_leaving(pid: int, spare: int) -> int:
    """The RLIMIT_NOFILE under which process `pid` can open exactly `spare` more descriptors:
    the limit bounds descriptor numbers, and new ones take the lowest free numbers (the holes
    below its highest open one first)."""
    taken = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    limit, free = 0, 0
    while free < spare:
        free += limit not in taken
        limit += 1
    return limit


@pytest.mark.parametrize("kind", ["worker", "preprocessing process"])
def test_a_child_that_cannot_be_replaced_for_want_of_descriptors_is_tried_again(start_server, good_model, kind):
    """A worker or a preprocessing process dies while the server process can open no descriptor:
    its replacement cannot be started (logged with the reason) and is tried again after a pause
    until it starts, instead of never; then the model answers as before."""
    placement = {"preprocess_processes": 1} if kind != "worker" else {}
    server = start_server(server_config(model_entry("good", good_model), **placement))
    pid = server.proc.pid

    def children() -> list[int]:
        models = server.get("/models")[1]
        return server.worker_pids("good") if kind == "worker" else models["preprocessing"]["pids"]

    (child,) = children()
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    # Descriptors 0 to 2 only: nothing new can be opened (and nothing may connect meanwhile).
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, hard))
    try:
        os.kill(child, signal.SIGKILL)
        wait_until(lambda: len(re.findall(f"{kind} [^ ]+ could not be started .*Too many open files.*trying again",
                                          server.log())) >= 2, what="two failed starts")
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    wait_until(lambda: len(children()) == 1 and children() != [child], what="the replacement")
    if kind == "worker":
        wait_until(lambda: all(w["live"] for w in server.models()["good"]["workers"]), what="a live worker")
    replies = asyncio.run(predict_many(f"{server.url}/predict/good", [IMAGE] * 3))
    expected = DirectModel(good_model).probabilities(IMAGE)
    for reply in replies:
        assert reply.status == 200
        assert_matches(reply.body, expected)
