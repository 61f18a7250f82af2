"""A ModelInfer request's size is counted without encoding its raw contents again: the size
`take_raw_contents` gives equals protobuf's own `ByteSize()` of the request as it came, for
entries whose lengths cross each varint width, several entries, none, and every other field."""

from __future__ import annotations

import pytest
from tritonclient.grpc import service_pb2

from cronnx.grpc.infer import take_raw_contents

# Lengths on both sides of each varint width (1, 2, 3 and 4 bytes), and a 224x224 FP32 row.
LENGTHS = [0, 1, 127, 128, 16383, 16384, 2 ** 21 - 1, 2 ** 21, 602112]


def _request(raw: list[bytes], **fields) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="mobilenetv2", model_version="3", id="call-7", **fields)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 224, 224])
    request.outputs.add(name="logits").parameters["classification"].int64_param = 5
    request.parameters["priority"].uint64_param = 2
    request.raw_input_contents.extend(raw)
    return request


@pytest.mark.parametrize("length", LENGTHS)
def test_one_entry_of_any_length(length):
    raw = [bytes([length % 251]) * length]
    request = _request(raw)
    expected = request.ByteSize()
    taken, size = take_raw_contents(request)
    assert (taken, size) == (raw, expected)
    assert len(request.raw_input_contents) == 0  # taken out: the rest was sized alone


def test_several_entries_none_and_typed_contents():
    raw = [b"a" * 128, b"", b"b" * 16384]
    request = _request(raw)
    expected = request.ByteSize()
    assert take_raw_contents(request) == (raw, expected)

    typed = _request([])
    typed.inputs[0].contents.fp32_contents.extend([0.5] * 1000)
    expected = typed.ByteSize()
    assert take_raw_contents(typed) == ([], expected)
