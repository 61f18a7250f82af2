"""The Open Inference Protocol's request, decoded and checked before anything runs: its JSON
header, its parameters (each of the type the protocol gives it), and its one input turned into
rows, either the model's own tensor or encoded images (`BYTES`), from JSON data or the binary
tensor data extension.

Every check raises InvalidRequest (400) with what was wrong; nothing a client sends reaches numpy
unchecked, because numpy converts loosely (strings and booleans to numbers, None to NaN) and
raises errors of its own (OverflowError) on values a datatype cannot hold. Reference: the KServe
V2 REST protocol and Triton's binary data, classification, sequence and shared-memory
extensions (their parameter names and types).
"""

from __future__ import annotations

import binascii
import itertools
import math
import re
import struct
from typing import Annotated

import msgspec
import numpy as np

from cronnx.engine.client import ModelView, QueueParameters
from cronnx.errors import InvalidRequest

# numpy dtype name <-> the protocol's datatype names.
DATATYPES = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8"}

# What JSON data may hold per datatype, as msgspec checks it (no bool, str or null for a number;
# no fraction for an integer). A float bound is where rounding to the datatype would give
# infinity: its largest finite value plus half a step.
_FLOAT32_BOUND = 3.4028235677973366e38
_FLOAT16_BOUND = 65520.0
_ELEMENTS = {
    "float32": (list[Annotated[float, msgspec.Meta(gt=-_FLOAT32_BOUND, lt=_FLOAT32_BOUND)]],
                "finite numbers within +-3.4028235e38"),
    "float16": (list[Annotated[float, msgspec.Meta(gt=-_FLOAT16_BOUND, lt=_FLOAT16_BOUND)]],
                "finite numbers within +-65504"),
    "uint8": (list[Annotated[int, msgspec.Meta(ge=0, le=255)]], "integers from 0 to 255"),
}
_INDEX = re.compile(r"\$\[(\d+)\]")

# Parameters the protocol and Triton's extensions give a type, where they may appear. Others
# are the client's own and are ignored, as the protocol allows.
_REQUEST_PARAMETERS = {"binary_data_output": bool, "priority": int, "timeout": int, "sequence_id": (int, str),
                       "sequence_start": bool, "sequence_end": bool}
_INPUT_PARAMETERS = {"binary_data_size": int, "shared_memory_region": str, "shared_memory_byte_size": int,
                     "shared_memory_offset": int}
_OUTPUT_PARAMETERS = {"binary_data": bool, "classification": int, "shared_memory_region": str,
                      "shared_memory_byte_size": int, "shared_memory_offset": int}
# Bounds that keep an integer within what crosses a pipe (int64); priority_levels is at most 100.
_INT_MAX = 2 ** 63 - 1
_PRIORITY_MAX = 100


class RequestTensor(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, object] = {}
    data: list | None = None


class RequestedOutput(msgspec.Struct):
    name: str
    parameters: dict[str, object] = {}


class InferRequest(msgspec.Struct):
    inputs: list[RequestTensor]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, object] = {}


class OutputPlan(msgspec.Struct, frozen=True):
    """One output the request asked for, checked: `classes` above 0 for the classification
    extension's top classes (None: the tensor), `binary` for the binary data extension."""

    name: str
    classes: int | None
    binary: bool


_infer_request = msgspec.json.Decoder(InferRequest)


def parse_header(header: bytes) -> InferRequest:
    """The JSON header of an infer request, its parameters checked (`check_parameters`). Raises
    InvalidRequest for anything the decoder refuses (not JSON, a field of the wrong type, nesting
    deeper than it follows) and for a parameter of the wrong type."""
    try:
        parsed = _infer_request.decode(header)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid inference request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the inference request is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("the inference request nests its JSON too deeply") from None
    check_parameters(parsed)
    return parsed


def check_parameters(parsed: InferRequest) -> None:
    """Every parameter the protocol types has that type (a boolean is not an integer here); a
    request that needs an extension Cronnx lacks (sequences, shared memory) is refused. Raises
    InvalidRequest naming the parameter."""
    _check_types("request", parsed.parameters, _REQUEST_PARAMETERS)
    for tensor in parsed.inputs:
        _check_types(f"input {tensor.name!r}", tensor.parameters, _INPUT_PARAMETERS)
    for output in parsed.outputs or []:
        _check_types(f"output {output.name!r}", output.parameters, _OUTPUT_PARAMETERS)
    sequence = sorted(set(parsed.parameters) & {"sequence_id", "sequence_start", "sequence_end"})
    if sequence:
        raise InvalidRequest(f"request parameters {sequence}: Cronnx's models are not stateful sequences")
    for kind, tensors in (("input", parsed.inputs), ("output", parsed.outputs or [])):
        for tensor in tensors:
            shared = sorted(name for name in tensor.parameters if name.startswith("shared_memory_"))
            if shared:
                raise InvalidRequest(f"{kind} {tensor.name!r} parameters {shared}: the shared-memory extension is "
                                     "not supported; send the data in the body (JSON, or the binary tensor data "
                                     "extension)")


def _check_types(where: str, parameters: dict[str, object], types: dict[str, type | tuple[type, ...]]) -> None:
    for name, value in parameters.items():
        expected = types.get(name)
        if expected is None:
            continue
        allowed = expected if isinstance(expected, tuple) else (expected,)
        # bool is a subclass of int in Python; in JSON they are different types.
        if type(value) not in allowed:
            names = " or ".join({bool: "a boolean", int: "an integer", str: "a string"}[t] for t in allowed)
            raise InvalidRequest(f"{where} parameter {name!r} must be {names}, got {value!r}")
        if type(value) is int and not 0 <= value <= _INT_MAX:
            raise InvalidRequest(f"{where} parameter {name!r} must be from 0 to {_INT_MAX}, got {value}")


def queue_parameters(parsed: InferRequest) -> QueueParameters:
    """Triton's `priority` (a level: 1 is served first, 0 the model's default) and `timeout`
    (how long the request may wait for a ring slot, in microseconds; 0: the model's default)
    request parameters, types already checked. The model's policy checks them next."""
    priority, timeout = parsed.parameters.get("priority"), parsed.parameters.get("timeout")
    if priority is not None and priority > _PRIORITY_MAX:
        raise InvalidRequest(f"parameter 'priority' must be an integer from 0 to {_PRIORITY_MAX}, got {priority}")
    return QueueParameters(priority or None, timeout / 1_000_000 if timeout else None)


def output_plans(parsed: InferRequest, model: ModelView) -> list[OutputPlan]:
    """The outputs to answer (the model's one output when none is named), checked before any row
    runs. Raises InvalidRequest for an unknown output or a classification count below 1."""
    binary_default = parsed.parameters.get("binary_data_output", False)
    plans = []
    for output in parsed.outputs or [RequestedOutput(model.spec.output_name)]:
        if output.name != model.spec.output_name:
            raise InvalidRequest(f"unknown output {output.name!r}; model {model.name!r} gives "
                                 f"{model.spec.output_name!r}")
        classes = output.parameters.get("classification")
        if classes is not None and classes < 1:
            raise InvalidRequest(f"output {output.name!r}: parameter 'classification' must be a positive integer, "
                                 f"got {classes}")
        plans.append(OutputPlan(output.name, classes, output.parameters.get("binary_data", binary_default)))
    return plans


def raw_binary_request(binary: bytes, model: ModelView) -> InferRequest:
    """A body that is all binary data (header length 0): the model's input tensor, N rows of it in
    the model's datatype and layout, N read off the size; the output comes back binary (Triton's
    raw binary request)."""
    spec = model.spec
    row_bytes = math.prod(spec.input_item_shape) * np.dtype(spec.input_dtype).itemsize
    if not binary or len(binary) % row_bytes:
        raise InvalidRequest(f"a raw binary request holds whole rows of the model's input ({row_bytes} bytes of "
                             f"{DATATYPES[spec.input_dtype]} each); got {len(binary)} bytes")
    shape = [len(binary) // row_bytes, *spec.input_item_shape]
    tensor = RequestTensor(spec.input_name, shape, DATATYPES[spec.input_dtype],
                           parameters={"binary_data_size": len(binary)})
    return InferRequest([tensor], parameters={"binary_data_output": True})


def request_rows(parsed: InferRequest, binary: bytes, model: ModelView) -> np.ndarray:
    """The request's rows: [N, *item] of the model's input dtype, or N encoded images (dtype
    object), 1 <= N <= the model's batch size. Raises InvalidRequest for a wrong input count,
    name, datatype or shape, N out of range (checked before the data is read), data that does
    not match the shape, or values the datatype cannot hold."""
    if len(parsed.inputs) != 1:
        raise InvalidRequest(f"the request has {len(parsed.inputs)} inputs; model {model.name!r} takes one")
    tensor = parsed.inputs[0]
    if tensor.shape and not 1 <= tensor.shape[0] <= model.batch_size:
        raise InvalidRequest(f"input {tensor.name!r} has {tensor.shape[0]} rows (shape {tensor.shape}); model "
                             f"{model.name!r} takes 1 to {model.batch_size} (max_batch_size) per request")
    if tensor.datatype == "BYTES":
        return _bytes_rows(tensor, binary)
    return _tensor_rows(tensor, binary, model)


def _binary_part(tensor: RequestTensor, binary: bytes) -> bytes | None:
    size = tensor.parameters.get("binary_data_size")
    if size is None:
        return None
    if size != len(binary):
        raise InvalidRequest(f"input {tensor.name!r} declares binary_data_size {size!r}, but the binary data after "
                             f"the JSON header is {len(binary)} bytes")
    return binary


def _tensor_rows(tensor: RequestTensor, binary: bytes, model: ModelView) -> np.ndarray:
    spec = model.spec
    expected = DATATYPES[spec.input_dtype]
    if tensor.name != spec.input_name:
        raise InvalidRequest(f"unknown input {tensor.name!r}; model {model.name!r} takes {spec.input_name!r} "
                             f"({expected}) or encoded images as a BYTES tensor")
    if tensor.datatype != expected:
        raise InvalidRequest(f"input {tensor.name!r} is {tensor.datatype}; the model takes {expected} "
                             "(or BYTES of encoded images)")
    item = list(spec.input_item_shape)
    if len(tensor.shape) != len(item) + 1 or tensor.shape[1:] != item:
        raise InvalidRequest(f"input {tensor.name!r} has shape {tensor.shape}; the model takes [N, "
                             f"{', '.join(map(str, item))}] with N >= 1")
    count = math.prod(tensor.shape)  # Python integers: no wrap-around
    dtype = np.dtype(spec.input_dtype)
    part = _binary_part(tensor, binary)
    if part is not None:
        if len(part) != count * dtype.itemsize:
            raise InvalidRequest(f"input {tensor.name!r}: shape {tensor.shape} of {tensor.datatype} needs "
                                 f"{count * dtype.itemsize} bytes, binary_data_size is {len(part)}")
        values = np.frombuffer(part, dtype)
        # One pass when every value is finite, the common case; the first one that is not is
        # looked for only then.
        if dtype.kind == "f" and not np.isfinite(values).all():
            bad = int(np.argmin(np.isfinite(values)))
            raise InvalidRequest(f"input {tensor.name!r}: element {bad} of the binary data is {values[bad]}; "
                                 f"{tensor.datatype} input must be finite")
    else:
        if tensor.data is None:
            raise InvalidRequest(f"input {tensor.name!r} has neither data nor binary_data_size")
        flat = _flatten(tensor.data)
        if len(flat) != count:
            raise InvalidRequest(f"input {tensor.name!r}: shape {tensor.shape} holds {count} values, data has "
                                 f"{len(flat)}")
        values = np.asarray(_checked_elements(tensor, flat, spec.input_dtype), dtype=dtype)
    return values.reshape(tensor.shape)


def _flatten(data: list) -> list:
    """Nested JSON arrays (row-major, as the protocol allows) as one flat list; a ragged nesting
    stays partly nested, and the element check refuses it."""
    while data and type(data[0]) is list and all(type(x) is list for x in data):
        data = list(itertools.chain.from_iterable(data))
    return data


def _checked_elements(tensor: RequestTensor, flat: list, dtype: str) -> list:
    """`flat` when every element is a value of `dtype`; else InvalidRequest naming the first that is
    not, and the datatype's range."""
    elements, allowed = _ELEMENTS[dtype]
    try:
        return msgspec.convert(flat, elements)
    except msgspec.ValidationError as exc:
        found = _INDEX.search(str(exc))
        where = f"element {found.group(1)} of data is {flat[int(found.group(1))]!r}" if found else "data"
        raise InvalidRequest(f"input {tensor.name!r}: {where}; {tensor.datatype} holds {allowed} ({exc})") from None


def _bytes_rows(tensor: RequestTensor, binary: bytes) -> np.ndarray:
    if not (len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)):
        raise InvalidRequest(f"BYTES input {tensor.name!r} has shape {tensor.shape}; encoded images are [N] or "
                             "[N, 1]")
    count = tensor.shape[0]
    part = _binary_part(tensor, binary)
    if part is not None:
        images = _deserialize_bytes(tensor.name, part)
    else:
        if tensor.data is None:
            raise InvalidRequest(f"input {tensor.name!r} has neither data nor binary_data_size")
        flat = [x for row in tensor.data for x in (row if isinstance(row, list) else [row])]
        if not all(isinstance(x, str) for x in flat):
            raise InvalidRequest(f"BYTES input {tensor.name!r}: in JSON each element is an image's base64 string")
        try:
            images = [binascii.a2b_base64(x, strict_mode=True) for x in flat]
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest(f"BYTES input {tensor.name!r}: an element is not valid base64: {exc}") from None
    if len(images) != count:
        raise InvalidRequest(f"BYTES input {tensor.name!r} has shape {tensor.shape} but {len(images)} elements")
    out = np.empty(count, dtype=object)
    out[:] = images
    return out


def _deserialize_bytes(name: str, data: bytes) -> list[bytes]:
    """Triton's BYTES serialisation: each element is a 4-byte little-endian length, then its bytes."""
    out, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise InvalidRequest(f"BYTES input {name!r}: binary data ends inside an element's length")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidRequest(f"BYTES input {name!r}: an element of {length} bytes runs past the binary data")
        out.append(data[offset:offset + length])
        offset += length
    return out
