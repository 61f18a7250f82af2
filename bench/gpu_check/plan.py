"""What one run measures, from its command line: the provider, models, batch buckets, time
windows, clients, decoding placements and parts; and the run's description for the JSON."""

from __future__ import annotations

import argparse
import os
import platform
import shutil

import numpy as np
import onnxruntime as ort

from cronnx.models.catalog import powers_of_two_up_to
from cronnx.preprocessing.transform import pil_build

from bench.serving import REPO

from .gpu import gpu_name

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
MODELS = ("mobilenetv2", "resnet50")
# Where the served runs decode: threads of the server process (server.preprocess_threads),
# preprocessing processes (server.preprocess_processes), or front processes, each reading bodies and
# decoding in its own threads (server.front_processes). The default runs the two that use every core.
PLACEMENTS = ("threads", "processes", "fronts")
DEFAULT_PLACEMENTS = ("processes", "fronts")
# The parts a run may be limited to (--parts); the models are always set up first.
PARTS = ("onnxruntime", "preprocess", "served", "gpu", "parity")
NA_CPU = "n/a on CPU (CUDA EP only)"


class Plan:
    """The run's settings, each from its option or its default for the provider."""

    def __init__(self, args: argparse.Namespace):
        self.quick = args.quick
        self.available = ort.get_available_providers()
        wanted = args.provider
        if wanted == "auto":
            wanted = "cuda" if CUDA in self.available else "cpu"
        self.cuda = wanted == "cuda"
        self.provider = CUDA if self.cuda else CPU
        self.cores = os.cpu_count() or 1
        self.batch_size = args.batch_size or (64 if self.cuda else 4)
        self.buckets = powers_of_two_up_to(self.batch_size)
        self.models = [m for m in (args.models or ("mobilenetv2" if self.quick else ",".join(MODELS))).split(",") if m]
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown:
            raise SystemExit(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
        self.model_paths = {m: REPO / "models" / f"{m}-demo.onnx" for m in self.models}
        # Sized to the 5 minutes the GPU machine gives this run (an estimate: bench/README.md). The
        # fixed costs cannot shrink (cuDNN's exhaustive search on every new session and shape, four
        # server starts, the ResNet-50 build), the windows can: 3 s served still holds hundreds of
        # images at 1 client and thousands at 256; 0.25 s of onnxruntime alone is still a dozen
        # runs at batch 64 of ResNet-50 (about 20 ms a batch with its copies), and on CUDA each
        # bucket of each model times 5 of them and 2 copy windows of half that (14 buckets).
        self.seconds = args.seconds or (2.0 if self.quick else 3.0)
        self.shape_seconds = 0.25  # each timed measurement of onnxruntime alone
        self.copy_seconds = self.shape_seconds / 2  # each timed host-to-device copy alone
        self.clients = [int(c) for c in (args.clients or ("1,16" if self.quick else "1,256")).split(",")]
        self.procs = args.procs or (2 if self.quick else 4)
        # --quick (the suite's CPU run) serves every placement, so that each is tested.
        placements = args.preprocessing or ",".join(PLACEMENTS if self.quick else DEFAULT_PLACEMENTS)
        self.placements = [p for p in placements.split(",") if p]
        self.parts = set(args.parts.split(",")) if args.parts else set(PARTS)
        if self.parts - set(PARTS):
            raise SystemExit(f"unknown parts {sorted(self.parts - set(PARTS))}; choose from {', '.join(PARTS)}")
        if "served" in self.parts:
            self.parts.add("gpu")  # the GPU's utilisation during the served runs
        # One front process per 2 cores, each with its event loop and 2 decoding threads. A front
        # holds its GIL about 1.8 ms per request (HTTP, the GIL-held parts of decoding, the answer:
        # py-spy --gil, 1600 px photos, bench/README.md), so one caps near 550 requests a second
        # here; 16 cores feeding a GPU at about 2,000 img/s keep 8 fronts' GILs under half busy,
        # where 4 would be near saturated.
        self.fronts = args.fronts or max(2, self.cores // 2)
        unknown = sorted(set(self.placements) - set(PLACEMENTS))
        if unknown or not self.placements:
            raise SystemExit(f"unknown preprocessing placements {unknown}; choose from {', '.join(PLACEMENTS)}")
        self.cuda_graph, self.pinned_ring_memory = args.cuda_graph, args.pinned_ring_memory
        self.photos_dir, self.glob = args.photos, args.glob
        self.nvidia_smi = shutil.which("nvidia-smi")

    def meta(self) -> dict:
        """The run's settings and the versions it ran with, for the JSON and the tables' heading."""
        return {"provider": self.provider, "available_providers": self.available, "onnxruntime": ort.__version__,
                "pil": pil_build(), "numpy": np.__version__, "python": platform.python_version(),
                "cores": self.cores, "batch_size": self.batch_size, "buckets": self.buckets, "models": self.models,
                "quick": self.quick, "served_seconds": self.seconds, "shape_seconds": self.shape_seconds,
                "clients": self.clients, "client_procs": self.procs, "preprocessing_placements": self.placements,
                "nvidia_smi": self.nvidia_smi, "gpu_name": gpu_name(self.nvidia_smi), "parts": sorted(self.parts),
                "served_cuda_settings": [s for s, on in (("enable_cuda_graph", self.cuda_graph),
                                                         ("pinned_ring_memory", self.pinned_ring_memory)) if on]}
