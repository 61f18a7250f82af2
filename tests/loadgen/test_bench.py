"""`cronnx bench` reports what a server with known latency and failures really did."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support import metrics
from support.images import encode, photo_like
from support.models import tiny_classifier
from support.server import REPO, model_entry, server_config

FAKE_SERVER = Path(__file__).parents[1] / "support" / "fake_server.py"
FAKE_GRPC_SERVER = Path(__file__).parent / "fake_grpc_server.py"


class FakeServers:
    """fake_server(*args) -> base URL of a fake server started with those options;
    fake_server.process(url) -> the subprocess.Popen of the server at that URL."""

    def __init__(self, script: Path = FAKE_SERVER):
        self.script = script
        self._procs: dict[str, subprocess.Popen] = {}

    def __call__(self, *args: str) -> str:
        proc = subprocess.Popen([sys.executable, str(self.script), *args], stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        match = re.search(r"listening on (\d+)", line)
        if match is None:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"fake server did not start: {line!r}")
        url = f"http://127.0.0.1:{match.group(1)}"
        self._procs[url] = proc
        return url

    def process(self, url: str) -> subprocess.Popen:
        return self._procs[url]

    def stop_all(self) -> None:
        for proc in self._procs.values():
            proc.kill()
            proc.wait()
            proc.stdout.close()


@pytest.fixture
def fake_server():
    """Fake servers started by the test, each killed by its own process (never by name) after it."""
    servers = FakeServers()
    yield servers
    servers.stop_all()


@pytest.fixture
def fake_grpc_server():
    """As fake_server, for fake gRPC servers (fake_grpc_server.py); the URL's host:port is the target."""
    servers = FakeServers(FAKE_GRPC_SERVER)
    yield servers
    servers.stop_all()


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    path.write_bytes(encode(photo_like(320, 240, seed=3), "JPEG"))
    return path


def bench(url: str, image: Path | None, *args: str, timeout: float = 120) -> tuple[dict, str]:
    """`cronnx bench URL --model m [--image IMAGE] ARGS`: its last result and its output."""
    out = Path(f"/tmp/cronnx-bench-{time.monotonic_ns()}.json")
    images = ("--image", str(image)) if image is not None else ()
    try:
        result = subprocess.run([sys.executable, "-m", "cronnx", "bench", url, "--model", "m", *images,
                                 "--json", str(out), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, result.stderr
        return json.loads(out.read_text())[-1], result.stdout
    finally:
        out.unlink(missing_ok=True)


def test_closed_loop_throughput_and_latency_match_a_fixed_delay(fake_server, image):
    url = fake_server("--delay-ms", "20")
    r, text = bench(url, image, "--concurrency", "4", "--duration", "3", "--warmup", "0.5")
    # Four clients, 20 ms each: at most 200 req/s; the client and HTTP add a little.
    assert 160 <= r["requests_per_s"] <= 201, r
    assert 20.0 <= r["latency_ms"]["p50"] <= 26.0, r["latency_ms"]
    assert r["latency_ms"]["p99"] < 60.0
    assert r["errors_by_status"] == {} and r["errors_by_exception"] == {}
    assert "throughput" in text and "p99.9" in text


def test_error_counts_are_exact(fake_server, image):
    url = fake_server("--delay-ms", "2", "--error-every", "5")
    r, text = bench(url, image, "--concurrency", "2", "--requests", "200", "--warmup", "0")
    assert r["ok"] == 160
    assert r["errors_by_status"] == {"500": 40}
    assert "500: 40" in text


def test_a_503_with_retry_after_makes_the_client_wait_unless_told_not_to(fake_server, image):
    # One client; every 2nd request is a 503 with Retry-After: 1. Honoured, each 503 costs a
    # second: at most 3 of them in 2.5 s. Ignored, the client sends again at once: hundreds.
    url = fake_server("--busy-every", "2")
    polite, text = bench(url, image, "--concurrency", "1", "--duration", "2.5", "--warmup", "0")
    assert 1 <= polite["errors_by_status"]["503"] <= 3 and polite["ok"] <= 4, polite
    assert "503: " in text
    eager, _ = bench(url, image, "--concurrency", "1", "--duration", "2.5", "--warmup", "0", "--no-retry-after")
    assert eager["errors_by_status"]["503"] > 50, eager


def test_open_loop_shows_a_server_stall_in_the_tail(fake_server, image):
    # 100 req/s for 3 s; the server answers nothing for 0.5 s from 1.5 s on. Measured from the
    # intended send times, ~50 requests wait up to 0.5 s: the tail must show it.
    url = fake_server("--delay-ms", "5", "--stall-at", "1.5", "--stall-for", "0.5")
    r, _ = bench(url, image, "--rate", "100", "--duration", "3", "--warmup", "0")
    # The schedule held through the stall: the loop runs by intended send times, so all ~300 sends
    # of the 3 s (rate x duration) go out, and every one is answered once the stall ends. A load
    # generator that stopped sending at the stall would fall short of both. (How late the client's
    # own sends were depends on the machine's load, so it is not asserted.)
    assert r["loop"] == "open" and 280 <= r["sent"] <= 301, r
    assert r["ok"] == r["sent"], r
    assert r["errors_by_status"] == {} and r["errors_by_exception"] == {}, r
    assert r["latency_ms"]["p99"] >= 400.0, r["latency_ms"]
    assert r["latency_ms"]["p90"] >= 100.0, r["latency_ms"]
    assert r["latency_ms"]["p50"] < 50.0


def _kill_after(server, seconds: float) -> None:
    """Kill this test's server (by its pid) `seconds` from now, from a thread of its own."""
    def kill() -> None:
        time.sleep(seconds)
        server.kill()

    threading.Thread(target=kill, daemon=True).start()


def test_server_that_dies_mid_run_is_reported_with_the_numbers_so_far(fake_server, image):
    url = fake_server("--delay-ms", "5")
    server = fake_server.process(url)

    _kill_after(server, 1.5)
    r, text = bench(url, image, "--concurrency", "2", "--duration", "6", "--warmup", "0")
    assert r["ok"] > 50
    assert sum(r["errors_by_exception"].values()) > 0
    assert any("no answer" in w for w in r["warnings"]), r["warnings"]


def test_refused_connection_is_an_error_not_a_crash(image):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r, _ = bench(f"http://127.0.0.1:{port}", image, "--concurrency", "1", "--duration", "5", "--warmup", "0")
    assert r["ok"] == 0 and "ClientConnectorError" in r["errors_by_exception"]


def test_several_client_processes_add_up(fake_server, image):
    url = fake_server("--delay-ms", "10")
    r, _ = bench(url, image, "--concurrency", "4", "--procs", "2", "--requests", "120", "--warmup", "0.5")
    assert r["procs"] == 2 and r["ok"] == 120 and len(r["client_cpu_per_process"]) == 2


def test_against_cronnx_it_reads_batches_and_phases_from_the_server(start_server, tmp_path, image):
    model = tiny_classifier(tmp_path / "m.onnx", slow_layers=20)
    server = start_server(server_config(model_entry("m", model, batch_size=4, workers=1, ring_slots=4,
                                                    priority_levels=2)))
    # No warm-up: the server's counts before and after then cover exactly the measured requests.
    r, text = bench(server.url, image, "--concurrency", "8", "--requests", "80", "--warmup", "0")
    assert r["ok"] == 80
    # Eight clients, four slots: the summary says that half of them wait in the queue.
    assert ("8 clients are more than the model's 4 ring slots: up to 4 wait in its admission queue, which adds "
            "to their latency") in r["warnings"], r["warnings"]
    stats = r["server"]
    assert stats["batches"] >= 20 and abs(stats["mean_batch_size"] * stats["batches"] - 80) < 1e-6
    assert set(stats["phase_means_s"]) == {"read", "admission", "preprocess", "queue", "inference", "respond"}
    assert "batches, mean size" in text
    # --priority is sent as the request's priority: level 1 is served, level 3 is out of range.
    served, _ = bench(server.url, image, "--priority", "1", "--concurrency", "2", "--requests", "10", "--warmup", "0")
    refused, _ = bench(server.url, image, "--priority", "3", "--concurrency", "2", "--requests", "10", "--warmup", "0")
    assert served["ok"] == 10 and served["url"].endswith("/predict/m?priority=1")
    assert refused["ok"] == 0 and refused["errors_by_status"] == {"400": 10}


def test_capacity_warnings_say_whether_clients_wait_or_are_refused():
    from cronnx.loadgen.server_stats import capacity_warnings

    assert capacity_warnings(128, 128, 1000) == []
    assert "up to 72 wait" in capacity_warnings(200, 128, 1000)[0]
    assert "answered 503" in capacity_warnings(200, 128, 50)[0]
    assert "up to 872 wait" in capacity_warnings(1000, 128, 0)[0]  # 0: no bound


def test_histogram_keeps_relative_precision_at_the_tail():
    import numpy as np

    from cronnx.loadgen.histogram import LatencyHistogram

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(0.001, 0.010, 99_000), rng.uniform(1.0, 2.0, 1_000)])
    h = LatencyHistogram()
    for v in values:
        h.record(float(v))
    for q in (50, 90, 99, 99.9, 99.99):
        exact = float(np.percentile(values, q, method="inverted_cdf"))
        assert abs(h.percentile(q) - exact) <= 0.001 * exact, q
    assert h.percentile(100) == values.max() == h.max_s
    half = LatencyHistogram.from_sparse(h.to_sparse(), h.max_s)
    half.merge(h)
    assert half.total == 2 * len(values) and half.percentile(99.9) == h.percentile(99.9)


def test_sweep_runs_each_load_and_prints_a_table(fake_server, image):
    url = fake_server("--delay-ms", "10")
    out = Path(f"/tmp/cronnx-sweep-{time.monotonic_ns()}.json")
    try:
        result = subprocess.run([sys.executable, "-m", "cronnx", "bench", url, "--model", "m", "--image", str(image),
                                 "--sweep", "1,4", "--duration", "1.5", "--warmup", "0.2", "--json", str(out)],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        runs = json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
    assert [r["concurrency"] for r in runs] == [1, 4]
    # Four clients of a 10 ms server do about four times the work of one.
    assert 3.0 <= runs[1]["requests_per_s"] / runs[0]["requests_per_s"] <= 4.2
    assert "| closed loop, 1 client |" in result.stdout and "| closed loop, 4 clients |" in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="needs an environment without matplotlib")
def test_plot_without_matplotlib_is_refused_before_the_run_not_after(fake_server, image, tmp_path):
    url = fake_server("--delay-ms", "1")
    out = tmp_path / "r.json"
    result = subprocess.run([sys.executable, "-m", "cronnx", "bench", url, "--model", "m", "--image", str(image),
                             "--sweep", "1,2", "--duration", "1", "--warmup", "0", "--plot", str(tmp_path / "p.png"),
                             "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "checked before the run" in result.stderr, result.stderr
    assert "req/s" not in result.stdout and not out.exists()  # nothing was measured, so nothing was lost


# The protocols: /predict with images, V2 infer and gRPC's ModelInfer with the model's tensor.

def grpc_target(url: str) -> str:
    return url.removeprefix("http://")


def requests_counted(before: dict, after: dict):
    """counted(api, outcome=None) -> cronnx_requests_total of that API (and outcome) between the scrapes."""
    def counted(api: str, outcome: str | None = None) -> int:
        labels = {"api": api} if outcome is None else {"api": api, "outcome": outcome}
        return int(metrics.total(after, "cronnx_requests_total", **labels)
                   - metrics.total(before, "cronnx_requests_total", **labels))
    return counted


def test_each_protocol_is_counted_as_the_server_counts_it(start_server, tmp_path, image):
    # Two ring slots and one place in the queue for six clients that do not wait after a 503:
    # every protocol gets answers and refusals, and the server's counter of its API must say
    # the same of each, while the other APIs' counters stay put.
    model = tiny_classifier(tmp_path / "m.onnx", slow_layers=20)
    server = start_server(server_config(model_entry("m", model, batch_size=1, workers=1, ring_slots=2,
                                                    max_queue_size=1)), args=("--grpc-port", "0"))
    grpc_url = re.search(r"serving gRPC on ([\d.]+:\d+)", server.log()).group(1)
    options = {"predict": ("--image", str(image)), "v2": ("--protocol", "v2"),
               "grpc": ("--protocol", "grpc", "--grpc-url", grpc_url)}
    refusal = {"predict": "503", "v2": "503", "grpc": "UNAVAILABLE"}
    for protocol, args in options.items():
        before = metrics.scrape(server.url)
        r, text = bench(server.url, None, *args, "--concurrency", "6", "--requests", "120", "--warmup", "0",
                        "--no-retry-after")
        counted = requests_counted(before, metrics.scrape(server.url))
        assert r["protocol"] == protocol and f"({protocol})" in text
        assert r["errors_by_exception"] == {}, r
        assert set(r["errors_by_status"]) == {refusal[protocol]}, r
        assert r["ok"] > 0 and r["errors_by_status"][refusal[protocol]] > 0, r
        assert r["ok"] + r["errors_by_status"][refusal[protocol]] == 120, r
        assert r["ok"] == counted(protocol, "success"), (protocol, r)
        assert r["errors_by_status"][refusal[protocol]] == counted(protocol, "503"), (protocol, r)
        assert counted(protocol) == 120
        assert [counted(api) for api in options if api != protocol] == [0, 0], protocol


def test_v2_and_grpc_send_the_tensor_that_the_model_metadata_describes(start_server, tmp_path):
    # A model whose input is [N, 3, 16, 16]: a request of any other shape would be refused (400,
    # INVALID_ARGUMENT), so answers mean the shape came from the metadata.
    model = tiny_classifier(tmp_path / "m.onnx", size=16)
    server = start_server(server_config(model_entry("m", model, batch_size=2, workers=1)),
                          args=("--grpc-port", "0"))
    grpc_url = re.search(r"serving gRPC on ([\d.]+:\d+)", server.log()).group(1)
    v2, _ = bench(server.url, None, "--protocol", "v2", "--concurrency", "2", "--requests", "20", "--warmup", "0")
    rpc, _ = bench(server.url, None, "--protocol", "grpc", "--grpc-url", grpc_url, "--concurrency", "2",
                   "--requests", "20", "--warmup", "0", "--priority", "0")
    assert v2["ok"] == 20 and v2["url"] == f"{server.url}/v2/models/m/infer", v2
    assert rpc["ok"] == 20 and rpc["url"] == grpc_url, rpc
    assert rpc["server"]["batches"] >= 10  # the server's stats are read from its HTTP side


def test_grpc_unavailable_from_the_server_is_an_answer_and_its_pushback_is_honoured(fake_grpc_server):
    # Every 2nd call is UNAVAILABLE with grpc-retry-pushback-ms: 1000 (gRPC's Retry-After). It is
    # the server's answer, counted by its code; honoured, each costs a second.
    target = grpc_target(fake_grpc_server("--busy-every", "2"))
    args = ("--protocol", "grpc", "--grpc-url", target, "--concurrency", "1", "--duration", "2.5", "--warmup", "0")
    polite, text = bench("http://127.0.0.1:9", None, *args)
    assert 1 <= polite["errors_by_status"]["UNAVAILABLE"] <= 3 and polite["ok"] <= 4, polite
    assert polite["errors_by_exception"] == {} and "UNAVAILABLE: " in text
    eager, _ = bench("http://127.0.0.1:9", None, *args, "--no-retry-after")
    assert eager["errors_by_status"]["UNAVAILABLE"] > 50 and eager["errors_by_exception"] == {}, eager


def test_a_grpc_server_that_dies_mid_run_is_reported_with_the_numbers_so_far(fake_grpc_server):
    url = fake_grpc_server("--delay-ms", "5")
    server = fake_grpc_server.process(url)

    _kill_after(server, 1.5)
    r, _ = bench("http://127.0.0.1:9", None, "--protocol", "grpc", "--grpc-url", grpc_target(url),
                 "--concurrency", "2", "--duration", "6", "--warmup", "0")
    assert r["ok"] > 50 and r["errors_by_status"] == {}, r
    assert r["errors_by_exception"].get("grpc UNAVAILABLE", 0) > 0, r
    assert any("no answer" in w for w in r["warnings"]), r["warnings"]


@pytest.mark.parametrize("channels, connections", [("per-client", 4), ("shared", 1)])
def test_grpc_clients_each_have_a_connection_or_share_one(fake_grpc_server, tmp_path, channels, connections):
    peers = tmp_path / "peers"
    target = grpc_target(fake_grpc_server("--delay-ms", "5", "--peers", str(peers)))
    r, _ = bench("http://127.0.0.1:9", None, "--protocol", "grpc", "--grpc-url", target, "--grpc-channels",
                 channels, "--concurrency", "4", "--requests", "80", "--warmup", "0")
    assert r["ok"] == 80
    assert len(peers.read_text().split()) == connections


def refused(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "cronnx", "bench", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode != 0 and "req/s" not in result.stdout, result
    return result


def test_options_that_do_not_go_together_are_refused_before_the_run(image):
    assert "not images" in refused("--protocol", "v2", "--image", str(image)).stderr
    assert "needs --grpc-url" in refused("--protocol", "grpc").stderr
    assert "--grpc-url is for --protocol grpc" in refused("--grpc-url", "127.0.0.1:1", "--image", str(image)).stderr
    assert "base URL" in refused("http://127.0.0.1:1/predict/m", "--protocol", "v2").stderr


def test_without_the_model_metadata_v2_and_grpc_are_refused_before_the_run():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    v2 = refused(f"http://127.0.0.1:{port}", "--protocol", "v2", "--model", "m")
    assert v2.returncode == 1 and f"GET http://127.0.0.1:{port}/v2/models/m failed" in v2.stderr, v2.stderr
    rpc = refused("--protocol", "grpc", "--grpc-url", f"127.0.0.1:{port}", "--model", "m")
    assert rpc.returncode == 1 and "ModelMetadata of 'm'" in rpc.stderr and "UNAVAILABLE" in rpc.stderr, rpc.stderr


def test_the_tensor_has_the_metadata_shape_with_one_row_and_the_same_values_every_time():
    import numpy as np

    from cronnx.loadgen.payloads import PayloadError, input_tensor

    metadata = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 4, 4]}]}
    tensor = input_tensor(metadata, "m")
    values = np.frombuffer(tensor.data, np.float32)
    assert (tensor.name, tensor.datatype, tensor.shape) == ("input", "FP32", [1, 3, 4, 4])
    assert values.size == 48 and np.isfinite(values).all() and values.std() > 0.5
    assert input_tensor(metadata, "m") == tensor
    # gRPC's metadata as a dict gives int64 dimensions as strings.
    grpc_style = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": ["-1", "8"]}]}
    assert input_tensor(grpc_style, "m").shape == [1, 8] and len(input_tensor(grpc_style, "m").data) == 8
    with pytest.raises(PayloadError, match="2 inputs"):
        input_tensor({"inputs": metadata["inputs"] * 2}, "m")
    with pytest.raises(PayloadError, match="BYTES"):
        input_tensor({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [-1]}]}, "m")
