"""The HTTP front: reads requests, preprocesses into ring slots, awaits workers, answers JSON."""

from __future__ import annotations

import asyncio
import binascii
import hmac
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import msgspec
from aiohttp import web

from .api import (JSON_TYPE, Health, ImageRequest, Prediction, PredictResponse, Timings, failed_status,
                  model_status)
from .config import ConfigError, NotInConfig, ServerConfig
from .errors import (ApiError, BadRequest, Forbidden, GatewayTimeout, PayloadTooLarge, RingFull, Unauthorized,
                     Unavailable, UnsupportedMediaType)
from .metrics import UNKNOWN_MODEL, Metrics
from .pool import ModelPool
from .postprocess import top_k
from .preprocess import ImageError, ImageTooLarge
from .registry import Registry
from .scheduling import mark_cpu_bound

log = logging.getLogger("cronnx.front")
access_log = logging.getLogger("cronnx.access")

RAW_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "application/octet-stream"})
REQUEST_ID_HEADER = "X-Request-ID"
# Requests with the same key get the same version of a model whose traffic is split.
ROUTING_KEY_HEADER = "X-Cronnx-Key"
# A client's request id is echoed into headers and logs: keep it short and printable.
_VALID_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")

_json = msgspec.json.Encoder()
_image_request = msgspec.json.Decoder(ImageRequest)


def json_response(body: msgspec.Struct | dict, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=_json.encode(body), status=status, headers=headers, content_type=JSON_TYPE)


class ServerState:
    """What the handlers share: the models, the preprocessing pool, metrics, and whether we are draining."""

    def __init__(self, config: ServerConfig, registry: Registry, reloader, metrics: Metrics):
        self.config = config
        self.registry = registry
        self.reloader = reloader
        self.metrics = metrics
        self.draining = False
        self.executor = ThreadPoolExecutor(config.preprocess_threads, thread_name_prefix="cronnx-preprocess",
                                           initializer=mark_cpu_bound)

    def ready(self) -> bool:
        return not self.draining and self.registry.ready()


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
    except ApiError as exc:
        response = json_response({"error": exc.message}, exc.status, exc.headers)
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
    live = {name: sum(p.live_workers for p in route.versions.values()) for name, route in state.registry.routes.items()}
    if state.draining:
        return json_response(Health("draining", live), 503)
    if state.ready():
        return json_response(Health("ready", live))
    return json_response(Health("loading", live), 503)


async def list_models(request: web.Request) -> web.Response:
    return json_response({"models": models_status(request.app[STATE].registry)})


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

    def __init__(self, request_id: str, model: str, version: str):
        self.request_id, self.model, self.version = request_id, model, version
        # 499: the client closed the connection first (nginx's convention).
        self.status = 500
        self.error = ""
        self.ring_full = False
        self.batch_size = 0
        self.phases: dict[str, float] = {}


def _choose(request: web.Request, registry: Registry) -> ModelPool:
    name = request.match_info["model"]
    version = request.match_info.get("version")
    if version is not None:
        return registry.version(name, int(version))
    return registry.route(name).choose(request.headers.get(ROUTING_KEY_HEADER))


async def predict(request: web.Request) -> web.Response:
    started = time.perf_counter()
    state = request.app[STATE]
    record = RequestRecord(request["request_id"], UNKNOWN_MODEL, "")
    state.metrics.in_flight.inc()
    pool = None
    try:
        # The version is chosen once, on arrival; it serves this request even if a reload
        # replaces it meanwhile (it drains: finishes what chose it, then stops).
        pool = _choose(request, state.registry)
        record.model, record.version = pool.name, str(pool.version)
        pool.enter()
        response = await _predict(request, state, pool, record, started)
        record.status = 200
        return response
    except ApiError as exc:
        record.status, record.error = exc.status, exc.message
        record.ring_full = isinstance(exc, RingFull)
        raise
    except asyncio.CancelledError:
        record.status, record.error = 499, "the client closed the connection"
        raise
    finally:
        if pool is not None:
            pool.leave()
        state.metrics.in_flight.dec()
        _record(state.metrics, record, time.perf_counter() - started)


async def _predict(request: web.Request, state: ServerState, pool: ModelPool, record: RequestRecord,
                   started: float) -> web.Response:
    if state.draining:
        raise Unavailable("server is shutting down")
    k = _top_k_param(request, pool.top_k)
    image = await _read_image(request, state.config.max_body_bytes)
    read_s = time.perf_counter() - started

    timeout_s = state.config.request_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            worker, slot = pool.acquire()
            preprocess_started = time.perf_counter()
            await _preprocess_into_slot(state, pool, worker, slot, image)
            preprocess_s = time.perf_counter() - preprocess_started
            future = pool.submit(worker, slot, record.request_id)
            try:
                done = await future
            except asyncio.CancelledError:  # timed out, or the client went away
                worker.cancel(slot)
                raise
    except TimeoutError:
        raise GatewayTimeout(f"request did not complete within the timeout of {timeout_s}s") from None
    respond_started = time.perf_counter()
    predictions = [Prediction(i, pool.labels[i], p) for i, p in top_k(done.output, k, pool.outputs_probabilities)]
    timings = Timings(total=(respond_started - started) * 1000.0, read=read_s * 1000.0,
                      preprocess=preprocess_s * 1000.0, queue=done.queue_s * 1000.0, inference=done.infer_s * 1000.0)
    response = json_response(PredictResponse(model=pool.name, version=pool.version, predictions=predictions,
                                             batch_size=done.batch_size, timings_ms=timings))
    record.batch_size = done.batch_size
    record.phases = {"read": read_s, "preprocess": preprocess_s, "queue": done.queue_s,
                     "inference": done.infer_s, "respond": time.perf_counter() - respond_started}
    return response


def _record(metrics: Metrics, record: RequestRecord, total_s: float) -> None:
    metrics.record_request(record.model, record.version, "success" if record.status == 200 else str(record.status),
                           total_s, record.phases, record.ring_full)
    fields = {"request_id": record.request_id, "model": record.model, "version": record.version,
              "status": record.status, "total_ms": total_s * 1000.0}
    if record.batch_size:
        fields["batch_size"] = record.batch_size
    if record.phases:
        fields["phases_ms"] = {phase: seconds * 1000.0 for phase, seconds in record.phases.items()}
    if record.error:
        fields["error"] = record.error
    access_log.info("request", extra={"fields": fields})


async def _preprocess_into_slot(state: ServerState, pool: ModelPool, worker, slot: int, image: bytes) -> None:
    """Decode and normalise straight into the slot's input memory, in the thread pool."""
    loop = asyncio.get_running_loop()
    ring = worker.ring
    job = state.executor.submit(pool.preprocess, image, ring.inputs[slot])
    try:
        await asyncio.wrap_future(job)
    except asyncio.CancelledError:
        # The thread may still be writing into the slot: free it only when the thread is done.
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(ring.release, slot))
        raise
    except ImageTooLarge as exc:
        ring.release(slot)
        raise PayloadTooLarge(f"image too large: {exc}") from None
    except ImageError as exc:
        ring.release(slot)
        raise BadRequest(str(exc)) from None
    except BaseException:
        ring.release(slot)
        raise


def _top_k_param(request: web.Request, default: int) -> int:
    raw = request.query.get("top_k")
    if raw is None:
        return default
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if k < 1:
        raise BadRequest(f"top_k must be a positive integer, got {raw!r}")
    return k


async def _read_image(request: web.Request, limit: int) -> bytes:
    content_type = request.content_type
    if content_type != JSON_TYPE and content_type not in RAW_IMAGE_TYPES:
        allowed = ", ".join([JSON_TYPE, *sorted(RAW_IMAGE_TYPES)])
        raise UnsupportedMediaType(f"unsupported Content-Type {content_type!r}; use one of: {allowed}")
    too_large = f"request body is larger than the limit of {limit} bytes"
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(too_large)
    body = await _read_body(request.content, limit, too_large)
    if not body:
        raise BadRequest("request body is empty")
    if content_type != JSON_TYPE:
        return body
    try:
        encoded = _image_request.decode(body).image
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid JSON body: {exc}; expected {{\"image\": \"<base64>\"}}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if "\n" in encoded:  # `base64` without -w0 wraps lines; the newlines are not data
        encoded = encoded.replace("\r", "").replace("\n", "")
    try:
        return binascii.a2b_base64(encoded, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"field 'image' is not valid base64: {exc}") from None


async def _read_body(stream, limit: int, too_large: str) -> bytes:
    """The whole body, copied once (`request.read()` copies a photo-sized body three times); a
    chunked body without a length is cut off as soon as it passes the limit."""
    chunks, size = [], 0
    while chunk := await stream.readany():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def make_app(state: ServerState) -> web.Application:
    app = web.Application(middlewares=[request_ids_and_json_errors], client_max_size=state.config.max_body_bytes)
    app[STATE] = state
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/models", list_models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/predict/{model}", predict)
    app.router.add_post(r"/predict/{model}/versions/{version:\d+}", predict)
    if state.config.admin.enabled:
        app.router.add_post("/admin/models/{model}/{action:load|unload|reload}", admin)
    return app


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
    if not given.startswith("Bearer "):
        raise Unauthorized("admin API: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given[len("Bearer "):].encode("utf-8", "surrogateescape"), token.encode()):
        raise Forbidden("admin API: wrong token")
