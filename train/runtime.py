"""Where a run executes: its ranks, its torch device and its precision.

One :class:`Runtime` serves pretraining and every evaluation protocol. It is made once
per process by :func:`setup_runtime` (device choice, then the process group that
torchrun's env vars describe) and then answers the questions the loops ask: am I rank
0, how many images per rank, which autocast, and how to wrap a module in DDP.

Precision (``train.precision``): ``auto`` is bf16 autocast on GPU and plain fp32 on the
CPU; ``bf16`` / ``fp16`` / ``fp32`` force it. Evaluation follows the same setting.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mscn.errors import MscnError
from mscn.train.distributed import DistInfo, env_local_rank, init_distributed, pick_device


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: ``auto`` is bf16 on GPU and fp32 (no autocast) on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype``; a no-op context when ``dtype`` is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def wrap_ddp(module: nn.Module, device: torch.device, info: DistInfo, **kwargs) -> nn.Module:
    """``module`` under DDP when there are several ranks (``info.enabled``), else itself.

    Order matters for the callers: SyncBN conversion and the device move come before
    this wrap, ``torch.compile`` after it.
    """
    if not info.enabled:
        return module
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, **kwargs)


_PRIORITY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


@contextlib.contextmanager
def priority_stream(device: torch.device):
    """Run the block on this device's highest-priority CUDA stream (a no-op on the CPU).

    DALI's kernels run on DALI's own streams at normal priority; with the training step
    on a high-priority stream, the GPU schedules the step's kernels first whenever both
    have work queued, so the pipeline fills the gaps instead of delaying the step.
    The waits on entry and exit order the block after, and the code after it behind,
    whatever ran on the caller's stream (no host sync). DALI hands its outputs over
    host-synchronized (and, with its dynamic executor, without a copy), and the loader's
    filters and masks run on the current stream, so a batch taken inside the block is
    ordered too.
    """
    if device.type != "cuda":
        yield
        return
    if device not in _PRIORITY_STREAMS:
        _PRIORITY_STREAMS[device] = torch.cuda.Stream(device, priority=-100)  # clamped to the highest
    high, outer = _PRIORITY_STREAMS[device], torch.cuda.current_stream(device)
    high.wait_stream(outer)
    try:
        with torch.cuda.stream(high):
            yield
    finally:
        outer.wait_stream(high)


@dataclass(frozen=True)
class Runtime:
    """Rank layout, torch device and autocast dtype of this process."""

    dist: DistInfo
    device: torch.device
    dtype: torch.dtype | None = None  # autocast dtype; None: fp32, no autocast
    note: str | None = field(default=None, compare=False)  # why the device differs from the request

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def autocast(self):
        return autocast(self.device.type, self.dtype)

    def wrap_ddp(self, module: nn.Module, **kwargs) -> nn.Module:
        return wrap_ddp(module, self.device, self.dist, **kwargs)

    def priority_stream(self, enabled: bool = True):
        """:func:`priority_stream` on this device when ``enabled`` (``train.priority_stream``)."""
        return priority_stream(self.device) if enabled else contextlib.nullcontext()

    def per_rank(self, global_batch: int, what: str = "--batch") -> int:
        """This rank's share of ``global_batch``; it must split evenly over the ranks."""
        if global_batch % self.dist.world_size:
            raise MscnError(f"{what} {global_batch}: must be divisible by the world size ({self.dist.world_size})")
        return global_batch // self.dist.world_size


def setup_runtime(device: str = "auto", precision: str = "auto", what: str = "--device") -> Runtime:
    """CPU, one GPU, or one rank of a torchrun job (NCCL on GPU, gloo on CPU).

    ``device`` is auto, cuda or cpu; cuda without a visible GPU falls back to the CPU
    with ``Runtime.note`` saying so (the caller prints it where its logs go).
    """
    if device not in ("auto", "cuda", "cpu"):
        raise MscnError(f"{what} {device}: must be auto, cuda or cpu")
    dev, note = pick_device(device, env_local_rank(), what=what)
    info = init_distributed(dev.type)  # for CUDA, after the device is known: NCCL binds to it
    return Runtime(info, dev, amp_dtype(precision, dev), note)
