"""benchkit/feeder.py: the bench's background-thread feed (the masks-thread row)."""
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from benchkit.feeder import ThreadedBatches  # noqa: E402


def feeders() -> int:
    return sum(t.name == "mscn-bench-feeder" for t in threading.enumerate())


def test_batches_arrive_in_order_and_the_end_repeats():
    it = ThreadedBatches(iter(range(50)), depth=3)
    assert list(it) == list(range(50))
    with pytest.raises(StopIteration):
        next(it)
    it.close()
    assert feeders() == 0


def test_an_error_in_the_worker_is_raised_at_its_batch():
    def gen():
        yield 1
        yield 2
        raise RuntimeError("corrupt JPEG in batch 3")

    it = ThreadedBatches(gen())
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(RuntimeError, match="batch 3"):
        next(it)


def test_dropping_the_feeder_stops_its_thread_and_lets_go_of_the_source():
    """An endless source, the queue full: the last reference gone, the worker stops (the
    bench frees each row's DALI pipeline this way before timing the next row)."""
    released = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            released.set()

    it = ThreadedBatches(endless(), depth=2)
    assert next(it) == 0
    time.sleep(0.2)  # the worker fills the queue and blocks
    del it
    deadline = time.monotonic() + 10
    while feeders() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert feeders() == 0
    import gc
    gc.collect()
    assert released.wait(5)


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        ThreadedBatches(iter(()), depth=0)
