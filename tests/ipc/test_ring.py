"""The slot ring: real shared memory, the owner's slot bookkeeping, a worker's view of the same
memory, and the clean-up of segments a killed process left behind."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import uuid
from pathlib import Path

import msgspec
import numpy as np
import pytest

from cronnx.ipc.ring import RingLayout
from cronnx.ipc.ring import AttachedRing, SharedMemoryFull, SlotRing
from cronnx.ipc.segments import segment_name

SHM = Path("/dev/shm")
INPUT_ITEM = (3, 4, 4)
OUTPUT_ITEM = (5,)


@pytest.fixture
def make_ring():
    """make_ring(slots) -> a SlotRing with a tag of its own; closed after the test."""
    rings: list[SlotRing] = []

    def make(slots: int = 4) -> SlotRing:
        ring = SlotRing(f"test_{uuid.uuid4().hex[:12]}", slots, INPUT_ITEM, "float32", OUTPUT_ITEM, "float32")
        rings.append(ring)
        return ring

    yield make
    for ring in rings:
        ring.close()


def counts(ring: SlotRing) -> tuple[int, int, int]:
    return ring.free_count, ring.in_use, ring.filling_count


# --- the segments ---------------------------------------------------------------------------

def test_segments_are_named_after_the_owner_pid_and_hold_every_slot(make_ring):
    ring = make_ring(slots=4)
    prefix = f"cronnx_{os.getpid()}_"
    assert ring.layout.input_segment.startswith(prefix) and ring.layout.input_segment.endswith("_in")
    assert ring.layout.output_segment.startswith(prefix) and ring.layout.output_segment.endswith("_out")
    assert (SHM / ring.layout.input_segment).stat().st_size == 4 * 3 * 4 * 4 * 4
    assert (SHM / ring.layout.output_segment).stat().st_size == 4 * 5 * 4
    assert ring.inputs.shape == (4, *INPUT_ITEM) and ring.inputs.dtype == np.float32
    assert ring.outputs.shape == (4, *OUTPUT_ITEM) and ring.outputs.dtype == np.float32
    assert ring.slots == 4


def test_segments_are_reserved_in_full_when_made(make_ring):
    """tmpfs gives pages on first touch: an unreserved segment would SIGBUS the process touching
    pages that /dev/shm cannot give. Reserved, the segment's blocks are allocated at once."""
    ring = make_ring(64)
    for name, size in ((ring.layout.input_segment, ring.layout.input_bytes()),
                       (ring.layout.output_segment, ring.layout.output_bytes())):
        assert os.stat(SHM / name).st_blocks * 512 >= size


def test_a_ring_larger_than_the_room_in_dev_shm_is_refused_with_the_sizes_and_leaves_nothing():
    stat = os.statvfs(SHM)
    free = stat.f_bavail * stat.f_frsize
    item_bytes = int(np.prod(INPUT_ITEM)) * 4
    slots = free // item_bytes + 1000
    tag = f"test_{uuid.uuid4().hex[:12]}"
    with pytest.raises(SharedMemoryFull, match=r"no room in /dev/shm for ring segment .*MiB free .*--shm-size"):
        SlotRing(tag, slots, INPUT_ITEM, "float32", OUTPUT_ITEM, "float32")
    assert not [n for n in os.listdir(SHM) if tag in n]


def test_a_leftover_segment_of_the_same_name_is_replaced_not_an_error(make_ring):
    from multiprocessing import shared_memory

    tag = f"test_{uuid.uuid4().hex[:12]}"
    leftover = shared_memory.SharedMemory(name=segment_name(f"{tag}_in"), create=True, size=7)
    leftover.close()
    ring = SlotRing(tag, 2, INPUT_ITEM, "float32", OUTPUT_ITEM, "float32")
    try:
        assert (SHM / ring.layout.input_segment).stat().st_size == ring.layout.input_bytes()
        ring.inputs[1] = 2.5
        assert float(ring.inputs[1].sum()) == 2.5 * 48
    finally:
        ring.close()


def test_close_unlinks_both_segments_and_can_be_called_again(make_ring):
    ring = make_ring()
    paths = [SHM / ring.layout.input_segment, SHM / ring.layout.output_segment]
    assert all(p.exists() for p in paths)
    ring.close()
    assert not any(p.exists() for p in paths)
    ring.close()  # a second call (every exit path closes) is harmless
    assert ring.inputs is None and ring.outputs is None


# SharedMemory.__del__ reports the BufferError of the mapping it cannot unmap while the view lives.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_close_unlinks_even_while_a_view_of_the_ring_is_still_alive(make_ring):
    ring = make_ring()
    held = ring.inputs[0]  # e.g. a preprocessing thread still holding its slot
    paths = [SHM / ring.layout.input_segment, SHM / ring.layout.output_segment]
    ring.close()
    assert not any(p.exists() for p in paths)
    held[:] = 1.0  # the mapping stays valid for whoever still holds it
    assert float(held.sum()) == 48.0


# --- handing out slots (owner side) ---------------------------------------------------------

def test_slots_are_handed_out_adjacent_and_in_order_until_none_is_free(make_ring):
    ring = make_ring(slots=4)
    assert [ring.acquire() for _ in range(4)] == [0, 1, 2, 3]
    assert ring.acquire() is None
    assert counts(ring) == (0, 4, 4)


def test_the_search_starts_after_the_last_slot_handed_out_not_at_zero(make_ring):
    ring = make_ring(slots=4)
    assert [ring.acquire(), ring.acquire()] == [0, 1]
    ring.release(0)
    # Slot 0 is free again, but the next request goes next to the last one: 2.
    assert ring.acquire() == 2


def test_the_search_wraps_around_the_end_and_skips_slots_in_use(make_ring):
    ring = make_ring(slots=4)
    assert [ring.acquire() for _ in range(3)] == [0, 1, 2]
    ring.release(0)
    ring.release(2)
    # Cursor at 3: slot 3, then around the end to 0, then past 1 (still in use) to 2.
    assert [ring.acquire(), ring.acquire(), ring.acquire()] == [3, 0, 2]
    assert ring.acquire() is None


def test_counts_follow_acquire_mark_sent_and_release(make_ring):
    ring = make_ring(slots=4)
    assert counts(ring) == (4, 0, 0)  # (free, in use, filling)
    a, b, c = ring.acquire(), ring.acquire(), ring.acquire()
    assert counts(ring) == (1, 3, 3)
    ring.mark_sent(a)
    ring.mark_sent(b)
    assert counts(ring) == (1, 3, 1)
    ring.release(a)  # the worker answered
    assert counts(ring) == (2, 2, 1)
    ring.release(c)  # an abandoned fill, freed while still filling (ring rule 4)
    assert counts(ring) == (3, 1, 0)
    ring.release(b)
    assert counts(ring) == (4, 0, 0)


def test_a_released_slot_is_handed_out_again(make_ring):
    ring = make_ring(slots=2)
    assert [ring.acquire(), ring.acquire()] == [0, 1]
    ring.mark_sent(1)
    ring.release(1)
    assert ring.acquire() == 1
    assert ring.acquire() is None


def test_releasing_a_slot_that_is_free_raises_and_changes_nothing(make_ring):
    ring = make_ring(slots=4)
    slot = ring.acquire()
    ring.release(slot)
    with pytest.raises(RuntimeError, match="released twice"):
        ring.release(slot)  # ring rule 6: a second release could free another request's slot
    with pytest.raises(RuntimeError, match="released twice"):
        ring.release(3)  # never handed out
    assert counts(ring) == (4, 0, 0)


def test_marking_sent_a_slot_that_is_not_filling_raises(make_ring):
    ring = make_ring(slots=4)
    with pytest.raises(RuntimeError, match="not filling"):
        ring.mark_sent(2)  # free
    slot = ring.acquire()
    ring.mark_sent(slot)
    with pytest.raises(RuntimeError, match="not filling"):
        ring.mark_sent(slot)  # sent already
    assert counts(ring) == (3, 1, 0)


# --- the worker side ------------------------------------------------------------------------

def test_an_attached_ring_shares_the_owners_memory_both_ways(make_ring):
    ring = make_ring(slots=3)
    worker = AttachedRing(ring.layout)
    try:
        slot = ring.acquire()
        ring.inputs[slot] = np.arange(48, dtype=np.float32).reshape(INPUT_ITEM)
        np.testing.assert_array_equal(worker.inputs[slot], np.arange(48, dtype=np.float32).reshape(INPUT_ITEM))
        worker.outputs[slot] = [1, 2, 3, 4, 5]
        np.testing.assert_array_equal(ring.outputs[slot], [1, 2, 3, 4, 5])
    finally:
        worker.close()


def _worker_process(layout_bytes: bytes, slots: list[int]) -> None:
    """A worker's part, in a child process: each slot's output is its input summed per channel,
    then 1, then the slot number."""
    ring = AttachedRing(msgspec.msgpack.decode(layout_bytes, type=RingLayout))
    try:
        for slot in slots:
            per_channel = ring.inputs[slot].sum(axis=(1, 2))
            ring.outputs[slot] = [*per_channel, 1.0, float(slot)]
    finally:
        ring.close()


def test_a_worker_in_a_spawned_process_reads_the_inputs_and_writes_the_outputs(make_ring):
    ring = make_ring(slots=4)
    slots = [ring.acquire(), ring.acquire()]
    for slot in slots:
        ring.inputs[slot] = np.stack([np.full((4, 4), slot + c, np.float32) for c in range(3)])
        ring.mark_sent(slot)
    ring.outputs[:] = -1.0
    child = multiprocessing.get_context("spawn").Process(
        target=_worker_process, args=(msgspec.msgpack.encode(ring.layout), slots))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    for slot in slots:
        np.testing.assert_array_equal(ring.outputs[slot], [16 * slot, 16 * (slot + 1), 16 * (slot + 2), 1.0, slot])
    untouched = [k for k in range(4) if k not in slots]
    np.testing.assert_array_equal(ring.outputs[untouched], -1.0)


def test_a_worker_process_that_exits_leaves_the_owners_segments_in_place(make_ring, tmp_path):
    # A separate interpreter with its own resource tracker: if attaching registered the segments
    # with it, that tracker would unlink them when the worker exits, under the owner's feet.
    ring = make_ring(slots=2)
    ring.inputs[1] = 3.0
    script = tmp_path / "worker.py"
    script.write_text(
        "import sys, msgspec\n"
        "from cronnx.ipc.ring import AttachedRing, RingLayout\n"
        "ring = AttachedRing(msgspec.msgpack.decode(sys.stdin.buffer.read(), type=RingLayout))\n"
        "ring.outputs[1] = float(ring.inputs[1].sum())\n"
        "ring.close()\n")
    child = subprocess.run([sys.executable, str(script)], input=msgspec.msgpack.encode(ring.layout),
                           capture_output=True, timeout=60, cwd=Path(__file__).parents[2])
    assert child.returncode == 0, child.stderr
    assert b"leaked" not in child.stderr, child.stderr
    assert (SHM / ring.layout.input_segment).exists() and (SHM / ring.layout.output_segment).exists()
    np.testing.assert_array_equal(ring.outputs[1], 144.0)
