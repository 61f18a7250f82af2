"""What the gRPC tests share: the generated stub on the module's `server` fixture."""

from __future__ import annotations

import grpc
import pytest
from tritonclient.grpc import service_pb2_grpc


@pytest.fixture(scope="module")
def stub(server):
    """The generated stub itself, for what tritonclient does not show (trailing metadata, codes)."""
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
