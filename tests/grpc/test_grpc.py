"""Triton's own gRPC clients (tritonclient.grpc and tritonclient.grpc.aio, unchanged) against a live
server, in both placements (one process; two front processes sharing the port): health, readiness,
metadata, configuration and the repository index say what HTTP says; ModelInfer answers a
preprocessed FP32 batch as onnxruntime does and encoded photos as /predict does, its classification
strings are HTTP V2's; the request id and the request's `id` come back; the access log names the
API; the per-API request counts and the statistics on both protocols count exactly what was sent."""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
import tritonclient.http as triton_http
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2

from support.client import predict_many
from support.metrics import scrape, value
from support.reference import DirectModel
from support.server import ServerProcess, model_entry, server_config, wait_until

CLIENT_TIMEOUT_S = 30.0
# The model only the counting test sends to: its counts are those requests, whatever else ran.
COUNTED = "counted"


@pytest.fixture(scope="module")
def direct(tiny_model):
    return DirectModel(tiny_model)


@pytest.fixture(scope="module", params=[1, 2], ids=["one process", "two front processes"])
def server(request, tmp_path_factory, tiny_model):
    """One server per placement for the module, serving gRPC on a free port (config grpc_port: 0)."""
    config = server_config(model_entry("tiny", tiny_model, batch_size=8), model_entry(COUNTED, tiny_model),
                           grpc_port=0, front_processes=request.param)
    with ServerProcess.running(tmp_path_factory.mktemp("grpc-server"), config) as server:
        yield server


def client(server) -> triton_grpc.InferenceServerClient:
    return triton_grpc.InferenceServerClient(server.grpc_address)


def fp32_input(batch: np.ndarray, client_module=triton_grpc):
    tensor = client_module.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)  # tritonclient sends it in raw_input_contents
    return tensor


def photo_input(images: list[bytes], client_module=triton_grpc):
    tensor = client_module.InferInput("IMAGE", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def logits(direct: DirectModel, batch: np.ndarray) -> np.ndarray:
    return direct.session.run(None, {direct.spec.input_name: batch})[0]


def softmax(scores: np.ndarray) -> np.ndarray:
    exp = np.exp(scores.astype(np.float64) - scores.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def read_photos(photos, count: int = 3) -> list[bytes]:
    """JPEGs of different sizes and the PNG."""
    return [path.read_bytes() for path in [*photos[:count - 1], photos[-1]]]


def test_health_and_readiness_as_tritons_client_reads_them(server):
    with client(server) as c:
        assert c.is_server_live() and c.is_server_ready()
        assert c.is_model_ready("tiny") and c.is_model_ready("tiny", "1")
        assert not c.is_model_ready("tiny", "7")
        assert not c.is_model_ready("nosuch")  # an unknown model is not ready (no error), as Triton says


def test_metadata_config_and_repository_index_say_what_http_says(server):
    with client(server) as c:
        meta = c.get_server_metadata()
        assert (meta.name, list(meta.extensions)) == ("cronnx", ["binary_tensor_data", "classification",
                                                                 "statistics"])
        assert json_format.MessageToDict(meta) == server.get("/v2")[1]

        model = c.get_model_metadata("tiny")
        assert (model.name, list(model.versions), model.platform) == ("tiny", ["1"], "onnxruntime_onnx")
        assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("input", "FP32", [-1, 3, 32, 32])]
        assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [("logits", "FP32", [-1, 10])]
        assert model == json_format.ParseDict(server.get("/v2/models/tiny")[1], service_pb2.ModelMetadataResponse())
        assert c.get_model_metadata("tiny", "1") == model

        config = c.get_model_config("tiny").config
        assert config.max_batch_size == 8 and list(config.input[0].dims) == [3, 32, 32]
        assert config.input[0].data_type == model_config_pb2.TYPE_FP32
        assert config == json_format.ParseDict(server.get("/v2/models/tiny/config")[1], model_config_pb2.ModelConfig())

        index = c.get_model_repository_index()
        assert sorted((m.name, m.version, m.state) for m in index.models) == [(COUNTED, "1", "READY"),
                                                                              ("tiny", "1", "READY")]


def test_an_fp32_batch_in_raw_input_contents_equals_onnxruntime(server, direct, photos):
    batch = np.stack([direct.tensor(image) for image in read_photos(photos)])
    with client(server) as c:
        result = c.infer("tiny", [fp32_input(batch)], request_id="fp32-batch", client_timeout=CLIENT_TIMEOUT_S)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("tiny", "1", "fp32-batch")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("logits", "FP32", [3, 10])]
    np.testing.assert_allclose(result.as_numpy("logits"), logits(direct, batch), rtol=0, atol=1e-5)


def test_encoded_photos_as_bytes_get_predicts_probabilities(server, direct, photos):
    """Each element of the BYTES tensor is one encoded image, preprocessed as /predict does: the
    softmax of each row equals /predict's probabilities for that photo and onnxruntime's for the
    tensor Cronnx's preprocessing makes of it."""
    images = read_photos(photos)
    with client(server) as c:
        result = c.infer("tiny", [photo_input(images)], client_timeout=CLIENT_TIMEOUT_S)
    probabilities = softmax(result.as_numpy("logits"))
    assert probabilities.shape == (len(images), 10)
    replies = asyncio.run(predict_many(f"{server.url}/predict/tiny?top_k=10", images))
    for image, row, reply in zip(images, probabilities, replies, strict=True):
        assert reply.status == 200, reply
        predicted = {p["class_id"]: p["confidence"] for p in reply.body["predictions"]}
        np.testing.assert_allclose(row, [predicted[i] for i in range(10)], rtol=0, atol=1e-5)
        np.testing.assert_allclose(row, direct.probabilities(image), rtol=0, atol=1e-5)
    assert len({int(np.argmax(row)) for row in probabilities}) > 1  # the photos are told apart


def test_classification_strings_equal_the_http_v2_extensions(server, photos):
    images = read_photos(photos)
    with client(server) as c:
        over_grpc = c.infer("tiny", [photo_input(images)], outputs=[triton_grpc.InferRequestedOutput(
            "logits", class_count=3)], client_timeout=CLIENT_TIMEOUT_S).as_numpy("logits")
    http = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        tensor = triton_http.InferInput("IMAGE", [len(images)], "BYTES")
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
        over_http = http.infer("tiny", [tensor], outputs=[triton_http.InferRequestedOutput(
            "logits", binary_data=False, class_count=3)]).as_numpy("logits")
    finally:
        http.close()
    assert over_grpc.shape == (len(images), 3)
    strings = [s.decode() for s in over_grpc.ravel()]
    assert all(re.fullmatch(r"[\d.e-]+:\d:\w+", s) for s in strings), strings  # "score:index:label"
    assert strings == [s.decode() if isinstance(s, bytes) else s for s in over_http.ravel()]


def test_the_asyncio_client_reads_and_infers_the_same(server, direct, photos):
    batch = np.stack([direct.tensor(image) for image in read_photos(photos, 2)])

    async def main():
        async with triton_aio.InferenceServerClient(server.grpc_address) as c:
            health = (await c.is_server_live(), await c.is_server_ready(), await c.is_model_ready("tiny"),
                      await c.is_model_ready("nosuch"))
            meta = await c.get_model_metadata("tiny")
            config = (await c.get_model_config("tiny")).config
            tensor = await c.infer("tiny", [fp32_input(batch, triton_aio)], request_id="aio-1",
                                   client_timeout=CLIENT_TIMEOUT_S)
            images = await c.infer("tiny", [photo_input(read_photos(photos, 2), triton_aio)],
                                   client_timeout=CLIENT_TIMEOUT_S)
            return health, meta, config, tensor, images

    health, meta, config, tensor, images = asyncio.run(main())
    assert health == (True, True, True, False)
    assert meta.name == "tiny" and list(meta.inputs[0].shape) == [-1, 3, 32, 32]
    assert config.max_batch_size == 8
    assert tensor.get_response().id == "aio-1"
    np.testing.assert_allclose(tensor.as_numpy("logits"), logits(direct, batch), rtol=0, atol=1e-5)
    np.testing.assert_allclose(images.as_numpy("logits"), logits(direct, batch), rtol=0, atol=1e-5)


def _infer_request(direct: DirectModel, image: bytes, **fields) -> service_pb2.ModelInferRequest:
    row = direct.tensor(image)[None]
    request = service_pb2.ModelInferRequest(model_name="tiny", **fields)
    request.inputs.add(name="input", datatype="FP32", shape=list(row.shape))
    request.raw_input_contents.append(row.tobytes())
    return request


def _access_lines(server: ServerProcess) -> dict[str, dict]:
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    return {line["request_id"]: line for line in lines if line["logger"] == "cronnx.access"}


def test_the_request_id_comes_back_in_trailing_metadata_and_names_the_access_log_line(server, stub, direct, photos):
    image = photos[0].read_bytes()
    response, call = stub.ModelInfer.with_call(_infer_request(direct, image, id="body-id"),
                                               metadata=[("x-request-id", "grpc-call-1")], timeout=CLIENT_TIMEOUT_S)
    assert response.id == "body-id"  # the request's id, echoed in the response
    assert ("x-request-id", "grpc-call-1") in [(m.key, m.value) for m in call.trailing_metadata()]

    # An error carries it too; an id that is not 1 to 128 printable characters is replaced by a new one.
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(service_pb2.ModelInferRequest(model_name="nosuch"), metadata=[("x-request-id", "grpc-call-2")],
                        timeout=CLIENT_TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert ("x-request-id", "grpc-call-2") in [(m.key, m.value) for m in refused.value.trailing_metadata()]
    _, call = stub.ModelInfer.with_call(_infer_request(direct, image), metadata=[("x-request-id", "has space")],
                                        timeout=CLIENT_TIMEOUT_S)
    (fresh,) = [m.value for m in call.trailing_metadata() if m.key == "x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", fresh), fresh

    # JSON logs: one access line per call, naming the API. A front process writes its own lines.
    wait_until(lambda: {"grpc-call-1", "grpc-call-2", fresh} <= _access_lines(server).keys(), timeout_s=10,
               what="the access-log lines")
    lines = _access_lines(server)
    assert {k: lines["grpc-call-1"][k] for k in ("api", "model", "version", "status", "batch_size")} == {
        "api": "grpc", "model": "tiny", "version": "1", "status": 200, "batch_size": 1}
    assert {k: lines["grpc-call-2"][k] for k in ("api", "status")} == {"api": "grpc", "status": 404}
    assert "unknown model 'nosuch'" in lines["grpc-call-2"]["error"]
    assert lines[fresh]["api"] == "grpc" and lines[fresh]["status"] == 200


PREDICTS, V2_REQUESTS, V2_ROWS, GRPC_REQUESTS, GRPC_ROWS, GRPC_BAD = 3, 2, 2, 4, 3, 2


def test_per_api_counts_and_both_protocols_statistics_are_exactly_the_requests_sent(server, stub, direct, photos):
    """A mix of /predict, HTTP V2 and gRPC calls to the one model nothing else sends to: each API's
    request count in /metrics, and the statistics read over HTTP and over gRPC (the same numbers),
    count exactly those requests and rows."""
    image = photos[0].read_bytes()
    row = direct.tensor(image)
    v2_body = json.dumps({"inputs": [{"name": "input", "shape": [V2_ROWS, *row.shape], "datatype": "FP32",
                                      "data": np.stack([row] * V2_ROWS).ravel().tolist()}]}).encode()
    replies = asyncio.run(predict_many(f"{server.url}/predict/{COUNTED}", [image] * PREDICTS))
    replies += asyncio.run(predict_many(f"{server.url}/v2/models/{COUNTED}/infer", [v2_body] * V2_REQUESTS,
                                        content_type="application/json"))
    assert [r.status for r in replies] == [200] * (PREDICTS + V2_REQUESTS), replies
    with client(server) as c:
        for _ in range(GRPC_REQUESTS):
            c.infer(COUNTED, [fp32_input(np.stack([row] * GRPC_ROWS))], client_timeout=CLIENT_TIMEOUT_S)
    for _ in range(GRPC_BAD):
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(service_pb2.ModelInferRequest(model_name=COUNTED, inputs=[
                service_pb2.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 3, 16, 16])],
                raw_input_contents=[bytes(3 * 16 * 16 * 4)]), timeout=CLIENT_TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def requests() -> dict[tuple[str, str], float]:
        samples = scrape(server.url)
        return {(api, outcome): value(samples, "cronnx_requests_total", api=api, model=COUNTED, version=1,
                                      outcome=outcome)
                for api in ("predict", "v2", "grpc") for outcome in ("success", "400")}

    expected = {("predict", "success"): PREDICTS, ("v2", "success"): V2_REQUESTS, ("grpc", "success"): GRPC_REQUESTS,
                ("predict", "400"): 0, ("v2", "400"): 0, ("grpc", "400"): GRPC_BAD}
    # A front process reports each request after answering it.
    wait_until(lambda: requests() == expected, timeout_s=10, what=f"the request counts {expected}")

    def http_statistics() -> dict:
        status, body = server.get(f"/v2/models/{COUNTED}/stats")
        assert status == 200, body
        return body

    wait_until(lambda: http_statistics()["model_stats"][0]["inference_stats"]["fail"]["count"] == GRPC_BAD,
               timeout_s=10, what="the failures in the statistics")
    over_http = http_statistics()
    with client(server) as c:
        over_grpc = c.get_inference_statistics(COUNTED)
    (entry,) = over_http["model_stats"]
    assert entry["inference_stats"]["success"]["count"] == PREDICTS + V2_REQUESTS + GRPC_REQUESTS
    assert entry["inference_stats"]["fail"]["count"] == GRPC_BAD
    assert entry["inference_count"] == PREDICTS + V2_REQUESTS * V2_ROWS + GRPC_REQUESTS * GRPC_ROWS
    (stats,) = over_grpc.model_stats
    assert (stats.inference_stats.success.count, stats.inference_stats.fail.count, stats.inference_count) == (
        PREDICTS + V2_REQUESTS + GRPC_REQUESTS, GRPC_BAD, PREDICTS + V2_REQUESTS * V2_ROWS + GRPC_REQUESTS * GRPC_ROWS)
    assert over_grpc == json_format.ParseDict(over_http, service_pb2.ModelStatisticsResponse())
