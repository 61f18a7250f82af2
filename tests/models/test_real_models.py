"""Real models and their files: probabilities followed by nodes that keep them probabilities
(no second softmax), and labels files from any editor."""

from __future__ import annotations

import asyncio
import codecs
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from cronnx.config import ConfigError
from cronnx.models.catalog import load_labels
from cronnx.models.spec import inspect_model
from support.client import predict_many
from support.images import encode, photo_like
from support.models import LABEL_NAMES as NAMES, classifier_ending_in
from support.reference import DirectModel, assert_matches
from support.server import REPO, model_entry, server_config


# --- Probabilities followed by nodes that keep them probabilities ----------------------------

PROBABILITY_TAILS = {
    "identity": ("Softmax", "Identity"),
    "fp16": ("Softmax", "Cast16", "Cast32"),
    "fp16_out": ("Softmax", "Cast16"),
    "reshape": ("Softmax", "Reshape4d"),
    "flatten": ("Softmax", "Reshape4d", "Flatten"),
    "squeeze": ("Softmax", "Unsqueeze", "TransposeOnes", "Squeeze"),
    "dropout": ("Softmax", "Dropout"),
    "exp_logsoftmax": ("LogSoftmax", "Exp", "Identity"),
    "softmax_4d_axis1": ("Unsqueeze", "Softmax@1", "Identity"),
}
LOGIT_TAILS = {
    "mul2": ("Softmax", "Mul2"),
    "log": ("Softmax", "Log"),
    "logsoftmax": ("LogSoftmax", "Identity"),
    "cast_int": ("Softmax", "CastInt", "Cast32"),
    "dropout_training": ("Softmax", "DropoutTraining"),
    "softmax_size1_axis": ("Unsqueeze", "Softmax", "Identity"),     # opset 13: over the last, size-1 axis
    "softmax_half_classes": ("Reshape2xHalf", "Softmax", "Reshape2d"),
}
# Before opset 13 a Softmax normalises everything from its axis (default 1) on, flattened.
OPSET11 = {"softmax_size1_axis": True, "softmax_half_classes": True, "identity": True, "reshape": True}


@pytest.fixture(scope="module")
def tail_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tails")
    return {name: classifier_ending_in(folder / f"{name}.onnx", *steps)
            for name, steps in {**PROBABILITY_TAILS, **LOGIT_TAILS}.items()}


def _raw_outputs(path, batch: int = 4) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).normal(0, 1, (batch, 3, 16, 16)).astype(np.float32)
    return session.run(None, {"input": x})[0].reshape(batch, -1).astype(np.float64)


@pytest.mark.parametrize("name", [*PROBABILITY_TAILS, *LOGIT_TAILS])
def test_probabilities_are_recognised_through_nodes_that_keep_them(tail_models, name):
    spec = inspect_model(str(tail_models[name]))
    assert spec.outputs_probabilities is (name in PROBABILITY_TAILS)
    if name in PROBABILITY_TAILS:
        # The builder's check: onnxruntime's rows are probability vectors.
        rows = _raw_outputs(tail_models[name])
        assert (rows >= 0).all() and np.allclose(rows.sum(axis=1), 1, atol=2e-3)


@pytest.mark.parametrize("name, probabilities", sorted(OPSET11.items()))
def test_softmax_axis_follows_the_opset(tmp_path, name, probabilities):
    steps = {**PROBABILITY_TAILS, **LOGIT_TAILS}[name]
    path = classifier_ending_in(tmp_path / "m.onnx", *steps, opset=11)
    assert inspect_model(str(path)).outputs_probabilities is probabilities
    rows = _raw_outputs(path)
    assert np.allclose(rows.sum(axis=1), 1, atol=1e-5)  # what onnxruntime says: each row sums to 1


def test_served_answers_are_the_models_probabilities_with_no_second_softmax(start_server, tail_models):
    served = ["identity", "fp16", "reshape", "flatten", "mul2", "log"]
    server = start_server(server_config(*[model_entry(n, tail_models[n], top_k=10) for n in served]))
    described = server.models()
    images = [encode(photo_like(w, h, seed=40 + w), "JPEG", quality=90) for w, h in [(120, 90), (90, 120)]]
    for name in served:
        probabilities = name in PROBABILITY_TAILS
        assert described[name]["outputs_probabilities"] is probabilities, name
        direct = DirectModel(tail_models[name], probabilities=probabilities)
        replies = asyncio.run(predict_many(f"{server.url}/predict/{name}", images))
        for image, reply in zip(images, replies):
            assert reply.status == 200, (name, reply.body)
            assert_matches(reply.body, direct.probabilities(image), top_k=10, tolerance=1e-5)
            assert abs(sum(p["confidence"] for p in reply.body["predictions"]) - 1) < 2e-3
    # The reported case, by value: the top class's confidence is onnxruntime's own probability.
    raw = DirectModel(tail_models["identity"], probabilities=True).probabilities(images[0])
    (reply,) = asyncio.run(predict_many(f"{server.url}/predict/identity", images[:1]))
    assert abs(reply.body["predictions"][0]["confidence"] - raw.max()) < 1e-6


@pytest.mark.parametrize("name, words", [("identity", "probabilities (a Softmax over the classes: no second softmax)"),
                                         ("fp16", "probabilities (a Softmax over the classes: no second softmax)"),
                                         ("log", "logits (softmax applied)")])
def test_models_inspect_names_probabilities_through_the_tail(tail_models, name, words):
    result = subprocess.run([sys.executable, "-m", "cronnx", "models", "inspect", str(tail_models[name])],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"output: scores float32 [batch, 10], {words}" in result.stdout.splitlines(), result.stdout


# --- Labels files ----------------------------------------------------------------------------



@pytest.mark.parametrize("encoded", [
    ("\ufeff" + "\n".join(NAMES) + "\n").encode(),                          # UTF-8 with a byte-order mark
    ("\ufeff" + "\r\n".join(NAMES) + "\r\n\r\n\r\n").encode(),              # ... CRLF, blank lines at the end
    ("\r".join(NAMES) + "\r").encode(),                                      # classic Mac line endings
    ("\n".join(f"  {n}\t " for n in NAMES) + "\n \n\t\n").encode(),         # spaces, blank-looking lines
    ("\r\n".join(NAMES) + "\r\n").encode("utf-16"),                          # Notepad's "Unicode"
    codecs.BOM_UTF16_BE + ("\n".join(NAMES)).encode("utf-16-be"),
    ("\n".join(NAMES) + "\n").encode("utf-32"),
    ("\ufeff" + "\n".join(NAMES[:5]) + "\n" + "\ufeff" + "\n".join(NAMES[5:])).encode(),  # two files joined
], ids=["bom", "bom-crlf-blank-tail", "cr", "spaces", "utf16le", "utf16be", "utf32", "joined"])
def test_labels_files_from_any_editor_give_the_same_labels(tmp_path, encoded):
    path = tmp_path / "labels.txt"
    path.write_bytes(encoded)
    assert load_labels(str(path), 10, "class_") == NAMES


def test_only_cr_and_lf_end_a_label(tmp_path):
    names = [*NAMES[:9], "form\x0cfeed \u2028 and line separator"]
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(names), encoding="utf-8")
    assert load_labels(str(path), 10, "class_") == names


@pytest.mark.parametrize("encoded, words", [
    ("\n".join(["tench", "goldfish", *"abcdefgh"]).encode("utf-16-le"), "NUL characters"),  # UTF-16, no mark
    ("\n".join(n.replace("東京", "Tokyo") for n in NAMES).encode("latin-1"), "not UTF-8"),  # "ü" as one byte
    (("\ufeff" + "\n".join(NAMES[:9]) + "\n\n\n").encode(), "has 9 labels"),
], ids=["utf16-without-mark", "latin1", "a-label-short"])
def test_labels_files_that_cannot_be_read_right_are_refused(tmp_path, encoded, words):
    path = tmp_path / "labels.txt"
    path.write_bytes(encoded)
    with pytest.raises(ConfigError, match=words):
        load_labels(str(path), 10, "class_")
