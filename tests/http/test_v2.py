"""The Open Inference Protocol (KServe V2) with Triton's own client, unchanged: every answer equals
a direct onnxruntime run and `/predict`'s answer for the same image."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from support.client import GoodStream, predict_many
from support.images import encode, photo_like
from support.metrics import scrape, value
from support.models import tiny_classifier
from support.reference import DirectModel
from support.server import model_entry, server_config

BODY_LIMIT = 512 * 1024
IMAGES = [encode(photo_like(320 + 40 * i, 240, seed=10 + i), "JPEG") for i in range(3)]


@pytest.fixture(scope="module")
def direct(tiny_model):
    return DirectModel(tiny_model)


@pytest.fixture(params=[1, 2], ids=["one process", "two front processes"])
def server(request, start_server, tiny_model):
    """The same server answered by its one process, and by two front processes (which serve infer
    themselves and pass every other route on)."""
    return start_server(server_config(model_entry("tiny", tiny_model, batch_size=8, batch_timeout_ms=30),
                                      max_body_bytes=BODY_LIMIT, front_processes=request.param))


def client(server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"))


def logits(direct: DirectModel, batch: np.ndarray) -> np.ndarray:
    return direct.session.run(None, {direct.spec.input_name: batch})[0]


def test_health_metadata_and_config_as_tritons_client_reads_them(server):
    c = client(server)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("tiny")
    assert c.is_model_ready("tiny", "1") and not c.is_model_ready("tiny", "7")
    meta = c.get_model_metadata("tiny")
    assert meta["name"] == "tiny" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    config = c.get_model_config("tiny")
    assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == [3, 32, 32]
    assert c.get_server_metadata()["extensions"] == ["binary_tensor_data", "classification", "statistics"]
    with pytest.raises(InferenceServerException, match="unknown model"):
        c.get_model_metadata("nosuch")


def test_kserves_own_client_reads_health_and_readiness_and_infers(server, direct, tmp_path):
    """KServe's Python SDK (its REST client, protocol v2; run by kserve_v2_client.py in a process
    of its own): health, model readiness, and infer with JSON and binary tensors and with encoded
    images, each equal to onnxruntime."""
    batch = np.stack([direct.tensor(image) for image in IMAGES])
    np.save(tmp_path / "batch.npy", batch)
    images = []
    for i, image in enumerate(IMAGES):
        images.append(tmp_path / f"{i}.jpg")
        images[-1].write_bytes(image)
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("kserve_v2_client.py")), server.url,
                           str(tmp_path / "batch.npy"), *map(str, images)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["health"] == [True, True, True, False]
    expected = logits(direct, batch)
    assert result["answers"][0]["id"] == "k-1"
    for answer in result["answers"]:
        assert answer["model_name"] == "tiny"
        np.testing.assert_allclose(np.array(answer["output"]), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_a_preprocessed_fp32_batch_of_three_equals_onnxruntime(server, direct, binary_in, binary_out):
    batch = np.stack([direct.tensor(image) for image in IMAGES])
    tensor = triton.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary_in)
    wanted = [triton.InferRequestedOutput("logits", binary_data=binary_out)]
    result = client(server).infer("tiny", [tensor], outputs=wanted, request_id="req-7")
    assert result.get_response()["id"] == "req-7" and result.get_response()["model_version"] == "1"
    np.testing.assert_allclose(result.as_numpy("logits"), logits(direct, batch), rtol=0, atol=1e-5)


def test_encoded_images_as_bytes_are_preprocessed_as_predict_does(server, direct):
    images = np.array(IMAGES, dtype=np.object_)
    tensor = triton.InferInput("IMAGE", [len(IMAGES)], "BYTES")
    tensor.set_data_from_numpy(images, binary_data=True)
    result = client(server).infer("tiny", [tensor], outputs=[
        triton.InferRequestedOutput("logits", binary_data=True),
        triton.InferRequestedOutput("logits", binary_data=False, class_count=3)])
    expected = logits(direct, np.stack([direct.tensor(image) for image in IMAGES]))
    outputs = result.get_response()["outputs"]
    assert [o["datatype"] for o in outputs] == ["FP32", "BYTES"]
    raw = result.as_numpy("logits")  # the first output of that name: the tensor
    np.testing.assert_allclose(raw, expected, rtol=0, atol=1e-5)
    # Classification: "score:index:label", the score being /predict's probability for that class.
    classes = outputs[1]["data"]
    predicted = asyncio.run(predict_many(f"{server.url}/predict/tiny?top_k=3", IMAGES))
    for i, reply in enumerate(predicted):
        row = [entry.split(":") for entry in classes[3 * i:3 * i + 3]]
        assert [int(index) for _, index, _ in row] == [p["class_id"] for p in reply.body["predictions"]]
        assert [label for _, _, label in row] == [p["label"] for p in reply.body["predictions"]]
        for (score, _, _), p in zip(row, reply.body["predictions"]):
            assert abs(float(score) - p["confidence"]) < 1e-6


def test_a_raw_binary_body_is_the_models_input_tensor(server, direct):
    """Header length 0: the body is N rows of the input in the model's datatype; the answer is binary."""
    batch = np.stack([direct.tensor(image) for image in IMAGES[:2]])
    request = urllib.request.Request(f"{server.url}/v2/models/tiny/infer", data=batch.tobytes(), method="POST",
                                     headers={"Content-Type": "application/octet-stream",
                                              "Inference-Header-Content-Length": "0"})
    with urllib.request.urlopen(request, timeout=30) as response:
        length = int(response.headers["Inference-Header-Content-Length"])
        body = response.read()
    header = json.loads(body[:length])
    assert header["outputs"][0]["shape"] == [2, 10]
    out = np.frombuffer(body[length:], np.float32).reshape(2, 10)
    np.testing.assert_allclose(out, logits(direct, batch), rtol=0, atol=1e-5)
    status, error = _post(server, batch.tobytes()[:-4], {"Inference-Header-Content-Length": "0"})
    assert status == 400 and "whole rows" in error["error"]


def test_the_repository_index_lists_versions_and_states(server):
    request = urllib.request.Request(f"{server.url}/v2/repository/index", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read()) == [{"name": "tiny", "version": "1", "state": "READY"}]


def test_v2_rows_are_batched_together(server, direct):
    batch = direct.tensor(IMAGES[0])[None]

    async def main():
        def one():
            tensor = triton.InferInput("input", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            return client(server).infer("tiny", [tensor]).as_numpy("logits")
        return await asyncio.gather(*(asyncio.to_thread(one) for _ in range(12)))

    # Twelve at once usually share batches; on a loaded machine they may arrive one by one (the batch
    # window closes early when nothing else is coming), so up to three rounds.
    for rounds in range(1, 4):
        for out in asyncio.run(main()):
            np.testing.assert_allclose(out, logits(direct, batch), rtol=0, atol=1e-5)
        m = scrape(server.url)
        rows = value(m, "cronnx_batch_size_sum", model="tiny", version=1)
        assert rows == 12 * rounds  # every row ran once
        if value(m, "cronnx_batch_size_count", model="tiny", version=1) < rows:
            break  # some batch held more than one row
    else:
        pytest.fail("36 concurrent rows never shared a batch")
    assert value(m, "cronnx_requests_total", api="v2", model="tiny", version=1, outcome="success") == 12 * rounds


def _post(server, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"{server.url}/v2/models/tiny/infer", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _request(inputs, outputs=None) -> bytes:
    return json.dumps({"inputs": inputs, **({"outputs": outputs} if outputs else {})}).encode()


ROW = [0.0] * (3 * 32 * 32)
MALFORMED = {
    "wrong datatype": (_request([{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP16", "data": ROW}]),
                       None, 400, "the model takes FP32"),
    "wrong shape": (_request([{"name": "input", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": ROW[:768]}]),
                    None, 400, "has shape [1, 3, 16, 16]"),
    "data length not matching": (_request([{"name": "input", "shape": [2, 3, 32, 32], "datatype": "FP32",
                                            "data": ROW}]), None, 400, "holds 6144 values, data has 3072"),
    "binary sizes not adding up": (
        json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                "parameters": {"binary_data_size": 12288}}]}).encode() + b"\0" * 100,
        "header", 400, "binary_data_size 12288"),
    "unknown output name": (_request([{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": ROW}],
                                     [{"name": "probs"}]), None, 400, "unknown output 'probs'"),
    "unknown input name": (_request([{"name": "pixels", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": ROW}]),
                           None, 400, "unknown input 'pixels'"),
    "too many rows": (_request([{"name": "input", "shape": [9, 3, 32, 32], "datatype": "FP32", "data": ROW * 9}]),
                      None, 400, "takes 1 to 8"),
    "not json": (b"{inputs:", None, 400, "not valid JSON"),
    "bad base64 image": (_request([{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": ["***"]}]),
                         None, 400, "not valid base64"),
    "body over the limit": (b"{" + b" " * (BODY_LIMIT + 10) + b"}", None, 413, "larger than the limit"),
    "value beyond float32": (_request([{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                       "data": [1e39, *ROW[1:]]}]), None, 400, "element 0 of data is 1e+39"),
    "null value": (_request([{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                              "data": [*ROW[1:], None]}]), None, 400, "element 3071 of data is None"),
    "rows overflowing int64": (_request([{"name": "input", "shape": [2 ** 56 + 1, 3, 32, 32], "datatype": "FP32",
                                          "data": ROW}]), None, 400, "has 72057594037927937 rows"),
    "parameter of the wrong type": (json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32],
                                                            "datatype": "FP32", "data": ROW}],
                                                "parameters": {"binary_data_output": "false"}}).encode(),
                                    None, 400, "'binary_data_output' must be a boolean"),
    "nesting too deep": (b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": '
                         + b"[" * 50_000 + b"]" * 50_000 + b"}]}", None, 400, "nests its JSON too deeply"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_each_malformed_request_gets_400_with_the_reason_beside_a_good_stream(server, case):
    body, header_mode, status, words = MALFORMED[case]
    headers = {"Inference-Header-Content-Length": str(body.index(b"}]}") + 3)} if header_mode == "header" else None

    async def main():
        good = GoodStream(f"{server.url}/predict/tiny", IMAGES[0])
        stream = asyncio.create_task(good.run())
        answers = [await asyncio.to_thread(_post, server, body, headers) for _ in range(3)]
        await asyncio.sleep(0.1)
        good.stop()
        await stream
        return answers, good

    answers, good = asyncio.run(main())
    for got_status, got in answers:
        assert got_status == status and words in got["error"], (got_status, got)
    assert good.statuses and set(good.statuses) == {200}


def test_v2_and_predict_requests_of_one_model_share_batches(start_server, tmp_path_factory):
    """While a slow batch runs, a /predict request and V2 rows queue up; the next batch holds both."""
    slow = tiny_classifier(tmp_path_factory.mktemp("slow") / "slow.onnx", slow_layers=200, hidden=2048)
    server = start_server(server_config(model_entry("slow", slow, batch_size=8, batch_timeout_ms=30)))
    direct = DirectModel(slow)
    row = direct.tensor(IMAGES[0])[None]

    def v2_row():
        tensor = triton.InferInput("input", list(row.shape), "FP32")
        tensor.set_data_from_numpy(row)
        return triton.InferenceServerClient(server.url.removeprefix("http://")).infer("slow", [tensor])

    async def attempt() -> int:
        blocker = asyncio.create_task(asyncio.to_thread(v2_row))
        await asyncio.sleep(0.02)  # the blocker's batch is running
        rows = [asyncio.create_task(asyncio.to_thread(v2_row)) for _ in range(3)]
        (reply,) = await predict_many(f"{server.url}/predict/slow", [IMAGES[1]])
        await asyncio.gather(blocker, *rows)
        assert reply.status == 200
        return reply.body["batch_size"]

    sizes = [asyncio.run(attempt()) for _ in range(3)]
    assert max(sizes) > 1, sizes  # a /predict request ran in one batch with V2 rows
