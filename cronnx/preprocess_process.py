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

import signal
from multiprocessing.connection import Connection

import msgspec
import numpy as np

from .config import PreprocessConfig
from .contract import RingLayout
from .errors import ImageTooLarge, InvalidImage
from .model_spec import ModelSpec
from .preprocess import Preprocessor
from .ring import AttachedRing, SlotRing


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


class MappedRings:
    """The owner's record of the rings one child process maps, by input segment name."""

    def __init__(self) -> None:
        self._rings: dict[str, SlotRing] = {}

    def setup_for(self, ring: SlotRing, preprocessor: Preprocessor) -> Setup | None:
        """The Setup to send with a Fill of `ring`: None when the child maps it already."""
        name = ring.layout.input_segment
        if name in self._rings:
            return None
        self._rings[name] = ring
        return Setup(ring.layout, preprocessor.config, preprocessor.spec)

    def closed(self) -> list[str]:
        """The rings closed since the last call (a replaced or unloaded version's), forgotten here:
        send each a Forget, since an unlinked segment's memory is freed only once no process maps it."""
        names = [name for name, ring in self._rings.items() if ring.closed]
        for name in names:
            del self._rings[name]
        return names


class AttachedRings:
    """A child's mappings of the rings it fills, each with its model's preprocessing."""

    def __init__(self) -> None:
        self._rings: dict[str, tuple[AttachedRing, Preprocessor]] = {}

    def target(self, fill: Fill) -> tuple[np.ndarray, Preprocessor]:
        """The input memory of the fill's slot and the preprocessing that fills it (the ring is
        attached on its first fill, which carries its Setup)."""
        if fill.ring not in self._rings:
            setup = fill.setup
            self._rings[fill.ring] = (AttachedRing(setup.ring), Preprocessor(setup.preprocess, setup.spec))
        ring, preprocessor = self._rings[fill.ring]
        return ring.inputs[fill.slot], preprocessor

    def forget(self, name: str) -> None:
        attached = self._rings.pop(name, None)
        if attached is not None:
            attached[0].close()

    def close(self) -> None:
        for ring, _ in self._rings.values():
            ring.close()
        self._rings.clear()


def run_preprocess_process(max_image_pixels: int, inbox: Connection, outbox: Connection) -> None:
    """Entry point of a preprocessing process: fill slots until `Stop` or the front's pipe closes."""
    from .preprocess import set_max_image_pixels
    from .scheduling import mark_cpu_bound

    # The front decides when this process stops (Ctrl-C and SIGTERM reach the whole group).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    mark_cpu_bound()
    set_max_image_pixels(max_image_pixels)
    rings = AttachedRings()
    try:
        while True:
            message = decode_to_preprocess(inbox.recv_bytes())
            if type(message) is Stop:
                return
            if type(message) is Forget:
                rings.forget(message.ring)
                continue
            image = inbox.recv_bytes()
            out, preprocessor = rings.target(message)
            try:
                preprocessor(image, out)
            except Exception as exc:  # noqa: BLE001 - a bug must fail its request, not this process
                answer = fill_failed(message.job, exc)
            else:
                answer = Filled(message.job)
            del out  # a view still held would keep the ring mapped past its Forget (AttachedRing.close)
            outbox.send_bytes(encode(answer))
    except (EOFError, BrokenPipeError):
        pass  # the front is gone
    finally:
        rings.close()
