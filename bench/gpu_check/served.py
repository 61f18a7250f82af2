"""Cronnx served: `cronnx serve` with a generated config, once per decoding placement, loaded by
`cronnx bench`.

The config: the model, 1 worker, devices [0] on CUDA, the batch size and its buckets, ring_slots
>= clients, on 127.0.0.1; decoding in threads (preprocess_threads = cores, in the server process),
processes (preprocess_processes = cores) or fronts (front_processes = --fronts, each decoding in
its share of cores threads). Each placement is loaded by `cronnx bench` (closed loop, raw bodies)
at each --clients (more than one spread over --procs client processes): img/s, p50 and p99 in ms,
errors, the server's batch sizes and phases as `cronnx bench` reports them, the server's CPU use in
cores (sampling.Sampler), the batches each bucket ran (/models), and the preprocessing or front
processes seen under the server and their restarts (/metrics). Every server is stopped (its
process group, by pid) and its shared memory checked and removed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path

import msgspec

from cronnx.loadgen import server_stats

from bench.processes import StartedProcesses, reap_group, server_children
from bench.serving import REPO, Served, free_port

from .failures import describe
from .plan import CPU, CUDA, Plan
from .sampling import Sampler

SERVED_PHOTOS = 3  # photos whose served answers are compared with a direct CPU run (parity.py)
TOP_K = 5


class ServedPart:
    """The served part: each model served in each placement of the plan; what the servers answered
    is kept for parity.py."""

    def __init__(self, plan: Plan, started: StartedProcesses):
        self.plan, self.started = plan, started
        self.answers: dict[str, dict[str, list[dict]]] = {}  # model -> placement -> /predict answers

    def measure(self, name: str, photo_paths: list[Path]) -> dict:
        """The model served once per placement; one placement's failure is recorded and the next
        still runs."""
        placements, errors = {}, []
        for placement in self.plan.placements:
            try:
                placements[placement] = self._served_with(name, placement, photo_paths)
            except (Exception, SystemExit) as exc:
                traceback.print_exc()
                placements[placement] = {"error": describe(exc)}
                errors.append(f"{placement}: {describe(exc)}")
        return {"placements": placements, "error": "; ".join(errors) or None}

    def config(self, name: str, port: int, placement: str) -> dict:
        """The generated `cronnx serve` config for this model and placement."""
        plan = self.plan
        model = {"name": name, "path": str(plan.model_paths[name]), "batch_size": plan.batch_size,
                 "batch_buckets": plan.buckets, "workers": 1,
                 "providers": [CUDA, CPU] if plan.cuda else [CPU],
                 # Every client's request holds a slot: fewer slots than clients would answer 503.
                 "ring_slots": min(4096, max(64, 2 * plan.batch_size, max(plan.clients) + plan.batch_size))}
        if plan.cuda:
            model["devices"] = [0]
            cuda = {"enable_cuda_graph": plan.cuda_graph, "pinned_ring_memory": plan.pinned_ring_memory}
            model["cuda"] = {key: True for key, on in cuda.items() if on}
        server = {"host": "127.0.0.1", "port": port}
        # Both set explicitly: unset, a model on CUDA would get processes in either placement.
        if placement == "processes":
            server["preprocess_processes"] = plan.cores
        elif placement == "fronts":
            server.update(front_processes=plan.fronts, preprocess_threads=plan.cores)
        else:
            server.update(preprocess_processes=0, preprocess_threads=plan.cores)
        return {"server": server, "models": [model]}

    def _served_with(self, name: str, placement: str, photo_paths: list[Path]) -> dict:
        plan = self.plan
        where = f"{plan.fronts} front processes, {plan.cores} threads in all" if placement == "fronts" else \
            f"{plan.cores} {placement}"
        print(f"  {name}, preprocessing in {where}:", flush=True)
        with tempfile.TemporaryDirectory(prefix="cronnx-gpu-check-") as tmp:
            workdir = Path(tmp)
            port = free_port()
            config = self.config(name, port, placement)
            config_path = workdir / "cronnx.yaml"
            config_path.write_bytes(msgspec.yaml.encode(config))
            log = workdir / "server.log"
            # sh execs the server with its output in the log: the pid is the server's.
            command = ["sh", "-c", 'exec "$@" >"$0" 2>&1', str(log), sys.executable, "-m", "cronnx", "serve",
                       "--config", str(config_path)]
            base = f"http://127.0.0.1:{port}"
            server = Served(f"cronnx serve ({name}, {placement})", command, base, "/ready")
            sampler = None
            try:
                began = time.monotonic()
                with server:
                    ready_s = time.monotonic() - began
                    status = _models_status(base, name)
                    workers = {w["pid"] for w in status["workers"] if w.get("pid")}
                    self.started.add(workers)
                    children = server_children(server.process.pid, workers)
                    self.started.add(children)
                    sampler = Sampler(server.process.pid, plan.nvidia_smi, workers)
                    sampler.start()
                    answers = [_predict(base, name, p) for p in photo_paths[:SERVED_PHOTOS]]
                    self.answers.setdefault(name, {})[placement] = answers
                    runs = [{"preprocessing": placement,
                             **self._load(base, name, clients, photo_paths, sampler, workdir)}
                            for clients in plan.clients]
                    status = _models_status(base, name)
                    after = server_children(server.process.pid, {w["pid"] for w in status["workers"]})
                    self.started.add(pid for pid in after if pid not in children)
                    metrics = server_stats.scrape(server_stats.metrics_url(base + "/"))
            except (Exception, SystemExit) as exc:
                raise RuntimeError(f"{describe(exc)}; server log: {_log_tail(log)}") from None
            finally:
                if sampler is not None:
                    sampler.stop()
                process = getattr(server, "process", None)
                cleanup = {}
                if process is not None:
                    self.started.add([process.pid], leads_group=True)
                    cleanup = reap_group(process)
            worker = status["workers"][0] if status["workers"] else {}
            restarts = None if metrics is None else metrics.get(("cronnx_preprocess_process_restarts_total",
                                                                  frozenset()))
            restarts = None if restarts is None else int(restarts)
            return {"preprocessing": {
                        "placement": placement, "configured": plan.fronts if placement == "fronts" else plan.cores,
                        # Children of the server other than its worker and the resource tracker.
                        "processes_at_start": len(children), "processes_at_end": len(after),
                        "process_restarts": restarts},
                    "server_pid": process.pid, "ready_s": ready_s, "config": config, "runs": runs,
                    "worker_providers": worker.get("providers"), "bucket_runs": worker.get("bucket_runs"),
                    "items_failed": worker.get("items_failed"), "restarts": worker.get("restarts"), "cleanup": cleanup}

    def _load(self, base: str, name: str, clients: int, photo_paths: list[Path], sampler: Sampler,
              workdir: Path) -> dict:
        """One `cronnx bench` run (a subprocess of its own group), with the server's CPU and the GPU
        over its measuring window, and the server's own count of answered requests."""
        plan = self.plan
        procs = 1 if clients == 1 else min(plan.procs, clients)
        warmup = 0.5 if plan.quick else (1.0 if clients == 1 else 2.0)
        out = workdir / f"bench_{clients}.json"
        command = [sys.executable, "-m", "cronnx", "bench", base, "--model", name, "--mode", "raw",
                   "--concurrency", str(clients), "--duration", str(plan.seconds), "--warmup", str(warmup),
                   "--procs", str(procs), "--json", str(out)]
        for photo in photo_paths:
            command += ["--image", str(photo)]
        metrics = server_stats.metrics_url(base + "/")
        before = server_stats.scrape(metrics)
        launched = time.monotonic()
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.started.add([proc.pid], leads_group=True)
        try:
            text, _ = proc.communicate(timeout=120 + warmup + plan.seconds)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        exited = time.monotonic()
        after = server_stats.scrape(metrics)
        if proc.returncode != 0:
            raise RuntimeError(f"cronnx bench exited with {proc.returncode}: {text[-1500:]}")
        r = json.loads(out.read_text())[0]
        # The window ended before the last answers came in and the client wrote its report; the
        # load ran the same during the warm-up before it, so the interval may reach into that.
        p99_s = (r["latency_ms"]["p99"] or 0.0) / 1000.0
        end = exited - 0.3 - p99_s
        start = max(end - r["window_s"], launched + 1.0 + (3.0 if procs > 1 else 0.1))
        answered = None
        if before is not None and after is not None:
            answered = int(server_stats._sum(after, "cronnx_requests_total", model=name, outcome="success")
                           - server_stats._sum(before, "cronnx_requests_total", model=name, outcome="success"))
        server = r["server"] or {}
        run = {"clients": clients, "procs": r["procs"], "img_per_s": r["images_per_s"], "ok": r["ok"],
               "sent": r["sent"], "p50_ms": r["latency_ms"]["p50"], "p99_ms": r["latency_ms"]["p99"],
               "errors": sum(r["errors_by_status"].values()) + sum(r["errors_by_exception"].values()),
               "mean_batch": server.get("mean_batch_size"), "batch_sizes": server.get("batch_sizes"),
               "phases_ms": {k: v * 1000.0 for k, v in (server.get("phase_means_s") or {}).items()},
               "server_answered_incl_warmup": answered, **sampler.over(start, end), "bench": r}
        print(f"    {clients} clients: {run['img_per_s']:.1f} img/s, p50 {run['p50_ms']:.2f} ms, "
              f"p99 {run['p99_ms']:.2f} ms, {run['ok']}/{run['sent']} ok, mean batch "
              f"{run['mean_batch'] or 0:.2f}, server CPU {run['server_cpu_cores'] or 0:.2f} cores"
              + (f", GPU {run['gpu']['util_mean_pct']:.0f}%" if run["gpu"] else ""), flush=True)
        return run


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(none)"


def _models_status(base: str, name: str) -> dict:
    with urllib.request.urlopen(f"{base}/models", timeout=10) as response:
        models = json.loads(response.read())["models"]
    return next(m for m in models if m["name"] == name)


def _predict(base: str, name: str, photo: Path) -> dict:
    request = urllib.request.Request(f"{base}/predict/{name}?top_k={TOP_K}", data=photo.read_bytes(),
                                     headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    return {"photo": photo.name, "predictions": body["predictions"], "batch_size": body["batch_size"]}
