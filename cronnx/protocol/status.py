"""The one table from the errors below the protocols (`errors.py`) to HTTP status codes. HTTP
answers with the status; gRPC maps the status to its code (`grpc/status.py`), so each error means
the same on every protocol."""

from __future__ import annotations

from cronnx.errors import (BodyTimeout, CronnxError, DeadlineExceeded, ExpectationFailed, ImageTooLarge,
                           InferenceFailed, InvalidRequest, ModelControlFailed, ModelNotFound, NotAuthenticated,
                           PermissionDenied, RequestTooLarge, TransferCodingNotImplemented, Unavailable,
                           UnsupportedMediaType)

# The most specific class listed wins.
ERROR_STATUS: dict[type[CronnxError], int] = {
    InvalidRequest: 400,
    BodyTimeout: 408,
    NotAuthenticated: 401,
    PermissionDenied: 403,
    ModelNotFound: 404,
    ImageTooLarge: 413,
    RequestTooLarge: 413,
    UnsupportedMediaType: 415,
    ExpectationFailed: 417,
    TransferCodingNotImplemented: 501,
    InferenceFailed: 500,
    ModelControlFailed: 500,
    Unavailable: 503,
    DeadlineExceeded: 504,
}


def error_status(exc: CronnxError) -> int:
    """`exc`'s status: that of its most specific class in ERROR_STATUS, else 500."""
    for cls in type(exc).__mro__:
        status = ERROR_STATUS.get(cls)
        if status is not None:
            return status
    return 500
