"""Reading a request's body: its size limit, its Content-Encoding, its deadline, and the image a
/predict body holds (raw bytes, or base64 in JSON)."""

from __future__ import annotations

import asyncio
import binascii
import time

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

# aiohttp's own handler: sends "100 Continue", or 417 for an unknown expectation.
from aiohttp.web_urldispatcher import _default_expect_handler

from cronnx.errors import (BodyTimeout, ExpectationFailed, InvalidRequest, RequestTooLarge,
                           TransferCodingNotImplemented, UndecodableBody, UnsupportedMediaType)
from cronnx.http.context import HttpSettings
from cronnx.http.schemas import JSON_TYPE, ImageRequest

# Every registered type (and the common unregistered aliases) of the formats preprocessing reads;
# the bytes decide the format, the type only says that the body is an image.
RAW_IMAGE_TYPES = frozenset({
    "application/octet-stream",
    "image/jpeg", "image/jpg", "image/pjpeg",         # JPEG
    "image/png", "image/x-png", "image/apng",         # PNG
    "image/webp",                                     # WebP
    "image/gif",                                      # GIF
    "image/bmp", "image/x-bmp", "image/x-ms-bmp",     # BMP
    "image/tiff", "image/tiff-fx", "image/x-tiff",    # TIFF
})
# The codings aiohttp decodes (with its speedups extra: Brotli and zstd).
CONTENT_ENCODINGS = frozenset({"identity", "gzip", "x-gzip", "deflate", "br", "zstd"})

_image_request = msgspec.json.Decoder(ImageRequest)


def request_deadline(settings: HttpSettings, started: float) -> float:
    """The request's deadline on the loop's clock: its time starts on arrival (`started`, a
    perf_counter reading), so a client that stalls its upload holds a handler only until then."""
    return asyncio.get_running_loop().time() + settings.request_timeout_s - (time.perf_counter() - started)


async def read_body(request: web.Request, settings: HttpSettings, deadline: float) -> bytes:
    """The whole body (decoded per its Content-Encoding), at most `settings.max_body_bytes`
    bytes, by `deadline` (the loop's clock). Raises UnsupportedMediaType, RequestTooLarge,
    UndecodableBody, BodyTimeout; ExpectationFailed for an `Expect` other than 100-continue (whose
    body was not invited: `continue_unless_too_large`); InvalidRequest and
    TransferCodingNotImplemented as `_check_transfer_coding` says."""
    expectation = request.headers.get("Expect")
    if expectation is not None and expectation.strip().lower() != "100-continue":
        raise ExpectationFailed(f"unsupported Expect {expectation!r}; only 100-continue is known")
    _check_transfer_coding(request)
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in CONTENT_ENCODINGS:
        raise UnsupportedMediaType(f"unsupported Content-Encoding {encoding!r}; use one of: "
                                   f"{', '.join(sorted(CONTENT_ENCODINGS))}")
    limit = settings.max_body_bytes
    too_large = f"request body is larger than the limit of {limit} bytes"
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(too_large)
    try:
        async with asyncio.timeout_at(deadline):
            return await _read_body(request.content, limit, too_large)
    except TimeoutError:
        raise BodyTimeout("the request body did not arrive within the request timeout "
                          f"({settings.request_timeout_s:g}s)") from None


async def read_image(request: web.Request, settings: HttpSettings, deadline: float) -> bytes:
    """An image's encoded bytes from a /predict body: raw (an image Content-Type) or JSON with
    base64. Raises as `read_body` does, and InvalidRequest for an empty or malformed body."""
    content_type = request.content_type
    if content_type != JSON_TYPE and content_type not in RAW_IMAGE_TYPES:
        allowed = ", ".join([JSON_TYPE, *sorted(RAW_IMAGE_TYPES)])
        raise UnsupportedMediaType(f"unsupported Content-Type {content_type!r}; use one of: {allowed}")
    body = await read_body(request, settings, deadline)
    if not body:
        raise InvalidRequest("request body is empty")
    if content_type != JSON_TYPE:
        return body
    try:
        encoded = _image_request.decode(body).image
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid JSON body: {exc}; expected {{\"image\": \"<base64>\"}}") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}") from None
    if "\n" in encoded:  # `base64` without -w0 wraps lines; the newlines are not data
        encoded = encoded.replace("\r", "").replace("\n", "")
    try:
        return binascii.a2b_base64(encoded, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"field 'image' is not valid base64: {exc}") from None


async def _read_body(stream, limit: int, too_large: str) -> bytes:
    """The whole body, copied once (`request.read()` copies a photo-sized body three times); a
    chunked body without a length is cut off as soon as it passes the limit."""
    chunks, size = [], 0
    try:
        while chunk := await stream.readany():
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(too_large)
            chunks.append(chunk)
    except (web.RequestPayloadError, HttpProcessingError) as exc:  # undecodable Content-Encoding, broken chunks
        # aiohttp's text reads "400, message: Can not decode content-encoding: gzip": keep the reason.
        reason = " ".join(str(exc).split()).split("message:", 1)[-1].strip()
        raise UndecodableBody(f"the request body cannot be read: {reason}") from None
    return b"".join(chunks)


def _check_transfer_coding(request: web.Request) -> None:
    """aiohttp's parser reads the chunked framing and nothing else of `Transfer-Encoding`: a body
    sent `gzip, chunked` would reach the handler still gzipped. RFC 9112, 6.1: an HTTP/1.0 message
    with Transfer-Encoding has faulty framing (InvalidRequest, 400), and a coding the server does
    not implement is a 501 (TransferCodingNotImplemented)."""
    transfer = request.headers.get("Transfer-Encoding")
    if transfer is None:
        return
    if request.version < (1, 1):
        raise InvalidRequest("an HTTP/1.0 request cannot carry Transfer-Encoding (RFC 9112, 6.1): send the body "
                             "with its Content-Length")
    codings = [coding.strip().lower() for coding in transfer.split(",") if coding.strip()]
    if codings != ["chunked"]:
        raise TransferCodingNotImplemented(f"Transfer-Encoding {transfer!r} is not implemented, only chunked; send "
                                           "compressed content with Content-Encoding (gzip, deflate, br, zstd)")


def continue_unless_too_large(limit: int):
    """An `Expect` handler: invite the body (100 Continue) only for `100-continue` with a declared
    length that fits. Otherwise the body is not invited and the route's handler answers, so that
    the refusal is counted and logged as every request is: 413 for a body already known to be
    too large, 417 for an unknown expectation (`read_body` raises both)."""
    async def expect(request: web.Request) -> web.Response | None:
        if request.headers.get("Expect", "").strip().lower() != "100-continue":
            return None
        if request.content_length is not None and request.content_length > limit:
            return None
        return await _default_expect_handler(request)
    return expect
