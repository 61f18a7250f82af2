"""Soak: thousands of mixed requests (good photos, bad bodies, cancelled clients) against one
server, with the memory of every server process sampled as it goes. The server must stay flat:
no growth beyond the first rounds, every slot free at the end, every answer what it should be,
and every line it logs JSON.

    python bench/soak.py [--rounds 20] [--per-round 400] [--concurrency 16] [--config config/cronnx.yaml]
                         [--log FILE]

Each round sends `--per-round` requests: about 60% good photos to /predict and 10% to V2 infer
(a BYTES image), 12% bad /predict bodies (truncated JPEG, not an image, invalid base64 JSON,
empty), 8% malformed V2 requests (an image that is not one, a value FP32 cannot hold, a shape
whose element count overflows, JSON cut short), and 10% clients that hang up after a few
milliseconds. After each round it reads the resident memory (RSS, from /proc/PID/status) of the
server and of each of its worker processes, and prints one line. The verdict compares the last
rounds with the rounds after warm-up, and lists the server's log lines (at `info`, shutdown
included) that are not JSON: there must be none.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import DEFAULT_OUT, write_photos  # noqa: E402
from processes import children_of  # noqa: E402
from serving import REPO, Served, free_port  # noqa: E402

# (content type, body maker, expected status) of each bad /predict body
BAD_KINDS = {
    "truncated JPEG": ("image/jpeg", lambda photo: photo[: len(photo) // 3], 400),
    "not an image": ("image/jpeg", lambda photo: b"this is text, not a picture" * 10, 400),
    "invalid base64": ("application/json", lambda photo: json.dumps({"image": "***"}).encode(), 400),
    "empty body": ("image/jpeg", lambda photo: b"", 400),
}


def v2_images(*images: bytes) -> bytes:
    """A V2 infer body with `images` as a BYTES tensor."""
    return json.dumps({"inputs": [{"name": "IMAGE", "shape": [len(images)], "datatype": "BYTES",
                                   "data": [base64.b64encode(image).decode() for image in images]}]}).encode()


def v2_tensor(model_input: dict, rows: int, data: list) -> bytes:
    """A V2 infer body with the model's input (`model_input`, from its metadata) of `rows` rows."""
    return json.dumps({"inputs": [{"name": model_input["name"], "shape": [rows, *model_input["shape"][1:]],
                                   "datatype": model_input["datatype"], "data": data}]}).encode()


def _row_values(model_input: dict) -> int:
    count = 1
    for size in model_input["shape"][1:]:
        count *= size
    return count


# (body maker(photo, the model's input), expected status) of each V2 infer request
V2_KINDS = {
    "v2 image": (lambda photo, model_input: v2_images(photo), 200),
    "v2 not an image": (lambda photo, model_input: v2_images(b"this is text, not a picture"), 400),
    # A whole row of valid values but its last, which FP32 cannot hold (infinite in float32).
    "v2 value out of range": (lambda photo, model_input: v2_tensor(
        model_input, 1, [0.5] * (_row_values(model_input) - 1) + [1e39]), 400),
    "v2 overflowing shape": (lambda photo, model_input: v2_tensor(model_input, 2**56 + 1, [0.0] * 8), 400),
    "v2 JSON cut short": (lambda photo, model_input: b'{"inputs": [{"name": "IMAGE", "shape": [1', 400),
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


async def one(session: aiohttp.ClientSession, base: str, model: str, model_input: dict, kind: str, photo: bytes,
              counts: dict) -> None:
    url = f"{base}/predict/{model}"
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
    elif kind in V2_KINDS:
        make, expected = V2_KINDS[kind]
        url, body, content_type = f"{base}/v2/models/{model}/infer", make(photo, model_input), "application/json"
    else:
        content_type, make, expected = BAD_KINDS[kind]
        body = make(photo)
    async with session.post(url, data=body, headers={"Content-Type": content_type}) as r:
        answer = await r.json()
        success = "outputs" if kind in V2_KINDS else "predictions"
        ok = r.status == expected and (success in answer if expected == 200 else "error" in answer)
        key = "as expected" if ok else f"unexpected {r.status} for {kind}"
        counts[key] = counts.get(key, 0) + 1


# Of every 100 requests: good /predict, good V2, each bad /predict kind, each malformed V2 kind, hang-ups.
KINDS = {"good": 60, "v2 image": 10, **{kind: 3 for kind in BAD_KINDS},
         **{kind: 2 for kind in V2_KINDS if kind != "v2 image"}, "hang up": 10}


async def round_of(base: str, model: str, model_input: dict, photos: list[bytes], n: int, concurrency: int,
                   counts: dict) -> None:
    kinds = random.choices(list(KINDS), weights=list(KINDS.values()), k=n)
    limit = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def bounded(kind: str) -> None:
            async with limit:
                await one(session, base, model, model_input, kind, random.choice(photos), counts)
        await asyncio.gather(*(bounded(kind) for kind in kinds))


def not_json(log: Path) -> list[str]:
    """The lines of `log` that are not a JSON object."""
    lines = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            if isinstance(json.loads(line), dict):
                continue
        except ValueError:
            pass
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "cronnx.yaml")
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log", type=Path, help="where the server's output goes (default: a temporary file)")
    args = parser.parse_args()
    random.seed(args.seed)
    photos = [p.read_bytes() for p in write_photos(DEFAULT_OUT)]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "cronnx", "serve", "--config", str(args.config.resolve()), "--port", str(port),
               "--log-level", "info", "--log-format", "json"]
    log = args.log or Path(tempfile.mkdtemp(prefix="cronnx-soak-")) / "server.log"
    rows = []
    counts: dict[str, int] = {}
    with Served("cronnx", command, base, "/ready", log=log) as served:
        with urllib.request.urlopen(f"{base}/v2/models/{args.model}", timeout=10) as response:
            model_input = json.loads(response.read())["inputs"][0]
        for number in range(1, args.rounds + 1):
            started = time.monotonic()
            asyncio.run(round_of(base, args.model, model_input, photos, args.per_round, args.concurrency, counts))
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
    strays = not_json(log)
    print(f"server log {log}: {len(strays)} lines that are not JSON" + "".join(f"\n  {line}" for line in strays[:10]))


def slots_in_use(base: str) -> int:
    with urllib.request.urlopen(f"{base}/models", timeout=10) as response:
        models = json.loads(response.read())["models"]
    return sum(w["slots_in_use"] for m in models for w in m.get("workers", []))


if __name__ == "__main__":
    main()
