"""`ChildProcess`: one spawned child's pipes, messages, exit and stop, with real processes
(tests/support/children.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import selectors
import signal
import time

import msgspec

from cronnx.ipc.child import ChildProcess
from support import children

log = logging.getLogger("cronnx.test_child")


class Child:
    """A ChildProcess running `target(*args, ...)` with msgpack values on its pipes; records what
    it said and, at its exit, what had been delivered by then."""

    def __init__(self, target, *args, extra_inboxes: int = 0):
        self.said: list = []
        self.said_by_exit: list | None = None
        self.exits = 0
        self.process = ChildProcess("cronnx-test-child", "test child", target, args, msgspec.msgpack.encode,
                                    msgspec.msgpack.decode, self.said.append, self._on_exit, log,
                                    extra_inboxes=extra_inboxes)

    def _on_exit(self, process: ChildProcess) -> None:
        assert process is self.process
        self.exits += 1
        self.said_by_exit = list(self.said)

    async def until_said(self, count: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.said) < count:
            assert time.monotonic() < deadline, f"{len(self.said)} of {count} messages came"
            await asyncio.sleep(0.01)

    async def exited(self, timeout_s: float = 30.0) -> None:
        await asyncio.wait_for(self.process.exited.wait(), timeout_s)


def test_messages_arrive_decoded_whole_and_in_the_order_written():
    async def main():
        child = Child(children.say_numbered, 60)
        await child.until_said(60)
        assert child.said == children.numbered(60)
        for number in range(100):
            child.process.send(number)
        await child.until_said(160)
        assert child.said[60:] == list(range(100))
        await child.process.stop(children.STOP, 10.0)
        assert child.exits == 1 and child.process.exit_reason == "exited with code 0"

    asyncio.run(main())


class _NewestFdFirst(selectors.DefaultSelector):
    """Hands over the ready fds newest first: a child's sentinel (made when it starts) before its
    outbox (made before), the order in which the loop sees a child that wrote and died at once."""

    def select(self, timeout=None):
        return sorted(super().select(timeout), key=lambda event: -event[0].fd)


def test_what_a_child_wrote_just_before_it_died_is_delivered_before_its_exit():
    async def main():
        child = Child(children.say_then_die, 2000, 3)
        # Hold the loop until the child has died (not reaped): its outbox and its sentinel are
        # then ready together, and the sentinel comes first.
        os.waitid(os.P_PID, child.process.pid, os.WEXITED | os.WNOWAIT)
        await child.exited()
        assert child.said_by_exit == list(range(2000))
        assert child.exits == 1 and child.process.exit_reason == "exited with code 3"

    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(_NewestFdFirst())) as runner:
        runner.run(main())


def test_a_child_that_ignores_its_stop_message_is_killed_after_the_timeout():
    async def main():
        child = Child(children.deaf)
        started = time.monotonic()
        await child.process.stop(children.STOP, 0.5)
        took = time.monotonic() - started
        assert 0.5 <= took < 10.0
        assert child.exits == 1 and child.process.exitcode == -signal.SIGKILL
        assert child.process.exit_reason == "was killed: it did not stop within 0.5s"

    asyncio.run(main())


def test_a_child_killed_by_a_signal_from_elsewhere_is_said_to_be_killed_by_its_name():
    async def main():
        child = Child(children.echo)
        os.kill(child.process.pid, signal.SIGKILL)
        await child.exited()
        assert child.process.exitcode == -signal.SIGKILL
        assert child.process.exit_reason == "was killed by SIGKILL"

    asyncio.run(main())


def test_a_child_the_parent_kills_ends_with_the_parents_reason():
    async def main():
        child = Child(children.deaf)
        assert child.process.exit_reason is None  # still running
        child.process.kill("was killed: it hung")
        child.process.kill("was killed: a second reason, ignored")
        await child.exited()
        assert child.exits == 1 and child.process.exit_reason == "was killed: it hung"

    asyncio.run(main())


def test_sending_to_a_child_that_has_exited_raises_oserror():
    async def main():
        child = Child(children.say_then_die, 0, 0)
        await child.exited()
        for send in (lambda: child.process.send("late"), lambda: child.process.send_bytes(b"late")):
            try:
                send()
            except OSError:
                continue
            raise AssertionError("a send to an exited child did not raise OSError")

    asyncio.run(main())


def test_an_extra_inbox_is_a_pipe_of_its_own():
    async def main():
        child = Child(children.echo_second_inbox, extra_inboxes=1)
        child.process.send("first")  # the child never reads its first inbox
        child.process.send("ping", 1)
        await child.until_said(1)
        assert child.said == [["second", "ping"]]
        child.process.kill("was killed: the test is over")
        await child.exited()

    asyncio.run(main())
