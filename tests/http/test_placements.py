"""The same requests get the same answers whichever process serves HTTP: the server process itself
(`server.front_processes: 1`) or two front processes. Both run the same handlers over their own
inference client; asserted here on what a client and an operator see: statuses and bodies (less
timings), `cronnx_requests_total` per label set, and the access-log fields."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import numpy as np
import pytest

from support.bad_requests import BODY_LIMIT
from support.client import TIMEOUT
from support.images import encode, photo_like
from support.metrics import scrape
from support.reference import DirectModel
from support.server import ServerProcess, model_entry, server_config, wait_until

pytestmark = pytest.mark.server

PHOTO = encode(photo_like(320, 240, seed=4), "JPEG", quality=90)
OTHER_PHOTO = encode(photo_like(400, 300, seed=5), "JPEG", quality=90)
PLACEMENTS = pytest.mark.parametrize("front_processes", [1, 2], ids=["one process", "two front processes"])


def _v2_json(*images: bytes) -> dict:
    return {"inputs": [{"name": "IMAGE", "shape": [len(images)], "datatype": "BYTES",
                        "data": [base64.b64encode(image).decode() for image in images]}],
            "outputs": [{"name": "logits", "parameters": {"classification": 3}}]}


def _v2_binary(tensor: np.ndarray) -> tuple[bytes, str]:
    """A V2 request with its tensor as binary data after the JSON header; returns (body, header length)."""
    header = json.dumps({"inputs": [{"name": "input", "shape": list(tensor.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": tensor.nbytes}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}).encode()
    return header + tensor.tobytes(), str(len(header))


def _requests(direct: DirectModel) -> dict[str, tuple[str, bytes, dict]]:
    """Each request by its id: (path, body, headers)."""
    jpeg = {"Content-Type": "image/jpeg"}
    json_type = {"Content-Type": "application/json"}
    binary, header_length = _v2_binary(np.stack([direct.tensor(PHOTO), direct.tensor(OTHER_PHOTO)]))
    return {
        "predict-raw": ("/predict/tiny", PHOTO, jpeg),
        "predict-json": ("/predict/tiny?top_k=2", json.dumps({"image": base64.b64encode(PHOTO).decode()}).encode(),
                         json_type),
        "predict-version": ("/predict/tiny/versions/1", OTHER_PHOTO, jpeg),
        "predict-not-an-image": ("/predict/tiny", b"plain text, no picture here", jpeg),
        "predict-bad-base64": ("/predict/tiny", b'{"image": "not*base64!"}', json_type),
        "predict-text": ("/predict/tiny", b"hello", {"Content-Type": "text/plain"}),
        "predict-too-large": ("/predict/tiny", b"\xff" * (BODY_LIMIT + 1), jpeg),
        "predict-unknown-model": ("/predict/nope", PHOTO, jpeg),
        "predict-unknown-version": ("/predict/tiny/versions/7", PHOTO, jpeg),
        "predict-bad-top-k": ("/predict/tiny?top_k=0", PHOTO, jpeg),
        "v2-json": ("/v2/models/tiny/infer", json.dumps(_v2_json(PHOTO, OTHER_PHOTO)).encode(), json_type),
        "v2-binary": ("/v2/models/tiny/versions/1/infer", binary,
                      {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": header_length}),
        "v2-bad-input": ("/v2/models/tiny/infer", json.dumps({"inputs": [{"name": "nope", "shape": [1, 3],
                                                                          "datatype": "FP32", "data": [1, 2, 3]}]}
                                                             ).encode(), json_type),
        "v2-not-json": ("/v2/models/tiny/infer", b"{not json", json_type),
        "v2-unknown-model": ("/v2/models/nope/infer", json.dumps(_v2_json(PHOTO)).encode(), json_type),
    }


STATUSES = {"predict-raw": 200, "predict-json": 200, "predict-version": 200, "predict-not-an-image": 400,
            "predict-bad-base64": 400, "predict-text": 415, "predict-too-large": 413, "predict-unknown-model": 404,
            "predict-unknown-version": 404, "predict-bad-top-k": 400, "v2-json": 200, "v2-binary": 200,
            "v2-bad-input": 400, "v2-not-json": 400, "v2-unknown-model": 404}


def _rounded(value):
    """`value` with its floats to 4 decimals: the two placements run the same model on the same
    tensors, in other processes."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


async def _send(url: str, requests: dict[str, tuple[str, bytes, dict]]) -> dict[str, tuple[int, dict]]:
    """Each request in turn (one at a time: each runs in a batch of its own), its status and JSON
    body, less the timings; the client's request id is echoed."""
    answers = {}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        for request_id, (path, body, headers) in requests.items():
            async with session.post(url + path, data=body, headers={**headers, "X-Request-ID": request_id}) as r:
                assert r.headers["X-Request-ID"] == request_id
                answer = await r.json(content_type=None)
            answer.pop("timings_ms", None)
            answers[request_id] = (r.status, _rounded(answer))
    return answers


def _access_fields(log: str) -> dict[str, dict]:
    """Each access-log line's fields by request id, less the process, the times (their phases
    kept by name) and the batch size (whether a request's rows shared a batch with each other
    depends on timing: with the machine busy they did in one placement and not in the other)."""
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    fields = {}
    for line in lines:
        if line["logger"] != "cronnx.access":
            continue
        line = {k: v for k, v in line.items() if k not in ("time", "pid", "total_ms", "batch_size")}
        if "phases_ms" in line:
            line["phases_ms"] = sorted(line["phases_ms"])
        fields[line["request_id"]] = line
    return fields


@pytest.fixture(scope="module")
def observed(tmp_path_factory, tiny_model):
    """observed(front_processes) -> (answers, request counts, access-log fields) of the requests
    above, sent to a server in that placement (each placement's server started once)."""
    seen = {}
    requests = _requests(DirectModel(tiny_model))

    def observe(front_processes: int):
        if front_processes not in seen:
            config = server_config(model_entry("tiny", tiny_model, batch_size=4), max_body_bytes=BODY_LIMIT,
                                   front_processes=front_processes)
            server = ServerProcess(tmp_path_factory.mktemp(f"placement{front_processes}"), config)
            try:
                server.start()
                answers = asyncio.run(_send(server.url, requests))

                def counts() -> dict:
                    return {labels: count for (name, labels), count in scrape(server.url).items()
                            if name == "cronnx_requests_total"}

                # A front process reports each request over its pipe: wait until all are counted.
                wait_until(lambda: sum(counts().values()) == len(requests), timeout_s=10,
                           what="every request counted")
                seen[front_processes] = answers, counts(), _access_fields(server.log())
            finally:
                server.cleanup()
        return seen[front_processes]

    return observe


@PLACEMENTS
def test_each_request_gets_its_status_count_and_log_line(observed, front_processes):
    answers, counts, access = observed(front_processes)
    assert {request_id: status for request_id, (status, _) in answers.items()} == STATUSES
    assert answers["predict-json"][1]["model"] == "tiny" and len(answers["predict-json"][1]["predictions"]) == 2
    assert answers["v2-binary"][1]["model_version"] == "1" and answers["v2-binary"][1]["outputs"][0]["shape"] == [2, 10]
    assert "nope" in answers["predict-unknown-model"][1]["error"]
    assert set(access) == set(STATUSES)
    # Refused before or after reading the body, a request of a served model is labelled by its
    # version; only a model or version that is not served is not.
    assert {request_id for request_id, line in access.items() if line["model"] == "_unknown"} == {
        "predict-unknown-model", "predict-unknown-version", "v2-unknown-model"}
    assert sum(counts.values()) == len(STATUSES)


def test_both_placements_answer_count_and_log_alike(observed):
    one, fronts = observed(1), observed(2)
    answers, counts, access = one
    assert fronts[0] == answers
    assert fronts[1] == counts
    assert fronts[2] == access
