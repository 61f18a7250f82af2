"""ModelInfer's messages through the generated stub: typed `contents` (fp32, bytes, uint for a UINT8
model) run as raw_input_contents do, and every refusal has its gRPC code and HTTP V2's message
(grpc/status.py maps the one status table): an unknown model or version, a wrong shape, datatype
or size, a batch over max_batch_size, contents both or neither or in the wrong field, a value its
datatype cannot hold, a message over server.max_body_bytes; methods Cronnx does not serve answer
UNIMPLEMENTED, saying which it does. A refused request runs nothing."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from support.metrics import scrape, value
from support.models import image_classifier, tiny_classifier
from support.reference import DirectModel
from support.server import ServerProcess, model_entry, server_config

MAX_BATCH = 4
MAX_BODY = 1024 * 1024
TIMEOUT_S = 30.0
ROW_BYTES = 3 * 32 * 32 * 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpc-error-models")
    return {"tiny": tiny_classifier(folder / "tiny.onnx"),
            "pixels": image_classifier(folder / "pixels.onnx", dtype="uint8")}


@pytest.fixture(scope="module")
def server(tmp_path_factory, models):
    config = server_config(model_entry("tiny", models["tiny"], batch_size=MAX_BATCH),
                           model_entry("pixels", models["pixels"]), grpc_port=0, max_body_bytes=MAX_BODY)
    with ServerProcess.running(tmp_path_factory.mktemp("grpc-errors"), config) as server:
        yield server


def infer_request(model: str = "tiny", name: str = "input", datatype: str = "FP32", shape=(1, 3, 32, 32),
                  raw: list[bytes] | None = None, contents: dict | None = None,
                  **fields) -> service_pb2.ModelInferRequest:
    """A request of one input: its data in raw_input_contents, typed contents, both or neither."""
    request = service_pb2.ModelInferRequest(model_name=model, **fields)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if contents is not None:
        tensor.contents.CopyFrom(service_pb2.InferTensorContents(**contents))
    request.raw_input_contents.extend(raw or [])
    return request


def logits(model_path, batch: np.ndarray) -> np.ndarray:
    direct = DirectModel(model_path)
    return direct.session.run(None, {direct.spec.input_name: batch})[0]


def output(response: service_pb2.ModelInferResponse, name: str = "logits") -> np.ndarray:
    (tensor,) = response.outputs
    assert (tensor.name, tensor.datatype) == (name, "FP32")
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(list(tensor.shape))


# Typed contents.

def test_fp32_contents_run_as_raw_input_contents_do(stub, models):
    batch = np.random.default_rng(1).normal(0, 1, (2, 3, 32, 32)).astype(np.float32)
    typed = stub.ModelInfer(infer_request(shape=batch.shape, contents={"fp32_contents": batch.ravel().tolist()}),
                            timeout=TIMEOUT_S)
    raw = stub.ModelInfer(infer_request(shape=batch.shape, raw=[batch.tobytes()]), timeout=TIMEOUT_S)
    np.testing.assert_allclose(output(typed), logits(models["tiny"], batch), rtol=0, atol=1e-5)
    assert output(typed).tobytes() == output(raw).tobytes()


def test_bytes_contents_hold_one_encoded_image_each(stub, models, photos):
    images = [photos[0].read_bytes(), photos[-1].read_bytes()]
    response = stub.ModelInfer(infer_request(name="IMAGE", datatype="BYTES", shape=[2],
                                             contents={"bytes_contents": images}), timeout=TIMEOUT_S)
    direct = DirectModel(models["tiny"])
    np.testing.assert_allclose(output(response), logits(models["tiny"], np.stack([direct.tensor(i) for i in images])),
                               rtol=0, atol=1e-5)


def test_uint_contents_feed_a_uint8_model(stub, models):
    pixels = np.random.default_rng(2).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    response = stub.ModelInfer(infer_request("pixels", datatype="UINT8", shape=pixels.shape,
                                             contents={"uint_contents": pixels.ravel().tolist()}), timeout=TIMEOUT_S)
    np.testing.assert_allclose(output(response, "scores"), logits(models["pixels"], pixels), rtol=0, atol=1e-5)


# Refusals: (request, code, words of the message).

ROW = bytes(ROW_BYTES)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
REFUSALS = {
    "unknown model": (lambda: infer_request("nosuch", raw=[ROW]), grpc.StatusCode.NOT_FOUND,
                      "unknown model 'nosuch'"),
    "unknown version": (lambda: infer_request(raw=[ROW], model_version="7"), grpc.StatusCode.NOT_FOUND,
                        "version 7 of model 'tiny' is not served"),
    "version that is not a number": (lambda: infer_request(raw=[ROW], model_version="latest"),
                                     grpc.StatusCode.NOT_FOUND, "of model 'tiny' is not served"),
    "wrong shape": (lambda: infer_request(shape=[1, 3, 16, 16], raw=[bytes(3 * 16 * 16 * 4)]), INVALID,
                    "has shape [1, 3, 16, 16]; the model takes [N, 3, 32, 32]"),
    "wrong datatype": (lambda: infer_request(datatype="FP16", raw=[bytes(ROW_BYTES // 2)]), INVALID,
                       "input 'input' is FP16; the model takes FP32"),
    "raw size not matching the shape": (lambda: infer_request(raw=[ROW[:-4]]), INVALID,
                                        "needs 12288 bytes"),
    "typed count not matching the shape": (lambda: infer_request(contents={"fp32_contents": [0.0] * 100}), INVALID,
                                           "shape [1, 3, 32, 32] holds 3072 values, contents.fp32_contents has 100"),
    "a batch over max_batch_size": (lambda: infer_request(shape=[MAX_BATCH + 1, 3, 32, 32],
                                                          raw=[ROW * (MAX_BATCH + 1)]), INVALID,
                                    (f"has 5 rows (shape [5, 3, 32, 32]); model 'tiny' takes 1 to {MAX_BATCH} "
                                     "(max_batch_size)")),
    "a value that is not finite": (lambda: infer_request(raw=[np.full((1, 3, 32, 32), np.nan, np.float32).tobytes()]),
                                   INVALID, "element 0 of the binary data is nan"),
    "both raw and contents": (lambda: infer_request(raw=[ROW], contents={"fp32_contents": [0.0] * 3072}), INVALID,
                              "input 'input' has both contents and raw_input_contents"),
    "neither raw nor contents": (lambda: infer_request(), INVALID,
                                 "input 'input' has neither contents nor raw_input_contents"),
    "contents in the wrong field": (lambda: infer_request(contents={"int_contents": [0] * 3072}), INVALID,
                                    "input 'input' is FP32: its values go in contents.fp32_contents, not int_contents"),
    "a UINT8 value over 255": (lambda: infer_request("pixels", datatype="UINT8", contents={
        "uint_contents": [0] * 5 + [256] + [0] * 3066}), INVALID,
        "element 5 of contents.uint_contents is 256; UINT8 holds integers from 0 to 255"),
    "FP16 as typed contents": (lambda: infer_request(datatype="FP16", contents={"fp32_contents": [0.0] * 3072}),
                               INVALID, "FP16, which has no typed contents"),
    "raw_input_contents for more inputs than sent": (lambda: infer_request(raw=[ROW, ROW]), INVALID,
                                                     "raw_input_contents holds 2 tensors for 1 inputs"),
    "two inputs": (lambda: _two_inputs(), INVALID, "the request has 2 inputs; model 'tiny' takes one"),
    "an unknown output": (lambda: _with_output("probs"), INVALID, "unknown output 'probs'"),
    "a sequence": (lambda: _with_parameter("sequence_id", service_pb2.InferParameter(int64_param=3)), INVALID,
                   "not stateful sequences"),
    "a parameter of the wrong type": (lambda: _with_parameter("priority", service_pb2.InferParameter(
        string_param="high")), INVALID, "'priority' must be an integer"),
}


def _two_inputs() -> service_pb2.ModelInferRequest:
    request = infer_request(raw=[ROW, ROW])
    request.inputs.add(name="other", datatype="FP32", shape=[1, 3, 32, 32])
    return request


def _with_output(name: str) -> service_pb2.ModelInferRequest:
    request = infer_request(raw=[ROW])
    request.outputs.add(name=name)
    return request


def _with_parameter(key: str, parameter: service_pb2.InferParameter) -> service_pb2.ModelInferRequest:
    request = infer_request(raw=[ROW])
    request.parameters[key].CopyFrom(parameter)
    return request


def _rows_run(server) -> int:
    return sum(entry["inference_count"] for entry in server.get("/v2/models/stats")[1]["model_stats"])


@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_refusal_has_its_code_and_https_message_and_runs_nothing(server, stub, case):
    make, code, words = REFUSALS[case]
    before = _rows_run(server)
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(make(), timeout=TIMEOUT_S)
    assert (refused.value.code(), words in refused.value.details()) == (code, True), refused.value.details()
    assert _rows_run(server) == before


def test_a_message_over_max_body_bytes_is_resource_exhausted_naming_the_limit(server, stub):
    before = value(scrape(server.url), "cronnx_requests_total", api="grpc", model="tiny", version=1, outcome="413")
    image = np.random.default_rng(3).bytes(MAX_BODY + 1000)
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(infer_request(name="IMAGE", datatype="BYTES", shape=[1], raw=[image]), timeout=TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "server.max_body_bytes" in refused.value.details() and f"at most {MAX_BODY}" in refused.value.details()
    # Far over it, gRPC refuses the message before reading it whole (and nothing is counted).
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(infer_request(name="IMAGE", datatype="BYTES", shape=[1], raw=[image * 3]), timeout=TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = value(scrape(server.url), "cronnx_requests_total", api="grpc", model="tiny", version=1, outcome="413")
    assert after - before == 1
    # Just under it is served.
    response = stub.ModelInfer(infer_request(shape=[MAX_BATCH, 3, 32, 32], raw=[ROW * MAX_BATCH]), timeout=TIMEOUT_S)
    assert list(response.outputs[0].shape) == [MAX_BATCH, 10]


@pytest.mark.parametrize("call,request_type", [("ModelMetadata", "ModelMetadataRequest"),
                                               ("ModelConfig", "ModelConfigRequest"),
                                               ("ModelStatistics", "ModelStatisticsRequest")])
def test_metadata_of_an_unknown_model_or_version_is_not_found(stub, call, request_type):
    method, request = getattr(stub, call), getattr(service_pb2, request_type)
    with pytest.raises(grpc.RpcError) as unknown:
        method(request(name="nosuch"), timeout=TIMEOUT_S)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "unknown model 'nosuch'" in unknown.value.details()
    with pytest.raises(grpc.RpcError) as unknown:
        method(request(name="tiny", version="7"), timeout=TIMEOUT_S)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "version 7" in unknown.value.details()
    assert method(request(name="tiny", version="1"), timeout=TIMEOUT_S).ByteSize() > 0


METHODS = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
SERVED = ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "ModelConfig",
          "RepositoryIndex", "ModelStatistics"]


@pytest.mark.parametrize("method", sorted(set(METHODS) - set(SERVED) - {"ModelStreamInfer"}))
def test_a_method_cronnx_does_not_serve_is_unimplemented_saying_which_it_serves(stub, method):
    request = getattr(service_pb2, METHODS[method].input_type.name)()
    with pytest.raises(grpc.RpcError) as refused:
        getattr(stub, method)(request, timeout=TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert refused.value.details().startswith(f"Cronnx does not implement inference.GRPCInferenceService/{method} ")
    assert all(name in refused.value.details() for name in SERVED)


def test_streaming_infer_is_unimplemented_too(stub):
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.ModelStreamInfer(iter([infer_request(raw=[ROW])]), timeout=TIMEOUT_S))
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "ModelStreamInfer" in refused.value.details()
