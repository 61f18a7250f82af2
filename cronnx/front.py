"""The HTTP front: reads requests, preprocesses into ring slots, awaits workers, answers JSON."""

from __future__ import annotations

import asyncio
import binascii
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
from aiohttp import web

from .config import ServerConfig
from .errors import (ApiError, BadRequest, GatewayTimeout, NotFound, PayloadTooLarge, Unavailable,
                     UnsupportedMediaType)
from .pool import ModelPool
from .postprocess import top_k
from .preprocess import ImageError, ImageTooLarge

log = logging.getLogger("cronnx.front")

RAW_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "application/octet-stream"})
JSON_TYPE = "application/json"


class ImageRequest(msgspec.Struct):
    image: str


class Prediction(msgspec.Struct):
    class_id: int
    label: str
    confidence: float


class Timings(msgspec.Struct):
    total: float
    preprocess: float
    queue: float
    inference: float


class PredictResponse(msgspec.Struct):
    model: str
    version: int
    predictions: list[Prediction]
    batch_size: int
    timings_ms: Timings


class Health(msgspec.Struct):
    status: str
    models: dict[str, int] = {}


class WorkerStatus(msgspec.Struct):
    pid: int | None
    live: bool
    restarts: int
    providers: list[str]
    slots_in_use: int
    items_run: int
    items_dropped: int


class ModelStatus(msgspec.Struct):
    name: str
    version: int
    state: str
    input: str
    input_shape: list[int | str]
    output: str
    num_classes: int
    batch_size: int
    description: str
    workers: list[WorkerStatus]


def model_status(pool: ModelPool) -> ModelStatus:
    spec = pool.spec
    workers = [WorkerStatus(w.pid, w.live, w.restarts, w.providers, w.ring.slots - w.ring.free_count,
                            w.items_run, w.items_dropped) for w in pool.workers]
    return ModelStatus(
        name=pool.name, version=pool.version, state="ready" if pool.live_workers else "loading",
        input=spec.input_name, input_shape=[spec.fixed_batch or "batch", *spec.input_chw],
        output=spec.output_name, num_classes=spec.num_classes, batch_size=pool.config.batch_size,
        description=spec.description, workers=workers)


_json = msgspec.json.Encoder()
_image_request = msgspec.json.Decoder(ImageRequest)


def json_response(body: msgspec.Struct | dict, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=_json.encode(body), status=status, headers=headers, content_type=JSON_TYPE)


class ServerState:
    """What the handlers share: the models, the preprocessing pool, and whether we are draining."""

    def __init__(self, config: ServerConfig, pools: dict[str, ModelPool]):
        self.config = config
        self.pools = pools
        self.draining = False
        self.executor = ThreadPoolExecutor(config.preprocess_threads, thread_name_prefix="cronnx-preprocess")

    def ready(self) -> bool:
        return not self.draining and all(p.live_workers > 0 for p in self.pools.values())


STATE = web.AppKey("state", ServerState)


@web.middleware
async def json_errors(request: web.Request, handler):
    """Every error leaves as {"error": "..."} with its status, whatever raised it."""
    try:
        return await handler(request)
    except ApiError as exc:
        return json_response({"error": exc.message}, exc.status, exc.headers)
    except web.HTTPRequestEntityTooLarge as exc:
        return json_response({"error": f"request body is larger than the limit of {exc.max_size} bytes"}, 413)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_response({"error": exc.reason}, exc.status)


async def health(request: web.Request) -> web.Response:
    return json_response(Health("alive"))


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    live = {name: pool.live_workers for name, pool in state.pools.items()}
    if state.draining:
        return json_response(Health("draining", live), 503)
    if state.ready():
        return json_response(Health("ready", live))
    return json_response(Health("loading", live), 503)


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return json_response({"models": [model_status(pool) for pool in state.pools.values()]})


async def predict(request: web.Request) -> web.Response:
    started = time.perf_counter()
    state = request.app[STATE]
    name = request.match_info["model"]
    pool = state.pools.get(name)
    if pool is None:
        raise NotFound(f"unknown model {name!r}; served models: {sorted(state.pools)}")
    if state.draining:
        raise Unavailable("server is shutting down")
    k = _top_k_param(request, pool.top_k)
    image = await _read_image(request, state.config.max_body_bytes)

    timeout_s = state.config.request_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            worker, slot = pool.acquire()
            preprocess_s = await _preprocess_into_slot(state, pool, worker, slot, image)
            future = pool.submit(worker, slot)
            try:
                done = await future
            except asyncio.CancelledError:  # timed out, or the client went away
                worker.cancel(slot)
                raise
    except TimeoutError:
        raise GatewayTimeout(f"request did not complete within the timeout of {timeout_s}s") from None
    total_ms = (time.perf_counter() - started) * 1000.0
    predictions = [Prediction(i, pool.labels[i], p) for i, p in top_k(done.output, k)]
    return json_response(PredictResponse(
        model=pool.name, version=pool.version, predictions=predictions, batch_size=done.batch_size,
        timings_ms=Timings(total=total_ms, preprocess=preprocess_s * 1000.0,
                           queue=done.queue_s * 1000.0, inference=done.infer_s * 1000.0)))


async def _preprocess_into_slot(state: ServerState, pool: ModelPool, worker, slot: int, image: bytes) -> float:
    """Decode and normalise straight into the slot's input memory, in the thread pool."""
    loop = asyncio.get_running_loop()
    ring = worker.ring
    job = state.executor.submit(_timed, pool.preprocess, image, ring.inputs[slot])
    try:
        return await asyncio.wrap_future(job)
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


def _timed(preprocess, image: bytes, out) -> float:
    start = time.perf_counter()
    preprocess(image, out)
    return time.perf_counter() - start


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
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body of {request.content_length} bytes is larger than the limit of {limit} bytes")
    body = await request.read()
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


def make_app(state: ServerState) -> web.Application:
    # The body limit is checked again here so that chunked bodies without a length are bounded too.
    app = web.Application(middlewares=[json_errors], client_max_size=state.config.max_body_bytes)
    app[STATE] = state
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/models", list_models)
    app.router.add_post("/predict/{model}", predict)
    return app
