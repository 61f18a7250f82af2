"""Tiny child processes for the tests of `cronnx.ipc.child.ChildProcess`: each runs as
`target(*args, inbox, outbox, *extra_inboxes)` and speaks plain msgpack values."""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection

import msgspec

STOP = "stop"


def echo(inbox: Connection, outbox: Connection) -> None:
    """Writes back every message it reads, until STOP (then exits with code 0)."""
    while (message := msgspec.msgpack.decode(inbox.recv_bytes())) != STOP:
        outbox.send_bytes(msgspec.msgpack.encode(message))


def numbered(count: int) -> list:
    """[i, "x" * size_i] for i in range(count): sizes from 0 to 1.5 MB, around the pipe's capacity
    and the parent's 1 MiB reads, so that messages span reads."""
    return [[i, "x" * (i * 37_000 % 1_500_000)] for i in range(count)]


def say_numbered(count: int, inbox: Connection, outbox: Connection) -> None:
    """Writes `numbered(count)`, then echoes as `echo` does until STOP."""
    for message in numbered(count):
        outbox.send_bytes(msgspec.msgpack.encode(message))
    echo(inbox, outbox)


def echo_second_inbox(inbox: Connection, outbox: Connection, second: Connection) -> None:
    """Writes back every message of its second inbox as ["second", message]; never reads the first."""
    while True:
        outbox.send_bytes(msgspec.msgpack.encode(["second", msgspec.msgpack.decode(second.recv_bytes())]))


def say_then_die(count: int, code: int, inbox: Connection, outbox: Connection) -> None:
    """Writes the numbers 0..count-1, then exits at once with `code` (no clean-up, as a crash)."""
    for number in range(count):
        outbox.send_bytes(msgspec.msgpack.encode(number))
    os._exit(code)


def deaf(inbox: Connection, outbox: Connection) -> None:
    """Reads nothing and never exits by itself: a child that ignores its stop message."""
    while True:
        time.sleep(3600)
