"""Versions, A/B traffic, reloads and model control, under load, with nothing lost."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path

import aiohttp
import yaml

from support.client import TIMEOUT, post
from support.images import encode, photo_like
from support.metrics import scrape, value
from support.models import image_classifier, tiny_classifier
from support.server import model_entry, server_config, wait_until

IMAGE = encode(photo_like(160, 120, seed=2), "JPEG")
TOKEN = "s3cret-token"


def repository(root: Path, name: str, versions: list[int]) -> Path:
    """models/<name>/<version>/model.onnx, each version with different weights."""
    for v in versions:
        (root / name / str(v)).mkdir(parents=True, exist_ok=True)
        image_classifier(root / name / str(v) / "model.onnx", seed=100 + v)
    return root / name


async def _many(url: str, count: int, headers_for=lambda i: {}, concurrency: int = 8) -> list:
    limit = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async def one(i):
            async with limit:
                async with session.post(url, data=IMAGE, headers={"Content-Type": "image/jpeg", **headers_for(i)}) as r:
                    return r.status, await r.json()
        return await asyncio.gather(*(one(i) for i in range(count)))


def test_repository_versions_policy_and_version_routes(start_server, tmp_path):
    root = tmp_path / "repo"
    repository(root, "clf", [1, 2, 3])
    config = server_config(model_repository=str(root))
    (root / "clf" / "config.yaml").write_text(yaml.safe_dump({"version_policy": {"latest": 2}, "batch_size": 2,
                                                               "intra_op_threads": 1}))
    server = start_server(config)
    served = sorted(m["version"] for m in server.versions() if m["state"] == "ready")
    assert served == [2, 3]

    default = asyncio.run(_many(f"{server.url}/predict/clf", 3))
    assert {body["version"] for _, body in default} == {3}
    pinned = asyncio.run(_many(f"{server.url}/predict/clf/versions/2", 3))
    assert {body["version"] for _, body in pinned} == {2}
    assert default[0][1]["predictions"] != pinned[0][1]["predictions"]  # different weights
    (status, body), = asyncio.run(_many(f"{server.url}/predict/clf/versions/1", 1))
    assert status == 404 and "not served" in body["error"]
    # A number no version can have (beyond int64; thousands of digits) is no served version either.
    for huge in ("9" * 25, "1" * 5000, "0" * 30 + "2"):
        (status, body), = asyncio.run(_many(f"{server.url}/predict/clf/versions/{huge}", 1))
        if huge.endswith("02"):
            assert status == 200 and body["version"] == 2  # leading zeros name the same version
        else:
            assert status == 404 and "not served" in body["error"], (status, body)


def test_model_repository_given_on_the_command_line_is_served(start_server, tmp_path):
    """`cronnx serve --model-repository DIR` (as KServe's runtime starts it on /mnt/models) serves
    the folder with a config that names no model."""
    repository(tmp_path / "repo", "clf", [4])
    server = start_server(server_config(), args=("--model-repository", str(tmp_path / "repo")))
    assert [(m["name"], m["version"], m["state"]) for m in server.versions()] == [("clf", 4, "ready")]
    (status, body), = asyncio.run(_many(f"{server.url}/predict/clf", 1))
    assert status == 200 and body["version"] == 4


def test_traffic_split_matches_weights_and_keys_are_sticky(start_server, tmp_path):
    repository(tmp_path / "repo", "ab", [1, 2])
    entry = {"name": "ab", "repository": str(tmp_path / "repo" / "ab"), "version_policy": {"latest": 2},
             "traffic": {1: 80, 2: 20}, "intra_op_threads": 1}
    server = start_server(server_config(entry))
    replies = asyncio.run(_many(f"{server.url}/predict/ab", 400, concurrency=16))
    counts = Counter(body["version"] for _, body in replies)
    assert counts[1] + counts[2] == 400
    # Binomial(400, 0.2): mean 80, sd 8; 50..110 is beyond 3.7 sd either side.
    assert 50 <= counts[2] <= 110, counts
    m = scrape(server.url)
    assert value(m, "cronnx_requests_total", api="predict", model="ab", version=1, outcome="success") == counts[1]
    assert value(m, "cronnx_requests_total", api="predict", model="ab", version=2, outcome="success") == counts[2]

    keyed = asyncio.run(_many(f"{server.url}/predict/ab", 60, lambda i: {"X-Cronnx-Key": f"user-{i % 6}"}))
    per_key: dict[str, set] = {}
    for i, (_, body) in enumerate(keyed):
        per_key.setdefault(f"user-{i % 6}", set()).add(body["version"])
    assert all(len(versions) == 1 for versions in per_key.values()), per_key


async def _steady_load(url: str, stop: asyncio.Event, results: list, clients: int = 4, cap: int = 3000) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async def client():
            while not stop.is_set() and len(results) < cap:
                reply = await post(session, url, IMAGE)
                results.append((time.monotonic(), reply.status, reply.body.get("version"), reply.body.get("error")))
        await asyncio.gather(*(client() for _ in range(clients)))


def test_sighup_reload_switches_versions_under_load_with_no_failed_request(start_server, tmp_path):
    root = tmp_path / "repo"
    repository(root, "live", [1])
    entry = {"name": "live", "repository": str(root / "live"), "intra_op_threads": 1, "batch_size": 4}
    server = start_server(server_config(entry))
    old_pids = server.worker_pids("live")
    results: list = []

    async def main():
        stop = asyncio.Event()
        load = asyncio.create_task(_steady_load(f"{server.url}/predict/live", stop, results))
        await asyncio.sleep(0.5)
        repository(root, "live", [2])  # a new version appears; latest 1 means it replaces v1
        switched_at = time.monotonic()
        server.proc.send_signal(signal.SIGHUP)
        while not any(r[2] == 2 for r in results) and time.monotonic() < switched_at + 30:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        stop.set()
        await load

    asyncio.run(main())
    assert results and all(status == 200 for _, status, _, _ in results), [r for r in results if r[1] != 200][:3]
    versions = [version for _, _, version, _ in results]
    first_v2 = versions.index(2)
    # Once v2 answered, new requests went to v2 (a few v1 answers were already in flight).
    assert versions[first_v2:].count(1) <= 4, versions[first_v2:first_v2 + 10]
    wait_until(lambda: [m["version"] for m in server.versions()] == [2], what="v1 drained")
    assert not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                   for pid in old_pids)


def test_reload_with_a_corrupt_new_version_keeps_the_old_one_serving(start_server, tmp_path):
    root = tmp_path / "repo"
    repository(root, "steady", [1])
    tiny = image_classifier(tmp_path / "other.onnx")
    config = server_config({"name": "steady", "repository": str(root / "steady"), "intra_op_threads": 1},
                           model_entry("other", tiny))
    server = start_server(config)
    (root / "steady" / "2").mkdir()
    (root / "steady" / "2" / "model.onnx").write_bytes(b"not an onnx file at all")
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: any(m["state"] == "failed" for m in server.versions()), what="failed version reported")
    failed = [m for m in server.versions() if m["state"] == "failed"]
    assert failed[0]["version"] == 2 and "cannot load" in failed[0]["reason"]
    for path in ("/predict/steady", "/predict/other"):
        replies = asyncio.run(_many(server.url + path, 5))
        assert {status for status, _ in replies} == {200}
    assert {body["version"] for _, body in asyncio.run(_many(f"{server.url}/predict/steady", 5))} == {1}
    assert "model steady version 2 failed" in server.log() or "not loaded" in server.log()


def test_admin_api_is_off_by_default(start_server, tmp_path):
    server = start_server(server_config(model_entry("m", image_classifier(tmp_path / "m.onnx"))))
    (status, _), = asyncio.run(_admin(server.url, "m", "unload", TOKEN))
    assert status == 404
    assert asyncio.run(_many(f"{server.url}/predict/m", 1))[0][0] == 200


async def _admin(url: str, model: str, action: str, token: str | None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.post(f"{url}/admin/models/{model}/{action}", headers=headers) as r:
            return [(r.status, await r.json())]


def test_admin_unload_load_and_reload_with_a_token(start_server, tmp_path):
    model = image_classifier(tmp_path / "m.onnx")
    config = server_config(model_entry("m", model), model_entry("keep", image_classifier(tmp_path / "k.onnx")))
    config["server"]["admin"] = {"enabled": True, "token": TOKEN}
    server = start_server(config)
    url = server.url
    assert asyncio.run(_admin(url, "m", "unload", None))[0][0] == 401
    assert asyncio.run(_admin(url, "m", "unload", "wrong"))[0][0] == 403

    (status, body), = asyncio.run(_admin(url, "m", "unload", TOKEN))
    assert status == 200
    wait_until(lambda: "m" not in server.models(), what="m unloaded")
    assert asyncio.run(_many(f"{url}/predict/m", 1))[0][0] == 404
    assert asyncio.run(_many(f"{url}/predict/keep", 1))[0][0] == 200

    (status, body), = asyncio.run(_admin(url, "m", "load", TOKEN))
    assert status == 200 and [v["state"] for v in body["versions"]] == ["ready"]
    pids = server.worker_pids("m")
    (status, body), = asyncio.run(_admin(url, "m", "reload", TOKEN))
    assert status == 200
    wait_until(lambda: server.worker_pids("m") != pids and len(server.versions()) == 2, what="reloaded workers")
    assert asyncio.run(_many(f"{url}/predict/m", 1))[0][0] == 200
    (status, body), = asyncio.run(_admin(url, "nosuch", "load", TOKEN))
    assert status == 404 and "not in the config" in body["error"]
    # A config that cannot be read is the server's problem (500, the config error's words); the
    # model keeps serving.
    server.config_path.write_text(yaml.safe_dump({**config, "server": {**config["server"], "nosuchfield": 1}}))
    (status, body), = asyncio.run(_admin(url, "m", "reload", TOKEN))
    assert status == 500 and "nosuchfield" in body["error"], body
    assert asyncio.run(_many(f"{url}/predict/m", 1))[0][0] == 200


def test_reload_serves_what_the_file_says_now_and_a_bad_new_model_changes_nothing_else(start_server, tmp_path):
    a, b = image_classifier(tmp_path / "a.onnx"), image_classifier(tmp_path / "b.onnx")
    server = start_server(server_config(model_entry("a", a), model_entry("b", b)))
    corrupt = tmp_path / "c.onnx"
    corrupt.write_bytes(b"garbage")
    # b is gone from the file, c is new and broken, a is unchanged.
    server.config_path.write_text(yaml.safe_dump(server_config(model_entry("a", a), model_entry("c", corrupt))))
    a_pids = server.worker_pids("a")
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "b" not in server.models(), what="b unloaded")
    wait_until(lambda: any(m["name"] == "c" and m["state"] == "failed" for m in server.versions()), what="c failed")
    assert server.get("/ready")[0] == 200
    assert asyncio.run(_many(f"{server.url}/predict/a", 3))[0][0] == 200
    assert asyncio.run(_many(f"{server.url}/predict/b", 1))[0][0] == 404
    assert asyncio.run(_many(f"{server.url}/predict/c", 1))[0][0] == 404
    assert server.worker_pids("a") == a_pids  # unchanged: not reloaded


def _sample_keys(base_url: str) -> list[str]:
    """Every sample line of /metrics as 'name{labels}', repeats kept."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return [line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]


def test_forced_reload_under_load_never_repeats_a_series_in_a_scrape(start_server, tmp_path):
    """While the reloaded version's old workers drain beside its new ones, /metrics merges the
    two: one sample per label set, the version both ready and draining."""
    model = tiny_classifier(tmp_path / "slow.onnx", slow_layers=200, hidden=2048)  # ~60 ms an image
    config = server_config(model_entry("m", model, batch_size=2, ring_slots=64))
    config["server"]["admin"] = {"enabled": True, "token": TOKEN}
    server = start_server(config)

    async def clients(stop: asyncio.Event, statuses: list) -> None:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async def one():
                while not stop.is_set() and len(statuses) < 2000:
                    statuses.append((await post(session, f"{server.url}/predict/m", IMAGE)).status)
            await asyncio.gather(*(one() for _ in range(16)))

    async def main():
        stop, statuses = asyncio.Event(), []
        load = asyncio.create_task(clients(stop, statuses))
        await asyncio.sleep(0.3)  # requests queued in the old workers' ring
        (status, _), = await _admin(server.url, "m", "reload", TOKEN)
        assert status == 200
        scrapes, overlap = 0, False
        deadline = time.monotonic() + 10
        while not overlap and time.monotonic() < deadline:
            keys = await asyncio.to_thread(_sample_keys, server.url)
            scrapes += 1
            assert not [k for k, n in Counter(keys).items() if n > 1], keys
            samples = await asyncio.to_thread(scrape, server.url)
            overlap = all(value(samples, "cronnx_model_state", model="m", version=1, state=state) == 1
                          for state in ("ready", "draining"))
        stop.set()
        await load
        return statuses, scrapes, overlap

    statuses, scrapes, overlap = asyncio.run(main())
    assert statuses and set(statuses) == {200}
    assert overlap, f"no scrape saw the old and the new workers together ({scrapes} scrapes)"
