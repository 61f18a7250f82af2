"""How one request goes out and what came back, per transport: HTTP (aiohttp) for `/predict` and
V2 infer, gRPC (grpcio's asyncio channel) for ModelInfer.

`call(body, client)` returns the status the server answered (HTTP's "200", "503"; gRPC's code
names, "OK", "UNAVAILABLE") and the seconds the answer asks the client to wait before its next
request; it raises NoAnswer, naming what failed, when no answer came (no connection, a dropped
connection, the client's own timeout). `client` is the closed-loop client's number (the open
loop numbers its requests): a transport may keep a connection per client.
"""

from __future__ import annotations

import time

import aiohttp

# The statuses of a successful request.
SUCCESS = frozenset({"200", "OK"})
# At most this long is waited for, whatever an answer asks.
MAX_WAIT_S = 60.0


class NoAnswer(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class HttpTransport:
    """POSTs to one URL over an aiohttp pool without a limit: a connection per request in flight,
    kept alive between requests."""

    def __init__(self, url: str, headers: dict[str, str], timeout_s: float, retry_after: bool):
        self.url, self.headers, self.retry_after = url, headers, retry_after
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def call(self, body: bytes, client: int) -> tuple[str, float]:
        try:
            async with self.session.post(self.url, data=body, headers=self.headers) as r:
                await r.read()
                status = r.status
                retry_after = r.headers.get("Retry-After") if status == 503 and self.retry_after else None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise NoAnswer(type(exc).__name__) from None
        return str(status), _delay_s(retry_after)

    async def close(self) -> None:
        await self.session.close()


def _delay_s(retry_after: str | None) -> float:
    """The seconds a Retry-After header's delay-seconds form asks for (at most MAX_WAIT_S); 0 for
    none, or for the HTTP-date form, which Cronnx never sends."""
    if retry_after is None or not retry_after.strip().isdigit():
        return 0.0
    return min(MAX_WAIT_S, float(retry_after.strip()))


class GrpcTransport:
    """ModelInfer calls on `channels` channels to `target` (host:port), client i on channel
    i % channels; each channel is a connection of its own (a local subchannel pool: grpcio
    would otherwise share one connection among channels of the same target and arguments).
    The request is sent as the serialised bytes it was built as, and the answer is not parsed,
    as HTTP's bodies are sent and read."""

    def __init__(self, target: str, channels: int, timeout_s: float, retry_after: bool):
        import grpc
        from tritonclient.grpc import service_pb2

        self._grpc = grpc
        self.timeout_s, self.retry_after = timeout_s, retry_after
        method = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name["ModelInfer"]
        path = f"/{method.containing_service.full_name}/{method.name}"
        self.channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                         for _ in range(channels)]
        # No serialiser either way: bytes out, bytes in.
        self.infer = [channel.unary_unary(path) for channel in self.channels]

    async def call(self, body: bytes, client: int) -> tuple[str, float]:
        grpc = self._grpc
        lane = client % len(self.channels)
        started = time.monotonic()
        try:
            await self.infer[lane](body, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            # gRPC gives UNAVAILABLE for a connection that failed as for a server that says it
            # is unavailable (Cronnx's 503). A server's answer ends with its trailers (Cronnx's
            # carry the request id); a status the client's gRPC made up has none. (The channel's
            # state does not tell: it may still read READY as the server's socket closes.)
            if code == grpc.StatusCode.UNAVAILABLE and not exc.trailing_metadata():
                raise NoAnswer("grpc UNAVAILABLE") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started >= self.timeout_s:
                raise NoAnswer("grpc DEADLINE_EXCEEDED") from None  # the client's own timeout
            return code.name, self._pushback_s(exc) if code == grpc.StatusCode.UNAVAILABLE else 0.0
        return "OK", 0.0

    def _pushback_s(self, exc) -> float:
        """gRPC's counterpart of Retry-After, the `grpc-retry-pushback-ms` trailing metadata."""
        if not self.retry_after:
            return 0.0
        for key, value in exc.trailing_metadata() or ():
            if key == "grpc-retry-pushback-ms" and isinstance(value, str) and value.strip().isdigit():
                return min(MAX_WAIT_S, int(value.strip()) / 1000.0)
        return 0.0

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
