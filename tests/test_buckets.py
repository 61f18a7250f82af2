"""Batch buckets: a batch runs on the session of the smallest bucket that holds it, padded with
zero rows, and every request gets exactly what onnxruntime computes on it alone."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter

import pytest
import yaml

from cronnx.config import CudaConfig
from reference import DirectModel, assert_matches
from support.client import predict_many
from support.models import batch_one_only_model, tiny_classifier
from support.server import REPO, model_entry, server_config, wait_until

BUCKETS = [1, 2, 4]


def bucket_for(size: int) -> int:
    return min(b for b in BUCKETS if b >= size)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("buckets") / "tiny.onnx", slow_layers=20)


def test_batches_run_on_the_smallest_bucket_that_holds_them_and_padding_changes_no_answer(start_server, model,
                                                                                          photos):
    server = start_server(server_config(model_entry("tiny", model, batch_size=4, batch_buckets=BUCKETS,
                                                    batch_timeout_ms=50)))
    assert server.models()["tiny"]["batch_buckets"] == BUCKETS
    url = f"{server.url}/predict/tiny"
    images = [p.read_bytes() for p in photos]
    direct = DirectModel(model)
    replies = []
    # Alone (bucket 1), then groups of three, until a batch of 3 (padded to 4) has been seen.
    for image in images[:2]:
        replies += asyncio.run(predict_many(url, [image]))
    for attempt in range(10):
        group = asyncio.run(predict_many(url, images[attempt % 4:attempt % 4 + 3], concurrency=3))
        replies += group
        if any(r.body["batch_size"] == 3 for r in group):
            break
    bodies = images[:2] + [image for attempt in range(attempt + 1) for image in images[attempt % 4:attempt % 4 + 3]]
    assert [r.status for r in replies] == [200] * len(replies)
    for body, reply in zip(bodies, replies):
        assert_matches(reply.body, direct.probabilities(body))

    sizes = Counter(r.body["batch_size"] for r in replies)
    assert sizes[3] >= 3, sizes  # padding happened
    # Each batch of b requests answered b replies that all say b: that many batches of each size.
    expected = Counter()
    for size, count in sizes.items():
        expected[bucket_for(size)] += count // size
    (worker,) = server.models()["tiny"]["workers"]
    assert {int(rows): runs for rows, runs in worker["bucket_runs"].items()} == expected


def test_without_buckets_one_session_runs_each_batch_at_its_own_size(start_server, model, photos):
    server = start_server(server_config(model_entry("tiny", model, batch_size=4, batch_buckets=[],
                                                    batch_timeout_ms=50)))
    url = f"{server.url}/predict/tiny"
    bodies = [p.read_bytes() for p in photos[:3]]
    replies = asyncio.run(predict_many(url, bodies, concurrency=3))
    direct = DirectModel(model)
    for body, reply in zip(bodies, replies):
        assert_matches(reply.body, direct.probabilities(body))
    sizes = Counter(r.body["batch_size"] for r in replies)
    (worker,) = server.models()["tiny"]["workers"]
    assert {int(rows): runs for rows, runs in worker["bucket_runs"].items()} == {
        size: count // size for size, count in sizes.items()}
    assert server.models()["tiny"]["batch_buckets"] == []


def test_a_fixed_batch_model_refuses_other_buckets_at_start(tmp_path):
    fixed = tiny_classifier(tmp_path / "fixed4.onnx", batch=4)
    config = tmp_path / "cronnx.yaml"
    config.write_text(yaml.safe_dump(server_config(model_entry("f", fixed, batch_size=4, batch_buckets=[1, 4]))))
    result = subprocess.run([sys.executable, "-m", "cronnx", "serve", "--config", str(config), "--port", "0"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "models[0] (f).batch_buckets" in result.stderr and "fixed at 4" in result.stderr, result.stderr


def test_a_model_that_cannot_run_a_bucket_is_refused_with_onnxruntimes_own_words(start_server, tmp_path):
    model = batch_one_only_model(tmp_path / "batch1.onnx")
    server = start_server(server_config(model_entry("b1", model, batch_size=4, batch_buckets=BUCKETS)),
                          wait_ready=False)
    wait_until(lambda: any(v["state"] == "failed" for v in server.versions()), what="the load to fail")
    (version,) = server.versions()
    assert version["reason"].startswith("worker b1:v1#0 failed to load: ")
    assert "invalid dimensions for output" in version["reason"], version  # what onnxruntime said
    assert "Traceback" not in server.log()


def test_powers_of_two_up_to_the_batch_size_are_the_cuda_default():
    from cronnx.catalog import powers_of_two_up_to

    assert powers_of_two_up_to(8) == [1, 2, 4, 8]
    assert powers_of_two_up_to(6) == [1, 2, 4, 6]
    assert powers_of_two_up_to(1) == [1]


def test_cuda_options_default_to_exact_float32_and_name_the_device():
    assert CudaConfig().provider_options(None) == {"use_tf32": "0", "cudnn_conv_algo_search": "EXHAUSTIVE"}
    assert CudaConfig(use_tf32=True, cudnn_conv_algo_search="HEURISTIC", gpu_mem_limit_bytes=1 << 30
                      ).provider_options(1) == {"use_tf32": "1", "cudnn_conv_algo_search": "HEURISTIC",
                                                "device_id": "1", "gpu_mem_limit": str(1 << 30)}
