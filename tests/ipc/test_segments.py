"""Shared-memory names unique per server start, and a clean-up that removes only what a dead
start left: real processes holding real locks in /dev/shm, and two servers in separate PID
namespaces (both PID 1) sharing it."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cronnx.ipc.segments import remove_stale_segments, segment_name
from support.client import predict_many
from support.images import encode, photo_like
from support.models import tiny_classifier
from support.reference import DirectModel, assert_matches
from support.server import REPO, model_entry, server_config, wait_until

SHM = Path("/dev/shm")

# A process that claims its names, creates one segment of 16 bytes, says its segment's name and
# waits to be killed.
HOLDER = """
import sys, time
from multiprocessing import shared_memory
from cronnx.ipc.segments import segment_name
shm = shared_memory.SharedMemory(name=segment_name("held"), create=True, size=16)
print(shm.name, flush=True)
time.sleep(60)
"""


def test_a_name_holds_the_pid_a_run_drawn_once_per_process_and_only_safe_characters():
    first, second = segment_name("model/v1 g:0"), segment_name("resnet-50_v2.onnx")
    match = re.fullmatch(rf"cronnx_{os.getpid()}_([0-9a-f]{{8}})_model_v1_g_0", first)
    assert match, first
    assert second == f"cronnx_{os.getpid()}_{match.group(1)}_resnet-50_v2.onnx"
    assert (SHM / f"cronnx_{os.getpid()}_{match.group(1)}.lock").exists()  # the claim, held


def test_the_clean_up_keeps_a_live_starts_segments_and_removes_a_killed_ones():
    # Its stderr is dropped: its resource tracker complains at exit that the segment is gone.
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        name = holder.stdout.readline().strip()
        run = name.removesuffix("_held")
        lock = f"{run}.lock"
        assert (SHM / name).exists() and (SHM / lock).exists()
        assert not {name, lock} & set(remove_stale_segments())  # alive: kept
        assert (SHM / name).exists() and (SHM / lock).exists()
        holder.kill()
        holder.wait(10)
        # Dead by kill -9: its lock went with it, so its segment and lock file are provably stale.
        removed = remove_stale_segments()
        assert {name, lock} <= set(removed), removed
        assert not (SHM / name).exists() and not (SHM / lock).exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()
        for leftover in SHM.glob(f"{name.removesuffix('_held')}*"):
            leftover.unlink()


def test_names_without_a_lock_file_are_left_alone(tmp_path):
    # An older Cronnx's (named by pid alone), a live start's segment whose lock file is elsewhere,
    # and names that are not Cronnx's: nothing proves any of them stale.
    names = ["cronnx_4000000_m_v1_in", "cronnx_12_0123abcd_m_v1_in", "other_1_x", "cronnx_12_0123abcd.lockx"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_segments(shm_dir=str(tmp_path)) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_the_clean_up_of_a_missing_folder_removes_nothing(tmp_path):
    assert remove_stale_segments(shm_dir=str(tmp_path / "absent")) == []


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", "echo $$"],
                           capture_output=True, text=True, timeout=30)
    return probe.returncode == 0 and probe.stdout.strip() == "1"


@pytest.mark.server
@pytest.mark.skipif(not _unshare_works(), reason="needs unshare --pid (root, or user namespaces)")
def test_two_servers_that_are_both_pid_1_keep_their_own_rings_through_a_worker_restart(tmp_path):
    model = tiny_classifier(tmp_path / "tiny.onnx")
    image = encode(photo_like(64, 48, seed=4), "JPEG")
    expected = DirectModel(model).probabilities(image)
    servers = []
    try:
        for i in range(2):
            config = tmp_path / f"cronnx{i}.yaml"
            config.write_text(yaml.safe_dump(server_config(model_entry("tiny", model, workers=1))))
            log = tmp_path / f"server{i}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "cronnx",
                                         "serve", "--config", str(config), "--port", "0"],
                                        cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            servers.append((proc, log))
            wait_until(lambda: "is serving" in log.read_text(), timeout_s=60, what=f"server {i} to serve")
        urls = [re.search(r"serving on (http://[\d.]+:\d+)", log.read_text()).group(1) for _, log in servers]
        pids = [re.search(r'"pid":(\d+)', log.read_text()).group(1) for _, log in servers]
        assert pids == ["1", "1"]  # the same pid in each namespace
        # Kill the first server's worker: its replacement attaches to the rings by name.
        worker = _worker_of(servers[0][0].pid)
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: _worker_of(servers[0][0].pid, not_pid=worker) is not None, timeout_s=60,
                   what="the worker's replacement")
        for url in urls:
            wait_until(lambda: asyncio.run(predict_many(f"{url}/predict/tiny", [image]))[0].status == 200,
                       timeout_s=60, what="the server to serve again")
            for reply in asyncio.run(predict_many(f"{url}/predict/tiny", [image] * 4)):
                assert reply.status == 200, reply.body
                assert_matches(reply.body, expected)
    finally:
        # unshare passes no signal on: each server (unshare's child, PID 1 inside) gets its own,
        # and a SIGKILL of it ends its whole namespace if it does not stop.
        inits = {proc.pid: _descendants(proc.pid)[:1] for proc, _ in servers}
        for pids in inits.values():
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
        for proc, log in servers:
            try:
                assert proc.wait(30) == 0, log.read_text()[-2000:]
            finally:
                if proc.poll() is None:
                    for pid in inits[proc.pid]:
                        os.kill(pid, signal.SIGKILL)
                    proc.kill()
                    proc.wait()


def _worker_of(unshare_pid: int, not_pid: int | None = None) -> int | None:
    """The worker process of the server running under `unshare_pid` (its grandchild that runs
    the worker entry), as this namespace numbers it."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for pid in _descendants(unshare_pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline and pid != not_pid:
                return pid
        time.sleep(0.1)
    return None


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        try:
            kids = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        found += [int(k) for k in kids]
        frontier += [int(k) for k in kids]
    return found
