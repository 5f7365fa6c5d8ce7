"""Batches taken by a background thread: the bench's ``masks-thread`` feed.

Round 4 (docs/PERFORMANCE.md) found the GPU idle ~9 ms of every pipeline-fed training
step. If the host spends that time in the loader's ``next()`` (DALI's handover, the
loader's work on the batch) while the trainer's queue runs dry, taking the batches on
another thread lets the training thread keep queueing kernels meanwhile. This row
measures that before the trainer gets such a thread: a product version also has to carry
each batch's loader state for exact resume, which the bench does not need.

The worker takes batches ``depth`` ahead on the caller's CUDA device and current stream,
so the loader's kernels stay ordered with the trainer's as they are without the thread.
An exception in the worker is raised in the caller at the batch where it happened.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch

_END = object()


class ThreadedBatches:
    """Iterator over ``batches`` (any iterator) filled by a daemon thread; ``close()`` (or
    dropping the last reference) stops the thread, which then lets go of the loader."""

    def __init__(self, batches: Iterator, depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        device = torch.cuda.current_device() if cuda else None
        stream = torch.cuda.current_stream() if cuda else None
        # the worker holds the queue and the flag, not self: dropping the last reference to
        # this object then runs __del__, which stops the worker
        self._thread = threading.Thread(target=_work, args=(batches, self._q, self._stop, device, stream),
                                        daemon=True, name="mscn-bench-feeder")
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        item = self._q.get()
        if item is _END:
            self._q.put(_END)  # every later call ends too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self, timeout: float = 60.0) -> None:
        """Stop the worker: it finishes the batch it is taking, then exits."""
        self._stop.set()
        waited = 0.0
        while self._thread.is_alive() and waited < timeout:
            try:  # a worker blocked on a full queue sees the flag at its next try
                while True:
                    self._q.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)
            waited += 0.1

    def __del__(self):
        if hasattr(self, "_thread"):  # not when __init__ refused its arguments
            self.close()


def _work(batches: Iterator, q: queue.Queue, stop: threading.Event, device, stream) -> None:
    try:
        if device is not None:
            torch.cuda.set_device(device)
            torch.cuda.set_stream(stream)
        for item in batches:
            if not _put(q, stop, item):
                return
        _put(q, stop, _END)
    except BaseException as e:  # handed to the caller, raised there
        _put(q, stop, e)


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
