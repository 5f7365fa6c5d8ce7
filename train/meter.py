"""Loss and throughput bookkeeping of the pretraining loop, without a host sync per step.

The loss is summed on the device and read back (``.item()``) only when the loop logs;
a non-finite loss is remembered on the device (``torch.where``) and reported, with its
step, at the next log or checkpoint, before anything is saved. images/s counts from
the end of the first step, so start-up and ``torch.compile`` are excluded.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from mscn.errors import MscnError
from mscn.train import checkpoint as ckpt
from mscn.train.distributed import DistInfo


class NonFiniteGuard:
    """Remembers, on the device, the first step whose loss was NaN/Inf (no host sync per step)."""

    def __init__(self, device: torch.device, info: DistInfo):
        self.first_bad = torch.tensor(-1, device=device)
        self.info = info

    def update(self, loss: torch.Tensor, step: int) -> None:
        self.first_bad = torch.where(torch.isfinite(loss) | (self.first_bad >= 0), self.first_bad, step)

    def check(self, ckpt_dir: Path, dtype: torch.dtype | None) -> None:
        """Note: host sync point (and a collective under DDP): raise if any step went bad."""
        if self.info.enabled:
            dist.all_reduce(self.first_bad, op=dist.ReduceOp.MAX)
        first_bad = int(self.first_bad.item())
        if first_bad >= 0:
            last = ckpt.list_checkpoints(ckpt_dir)
            # the usual cause; a tiny method.temperature or a huge optim.weight_decay overflow too
            fix = ("lower optim.base_lr (or check method.temperature and optim.weight_decay)"
                   + (" or use train.precision=fp32" if dtype is not None else ""))
            if last:  # a run folder holds one run: the lower lr continues from it in a new folder
                fix += f", and branch from it: --resume {last[-1]} --out NEW_DIR with the new value"
            raise MscnError(f"non-finite loss at step {first_bad}; stopped. Last good checkpoint: "
                            f"{last[-1] if last else 'none'}; {fix}")


class StepMeter:
    """Mean loss and images/s per log window, and images/s over the whole run."""

    def __init__(self, device: torch.device, info: DistInfo, images_per_step: int):
        self.device, self.info, self.images_per_step = device, info, images_per_step
        self.guard = NonFiniteGuard(device, info)
        self.loss_sum, self.count = torch.zeros((), device=device), 0
        self.last_loss = float("nan")  # the mean loss of the last log window
        self.t_first: float | None = None  # the clock starts when step 1 is done
        self.t_window, self.window_steps, self.steps_timed = time.perf_counter(), 0, 0

    def update(self, loss: torch.Tensor, step: int) -> None:
        """``loss`` of ``step`` (counted from 1: the step that has just been done)."""
        self.guard.update(loss, step)
        self.loss_sum += torch.nan_to_num(loss)
        self.count += 1
        if self.t_first is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize()  # once: the clock starts when step 1 is really done
            self.t_first = self.t_window = time.perf_counter()
        else:
            self.steps_timed += 1
            self.window_steps += 1

    def read(self) -> tuple[float, float]:
        """(mean loss over all ranks, images/s) of the window since the last read; starts a new one.

        Note: host sync point, and a collective under DDP: call it on every rank.
        """
        if self.info.enabled:
            dist.all_reduce(self.loss_sum)
            self.loss_sum /= self.info.world_size
        self.last_loss = self.loss_sum.item() / self.count
        now = time.perf_counter()
        img_s = self.images_per_step * self.window_steps / (now - self.t_window) if self.window_steps else float("nan")
        self.loss_sum.zero_()
        self.count, self.window_steps, self.t_window = 0, 0, now
        return self.last_loss, img_s

    def state_dict(self) -> dict:
        """The open log window (this rank's loss sum and step count), for an exact resume."""
        return {"loss_sum": self.loss_sum.detach().cpu(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.loss_sum = state["loss_sum"].to(self.device)
        self.count = int(state["count"])

    def elapsed(self) -> float:
        """Seconds since the end of the first step (0 before it)."""
        return time.perf_counter() - self.t_first if self.t_first else 0.0

    def run_images_per_s(self, elapsed: float) -> float:
        return self.images_per_step * self.steps_timed / elapsed if self.steps_timed else float("nan")
