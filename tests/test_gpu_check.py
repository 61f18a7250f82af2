"""bench/gpu_check.py --quick --provider cpu: every part runs, its numbers hold up, nothing is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support.images import encode, photo_like
from support.server import REPO, children, pid_alive, shm_segments

SCRIPT = REPO / "bench" / "gpu_check.py"
PARTS = ("setup", "onnxruntime", "preprocess", "served", "gpu", "parity")

# The first test runs the check (about 20-60 s on 2 cores; the subprocess is stopped at 180 s).
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, demo_model) -> dict:
    """One smoke run of the whole check on the CPU EP; its JSON. Photo-like 1600 px JPEGs stand in
    for bench/photos (which needs a download) so that the test runs offline."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    photos = tmp / "photos"
    photos.mkdir()
    for i, size in enumerate([(1600, 1200), (1200, 1600), (1600, 1067)]):
        (photos / f"photo{i}-1600.jpg").write_bytes(encode(photo_like(*size, seed=i), "JPEG", quality=92))
    out = tmp / "gpu_check.json"
    # Other tests may have left long-lived children of this process (multiprocessing's resource
    # tracker): only what the check starts must be gone when it ends.
    before = set(children(os.getpid()))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--provider", "cpu", "--photos", str(photos),
                           "--json", str(out), "--markdown", str(tmp / "gpu_check.md")],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert set(children(os.getpid())) <= before
    result = json.loads(out.read_text())
    result["markdown"] = (tmp / "gpu_check.md").read_text()
    return result


def test_every_part_runs_without_error(quick_run):
    assert quick_run["meta"]["provider"] == "CPUExecutionProvider"
    assert quick_run["meta"]["buckets"] == [1, 2, 4]
    for part in PARTS:
        assert quick_run["parts"][part]["error"] is None, (part, quick_run["parts"][part]["error"])
    assert quick_run["total_s"] < 150
    assert "| mobilenetv2 | 16 |" in quick_run["markdown"]


def test_onnxruntime_alone_has_a_row_per_bucket(quick_run):
    model = quick_run["parts"]["onnxruntime"]["models"]["mobilenetv2"]
    assert [row["batch"] for row in model["buckets"]] == [1, 2, 4]
    for row in model["buckets"]:
        assert row["host"]["img_per_s"] > 0 and row["host"]["ms_per_batch"] > 0 and row["host"]["runs"] >= 1
        assert "device" not in row  # the device-input rows are for CUDA only
    alternating = model["alternating"]
    assert [row["batch"] for row in alternating["rows"]] == [1, 2, 4]
    assert all(row["ms_alternating"] > 0 and row["slowdown"] > 0 for row in alternating["rows"])


def test_preprocessing_limit_is_positive(quick_run):
    part = quick_run["parts"]["preprocess"]
    assert part["workers"] == os.cpu_count()
    assert part["threads"]["img_per_s"] > 0
    assert part["processes"]["img_per_s"] > 0


def test_served_runs_answer_every_request(quick_run):
    served = quick_run["parts"]["served"]["models"]["mobilenetv2"]
    runs = served["runs"]
    assert [run["clients"] for run in runs] == [1, 16]
    for run in runs:
        assert run["sent"] > 0
        assert run["ok"] == run["sent"]
        assert run["errors"] == 0
        # The server's own count spans the warm-up too.
        assert run["server_answered_incl_warmup"] >= run["ok"]
        assert run["mean_batch"] >= 1 and run["batch_sizes"]
        assert run["phases_ms"]["inference"] > 0
        assert run["server_cpu_cores"] > 0
    assert runs[1]["procs"] == 2
    assert served["worker_providers"] == ["CPUExecutionProvider"]
    assert sum(served["bucket_runs"].values()) > 0
    # The server shut down by itself: nothing had to be killed or unlinked for it.
    assert served["cleanup"] == {"exit_code": 0, "killed_leftover_pids": [], "removed_shm": []}
    gpu = quick_run["parts"]["gpu"]
    assert gpu["status"] in ("n/a", "sampled")


def test_parity_on_cpu_is_exact(quick_run):
    parity = quick_run["parts"]["parity"]["models"]["mobilenetv2"]
    (variant,) = parity["variants"]
    assert variant["label"] == "CPU EP"
    assert variant["max_abs_diff"] < 1e-6
    assert variant["top1_agree"] == parity["photos"] == 3
    assert parity["served"]["answers"] == 3
    assert parity["served"]["top5_ids_match"] == 3
    assert parity["served"]["max_abs_diff_top5"] < 1e-5


def test_nothing_is_left_behind(quick_run):
    server = quick_run["parts"]["served"]["models"]["mobilenetv2"]["server_pid"]
    assert shm_segments(server) == []
    assert quick_run["leftover_processes"] == []
    assert quick_run["started_pids"]
    assert [pid for pid in quick_run["started_pids"] if pid_alive(pid)] == []
