"""The Open Inference Protocol's infer (KServe V2; Triton's HTTP/REST API): one request of N rows,
answered with N rows per output, as JSON tensors or with Triton's binary tensor data extension,
and its classification extension. Every row of a request goes into a ring slot of its own, so V2
rows and `/predict` requests of the same model are batched together. Inputs are either

- the model's own input tensor (its datatype, shape `[N, ...]` in the model's layout), copied
  into the slots as it is; or
- encoded images as a `BYTES` tensor `[N]` (or `[N, 1]`), preprocessed exactly as `/predict`
  does (in JSON each element is the image's base64; with the binary extension, its bytes).

Errors are `{"error": "..."}` with the status of `protocol.status.ERROR_STATUS`, as for `/predict`;
each infer request is counted and logged like a `/predict` request; the request is decoded and
checked, before any row runs, by `v2_inputs.py`. The protocol's other routes
(health, metadata, configuration) are the server process's (`server/metadata.py`). Reference: the
KServe V2 REST protocol and Triton's binary data and classification extensions (their field
names are used).
"""

from __future__ import annotations

import time

import msgspec
from aiohttp import web

from cronnx.engine.client import InferenceClient, ModelView, Selection
from cronnx.errors import InvalidRequest
from cronnx.http.body import read_body, request_deadline
from cronnx.http.context import SETTINGS
from cronnx.http.middleware import json_response
from cronnx.http.model_request import model_request
from cronnx.protocol.record import RequestRecord
from cronnx.protocol.v2_infer import OutputTensor, output_tensors, record_phases, run_rows
from cronnx.protocol.v2_inputs import (InferRequest, output_plans, parse_header, queue_parameters, raw_binary_request,
                                       request_rows)

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data", "classification"]


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
    parsed = parse_header(header) if header else raw_binary_request(binary, model)
    # Everything is checked before any row runs: a bad request costs no inference.
    rows = request_rows(parsed, binary, model)
    queue = queue_parameters(parsed)
    outputs = output_plans(parsed, model)
    read_s = time.perf_counter() - started
    results = await run_rows(client, selection, rows, record, deadline, queue)
    respond_started = time.perf_counter()
    response = _response(parsed, model, output_tensors(model, outputs, results))
    record_phases(record, read_s, results, respond_started)
    return response


def _split_body(request: web.Request, body: bytes) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) per the binary data extension."""
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return body, b""
    # ASCII digits only, as HTTP's Content-Length: int() alone also reads "+12", "1_2" and other
    # scripts' digits ("١٢") as 12. More than 19 digits is past any body (and int() refuses 4,300).
    length = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 19 else -1
    if not 0 <= length <= len(body):
        raise InvalidRequest(f"{HEADER_LENGTH} is {raw!r}; it must be an integer between 0 and the body's "
                             f"length ({len(body)})")
    return body[:length], body[length:]


def _response(parsed: InferRequest, model: ModelView, outputs: list[OutputTensor]) -> web.Response:
    entries, binary_parts = [], []
    for output in outputs:
        entry = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if output.binary:
            blob = output.raw()
            entry["parameters"] = {"binary_data_size": len(blob)}
            binary_parts.append(blob)
        else:
            entry["data"] = output.strings if output.strings is not None else output.tensor.reshape(-1).tolist()
        entries.append(entry)
    body = {"model_name": model.name, "model_version": str(model.version), "outputs": entries}
    if parsed.id is not None:
        body["id"] = parsed.id
    if not binary_parts:
        return json_response(body)
    header = msgspec.json.encode(body)
    return web.Response(body=header + b"".join(binary_parts), content_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(header))})


def add_infer_routes(app: web.Application, expect_handler) -> None:
    """The V2 infer routes (with and without a version), `Expect` answered by `expect_handler`
    (`body.continue_unless_too_large`) as on `/predict`."""
    app.router.add_post("/v2/models/{model}/infer", infer, expect_handler=expect_handler)
    app.router.add_post(r"/v2/models/{model}/versions/{version:\d+}/infer", infer, expect_handler=expect_handler)
