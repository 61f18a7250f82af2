"""Batch buckets: a batch runs on the session of the smallest bucket that holds it, padded with
zero rows, and every request gets exactly what onnxruntime computes on it alone."""

from __future__ import annotations

import asyncio
import mmap
import subprocess
import sys
import uuid
from collections import Counter

import numpy as np
import pytest
import yaml

from cronnx.config import CudaConfig
from cronnx.observability.logs import LoggingSpec
from cronnx.workers.messages import WorkerSpec
from cronnx.workers.pinned_memory import CudaHostError, page_aligned_zeros
from cronnx.models.spec import inspect_model
from cronnx.ipc.ring import SlotRing
from cronnx.workers.child import BatchRunner, create_session
from support.client import predict_many
from support.models import batch_one_only_model, tiny_classifier
from support.reference import DirectModel, assert_matches
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
    from cronnx.models.catalog import powers_of_two_up_to

    assert powers_of_two_up_to(8) == [1, 2, 4, 8]
    assert powers_of_two_up_to(6) == [1, 2, 4, 6]
    assert powers_of_two_up_to(1) == [1]


def device_buffer_runner(model_path, ring, device_buffers, pinned_host_memory=False):
    """A worker's BatchRunner on the CPU EP over `ring`, buckets BUCKETS, with a solo session."""
    spec = inspect_model(str(model_path))
    worker_spec = WorkerSpec(model="tiny", version=1, index=0, model_path=str(model_path), model_spec=spec,
                             ring=ring.layout, batch_size=4, batch_buckets=BUCKETS, batch_timeout_s=0.002,
                             providers=["CPUExecutionProvider"], cuda_options={}, intra_op_threads=1,
                             inter_op_threads=1, solo_intra_op_threads=2, allow_spinning=False,
                             logging=LoggingSpec("critical", "text"), device_buffers=device_buffers, pinned_host_memory=pinned_host_memory)
    runner = BatchRunner(worker_spec, ring, lambda threads: create_session(worker_spec, threads))
    runner.warm_up()
    return runner


def test_device_buffers_bound_once_give_what_binding_ring_memory_gives(model):
    """The CUDA graph path (cuda.enable_cuda_graph): each session's input and output are fixed
    buffers bound once, the batch copied in and out. Run here with the buffers on "cpu": every
    batch shape (contiguous slots straight from the ring, gathered slots, padded, solo) answers
    exactly as the ring-bound runner does."""
    spec = inspect_model(str(model))
    ring = SlotRing(f"test_{uuid.uuid4().hex[:12]}", 8, spec.input_item_shape, spec.input_dtype,
                    spec.output_item_shape, spec.output_dtype)
    try:
        rng = np.random.default_rng(3)
        ring.inputs[:] = rng.normal(0, 1, ring.inputs.shape).astype(ring.inputs.dtype)
        plain, fixed = device_buffer_runner(model, ring, None), device_buffer_runner(model, ring, "cpu")
        for slots, solo in [([0], True), ([0], False), ([1, 2], False), ([4, 2, 7], False), ([3, 4, 5, 6], False),
                            ([0, 7, 2, 5], False)]:
            outputs = []
            for runner in (plain, fixed):
                ring.outputs[:] = np.nan
                assert runner.run(slots, solo) == bucket_for(len(slots))
                outputs.append(ring.outputs[slots].copy())
            assert np.isfinite(outputs[1]).all() and np.array_equal(outputs[0], outputs[1]), slots
        assert not np.array_equal(outputs[1][0], outputs[1][1])  # different inputs, different answers
    finally:
        ring.close()


def test_enable_cuda_graph_reaches_the_cuda_provider_only_when_asked():
    assert CudaConfig(enable_cuda_graph=True).provider_options(0)["enable_cuda_graph"] == "1"
    assert "enable_cuda_graph" not in CudaConfig().provider_options(0)


def test_cuda_options_default_to_exact_float32_and_name_the_device():
    assert CudaConfig().provider_options(None) == {"use_tf32": "0", "cudnn_conv_algo_search": "EXHAUSTIVE"}
    assert CudaConfig(use_tf32=True, cudnn_conv_algo_search="HEURISTIC", gpu_mem_limit_bytes=1 << 30
                      ).provider_options(1) == {"use_tf32": "1", "cudnn_conv_algo_search": "HEURISTIC",
                                                "device_id": "1", "gpu_mem_limit": str(1 << 30)}


def test_pinned_ring_memory_page_locks_the_ring_or_fails_the_load_with_cudas_reason(model):
    """cuda.pinned_ring_memory page-locks the ring with the CUDA runtime's cudaHostRegister. Where
    CUDA can (a GPU), the runner answers as the unpinned one does; where it cannot (here: a CUDA
    runtime without a driver, or none), the runner says why, naming the memory, which a worker
    reports as its load failure, and what was locked before is released."""
    spec = inspect_model(str(model))
    ring = SlotRing(f"test_{uuid.uuid4().hex[:12]}", 8, spec.input_item_shape, spec.input_dtype,
                    spec.output_item_shape, spec.output_dtype)
    try:
        ring.inputs[:] = np.random.default_rng(4).normal(0, 1, ring.inputs.shape).astype(ring.inputs.dtype)
        try:
            pinned = device_buffer_runner(model, ring, None, pinned_host_memory=True)
            reason = None
        except CudaHostError as exc:  # its traceback (holding views of the ring) goes with the block
            reason = str(exc)
        if reason is not None:
            assert ("cudaHostRegister of the ring's inputs" in reason and "error" in reason) or \
                "no CUDA runtime" in reason, reason
            return
        plain = device_buffer_runner(model, ring, None)
        outputs = []
        for runner in (plain, pinned):
            ring.outputs[:] = np.nan
            runner.run([0, 5, 2])
            outputs.append(ring.outputs[[0, 5, 2]].copy())
        pinned.close()
        assert np.isfinite(outputs[1]).all() and np.array_equal(outputs[0], outputs[1])
    finally:
        ring.close()


def test_pinned_ring_memory_applies_on_cuda_only(start_server, model, photos):
    """On the CPU EP the setting changes nothing (as every cuda setting): the model loads and
    serves what onnxruntime computes."""
    server = start_server(server_config(model_entry("tiny", model, cuda={"pinned_ring_memory": True})))
    reply, = asyncio.run(predict_many(f"{server.url}/predict/tiny", [photos[0].read_bytes()]))
    assert reply.status == 200
    assert_matches(reply.body, DirectModel(model).probabilities(photos[0].read_bytes()))


def test_page_aligned_zeros_share_no_page():
    a, b = page_aligned_zeros((3, 5), "float32"), page_aligned_zeros((2,), "uint8")
    assert a.shape == (3, 5) and a.dtype == np.float32 and not a.any() and a.flags.writeable
    assert a.ctypes.data % mmap.PAGESIZE == 0 and b.ctypes.data % mmap.PAGESIZE == 0
    assert abs(a.ctypes.data - b.ctypes.data) >= mmap.PAGESIZE
