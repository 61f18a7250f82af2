"""The gRPC server of a process that serves HTTP (grpcio's asyncio server on the process's event
loop), with its limits:

- Messages: a request message up to `server.max_body_bytes` is taken (gRPC's own default is 4 MiB,
  less than a phone photo); one above it is refused with RESOURCE_EXHAUSTED naming the limit and
  counted like any request (`service.py`), and one more than MESSAGE_SLACK_BYTES above it is
  refused by gRPC itself before it is read whole. Answers are not bounded (a batch of large
  outputs may exceed any fixed size).
- Calls: at most `max_concurrent_rpcs` in progress in the process (`server.max_connections`, the
  HTTP side's cap on connections, shared by front processes alike); more get RESOURCE_EXHAUSTED
  at once. At most MAX_CONCURRENT_STREAMS calls at once on one connection (HTTP/2's
  SETTINGS_MAX_CONCURRENT_STREAMS; 100 is the minimum RFC 9113 recommends and nginx's default).
- Connections: one without a call for `server.idle_timeout_s` is closed (GOAWAY), as HTTP's idle
  connections are; keepalive pings from clients are taken no more often than every
  MIN_PING_INTERVAL_S without calls in flight (gRPC's default enforcement: a client pinging
  more often is sent GOAWAY "too_many_pings").
"""

from __future__ import annotations

import grpc
from tritonclient.grpc import service_pb2_grpc

from cronnx.engine.client import InferenceClient
from cronnx.grpc.service import GrpcLimits, InferenceService
from cronnx.protocol.metadata import MetadataSource

MESSAGE_SLACK_BYTES = 1024 * 1024
MAX_CONCURRENT_STREAMS = 100
MIN_PING_INTERVAL_S = 300


async def start_grpc(client: InferenceClient, metadata: MetadataSource, host: str, port: int, max_body_bytes: int,
                     request_timeout_s: float, idle_timeout_s: float, max_concurrent_rpcs: int, tracing,
                     reuse_port: bool) -> tuple[grpc.aio.Server, int]:
    """Serve the inference service (`service.InferenceService` over `client` and `metadata`) on
    host:port (0: a free port); returns the started server and its port. `reuse_port`:
    SO_REUSEPORT, so that front processes share the port (else the port must be free: gRPC
    would otherwise share it silently with another server of the same user). Raises OSError
    when the port cannot be bound."""
    server = grpc.aio.server(maximum_concurrent_rpcs=max_concurrent_rpcs, options=[
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_receive_message_length", max_body_bytes + MESSAGE_SLACK_BYTES),
        ("grpc.max_send_message_length", -1),
        ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
        ("grpc.max_connection_idle_ms", int(idle_timeout_s * 1000)),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_PING_INTERVAL_S * 1000),
    ])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceService(client, metadata, GrpcLimits(max_body_bytes, request_timeout_s), tracing), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:  # grpcio raises RuntimeError, or returns 0, saying only that it failed
        raise OSError(f"cannot serve gRPC on {address}: the port is taken or the address is not this host's")
    await server.start()
    return server, bound
