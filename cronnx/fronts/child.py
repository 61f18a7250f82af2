"""A front process (`server.front_processes` > 1): HTTP on the shared port, images decoded here.

It serves /predict and the Open Inference Protocol's infer itself: reads the body, asks the
engine process to run each row (`front_contract.Infer`; for V2, on the version `Choose` names),
writes the row in its own threads straight into the slot the engine names (`Fill`: an image
decoded, or a tensor row copied), and answers from the output rows it gets back. Every other
route (health, readiness, metrics, models, admin, V2 metadata) is passed to the engine process's
own app on a Unix socket, so that each has one owner and every front answers alike.

The engine process decides when a front stops (`Drain`, or its pipe closing); SIGINT, SIGTERM and
SIGHUP are ignored here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection

import aiohttp
import msgspec
import numpy as np
from aiohttp import web
from yarl import URL

from cronnx.engine.inference import InferenceResult
from cronnx.errors import CronnxError, Unavailable, from_wire
from cronnx.front import (
    REQUEST_ID_HEADER,
    ROUTING_KEY_HEADER,
    RequestRecord,
    continue_unless_too_large,
    log_request,
    outcome_into,
    predict_response,
    read_body,
    read_image,
    request_ids_and_json_errors,
    requested_version,
    top_k_param,
)
from cronnx.fronts.messages import (
    Abandon,
    Answer,
    Choose,
    Chosen,
    Completed,
    ConnectionStats,
    Drain,
    FrontSpec,
    Infer,
    Listening,
    ModelView,
    Refused,
    decode_to_front,
    encode,
)
from cronnx.http.listener import listen
from cronnx.inference_protocol import answer_infer
from cronnx.ipc.cpu import mark_cpu_bound
from cronnx.ipc.pipes import PipeReader
from cronnx.observability.logs import setup_logging
from cronnx.observability.metrics import UNKNOWN_MODEL
from cronnx.preprocessing.messages import Fill, Filled, Forget, fill_failed
from cronnx.preprocessing.rings import AttachedRings
from cronnx.preprocessing.transform import Preprocessor, set_max_image_pixels

log = logging.getLogger("cronnx.front_process")

# How often a front reports its open and refused connections to the engine process.
STATS_INTERVAL_S = 1.0
# Headers that belong to one connection (RFC 9110, 7.6.1), or that aiohttp sets itself on the
# hop it makes: not passed between the client and the engine process.
_NOT_FORWARDED = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                            "upgrade", "content-length", "content-encoding", "host", "expect", "date", "server"})


def run_front_process(spec_bytes: bytes, inbox: Connection, outbox: Connection) -> None:
    """Entry point: serve HTTP until the engine process says `Drain` or its pipe closes."""
    spec = msgspec.msgpack.decode(spec_bytes, type=FrontSpec)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    setup_logging(spec.logging.level, spec.logging.format)
    set_max_image_pixels(spec.server.max_image_pixels)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(spec, inbox, outbox))
    else:
        uvloop.run(_serve(spec, inbox, outbox))


@dataclass(eq=False)
class _Request:
    """A request (or one row of one) this front has sent to the engine: its input (encoded image
    bytes, or a row of the model's input tensor) until the fill is over, and the future its handler
    awaits (an Answer or a Chosen, or the error of a Refused)."""

    row: bytes | np.ndarray
    answer: asyncio.Future
    preprocess_s: float = 0.0
    # The version the engine chose (name, version), once known: for a refusal's metrics.
    chosen: tuple[str, str] = ("", "")


class EngineLink:
    """This front's pipe pair to the engine process, and the fills it asks for.

    `infer` runs one row: Infer out, then a Fill written into ring memory (an image decoded, a
    tensor row copied) in one of `threads` threads, then the Answer. `choose` asks which version
    serves a model. `drained` is set when the engine process says Drain or goes away."""

    def __init__(self, inbox: Connection, outbox: Connection, threads: int):
        self._inbox, self._outbox = inbox, outbox
        self._said = PipeReader(inbox)  # what the engine process says
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="cronnx-preprocess", initializer=mark_cpu_bound)
        self._numbers = itertools.count()
        self._requests: dict[int, _Request] = {}
        self._rings = AttachedRings()
        self._views: dict[int, ModelView] = {}
        self.drained = asyncio.Event()
        self.engine_gone = False
        self._loop.add_reader(inbox.fileno(), self._on_readable)

    def send(self, message) -> None:
        try:
            self._outbox.send_bytes(encode(message))
        except OSError:
            self._gone()

    async def infer(self, row: bytes | np.ndarray, model: str, version: int | None, routing_key: str | None,
                    record: RequestRecord, deadline: float) -> tuple[InferenceResult, ModelView]:
        """Run one row on the model: an encoded image (bytes, preprocessed here), or a row of the
        model's input tensor (its `input_item_shape` and `input_dtype`: the caller checks both).
        `deadline` is on this loop's clock. Returns the result (its output row as the model gives
        it; `preprocess_s` the decode or copy here) and the version's view; `record` gets the
        version that ran it (or refused it). Raises the engine's error (a CronnxError) as its
        Refused names it; CancelledError when the caller gives up (the engine is told)."""
        request, number = self._ask(row)
        self.send(Infer(number, record.request_id, model, version, routing_key,
                        max(0.0, deadline - self._loop.time())))
        try:
            answer = await request.answer
        except asyncio.CancelledError:
            if number in self._requests:
                self.send(Abandon(number))
            raise
        except CronnxError:
            if request.chosen[0]:
                record.model, record.version = request.chosen
            raise
        finally:
            self._requests.pop(number, None)
        view = self._views[answer.view_key]
        record.model, record.version = view.name, str(view.version)
        output = np.frombuffer(answer.output, dtype=answer.dtype).reshape(answer.shape)
        return InferenceResult(output, answer.batch_size, request.preprocess_s, answer.queue_s,
                               answer.infer_s), view

    async def choose(self, model: str, version: int | None, routing_key: str | None,
                     record: RequestRecord) -> ModelView:
        """The version that serves `model` now (as a request would get it); `record` gets it.
        Raises the engine's error (ModelNotFound, ...)."""
        request, number = self._ask(b"")
        self.send(Choose(number, model, version, routing_key))
        try:
            chosen = await request.answer
        finally:
            self._requests.pop(number, None)
        view = self._views[chosen.view_key]
        record.model, record.version = view.name, str(view.version)
        return view

    def _ask(self, row: bytes | np.ndarray) -> tuple[_Request, int]:
        if self.engine_gone:
            raise Unavailable("the server is shutting down")
        number = next(self._numbers)
        request = _Request(row, self._loop.create_future())
        self._requests[number] = request
        return request, number

    def _on_readable(self) -> None:
        for message in self._said.read():
            self._on_message(decode_to_front(message))
        if self._said.at_eof:
            self._loop.remove_reader(self._inbox.fileno())
            self._gone()

    def _gone(self) -> None:
        """The engine process is gone: nothing in flight can be answered."""
        if self.engine_gone:
            return
        self.engine_gone = True
        for request in self._requests.values():
            if not request.answer.done():
                request.answer.set_exception(Unavailable("the server's engine process has gone; retry"))
        self.drained.set()

    def _on_message(self, message) -> None:
        kind = type(message)
        if kind is Fill:
            self._fill(message)
        elif kind is Answer or kind is Chosen or kind is Refused:
            request = self._requests.get(message.request)
            if request is None or request.answer.done():
                return  # given up meanwhile
            if kind is Refused:
                request.chosen = (message.model, message.version)
                request.answer.set_exception(from_wire(message.error))
            else:
                if message.view is not None:
                    self._views[message.view_key] = message.view
                request.answer.set_result(message)
        elif kind is Forget:
            self._rings.forget(message.ring)
        elif kind is Drain:
            self.drained.set()

    def _fill(self, fill: Fill) -> None:
        """Write the request's row into the slot in a thread; answer Filled or FillFailed when it is
        done writing (always, even for a request given up: that answer frees the slot)."""
        out, preprocessor = self._rings.target(fill)  # attached on a ring's first fill, given up or not
        request = self._requests.get(fill.job)
        if request is None:
            self.send(fill_failed(fill.job, RuntimeError("the request was given up before its image was decoded")))
            return
        work = self._loop.run_in_executor(self._executor, _write, preprocessor, request.row, out)
        work.add_done_callback(lambda done: self._filled(fill.job, request, done))

    def _filled(self, job: int, request: _Request, work: asyncio.Future) -> None:
        exc = work.exception()
        if exc is None:
            request.preprocess_s = work.result()
        self.send(Filled(job) if exc is None else fill_failed(job, exc))

    def close(self) -> None:
        self._executor.shutdown(wait=True)  # threads write into ring memory: finish before unmapping
        self._rings.close()


def _write(preprocessor: Preprocessor, row: bytes | np.ndarray, out: np.ndarray) -> float:
    """Write a row into a slot's input memory `out`: an image decoded, or a tensor row copied.
    Returns the seconds it took."""
    started = time.perf_counter()
    if isinstance(row, bytes):
        preprocessor(row, out)
    else:
        np.copyto(out, row, casting="no")
    return time.perf_counter() - started


@dataclass(eq=False)
class _FrontState:
    spec: FrontSpec
    link: EngineLink
    engine: aiohttp.ClientSession


FRONT = web.AppKey("front", _FrontState)


async def predict(request: web.Request) -> web.Response:
    """/predict/{model}[/versions/{version}], as the engine process's own front answers it."""
    return await _recorded(request, "predict", _predict)


async def v2_infer(request: web.Request) -> web.Response:
    """The Open Inference Protocol's infer, as the engine process's own front answers it."""
    return await _recorded(request, "v2", _v2_infer)


async def _recorded(request: web.Request, api: str, handle) -> web.Response:
    """`handle(request, front, record, started)`, then the request's metrics (sent to the engine
    process) and its access-log line."""
    front = request.app[FRONT]
    started = time.perf_counter()
    record = RequestRecord(request["request_id"], api, UNKNOWN_MODEL, "")
    asked_model, asked_version = "", None  # a version number no version can have names no model
    try:
        with outcome_into(record):
            asked_version = requested_version(request)
            asked_model = request.match_info["model"]
            return await handle(request, front, record, started)
    finally:
        total_s = time.perf_counter() - started
        front.link.send(Completed(record.api, record.model, record.version, record.outcome, total_s, record.phases,
                                  record.ring_full, asked_model, asked_version,
                                  request.headers.get(ROUTING_KEY_HEADER)))
        log_request(record, total_s)


async def _predict(request: web.Request, front: _FrontState, record: RequestRecord, started: float) -> web.Response:
    server = front.spec.server
    k = top_k_param(request)
    deadline = asyncio.get_running_loop().time() + server.request_timeout_s - (time.perf_counter() - started)
    image = await read_image(request, server.max_body_bytes, deadline, server.request_timeout_s)
    read_s = time.perf_counter() - started
    result, view = await front.link.infer(image, request.match_info["model"], requested_version(request),
                                          request.headers.get(ROUTING_KEY_HEADER), record, deadline)
    return predict_response(record, view.labels, view.outputs_probabilities, k or view.top_k, result.output,
                            result.batch_size, started, {"read": read_s, "preprocess": result.preprocess_s,
                                                         "queue": result.queue_s, "inference": result.infer_s})


async def _v2_infer(request: web.Request, front: _FrontState, record: RequestRecord, started: float) -> web.Response:
    server = front.spec.server
    deadline = asyncio.get_running_loop().time() + server.request_timeout_s - (time.perf_counter() - started)
    body = await read_body(request, server.max_body_bytes, deadline, server.request_timeout_s)
    # Every row runs on the version chosen here, which its tensors are checked against.
    view = await front.link.choose(request.match_info["model"], requested_version(request),
                                   request.headers.get(ROUTING_KEY_HEADER), record)

    async def run_row(row: bytes | np.ndarray) -> InferenceResult:
        return (await front.link.infer(row, view.name, view.version, None, record, deadline))[0]

    return await answer_infer(request, view, body, run_row, record, started)


async def to_engine(request: web.Request) -> web.Response:
    """Any other route: passed to the engine process's app (its body read and decoded here, within
    the same limits), its answer passed back."""
    front = request.app[FRONT]
    server = front.spec.server
    body = None
    if request.body_exists:
        deadline = asyncio.get_running_loop().time() + server.request_timeout_s
        body = await read_body(request, server.max_body_bytes, deadline, server.request_timeout_s)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
    headers[REQUEST_ID_HEADER] = request["request_id"]
    url = URL("http://cronnx" + request.raw_path, encoded=True)
    try:
        async with front.engine.request(request.method, url, headers=headers, data=body,
                                        allow_redirects=False) as answer:
            payload = await answer.read()
            return web.Response(status=answer.status, body=payload,
                                headers={k: v for k, v in answer.headers.items() if k.lower() not in _NOT_FORWARDED})
    except aiohttp.ClientError as exc:
        raise Unavailable(f"the server's engine process did not answer: {exc}") from None


async def _serve(spec: FrontSpec, inbox: Connection, outbox: Connection) -> None:
    server = spec.server
    link = EngineLink(inbox, outbox, spec.preprocess_threads)
    refused = 0

    def on_refused() -> None:
        nonlocal refused
        refused += 1

    # The engine process's answers are read whole (no timeout of its own: the request timeout
    # there bounds them); auto_decompress off keeps its Content-Encoding as sent.
    engine = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=spec.engine_socket), auto_decompress=False,
                                   timeout=aiohttp.ClientTimeout(total=None))
    app = web.Application(middlewares=[request_ids_and_json_errors], client_max_size=server.max_body_bytes)
    app[FRONT] = _FrontState(spec, link, engine)
    expect = continue_unless_too_large(server.max_body_bytes)
    app.router.add_post("/predict/{model}", predict, expect_handler=expect)
    app.router.add_post(r"/predict/{model}/versions/{version:\d+}", predict, expect_handler=expect)
    app.router.add_post("/v2/models/{model}/infer", v2_infer)
    app.router.add_post(r"/v2/models/{model}/versions/{version:\d+}/infer", v2_infer)
    app.router.add_route("*", "/{tail:.*}", to_engine)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=server.request_timeout_s + 1.0, lingering_time=1.0,
                           keepalive_timeout=server.idle_timeout_s)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stats = None

    def report() -> None:
        nonlocal refused, stats
        link.send(ConnectionStats(len(runner.server.connections), refused))
        refused = 0
        stats = loop.call_later(STATS_INTERVAL_S, report)

    listening = None
    try:
        listening = await listen(runner, server.host, spec.port, spec.max_connections, on_refused, reuse_port=True)
        log.info("front process %d serving on port %d", spec.index, spec.port)
        link.send(Listening())
        report()
        await link.drained.wait()
    finally:
        if stats is not None:
            stats.cancel()
        if listening is not None:
            listening.close()
        await runner.cleanup()  # finishes the requests in progress (the engine still answers)
        await engine.close()
        link.close()
