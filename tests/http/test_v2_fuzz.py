"""Property-based fuzzing (hypothesis) of the Open Inference Protocol's infer through a live server.

Each example is one V2 request drawn whole: the route (a served model of each input datatype, a
version, or one not served), the headers (Content-Type, Inference-Header-Content-Length absent,
right or wrong, Content-Encoding), the input (the model's own tensor in JSON, nested JSON, binary
data or a raw binary body; or encoded images as BYTES), its datatype, shape and values (ordinary,
the extremes each datatype holds, and values it cannot hold), and parameters of every JSON type
at each level. The generator keeps what the README says of what it drew, so each answer is
checked against that reading:

- a request the README refuses gets that status (400, 404; 413 for a decompression bomb) with a
  JSON {"error": ...} body;
- any other gets 200 with one row per input row, each output as asked (the tensor, in JSON or
  binary, or the classification extension's top classes), equal to a direct onnxruntime run,
  every number finite; or, where the direct run in float64 shows the model's scores past its
  output datatype's range, the README's 500 for non-finite scores, and no other 500.

A request holds at most one fault, so that each can be told from the others: 40 examples hold
none, and each fault of FAULTS gets a test of its own with two (drawn among all of them, 100
derandomised examples tried a handful of faults many times and most of them never). After
each test the server is healthy: a good request is answered, no slot is in use, every request
was counted, and the only 500s it counted are those above. Examples are derandomised as in
test_fuzz.py (the same every run); set CRONNX_FUZZ_RANDOM=1 to explore new ones.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import os
import struct
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from PIL import Image

from support.images import encode, photo_like
from support.metrics import scrape, total, value
from support.models import image_classifier
from support.reference import DirectModel
from support.server import ServerProcess, model_entry, server_config

pytestmark = pytest.mark.server

SIZE, BATCH, CLASSES = 4, 4, 10
ITEM = [3, SIZE, SIZE]
ROW = 3 * SIZE * SIZE
PIXEL_LIMIT = 1_000_000
HEADER_LENGTH = "Inference-Header-Content-Length"
# A served model of each input datatype the protocol's tensors may have (README: FP32, FP16, UINT8).
DTYPES = {"fp32": "float32", "fp16": "float16", "uint8": "uint8"}
DATATYPES = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8"}
OUTPUT = "scores"  # support.models.image_classifier's output


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("v2-fuzz-models")
    return {name: image_classifier(folder / f"{name}.onnx", size=SIZE, dtype=dtype) for name, dtype in DTYPES.items()}


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_paths):
    """One server for the module, started and cleaned up like `start_server`'s."""
    models = [model_entry(name, path, batch_size=BATCH) for name, path in model_paths.items()]
    with ServerProcess.running(tmp_path_factory.mktemp("v2-fuzz-server"), server_config(*models, max_image_pixels=PIXEL_LIMIT)) as server:
        yield server


class Reference:
    """Each model run directly by onnxruntime, and what the README says a served request answers."""

    def __init__(self, paths: dict):
        self.direct = {name: DirectModel(path) for name, path in paths.items()}
        self.weights = {name: _weights(path) for name, path in paths.items()}

    def rows_of_images(self, model: str, images: list[bytes]) -> np.ndarray:
        return np.stack([self.direct[model].tensor(image) for image in images])

    def scores(self, model: str, rows: np.ndarray) -> np.ndarray:
        direct = self.direct[model]
        return direct.session.run(None, {direct.spec.input_name: rows})[0]

    def overflow(self, model: str, rows: np.ndarray) -> str:
        """Whether the model's scores for `rows` leave its output datatype's range: "no" (the
        served scores must be finite), "yes" (they cannot be: the README's 500), or "maybe"
        (within rounding of the edge). Worked out in float64 from the model's weights (a linear
        classifier): no partial sum can pass |x| @ |w|, and a sum past twice the range stays
        past it."""
        flat = rows.reshape(len(rows), -1).astype(np.float64)
        weights = self.weights[model]
        limit = float(np.finfo(np.float16 if DTYPES[model] == "float16" else np.float32).max)
        if (np.abs(flat) @ np.abs(weights)).max() < limit / 2:
            return "no"
        return "yes" if np.abs(flat @ weights).max() > 2 * limit else "maybe"


def _weights(path) -> np.ndarray:
    (weights,) = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.name == "w"]
    return weights.astype(np.float64)


@pytest.fixture(scope="module")
def reference(model_paths) -> Reference:
    return Reference(model_paths)


# --- Drawing requests ----------------------------------------------------------------------------

@dataclass
class Drawn:
    """One request and what the README says of it. `faults`: what in it the README refuses
    (none: it is served); `refusal`: the status of that refusal; `image_statuses`: the statuses
    of its images that cannot be served (any of them answers: the rows run at once);
    `rows`/`images`: a served request's input; `outputs`: per output answered, (classification
    count, None for the tensor; binary)."""

    model: str
    path: str
    body: bytes
    headers: dict[str, str | bytes]
    refusal: int | None = None
    image_statuses: set[int] = field(default_factory=set)
    rows: np.ndarray | None = None
    images: list[bytes] | None = None
    outputs: list[tuple[int | None, bool]] = field(default_factory=list)
    request_id: str | None = None
    faults: list[str] = field(default_factory=list)


F32_MAX = float(np.finfo(np.float32).max)
F16_MAX = float(np.finfo(np.float16).max)
# Values each datatype holds: ordinary ones, and its extremes.
ORDINARY = {"float32": st.floats(-4, 4, width=32), "float16": st.floats(-4, 4, width=16),
            "uint8": st.integers(0, 255)}
EXTREME = {"float32": st.sampled_from([F32_MAX, -F32_MAX, 1e38, -1e30, 2.0 ** -149, -0.0]),
           # 65519 rounds to 65504: held (65520 would round to infinity).
           "float16": st.sampled_from([F16_MAX, -F16_MAX, 65519.0, 2.0 ** -24, -0.0]),
           "uint8": st.sampled_from([0, 255])}
# Values JSON data of the datatype cannot hold (README: no null, string or boolean, within range;
# NaN and Infinity are not even JSON).
NOT_HELD = {"float32": st.sampled_from([1e39, -1e39, 3.4028235677973366e38, None, True, False, "1.5", [], {},
                                        float("nan")]),
            "float16": st.sampled_from([65520.0, -70000.0, 1e39, None, True, "2", {}, float("inf")]),
            "uint8": st.sampled_from([256, -1, 1.5, 255.0, 2 ** 70, None, False, "7", []])}
OTHER_DATATYPES = ["FP32", "FP16", "UINT8", "INT64", "BOOL", "BYTES", "fp32", ""]
TEXT = st.characters(blacklist_categories=("Cs",))  # what a JSON string can hold
# Any JSON value, for the parameters the protocol leaves to the client.
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
              st.floats(allow_nan=False, allow_infinity=False), st.text(TEXT, max_size=6)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(TEXT, max_size=4), inner, max_size=3),
    max_leaves=6)
NOT_BOOLEAN = st.sampled_from([0, 1, "true", None, [], {}, 1.0])
NOT_INTEGER = st.sampled_from([True, False, "3", 3.0, 2.5, None, [3], {}, -1, 2 ** 63])
# The parameters the protocol and Triton's extensions type, at each level: (values taken, or None
# for an extension Cronnx lacks; values refused). README: a model without priority levels takes
# priority 0 only (its default), and a model without allow_timeout_override timeout 0 only.
TYPED = {
    "request": {"binary_data_output": (st.booleans(), NOT_BOOLEAN),
                "priority": (st.just(0), st.one_of(st.integers(1, 200), NOT_INTEGER)),
                "timeout": (st.just(0), st.one_of(st.integers(1, 10 ** 6), NOT_INTEGER)),
                "sequence_id": (None, st.one_of(st.integers(0, 9), st.text(TEXT, max_size=3), NOT_INTEGER)),
                "sequence_start": (None, st.one_of(st.booleans(), NOT_BOOLEAN))},
    "input": {"shared_memory_region": (None, st.one_of(st.text(TEXT, max_size=3), NOT_INTEGER)),
              "shared_memory_offset": (None, st.integers(0, 64))},
    "output": {"binary_data": (st.booleans(), NOT_BOOLEAN),
               "classification": (st.integers(1, 12), st.one_of(st.just(0), NOT_INTEGER)),
               "shared_memory_byte_size": (None, st.integers(0, 64))},
}


def _photo(seed: int, fmt: str) -> bytes:
    return encode(photo_like(40 + seed, 30, seed=seed), fmt, **({"quality": 90} if fmt == "JPEG" else {}))


# Encoded images, each with the status it gets (200: served), whichever model is asked.
IMAGES = {"jpeg": (_photo(1, "JPEG"), 200), "png": (_photo(2, "PNG"), 200), "gif": (_photo(3, "GIF"), 200),
          "text": (b"hello, world", 400), "truncated jpeg": (_photo(4, "JPEG")[:300], 400),
          "bomb": (encode(Image.new("L", (1100, 1100)), "PNG"), 413)}

# The one fault a request is drawn with, if any, by where it is drawn.
FAULTS = {
    "route": ["unknown model", "version 0", "version 2"],
    "tensor": ["row count", "item shape", "rank", "datatype", "input name", "value not held", "value count",
               "neither data nor binary"],
    "binary": ["binary not finite", "binary size", "binary size type", "binary shorter than the shape"],
    "images": ["bytes shape", "element not base64", "serialisation cut short"],
    "request": ["request parameter", "input parameter", "output parameter", "output name", "two inputs", "id"],
    "framing": ["header length short", "header length long", "header length beyond", "header length not a number",
                "binary without header length"],
    "raw": ["raw rows", "raw not whole rows"],
}


def _nested(flat: list, shape: list[int]) -> list:
    """`flat` as nested lists of `shape` (row-major), as the protocol allows."""
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0]
    return [_nested(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def _values(draw, dtype: str, n: int) -> list:
    """n rows of values the datatype holds: ordinary ones, some or all of them now and then its extremes."""
    values = draw(st.lists(ORDINARY[dtype], min_size=n * ROW, max_size=n * ROW))
    extremes = draw(st.sampled_from([0, 0, 0, 1, 3, n * ROW]))
    for index in draw(st.lists(st.integers(0, n * ROW - 1), min_size=extremes, max_size=extremes)):
        values[index] = draw(EXTREME[dtype])
    return values


def _as_bytes(values: list, dtype: str) -> bytes:
    with np.errstate(invalid="ignore"):  # NaN drawn into a float's binary data
        return np.asarray(values, dtype).tobytes()


def _parameters(draw, drawn: Drawn, level: str, fault: str | None) -> dict:
    """Parameters at one level: the client's own, of any JSON type (ignored, as the protocol
    allows), the typed ones with values they take, and with `fault` one of the wrong type or
    of an extension Cronnx lacks."""
    parameters = draw(st.dictionaries(st.sampled_from(["custom", "note", "x-trace"]), json_values, max_size=2))
    typed = TYPED[level]
    taken = sorted(name for name, (values, _) in typed.items() if values is not None)
    if taken:
        for name in draw(st.lists(st.sampled_from(taken), max_size=2, unique=True)):
            parameters[name] = draw(typed[name][0])
    if fault == f"{level} parameter":
        name = draw(st.sampled_from(sorted(typed)))
        parameters[name] = draw(typed[name][1])
        drawn.faults.append(f"{level} parameter {name}={parameters[name]!r}")
    return parameters


def _tensor_input(draw, drawn: Drawn, dtype: str, fault: str | None) -> tuple[dict, bytes]:
    """The model's own tensor as an input entry (JSON data, flat or nested, or binary data) and
    its binary data; a served request's rows are recorded."""
    n = draw(st.integers(1, BATCH))
    values = _values(draw, dtype, n)
    shape, datatype, name = [n, *ITEM], DATATYPES[dtype], "input"
    if fault == "row count":  # out of 1..BATCH, past int64 too
        shape[0] = draw(st.sampled_from([0, -1, BATCH + 1, 2 ** 56 + 1, 2 ** 63 - 1, 2 ** 64 + 3]))
    elif fault == "item shape":
        shape[draw(st.integers(1, 3))] = draw(st.sampled_from([0, 1, SIZE + 1, -SIZE, 2 ** 61]))
    elif fault == "rank":
        shape = draw(st.sampled_from([shape[:1], shape[:3], shape + [1], []]))
    elif fault == "datatype":
        datatype = draw(st.sampled_from([d for d in OTHER_DATATYPES if d != datatype]))
    elif fault == "input name":
        name = draw(st.sampled_from(["IMAGE", "x", "Input", ""]))
    if fault in ("row count", "item shape", "rank", "datatype", "input name"):
        drawn.faults.append(f"{fault}: {name!r} {datatype} {shape}")
    entry = {"name": name, "shape": shape, "datatype": datatype,
             "parameters": _parameters(draw, drawn, "input", fault)}
    binary = b""
    if fault == "neither data nor binary":
        drawn.faults.append(fault)
    elif fault in FAULTS["binary"] + ["binary without header length"] or (
            fault not in ("value not held", "value count") and draw(st.booleans())):
        binary = _binary_data(draw, drawn, entry, values, dtype, fault)
    else:
        data = list(values)
        if fault == "value not held":
            data[draw(st.integers(0, len(data) - 1))] = draw(NOT_HELD[dtype])
        elif fault == "value count":
            data = data[:-1] if draw(st.booleans()) else data + data[:1]
        if fault in ("value not held", "value count"):
            drawn.faults.append(fault)
        entry["data"] = _nested(data, [n, *ITEM]) if len(data) == n * ROW and draw(st.booleans()) else data
    if not drawn.faults:
        drawn.rows = np.asarray(values, dtype).reshape([n, *ITEM])
    return entry, binary


def _binary_data(draw, drawn: Drawn, entry: dict, values: list, dtype: str, fault: str | None) -> bytes:
    """`values` as the binary data of `entry` (its binary_data_size set), or with `fault` not
    finite, not of the declared size, or of a size the shape does not hold."""
    if fault == "binary not finite" and dtype != "uint8":
        values = list(values)
        values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        drawn.faults.append(fault)
    binary = _as_bytes(values, dtype)
    size = len(binary)
    if fault == "binary shorter than the shape":  # binary_data_size agrees with the data
        binary = binary[:-np.dtype(dtype).itemsize]
        size = len(binary)
    elif fault == "binary size":
        size += draw(st.sampled_from([-1, 1, 10 ** 6]))
    elif fault == "binary size type":
        size = draw(st.sampled_from([str(size), float(size), True, None, [size]]))
    if fault in ("binary shorter than the shape", "binary size", "binary size type"):
        drawn.faults.append(f"binary_data_size {size!r} of {len(binary)} bytes")
    entry["parameters"]["binary_data_size"] = size
    return binary


def _images_input(draw, drawn: Drawn, fault: str | None) -> tuple[dict, bytes]:
    """Encoded images as a BYTES input (base64 in JSON, or Triton's serialisation in binary
    data); a served request's images are recorded."""
    n = draw(st.integers(1, BATCH))
    names = draw(st.lists(st.sampled_from(["jpeg", "png", "gif"] * 3 + sorted(IMAGES)), min_size=n, max_size=n))
    images = [IMAGES[name][0] for name in names]
    shape = draw(st.sampled_from([[n], [n, 1]]))
    if fault == "bytes shape":
        shape = draw(st.sampled_from([[n, 2], [n, 1, 1], [], [n + 1], [0]]))
        drawn.faults.append(f"BYTES shape {shape} for {n} images")
    # The protocol names no input for encoded images: any name is taken.
    entry = {"name": draw(st.sampled_from(["IMAGE", "input", "images", ""])), "shape": shape, "datatype": "BYTES",
             "parameters": _parameters(draw, drawn, "input", fault)}
    binary = b""
    if fault in ("serialisation cut short", "binary without header length") or (
            fault != "element not base64" and draw(st.booleans())):
        binary = b"".join(struct.pack("<I", len(image)) + image for image in images)
        if fault == "serialisation cut short":
            binary = binary[:-draw(st.integers(1, 6))]
            drawn.faults.append(fault)
        entry["parameters"]["binary_data_size"] = len(binary)
    else:
        data: list = [base64.b64encode(image).decode() for image in images]
        if fault == "element not base64":
            data[draw(st.integers(0, n - 1))] = draw(st.sampled_from(["not*base64!", "QUJ", 12345, None, {"b": ""}]))
            drawn.faults.append(fault)
        entry["data"] = [[element] for element in data] if len(shape) == 2 and draw(st.booleans()) else data
    drawn.image_statuses = {IMAGES[name][1] for name in names} - {200}
    if not drawn.faults and not drawn.image_statuses:
        drawn.images = images
    return entry, binary


def _outputs(draw, drawn: Drawn, binary_default: bool, fault: str | None) -> list | None:
    """The outputs asked for (None: the model's one output, answered as `binary_default` says)."""
    if fault not in ("output parameter", "output name") and draw(st.booleans()):
        drawn.outputs = [(None, binary_default)]
        return None
    asked = []
    for i in range(draw(st.integers(1 if fault in ("output parameter", "output name") else 0, 2))):
        name = OUTPUT
        if fault == "output name" and i == 0:
            name = draw(st.sampled_from(["logits", "probs", ""]))
            drawn.faults.append(f"output name {name!r}")
        parameters = _parameters(draw, drawn, "output", fault if i == 0 else None)
        asked.append({"name": name, "parameters": parameters})
        drawn.outputs.append((parameters.get("classification"), parameters.get("binary_data", binary_default)))
    if not asked:
        drawn.outputs = [(None, binary_default)]  # an empty list asks for the default
    return asked


def _route(draw, drawn: Drawn, fault: str | None) -> None:
    """The path: the model's, or its version 1's; with `fault` a model or version not served
    (404, whatever the body holds: the version is chosen before the body is read)."""
    drawn.path = draw(st.sampled_from([f"/v2/models/{drawn.model}/infer",
                                       f"/v2/models/{drawn.model}/versions/1/infer"]))
    if fault in FAULTS["route"]:
        drawn.path = {"unknown model": "/v2/models/nope/infer",
                      "version 0": f"/v2/models/{drawn.model}/versions/0/infer",
                      "version 2": f"/v2/models/{drawn.model}/versions/2/infer"}[fault]
        drawn.faults.append(fault)
        drawn.refusal = 404


def _raw_binary(draw, drawn: Drawn, dtype: str, fault: str | None) -> None:
    """A body that is all binary data (header length 0): N rows of the model's input, N read off
    the size; answered in binary."""
    n = BATCH + 1 if fault == "raw rows" else draw(st.integers(1, BATCH))
    values = _values(draw, dtype, n)
    body = _as_bytes(values, dtype)
    if fault == "raw not whole rows":
        body = body[:-1]
    if fault in FAULTS["raw"]:
        drawn.faults.append(fault)
    drawn.body, drawn.headers[HEADER_LENGTH] = body, "0"
    drawn.outputs = [(None, True)]
    if not drawn.faults:
        drawn.rows = np.asarray(values, dtype).reshape([n, *ITEM])


def not_digits(length: int) -> dict[str, str | bytes]:
    """Header values that Python's int() reads as `length` and HTTP does not (Content-Length is
    ASCII digits only), by how they differ."""
    digits = str(length)
    return {"sign": f"+{digits}", "underscore": f"{digits[0]}_{digits[1:]}",
            "arabic-indic digits": "".join(chr(0x660 + int(d)) for d in digits).encode()}


def _framing(draw, drawn: Drawn, header: bytes, binary: bytes, fault: str | None) -> None:
    """The body, the JSON header then the binary data, and its Inference-Header-Content-Length:
    absent (then only JSON may follow), right, or with `fault` wrong."""
    drawn.body = header + binary
    if fault == "binary without header length" and binary:
        drawn.faults.append(fault)
        return
    if fault not in FAULTS["framing"] and draw(st.booleans()) and not binary:
        return  # no header length: the body is JSON
    text = str(len(header))
    if fault == "header length short":
        text = str(len(header) - 1)
    elif fault == "header length long":  # into the binary data, or past the body
        text = str(len(header) + 1) if binary else str(len(drawn.body) + 1)
    elif fault == "header length beyond":
        text = str(len(drawn.body) + draw(st.integers(1, 10 ** 9)))
    elif fault == "header length not a number":
        text = draw(st.sampled_from(["abc", "-1", "", "1e3", "0x10", "1.0", "9" * 5000,
                                     *not_digits(len(header)).values()]))
    if fault in FAULTS["framing"] and fault != "binary without header length":
        drawn.faults.append(f"{fault}: {text!r} of {len(header)} + {len(binary)} bytes")
    drawn.headers[HEADER_LENGTH] = text


@st.composite
def v2_requests(draw, fault: str | None) -> Drawn:
    """A V2 infer request with `fault` (one of FAULTS), or with none."""
    # Binary data of a UINT8 input is always finite: that fault needs a float model.
    model = draw(st.sampled_from(["fp16", "fp32"] if fault == "binary not finite" else sorted(DTYPES)))
    drawn = Drawn(model, "", b"", {})
    _route(draw, drawn, fault)
    # The protocol's infer reads its body whatever the Content-Type says.
    content_type = draw(st.sampled_from([None, "application/json", "application/octet-stream", "text/plain",
                                         "image/jpeg", "multipart/form-data; boundary=x"]))
    if content_type is not None:
        drawn.headers["Content-Type"] = content_type
    if fault in FAULTS["raw"] or (fault is None and draw(st.integers(0, 7)) == 0):
        _raw_binary(draw, drawn, DTYPES[model], fault)
    else:
        if fault in FAULTS["images"] or (fault not in FAULTS["tensor"] + FAULTS["binary"]
                                         and draw(st.integers(0, 2)) == 0):
            entry, binary = _images_input(draw, drawn, fault)
        else:
            entry, binary = _tensor_input(draw, drawn, DTYPES[model], fault)
        request: dict = {"inputs": [entry]}
        if fault == "two inputs":
            request["inputs"].append(dict(entry))
            drawn.faults.append(fault)
        request["parameters"] = _parameters(draw, drawn, "request", fault)
        binary_default = request["parameters"].get("binary_data_output", False)
        outputs = _outputs(draw, drawn, binary_default if isinstance(binary_default, bool) else False, fault)
        if outputs is not None:
            request["outputs"] = outputs
        _request_id(draw, drawn, request, fault)
        _framing(draw, drawn, json.dumps(request).encode(), binary, fault)
    if draw(st.integers(0, 5)) == 0:  # a compressed body: the header length counts the decoded bytes
        drawn.body = gzip.compress(drawn.body)
        drawn.headers["Content-Encoding"] = "gzip"
    if drawn.refusal is None and drawn.faults:
        drawn.refusal = 400
    return drawn


def _request_id(draw, drawn: Drawn, request: dict, fault: str | None) -> None:
    """An id: none, a string (echoed), null (none echoed); with `fault` one the decoder refuses:
    not a string, or a lone surrogate (JSON's "\ud800" is no character)."""
    if fault == "id":
        request["id"] = draw(st.sampled_from([7, 1.5, True, ["x"], "\ud800"]))
        drawn.faults.append(f"id {request['id']!r}")
    elif draw(st.booleans()):
        request["id"] = drawn.request_id = draw(st.one_of(st.none(), st.text(TEXT, max_size=8)))


def _example(model: str, request: dict, binary: bytes = b"", **expected) -> Drawn:
    header = json.dumps(request).encode()
    return Drawn(model, f"/v2/models/{model}/infer", header + binary,
                 {"Content-Type": "application/json", HEADER_LENGTH: str(len(header))}, **expected)


_ROWS = np.linspace(-2, 2, 2 * ROW, dtype=np.float32).reshape([2, *ITEM])
EXAMPLES = {
    "fp32 nested json with classification": _example(
        "fp32", {"inputs": [{"name": "input", "shape": [2, *ITEM], "datatype": "FP32", "data": _ROWS.tolist()}],
                 "outputs": [{"name": OUTPUT, "parameters": {"classification": 3}}], "id": "e1"},
        rows=_ROWS, outputs=[(3, False)], request_id="e1"),
    "fp16 scores past float16": _example(
        "fp16", {"inputs": [{"name": "input", "shape": [1, *ITEM], "datatype": "FP16",
                             "parameters": {"binary_data_size": 2 * ROW}}]},
        np.full(ROW, F16_MAX, np.float16).tobytes(), rows=np.full([1, *ITEM], F16_MAX, np.float16),
        outputs=[(None, False)]),
    "bomb": _example("uint8", {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
                                           "data": [base64.b64encode(IMAGES["bomb"][0]).decode()]}]},
                     image_statuses={413}),
}


# --- Sending and checking --------------------------------------------------------------------------

class Sender:
    """One request per connection with exactly the headers drawn; remembers each status and the
    500s the README allows."""

    def __init__(self, url: str):
        parts = urlparse(url)
        self.host, self.port = parts.hostname, parts.port
        self.sent = 0
        self.statuses: set[int] = set()
        self.documented_500s = 0

    def post(self, path: str, body: bytes, headers: dict[str, str | bytes]) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            connection.request("POST", path, body=body, headers=headers)
            self.sent += 1
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()


def _answer(headers: dict[str, str], raw: bytes) -> tuple[dict, bytes]:
    """A 200's JSON (the header, with the binary data extension) and its binary data."""
    length = headers.get(HEADER_LENGTH.lower())
    if length is None:
        assert headers.get("content-type", "").startswith("application/json"), headers
        return json.loads(raw), b""
    return json.loads(raw[:int(length)]), raw[int(length):]


def _finite(value) -> bool:
    """Every number in a parsed JSON value is finite (Python's reader takes NaN and Infinity)."""
    if isinstance(value, float):
        return np.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def check_served(drawn: Drawn, answer: dict, binary: bytes, scores: np.ndarray, tolerance: float) -> None:
    """A 200: every output asked for, one row per input row, equal to `scores` (the direct run)."""
    assert _finite(answer), answer
    assert (answer["model_name"], answer["model_version"]) == (drawn.model, "1"), answer
    assert answer.get("id") == (drawn.request_id if isinstance(drawn.request_id, str) else None), answer
    assert len(answer["outputs"]) == len(drawn.outputs), (answer, drawn.outputs)
    n = len(scores)
    offset = 0
    for output, (classes, is_binary) in zip(answer["outputs"], drawn.outputs):
        assert output["name"] == OUTPUT
        if is_binary:
            size = output["parameters"]["binary_data_size"]
            part, offset = binary[offset:offset + size], offset + size
            assert "data" not in output and len(part) == size, output
        if classes is None:
            dtype = "float16" if DTYPES[drawn.model] == "float16" else "float32"  # a uint8 model answers float32
            assert (output["datatype"], output["shape"]) == (DATATYPES[dtype], [n, CLASSES]), output
            served = np.frombuffer(part, dtype) if is_binary else np.asarray(output["data"], np.float64)
            served = served.astype(np.float64).reshape(n, CLASSES)
            assert np.isfinite(served).all(), served
            np.testing.assert_allclose(served, scores, rtol=2e-3, atol=tolerance)
        else:
            k = min(classes, CLASSES)
            assert (output["datatype"], output["shape"]) == ("BYTES", [n, k]), output
            entries = _deserialized(part) if is_binary else output["data"]
            _check_classes(entries, scores, k)
    assert offset == len(binary), f"{len(binary) - offset} bytes of binary data answered nothing"


def _deserialized(data: bytes) -> list[str]:
    out, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<I", data, offset)
        out.append(data[offset + 4:offset + 4 + length].decode())
        offset += 4 + length
    return out


def _check_classes(entries: list[str], scores: np.ndarray, k: int) -> None:
    """Each row's "score:index:label" entries: the k highest probabilities (softmax of the
    scores), highest first; ties may name either class."""
    for row, logits in enumerate(scores):
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        fields = [entry.split(":") for entry in entries[row * k:(row + 1) * k]]
        served = [float(score) for score, _, _ in fields]
        assert all(label == f"class_{index}" for _, index, label in fields), fields
        assert all(abs(probabilities[int(index)] - float(score)) <= 1e-5 for score, index, _ in fields), fields
        assert served == sorted(served, reverse=True), fields
        np.testing.assert_allclose(served, np.sort(probabilities)[::-1][:k], rtol=0, atol=1e-5)


def check_answer(sender: Sender, reference: Reference, drawn: Drawn) -> None:
    status, headers, raw = sender.post(drawn.path, drawn.body, drawn.headers)
    event(f"status {status}")
    sender.statuses.add(status)
    what = (status, raw[:300], drawn.faults, drawn.path, drawn.headers)
    if drawn.refusal is not None or drawn.image_statuses:
        # Refused before any row ran, or for an image that cannot be served.
        assert status == drawn.refusal or (drawn.refusal is None and status in drawn.image_statuses), what
        answer = json.loads(raw)
        assert set(answer) == {"error"} and isinstance(answer["error"], str) and answer["error"], what
        assert headers.get("content-type", "").startswith("application/json"), what
        return
    rows = drawn.rows if drawn.rows is not None else reference.rows_of_images(drawn.model, drawn.images)
    overflow = reference.overflow(drawn.model, rows)
    event(f"scores overflow: {overflow}")
    if status == 500 and overflow != "no":
        # README: the model's scores for this input hold NaN or infinity.
        assert "non-finite scores" in json.loads(raw)["error"], what
        sender.documented_500s += 1
        return
    assert status == 200 and overflow != "yes", what
    answer, binary = _answer(headers, raw)
    scale = float((np.abs(rows.reshape(len(rows), -1).astype(np.float64))
                   @ np.abs(reference.weights[drawn.model])).max())
    check_served(drawn, answer, binary, reference.scores(drawn.model, rows).astype(np.float64),
                 tolerance=1e-5 + 1e-6 * scale)


def check_healthy(server: ServerProcess, reference: Reference, sender: Sender, counted_before: dict) -> None:
    """A good request is answered, nothing is in use, every request was counted, and the only
    500s are the README's for non-finite scores."""
    image = IMAGES["jpeg"][0]
    body = json.dumps({"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
                                   "data": [base64.b64encode(image).decode()]}]}).encode()
    status, headers, raw = sender.post("/v2/models/fp32/infer", body, {"Content-Type": "application/json"})
    assert status == 200, raw
    check_served(Drawn("fp32", "", b"", {}, outputs=[(None, False)]), *_answer(headers, raw),
                 reference.scores("fp32", reference.rows_of_images("fp32", [image])), tolerance=1e-5)
    for name, model in server.models().items():
        workers = model["workers"]
        assert workers and all(w["slots_in_use"] == 0 and w["live"] and w["restarts"] == 0 for w in workers), name
    counted = _counted(server)
    assert value(scrape(server.url), "cronnx_in_flight_requests") == 0
    assert counted["all"] - counted_before["all"] == sender.sent
    assert counted["500"] - counted_before["500"] == sender.documented_500s
    assert server.proc.poll() is None
    assert "unexpected error" not in server.log()  # what the middleware logs of a bug's 500


def _counted(server: ServerProcess) -> dict[str, float]:
    samples = scrape(server.url)
    return {"all": total(samples, "cronnx_requests_total", api="v2"),
            "500": total(samples, "cronnx_requests_total", api="v2", outcome="500")}


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, database=None,
                    derandomize=not os.environ.get("CRONNX_FUZZ_RANDOM"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_a_request_without_a_fault_is_answered_as_onnxruntime_answers(server, reference):
    sender = Sender(server.url)
    before = _counted(server)

    @fuzz_settings(40)
    @given(drawn=v2_requests(None))
    # Each outcome at least once, whatever the draw: a JSON tensor with classification (200), a
    # float16 model's scores past its range (the README's 500), a decompression bomb (413).
    @example(drawn=EXAMPLES["fp32 nested json with classification"])
    @example(drawn=EXAMPLES["fp16 scores past float16"])
    @example(drawn=EXAMPLES["bomb"])
    def prop(drawn):
        assert not drawn.faults
        check_answer(sender, reference, drawn)

    prop()
    assert {200, 413, 500} <= sender.statuses, sender.statuses
    check_healthy(server, reference, sender, before)


@pytest.mark.parametrize("fault", [fault for faults in FAULTS.values() for fault in faults])
def test_a_request_with_a_fault_gets_its_documented_refusal(server, reference, fault):
    """Two examples of each fault, each with everything else a request may hold drawn beside it
    (bounded: the module runs about a hundred requests in all)."""
    sender = Sender(server.url)
    before = _counted(server)

    @fuzz_settings(2)
    @given(drawn=v2_requests(fault))
    def prop(drawn):
        assert drawn.faults and drawn.refusal in (400, 404), drawn.faults
        check_answer(sender, reference, drawn)

    prop()
    check_healthy(server, reference, sender, before)


@pytest.mark.parametrize("how", ["sign", "underscore", "arabic-indic digits", "5000 digits"])
def test_a_header_length_that_is_not_ascii_digits_is_refused_as_a_content_length_would_be(server, how):
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, *ITEM], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 4 * ROW}}]}).encode()
    body = header + np.zeros(ROW, np.float32).tobytes()
    sender = Sender(server.url)
    length = {**not_digits(len(header)), "5000 digits": "9" * 5000}[how]
    status, _, raw = sender.post("/v2/models/fp32/infer", body, {HEADER_LENGTH: length})
    assert status == 400, raw
    assert json.loads(raw)["error"].startswith(f"{HEADER_LENGTH} is "), raw
    # Control: the same body with its length in digits is served.
    status, _, raw = sender.post("/v2/models/fp32/infer", body, {HEADER_LENGTH: str(len(header))})
    assert status == 200, raw
