"""What a preprocessing process and the server process say to each other: images decoded
straight into ring slots, outside the server process's GIL.

The server process (`placement.ProcessPreprocessing`) sends one `Fill` at a time, followed by the
image's encoded bytes as a second pipe message (bytes, never pickled), and reads one answer per
fill: `Filled`, or `FillFailed` with the error in its wire form (`errors.to_wire`). A fill's
slot is the server process's (ring rule 6): the preprocessing process only writes its input, and
its answer is what tells the server process that the writing is over (ring rule 4).

Rings are attached on first use (`Fill.setup` carries the layout and the preprocessing recipe the
first time a ring is named to a process) and detached when the server process says `Forget`.
The same messages serve front processes (`fronts/link.py`), which hold their images themselves;
the helpers below are both sides' bookkeeping of them: `MappedRings` (the owner's record of what a
child maps), `AttachedRings` (the child's mappings), `fill_failed` and `fill_error` (an error
there, its wire form on the pipe, the error again here).
"""

from __future__ import annotations

import msgspec

from cronnx.config import PreprocessConfig
from cronnx.errors import WireError, from_wire, to_wire
from cronnx.ipc.ring import RingLayout
from cronnx.models.spec import ModelSpec


class Setup(msgspec.Struct, frozen=True):
    """What a process needs to fill slots of one ring: where it is and how its model's input is made."""

    ring: RingLayout
    preprocess: PreprocessConfig
    spec: ModelSpec


class Fill(msgspec.Struct, tag="fill", array_like=True):
    """Decode the image bytes that follow (the next pipe message) into slot `slot` of ring
    `ring` (its input segment's name). `setup` is sent with the first fill of each ring."""

    job: int
    ring: str
    slot: int
    setup: Setup | None = None


class Forget(msgspec.Struct, tag="forget", array_like=True):
    """The ring is closed: unmap it (its memory is freed once no process maps it)."""

    ring: str


class Stop(msgspec.Struct, tag="stop", array_like=True):
    """Exit (sent when no fill is outstanding)."""


class Filled(msgspec.Struct, tag="filled", array_like=True):
    """The slot of fill `job` holds its input (ring rule 1 may now be met)."""

    job: int


class FillFailed(msgspec.Struct, tag="fill_failed", array_like=True):
    """Fill `job` failed and wrote nothing more: `error` is why (InvalidImage, 400; ImageTooLarge,
    413; InternalError for a bug, 500)."""

    job: int
    error: WireError


ToPreprocess = Fill | Forget | Stop
FromPreprocess = Filled | FillFailed

encode = msgspec.msgpack.Encoder().encode
decode_to_preprocess = msgspec.msgpack.Decoder(ToPreprocess).decode
decode_from_preprocess = msgspec.msgpack.Decoder(FromPreprocess).decode


def fill_failed(job: int, exc: BaseException) -> FillFailed:
    """The answer for fill `job` that raised `exc`."""
    return FillFailed(job, to_wire(exc))


def fill_error(answer: FillFailed) -> Exception:
    """The error a FillFailed stands for (`errors.from_wire`)."""
    return from_wire(answer.error)
