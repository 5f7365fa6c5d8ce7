"""Batches taken by a background thread (``data.feed_thread``), each with its loader state.

Why: in round 4 on an H200 (docs/PERFORMANCE.md) the GPU sat idle about 9 ms of every
pipeline-fed training step, whatever the pipeline did, and 1 % on synthetic input. If the
host's time in the loader's ``next()`` (DALI's handover, the loader's kernels, a wait on
the GPU) is what lets the trainer's queue run dry, taking the batches on another thread
lets the training thread go on queueing kernels meanwhile. The bench's ``masks-thread``
feed measures it; ``data.feed_thread`` stays off until a GPU run shows a gain.

How:
- the worker takes batches ``depth`` ahead, on the caller's CUDA device and current stream
  (captured when the feeder is made), so the loader's kernels are queued on the trainer's
  stream as without the thread, each batch's before the step that reads it;
- exact resume: right after taking a batch, the worker snapshots the loader's state
  (``snapshot``, e.g. ``DaliLoader.state_dict``: DALI's checkpoint counts the batches the
  worker took). :meth:`Feeder.state_dict` is the snapshot of the last batch handed to the
  caller, not of the batches waiting in the queue, so a checkpoint resumes at the next
  batch the trainer would have seen;
- an exception in the worker (a corrupt JPEG's DataError, say) is raised in the caller at
  the batch where it happened;
- :meth:`Feeder.close` (also on garbage collection) stops the worker, which lets go of the
  loader: a DALI pipeline must not be freed while a thread is inside it.
"""
from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Callable, Iterator

import torch

_END = object()


class Feeder:
    """Iterator over ``batches`` filled by a daemon thread ``depth`` batches ahead."""

    def __init__(self, batches: Iterator, depth: int = 2, snapshot: Callable[[], dict] | None = None,
                 name: str = "mscn-feeder"):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._state: dict | None = None
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        device = torch.cuda.current_device() if cuda else None
        stream = torch.cuda.current_stream() if cuda else None
        # the worker holds the queue and the flag, not self: dropping the last reference to
        # this object then runs __del__, which stops the worker
        self._thread = threading.Thread(target=_work, args=(batches, snapshot, self._q, self._stop, device, stream),
                                        daemon=True, name=name)
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._stop.is_set():
                raise RuntimeError("Feeder: closed")
            try:
                item = self._q.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():  # it always leaves the end or its error: a guard
                    raise RuntimeError("Feeder: the worker thread ended without a batch or an error") from None
        if item is _END:
            self._q.put(_END)  # every later call ends too
            raise StopIteration
        if isinstance(item, BaseException):
            self._q.put(item)  # a later call raises it again instead of waiting forever
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict:
        """The loader's state after the last batch this feeder handed out."""
        if self._state is None:
            raise RuntimeError("Feeder.state_dict: no batch handed out yet, or made without a snapshot")
        return self._state

    def close(self, timeout: float = 120.0) -> None:
        """Stop the worker: it finishes the batch it is taking (bounded by ``timeout``), then
        exits and lets go of the loader."""
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
        if self._thread.is_alive():
            warnings.warn(f"Feeder: the worker is still inside the loader after {timeout:.0f} s; it stops "
                          "after its current batch", RuntimeWarning, stacklevel=2)

    def __del__(self):
        if hasattr(self, "_thread"):  # not when __init__ refused its arguments
            self.close()


def _work(batches: Iterator, snapshot, q: queue.Queue, stop: threading.Event, device, stream) -> None:
    try:
        if device is not None:
            torch.cuda.set_device(device)
            torch.cuda.set_stream(stream)
        for batch in batches:
            if not _put(q, stop, (batch, snapshot() if snapshot else None)):
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
