"""The Open Inference Protocol's request decoding (`cronnx.protocol.v2_inputs`), on the specs of real
models of each input datatype: values a datatype cannot hold, element counts that overflow
int64, and parameters of the wrong type are each a 400 (InvalidRequest) naming what was wrong;
a property test draws requests of every JSON type and checks that decoding either gives the
rows the request holds, finite and of the model's datatype, or refuses with InvalidRequest,
never any other error."""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cronnx.engine.client import ModelView
from cronnx.errors import InvalidRequest
from cronnx.protocol.v2_inputs import (DATATYPES, output_plans, parse_header, queue_parameters, raw_binary_request,
                                   request_rows)
from cronnx.models.spec import inspect_model
from support.models import image_classifier

SIZE = 4
ITEM = 3 * SIZE * SIZE
BATCH = 4


@pytest.fixture(scope="module")
def views(tmp_path_factory) -> dict[str, ModelView]:
    """A model view per input dtype (float32, float16, uint8), each of a real model file."""
    out = {}
    for dtype in ("float32", "float16", "uint8"):
        path = image_classifier(tmp_path_factory.mktemp(dtype) / "m.onnx", size=SIZE, dtype=dtype)
        spec = inspect_model(str(path))
        out[dtype] = ModelView("m", 1, 5, False, [f"c{i}" for i in range(10)], spec, BATCH)
    return out


def decode(header: dict | bytes, view: ModelView, binary: bytes = b""):
    """What the handler does before any row runs: (rows, queue parameters, output plans)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    parsed = parse_header(raw)
    return request_rows(parsed, binary, view), queue_parameters(parsed), output_plans(parsed, view)


def tensor(datatype: str, shape: list, data=None, **parameters) -> dict:
    entry = {"name": "input", "shape": shape, "datatype": datatype, "parameters": parameters}
    if data is not None:
        entry["data"] = data
    return entry


def refused(header, view, binary: bytes = b"") -> str:
    with pytest.raises(InvalidRequest) as caught:
        decode(header, view, binary)
    return str(caught.value)


VALUES = {  # (dtype, a bad element, words in the error)
    "uint8 over 255": ("uint8", 300, ["element 5 of data is 300", "integers from 0 to 255"]),
    "uint8 negative": ("uint8", -1, ["element 5 of data is -1", "0 to 255"]),
    "uint8 fraction": ("uint8", 1.5, ["element 5 of data is 1.5", "integers"]),
    "uint8 boolean": ("uint8", True, ["element 5 of data is True", "integers"]),
    "fp32 beyond float32": ("float32", 1e39, ["element 5 of data is 1e+39", "within +-3.4028235e38"]),
    "fp32 null": ("float32", None, ["element 5 of data is None", "finite numbers"]),
    "fp32 string": ("float32", "1.5", ["element 5 of data is '1.5'", "finite numbers"]),
    "fp32 boolean": ("float32", False, ["element 5 of data is False", "finite numbers"]),
    "fp16 beyond float16": ("float16", 70000.0, ["element 5 of data is 70000.0", "within +-65504"]),
}


@pytest.mark.parametrize("case", sorted(VALUES))
def test_a_value_the_datatype_cannot_hold_is_refused_naming_it_and_the_range(views, case):
    dtype, bad, words = VALUES[case]
    data = [1] * ITEM
    data[5] = bad
    message = refused({"inputs": [tensor(DATATYPES[dtype], [1, 3, SIZE, SIZE], data)]}, views[dtype])
    for word in words:
        assert word in message, message


def test_the_largest_values_each_datatype_holds_are_taken_as_they_are(views):
    for dtype, top in (("uint8", 255), ("float32", float(np.finfo(np.float32).max)),
                       ("float16", float(np.finfo(np.float16).max))):
        data = [[[top] * SIZE] * SIZE] * 3  # nested, as the protocol allows
        rows, _, _ = decode({"inputs": [tensor(DATATYPES[dtype], [1, 3, SIZE, SIZE], data)]}, views[dtype])
        assert rows.dtype == np.dtype(dtype) and rows.shape == (1, 3, SIZE, SIZE)
        assert np.isfinite(rows.astype(np.float64)).all() and (rows == np.dtype(dtype).type(top)).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_binary_floats_that_are_not_finite_are_refused(views, dtype, bad):
    values = np.ones((1, 3, SIZE, SIZE), dtype)
    values.flat[7] = bad
    header = {"inputs": [tensor(DATATYPES[dtype], [1, 3, SIZE, SIZE], binary_data_size=values.nbytes)]}
    message = refused(header, views[dtype], values.tobytes())
    assert "element 7 of the binary data" in message and "must be finite" in message, message
    with pytest.raises(InvalidRequest, match="must be finite"):
        request_rows(raw_binary_request(values.tobytes(), views[dtype]), values.tobytes(), views[dtype])


@pytest.mark.parametrize("rows", [2 ** 56 + 1, 2 ** 62, 2 ** 64 + 1, 10 ** 30, 0, -3])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_row_count_out_of_range_is_refused_with_its_true_value_before_the_data_is_read(views, rows, binary):
    shape = [rows, 3, SIZE, SIZE]
    data = np.zeros(ITEM, np.float32)
    header = ({"inputs": [tensor("FP32", shape, binary_data_size=data.nbytes)]} if binary
              else {"inputs": [tensor("FP32", shape, data.tolist())]})
    message = refused(header, views["float32"], data.tobytes() if binary else b"")
    assert f"has {rows} rows" in message and "takes 1 to 4" in message, message


def test_an_element_count_is_computed_without_wrapping_around(views):
    # 2**61 x 8 wraps to 0 in int64: the count must still be the true one.
    message = refused({"inputs": [tensor("FP32", [1, 3, 2 ** 61, 8], [0.0] * ITEM)]}, views["float32"])
    assert "has shape [1, 3, 2305843009213693952, 8]" in message, message


PARAMETERS = {  # (where, name, value, words in the error)
    "binary_data_output as a string": ("request", "binary_data_output", "false", "must be a boolean"),
    "binary_data_output as an integer": ("request", "binary_data_output", 0, "must be a boolean"),
    "priority as a boolean": ("request", "priority", True, "must be an integer"),
    "priority as a float": ("request", "priority", 1.0, "must be an integer"),
    "timeout as a string": ("request", "timeout", "100", "must be an integer"),
    "timeout negative": ("request", "timeout", -1, "from 0 to"),
    "timeout beyond int64": ("request", "timeout", 2 ** 63, "from 0 to"),
    "priority beyond the levels any model has": ("request", "priority", 101, "from 0 to 100"),
    "sequence id": ("request", "sequence_id", 7, "not stateful sequences"),
    "sequence id of the wrong type": ("request", "sequence_id", 1.5, "an integer or a string"),
    "sequence start": ("request", "sequence_start", True, "not stateful sequences"),
    "binary_data_size as a boolean": ("input", "binary_data_size", True, "must be an integer"),
    "shared memory input": ("input", "shared_memory_region", "r0", "shared-memory extension"),
    "binary_data as a string": ("output", "binary_data", "true", "must be a boolean"),
    "classification as a boolean": ("output", "classification", True, "must be an integer"),
    "classification as a string": ("output", "classification", "3", "must be an integer"),
    "classification zero": ("output", "classification", 0, "positive integer"),
    "shared memory output": ("output", "shared_memory_byte_size", 40, "shared-memory extension"),
}


@pytest.mark.parametrize("case", sorted(PARAMETERS))
def test_a_parameter_of_the_wrong_type_is_refused_naming_it(views, case):
    where, name, value, words = PARAMETERS[case]
    entry = tensor("FP32", [1, 3, SIZE, SIZE], [0.0] * ITEM)
    header = {"inputs": [entry], "outputs": [{"name": "scores"}]}
    {"request": header.setdefault("parameters", {}), "input": entry["parameters"],
     "output": header["outputs"][0].setdefault("parameters", {})}[where][name] = value
    message = refused(header, views["float32"])
    assert words in message and repr(name) in message, message


def test_parameters_of_the_right_type_are_read_as_they_say(views):
    header = {"inputs": [tensor("FP32", [2, 3, SIZE, SIZE], [0.5] * (2 * ITEM))],
              "outputs": [{"name": "scores", "parameters": {"classification": 3, "binary_data": False}}],
              "parameters": {"priority": 2, "timeout": 250_000, "binary_data_output": True, "custom": [1, "x"]}}
    rows, queue, plans = decode(header, views["float32"])
    assert rows.shape == (2, 3, SIZE, SIZE) and (rows == 0.5).all()
    assert queue.priority == 2 and queue.timeout_s == 0.25
    assert [(p.name, p.classes, p.binary) for p in plans] == [("scores", 3, False)]


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b'{"inputs": [{"name": "input", "shape": [1], '
                                  b'"datatype": "FP32", "data": ' + b"[" * 50_000 + b"]" * 50_000 + b"}]}",
                                  b"\xff\xfe{}", b'{"inputs": [], "id": "\\ud800"}', b'{"inputs": 1e999}'])
def test_a_body_the_json_decoder_refuses_for_any_reason_is_a_400(views, body):
    with pytest.raises(InvalidRequest):
        decode(body, views["float32"])


# --- property: every decoded request is the rows it holds, or InvalidRequest ---------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.text(max_size=5),
                         st.floats(allow_nan=False, allow_infinity=False, width=64))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
dims = st.one_of(st.integers(-2, 6), st.sampled_from([SIZE, 2 ** 61, 2 ** 63, 2 ** 64 + 3]))
shapes = st.one_of(st.lists(dims, max_size=5), st.builds(lambda n: [n, 3, SIZE, SIZE], dims))
element = st.one_of(st.integers(-300, 300), st.floats(width=32, allow_nan=False, allow_infinity=False),
                    st.floats(-1e40, 1e40), st.none(), st.booleans(), st.text(max_size=3))
parameter_names = st.sampled_from(["binary_data_output", "priority", "timeout", "binary_data_size", "classification",
                                   "binary_data", "sequence_id", "custom"])
parameters = st.dictionaries(parameter_names, json_values, max_size=3)


@st.composite
def requests(draw):
    """(header bytes, binary bytes, dtype of the model asked)."""
    dtype = draw(st.sampled_from(["float32", "float16", "uint8"]))
    datatype = draw(st.sampled_from([DATATYPES[dtype]] * 3 + ["FP32", "FP16", "UINT8", "BYTES", "INT64", ""]))
    shape = draw(shapes)
    rows = draw(st.integers(1, 3))
    binary = b""
    entry = {"name": draw(st.sampled_from(["input"] * 4 + ["IMAGE", "x"])), "shape": shape, "datatype": datatype,
             "parameters": draw(parameters)}
    how = draw(st.sampled_from(["good json", "json", "binary", "none"]))
    if how == "good json":
        entry["shape"] = [rows, 3, SIZE, SIZE]
        entry["data"] = draw(st.lists(element, min_size=rows * ITEM, max_size=rows * ITEM))
    elif how == "json":
        entry["data"] = draw(st.one_of(st.lists(element, max_size=8), json_values))
    elif how == "binary":
        values = draw(st.lists(st.floats(width=32), min_size=ITEM, max_size=ITEM))
        binary = np.asarray(values, np.float32).astype(dtype if dtype != "uint8" else np.float32).tobytes()
        if dtype == "uint8":
            binary = np.asarray([int(abs(v)) % 256 if math.isfinite(v) else 0 for v in values], np.uint8).tobytes()
        entry["parameters"] = {**entry["parameters"], "binary_data_size": draw(st.sampled_from([len(binary),
                                                                                               len(binary) + 1]))}
    header = {"inputs": [entry], "parameters": draw(parameters)}
    if draw(st.booleans()):
        header["outputs"] = [{"name": draw(st.sampled_from(["scores", "probs"])), "parameters": draw(parameters)}]
    return json.dumps(header).encode(), binary, dtype


def test_any_request_decodes_to_its_finite_rows_or_is_refused(views):
    outcomes = set()

    @settings(max_examples=300, deadline=None, database=None, derandomize=not os.environ.get("CRONNX_FUZZ_RANDOM"),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request=requests())
    # Each outcome at least once, whatever the draw: refused values, and rows of each kind.
    @example(request=(json.dumps({"inputs": [tensor("UINT8", [1, 3, SIZE, SIZE], [300] * ITEM)]}).encode(), b"",
                      "uint8"))
    @example(request=(json.dumps({"inputs": [tensor("FP32", [1, 3, SIZE, SIZE], [0.25] * ITEM)]}).encode(), b"",
                      "float32"))
    @example(request=(json.dumps({"inputs": [tensor("FP16", [1, 3, SIZE, SIZE], binary_data_size=2 * ITEM)]}).encode(),
                      np.full(ITEM, 0.5, np.float16).tobytes(), "float16"))
    def prop(request):
        header, binary, dtype = request
        view = views[dtype]
        try:
            rows, queue, plans = decode(header, view, binary)
        except InvalidRequest as exc:
            assert str(exc)
            outcomes.add("refused")
            return
        sent = json.loads(header)["inputs"][0]
        assert 1 <= len(rows) <= BATCH and rows.shape[0] == sent["shape"][0]
        assert queue.priority is None or 1 <= queue.priority <= 100
        assert plans and all(p.name == "scores" for p in plans)
        if rows.dtype == object:  # encoded images: bytes, one per row
            assert all(isinstance(r, bytes) for r in rows)
            outcomes.add("images")
            return
        assert rows.dtype == np.dtype(dtype) and rows.shape[1:] == (3, SIZE, SIZE)
        assert np.isfinite(rows.astype(np.float64)).all()
        if "data" in sent:
            assert np.array_equal(rows.reshape(-1), np.asarray(sent["data"], dtype=dtype).reshape(-1))
            outcomes.add("json rows")
        else:
            assert rows.tobytes() == binary
            outcomes.add("binary rows")

    with np.errstate(over="ignore"):  # float16 binary data drawn beyond its range: refused as infinite
        prop()
    assert {"refused", "json rows", "binary rows"} <= outcomes, outcomes


def test_bytes_serialisation_round_trips_through_the_binary_extension(views):
    images = [b"\x89PNG-one", b"", b"jpeg-two"]
    blob = b"".join(struct.pack("<I", len(i)) + i for i in images)
    header = {"inputs": [{"name": "IMAGE", "shape": [3], "datatype": "BYTES",
                          "parameters": {"binary_data_size": len(blob)}}]}
    rows, _, _ = decode(header, views["float32"], blob)
    assert list(rows) == images
