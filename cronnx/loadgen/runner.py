"""The load loops of one client process: closed (N clients back to back) or open (a fixed arrival rate).

Open-loop latency runs from each request's intended send time, not from when it was actually
sent: a server that stalls delays the sends behind it, and that delay is the users' wait too
(no coordinated omission). Sends more than LATE_S behind their schedule are counted.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter

import msgspec

from .histogram import LatencyHistogram
from .transports import SUCCESS, GrpcTransport, HttpTransport, NoAnswer

LATE_S = 0.002
# A closed-loop client whose connection failed waits this long, so a dead server is not a busy loop.
ERROR_PAUSE_S = 0.01
# Every attempt has failed, with no answer in between, for this long: the server is gone.
GIVE_UP_S = 3.0


class LoadSpec(msgspec.Struct, frozen=True):
    url: str  # HTTP: the URL posted to; gRPC: the server's host:port
    bodies: list[bytes]  # HTTP: the bodies; gRPC: serialised ModelInferRequests
    content_type: str
    protocol: str = "predict"  # or "v2" (both HTTP) or "grpc"
    headers: dict[str, str] = {}  # HTTP: more headers
    # gRPC: the channels (connections) of a client process, client i on channel i % n; None: one
    # per client (the open loop, which has no clients: one).
    grpc_channels: int | None = None
    concurrency: int | None = None  # closed loop
    rate: float | None = None  # open loop, requests per second
    arrivals: str = "constant"  # or "poisson"
    duration_s: float | None = 10.0
    requests: int | None = None
    warmup_s: float = 1.0
    timeout_s: float = 30.0
    seed: int = 1
    progress: bool = False
    # Closed loop: a client answered 503 with Retry-After waits that long before its next request
    # (RFC 9110, 10.2.3), as a well-behaved client would (gRPC: UNAVAILABLE with the trailing
    # metadata grpc-retry-pushback-ms); off: it sends again at once.
    retry_after: bool = True
    # time.monotonic() at which the warm-up starts: several processes start together.
    start_at: float | None = None


class LoadResult(msgspec.Struct):
    latency_buckets: dict[int, int]
    latency_max_s: float
    ok: int
    statuses: dict[str, int]
    exceptions: dict[str, int]
    window_s: float
    late: int
    sent: int
    cpu_s: float
    stopped_early: str | None = None

    def histogram(self) -> LatencyHistogram:
        return LatencyHistogram.from_sparse(self.latency_buckets, self.latency_max_s)


class _Run:
    """What one process measured; only requests sent inside the measuring window count."""

    def __init__(self, spec: LoadSpec):
        self.spec = spec
        now = time.monotonic()
        self.warmup_start = spec.start_at or now
        self.window_start = self.warmup_start + spec.warmup_s
        self.window_end = self.window_start + spec.duration_s if spec.requests is None else float("inf")
        self.histogram = LatencyHistogram()
        self.statuses: Counter[str] = Counter()
        self.exceptions: Counter[str] = Counter()
        self.ok = self.sent = self.late = 0
        # When the current run of failed attempts began (None while the server answers).
        self.failing_since: float | None = None
        self.stopped_early: str | None = None
        self.done = asyncio.Event()

    def measured(self, t: float) -> bool:
        return self.window_start <= t < self.window_end

    def take_measured_send(self) -> bool:
        """Count a measured send; with --requests, False once all of them are out."""
        if self.spec.requests is not None and self.sent >= self.spec.requests:
            return False
        self.sent += 1
        return True

    def finished(self, now: float) -> bool:
        if self.done.is_set():
            return True
        if now >= self.window_end or (self.spec.requests is not None and self.sent >= self.spec.requests):
            return True
        if self.failing_since is not None and now - self.failing_since > GIVE_UP_S:
            self.stopped_early = f"no answer for {GIVE_UP_S:g}s (server gone?); numbers are up to that point"
            self.done.set()
            return True
        return False

    async def send(self, transport, body: bytes, client: int, start: float, measured: bool) -> float:
        """One request; returns the seconds its answer asks to wait (a 503's Retry-After, when
        the spec honours it; else 0). Raises _Failed when no answer came."""
        try:
            status, wait_s = await transport.call(body, client)
        except NoAnswer as exc:
            if measured:
                self.exceptions[exc.name] += 1
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            raise _Failed from None
        now = time.monotonic()
        self.failing_since = None
        if measured:
            self.statuses[status] += 1
            if status in SUCCESS:
                self.ok += 1
                self.histogram.record(now - start)
        return wait_s


class _Failed(Exception):
    pass


async def _closed_loop(run: _Run, transport) -> None:
    spec = run.spec
    rng = random.Random(spec.seed)

    async def client(number: int, offset: int) -> None:
        i = offset
        while not run.finished(time.monotonic()):
            start = time.monotonic()
            measured = run.measured(start) and run.take_measured_send()
            if run.measured(start) and not measured:
                return  # --requests: all measured requests are out
            try:
                wait_s = await run.send(transport, spec.bodies[i % len(spec.bodies)], number, start, measured)
            except _Failed:
                await asyncio.sleep(ERROR_PAUSE_S)
            else:
                if wait_s:  # never past the end of the measured window
                    await asyncio.sleep(min(wait_s, max(0.0, run.window_end - time.monotonic())))
            i += 1

    await asyncio.sleep(max(0.0, run.warmup_start - time.monotonic()))
    await asyncio.gather(*(client(n, rng.randrange(len(spec.bodies))) for n in range(spec.concurrency)))


async def _open_loop(run: _Run, transport) -> None:
    spec = run.spec
    rng = random.Random(spec.seed)
    in_flight: set[asyncio.Task] = set()
    intended = run.warmup_start
    i = 0

    async def one(body: bytes, number: int, at: float, measured: bool) -> None:
        try:
            await run.send(transport, body, number, at, measured)
        except _Failed:
            pass

    while not run.finished(intended):
        delay = intended - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if run.done.is_set():
            break
        measured = run.measured(intended)
        if measured:
            if not run.take_measured_send():
                break
            if time.monotonic() - intended > LATE_S:
                run.late += 1
        task = asyncio.get_running_loop().create_task(one(spec.bodies[i % len(spec.bodies)], i, intended, measured))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        i += 1
        gap = rng.expovariate(spec.rate) if spec.arrivals == "poisson" else 1.0 / spec.rate
        intended += gap
    if in_flight:
        await asyncio.wait(in_flight, timeout=spec.timeout_s)


async def _progress(run: _Run) -> None:
    started = time.monotonic()
    previous, previous_t = 0, started
    while True:
        await asyncio.sleep(0.5)
        now = time.monotonic()
        answered = sum(run.statuses.values())
        rate = (answered - previous) / (now - previous_t)
        previous, previous_t = answered, now
        errors = answered - run.ok + sum(run.exceptions.values())
        phase = "warm-up" if now < run.window_start else "measuring"
        sys.stderr.write(f"\r[cronnx bench] {now - started:6.1f}s {phase}: {answered} done, "
                         f"{rate:7.1f}/s, {errors} errors   ")
        sys.stderr.flush()


def transport_for(spec: LoadSpec):
    """The spec's transport: gRPC's channels, or an HTTP pool."""
    if spec.protocol == "grpc":
        channels = spec.grpc_channels or (spec.concurrency or 1)
        return GrpcTransport(spec.url, channels, spec.timeout_s, spec.retry_after)
    return HttpTransport(spec.url, {"Content-Type": spec.content_type, **spec.headers}, spec.timeout_s,
                         spec.retry_after)


async def run_load(spec: LoadSpec) -> LoadResult:
    run = _Run(spec)
    progress = asyncio.get_running_loop().create_task(_progress(run)) if spec.progress else None
    cpu_at_window = None
    transport = transport_for(spec)
    try:
        loop_task = asyncio.ensure_future(_open_loop(run, transport) if spec.rate else _closed_loop(run, transport))
        # The client's own CPU is read over the measuring window only.
        await asyncio.sleep(max(0.0, run.window_start - time.monotonic()))
        cpu_at_window = time.process_time()
        await loop_task
    finally:
        await transport.close()
        if progress is not None:
            progress.cancel()
            sys.stderr.write("\n")
    end = time.monotonic() if spec.requests is not None or run.stopped_early else min(time.monotonic(), run.window_end)
    return LoadResult(
        latency_buckets=run.histogram.to_sparse(), latency_max_s=run.histogram.max_s, ok=run.ok,
        statuses=dict(run.statuses), exceptions=dict(run.exceptions), window_s=max(1e-9, end - run.window_start),
        late=run.late, sent=run.sent, cpu_s=time.process_time() - (cpu_at_window or time.process_time()),
        stopped_early=run.stopped_early)


def run_in_process(spec_bytes: bytes) -> bytes:
    """Entry point of a client process (--procs): msgpack in, msgpack out."""
    spec = msgspec.msgpack.decode(spec_bytes, type=LoadSpec)
    return msgspec.msgpack.encode(asyncio.run(run_load(spec)))
