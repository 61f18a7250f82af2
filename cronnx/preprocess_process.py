"""A preprocessing process: decodes images straight into ring slots, outside the front's GIL.

The front (`preprocessing.ProcessPreprocessing`) sends one `Fill` at a time, followed by the
image's encoded bytes as a second pipe message (bytes, never pickled), and reads one answer per
fill: `Filled`, or `FillFailed` naming the error's kind. A fill's slot is the front's (ring rule
6): this process only writes its input, and its answer is what tells the front that the writing
is over (ring rule 4).

Rings are attached on first use (`Fill.setup` carries the layout and the preprocessing recipe the
first time a ring is named to this process) and detached when the front says `Forget`.
"""

from __future__ import annotations

import signal
from multiprocessing.connection import Connection

import msgspec

from .config import PreprocessConfig
from .contract import RingLayout
from .model_spec import ModelSpec


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


def run_preprocess_process(max_image_pixels: int, inbox: Connection, outbox: Connection) -> None:
    """Entry point of a preprocessing process: fill slots until `Stop` or the front's pipe closes."""
    # Imported here: the front imports this module for its messages only.
    from .errors import ImageTooLarge, InvalidImage
    from .preprocess import Preprocessor, set_max_image_pixels
    from .ring import AttachedRing
    from .scheduling import mark_cpu_bound

    # The front decides when this process stops (Ctrl-C and SIGTERM reach the whole group).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    mark_cpu_bound()
    set_max_image_pixels(max_image_pixels)
    rings: dict[str, tuple[AttachedRing, Preprocessor]] = {}
    try:
        while True:
            message = decode_to_preprocess(inbox.recv_bytes())
            if type(message) is Stop:
                return
            if type(message) is Forget:
                attached = rings.pop(message.ring, None)
                if attached is not None:
                    attached[0].close()
                continue
            image = inbox.recv_bytes()
            if message.setup is not None and message.ring not in rings:
                setup = message.setup
                rings[message.ring] = (AttachedRing(setup.ring), Preprocessor(setup.preprocess, setup.spec))
            ring, preprocessor = rings[message.ring]
            try:
                preprocessor(image, ring.inputs[message.slot])
            except InvalidImage as exc:
                answer = FillFailed(message.job, "invalid_image", str(exc))
            except ImageTooLarge as exc:
                answer = FillFailed(message.job, "image_too_large", str(exc))
            except Exception as exc:  # noqa: BLE001 - a bug must fail its request, not this process
                answer = FillFailed(message.job, "error", f"{type(exc).__name__}: {exc}")
            else:
                answer = Filled(message.job)
            outbox.send_bytes(encode(answer))
    except (EOFError, BrokenPipeError):
        pass  # the front is gone
    finally:
        for ring, _ in rings.values():
            ring.close()
