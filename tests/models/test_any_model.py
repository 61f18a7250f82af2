"""Any image model a user brings: layouts, dtypes, batch dimensions, sizes and output forms."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from cronnx.config import PreprocessConfig
from support.client import predict_many
from support.images import encode, photo_like
from support.models import image_classifier
from support.reference import DirectModel, assert_matches
from support.server import REPO, model_entry, server_config

# name -> (builder options, extra config entry fields)
MODELS = {
    "fixed1": (dict(batch=1), {}),
    "fixed4": (dict(batch=4), {"batch_size": 4}),
    "nhwc": (dict(layout="NHWC"), {}),
    "uint8": (dict(dtype="uint8"), {}),
    "half": (dict(dtype="float16"), {}),
    "size48": (dict(size=48), {"preprocess": {"resize": "stretch"}}),
    "out4d": (dict(output="4d"), {}),
    "probs": (dict(softmax=True), {}),
    "bgr": (dict(), {"preprocess": {"channel_order": "BGR", "scale": 1.0, "mean": [0, 0, 0], "std": [255, 255, 255]}}),
}
IMAGES = [encode(photo_like(w, h, seed=s), "JPEG", quality=90) for s, (w, h) in enumerate([(320, 240), (240, 320), (500, 400)])]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {name: image_classifier(folder / f"{name}.onnx", **options) for name, (options, _) in MODELS.items()}


def test_every_kind_of_model_is_served_with_parity(start_server, model_files):
    entries = [model_entry(name, model_files[name], **{"batch_size": 3, **extra}) for name, (_, extra) in MODELS.items()]
    server = start_server(server_config(*entries))
    described = server.models()
    assert described["nhwc"]["input_layout"] == "NHWC" and described["uint8"]["input_dtype"] == "uint8"
    assert described["fixed4"]["input_shape"][0] == 4 and described["out4d"]["output_shape"] == ["batch", 10, 1, 1]
    assert described["probs"]["outputs_probabilities"] is True and described["nhwc"]["outputs_probabilities"] is False

    for name, (_, extra) in MODELS.items():
        direct = DirectModel(model_files[name], PreprocessConfig(**extra.get("preprocess", {})),
                             probabilities=name == "probs")
        bodies = IMAGES * 3  # concurrent: batches form, fixed-batch models run in pieces
        replies = asyncio.run(predict_many(f"{server.url}/predict/{name}", bodies, concurrency=9))
        assert [r.status for r in replies] == [200] * len(bodies), (name, replies[0].body)
        tolerance = 2e-3 if name == "half" else 1e-5
        for body, reply in zip(bodies, replies):
            assert_matches(reply.body, direct.probabilities(body), tolerance=tolerance)
    fixed = [r.body["batch_size"] for r in asyncio.run(predict_many(f"{server.url}/predict/fixed1", IMAGES * 3))]
    assert set(fixed) == {1}


def test_probabilities_output_gets_no_second_softmax(start_server, model_files):
    server = start_server(server_config(model_entry("probs", model_files["probs"], top_k=10)))
    (reply,) = asyncio.run(predict_many(f"{server.url}/predict/probs", IMAGES[:1]))
    total = sum(p["confidence"] for p in reply.body["predictions"])
    assert abs(total - 1.0) < 1e-5  # all ten classes: a second softmax would flatten them, not sum them to 1
    assert reply.body["predictions"][0]["confidence"] > 0.2


def test_inspect_prints_the_model_and_a_config_entry(model_files):
    result = subprocess.run([sys.executable, "-m", "cronnx", "models", "inspect", str(model_files["nhwc"])],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # The nhwc test model: a float32 [batch, 32, 32, 3] image in, ten logits out, opset 13.
    assert "opset 13" in lines
    assert "input:  input float32 NHWC [batch, 32, 32, 3], batch dimension dynamic" in lines, lines
    assert "output: scores float32 [batch, 10], logits (softmax applied)" in lines, lines
    assert f"    path: {model_files['nhwc']}" in lines and "      resize: crop" in lines, lines
    assert "      channel_order: RGB" in lines  # float input: the ImageNet normalisation is proposed


def test_inspect_refuses_a_model_it_cannot_serve(tmp_path):
    from support.models import two_input_model

    model = two_input_model(tmp_path / "two.onnx")
    result = subprocess.run([sys.executable, "-m", "cronnx", "models", "inspect", str(model)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "2 inputs" in result.stderr
