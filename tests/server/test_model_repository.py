"""The model repository as disks, notebooks and people leave it: entries that are not models are
skipped, a model that cannot be served is refused alone with its reason, and the others serve,
at start-up and on every reload."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from cronnx.config import MAX_VERSION
from support.client import predict_many
from support.images import encode, photo_like
from support.models import image_classifier
from support.reference import DirectModel, assert_matches
from support.server import REPO, model_entry, pid_alive, server_config, wait_until

IMAGE = encode(photo_like(160, 120, seed=4), "JPEG")


def version_folder(root: Path, name: str, folder: str, seed: int = 11) -> Path:
    """root/<name>/<folder>/model.onnx, a classifier with its own weights (`seed`)."""
    (root / name / folder).mkdir(parents=True, exist_ok=True)
    return image_classifier(root / name / folder / "model.onnx", seed=seed)


def predict(server, path: str):
    reply, = asyncio.run(predict_many(f"{server.url}{path}", [IMAGE]))
    return reply


def states(server) -> dict[tuple[str, int], str]:
    return {(m["name"], m["version"]): m["state"] for m in server.versions()}


def reasons(server) -> dict[tuple[str, int], str]:
    return {(m["name"], m["version"]): m["reason"] for m in server.versions() if m["state"] == "failed"}


def test_entries_that_are_not_models_are_skipped_and_the_models_beside_them_serve_and_reload(start_server,
                                                                                           tmp_path):
    root = tmp_path / "repo"
    good = version_folder(root, "good", "1", seed=21)
    (root / "lost+found").mkdir()
    version_folder(root, ".ipynb_checkpoints", "1")  # hidden, even with a version folder in it
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.cpython-312.pyc").write_bytes(b"\x00" * 16)
    (root / "README.md").write_text("models for the demo\n")
    (root / "noversions").mkdir()
    image_classifier(root / "noversions" / "model.onnx")  # the version level forgotten
    server = start_server(server_config(), args=("--model-repository", str(root)))

    assert states(server) == {("good", 1): "ready"}
    reply = predict(server, "/predict/good")
    assert reply.status == 200 and (reply.body["model"], reply.body["version"]) == ("good", 1)
    assert_matches(reply.body, DirectModel(good).probabilities(IMAGE))
    skipped = ["lost+found", ".ipynb_checkpoints", "__pycache__", "README.md", "noversions"]
    for entry in skipped:
        assert server.log().count(f"skipping {root / entry}:") == 1, entry

    # A new model appears; SIGHUP (to this server's pid) reloads with the same entries still there.
    more = version_folder(root, "more", "3", seed=22)
    os.kill(server.proc.pid, signal.SIGHUP)
    # /ready counts a model's live workers once a version of it serves (/models says "ready" as
    # soon as the workers are, a moment before the version takes traffic).
    wait_until(lambda: server.get("/ready")[1]["models"].get("more", 0) >= 1, what="the new model to serve")
    assert states(server) == {("good", 1): "ready", ("more", 3): "ready"}
    reply = predict(server, "/predict/more")
    assert reply.status == 200 and reply.body["version"] == 3
    assert_matches(reply.body, DirectModel(more).probabilities(IMAGE))
    assert predict(server, "/predict/good").status == 200
    for entry in skipped:
        assert server.log().count(f"skipping {root / entry}:") == 2, entry
    assert server.get("/ready")[0] == 200


def test_a_model_folder_that_cannot_be_served_is_refused_alone_at_start_up(start_server, tmp_path):
    root = tmp_path / "repo"
    version_folder(root, "good", "1")
    version_folder(root, "bad name", "1")
    version_folder(root, "typo", "1")
    (root / "typo" / "config.yaml").write_text(yaml.safe_dump({"batch_sise": 4}))
    (root / "corrupt" / "1").mkdir(parents=True)
    (root / "corrupt" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    (root / "empty" / "2").mkdir(parents=True)  # a version folder without its model file
    server = start_server(server_config(), args=("--model-repository", str(root)))

    assert states(server) == {("good", 1): "ready", ("bad name", 1): "failed", ("typo", 1): "failed",
                              ("corrupt", 1): "failed", ("empty", 1): "failed"}
    why = reasons(server)
    assert "'bad name' is not a model name" in why[("bad name", 1)]
    assert "batch_sise" in why[("typo", 1)] and str(root / "typo" / "config.yaml") in why[("typo", 1)]
    assert str(root / "corrupt" / "1" / "model.onnx") in why[("corrupt", 1)]
    assert f"no {root / 'empty'}/<version>/model.onnx found" in why[("empty", 1)]
    assert predict(server, "/predict/good").status == 200
    assert predict(server, "/predict/corrupt").status == 404
    assert server.get("/ready")[0] == 200


def test_two_folders_naming_one_version_refuse_their_model_and_sigterm_still_stops_the_server(start_server,
                                                                                           tmp_path):
    root = tmp_path / "repo"
    version_folder(root, "good", "1")
    version_folder(root, "dup", "1")
    version_folder(root, "dup", "01")
    lead = version_folder(root, "lead", "007", seed=23)  # alone, leading zeros name version 7
    server = start_server(server_config(), args=("--model-repository", str(root)))

    assert states(server) == {("good", 1): "ready", ("dup", 1): "failed", ("lead", 7): "ready"}
    reason = reasons(server)[("dup", 1)]
    assert str(root / "dup" / "1") in reason and str(root / "dup" / "01") in reason, reason
    assert predict(server, "/predict/good").status == 200
    assert predict(server, "/predict/dup").status == 404
    reply = predict(server, "/predict/lead/versions/7")
    assert reply.status == 200 and reply.body["version"] == 7
    assert_matches(reply.body, DirectModel(lead).probabilities(IMAGE))

    workers = [w["pid"] for m in server.versions() for w in m.get("workers", [])]
    assert len(workers) == 2
    started = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout_s=30) == 0
    assert time.monotonic() - started < 15
    assert not any(pid_alive(pid) for pid in workers)


def test_a_models_entry_whose_folders_name_one_version_is_refused_on_reload(start_server, tmp_path):
    root = tmp_path / "repo"
    version_folder(root, "dup", "2")
    version_folder(root, "dup", "02")
    other = image_classifier(tmp_path / "other.onnx")
    config = server_config(model_entry("other", other))
    server = start_server(config)
    entry = {"name": "dup", "repository": str(root / "dup"), "intra_op_threads": 1}
    server.config_path.write_text(yaml.safe_dump(server_config(model_entry("other", other), entry)))
    os.kill(server.proc.pid, signal.SIGHUP)
    wait_until(lambda: ("dup", 1) in reasons(server), what="dup refused")
    reason = reasons(server)[("dup", 1)]
    assert str(root / "dup" / "2") in reason and str(root / "dup" / "02") in reason, reason
    assert states(server) == {("other", 1): "ready", ("dup", 1): "failed"}
    assert predict(server, "/predict/other").status == 200
    assert server.get("/ready")[0] == 200


def test_a_models_entry_whose_folders_name_one_version_stops_start_up_naming_both(tmp_path):
    """A model the config names must be servable at start-up (exit 2), as any config error."""
    root = tmp_path / "repo"
    version_folder(root, "dup", "1")
    version_folder(root, "dup", "0001")
    config_path = tmp_path / "cronnx.yaml"
    config_path.write_text(yaml.safe_dump({"models": [{"name": "dup", "repository": str(root / "dup")}]}))
    result = subprocess.run([sys.executable, "-m", "cronnx", "serve", "--config", str(config_path), "--port", "0"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert str(root / "dup" / "1") in result.stderr and str(root / "dup" / "0001") in result.stderr, result.stderr


def test_version_folders_outside_1_to_int64_are_refused_and_the_others_serve(start_server, tmp_path):
    root = tmp_path / "repo"
    first = version_folder(root, "big", "1", seed=31)
    top = version_folder(root, "big", str(MAX_VERSION), seed=32)
    beyond = [str(MAX_VERSION + 1), "9" * 20, "0"]
    for folder in beyond:
        version_folder(root, "big", folder)
    (root / "big" / "config.yaml").write_text(yaml.safe_dump({"version_policy": {}, "intra_op_threads": 1}))
    version_folder(root, "huge", "1" * 20)  # its only version folder is out of range
    server = start_server(server_config(), args=("--model-repository", str(root)))

    assert states(server) == {("big", 1): "ready", ("big", MAX_VERSION): "ready", ("huge", 1): "failed"}
    assert "1" * 20 in reasons(server)[("huge", 1)]
    for folder in beyond:
        assert server.log().count(f"{root / 'big' / folder} is not served: version {folder} is outside 1 to") == 1
    reply = predict(server, "/predict/big/versions/1")
    assert reply.status == 200 and reply.body["version"] == 1
    assert_matches(reply.body, DirectModel(first).probabilities(IMAGE))
    reply = predict(server, "/predict/big")  # the highest version takes the traffic
    assert reply.status == 200 and reply.body["version"] == MAX_VERSION
    assert_matches(reply.body, DirectModel(top).probabilities(IMAGE))
    assert predict(server, f"/predict/big/versions/{MAX_VERSION + 1}").status == 404
