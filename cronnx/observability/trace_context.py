"""A sampled span's identity as it crosses a pipe: what links a request to the batch it ran in.

Kept apart from `tracing.py` (which loads the OpenTelemetry SDK) so that the messages of every
process can name it: a worker process never loads the SDK.
"""

from __future__ import annotations

import random

import msgspec


class TraceContext(msgspec.Struct, frozen=True, array_like=True):
    """A sampled span's W3C trace id (16 bytes) and span id (8 bytes), big-endian as in
    `traceparent` (bytes, because msgpack has no 128-bit integers)."""

    trace_id: bytes
    span_id: bytes

    @classmethod
    def of(cls, trace_id: int, span_id: int) -> TraceContext:
        """From OpenTelemetry's integers."""
        return cls(trace_id.to_bytes(16, "big"), span_id.to_bytes(8, "big"))

    @classmethod
    def new(cls) -> TraceContext:
        """New random ids (W3C Trace Context: random, never all zeros), for a span that begins a
        trace of its own: a batch, whose ids its worker chooses and logs."""
        return cls.of(random.getrandbits(128) or 1, random.getrandbits(64) or 1)

    @property
    def trace_id_hex(self) -> str:
        return self.trace_id.hex()

    @property
    def span_id_hex(self) -> str:
        return self.span_id.hex()
