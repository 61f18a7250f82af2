"""Shared by the benchmark scripts: start a server process, drive it with `cronnx bench`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import msgspec

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

from cronnx.loadgen import bench as loadgen  # noqa: E402
from cronnx.loadgen import payloads  # noqa: E402
from cronnx.loadgen.runner import LoadSpec  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A server process for the length of a `with` block; ready when `ready_path` answers 200."""

    def __init__(self, name: str, command: list[str], base_url: str, ready_path: str, env: dict | None = None,
                 cwd: Path = REPO, log: Path | None = None):
        """`log`: the file that gets the server's stdout and stderr (else they are dropped)."""
        self.name, self.command, self.base_url, self.ready_path, self.cwd = name, command, base_url, ready_path, cwd
        self.env = {**os.environ, **(env or {})}
        self.log = log

    def __enter__(self) -> "Served":
        output = open(self.log, "wb") if self.log else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(self.command, cwd=self.cwd, stdout=output, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=self.env)
        finally:
            if self.log:
                output.close()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.process.returncode}: {' '.join(self.command)}")
            try:
                with urllib.request.urlopen(self.base_url + self.ready_path, timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.__exit__()
        raise SystemExit(f"{self.name} did not become ready")

    def __exit__(self, *exc) -> None:
        # The whole process group: LitServe's workers included.
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def measure(url: str, model: str, mode: str, seconds: float, warmup: float, photos: list[Path],
            concurrency: int | None = None, rate: float | None = None,
            encode: Callable[[bytes], bytes] | None = None, quiet: bool = False) -> dict:
    """One `cronnx bench` run in this process; the BenchResult as plain data. `encode` makes a
    JSON body of another shape than Cronnx's {"image": base64} from each photo's bytes."""
    if encode is None:
        bodies, content_type = payloads.image_bodies(photos, mode)
    else:
        bodies, content_type = [encode(p.read_bytes()) for p in photos], "application/json"
    spec = LoadSpec(url=url, bodies=bodies, content_type=content_type, concurrency=concurrency,
                    rate=rate, duration_s=seconds, warmup_s=warmup)
    result = msgspec.to_builtins(loadgen.run(spec, 1, model))
    if quiet:
        return result
    load = f"{concurrency} clients" if concurrency else f"{rate:.1f} req/s"
    print(f"  {url} {mode} {load}: {result['requests_per_s']:.1f} req/s, p50 {result['latency_ms']['p50']:.2f} ms, "
          f"p99 {result['latency_ms']['p99']:.2f} ms, errors {result['errors_by_status']} {result['errors_by_exception']}",
          flush=True)
    return result
