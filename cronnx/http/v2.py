"""The Open Inference Protocol's infer (KServe V2; Triton's HTTP/REST API): one request of N rows,
answered with N rows per output, as JSON tensors or with Triton's binary tensor data extension,
and its classification extension. Every row of a request goes into a ring slot of its own, so V2
rows and `/predict` requests of the same model are batched together. Inputs are either

- the model's own input tensor (its datatype, shape `[N, ...]` in the model's layout), copied
  into the slots as it is; or
- encoded images as a `BYTES` tensor `[N]` (or `[N, 1]`), preprocessed exactly as `/predict`
  does (in JSON each element is the image's base64; with the binary extension, its bytes).

Errors are `{"error": "..."}` with the status of `middleware.ERROR_STATUS`, as for `/predict`;
each infer request is counted and logged like a `/predict` request. The protocol's other routes
(health, metadata, configuration) are the server process's (`server/metadata.py`). Reference: the
KServe V2 REST protocol and Triton's binary data and classification extensions (their field
names are used).
"""

from __future__ import annotations

import asyncio
import binascii
import struct
import time

import msgspec
import numpy as np
from aiohttp import web

from cronnx.engine.client import InferenceClient, InferenceResult, ModelView, QueueParameters, Selection
from cronnx.errors import InvalidRequest
from cronnx.http.body import read_body, request_deadline
from cronnx.http.context import SETTINGS
from cronnx.http.middleware import json_response
from cronnx.http.record import RequestRecord, model_request
from cronnx.models.postprocess import top_k

HEADER_LENGTH = "Inference-Header-Content-Length"
# numpy dtype name <-> the protocol's datatype names.
DATATYPES = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8"}
EXTENSIONS = ["binary_tensor_data", "classification"]


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


_infer_request = msgspec.json.Decoder(InferRequest)


async def infer(request: web.Request) -> web.Response:
    """`POST /v2/models/{m}[/versions/{v}]/infer`: one inference request of N rows; the answer
    holds N rows per output."""
    return await model_request(request, "v2", _infer)


async def _infer(request: web.Request, client: InferenceClient, selection: Selection, record: RequestRecord,
                 started: float) -> web.Response:
    """The request's body (the JSON header and any binary data) checked against the chosen
    version, each row run on it, every row's output in the answer. Raises InvalidRequest for a
    malformed request, or the first failing row's error (the other rows are cancelled)."""
    settings = request.app[SETTINGS]
    deadline = request_deadline(settings, started)
    body = await read_body(request, settings, deadline)
    # Every row runs on the version chosen here, which its tensors are checked against.
    model = await client.view(selection)
    header, binary = _split_body(request, body)
    parsed = _parse_header(header) if header else _raw_binary_request(binary, model)
    rows = _rows(parsed, binary, model)
    queue = _queue_parameters(parsed.parameters)
    read_s = time.perf_counter() - started
    results = await _all_or_nothing([client.infer(selection, row, record.request_id, deadline, queue)
                                     for row in rows])
    respond_started = time.perf_counter()
    response = _response(parsed, model, results)
    record.batch_size = max(r.batch_size for r in results)
    record.phases = {"read": read_s, "admission": max(r.admission_s for r in results),
                     "preprocess": max(r.preprocess_s for r in results),
                     "queue": max(r.queue_s for r in results), "inference": max(r.infer_s for r in results),
                     "respond": time.perf_counter() - respond_started}
    return response


async def _all_or_nothing(jobs) -> list[InferenceResult]:
    """Every row's result, or the first row's error with the other rows cancelled."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(job) for job in jobs]
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None
    return [task.result() for task in tasks]


def _queue_parameters(parameters: dict[str, object]) -> QueueParameters:
    """Triton's `priority` (a level: 1 is served first, 0 the model's default) and `timeout`
    (how long the request may wait for a ring slot, in microseconds; 0: the model's default)
    request parameters; InvalidRequest unless non-negative integers. The model's policy checks
    them next."""
    priority, timeout = parameters.get("priority"), parameters.get("timeout")
    # The bounds keep both within what crosses a pipe (int64): priority_levels is at most 100.
    for name, value, most in (("priority", priority, 100), ("timeout", timeout, 2 ** 63 - 1)):
        if value is not None and (type(value) is not int or not 0 <= value <= most):
            raise InvalidRequest(f"parameter {name!r} must be an integer from 0 to {most}, got {value!r}")
    return QueueParameters(priority or None, timeout / 1_000_000 if timeout else None)


def _split_body(request: web.Request, body: bytes) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) per the binary data extension."""
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return body, b""
    try:
        length = int(raw)
    except ValueError:
        length = -1
    if not 0 <= length <= len(body):
        raise InvalidRequest(f"{HEADER_LENGTH} is {raw!r}; it must be an integer between 0 and the body's "
                             f"length ({len(body)})")
    return body[:length], body[length:]


def _raw_binary_request(binary: bytes, model: ModelView) -> InferRequest:
    """A body that is all binary data (header length 0): the model's input tensor, N rows of it in
    the model's datatype and layout, N read off the size; the output comes back binary (Triton's
    raw binary request)."""
    spec = model.spec
    row_bytes = int(np.prod(spec.input_item_shape)) * np.dtype(spec.input_dtype).itemsize
    if not binary or len(binary) % row_bytes:
        raise InvalidRequest(f"a raw binary request holds whole rows of the model's input ({row_bytes} bytes of "
                             f"{DATATYPES[spec.input_dtype]} each); got {len(binary)} bytes")
    shape = [len(binary) // row_bytes, *spec.input_item_shape]
    tensor = RequestTensor(spec.input_name, shape, DATATYPES[spec.input_dtype],
                           parameters={"binary_data_size": len(binary)})
    return InferRequest([tensor], parameters={"binary_data_output": True})


def _parse_header(header: bytes) -> InferRequest:
    try:
        return _infer_request.decode(header)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid inference request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the inference request is not valid JSON: {exc}") from None


def _rows(parsed: InferRequest, binary: bytes, model: ModelView) -> np.ndarray:
    """The request's rows: [N, *item] of the model's input dtype, or N encoded images (dtype object)."""
    if len(parsed.inputs) != 1:
        raise InvalidRequest(f"the request has {len(parsed.inputs)} inputs; model {model.name!r} takes one")
    tensor = parsed.inputs[0]
    if tensor.datatype == "BYTES":
        rows = _bytes_rows(tensor, binary)
    else:
        rows = _tensor_rows(tensor, binary, model)
    if not 1 <= len(rows) <= model.batch_size:
        raise InvalidRequest(f"input {tensor.name!r} has {len(rows)} rows; model {model.name!r} takes 1 to "
                             f"{model.batch_size} (max_batch_size) per request")
    return rows


def _binary_part(tensor: RequestTensor, binary: bytes) -> bytes | None:
    size = tensor.parameters.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or size < 0 or size != len(binary):
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
    if len(tensor.shape) != len(item) + 1 or tensor.shape[1:] != item or tensor.shape[0] < 1:
        raise InvalidRequest(f"input {tensor.name!r} has shape {tensor.shape}; the model takes [N, "
                             f"{', '.join(map(str, item))}] with N >= 1")
    count = int(np.prod(tensor.shape))
    dtype = np.dtype(spec.input_dtype)
    part = _binary_part(tensor, binary)
    if part is not None:
        if len(part) != count * dtype.itemsize:
            raise InvalidRequest(f"input {tensor.name!r}: shape {tensor.shape} of {tensor.datatype} needs "
                                 f"{count * dtype.itemsize} bytes, binary_data_size is {len(part)}")
        values = np.frombuffer(part, dtype)
    else:
        if tensor.data is None:
            raise InvalidRequest(f"input {tensor.name!r} has neither data nor binary_data_size")
        try:
            values = np.asarray(tensor.data, dtype=dtype).reshape(-1)
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(f"input {tensor.name!r}: data is not {tensor.datatype} numbers: {exc}") from None
        if values.size != count:
            raise InvalidRequest(f"input {tensor.name!r}: shape {tensor.shape} holds {count} values, data has "
                                 f"{values.size}")
    return values.reshape(tensor.shape)


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
    rows = np.empty(count, dtype=object)
    rows[:] = images
    return rows


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


def _serialize_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _response(parsed: InferRequest, model: ModelView,
              results: list[InferenceResult]) -> web.Response:
    spec = model.spec
    wanted = parsed.outputs or [RequestedOutput(spec.output_name)]
    binary_default = bool(parsed.parameters.get("binary_data_output", False))
    outputs, binary_parts = [], []
    for output in wanted:
        if output.name != spec.output_name:
            raise InvalidRequest(f"unknown output {output.name!r}; model {model.name!r} gives {spec.output_name!r}")
        classes = output.parameters.get("classification")
        as_binary = bool(output.parameters.get("binary_data", binary_default))
        if classes is not None:
            if not isinstance(classes, int) or classes < 1:
                raise InvalidRequest(f"output {output.name!r}: classification must be a positive integer, got "
                                     f"{classes!r}")
            labels = model.labels
            rows = [[f"{score}:{index}:{labels[index]}"
                     for index, score in top_k(r.output, classes, model.outputs_probabilities)] for r in results]
            k = len(rows[0])
            entry = {"name": output.name, "datatype": "BYTES", "shape": [len(rows), k]}
            if as_binary:
                blob = _serialize_bytes([s.encode() for row in rows for s in row])
            else:
                entry["data"] = [s for row in rows for s in row]
        else:
            tensor = np.stack([r.output for r in results])
            entry = {"name": output.name, "datatype": DATATYPES[spec.output_dtype], "shape": list(tensor.shape)}
            if as_binary:
                blob = np.ascontiguousarray(tensor).tobytes()
            else:
                entry["data"] = tensor.reshape(-1).tolist()
        if as_binary:
            entry["parameters"] = {"binary_data_size": len(blob)}
            binary_parts.append(blob)
        outputs.append(entry)
    body = {"model_name": model.name, "model_version": str(model.version), "outputs": outputs}
    if parsed.id is not None:
        body["id"] = parsed.id
    if not binary_parts:
        return json_response(body)
    header = msgspec.json.encode(body)
    return web.Response(body=header + b"".join(binary_parts), content_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(header))})


def add_infer_routes(app: web.Application) -> None:
    """The V2 infer routes (with and without a version)."""
    app.router.add_post("/v2/models/{model}/infer", infer)
    app.router.add_post(r"/v2/models/{model}/versions/{version:\d+}/infer", infer)
