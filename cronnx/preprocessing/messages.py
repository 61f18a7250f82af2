"""A preprocessing process: decodes images straight into ring slots, outside the front's GIL.

The front (`preprocessing.ProcessPreprocessing`) sends one `Fill` at a time, followed by the
image's encoded bytes as a second pipe message (bytes, never pickled), and reads one answer per
fill: `Filled`, or `FillFailed` naming the error's kind. A fill's slot is the front's (ring rule
6): this process only writes its input, and its answer is what tells the front that the writing
is over (ring rule 4).

Rings are attached on first use (`Fill.setup` carries the layout and the preprocessing recipe the
first time a ring is named to this process) and detached when the front says `Forget`. The same
messages serve front processes (`front_process.py`), which hold their images themselves; the
helpers below are both sides' bookkeeping of them: `MappedRings` (the owner's record of what a
child maps), `AttachedRings` (the child's mappings), `fill_failed` and `fill_error` (an error
there, its kind on the pipe, the error again here).
"""

from __future__ import annotations

import msgspec

from cronnx.config import PreprocessConfig
from cronnx.errors import ImageTooLarge, InvalidImage
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
    """Fill `job` failed and wrote nothing more. `kind`: "invalid_image" (400),
    "image_too_large" (413) or "error" (a bug: 500); `message` is for the client."""

    job: int
    kind: str
    message: str


ToPreprocess = Fill | Forget | Stop
FromPreprocess = Filled | FillFailed

encode = msgspec.msgpack.Encoder().encode
decode_to_preprocess = msgspec.msgpack.Decoder(ToPreprocess).decode
decode_from_preprocess = msgspec.msgpack.Decoder(FromPreprocess).decode


def fill_failed(job: int, exc: BaseException) -> FillFailed:
    """The answer for fill `job` that raised `exc`, its kind by the error's class."""
    if isinstance(exc, InvalidImage):
        return FillFailed(job, "invalid_image", str(exc))
    if isinstance(exc, ImageTooLarge):
        return FillFailed(job, "image_too_large", str(exc))
    return FillFailed(job, "error", f"{type(exc).__name__}: {exc}")


def fill_error(answer: FillFailed) -> Exception:
    """The error a FillFailed stands for: InvalidImage (400), ImageTooLarge (413) or a RuntimeError (500)."""
    if answer.kind == "invalid_image":
        return InvalidImage(answer.message)
    if answer.kind == "image_too_large":
        return ImageTooLarge(answer.message)
    return RuntimeError(f"preprocessing failed: {answer.message}")


