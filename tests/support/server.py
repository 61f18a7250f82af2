"""Start `cronnx serve` as a real process on 127.0.0.1 and always clean it up."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from bench.processes import children_of, pid_alive, shm_lock_files, shm_segments

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0
# Set by conftest.py for each test: whether it is marked `server` (one that starts no server runs in
# the quick lane, where starting one would be slow and unnoticed).
may_start = True


def wait_until(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def mapped_segments(pid: int) -> set[str]:
    """The /dev/shm segments a process maps (unlinked ones too)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return {line.split("/dev/shm/")[1].split()[0] for line in maps.splitlines() if "/dev/shm/cronnx_" in line}


class ServerProcess:
    def __init__(self, workdir: Path, config: dict, args: tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.workdir = workdir
        self.args = list(args)  # more `cronnx serve` options
        self.env = {**os.environ, **(env or {})}  # the server's environment: this one and `env`
        self.config_path = workdir / "cronnx.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self._grpc_address = ""

    def start(self, wait_ready: bool = True) -> "ServerProcess":
        if not may_start:
            raise RuntimeError("this test starts a server: mark it `server` (pytest.mark.server), "
                               "or use the start_server fixture, which marks it")
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cronnx", "serve", "--config", str(self.config_path), "--port", "0", *self.args],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.url:
            match = re.search(r"serving on (http://[\d.]+:\d+)", self.log())
            if match:
                self.url = match.group(1)
            elif self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            elif time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{self.log()}")
            else:
                time.sleep(0.05)
        if wait_ready:
            self.wait_ready(deadline)
        return self

    def wait_ready(self, deadline: float | None = None) -> None:
        deadline = deadline or time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            status, _ = self.get("/ready")
            if status == 200:
                return
            time.sleep(0.05)
        raise RuntimeError(f"server not ready:\n{self.log()}")

    @property
    def grpc_address(self) -> str:
        """host:port of the server's gRPC endpoint, read from its log ("serving gRPC on ..."); the
        line may follow the HTTP one, so this waits for it. Raises when the server does not log one."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._grpc_address:
            match = re.search(r"serving gRPC on ([\d.]+:\d+)", self.log())
            if match:
                self._grpc_address = match.group(1)
            elif self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server does not serve gRPC:\n{self.log()}")
            else:
                time.sleep(0.05)
        return self._grpc_address

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def models(self) -> dict[str, dict]:
        """Each model's highest version that has workers (loading, ready or draining)."""
        _, body = self.get("/models")
        return {m["name"]: m for m in sorted(body["models"], key=lambda m: m["version"]) if m["state"] != "failed"}

    def versions(self) -> list[dict]:
        _, body = self.get("/models")
        return body["models"]

    def worker_pids(self, model: str) -> list[int]:
        return [w["pid"] for w in self.models()[model]["workers"]]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        """Signal the server and wait; returns its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)

    @classmethod
    @contextmanager
    def running(cls, workdir: Path, config: dict) -> Iterator["ServerProcess"]:
        """A started server for the `with` block (a module's fixture), cleaned up however it ends."""
        process = cls(workdir, config)
        try:
            yield process.start()
        finally:
            process.cleanup()

    def cleanup(self) -> None:
        """Whatever happened in the test: no process and no segment is left behind."""
        if self.proc is None:
            return
        pid = self.proc.pid
        kids = children_of(pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for kid in kids:
            if pid_alive(kid):
                os.kill(kid, signal.SIGKILL)
        for name in shm_segments(pid) + shm_lock_files(pid):
            os.unlink(f"/dev/shm/{name}")


def model_entry(name: str, path: Path, **overrides) -> dict:
    entry = {"name": name, "path": str(path), "batch_size": 8, "batch_timeout_ms": 5,
             "workers": 1, "intra_op_threads": 1, "ring_slots": 32}
    entry.update(overrides)
    return entry


def server_config(*models: dict, **server) -> dict:
    return {"server": {"host": "127.0.0.1", "preprocess_threads": 2, **server}, "models": list(models)}
