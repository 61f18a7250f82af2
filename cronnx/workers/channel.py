"""The request channel of one worker: which of its ring's slots the worker holds, and the callback
that each slot's answer goes to.

It hands slots over and back and never frees one: what a returned slot means for its request,
and the release, belong to the engine (ring rules 5 and 6).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from cronnx.observability.trace_context import TraceContext
from cronnx.workers import messages


class SlotReturn(msgspec.Struct):
    """The worker's answer for one slot. `outcome`: "done" (its output is written: ring rule 2),
    "failed" (onnxruntime raised on it; `error` says what), "dropped" (cancelled before it ran)
    or "lost" (the worker died; `error` says how). Times in seconds; `batch_size` is the number
    of requests in the batch it ran in; `batch_trace` that batch's span, when it has one."""

    outcome: str
    queue_s: float = 0.0
    infer_s: float = 0.0
    batch_size: int = 0
    error: str = ""
    batch_trace: TraceContext | None = None


OnReturn = Callable[[SlotReturn], None]


class RequestChannel:
    """Submits and cancels written to one worker process, answers routed back by slot.

    `send` writes a `messages.ToWorker` message (OSError once the worker is gone).
    """

    def __init__(self, send: Callable[[object], None]):
        self._send = send
        self._held: dict[int, OnReturn] = {}
        # The traced requests' spans, by slot: what their batch's span links to.
        self._traces: dict[int, TraceContext] = {}
        # Requests the worker ran, dropped on request, and failed to run.
        self.items_run = 0
        self.items_dropped = 0
        self.items_failed = 0

    @property
    def held(self) -> int:
        """Slots the worker holds: sent and not answered yet."""
        return len(self._held)

    def submit(self, slot: int, filling: int, alone: bool, request_id: str, on_return: OnReturn,
               priority: int = 0, trace: TraceContext | None = None) -> None:
        """Hand `slot` (input complete: ring rule 1) to the worker at `priority` (its admission
        level); `on_return` gets its answer exactly once; `trace`: the request's span, when it is
        traced. OSError if the worker is gone: the slot was not handed over."""
        self._send(messages.Submit(slot, time.monotonic(), filling, alone, request_id, priority, trace is not None))
        self._held[slot] = on_return
        if trace is not None:
            self._traces[slot] = trace

    def cancel(self, slot: int, on_return: OnReturn) -> None:
        """Ask the worker to drop `slot`; its answer (Dropped, or Done/Failed if it already ran)
        still comes through `on_return` (ring rule 5). Nothing is sent unless the slot is still
        held for that same `on_return`: once answered, the slot may belong to another request."""
        if self._held.get(slot) is on_return:
            try:
                self._send(messages.Cancel(slot))
            except OSError:
                pass  # the worker died: `lose_all` answers for the slot

    def deliver(self, msg) -> list[TraceContext]:
        """Route one answer from the worker (Done, Failed or Dropped) to its slots' callbacks.
        Returns the spans of the traced requests a Done answers, each once (its batch's span links
        to them)."""
        held, traces = self._held, self._traces
        if type(msg) is messages.Done:
            size = len(msg.slots)
            self.items_run += size
            # Once per request: a V2 request's rows may share a batch.
            traced = list(dict.fromkeys(traces.pop(slot) for slot in msg.slots if slot in traces)) if traces else []
            for slot, queue_s in zip(msg.slots, msg.queue_s):
                held.pop(slot)(SlotReturn("done", queue_s, msg.infer_s, size, batch_trace=msg.trace))
            return traced
        if type(msg) is messages.Failed:
            self.items_failed += len(msg.slots)
            for slot, error in zip(msg.slots, msg.errors):
                traces.pop(slot, None)
                held.pop(slot)(SlotReturn("failed", error=error))
        elif type(msg) is messages.Dropped:
            self.items_dropped += 1
            traces.pop(msg.slot, None)
            held.pop(msg.slot)(SlotReturn("dropped"))
        return []

    def lose_all(self, reason: str) -> int:
        """The worker is gone: every slot it held comes back as "lost" with `reason`. Returns how many."""
        lost, self._held = self._held, {}
        self._traces = {}
        for on_return in lost.values():
            on_return(SlotReturn("lost", error=reason))
        return len(lost)
