"""A front process's `InferenceClient`: its pipe pair to the server process, and the rows it
writes into ring slots when the server process says `Fill` (the messages: `messages.py`)."""

from __future__ import annotations

import asyncio
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from cronnx.engine.client import NO_QUEUE_PARAMETERS, InferenceResult, ModelView, QueueParameters, RequestReport
from cronnx.errors import CronnxError, Unavailable, from_wire
from cronnx.fronts.messages import (Abandon, Answer, Choose, Chosen, Completed, Drain, Infer, Refused, decode_to_front,
                                    encode)
from cronnx.ipc.cpu import mark_cpu_bound
from cronnx.ipc.pipes import PipeReader
from cronnx.observability.trace_context import TraceContext
from cronnx.preprocessing.messages import Fill, Filled, Forget, fill_failed
from cronnx.preprocessing.rings import AttachedRings
from cronnx.preprocessing.transform import Preprocessor


class Choice:
    """A request's `Selection` in a front process: what its route named until the server process
    has chosen a version (with the request's first row, or when `EngineLink.view` asks), then
    that version's view. `refusal` is the error of a choice that found no version."""

    __slots__ = ("model", "version", "routing_key", "view", "refusal")

    def __init__(self, model: str, version: int | None, routing_key: str | None):
        self.model, self.version, self.routing_key = model, version, routing_key
        self.view: ModelView | None = None
        self.refusal: CronnxError | None = None


@dataclass(eq=False)
class _Request:
    """A row (or a Choose) this front has sent to the server process: the row (encoded image
    bytes, or a row of the model's input tensor) until the fill is over, the request's choice,
    and the future its handler awaits (an Answer or a Chosen, or the error of a Refused)."""

    row: bytes | np.ndarray
    choice: Choice
    answer: asyncio.Future
    preprocess_s: float = 0.0


class EngineLink:
    """This front's pipe pair to the server process, and the fills it asks for.

    `infer` runs one row: Infer out, then a Fill written into ring memory (an image decoded, a
    tensor row copied) in one of `threads` threads, then the Answer. `view` asks which version
    serves a request (Choose) unless a row's answer has said. `drained` is set when the server
    process says Drain or goes away."""

    def __init__(self, inbox: Connection, outbox: Connection, threads: int):
        self._inbox, self._outbox = inbox, outbox
        self._said = PipeReader(inbox)  # what the server process says
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="cronnx-preprocess", initializer=mark_cpu_bound)
        self._numbers = itertools.count()
        self._requests: dict[int, _Request] = {}
        self._rings = AttachedRings()
        self._views: dict[int, ModelView] = {}
        self.drained = asyncio.Event()
        self.server_gone = False
        self._loop.add_reader(inbox.fileno(), self._on_readable)

    def send(self, message) -> None:
        """Write one message to the server process. A broken pipe is not raised: the server
        process has gone, and every request in flight fails with Unavailable (503)."""
        try:
            self._outbox.send_bytes(encode(message))
        except OSError:
            self._gone()

    def select(self, model: str, version: int | None, routing_key: str | None) -> Choice:
        """The request's choice, made by the server process with its first row (no round trip of
        its own): never raises here."""
        return Choice(model, version, routing_key)

    async def view(self, selection: Choice) -> ModelView:
        """As InferenceClient.view: the version a row's answer named, or else the server process's
        choice now (Choose), which every row of the request then runs on."""
        if selection.view is not None:
            return selection.view
        if selection.refusal is not None:
            raise selection.refusal
        request, number = self._ask(b"", selection)
        self.send(Choose(number, selection.model, selection.version, selection.routing_key))
        try:
            chosen = await request.answer
        finally:
            self._requests.pop(number, None)
        selection.view = view = self._views[chosen.view_key]
        return view

    async def infer(self, selection: Choice, row: bytes | np.ndarray, request_id: str, deadline: float,
                    queue: QueueParameters = NO_QUEUE_PARAMETERS, trace: TraceContext | None = None) -> InferenceResult:
        """As InferenceClient.infer: the row is written into its slot here (`preprocess_s` is that
        decode or copy); the server process is told when the caller gives up."""
        view = selection.view
        if view is None:
            model, version, routing_key = selection.model, selection.version, selection.routing_key
        else:  # chosen: every row runs on that version
            model, version, routing_key = view.name, view.version, None
        request, number = self._ask(row, selection)
        held_bytes = len(row) if isinstance(row, bytes) else row.nbytes
        self.send(Infer(number, request_id, model, version, routing_key, max(0.0, deadline - self._loop.time()),
                        held_bytes, queue, trace))
        try:
            answer = await request.answer
        except asyncio.CancelledError:
            if number in self._requests:
                self.send(Abandon(number))
            raise
        finally:
            self._requests.pop(number, None)
        selection.view = self._views[answer.view_key]
        output = np.frombuffer(answer.output, dtype=answer.dtype).reshape(answer.shape)
        return InferenceResult(output, answer.batch_size, answer.admission_s, request.preprocess_s, answer.queue_s,
                               answer.infer_s, answer.batch_trace)

    def finished(self, selection: Choice | None, report: RequestReport, total_s: float) -> None:
        """Report the answered request to the server process (`Completed`), which counts it in
        its metrics; `total_s` in seconds."""
        self.send(Completed(report.api, report.model, report.version, report.outcome, total_s, report.phases,
                            report.rejection, report.trace))

    def _ask(self, row: bytes | np.ndarray, choice: Choice) -> tuple[_Request, int]:
        if self.server_gone:
            raise Unavailable("the server is shutting down")
        number = next(self._numbers)
        request = _Request(row, choice, self._loop.create_future())
        self._requests[number] = request
        return request, number

    def _on_readable(self) -> None:
        for message in self._said.read():
            self._on_message(decode_to_front(message))
        if self._said.at_eof:
            self._loop.remove_reader(self._inbox.fileno())
            self._gone()

    def _gone(self) -> None:
        """The server process is gone: nothing in flight can be answered."""
        if self.server_gone:
            return
        self.server_gone = True
        for request in self._requests.values():
            if not request.answer.done():
                request.answer.set_exception(Unavailable("the server process has gone; retry"))
        self.drained.set()

    def _on_message(self, message) -> None:
        kind = type(message)
        if kind is Fill:
            self._fill(message)
        elif kind is Answer or kind is Chosen or kind is Refused:
            if message.view is not None:
                self._views[message.view_key] = message.view
            request = self._requests.get(message.request)
            if request is None or request.answer.done():
                return  # given up meanwhile
            if kind is Refused:
                self._refused(request, message)
            else:
                request.answer.set_result(message)
        elif kind is Forget:
            self._rings.forget(message.ring)
        elif kind is Drain:
            self.drained.set()

    def _refused(self, request: _Request, refused: Refused) -> None:
        error = from_wire(refused.error)
        if refused.view_key is not None:
            request.choice.view = self._views[refused.view_key]
        elif isinstance(error, CronnxError):
            request.choice.refusal = error  # no version serves it: asking again would say the same
        request.answer.set_exception(error)

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
        """Wait for the decoding threads, then unmap the rings (threads write into ring memory)."""
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
