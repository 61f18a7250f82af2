"""python -m bench.gpu_check --quick --provider cpu: every part runs, its numbers hold up, nothing is left behind.

The CUDA-only rows (CUDA graphs, pinned host memory) are "n/a on CPU" in that run; their procedures
are checked here by calling them with device "cpu" on the CPU EP, and their table is drawn from
those rows as the GPU run would draw it.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from cronnx.models.spec import inspect_model
from support.images import encode, photo_like
from support.server import REPO, children_of, pid_alive, shm_segments

CHECK = [sys.executable, "-m", "bench.gpu_check"]  # from the repo root, as bench/gpu_device_run.sh runs it
PARTS = ("setup", "onnxruntime", "preprocess", "served", "gpu", "parity")
PLACEMENTS = ("threads", "processes", "fronts")
NA_CPU = "n/a on CPU (CUDA EP only)"

# The first test runs the check (about 20-60 s on 2 cores; the subprocess is stopped at 180 s).
pytestmark = [pytest.mark.timeout(240), pytest.mark.server]


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
    before = set(children_of(os.getpid()))
    proc = subprocess.run([*CHECK, "--quick", "--provider", "cpu", "--photos", str(photos),
                           "--json", str(out), "--markdown", str(tmp / "gpu_check.md")],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert set(children_of(os.getpid())) <= before
    result = json.loads(out.read_text())
    result["markdown"] = (tmp / "gpu_check.md").read_text()
    return result


def test_every_part_runs_without_error(quick_run):
    assert quick_run["meta"]["provider"] == "CPUExecutionProvider"
    assert quick_run["meta"]["buckets"] == [1, 2, 4]
    for part in PARTS:
        assert quick_run["parts"][part]["error"] is None, (part, quick_run["parts"][part]["error"])
    assert quick_run["total_s"] < 150
    assert quick_run["partial"] is False
    assert quick_run["meta"]["preprocessing_placements"] == list(PLACEMENTS)
    for placement in PLACEMENTS:
        assert f"| mobilenetv2 | {os.cpu_count()} {placement} | 16 |" in quick_run["markdown"]


def test_parts_limits_a_run_to_the_parts_named(tmp_path, demo_model):
    """--parts: a second, shorter run on the GPU machine (say, served again with a CUDA setting
    on) runs only what it names, after setting up the models, and draws only those tables."""
    (tmp_path / "photo-1600.jpg").write_bytes(encode(photo_like(1600, 1200, seed=5), "JPEG", quality=92))
    out = tmp_path / "parts.json"
    proc = subprocess.run([*CHECK, "--quick", "--provider", "cpu", "--photos", str(tmp_path),
                           "--parts", "preprocess", "--seconds", "0.5", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert set(result["parts"]) == {"setup", "preprocess"} and result["meta"]["parts"] == ["preprocess"]
    assert result["parts"]["preprocess"]["error"] is None and result["parts"]["preprocess"]["threads"]["img_per_s"] > 0
    assert "Preprocessing limit" in proc.stdout and "Served (" not in proc.stdout and "Parity" not in proc.stdout
    refused = subprocess.run([*CHECK, "--quick", "--provider", "cpu", "--parts", "servd"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "unknown parts ['servd']" in refused.stderr


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


def test_onnxruntime_cuda_only_rows_are_na_on_cpu(quick_run):
    model = quick_run["parts"]["onnxruntime"]["models"]["mobilenetv2"]
    assert model["cuda_graph"] == {"status": NA_CPU}
    assert model["host_memory"] == {"status": NA_CPU}
    assert all(set(row) == {"batch", "host"} for row in model["buckets"])
    assert f"CUDA graphs: {NA_CPU}." in quick_run["markdown"]
    assert f"Pinned against pageable host memory: {NA_CPU}." in quick_run["markdown"]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_served_runs_answer_every_request(quick_run, placement):
    served = quick_run["parts"]["served"]["models"]["mobilenetv2"]["placements"][placement]
    runs = served["runs"]
    assert [run["clients"] for run in runs] == [1, 16]
    for run in runs:
        assert run["preprocessing"] == placement
        assert run["sent"] > 0
        assert run["ok"] == run["sent"]
        assert run["errors"] == 0
        assert run["img_per_s"] > 0
        # The server's own count spans the warm-up too.
        assert run["server_answered_incl_warmup"] >= run["ok"]
        assert run["mean_batch"] >= 1 and run["batch_sizes"]
        assert run["phases_ms"]["inference"] > 0
        assert run["server_cpu_cores"] > 0
        assert run["server_cpu_by_part_cores"]["worker processes"] > 0
    assert runs[1]["procs"] == 2
    assert served["worker_providers"] == ["CPUExecutionProvider"]
    assert sum(served["bucket_runs"].values()) > 0
    # The server shut down by itself: nothing had to be killed or unlinked for it.
    assert served["cleanup"] == {"exit_code": 0, "killed_leftover_pids": [], "removed_shm": []}
    gpu = quick_run["parts"]["gpu"]
    assert gpu["status"] in ("n/a", "sampled")
    assert {(row["preprocessing"], row["clients"]) for row in gpu.get("runs", [])} <= {
        (p, c) for p in PLACEMENTS for c in (1, 16)}


def test_processes_placement_decodes_in_preprocessing_processes(quick_run):
    placements = quick_run["parts"]["served"]["models"]["mobilenetv2"]["placements"]
    cores = os.cpu_count()
    processes, threads = placements["processes"], placements["threads"]
    assert processes["config"]["server"]["preprocess_processes"] == cores
    assert "preprocess_threads" not in processes["config"]["server"]
    assert threads["config"]["server"]["preprocess_threads"] == cores
    # Explicitly 0: unset, a model on CUDA would get processes in the threads placement too.
    assert threads["config"]["server"]["preprocess_processes"] == 0
    # One process per core under the server from start to end, none replaced; none with threads.
    assert processes["preprocessing"] == {"placement": "processes", "configured": cores, "processes_at_start": cores,
                                          "processes_at_end": cores, "process_restarts": 0}
    assert threads["preprocessing"]["processes_at_start"] == threads["preprocessing"]["processes_at_end"] == 0
    # Front processes are the server's children besides its worker: the preprocessing threads are theirs.
    fronts = placements["fronts"]
    assert fronts["config"]["server"]["front_processes"] == 2 and fronts["config"]["server"]["preprocess_threads"] == cores
    assert fronts["preprocessing"]["processes_at_start"] == fronts["preprocessing"]["processes_at_end"] == 2
    for run in fronts["runs"]:
        assert run["server_cpu_by_part_cores"]["other child processes"] > 0.1
    # The decoding CPU is in the children with processes, in the server process's threads with
    # threads.
    for run in processes["runs"]:
        assert run["server_cpu_by_part_cores"]["other child processes"] > 0.1
    for run in threads["runs"]:
        assert run["server_cpu_by_part_cores"]["other child processes"] < 0.05
        assert run["server_cpu_by_part_cores"]["other threads"] > 0.1


def test_parity_on_cpu_is_exact(quick_run):
    parity = quick_run["parts"]["parity"]["models"]["mobilenetv2"]
    (variant,) = parity["variants"]
    assert variant["label"] == "CPU EP"
    assert variant["max_abs_diff"] < 1e-6
    assert variant["top1_agree"] == parity["photos"] == 3
    assert set(parity["served"]) == set(PLACEMENTS)
    for served in parity["served"].values():
        assert served["answers"] == 3
        assert served["top5_ids_match"] == 3
        assert served["max_abs_diff_top5"] < 1e-5


def test_gpu_targets_are_computed_from_the_runs_rows(quick_run, gpu_check):
    parts = quick_run["parts"]
    targets = gpu_check.targets.gpu_targets(parts)
    alone = {row["batch"]: row["host"] for row in parts["onnxruntime"]["models"]["mobilenetv2"]["buckets"]}
    bound = min(max(r["img_per_s"] for r in alone.values()),
                max(parts["preprocess"][how]["img_per_s"] for how in ("threads", "processes")))
    throughput = [t for t in targets if t["target"].startswith("img/s")]
    runs = [r for p in parts["served"]["models"]["mobilenetv2"]["placements"].values() for r in p["runs"]]
    assert len(throughput) == 1 and throughput[0]["limit"] == pytest.approx(0.85 * bound)
    assert throughput[0]["measured"] == max(r["img_per_s"] for r in runs if r["clients"] == 16)
    latency = {t["placement"]: t for t in targets if t["target"].startswith("p50")}
    assert set(latency) == set(PLACEMENTS)
    budget = parts["preprocess"]["threads"]["ms_per_image_per_worker"] + alone[1]["ms_per_batch"] + 1.0
    assert all(t["limit"] == pytest.approx(budget) and t["met"] == (t["measured"] <= budget) for t in latency.values())
    per_batch = {t["placement"]: t for t in targets if t["target"].startswith("inference")}
    assert set(per_batch) == set(PLACEMENTS)
    for placement, p in parts["served"]["models"]["mobilenetv2"]["placements"].items():
        run = next(r for r in p["runs"] if r["clients"] == 16)
        bucket = min(b for b in alone if b >= run["mean_batch"])
        assert per_batch[placement]["limit"] == pytest.approx(1.2 * alone[bucket]["ms_per_batch"])
        assert per_batch[placement]["measured"] == run["phases_ms"]["inference"]
    assert "The GPU targets, from this run (`gpu_targets`)" in quick_run["markdown"]


def test_nothing_is_left_behind(quick_run):
    for placement in quick_run["parts"]["served"]["models"]["mobilenetv2"]["placements"].values():
        assert shm_segments(placement["server_pid"]) == []
    assert quick_run["leftover_processes"] == []
    assert quick_run["started_pids"]
    assert [pid for pid in quick_run["started_pids"] if pid_alive(pid)] == []


# --- the CUDA-only procedures, run on the CPU EP -------------------------------------------------

MODULES = ("cli", "cuda_graph", "host_memory", "onnxruntime_alone", "plan", "report", "sessions", "targets")


@pytest.fixture(scope="module")
def gpu_check():
    """The package's modules (imported with the repo root on sys.path, as `python -m` from there
    has it; bench's scripts put the repo and bench/ on it too: all that is undone after)."""
    saved = list(sys.path)
    sys.path.insert(0, str(REPO))
    try:
        return SimpleNamespace(**{name: importlib.import_module(f"bench.gpu_check.{name}") for name in MODULES})
    finally:
        sys.path[:] = saved


@pytest.fixture(scope="module")
def on_cpu(gpu_check, demo_model):
    """A quick CPU plan, the demo model's spec and its bucket-2 session, and two different inputs."""
    args = gpu_check.cli.parse_args(["--provider", "cpu", "--quick", "--models", "mobilenetv2", "--photos",
                                     str(REPO), "--glob", "*.jpg"])
    plan = gpu_check.plan.Plan(args)
    spec = inspect_model(str(demo_model))
    x = np.random.default_rng(0).random((2, *spec.input_item_shape), dtype=np.float32)
    return plan, spec, gpu_check.sessions.make_session(demo_model, plan.provider), x


def test_cuda_graph_procedure_reads_each_new_input(gpu_check, on_cpu, demo_model):
    plan, spec, session, x = on_cpu
    row = gpu_check.cuda_graph.graph_row(plan, demo_model, spec, x, 2, session, device="cpu")
    for timed in (row["graph"], row["no_graph"]):
        assert timed["runs"] >= 3 and timed["img_per_s"] > 0
        assert timed["copy_in_ms"] > 0 and timed["run_ms"] > 0 and timed["copy_out_ms"] > 0
        assert timed["ms_per_batch"] >= timed["run_ms"]
    assert row["speedup_total"] > 0 and len(row["first_runs_ms"]) == 4 and min(row["first_runs_ms"]) > 0
    assert row["max_abs_diff_vs_no_graph"] < 1e-5
    assert row["output_follows_input"] is True


def test_cuda_graph_check_catches_an_input_that_is_not_copied_in(gpu_check, on_cpu, demo_model, monkeypatch):
    """Negative control: with update_inplace doing nothing, every run sees the same (stale) input."""
    plan, spec, session, x = on_cpu
    monkeypatch.setattr(ort.OrtValue, "update_inplace", lambda self, data: None)
    with np.errstate(all="ignore"):
        row = gpu_check.cuda_graph.graph_row(plan, demo_model, spec, x, 2, session, device="cpu")
    assert row["output_follows_input"] is False


def test_host_memory_row_says_why_pinned_memory_is_not_measurable_here(gpu_check, on_cpu):
    plan, spec, session, x = on_cpu
    pageable = {"ms_per_batch": 10.0, "img_per_s": 200.0, "runs": 5}
    sources = gpu_check.host_memory.PinnedSources()
    row = gpu_check.host_memory.host_memory_row(plan, sources, session, spec, x, 2, pageable, device="cpu")
    assert row["pageable"]["run"] == pageable and row["pageable"]["copy_in_ms"] > 0
    # This build lists no CUDA EP device, and no CUDA runtime is loaded: both ways say so, nothing is faked.
    assert row["onnxruntime_pinned"]["status"].startswith("not measurable from Python: ")
    assert "CUDAExecutionProvider" in row["onnxruntime_pinned"]["status"]
    assert row["cuda_host_register"]["status"].startswith("not measurable from Python: ")
    assert set(sources.status()) == {"onnxruntime_pinned", "cuda_host_register"}


def test_cuda_tables_are_drawn_from_rows_and_errors(gpu_check, on_cpu, demo_model):
    """The markdown of a CUDA run, drawn from rows the procedures above produce: a failed row shows
    its error and the other rows still show."""
    plan, spec, session, x = on_cpu
    host = {"ms_per_batch": 10.0, "img_per_s": 200.0, "runs": 5}
    sources = gpu_check.host_memory.PinnedSources()
    good = {"batch": 2, "host": host, "device": {"ms_per_batch": 9.0, "img_per_s": 222.0, "runs": 5},
            "cuda_graph": gpu_check.cuda_graph.graph_row(plan, demo_model, spec, x, 2, session, device="cpu"),
            "host_memory": gpu_check.host_memory.host_memory_row(plan, sources, session, spec, x, 2, host,
                                                                 device="cpu")}
    failed = {"batch": 4, "host": host, "device": {"error": "RuntimeError: no device"},
              "cuda_graph": {"error": "Fail: This session cannot use the graph capture feature"},
              "host_memory": {"error": "RuntimeError: cudaHostRegister failed"}}
    rows = [good, failed]
    row_status = gpu_check.onnxruntime_alone.row_status
    model = {"buckets": rows, "alternating": {"rows": []}, "cuda_graph": row_status(rows, "cuda_graph"),
             "host_memory": {**row_status(rows, "host_memory"), "sources": sources.status()}}
    assert model["cuda_graph"]["status"] == "failed in 1 of 2 buckets"
    result = {"meta": {**plan.meta(), "provider": "CUDAExecutionProvider"}, "timings_s": {},
              "parts": {"onnxruntime": {"error": None, "models": {"mobilenetv2": model}}}}
    table = gpu_check.report.markdown(result)
    assert "| mobilenetv2 | 2 | 10.00 | 200.0 | 9.00 | 222.0 |" in table
    assert "| mobilenetv2 | 4 | 10.00 | 200.0 | error: RuntimeError: no device |" in table
    assert f"| mobilenetv2 | 2 | {row_cells(good['cuda_graph'])}" in table
    assert "| mobilenetv2 | 4 | error: Fail: This session cannot use the graph capture feature |" in table
    assert "- onnxruntime pinned: not measurable from Python: " in table
    assert "| mobilenetv2 | 2 | 10.000 | not measurable | not measurable |" in table
    assert "| mobilenetv2 | 4 | error: RuntimeError: cudaHostRegister failed |" in table
    assert "(run not finished)" in table


def row_cells(graph_row: dict) -> str:
    timed = graph_row["graph"]
    return f"{timed['copy_in_ms']:.3f} / {timed['run_ms']:.3f} / {timed['copy_out_ms']:.3f} |"
