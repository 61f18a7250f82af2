"""A test HTTP server whose latency and failures are set exactly: what `cronnx bench` must report.

    python fake_server.py --delay-ms 20 --error-every 5 --stall-at 1.5 --stall-for 0.5

POST /predict/{model}: answers after --delay-ms; every --error-every-th request is a 500; from
--stall-at seconds after the first request, for --stall-for seconds, no request is answered
until the stall ends; every --busy-every-th request is a 503 with Retry-After: 1. Prints
"listening on PORT".
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web


def make_app(delay_s: float, error_every: int, stall_at: float | None, stall_for: float,
             busy_every: int = 0) -> web.Application:
    state = {"count": 0, "first": None}

    async def predict(request: web.Request) -> web.Response:
        await request.read()
        now = time.monotonic()
        state["first"] = state["first"] or now
        state["count"] += 1
        count = state["count"]
        if stall_at is not None:
            stall_start = state["first"] + stall_at
            stall_end = stall_start + stall_for
            if stall_start <= now < stall_end:
                await asyncio.sleep(stall_end - now)
        await asyncio.sleep(delay_s)
        if error_every and count % error_every == 0:
            return web.json_response({"error": "injected"}, status=500)
        if busy_every and count % busy_every == 0:
            return web.json_response({"error": "busy"}, status=503, headers={"Retry-After": "1"})
        return web.json_response({"model": "fake", "version": 1, "predictions": [], "batch_size": 1})

    app = web.Application()
    app.router.add_post("/predict/{model}", predict)
    return app


async def main(args) -> None:
    runner = web.AppRunner(make_app(args.delay_ms / 1000.0, args.error_every, args.stall_at, args.stall_for,
                                    args.busy_every), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"listening on {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--error-every", type=int, default=0)
    parser.add_argument("--stall-at", type=float, default=None)
    parser.add_argument("--stall-for", type=float, default=0.0)
    parser.add_argument("--busy-every", type=int, default=0)
    asyncio.run(main(parser.parse_args()))
