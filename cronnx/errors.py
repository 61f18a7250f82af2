"""What can go wrong with a request, below any protocol: the engine, the registry and the
preprocessing raise these; HTTP maps them to status codes in one table
(`protocol.status.ERROR_STATUS`). The message is what the client is told.

An error crosses a pipe one way (`to_wire`, `from_wire`): as its class's name here and its
message; any other exception (a bug) crosses as an `InternalError`.
"""

from __future__ import annotations

import msgspec


class CronnxError(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# The request itself is wrong: sending it again will not help.

class InvalidRequest(CronnxError):
    """A body or parameter that cannot be used (not JSON, not base64, a bad top_k, ...)."""


class UndecodableBody(InvalidRequest):
    """The body cannot be read as sent: not valid for its Content-Encoding, or broken chunking."""


class InvalidImage(InvalidRequest):
    """The body is not an image we can read: unknown format, truncated, corrupt."""


class ImageTooLarge(CronnxError):
    """The image has more pixels than allowed (a decompression bomb)."""


class BodyTimeout(CronnxError):
    """The client did not finish sending its body within the request timeout (a stalled or
    trickled upload): the connection is closed after the answer."""


class RequestTooLarge(CronnxError):
    """The request body is larger than the configured limit."""


class TransferCodingNotImplemented(CronnxError):
    """A `Transfer-Encoding` other than `chunked` (RFC 9112, 6.1: a coding the server does not
    implement is answered 501). Compressing the content is `Content-Encoding`'s job."""


class ExpectationFailed(CronnxError):
    """An `Expect` header other than `100-continue` (RFC 9110, 10.1.1): the body was not invited."""


class UnsupportedMediaType(CronnxError):
    """A body type the API does not read."""


class NotAuthenticated(CronnxError):
    """A protected API was called without credentials."""


class PermissionDenied(CronnxError):
    """Credentials were given but are wrong."""


class ModelNotFound(CronnxError):
    """No such model, or no such version of it, is served (or, to model control, configured)."""


class ModelControlFailed(CronnxError):
    """A model-control action (load, reload) could not run: the config file, or the model it
    names, could not be read or checked. The message is the config error's."""


# Retry later: the server or the model cannot take the request now.

class Unavailable(CronnxError):
    pass


class ModelNotReady(Unavailable):
    """The model (or the version asked for) is loading."""


class NoLiveWorker(Unavailable):
    """Every worker of the model is starting or restarting."""


class QueueFull(Unavailable):
    """Every slot of the model's rings holds a request: backpressure, answered at once."""


class WorkerLost(Unavailable):
    """The worker running the request died or was killed as unresponsive; the message says why."""


class PreprocessingLost(Unavailable):
    """The preprocessing process decoding this request's image exited; it is being replaced."""


class ShuttingDown(Unavailable):
    """The server is draining: it finishes what it has and takes nothing new."""


class DeadlineExceeded(CronnxError):
    """The request did not complete before its deadline (`request_timeout_s`)."""


class QueueTimeout(DeadlineExceeded):
    """The request waited for a ring slot longer than its queue timeout (the model's
    default_timeout_ms, or the request's own)."""


class InferenceFailed(CronnxError):
    """onnxruntime raised while running this request's input; the message says what it said."""


class NonFiniteOutput(InferenceFailed):
    """The model's scores for this request hold NaN or infinity (an fp16 overflow, say): there
    is no ranking or probability to answer with."""


class InternalError(RuntimeError):
    """A bug in another process (not a CronnxError): answered as any unexpected error, 500 with
    the details in the server log only. The message is the original's type and text."""


class WireError(msgspec.Struct, frozen=True, array_like=True):
    """An error as it crosses a pipe: `name`, its class in this module ("InternalError" for a
    bug), and `message`, what the client is told (or, for a bug, what the log says)."""

    name: str
    message: str


def to_wire(exc: BaseException) -> WireError:
    """`exc`'s wire form: a CronnxError of this module by its class; anything else as InternalError."""
    if isinstance(exc, CronnxError) and _BY_NAME.get(type(exc).__name__) is type(exc):
        return WireError(type(exc).__name__, exc.message)
    return WireError("InternalError", f"{type(exc).__name__}: {exc}")


def from_wire(wire: WireError) -> Exception:
    """The error `wire` stands for: its CronnxError class here, or InternalError for any other name."""
    cls = _BY_NAME.get(wire.name)
    return cls(wire.message) if cls is not None else InternalError(wire.message)


_BY_NAME: dict[str, type[CronnxError]] = {
    name: cls for name, cls in list(globals().items()) if isinstance(cls, type) and issubclass(cls, CronnxError)}
