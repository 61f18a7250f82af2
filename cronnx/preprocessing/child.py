"""A preprocessing process: decodes images straight into ring slots, outside the server process's
GIL, one `Fill` at a time (the messages: `preprocessing/messages.py`)."""

from __future__ import annotations

import signal
from multiprocessing.connection import Connection

from cronnx.observability.logs import LoggingSpec, setup_logging
from cronnx.preprocessing.messages import Filled, Forget, Stop, decode_to_preprocess, encode, fill_failed
from cronnx.preprocessing.rings import AttachedRings


def run_preprocess_process(max_image_pixels: int, logging_spec: LoggingSpec, inbox: Connection,
                           outbox: Connection) -> None:
    """Entry point of a preprocessing process: fill slots until `Stop` or the server process's pipe
    closes. It logs as the server does (a colour profile it cannot use, say)."""
    from cronnx.ipc.cpu import mark_cpu_bound
    from cronnx.preprocessing.transform import set_max_image_pixels

    # The server process decides when this process stops (Ctrl-C and SIGTERM reach the whole
    # group).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    setup_logging(logging_spec.level, logging_spec.format)
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
        pass  # the server process is gone
    finally:
        rings.close()
