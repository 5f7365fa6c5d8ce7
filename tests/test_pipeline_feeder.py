"""mscn.pipelines.feeder: batches taken by a background thread (data.feed_thread and the
bench's masks-thread feed), each with the loader state after it."""
import gc
import threading
import time

import pytest

from mscn.pipelines.feeder import Feeder


def feeders(name="mscn-feeder") -> int:
    return sum(t.name == name for t in threading.enumerate())


def test_batches_arrive_in_order_and_the_end_repeats():
    it = Feeder(iter(range(50)), depth=3)
    assert list(it) == list(range(50))
    with pytest.raises(StopIteration):
        next(it)
    it.close()
    assert feeders() == 0


def test_the_state_is_the_last_handed_out_batchs_not_the_queued_ones():
    """The worker runs ahead (its queue full); state_dict() is the snapshot taken right
    after the batch the caller got last, which is what a checkpoint must resume from."""
    taken = []

    def source():
        for i in range(10):
            taken.append(i)
            yield i

    it = Feeder(source(), depth=3, snapshot=lambda: {"after": taken[-1]})
    with pytest.raises(RuntimeError, match="no batch"):
        it.state_dict()
    for want in range(6):
        assert next(it) == want
        time.sleep(0.05)  # let the worker fill its queue
        assert it.state_dict() == {"after": want} and taken[-1] > want
    it.close()


def test_an_error_in_the_worker_is_raised_at_its_batch_and_again_after():
    def gen():
        yield 1
        yield 2
        raise RuntimeError("corrupt JPEG in batch 3")

    it = Feeder(gen())
    assert [next(it), next(it)] == [1, 2]
    for _ in range(2):  # a caller that goes on asking gets the error again, not a hang
        with pytest.raises(RuntimeError, match="batch 3"):
            next(it)


def test_dropping_the_feeder_stops_its_thread_and_lets_go_of_the_source():
    """An endless source, the queue full: the last reference gone, the worker stops (a DALI
    pipeline must not be freed while a thread is inside it)."""
    released = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            released.set()

    it = Feeder(endless(), depth=2)
    assert next(it) == 0
    time.sleep(0.2)  # the worker fills the queue and blocks
    del it
    deadline = time.monotonic() + 10
    while feeders() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert feeders() == 0
    gc.collect()
    assert released.wait(5)


def test_a_closed_feeder_raises_instead_of_waiting():
    it = Feeder(iter(range(100)), depth=2)
    assert next(it) == 0
    it.close()
    assert feeders() == 0
    with pytest.raises(RuntimeError, match="closed"):
        next(it)


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        Feeder(iter(()), depth=0)
