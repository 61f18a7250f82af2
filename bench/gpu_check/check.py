"""One run of the check: the models and photos set up, then each part of the plan in turn, each
part's error and seconds recorded without ending the run, and every process it started gone at
the end."""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import onnxruntime as ort

from bench.limit import ensure_model
from bench.photos import DEFAULT_OUT, write_photos
from bench.processes import StartedProcesses

from . import onnxruntime_alone, parity, preprocess_limit
from .failures import Terminated, describe
from .gpu import during_served_runs
from .host_memory import PinnedSources
from .plan import Plan
from .served import ServedPart


class Check:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.photo_paths: list[Path] = []  # set by setup
        self.started = StartedProcesses()
        self.pinned = PinnedSources()
        self.served = ServedPart(plan, self.started)
        self.checkpoint = lambda: None  # called after each part (cli writes what there is so far)
        self.result: dict = {"meta": plan.meta(), "parts": {}, "timings_s": {}}

    def run(self) -> dict:
        began = time.monotonic()
        plan, m = self.plan, self.result["meta"]
        print(f"[gpu_check] {m['provider']} ({m['gpu_name'] or 'no GPU seen'}), {plan.cores} cores, onnxruntime "
              f"{ort.__version__}, batch {plan.batch_size}, buckets {plan.buckets}, models {', '.join(plan.models)}",
              flush=True)
        try:
            self.part("setup", self.setup)  # the models: every other part needs them
            for name, fn in (
                    ("onnxruntime", lambda: self.per_model(
                        lambda model: onnxruntime_alone.measure(plan, self.photo_paths, model, self.pinned))),
                    ("preprocess", lambda: preprocess_limit.measure(plan, self.photo_paths, self.started)),
                    ("served", lambda: self.per_model(lambda model: self.served.measure(model, self.photo_paths))),
                    ("gpu", lambda: during_served_runs(plan.nvidia_smi, m["gpu_name"],
                                                       self.result["parts"].get("served", {}))),
                    ("parity", lambda: self.per_model(lambda model: parity.measure(
                        plan, self.photo_paths, model, self.served.answers.get(model, {}))))):
                if name in plan.parts:
                    self.part(name, fn)
        finally:
            self.result["leftover_processes"] = self.started.kill_leftovers()
            self.result["started_pids"] = self.started.pids
            self.result["total_s"] = time.monotonic() - began
        print(f"[gpu_check] total {self.result['total_s']:.1f} s", flush=True)
        return self.result

    def part(self, name: str, fn) -> None:
        """fn()'s dict as the part `name`, with its error (None when it ran) and its seconds."""
        print(f"[gpu_check] {name} ...", flush=True)
        began = time.monotonic()
        try:
            data = fn()
            error = data.pop("error", None)
        except (Exception, SystemExit) as exc:  # serving.Served says a failed start with SystemExit
            traceback.print_exc()
            data, error = {}, describe(exc)
        except Terminated as exc:
            self.result["parts"][name] = {"error": f"terminated ({exc})", "seconds": time.monotonic() - began}
            raise
        seconds = time.monotonic() - began
        self.result["parts"][name] = {"error": error, "seconds": seconds, **data}
        self.result["timings_s"][name] = seconds
        print(f"[gpu_check] {name}: {seconds:.1f} s" + (f"  ERROR {error}" if error else ""), flush=True)
        self.checkpoint()

    def per_model(self, fn) -> dict:
        """fn(model name) for each model; one model's failure is recorded and the others still run.
        A model's result may carry an "error" of its own (a placement that failed, say): the part's
        error names it too."""
        out, errors = {}, []
        for name in self.plan.models:
            try:
                out[name] = fn(name)
            except (Exception, SystemExit) as exc:
                traceback.print_exc()
                out[name] = {"error": describe(exc)}
            if out[name].get("error"):
                errors.append(f"{name}: {out[name]['error']}")
        return {"models": out, "error": "; ".join(errors) or None}

    def setup(self) -> dict:
        """The photos (written from scikit-image's wheel when the default folder has none) and the
        demo models (built when missing: seconds each)."""
        photos_dir = self.plan.photos_dir
        if photos_dir.resolve() == DEFAULT_OUT.resolve() and not list(photos_dir.glob(self.plan.glob)):
            write_photos(photos_dir)  # from the scikit-image wheel on PyPI: carry bench/photos where offline
        self.photo_paths = sorted(photos_dir.glob(self.plan.glob))
        if not self.photo_paths:
            raise RuntimeError(f"no photos matching {self.plan.glob!r} in {photos_dir}")
        built = {}
        for name, path in self.plan.model_paths.items():
            began = time.monotonic()
            existed = path.exists()
            ensure_model(path)
            built[name] = None if existed else time.monotonic() - began
        return {"photos": [p.name for p in self.photo_paths], "models_built_s": built}
