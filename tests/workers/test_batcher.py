"""The batch window: measured from the oldest request, never restarted by later ones."""

from cronnx.workers.batcher import Batcher


def test_full_batch_is_due_at_once():
    b = Batcher(batch_size=2, timeout_s=0.010)
    b.add(0, enqueued=100.0, filling=5)
    assert abs(b.wait_time(100.0) - 0.010) < 1e-9
    b.add(1, enqueued=100.001, filling=5)
    assert b.wait_time(100.001) == 0.0
    assert b.take() == ([0, 1], [100.0, 100.001], False)
    assert b.wait_time(100.002) is None


def test_window_counts_from_the_oldest_request():
    b = Batcher(batch_size=8, timeout_s=0.010)
    b.add(3, enqueued=100.000, filling=1)
    b.add(4, enqueued=100.008, filling=1)
    assert abs(b.wait_time(100.008) - 0.002) < 1e-9
    assert b.wait_time(100.011) == 0.0


def test_nothing_on_its_way_means_no_waiting():
    b = Batcher(batch_size=8, timeout_s=0.010)
    b.add(0, enqueued=100.0, filling=0)
    assert b.wait_time(100.0) == 0.0


def test_take_returns_at_most_batch_size_oldest_first():
    b = Batcher(batch_size=3, timeout_s=0.0)
    for slot in [5, 6, 7, 0, 1]:
        b.add(slot, enqueued=float(slot), filling=1)
    assert b.take()[0] == [5, 6, 7]
    assert b.take()[0] == [0, 1]


def test_a_lone_request_that_had_the_model_to_itself_is_marked_solo():
    b = Batcher(batch_size=4, timeout_s=0.0)
    b.add(1, enqueued=0.0, filling=0, alone=True)
    assert b.take() == ([1], [0.0], True)
    b.add(2, enqueued=0.0, filling=1, alone=True)
    b.add(3, enqueued=0.0, filling=0, alone=False)
    assert b.take()[2] is False


def test_cancel_removes_only_waiting_slots():
    b = Batcher(batch_size=4, timeout_s=1.0)
    b.add(2, enqueued=0.0, filling=1)
    assert b.cancel(2) is True
    assert b.cancel(2) is False
    assert b.wait_time(0.0) is None


def test_when_more_wait_than_a_batch_holds_the_lowest_priority_level_goes_first():
    b = Batcher(batch_size=3, timeout_s=0.010)
    for slot, level in enumerate([2, 2, 1, 2, 1]):  # arrival order
        b.add(slot, enqueued=100.0 + slot / 1000, filling=5, priority=level)
    slots, enqueued, _ = b.take()
    assert slots == [2, 4, 0] and enqueued == [100.002, 100.004, 100.0]  # level 1 first, then the oldest
    assert b.take()[0] == [1, 3]


def test_one_level_keeps_arrival_order():
    b = Batcher(batch_size=2, timeout_s=0.010)
    for slot in (5, 1, 3):
        b.add(slot, enqueued=100.0 + slot, filling=5, priority=1)
    assert b.take()[0] == [5, 1] and b.take()[0] == [3]
