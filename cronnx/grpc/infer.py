"""`ModelInfer`'s messages, translated to and from what the Open Inference Protocol's checks and
answers take on every protocol (`protocol/v2_inputs.py`, `protocol/v2_infer.py`): a request's
tensors and parameters become the V2 request that HTTP decodes from JSON, its data the binary
part (`raw_input_contents` as they are, typed `contents` serialised the same way), so that every
check, limit and message is the same as over HTTP. Outputs come back in `raw_output_contents`,
as Triton's gRPC endpoint sends them (the classification extension's strings as BYTES)."""

from __future__ import annotations

import math

import numpy as np
from tritonclient.grpc import service_pb2

from cronnx.errors import InvalidRequest
from cronnx.protocol.v2_infer import OutputTensor, serialize_bytes
from cronnx.protocol.v2_inputs import InferRequest, RequestedOutput, RequestTensor, check_parameters

# The typed field of InferTensorContents that holds each datatype's values (the protocol's table).
CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                  "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                  "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
                  "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def parameters(entries) -> dict[str, object]:
    """A protobuf map of InferParameter as the JSON parameters HTTP decodes: a boolean, an integer
    (int64 and uint64 alike), a string or a float; None for a parameter that sets none."""
    out: dict[str, object] = {}
    for key, parameter in entries.items():
        choice = parameter.WhichOneof("parameter_choice")
        out[key] = getattr(parameter, choice) if choice is not None else None
    return out


def take_raw_contents(request: service_pb2.ModelInferRequest) -> tuple[list[bytes], int]:
    """The request's `raw_input_contents`, taken out of it, and the size in bytes of the request
    as it came (what `ByteSize()` gives before the taking). upb sizes a message by encoding it,
    which for a 224x224 FP32 row is a 602 kB copy; here only the rest of the message is encoded,
    and each raw entry counts as protobuf's wire format lays it out: the field's tag (1 byte for
    field 7), its length as a varint, its bytes."""
    raw = list(request.raw_input_contents)
    del request.raw_input_contents[:]
    return raw, request.ByteSize() + sum(1 + _varint_bytes(len(entry)) + len(entry) for entry in raw)


def _varint_bytes(value: int) -> int:
    """How many bytes a non-negative integer takes as a protobuf varint (7 bits each)."""
    return max(1, (value.bit_length() + 6) // 7)


def infer_request(request: service_pb2.ModelInferRequest, raw: list[bytes]) -> tuple[InferRequest, bytes]:
    """The V2 request and the binary data of its input (`protocol.v2_inputs.request_rows` takes
    both), its parameters checked; `raw` is its `raw_input_contents` (`take_raw_contents`).
    Raises InvalidRequest when `raw` does not hold one entry per input, when an input holds both
    or neither of raw and typed contents, or typed contents in a field its datatype does not use
    or with values the datatype cannot hold."""
    inputs = [RequestTensor(t.name, list(t.shape), t.datatype, parameters(t.parameters)) for t in request.inputs]
    if raw and len(raw) != len(inputs):
        raise InvalidRequest(f"raw_input_contents holds {len(raw)} tensors for {len(inputs)} inputs; it holds "
                             "one per input, in order, or none")
    binary = b""
    if len(inputs) == 1:  # any other count is refused with the HTTP side's message (request_rows)
        tensor, message = inputs[0], request.inputs[0]
        has_contents = message.HasField("contents")
        if raw and has_contents:
            raise InvalidRequest(f"input {tensor.name!r} has both contents and raw_input_contents; send one")
        if not raw and not has_contents:
            raise InvalidRequest(f"input {tensor.name!r} has neither contents nor raw_input_contents")
        binary = raw[0] if raw else _typed_contents(tensor, message.contents)
        # The binary part carries the data, as HTTP's binary data extension does.
        tensor.parameters = {**tensor.parameters, "binary_data_size": len(binary)}
    outputs = [RequestedOutput(o.name, parameters(o.parameters)) for o in request.outputs] or None
    parsed = InferRequest(inputs, request.id or None, outputs, parameters(request.parameters))
    check_parameters(parsed)
    return parsed, binary


def _typed_contents(tensor: RequestTensor, contents: service_pb2.InferTensorContents) -> bytes:
    """Typed contents as the binary data of the tensor's datatype (row-major values; BYTES
    serialised with their lengths). A datatype Cronnx's models do not take (the checks refuse
    it next, naming what the model takes) gives no data."""
    field = CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        if tensor.datatype == "FP16":
            raise InvalidRequest(f"input {tensor.name!r} is FP16, which has no typed contents in the protocol: send "
                                 "its bytes in raw_input_contents")
        return b""
    used = [f.name for f, _ in contents.ListFields()]
    if used and used != [field]:
        raise InvalidRequest(f"input {tensor.name!r} is {tensor.datatype}: its values go in contents.{field}, "
                             f"not {', '.join(used)}")
    if tensor.datatype == "BYTES":
        return serialize_bytes(list(contents.bytes_contents))
    count = math.prod(tensor.shape)  # Python integers: no wrap-around
    given = len(getattr(contents, field))
    if given != count:
        raise InvalidRequest(f"input {tensor.name!r}: shape {tensor.shape} holds {count} values, contents.{field} "
                             f"has {given}")
    if tensor.datatype == "FP32":
        return np.asarray(contents.fp32_contents, np.float32).tobytes()
    if tensor.datatype == "UINT8":
        values = np.asarray(contents.uint_contents, np.uint32)
        over = np.flatnonzero(values > 255)
        if over.size:
            raise InvalidRequest(f"input {tensor.name!r}: element {over[0]} of contents.uint_contents is "
                                 f"{values[over[0]]}; UINT8 holds integers from 0 to 255")
        return values.astype(np.uint8).tobytes()
    return b""


def infer_response(request: service_pb2.ModelInferRequest, model_name: str, model_version: int,
                   outputs: list[OutputTensor]) -> service_pb2.ModelInferResponse:
    """The answer: each output's name, datatype and shape, its data in `raw_output_contents`; the
    request's `id` echoed."""
    response = service_pb2.ModelInferResponse(model_name=model_name, model_version=str(model_version), id=request.id)
    for output in outputs:
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        response.raw_output_contents.append(output.raw())
    return response
