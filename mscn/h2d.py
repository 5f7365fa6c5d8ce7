"""Host-to-device copies that never make the host wait for the GPU.

A loader's small per-batch host tensors (labels, sample indices, the blur's σ from DALI's
CPU outputs) go to the GPU once per step. ``tensor.to("cuda", non_blocking=True)`` from
ordinary (pageable) memory is not always asynchronous: CUDA's rules for
``cudaMemcpyAsync`` say that for pageable memory "the driver may synchronize with the
stream" to stage the copy. On the trainer's stream that would be a host sync per batch,
the kind that leaves the GPU idle while the host fetches the next batch. Staging through
pinned memory (PyTorch's caching host allocator, reused across steps) makes the copy a
plain DMA queued on the stream. ``scripts/probe_syncs.py`` measures both on a GPU.
"""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor bound for a GPU goes through pinned memory, without
    a host sync. Elsewhere (CPU to CPU, already on the device) a plain ``.to``."""
    dev = torch.device(device)
    if dev.type != "cuda" or t.device.type != "cpu":
        return t.to(dev)
    # a host copy into a block of the caching host allocator, which reuses the block only
    # after the DMA below has run. Always a copy (not pin_memory(), which returns a pinned
    # t itself): t may be DALI's buffer, which DALI refills for a later batch
    staged = torch.empty_like(t, memory_format=torch.contiguous_format, pin_memory=True).copy_(t)
    return staged.to(dev, non_blocking=True)
