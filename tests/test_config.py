"""A bad config stops `cronnx serve` before anything starts: exit 2 and one line naming the field."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from cronnx.ipc.cpu import usable_cores
from support.models import tiny_classifier, two_input_model, vector_input_model
from support.server import REPO


def serve(config_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cronnx", "serve", "--config", str(config_path), "--port", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("m") / "tiny.onnx")


def write(tmp_path, config) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


CASES = {
    "unknown field": ({"models": [{"name": "m", "path": "TINY", "batch_sise": 4}]}, "batch_sise"),
    "wrong type": ({"models": [{"name": "m", "path": "TINY", "batch_size": "eight"}]}, "$.models[0].batch_size"),
    "out of range": ({"models": [{"name": "m", "path": "TINY", "batch_size": 0}]}, "$.models[0].batch_size"),
    "bad enum": ({"models": [{"name": "m", "path": "TINY", "preprocess": {"resize": "squash"}}]}, "resize"),
    "no models": ({"models": []}, "no models"),
    "unknown server field": ({"server": {"prot": 1}, "models": [{"name": "m", "path": "TINY"}]}, "prot"),
    "duplicate names": ({"models": [{"name": "m", "path": "TINY"}, {"name": "m", "path": "TINY"}]}, "unique"),
    "missing model file": ({"models": [{"name": "m", "path": "/nonexistent/model.onnx"}]}, "models[0] (m).path"),
    "ring smaller than batch": ({"models": [{"name": "m", "path": "TINY", "batch_size": 8, "ring_slots": 4}]}, "ring_slots"),
    "buckets out of order": ({"server": {"latency_buckets_s": [0.1, 0.01]}, "models": [{"name": "m", "path": "TINY"}]}, "latency_buckets_s"),
    "batch buckets out of order": ({"models": [{"name": "m", "path": "TINY", "batch_size": 4,
                                                "batch_buckets": [2, 1, 4]}]}, "strictly increasing"),
    "batch buckets not ending at batch_size": ({"models": [{"name": "m", "path": "TINY", "batch_size": 8,
                                                           "batch_buckets": [1, 4]}]}, "end with batch_size (8)"),
    "unknown cuda setting": ({"models": [{"name": "m", "path": "TINY", "cuda": {"use_fp8": True}}]}, "use_fp8"),
    "bad conv algo search": ({"models": [{"name": "m", "path": "TINY", "cuda": {"cudnn_conv_algo_search": "FAST"}}]},
                             "cudnn_conv_algo_search"),
    "default priority level beyond the levels": ({"models": [{"name": "m", "path": "TINY", "priority_levels": 2,
                                                              "default_priority_level": 3}]}, "default_priority_level"),
    "negative queue size": ({"models": [{"name": "m", "path": "TINY", "max_queue_size": -1}]},
                            "$.models[0].max_queue_size"),
    "queue bytes below one body": ({"server": {"max_body_bytes": 1000, "max_queue_bytes": 999},
                                    "models": [{"name": "m", "path": "TINY"}]}, "max_queue_bytes"),
    "zero queue timeout": ({"models": [{"name": "m", "path": "TINY", "default_timeout_ms": 0}]},
                           "$.models[0].default_timeout_ms"),
    "version beyond int64": ({"models": [{"name": "m", "path": "TINY", "version": 2 ** 63}]}, "$.models[0].version"),
    "traffic to a version beyond int64": ({"models": [{"name": "m", "repository": "/r", "traffic": {2 ** 63: 1}}]},
                                          "$.models[0].traffic"),
    "specific version 0": ({"models": [{"name": "m", "repository": "/r", "version_policy": {"specific": [0]}}]},
                           "$.models[0].version_policy.specific[0]"),
    "unavailable provider": ({"models": [{"name": "m", "path": "TINY", "providers": ["TensorrtExecutionProvider"]}]}, "TensorrtExecutionProvider"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_config_exits_2_naming_the_field(tmp_path, tiny, case):
    config, words = CASES[case]
    text = yaml.safe_dump(config).replace("TINY", str(tiny))
    result = serve(write(tmp_path, text))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(tmp_path / "bad.yaml") in lines[0] and words in lines[0], lines[0]


def test_invalid_yaml_exits_2(tmp_path):
    result = serve(write(tmp_path, "models: [unclosed"))
    assert result.returncode == 2 and "YAML" in result.stderr


def test_missing_config_file_exits_2(tmp_path):
    result = serve(tmp_path / "nope.yaml")
    assert result.returncode == 2 and "nope.yaml" in result.stderr


@pytest.mark.parametrize("builder, words", [(two_input_model, "2 inputs"), (vector_input_model, "image input")])
def test_model_that_is_not_an_image_classifier_is_refused(tmp_path, builder, words):
    model = builder(tmp_path / "model.onnx")
    result = serve(write(tmp_path, {"models": [{"name": "m", "path": str(model)}]}))
    assert result.returncode == 2
    assert "models[0] (m).path" in result.stderr and words in result.stderr, result.stderr


def test_corrupt_model_file_is_refused(tmp_path):
    model = tmp_path / "corrupt.onnx"
    model.write_bytes(b"this is not a protobuf")
    result = serve(write(tmp_path, {"models": [{"name": "m", "path": str(model)}]}))
    assert result.returncode == 2 and "cannot load" in result.stderr


@pytest.mark.parametrize("files, cores", [
    ({"cpu.max": "150000 100000\n"}, 2),              # cgroup v2, --cpus 1.5: rounded up
    ({"cpu.max": "50000 100000\n"}, 1),               # half a core still gets one
    ({"cpu.max": "max 100000\n"}, None),              # no quota: the affinity
    ({"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"}, 1),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ({}, None),                                        # no cgroup files at all
], ids=["v2-1.5", "v2-0.5", "v2-max", "v1-1", "v1-none", "none"])
def test_usable_cores_is_the_affinity_capped_by_the_cgroup_quota(tmp_path, files, cores):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(str(tmp_path)) == (min(cores, affinity) if cores else affinity)


@pytest.mark.parametrize("spec", ["cronnx.workers.supervisor:Liveness", "cronnx.observability.logs:LoggingSpec"])
def test_liveness_and_logging_have_no_defaults_beside_the_configs(spec):
    """Their values come from the server section (worker_ping_*, batch_run_timeout_s, log_*), whose
    defaults are the only ones: building one without them is an error."""
    module, name = spec.split(":")
    cls = getattr(__import__(module, fromlist=[name]), name)
    with pytest.raises(TypeError, match="Missing required argument"):
        cls()
