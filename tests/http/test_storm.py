"""The hardening's standing guard: a storm of malformed and hostile requests, all kinds at once
and interleaved, beside a stream of good requests to the same server, in both placements (the
server process serving HTTP itself, and two front processes).

The storm holds /predict requests and the Open Inference Protocol's (V2 infer, and the health
routes as KServe's client reads them). Every hostile request gets its documented status and a
JSON error naming what was wrong; every odd but valid image or tensor gets 200 with the answer
of a direct onnxruntime run; every good request of the stream is answered correctly throughout.
Afterwards nothing is left behind: no slot in use, nothing in flight, every inference request
counted once by API, model, version and outcome, and a clean stop (exit 0, no process, no
shared memory).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import random
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlparse

import aiohttp
import numpy as np
import pytest
from PIL import Image

from support.client import TIMEOUT, Reply
from support.images import encode, exif_block, photo_like
from support.metrics import scrape, total, value
from support.reference import DirectModel, assert_matches
from support.server import children_of, model_entry, pid_alive, server_config, shm_segments, wait_until

BODY_LIMIT = 128 * 1024
PIXEL_LIMIT = 1_000_000
TOKEN = "storm-admin-token"
COPIES = 6             # of each kind, all sent at once
GOOD_STREAMS = 3       # concurrent clients sending good requests throughout
GOOD_MAX_PER_STREAM = 300
STORM_SEED = 11


# --- The requests ------------------------------------------------------------------------------

@dataclass
class Kind:
    """One kind of request. `status` is what the README documents for it; an error's text must
    hold `words` (case-insensitive); a 200 must pass `check` (its JSON body) or else, for
    /predict, match a direct run on `image` with `top_k`. `raw`: the whole request as bytes, for
    what aiohttp's client cannot send (sent on a connection of its own by `exchange`).
    `counted`: it reaches an inference handler, so it is one of cronnx_requests_total, under
    `api` and `model_label`."""

    content_type: str | None = "image/jpeg"
    body: bytes | None = b""
    status: int = 400
    words: str = ""
    method: str = "POST"
    path: str = "/predict/tiny"
    params: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)
    chunked: bool = False
    image: bytes | None = None
    top_k: int = 5
    counted: bool = True
    model_label: str = "tiny"
    api: str = "predict"
    raw: bytes | None = None
    check: Callable[[dict], None] | None = None


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _animated_gif() -> bytes:
    frames = [photo_like(64, 48, seed=s).convert("P") for s in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).n_frames == 3
    return data


def _sixteen_bit_png() -> bytes:
    grey = np.asarray(photo_like(64, 48, seed=12).convert("L")).astype(np.uint16) * 257
    data = encode(Image.fromarray(grey), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    return data


def _odd_exif_jpeg() -> bytes:
    # An orientation of 6 beside resolutions a phone wrote as -1/0 and 0/0 (Pillow cannot write
    # them back), and a count that runs past the file.
    exif = exif_block([(0x0112, 3, [6]), (0x011A, 10, [(-1, 0)]), (0x011B, 5, [(0, 0)]),
                       (0x0131, 2, b"odd camera\0", 0x7FFFFFFF)])
    return encode(photo_like(64, 48, seed=13), "JPEG", quality=90, exif=exif)


def _rgba_png() -> bytes:
    rgb = np.asarray(photo_like(60, 40, seed=14))
    alpha = np.linspace(0, 255, 60 * 40).round().astype(np.uint8).reshape(40, 60)
    return encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG")


def _wrapped_base64(data: bytes, newline: str) -> str:
    text = _b64(data)
    return newline.join(text[i:i + 76] for i in range(0, len(text), 76)) + newline


def storm_kinds() -> dict[str, Kind]:
    photo = encode(photo_like(160, 120, seed=21), "JPEG", quality=90)
    png = encode(photo_like(160, 120, seed=22), "PNG")
    cmyk = encode(photo_like(64, 48, seed=23).convert("CMYK"), "JPEG", quality=90)
    assert Image.open(io.BytesIO(cmyk)).mode == "CMYK"
    one_pixel = encode(Image.new("RGB", (1, 1), (200, 30, 90)), "PNG")
    wide = encode(photo_like(4000, 1, seed=24), "PNG")
    tall = encode(photo_like(1, 4000, seed=25), "JPEG", quality=90)
    # 3000 x 3000 (9 Mpx) and 1100 x 1100 (1.21 Mpx) against a limit of 1 Mpx: Pillow raises
    # above twice the limit and only warns between the two; both are refused.
    bomb = encode(Image.new("L", (3000, 3000)), "PNG")
    small_bomb = encode(Image.new("L", (1100, 1100)), "PNG")
    assert len(bomb) < BODY_LIMIT and len(small_bomb) < BODY_LIMIT
    gif = _animated_gif()
    kinds = {
        # The body itself.
        "invalid json": Kind("application/json", b'{"image": "abc', words="not valid JSON"),
        "json without image": Kind("application/json", _json({"picture": _b64(photo)}),
                                   words="missing required field `image`"),
        "json array": Kind("application/json", _json([_b64(photo)]), words="expected `object`"),
        "image not a string": Kind("application/json", _json({"image": 12345}), words="expected `str`"),
        "image null": Kind("application/json", _json({"image": None}), words="expected `str`"),
        "invalid base64": Kind("application/json", _json({"image": "not*base64!"}), words="not valid base64"),
        "base64 of a non-image": Kind("application/json", _json({"image": _b64(b"hello, world")}),
                                      words="not an image"),
        "json with an empty image": Kind("application/json", _json({"image": ""}), words="not an image"),
        "empty body": Kind("image/png", b"", words="empty"),
        "empty json body": Kind("application/json", b"", words="empty"),
        "truncated jpeg": Kind("image/jpeg", photo[: len(photo) // 2], words="truncated"),
        "truncated png": Kind("image/png", png[: len(png) // 2], words="truncated"),
        "text as image/jpeg": Kind("image/jpeg", b"Dear server,\nthis is a letter, not a picture.\n",
                                   words="not an image"),
        "eps as image/jpeg": Kind("image/jpeg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
                                  words="not an image"),
        "decompression bomb": Kind("image/png", bomb, 413, "too large"),
        "bomb in pillow's warning range": Kind("image/png", small_bomb, 413, "too large"),
        "body over the limit": Kind("image/jpeg", b"\xff" * (BODY_LIMIT + 1), 413, "larger than the limit"),
        "chunked body over the limit": Kind("image/jpeg", b"\xff" * (BODY_LIMIT * 2), 413, "larger than the limit",
                                            chunked=True),
        # Headers.
        "text/plain": Kind("text/plain", photo, 415, "Content-Type 'text/plain'"),
        "multipart": Kind("multipart/form-data; boundary=x", b"--x--\r\n", 415, "Content-Type 'multipart/form-data'"),
        "unknown content-encoding": Kind("image/jpeg", photo, 415, "Content-Encoding 'compress'",
                                         headers={"Content-Encoding": "compress"}),
        "gzip that is not gzip": Kind("image/jpeg", photo, 400, "cannot be read", headers={"Content-Encoding": "gzip"}),
        # Parameters and routes.
        "top_k 0": Kind("image/jpeg", photo, 400, "top_k must be a positive integer", params={"top_k": "0"}),
        "top_k -1": Kind("image/jpeg", photo, 400, "top_k must be a positive integer", params={"top_k": "-1"}),
        "top_k x": Kind("image/jpeg", photo, 400, "top_k must be a positive integer", params={"top_k": "x"}),
        "unknown model": Kind("image/jpeg", photo, 404, "unknown model 'nope'", path="/predict/nope",
                              model_label="_unknown"),
        "unknown version": Kind("image/jpeg", photo, 404, "version 7 of model 'tiny' is not served",
                                path="/predict/tiny/versions/7", model_label="_unknown"),
        "get on predict": Kind(None, None, 405, "method not allowed", method="GET", counted=False),
        "put on predict": Kind("image/jpeg", photo, 405, "method not allowed", method="PUT", counted=False),
        "unknown route": Kind("image/jpeg", photo, 404, "not found", path="/predictions/tiny", counted=False),
        "non-numeric version route": Kind("image/jpeg", photo, 404, "not found", path="/predict/tiny/versions/v1",
                                          counted=False),
        "admin without a token": Kind(None, None, 401, "Bearer", path="/admin/models/tiny/reload", counted=False),
        "admin with a wrong token": Kind(None, None, 403, "wrong token", path="/admin/models/tiny/unload",
                                         headers={"Authorization": "Bearer not-the-token"}, counted=False),
        # Odd but valid: answered like any picture.
        "exif-odd jpeg": Kind("image/jpeg", _odd_exif_jpeg(), 200),
        "cmyk jpeg": Kind("image/jpeg", cmyk, 200),
        "16-bit png": Kind("image/png", _sixteen_bit_png(), 200),
        "animated gif": Kind("image/gif", gif, 200),
        "rgba png": Kind("image/png", _rgba_png(), 200),
        "1x1 png": Kind("image/png", one_pixel, 200),
        # Nothing in the README or preprocessing/transform.py refuses an elongated picture: crop
        # mode takes the centre of the short side (here a fraction of one pixel), so it is answered.
        "4000x1 png": Kind("image/png", wide, 200),
        "1x4000 jpeg": Kind("image/jpeg", tall, 200),
        "base64 with newlines": Kind("application/json", _json({"image": _wrapped_base64(png, "\n")}), 200, image=png),
        "base64 with crlf": Kind("application/json", _json({"image": _wrapped_base64(photo, "\r\n")}), 200,
                                 image=photo),
        "real gzip": Kind("image/jpeg", gzip.compress(photo), 200, image=photo, headers={"Content-Encoding": "gzip"}),
        "octet-stream with top_k 3": Kind("application/octet-stream", photo, 200, params={"top_k": "3"}, top_k=3),
    }
    for kind in kinds.values():
        if kind.status == 200 and kind.image is None:
            kind.image = kind.body
    return kinds


# --- The Open Inference Protocol's kinds ---------------------------------------------------------

V2 = "/v2/models/tiny/infer"
HEADER_LENGTH = "Inference-Header-Content-Length"
ROW_VALUES = 3 * 32 * 32  # one row of the tiny model's input, [N, 3, 32, 32] FP32


def v2(body: bytes | None, status: int = 400, words: str = "", **fields) -> Kind:
    """A V2 infer request for model tiny, JSON unless `content_type` says otherwise."""
    return Kind(fields.pop("content_type", "application/json"), body, status, words,
                **{"path": V2, "api": "v2", **fields})


def _request(*inputs: dict, outputs: list | None = None, **fields) -> bytes:
    return _json({"inputs": list(inputs), **({"outputs": outputs} if outputs is not None else {}), **fields})


def _tensor(shape: list, data=None, name: str = "input", datatype: str = "FP32", **parameters) -> dict:
    """An input tensor; without `data` its values are the binary data after the header."""
    entry = {"name": name, "shape": shape, "datatype": datatype, "parameters": parameters}
    if data is not None:
        entry["data"] = data
    return entry


def _row_with(index: int, bad) -> list:
    """One row of zeros but for `bad` at `index`."""
    data = [0.0] * ROW_VALUES
    data[index] = bad
    return data


def _with_binary(header: bytes, data: bytes) -> dict:
    """A binary-extension body's fields: the header, then `data`, and the header's length."""
    return {"body": header + data, "headers": {HEADER_LENGTH: str(len(header))},
            "content_type": "application/octet-stream"}


def _serialized(*elements: bytes) -> bytes:
    """Triton's BYTES serialisation: each element's 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _raw(path: str, headers: str, body: bytes = b"", version: str = "1.1") -> bytes:
    """A whole POST request, as `exchange` sends it."""
    return f"POST {path} HTTP/{version}\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode() + body


def _chunked(body: bytes) -> bytes:
    return b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"


def tensor_answer(expected: np.ndarray, request_id: str | None = None) -> Callable[[dict], None]:
    """A V2 answer's check: the model's output tensor (in JSON, or binary as `send` reads it)
    equal to `expected`, and the request's id echoed."""
    def check(body: dict) -> None:
        assert (body["model_name"], body["model_version"], body.get("id")) == ("tiny", "1", request_id), body
        (output,) = body["outputs"]
        assert (output["name"], output["datatype"], output["shape"]) == ("logits", "FP32", list(expected.shape))
        np.testing.assert_allclose(np.reshape(output["data"], expected.shape), expected, rtol=0, atol=1e-5)
    return check


def classes_answer(probabilities: list[np.ndarray], k: int) -> Callable[[dict], None]:
    """A V2 answer's check for the classification extension: each row's top `k` classes as
    "score:index:label", the score being the probability /predict answers."""
    def check(body: dict) -> None:
        (output,) = body["outputs"]
        assert (output["datatype"], output["shape"]) == ("BYTES", [len(probabilities), k]), output
        for row, probs in enumerate(probabilities):
            entries = [entry.split(":") for entry in output["data"][row * k:(row + 1) * k]]
            expected = np.argsort(-probs, kind="stable")[:k].tolist()
            assert [int(index) for _, index, _ in entries] == expected, (entries, expected)
            assert [label for _, _, label in entries] == [f"class_{i}" for i in expected], entries
            assert all(abs(float(score) - probs[int(index)]) <= 1e-5 for score, index, _ in entries), entries
    return check


def equals(expected: dict) -> Callable[[dict], None]:
    def check(body: dict) -> None:
        assert body == expected, body
    return check


def v2_kinds(direct: DirectModel) -> dict[str, Kind]:
    """The V2 infer requests of the storm (README, "The Open Inference Protocol"), and its health
    routes as KServe's client reads them."""
    photo = encode(photo_like(160, 120, seed=31), "JPEG", quality=90)
    png = encode(photo_like(120, 160, seed=32), "PNG")
    bomb = encode(Image.new("L", (3000, 3000)), "PNG")
    rows = np.stack([direct.tensor(photo), direct.tensor(png)])
    logits = direct.session.run(None, {direct.spec.input_name: rows})[0]
    zeros = [0.0] * ROW_VALUES
    one_row = [1, 3, 32, 32]
    as_json = [{"name": "logits", "parameters": {"binary_data": False}}]
    binary_rows = _request(_tensor([2, 3, 32, 32], binary_data_size=rows.nbytes), outputs=as_json)
    nan_row = np.zeros(one_row, np.float32)
    nan_row.flat[7] = np.nan
    images = _serialized(photo, png)
    fp32_json = _request(_tensor(one_row, rows[:1].tolist()))  # nested, as the protocol allows
    kinds = {
        # Bodies the JSON decoder refuses, or that are not an inference request.
        "v2 invalid json": v2(b'{"inputs": [{"name": "input"', words="not valid JSON"),
        "v2 nesting deeper than the decoder follows": v2(
            b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": '
            + b"[" * 50_000 + b"]" * 50_000 + b"}]}", words="nests its JSON too deeply"),
        "v2 inputs not an array": v2(_json({"inputs": {"name": "input"}}), words="expected `array`"),
        "v2 without inputs": v2(_json({"outputs": []}), words="missing required field `inputs`"),
        "v2 two inputs": v2(_request(_tensor(one_row, zeros), _tensor(one_row, zeros)), words="has 2 inputs"),
        # No header length: the whole body is the tensor's rows (a raw binary request).
        "v2 empty body": v2(b"", words="got 0 bytes"),
        # Values FP32 cannot hold, and another datatype.
        "v2 fp32 beyond float32": v2(_request(_tensor(one_row, _row_with(0, 1e39))),
                                     words="element 0 of data is 1e+39"),
        "v2 fp32 as a string": v2(_request(_tensor(one_row, _row_with(5, "1.5"))),
                                  words="element 5 of data is '1.5'"),
        "v2 fp32 null": v2(_request(_tensor(one_row, _row_with(ROW_VALUES - 1, None))),
                           words="element 3071 of data is None"),
        "v2 fp32 boolean": v2(_request(_tensor(one_row, _row_with(7, True))), words="element 7 of data is True"),
        "v2 uint8 to an fp32 model": v2(_request(_tensor(one_row, [300] * ROW_VALUES, datatype="UINT8")),
                                        words="is UINT8; the model takes FP32"),
        "v2 nan in binary data": v2(**_with_binary(_request(_tensor(one_row, binary_data_size=nan_row.nbytes)),
                                                   nan_row.tobytes()), words="element 7 of the binary data is nan"),
        # Shapes: row counts and element counts past int64, and out of the batch bound.
        "v2 rows overflowing int64": v2(_request(_tensor([2 ** 56 + 1, 3, 32, 32], zeros)),
                                        words="has 72057594037927937 rows"),
        "v2 element count wrapping int64": v2(_request(_tensor([1, 3, 2 ** 61, 8], zeros)),
                                              words="has shape [1, 3, 2305843009213693952, 8]"),
        "v2 rows over the batch bound": v2(_request(_tensor([9, 3, 32, 32], zeros)),
                                           words="has 9 rows (shape [9, 3, 32, 32]); model 'tiny' takes 1 to 8"),
        "v2 zero rows": v2(_request(_tensor([0, 3, 32, 32], [])), words="has 0 rows"),
        "v2 data not matching the shape": v2(_request(_tensor([2, 3, 32, 32], zeros)),
                                             words="holds 6144 values, data has 3072"),
        # Parameters of the wrong type, or of extensions Cronnx lacks.
        "v2 binary_data_size as a string": v2(**_with_binary(
            _request(_tensor(one_row, binary_data_size=str(rows[0].nbytes))), rows[0].tobytes()),
            words="parameter 'binary_data_size' must be an integer"),
        "v2 classification as a boolean": v2(_request(_tensor(one_row, zeros), outputs=[
            {"name": "logits", "parameters": {"classification": True}}]),
            words="parameter 'classification' must be an integer"),
        "v2 classification zero": v2(_request(_tensor(one_row, zeros), outputs=[
            {"name": "logits", "parameters": {"classification": 0}}]), words="must be a positive integer, got 0"),
        "v2 binary_data_output as a string": v2(_request(_tensor(one_row, zeros),
                                                         parameters={"binary_data_output": "false"}),
                                                words="parameter 'binary_data_output' must be a boolean"),
        "v2 sequence id": v2(_request(_tensor(one_row, zeros), parameters={"sequence_id": 7}),
                             words="not stateful sequences"),
        "v2 shared memory": v2(_request(_tensor(one_row, shared_memory_region="r0")),
                               words="shared-memory extension is not supported"),
        "v2 priority beyond the model's levels": v2(_request(_tensor(one_row, zeros), parameters={"priority": 1}),
                                                    words="priority 1 is out of range for model 'tiny'"),
        "v2 timeout the model does not allow": v2(_request(_tensor(one_row, zeros), parameters={"timeout": 1000}),
                                                  words="does not let a request set its queue timeout"),
        # Names and routes.
        "v2 unknown input": v2(_request(_tensor(one_row, zeros, name="pixels")), words="unknown input 'pixels'"),
        "v2 unknown output": v2(_request(_tensor(one_row, zeros), outputs=[{"name": "probs"}]),
                                words="unknown output 'probs'"),
        "v2 unknown model": v2(fp32_json, 404, "unknown model 'nope'", path="/v2/models/nope/infer",
                               model_label="_unknown"),
        "v2 unknown version": v2(fp32_json, 404, "version 7 of model 'tiny' is not served",
                                 path="/v2/models/tiny/versions/7/infer", model_label="_unknown"),
        "v2 version 0": v2(fp32_json, 404, "version 0 of model 'tiny' is not served",
                           path="/v2/models/tiny/versions/0/infer", model_label="_unknown"),
        "v2 get on infer": v2(None, 405, "method not allowed", method="GET", content_type=None, counted=False),
        # Encoded images (BYTES) that are not images.
        "v2 bytes that are not images": v2(_request(_tensor([1], [_b64(b"hello, world")], "IMAGE", "BYTES")),
                                           words="not an image"),
        "v2 bytes not base64": v2(_request(_tensor([1], ["not*base64!"], "IMAGE", "BYTES")),
                                  words="not valid base64"),
        "v2 bytes not strings": v2(_request(_tensor([1], [12345], "IMAGE", "BYTES")),
                                   words="each element is an image's base64 string"),
        "v2 bytes decompression bomb": v2(**_with_binary(_request(_tensor(
            [1], name="IMAGE", datatype="BYTES", binary_data_size=len(bomb) + 4)), _serialized(bomb)),
            status=413, words="too large"),
        "v2 bytes element past the binary data": v2(**_with_binary(_request(_tensor(
            [1], name="IMAGE", datatype="BYTES", binary_data_size=9)), struct.pack("<I", 1000) + b"short"),
            words="an element of 1000 bytes runs past the binary data"),
        "v2 bytes fewer than the shape": v2(_request(_tensor([2], [_b64(photo)], "IMAGE", "BYTES")),
                                            words="has shape [2] but 1 elements"),
        # The binary data extension's framing.
        "v2 binary data shorter than declared": v2(**_with_binary(binary_rows, rows.tobytes()[:100]),
                                                   words="declares binary_data_size 24576, but the binary data "
                                                         "after the JSON header is 100 bytes"),
        "v2 header length beyond the body": v2(binary_rows, headers={HEADER_LENGTH: "99999999"},
                                               words="it must be an integer between 0 and the body's length"),
        "v2 header length not a number": v2(binary_rows, headers={HEADER_LENGTH: "abc"},
                                            words="Inference-Header-Content-Length is 'abc'"),
        "v2 raw binary of part of a row": v2(b"\0" * 100, headers={HEADER_LENGTH: "0"},
                                             content_type="application/octet-stream", words="whole rows"),
        "v2 body over the limit": v2(b"{" + b" " * BODY_LIMIT + b"}", 413, "larger than the limit"),
        # Headers.
        "v2 unknown content-encoding": v2(fp32_json, 415, "Content-Encoding 'compress'",
                                          headers={"Content-Encoding": "compress"}),
        "v2 gzip that is not gzip": v2(fp32_json, 400, "cannot be read", headers={"Content-Encoding": "gzip"}),
        "v2 expect something-else": v2(None, 417, "unsupported Expect 'something-else'", raw=_raw(
            V2, "Content-Type: application/json\r\nContent-Length: 10\r\nExpect: something-else\r\n")),
        "v2 gzip, chunked": v2(None, 501, "Transfer-Encoding 'gzip, chunked' is not implemented", raw=_raw(
            V2, "Content-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n",
            _chunked(gzip.compress(fp32_json)))),
        "v2 http/1.0 with transfer-encoding": v2(None, 400, "HTTP/1.0 request cannot carry Transfer-Encoding",
                                                 raw=_raw(V2, "Transfer-Encoding: chunked\r\n",
                                                          _chunked(fp32_json), version="1.0")),
        # Odd but valid: each answered as a direct run.
        "v2 jpeg as bytes with classification": v2(_request(_tensor([1], [_b64(photo)], "IMAGE", "BYTES"), outputs=[
            {"name": "logits", "parameters": {"classification": 3}}]), 200,
            check=classes_answer([direct.probabilities(photo)], 3)),
        "v2 two images as binary bytes": v2(**_with_binary(_request(_tensor(
            [2, 1], name="IMAGE", datatype="BYTES", binary_data_size=len(images)), outputs=as_json), images),
            status=200, check=tensor_answer(logits)),
        "v2 fp32 nested in json with an id": v2(_request(_tensor(one_row, rows[:1].tolist()), id="storm-7"), 200,
                                                check=tensor_answer(logits[:1], "storm-7")),
        "v2 fp32 binary to version 1": v2(**_with_binary(binary_rows, rows.tobytes()), status=200,
                                          path="/v2/models/tiny/versions/1/infer", check=tensor_answer(logits)),
        "v2 raw binary, answered binary": v2(rows.tobytes(), 200, headers={HEADER_LENGTH: "0"},
                                             content_type="application/octet-stream", check=tensor_answer(logits)),
        "v2 real gzip": v2(gzip.compress(fp32_json), 200, headers={"Content-Encoding": "gzip"},
                           check=tensor_answer(logits[:1])),
        "v2 chunked binary": v2(**_with_binary(binary_rows, rows.tobytes()), status=200, chunked=True,
                                check=tensor_answer(logits)),
        "v2 parameters of the client's own": v2(_request(_tensor(one_row, rows[:1].tolist(), note="mine"),
                                                         parameters={"custom": [1, "x"], "priority": 0}),
                                                200, check=tensor_answer(logits[:1])),
        # Health and readiness, with the bodies KServe's client reads.
        "v2 health live": Kind(None, None, 200, method="GET", path="/v2/health/live", counted=False,
                               check=equals({"live": True})),
        "v2 health ready": Kind(None, None, 200, method="GET", path="/v2/health/ready", counted=False,
                                check=equals({"ready": True})),
        "v2 model ready": Kind(None, None, 200, method="GET", path="/v2/models/tiny/ready", counted=False,
                               check=equals({"name": "tiny", "ready": True})),
    }
    assert len(rows.tobytes()) == 24576 and len(b"{" + b" " * BODY_LIMIT + b"}") > BODY_LIMIT
    return kinds


# --- Sending -----------------------------------------------------------------------------------

async def send(session: aiohttp.ClientSession, base: str, kind: Kind) -> tuple[int, dict | str]:
    if kind.raw is not None:
        status, _, body = await asyncio.to_thread(exchange, base, [kind.raw])
        return status, body
    headers = dict(kind.headers)
    if kind.content_type is not None:
        headers["Content-Type"] = kind.content_type
    data = kind.body
    if kind.chunked:
        async def pieces(body=kind.body, size=16 * 1024):
            for start in range(0, len(body), size):
                yield body[start:start + size]
        data = pieces()
    async with session.request(kind.method, base + kind.path, data=data, params=kind.params or None,
                               headers=headers) as response:
        raw = await response.read()
        header_length = response.headers.get(HEADER_LENGTH)
        if kind.chunked:
            assert "Content-Length" not in response.request_info.headers
    try:
        return response.status, json.loads(raw) if header_length is None else _binary_answer(raw, int(header_length))
    except ValueError:
        return response.status, raw.decode(errors="replace")  # not JSON: the assertion shows it


def _binary_answer(raw: bytes, header_length: int) -> dict:
    """A V2 answer with binary outputs: its JSON header, each binary output's values (FP32, the
    tiny model's datatype) read into its `data`, as a JSON answer holds them."""
    answer = json.loads(raw[:header_length])
    offset = header_length
    for output in answer["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            output["data"] = np.frombuffer(raw[offset:offset + size], np.float32).tolist()
            offset += size
    assert offset == len(raw), f"{len(raw) - offset} bytes after the outputs"
    return answer


class GoodTraffic:
    """GOOD_STREAMS clients sending good requests back to back (raw JPEG, raw PNG, JSON), each
    reply kept with its times; bounded in count, stopped when the storm is over."""

    def __init__(self, url: str, bodies: list[tuple[str, bytes, bytes]]):
        self.url, self.bodies = url, bodies
        self.replies: list[tuple[int, Reply, float, float]] = []  # body index, reply, sent, answered
        self._stop = asyncio.Event()
        self.first_answer = asyncio.Event()

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            await asyncio.gather(*(self._stream(session, s) for s in range(GOOD_STREAMS)))

    async def _stream(self, session: aiohttp.ClientSession, stream: int) -> None:
        for n in range(GOOD_MAX_PER_STREAM):
            if self._stop.is_set():
                return
            index = (n + stream) % len(self.bodies)
            content_type, body, _ = self.bodies[index]
            sent = time.monotonic()
            async with session.post(self.url, data=body, headers={"Content-Type": content_type}) as r:
                reply = Reply(r.status, await r.json(content_type=None), r.headers)
            self.replies.append((index, reply, sent, time.monotonic()))
            self.first_answer.set()

    def stop(self) -> None:
        self._stop.set()


# --- The test ----------------------------------------------------------------------------------

# The direct run reads the odd EXIF too, and Pillow warns of the tag that runs past the file.
@pytest.mark.filterwarnings("ignore:Tag data larger than file:UserWarning")
# The server process serving HTTP itself, and two front processes that read and decode every
# request and pass the rest to it (tests/http/test_placements.py compares the two directly).
@pytest.mark.parametrize("front_processes", [1, 2], ids=["one process", "two front processes"])
def test_storm_of_hostile_requests_beside_good_traffic(start_server, tiny_model, front_processes):
    config = server_config(model_entry("tiny", tiny_model, ring_slots=512, batch_size=8),
                           max_body_bytes=BODY_LIMIT, max_image_pixels=PIXEL_LIMIT, request_timeout_s=30,
                           front_processes=front_processes)
    config["server"]["admin"] = {"enabled": True, "token": TOKEN}
    server = start_server(config)
    direct = DirectModel(tiny_model)
    kinds = storm_kinds()
    assert len([k for k in kinds.values() if k.status != 200]) >= 25
    extra = v2_kinds(direct)
    assert len([k for k in extra.values() if k.status != 200]) >= 40 and not set(extra) & set(kinds)
    kinds.update(extra)

    good_photo = encode(photo_like(320, 240, seed=1), "JPEG", quality=90)
    good_png = encode(photo_like(200, 150, seed=2), "PNG")
    good_bodies = [("image/jpeg", good_photo, good_photo), ("image/png", good_png, good_png),
                   ("application/json", _json({"image": _b64(good_photo)}), good_photo)]
    expected_good = [direct.probabilities(image) for _, _, image in good_bodies]

    # Every copy of every kind, shuffled so that the kinds interleave, sent at once.
    order = [name for name in kinds for _ in range(COPIES)]
    random.Random(STORM_SEED).shuffle(order)
    sequential = list(kinds)
    random.Random(STORM_SEED + 1).shuffle(sequential)

    async def main():
        good = GoodTraffic(f"{server.url}/predict/tiny", good_bodies)
        stream = asyncio.create_task(good.run())
        await asyncio.wait_for(good.first_answer.wait(), 30)
        connector = aiohttp.TCPConnector(limit=0)  # every request on the wire at once
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as session:
            storm_start = time.monotonic()
            answers = await asyncio.gather(*(send(session, server.url, kinds[name]) for name in order))
            storm_end = time.monotonic()
        # Then every kind in turn on one keep-alive connection: an error answered before its body
        # was read (413, 415, a bad top_k) must not leave that body to be read as the next request.
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=1)) as session:
            answers += [await send(session, server.url, kinds[name]) for name in sequential]
        good.stop()
        await asyncio.wait_for(stream, 60)
        return answers, good, storm_start, storm_end

    answers, good, storm_start, storm_end = asyncio.run(main())

    # Each request got its documented status and, for errors, a JSON error naming the problem.
    problems = []
    assert len(answers) == len(order) + len(sequential)
    order += sequential
    for name, (status, body) in zip(order, answers):
        kind = kinds[name]
        if status != kind.status or not isinstance(body, dict):
            problems.append((name, status, body))
        elif status == 200:
            try:
                if kind.check is not None:
                    kind.check(body)
                else:
                    assert body["model"] == "tiny" and body["version"] == 1
                    assert_matches(body, direct.probabilities(kind.image), top_k=kind.top_k)
            except AssertionError as exc:
                problems.append((name, status, f"wrong answer: {exc}"))
        elif set(body) != {"error"} or kind.words.lower() not in body["error"].lower():
            problems.append((name, status, body))
    assert not problems, problems

    # The good stream ran through the storm and every answer is right.
    assert good.replies, "no good request was answered"
    for index, reply, _, _ in good.replies:
        assert reply.status == 200, reply
        assert_matches(reply.body, expected_good[index])
    during = [r for r in good.replies if r[2] < storm_end and r[3] > storm_start]
    assert during, "no good request overlapped the storm: it proved nothing"
    assert len(good.replies) < GOOD_STREAMS * GOOD_MAX_PER_STREAM, "the good stream ran out before the storm ended"

    # Nothing left in use, every inference request counted once, by API, model, version and outcome.
    described = server.models()["tiny"]
    assert described["workers"] and all(w["slots_in_use"] == 0 for w in described["workers"]), described
    assert all(w["restarts"] == 0 and w["live"] for w in described["workers"]), described
    expected_counts: dict[tuple[str, str, str, str], int] = {}
    for name in order:
        kind = kinds[name]
        if kind.counted:
            key = (kind.api, kind.model_label, "1" if kind.model_label == "tiny" else "",
                   "success" if kind.status == 200 else str(kind.status))
            expected_counts[key] = expected_counts.get(key, 0) + 1
    good_key = ("predict", "tiny", "1", "success")
    expected_counts[good_key] = expected_counts.get(good_key, 0) + len(good.replies)
    expected_total = sum(1 for n in order if kinds[n].counted) + len(good.replies)
    # A front process reports each request to the server process after answering it: wait until
    # all are counted (at once with one process).
    wait_until(lambda: total(scrape(server.url), "cronnx_requests_total") >= expected_total, timeout_s=10,
               what="every request counted")
    samples = scrape(server.url)
    assert value(samples, "cronnx_in_flight_requests") == 0
    assert total(samples, "cronnx_ring_slots_in_use") == 0
    counted = {tuple(dict(labels)[label] for label in ("api", "model", "version", "outcome")): v
               for (metric, labels), v in samples.items() if metric == "cronnx_requests_total" and v}
    assert counted == expected_counts
    assert total(samples, "cronnx_requests_total") == expected_total

    # A clean stop: exit 0, no process of the server alive (workers and front processes are its
    # children), no shared memory left.
    pid = server.proc.pid
    descendants = _descendants(pid)
    assert set(server.worker_pids("tiny")) <= set(descendants)
    fronts = server.get("/models")[1]["front_processes"]
    assert fronts["count"] == front_processes and fronts["restarts"] == 0, fronts
    assert len(fronts["pids"]) == (front_processes if front_processes > 1 else 0), fronts
    assert set(fronts["pids"]) <= set(descendants), (fronts, descendants)
    assert shm_segments(pid), "the server had no segments to clean up: the check below proves nothing"
    assert server.stop() == 0, server.log()[-3000:]
    wait_until(lambda: not any(pid_alive(p) for p in descendants), timeout_s=10, what="the server's processes to end")
    assert shm_segments(pid) == []


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo and len(found) < 1000:
        for kid in children_of(todo.pop()):
            found.append(kid)
            todo.append(kid)
    return found


# --- Malformed HTTP below the application ------------------------------------------------------
#
# Not part of the storm above: each request here breaks HTTP itself, on one connection of its own,
# with aiohttp's C parser (the default), with its pure-Python one, and through front processes.

HTTP_TIMEOUT_S = 2  # the request timeout of these servers: a hang shows as a 408 after it


def _http_server(tmp_path_factory, tiny_model, name: str, env: dict[str, str], **server):
    from support.server import ServerProcess

    process = ServerProcess(tmp_path_factory.mktemp(name), server_config(
        model_entry("tiny", tiny_model), max_body_bytes=BODY_LIMIT, request_timeout_s=HTTP_TIMEOUT_S, **server))
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the server process inherits this environment
    try:
        process.start()
    except BaseException:
        process.cleanup()
        raise
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
    return process


@pytest.fixture(scope="module")
def http_servers(tmp_path_factory, tiny_model):
    """The same server with aiohttp's C HTTP parser (the default), with its pure-Python one (what
    runs where the C extension is not built: AIOHTTP_NO_EXTENSIONS=1), and with two front
    processes (C parser), whose connections are theirs, not the server process's."""
    servers = {}
    try:
        servers["c"] = _http_server(tmp_path_factory, tiny_model, "http-c", {})
        servers["python"] = _http_server(tmp_path_factory, tiny_model, "http-python", {"AIOHTTP_NO_EXTENSIONS": "1"})
        servers["fronts"] = _http_server(tmp_path_factory, tiny_model, "http-fronts", {}, front_processes=2)
        yield servers
    finally:
        for server in servers.values():
            server.cleanup()


def exchange(url: str, parts: list[bytes], pause_s: float = 0.0) -> tuple[int, dict[str, str], dict | str]:
    """Send `parts` on one connection (`pause_s` between them) and read the answer: its status,
    headers (lower-case names) and body (parsed when JSON)."""
    address = urlparse(url)
    with socket.create_connection((address.hostname, address.port), timeout=HTTP_TIMEOUT_S + 8) as connection:
        for i, part in enumerate(parts):
            if i:
                time.sleep(pause_s)
            connection.sendall(part)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < _answer_size(answer):
            data = connection.recv(65536)
            if not data:
                break
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    try:
        return int(status_line.split(" ", 2)[1]), headers, json.loads(body)
    except ValueError:
        return int(status_line.split(" ", 2)[1]), headers, body.decode(errors="replace")


def _answer_size(answer: bytes) -> int:
    head, _, _ = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, length = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + 4 + int(length)
    return 1 << 30  # no length: read until the server closes


HEAD = b"POST /predict/tiny HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
# name: the request in parts, sent 0.3 s apart. The first seven are refused by aiohttp's parser
# before any handler runs (cronnx/http/connection.py answers them); in the next two the framing
# breaks while the handler reads the body (with the C parser that body was never ended: a 408
# after the request timeout, before http/connection.py ended it with the parser's error).
MALFORMED = {
    "content-length not a number": [HEAD + b"Content-Length: abc\r\n\r\nabc"],
    "two content-lengths": [HEAD + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"],
    "content-length and chunked": [HEAD + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   b"3\r\nabc\r\n0\r\n\r\n"],
    "header over 8190 bytes": [HEAD + b"X-Long: " + b"a" * 9000 + b"\r\nContent-Length: 0\r\n\r\n"],
    "control character in a header": [HEAD + b"X-Request-ID: a\x01b\r\nContent-Length: 3\r\n\r\nabc"],
    "not an http request line": [b"HELLO THERE\r\n\r\n"],
    "bad chunk size with the headers": [CHUNKED + b"zz\r\nabc\r\n0\r\n\r\n"],
    "bad chunk size after the headers": [CHUNKED, b"zz\r\nabc\r\n0\r\n\r\n"],
    "chunk longer than its size after the headers": [CHUNKED, b"3\r\nabcdef\r\n0\r\n\r\n"],
    # Control: a body the handler reads and cannot decode.
    "gzip that is not gzip after the headers": [
        HEAD + b"Content-Encoding: gzip\r\nConnection: close\r\nContent-Length: 10\r\n\r\n", b"notgzip!!!"],
}


@pytest.mark.parametrize("parser", ["c", "python", "fronts"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_http_gets_a_json_400(http_servers, case, parser):
    server = http_servers[parser]
    status, headers, body = exchange(server.url, MALFORMED[case], pause_s=0.3)
    assert status == 400 and isinstance(body, dict) and set(body) == {"error"} and body["error"], (status, body)
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert re.fullmatch(r"[0-9a-f]{32}", headers.get("x-request-id", "")), headers  # none sent: a new one
    # And the server serves on.
    photo = encode(photo_like(64, 48, seed=3), "JPEG")
    status, _, body = exchange(server.url, [HEAD + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(photo)
                                            + photo])
    assert status == 200 and len(body["predictions"]) == 5, body
