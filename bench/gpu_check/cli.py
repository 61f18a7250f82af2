"""The command line: its options, the run, and its outputs (the JSON and the markdown, rewritten
after every part so that a run stopped early still leaves what it measured)."""

from __future__ import annotations

import argparse
import faulthandler
import json
import signal
import sys
import traceback
from pathlib import Path

from bench.photos import DEFAULT_OUT

from . import __doc__ as package_doc
from .check import Check
from .failures import Terminated, describe, terminate
from .plan import MODELS, PARTS, Plan
from .report import markdown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (`argv`, default sys.argv[1:]) as Plan takes it."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=package_doc.splitlines()[0])
    parser.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when onnxruntime lists CUDAExecutionProvider")
    parser.add_argument("--quick", action="store_true",
                        help="seconds per measurement, MobileNetV2 only, 16 clients: a CPU-only smoke run")
    parser.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--seconds", type=float, default=None,
                        help="each served window and preprocessing measurement (default 3, --quick 2)")
    parser.add_argument("--clients", default=None, help="closed-loop clients of the served runs (default 1,256)")
    parser.add_argument("--procs", type=int, default=None, help="client processes for more than one client (4)")
    parser.add_argument("--preprocessing", default=None,
                        help="where the served runs decode, comma-separated: threads, processes, fronts "
                             "(default processes,fronts; --quick all three)")
    parser.add_argument("--fronts", type=int, default=None,
                        help="front processes of the fronts placement (default cores / 2, at least 2)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="serve with cuda.enable_cuda_graph (CUDA only): to compare with a run without")
    parser.add_argument("--pinned-ring-memory", action="store_true",
                        help="serve with cuda.pinned_ring_memory (CUDA only): to compare with a run without")
    parser.add_argument("--parts", default=None,
                        help=f"only these parts, comma-separated, of {', '.join(PARTS)} (default all; served "
                             "brings gpu): a second, shorter run, e.g. --parts served --pinned-ring-memory")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 on CUDA, 4 on the CPU")
    parser.add_argument("--photos", type=Path, default=DEFAULT_OUT, help="folder of photos (bench/photos.py)")
    parser.add_argument("--glob", default="*-1600.jpg", help="which photos of the folder")
    parser.add_argument("--json", type=Path, help="write everything here (also after every part)")
    parser.add_argument("--markdown", type=Path, help="write the tables here too (also after every part)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    faulthandler.enable()  # a crash in native code still says where, on stderr
    signal.signal(signal.SIGTERM, terminate)
    check = Check(Plan(args))
    check.checkpoint = lambda: write_outputs(check.result, args, final=False)
    try:
        result = check.run()
    except Terminated:  # what was measured is still written
        result = check.result
        result["terminated"] = True
    table = write_outputs(result, args, final=True)
    print(table)
    if result.get("terminated"):
        sys.exit(143)


def write_outputs(result: dict, args: argparse.Namespace, final: bool) -> str:
    """The JSON (first: it holds everything) and the markdown, to the files asked for; the
    markdown's text. Before the end, the JSON says "partial": true."""
    result["partial"] = not final
    try:
        table = markdown(result)
    except Exception as exc:  # the JSON must not be lost to a table that cannot be drawn
        traceback.print_exc()
        table = f"(no tables: {describe(exc)})"
    for path, text in ((args.json, json.dumps(result, indent=1, default=str)), (args.markdown, table)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
            if final:
                print(f"wrote {path}", flush=True)
    return table
