"""The HTTP front: `/predict` and the operational API. Reads requests, runs them on the inference
engine, answers JSON; maps the engine's errors to status codes in one table (`ERROR_STATUS`)."""

from __future__ import annotations

import asyncio
import binascii
import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import msgspec
import numpy as np
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

# aiohttp's own handler: sends "100 Continue", or 417 for an unknown expectation.
from aiohttp.web_urldispatcher import _default_expect_handler

from cronnx.api import (
    JSON_TYPE,
    FrontProcessesStatus,
    Health,
    ImageRequest,
    Prediction,
    PredictResponse,
    PreprocessingStatus,
    Timings,
    failed_status,
    model_status,
)
from cronnx.config import ConfigError, NotInConfig, ServerConfig
from cronnx.engine.inference import InferenceEngine
from cronnx.engine.pool import ModelPool
from cronnx.engine.registry import Registry
from cronnx.errors import (
    BodyTimeout,
    CronnxError,
    DeadlineExceeded,
    ImageTooLarge,
    InferenceFailed,
    InvalidRequest,
    ModelNotFound,
    NotAuthenticated,
    PermissionDenied,
    QueueFull,
    RequestTooLarge,
    Unavailable,
    UndecodableBody,
    UnsupportedMediaType,
)
from cronnx.models.postprocess import top_k
from cronnx.observability.metrics import UNKNOWN_MODEL, Metrics

log = logging.getLogger("cronnx.front")
access_log = logging.getLogger("cronnx.access")

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
REQUEST_ID_HEADER = "X-Request-ID"
# Requests with the same key get the same version of a model whose traffic is split.
ROUTING_KEY_HEADER = "X-Cronnx-Key"
# A client's request id is echoed into headers and logs: keep it short and printable.
_VALID_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")

_json = msgspec.json.Encoder()
_image_request = msgspec.json.Decoder(ImageRequest)


# Every error below HTTP becomes one status here; the most specific class listed wins.
ERROR_STATUS: dict[type[CronnxError], int] = {
    InvalidRequest: 400,
    BodyTimeout: 408,
    NotAuthenticated: 401,
    PermissionDenied: 403,
    ModelNotFound: 404,
    ImageTooLarge: 413,
    RequestTooLarge: 413,
    UnsupportedMediaType: 415,
    InferenceFailed: 500,
    Unavailable: 503,
    DeadlineExceeded: 504,
}


def error_status(exc: CronnxError) -> int:
    for cls in type(exc).__mro__:
        status = ERROR_STATUS.get(cls)
        if status is not None:
            return status
    return 500


def json_response(body: msgspec.Struct | dict, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=_json.encode(body), status=status, headers=headers, content_type=JSON_TYPE)


class ServerState:
    """What the handlers share: the engine (and through it the models), config, metrics."""

    def __init__(self, config: ServerConfig, engine: InferenceEngine, reloader, metrics: Metrics):
        self.config = config
        self.engine = engine
        self.registry: Registry = engine.registry
        self.reloader = reloader
        self.metrics = metrics
        # The front processes (server.front_processes > 1), or None: this process serves HTTP.
        self.fronts = None

    def ready(self) -> bool:
        return not self.engine.draining and self.registry.ready()


STATE = web.AppKey("state", ServerState)


@web.middleware
async def request_ids_and_json_errors(request: web.Request, handler):
    """Every answer carries the request id; every error leaves as {"error": "..."} with its status."""
    request_id = request.headers.get(REQUEST_ID_HEADER, "")
    if not _VALID_REQUEST_ID.match(request_id):
        request_id = uuid.uuid4().hex
    request["request_id"] = request_id
    try:
        response = await handler(request)
    except CronnxError as exc:
        status = error_status(exc)
        response = json_response({"error": exc.message}, status, {"Retry-After": "1"} if status == 503 else None)
        if isinstance(exc, (BodyTimeout, UndecodableBody)):
            response.force_close()  # the rest of the body may still come: not on this connection
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = json_response({"error": exc.reason}, exc.status, {k: v for k, v in exc.headers.items()
                                                                      if k != "Content-Type"})
    except Exception:
        log.exception("unexpected error on %s %s (request %s)", request.method, request.path, request_id)
        response = json_response({"error": "internal error; see the server log"}, 500)
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


async def health(request: web.Request) -> web.Response:
    return json_response(Health("alive"))


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    registry = state.registry
    live = {name: sum(p.live_workers for p in route.versions.values()) for name, route in registry.routes.items()}
    failed = {f"{name} v{version}": reason for (name, version), reason in registry.failed.items()}
    if state.engine.draining:
        return json_response(Health("draining", live, failed), 503)
    if state.ready():
        return json_response(Health("ready", live, failed))
    if not registry.loaded_once:
        return json_response(Health("loading", live, failed), 503)
    # Loaded, and no model serves: every one failed, or all were unloaded.
    return json_response(Health("failed" if failed else "no models", live, failed), 503)


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    p, f = state.engine.preprocessing, state.fronts
    if f is None:
        fronts = FrontProcessesStatus(1, 0, [])
        preprocessing = PreprocessingStatus(p.placement, p.count, p.restarts, sorted(p.pids))
    else:  # the fronts decode every image, in their threads
        fronts = FrontProcessesStatus(f.count, f.restarts, sorted(f.pids))
        preprocessing = PreprocessingStatus("front processes", f.count * f.threads, f.restarts, sorted(f.pids))
    return json_response({"models": models_status(state.registry), "preprocessing": preprocessing,
                          "front_processes": fronts})


def models_status(registry: Registry, only: str | None = None) -> list:
    statuses = []
    for pool in registry.pools():
        route = registry.routes.get(pool.name)
        weight = (route.traffic or {}).get(pool.version) if route and route.versions.get(pool.version) is pool else None
        statuses.append(model_status(pool, weight))
    statuses += [failed_status(name, version, reason) for (name, version), reason in registry.failed.items()]
    statuses = [s for s in statuses if only is None or s.name == only]
    return sorted(statuses, key=lambda s: (s.name, s.version, s.state))


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


class RequestRecord:
    """What one prediction request did, for its metrics and its log line."""

    def __init__(self, request_id: str, api: str, model: str, version: str):
        self.request_id, self.api, self.model, self.version = request_id, api, model, version
        # 499: the client closed the connection first (nginx's convention).
        self.status = 500
        self.error = ""
        self.ring_full = False
        self.batch_size = 0
        self.phases: dict[str, float] = {}

    @property
    def outcome(self) -> str:
        """The metrics' outcome label: "success", or the status code."""
        return "success" if self.status == 200 else str(self.status)


async def predict(request: web.Request) -> web.Response:
    return await model_request(request, "predict", _predict)


# A handler's work once its model version is chosen: (request, state, pool, record, started) -> response.
ModelHandler = Callable[[web.Request, ServerState, ModelPool, "RequestRecord", float], Awaitable[web.Response]]


async def model_request(request: web.Request, api: str, run: ModelHandler) -> web.Response:
    """What every request for a model goes through, whichever API (`api`: "predict", "v2") it
    speaks: the version chosen (and counted in flight in it), `run`, then one metrics record and
    one access-log line."""
    started = time.perf_counter()
    state = request.app[STATE]
    record = RequestRecord(request["request_id"], api, UNKNOWN_MODEL, "")
    state.metrics.in_flight.inc()
    try:
        with outcome_into(record), state.engine.select(request.match_info["model"], requested_version(request),
                                                       request.headers.get(ROUTING_KEY_HEADER)) as pool:
            record.model, record.version = pool.name, str(pool.version)
            return await run(request, state, pool, record, started)
    finally:
        state.metrics.in_flight.dec()
        _record(state.metrics, record, time.perf_counter() - started)


@contextmanager
def outcome_into(record: RequestRecord) -> Iterator[None]:
    """Sets `record`'s status by how the block ends: 200, the error's status and message (a
    CronnxError), or 499 when the client went away (nginx's convention). Errors pass through."""
    try:
        yield
    except CronnxError as exc:
        record.status, record.error = error_status(exc), exc.message
        record.ring_full = isinstance(exc, QueueFull)
        raise
    except asyncio.CancelledError:
        record.status, record.error = 499, "the client closed the connection"
        raise
    record.status = 200


async def _predict(request: web.Request, state: ServerState, pool: ModelPool, record: RequestRecord,
                   started: float) -> web.Response:
    k = top_k_param(request) or pool.top_k
    deadline = request_deadline(state, started)
    image = await read_image(request, state.config.max_body_bytes, deadline, state.config.request_timeout_s)
    read_s = time.perf_counter() - started
    result = await state.engine.infer(pool, image, record.request_id, deadline)
    return predict_response(record, pool.labels, pool.outputs_probabilities, k, result.output, result.batch_size,
                            started, {"read": read_s, "preprocess": result.preprocess_s, "queue": result.queue_s,
                                      "inference": result.infer_s})


def predict_response(record: RequestRecord, labels: list[str], outputs_probabilities: bool, k: int,
                     output: np.ndarray, batch_size: int, started: float, phases: dict[str, float]) -> web.Response:
    """/predict's answer for one request's model `output` (its scores, any shape): the top `k`
    classes with their labels and probabilities, the batch it ran in and its phases (`phases`:
    seconds by name; "respond" is added here). Fills in `record`'s batch size and phases.
    `started` is the request's arrival (perf_counter). Raises NonFiniteOutput."""
    respond_started = time.perf_counter()
    predictions = [Prediction(i, labels[i], p) for i, p in top_k(output, k, outputs_probabilities)]
    timings = Timings(total=(respond_started - started) * 1000.0, read=phases["read"] * 1000.0,
                      preprocess=phases["preprocess"] * 1000.0, queue=phases["queue"] * 1000.0,
                      inference=phases["inference"] * 1000.0)
    response = json_response(PredictResponse(model=record.model, version=int(record.version),
                                             predictions=predictions, batch_size=batch_size, timings_ms=timings))
    record.batch_size = batch_size
    record.phases = {**phases, "respond": time.perf_counter() - respond_started}
    return response


def _record(metrics: Metrics, record: RequestRecord, total_s: float) -> None:
    metrics.record_request(record.model, record.version, record.api, record.outcome, total_s, record.phases,
                           record.ring_full)
    log_request(record, total_s)


def log_request(record: RequestRecord, total_s: float) -> None:
    """The request's access-log line (logger "cronnx.access")."""
    fields = {"request_id": record.request_id, "api": record.api, "model": record.model, "version": record.version,
              "status": record.status, "total_ms": total_s * 1000.0}
    if record.batch_size:
        fields["batch_size"] = record.batch_size
    if record.phases:
        fields["phases_ms"] = {phase: seconds * 1000.0 for phase, seconds in record.phases.items()}
    if record.error:
        fields["error"] = record.error
    access_log.info("request", extra={"fields": fields})


# Versions are int64 on the way to the engine (msgspec, the pipes' messages): a longer number
# names no version there can be.
_MAX_VERSION_DIGITS = len(str(2 ** 63 - 1))


def requested_version(request: web.Request) -> int | None:
    """The version a route names (`.../versions/{version}`, digits), None when it names none.
    Raises ModelNotFound for a number beyond int64, as for any version not served (it is parsed
    without converting thousands of digits)."""
    text = request.match_info.get("version")
    if text is None:
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > _MAX_VERSION_DIGITS or int(digits) > 2 ** 63 - 1:
        raise ModelNotFound(f"version {digits[:24]}{'...' if len(digits) > 24 else ''} of model "
                            f"{request.match_info['model']!r} is not served")
    return int(digits)


def top_k_param(request: web.Request) -> int | None:
    """The `top_k` query parameter, None when absent; InvalidRequest unless a positive integer."""
    raw = request.query.get("top_k")
    if raw is None:
        return None
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if k < 1:
        raise InvalidRequest(f"top_k must be a positive integer, got {raw!r}")
    return k


# The codings aiohttp decodes (with its speedups extra: Brotli and zstd).
CONTENT_ENCODINGS = frozenset({"identity", "gzip", "x-gzip", "deflate", "br", "zstd"})


def request_deadline(state: ServerState, started: float) -> float:
    """The request's deadline on the loop's clock: its time starts on arrival (`started`, a
    perf_counter reading), so a client that stalls its upload holds a handler only until then."""
    return asyncio.get_running_loop().time() + state.config.request_timeout_s - (time.perf_counter() - started)


async def read_body(request: web.Request, limit: int, deadline: float, timeout_s: float) -> bytes:
    """The whole body (decoded per its Content-Encoding), at most `limit` bytes, by `deadline`
    (the loop's clock; `timeout_s`, the request timeout, is named in the error). Raises
    UnsupportedMediaType, RequestTooLarge, UndecodableBody, BodyTimeout."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in CONTENT_ENCODINGS:
        raise UnsupportedMediaType(f"unsupported Content-Encoding {encoding!r}; use one of: "
                                   f"{', '.join(sorted(CONTENT_ENCODINGS))}")
    too_large = f"request body is larger than the limit of {limit} bytes"
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(too_large)
    try:
        async with asyncio.timeout_at(deadline):
            return await _read_body(request.content, limit, too_large)
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within the request timeout ({timeout_s:g}s)") from None


async def read_image(request: web.Request, limit: int, deadline: float, timeout_s: float) -> bytes:
    """An image's encoded bytes from a /predict body: raw (an image Content-Type) or JSON with
    base64. Raises as `read_body` does, and InvalidRequest for an empty or malformed body."""
    content_type = request.content_type
    if content_type != JSON_TYPE and content_type not in RAW_IMAGE_TYPES:
        allowed = ", ".join([JSON_TYPE, *sorted(RAW_IMAGE_TYPES)])
        raise UnsupportedMediaType(f"unsupported Content-Type {content_type!r}; use one of: {allowed}")
    body = await read_body(request, limit, deadline, timeout_s)
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


def make_app(state: ServerState) -> web.Application:
    app = web.Application(middlewares=[request_ids_and_json_errors], client_max_size=state.config.max_body_bytes)
    app[STATE] = state
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/models", list_models)
    app.router.add_get("/metrics", metrics)
    expect = continue_unless_too_large(state.config.max_body_bytes)
    app.router.add_post("/predict/{model}", predict, expect_handler=expect)
    app.router.add_post(r"/predict/{model}/versions/{version:\d+}", predict, expect_handler=expect)
    if state.config.admin.enabled:
        app.router.add_post("/admin/models/{model}/{action:load|unload|reload}", admin)
    return app


def continue_unless_too_large(limit: int):
    """An `Expect: 100-continue` handler: invite the body only if its declared length fits; a body
    already known to be too large gets its 413 from the handler without being sent at all."""
    async def expect(request: web.Request) -> web.Response | None:
        expectation = request.headers.get("Expect", "")
        if expectation.strip().lower() != "100-continue":
            # Answered here, before the middleware runs: the error is JSON all the same.
            return json_response({"error": f"unsupported Expect {expectation!r}; only 100-continue is known"}, 417,
                                 {REQUEST_ID_HEADER: uuid.uuid4().hex})
        if request.content_length is not None and request.content_length > limit:
            return None
        return await _default_expect_handler(request)
    return expect


async def admin(request: web.Request) -> web.Response:
    """Model control: load (what the config says), unload, reload (load again even if unchanged)."""
    state = request.app[STATE]
    _check_token(request, state.config.admin.resolved_token())
    name, action = request.match_info["model"], request.match_info["action"]
    log.info("admin: %s model %s", action, name)
    try:
        # Shielded: a client that hangs up must not cancel a load half-way.
        if action == "unload":
            await asyncio.shield(state.registry.unload(name))
        else:
            await asyncio.shield(state.reloader.reload(only=name, force=action == "reload"))
    except ConfigError as exc:
        status = 404 if isinstance(exc, NotInConfig) else 500
        return json_response({"error": str(exc)}, status)
    return json_response({"model": name, "action": action, "versions": models_status(state.registry, name)})


def _check_token(request: web.Request, token: str) -> None:
    given = request.headers.get("Authorization", "")
    scheme, _, credentials = given.partition(" ")
    if scheme.lower() != "bearer":  # auth schemes are case-insensitive (RFC 9110, 11.1)
        raise NotAuthenticated("admin API: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(credentials.strip().encode("utf-8", "surrogateescape"), token.encode()):
        raise PermissionDenied("admin API: wrong token")
