"""A ring of fixed-size slots in shared memory: one input and one output tensor per slot.

The server process owns the segments (creates and unlinks them) and allocates slots; a worker
attaches to them, reads the inputs of slots it is told about and writes their outputs.
Slot lifecycle: free -> filling (a preprocessing thread or process, or a front process, writes
the input) -> sent (the worker owns it until it answers) -> free. Only the server process
changes a slot's state, so the states live in its memory; no flag lives in shared memory, and
the pipes order every hand-over.

The hand-over rules. A slot is never reused while whatever fills it or a worker may still
touch it, or one request would get another's answer. Each place that depends on a rule cites it
as "ring rule N".

1. A slot's input is completely written before its Submit is sent: the engine sends Submit only
   after the preprocessing job for the slot has returned.
2. A worker writes a slot's output completely before it sends the Done naming the slot; it
   touches only slots it was sent, and only until its answer for them (Done, Failed, Dropped).
3. The server process (the engine) copies a slot's output before the slot is released.
4. A fill that is abandoned (client gone, deadline) frees the slot only when whatever fills it
   (a preprocessing thread or process, a front process) has finished: it may still be writing.
5. A slot that was sent is freed only on the worker's answer for it (Done, Failed, Dropped) or
   on the worker's death; never when a Cancel is sent, since the worker may be running it.
6. One owner: the engine (`cronnx/engine/inference.py`) acquires every slot, through its model
   version's admission queue (`cronnx/engine/admission.py`, which hands a released slot on to
   the next waiting request), and releases it; `release` of a slot that is already free is a
   bug and raises.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from multiprocessing import shared_memory

import msgspec
import numpy as np

from cronnx.ipc.segments import SHM_DIR, segment_name


class RingLayout(msgspec.Struct, frozen=True):
    """Everything a worker needs to attach to a ring: two shared-memory segments of `slots` items,
    one input tensor (`input_item_shape`, `input_dtype`) and one output tensor per slot."""

    input_segment: str
    output_segment: str
    slots: int
    input_item_shape: tuple[int, ...]
    input_dtype: str
    output_item_shape: tuple[int, ...]
    output_dtype: str

    def input_bytes(self) -> int:
        return self.slots * int(np.prod(self.input_item_shape)) * np.dtype(self.input_dtype).itemsize

    def output_bytes(self) -> int:
        return self.slots * int(np.prod(self.output_item_shape)) * np.dtype(self.output_dtype).itemsize


def _view(shm: shared_memory.SharedMemory, slots: int, item_shape: tuple[int, ...], dtype: str) -> np.ndarray:
    # frombuffer holds an export of the mapping: while any view lives, close() cannot unmap it
    # under a thread that still writes (it raises BufferError instead, and the mapping stays).
    count = slots * int(np.prod(item_shape))
    return np.frombuffer(shm.buf, dtype=dtype, count=count).reshape((slots, *item_shape))


FREE, FILLING, SENT = 0, 1, 2


class SlotRing:
    """Owner side: creates the segments and hands out slots, adjacent ones first."""

    def __init__(self, tag: str, slots: int, input_item_shape, input_dtype: str, output_item_shape, output_dtype: str):
        self.layout = RingLayout(
            input_segment=segment_name(f"{tag}_in"),
            output_segment=segment_name(f"{tag}_out"),
            slots=slots,
            input_item_shape=tuple(input_item_shape),
            input_dtype=input_dtype,
            output_item_shape=tuple(output_item_shape),
            output_dtype=output_dtype,
        )
        # Called after each release (the owner's admission queue hands the slot on).
        self.on_release: Callable[[], None] | None = None
        self._segments: list[shared_memory.SharedMemory] = []
        try:
            self._segments.append(_create(self.layout.input_segment, self.layout.input_bytes()))
            self._segments.append(_create(self.layout.output_segment, self.layout.output_bytes()))
        except BaseException:
            self.close()
            raise
        self.inputs = _view(self._segments[0], slots, self.layout.input_item_shape, input_dtype)
        self.outputs = _view(self._segments[1], slots, self.layout.output_item_shape, output_dtype)
        self._state = bytearray(slots)
        self._cursor = 0
        self.free_count = slots
        self.filling_count = 0

    @property
    def slots(self) -> int:
        return self.layout.slots

    def acquire(self) -> int | None:
        """A free slot, searching forward from the last one handed out so that requests
        arriving together get adjacent slots (a batch the worker can run without a copy)."""
        if self.free_count == 0:
            return None
        n = self.layout.slots
        state = self._state
        for step in range(n):
            k = (self._cursor + step) % n
            if state[k] == FREE:
                state[k] = FILLING
                self._cursor = (k + 1) % n
                self.free_count -= 1
                self.filling_count += 1
                return k
        raise AssertionError("free_count out of step with slot states")

    @property
    def in_use(self) -> int:
        """Slots holding a request: filling or sent."""
        return self.layout.slots - self.free_count

    def mark_sent(self, slot: int) -> None:
        """The slot's Submit went to the worker (ring rule 1: its input is complete)."""
        if self._state[slot] != FILLING:
            raise RuntimeError(f"slot {slot} sent while not filling (state {self._state[slot]})")
        self._state[slot] = SENT
        self.filling_count -= 1

    def release(self, slot: int) -> None:
        """Free a slot; RuntimeError if it is free already (ring rule 6: a second release could
        free a slot that another request has taken since)."""
        state = self._state[slot]
        if state == FREE:
            raise RuntimeError(f"slot {slot} released twice")
        self.filling_count -= state == FILLING
        self._state[slot] = FREE
        self.free_count += 1
        if self.on_release is not None:
            self.on_release()

    @property
    def closed(self) -> bool:
        """Unlinked: no slot of it is handed out any more."""
        return not self._segments

    def close(self) -> None:
        """Unmap and unlink; safe to call more than once and from any exit path."""
        self.inputs = self.outputs = None
        for shm in self._segments:
            try:
                shm.close()
            except BufferError:
                pass  # a numpy view is still alive; unlinking below still frees the name
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
        self._segments = []


class SharedMemoryFull(OSError):
    """/dev/shm has no room for a ring: the message says how much it needs and what to do."""


def _create(name: str, size: int) -> shared_memory.SharedMemory:
    """A new segment of `size` bytes with its memory reserved now (SharedMemoryFull if /dev/shm
    cannot hold it). tmpfs hands out pages only when they are first written: an unreserved segment
    larger than the room left would be created fine and kill the process that first touches the
    missing pages (SIGBUS) under load, as Docker's 64 MB default /dev/shm does with the default
    config's 78 MB of rings."""
    _check_room(name, size)
    try:
        shm = shared_memory.SharedMemory(name=name, create=True, size=size)
    except FileExistsError:
        # The name is this start's own (segments.py): the leftover of an earlier ring of this
        # process that was not closed. Replace it rather than fail.
        shared_memory.SharedMemory(name=name).unlink()
        shm = shared_memory.SharedMemory(name=name, create=True, size=size)
    try:
        _reserve(shm, size)
    except OSError as exc:
        shm.close()
        shm.unlink()
        if exc.errno in (errno.ENOSPC, errno.ENOMEM):  # tmpfs full, or the container's memory
            raise SharedMemoryFull(_no_room(name, size)) from exc
        raise  # not for want of room (no file descriptor left, say): said as it is
    return shm


def _check_room(name: str, size: int) -> None:
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return  # not Linux: shared memory lives elsewhere
    if size > stat.f_bavail * stat.f_frsize:
        raise SharedMemoryFull(_no_room(name, size))


def _reserve(shm: shared_memory.SharedMemory, size: int) -> None:
    path = os.path.join(SHM_DIR, shm.name.lstrip("/"))
    if size == 0 or not hasattr(os, "posix_fallocate") or not os.path.exists(path):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def _no_room(name: str, size: int) -> str:
    try:
        stat = os.statvfs(SHM_DIR)
        free = f"{stat.f_bavail * stat.f_frsize / 2 ** 20:.1f} MiB free of {stat.f_blocks * stat.f_frsize / 2 ** 20:.0f}"
    except OSError:
        free = "room unknown"
    return (f"no room in {SHM_DIR} for ring segment {name} ({size / 2 ** 20:.1f} MiB; {free}): give it more "
            f"(docker run --shm-size, a Kubernetes emptyDir with medium: Memory at /dev/shm) or lower ring_slots")


class AttachedRing:
    """Worker side: maps the owner's segments without taking ownership."""

    def __init__(self, layout: RingLayout):
        self._segments = [_attach(layout.input_segment), _attach(layout.output_segment)]
        self.inputs = _view(self._segments[0], layout.slots, layout.input_item_shape, layout.input_dtype)
        self.outputs = _view(self._segments[1], layout.slots, layout.output_item_shape, layout.output_dtype)

    def close(self) -> None:
        self.inputs = self.outputs = None
        for shm in self._segments:
            try:
                shm.close()
            except BufferError:
                pass  # a view is still referenced; the mapping goes with the process


def _attach(name: str) -> shared_memory.SharedMemory:
    # Before 3.13 attaching registers the segment with the resource tracker, which would then
    # unlink it when this process exits, under the owner's feet. Attach untracked.
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    from multiprocessing import resource_tracker

    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
