"""Soak: thousands of mixed requests (good photos, bad bodies, cancelled clients) against one
server, with the memory of every server process sampled as it goes. The server must stay flat:
no growth beyond the first rounds, every slot free at the end, every answer what it should be.

    python bench/soak.py [--rounds 20] [--per-round 400] [--concurrency 16] [--config config/cronnx.yaml]

Each round sends `--per-round` requests: about 70% good photos (bench/photos), 20% bad bodies of
several kinds (truncated JPEG, not an image, invalid base64 JSON, empty), 10% clients that hang up
after a few milliseconds. After each round it reads the resident memory (RSS, from
/proc/PID/status) of the server and of each of its worker processes, and prints one line. The
verdict compares the last rounds with the rounds after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import DEFAULT_OUT, write_photos  # noqa: E402
from processes import children_of  # noqa: E402
from serving import REPO, Served, free_port  # noqa: E402

# (content type, body maker, expected status)
BAD_KINDS = {
    "truncated JPEG": ("image/jpeg", lambda photo: photo[: len(photo) // 3], 400),
    "not an image": ("image/jpeg", lambda photo: b"this is text, not a picture" * 10, 400),
    "invalid base64": ("application/json", lambda photo: json.dumps({"image": "***"}).encode(), 400),
    "empty body": ("image/jpeg", lambda photo: b"", 400),
}


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree(pid: int) -> list[int]:
    """The server and its child processes."""
    return [pid, *children_of(pid)]


async def one(session: aiohttp.ClientSession, url: str, kind: str, photo: bytes, counts: dict) -> None:
    if kind == "good":
        body, content_type, expected = photo, "image/jpeg", 200
    elif kind == "hang up":
        try:
            async with asyncio.timeout(random.uniform(0.002, 0.02)):
                async with session.post(url, data=photo, headers={"Content-Type": "image/jpeg"}) as r:
                    await r.read()
        except TimeoutError:
            pass
        counts["hung up"] = counts.get("hung up", 0) + 1
        return
    else:
        content_type, make, expected = BAD_KINDS[kind]
        body = make(photo)
    async with session.post(url, data=body, headers={"Content-Type": content_type}) as r:
        answer = await r.json()
        ok = r.status == expected and ("predictions" in answer if expected == 200 else "error" in answer)
        key = "as expected" if ok else f"unexpected {r.status} for {kind}"
        counts[key] = counts.get(key, 0) + 1


async def round_of(url: str, photos: list[bytes], n: int, concurrency: int, counts: dict) -> None:
    kinds = random.choices(["good", *BAD_KINDS, "hang up"], weights=[70, 5, 5, 5, 5, 10], k=n)
    limit = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def bounded(kind: str) -> None:
            async with limit:
                await one(session, url, kind, random.choice(photos), counts)
        await asyncio.gather(*(bounded(kind) for kind in kinds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "cronnx.yaml")
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    random.seed(args.seed)
    photos = [p.read_bytes() for p in write_photos(DEFAULT_OUT)]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "cronnx", "serve", "--config", str(args.config.resolve()), "--port", str(port),
               "--log-level", "warning"]
    rows = []
    counts: dict[str, int] = {}
    with Served("cronnx", command, base, "/ready") as served:
        for number in range(1, args.rounds + 1):
            started = time.monotonic()
            asyncio.run(round_of(f"{base}/predict/{args.model}", photos, args.per_round, args.concurrency, counts))
            pids = tree(served.process.pid)
            memory = {pid: rss_kib(pid) for pid in pids}
            in_use = slots_in_use(base)
            rows.append((number, memory[served.process.pid], sum(memory.values()) - memory[served.process.pid], in_use))
            print(f"round {number}: {time.monotonic() - started:5.1f} s, server {rows[-1][1] / 1024:7.1f} MiB, "
                  f"workers {rows[-1][2] / 1024:7.1f} MiB, slots in use {in_use}", flush=True)
    settled = rows[len(rows) // 4:]  # after warm-up: arenas and caches grown to their working size
    first, last = settled[: max(1, len(settled) // 4)], settled[-max(1, len(settled) // 4):]
    front_growth = statistics.median(r[1] for r in last) - statistics.median(r[1] for r in first)
    worker_growth = statistics.median(r[2] for r in last) - statistics.median(r[2] for r in first)
    print(f"\n{args.rounds * args.per_round} requests: {dict(sorted(counts.items()))}")
    print(f"memory after warm-up, first quarter -> last quarter: server {front_growth / 1024:+.1f} MiB, "
          f"workers {worker_growth / 1024:+.1f} MiB; slots in use at the end: {rows[-1][3]}")


def slots_in_use(base: str) -> int:
    with urllib.request.urlopen(f"{base}/models", timeout=10) as response:
        models = json.loads(response.read())["models"]
    return sum(w["slots_in_use"] for m in models for w in m.get("workers", []))


if __name__ == "__main__":
    main()
