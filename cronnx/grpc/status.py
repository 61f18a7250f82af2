"""A Cronnx error as a gRPC status: its code from the error's HTTP status (`protocol.status`, the
one table), its message unchanged, so that an error means the same on both protocols. The codes
are those Triton's gRPC endpoint gives for the same failures, and gRPC's own HTTP mapping
(grpc/doc/http-grpc-status-mapping.md) read the other way."""

from __future__ import annotations

import grpc

from cronnx.errors import CronnxError
from cronnx.protocol.status import error_status

CODE_OF_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    # An image over max_image_pixels, a message over max_body_bytes: a limit of the server's.
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    417: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    # Backpressure (a full admission queue, no live worker, a drain) and models still loading.
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code(status: int) -> grpc.StatusCode:
    """The gRPC code of an HTTP status (200: OK; one not listed: INTERNAL)."""
    if status == 200:
        return grpc.StatusCode.OK
    return CODE_OF_STATUS.get(status, grpc.StatusCode.INTERNAL)


def error_code(exc: CronnxError) -> grpc.StatusCode:
    """`exc`'s gRPC code."""
    return grpc_code(error_status(exc))
