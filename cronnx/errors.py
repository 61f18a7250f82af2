"""Errors that become HTTP answers: a status, a message for the JSON body, optional headers."""

from __future__ import annotations


class ApiError(Exception):
    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class PayloadTooLarge(ApiError):
    status = 413


class UnsupportedMediaType(ApiError):
    status = 415


class Unavailable(ApiError):
    """Retry later: ring full, no live worker, worker died, shutting down."""

    status = 503

    def __init__(self, message: str):
        super().__init__(message, {"Retry-After": "1"})


class RingFull(Unavailable):
    """The model's queue (its workers' rings) is full."""


class InferenceFailed(ApiError):
    """onnxruntime raised while running this request's input; the message says what it said."""

    status = 500


class GatewayTimeout(ApiError):
    status = 504
