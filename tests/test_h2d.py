"""mscn.h2d.to_device: the loader's per-batch host-to-device copies (labels, indices, σ)."""
import time

import pytest
import torch

from mscn.h2d import to_device


def test_to_device_on_the_cpu_is_a_plain_move():
    t = torch.arange(6)
    assert to_device(t, "cpu") is t
    assert torch.equal(to_device(t.view(2, 3).t(), torch.device("cpu")), t.view(2, 3).t())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_device_copies_without_waiting_for_the_stream():
    """The copy returns while the stream still has ~200 ms of queued work, and it is a copy:
    refilling the source right after (as DALI refills its buffers) leaves the result alone."""
    dev = torch.device("cuda")
    src = torch.arange(512, dtype=torch.int64)
    to_device(src, dev)  # the first pinned block of the process is a cudaHostAlloc: not what is timed
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10**7)  # a spin kernel: calibrate its cycles per ms on this card
    end.record()
    end.synchronize()
    torch.cuda._sleep(int(10**7 / start.elapsed_time(end) * 200))  # ~200 ms queued on the stream
    t0 = time.perf_counter()
    out = to_device(src, dev)
    waited = time.perf_counter() - t0
    src.fill_(-1)
    torch.cuda.synchronize()
    assert waited < 0.05, f"to_device waited {1e3 * waited:.0f} ms for the stream"
    assert torch.equal(out.cpu(), torch.arange(512))
