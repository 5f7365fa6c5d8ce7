"""Per-step schedules as pure functions of (step, total), like DINO's ``cosine_scheduler``.

Paper App. A.1: linear warm-up (10 epochs) then cosine decay of the learning rate,
and BYOL's target momentum from 0.996 to 1.0 on a cosine (Grill et al., 2020).
Everything is per optimizer step, so a resumed run lands on the same values.
"""
from __future__ import annotations

import math


def peak_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule: ``base_lr`` is per 256 images (SimCLR 0.3 -> 4.8 at 4096)."""
    return base_lr * global_batch / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Warm-up: ``peak * (step + 1) / warmup_steps`` so the first step already moves and the
    last warm-up step reaches the peak. Then a half cosine from ``peak`` down to
    ``peak * min_lr_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    min_lr = peak_lr * min_lr_ratio
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_at(step: int, total: int, base: float, final: float) -> float:
    """BYOL target momentum: ``final - (final - base) * (cos(pi * step / total) + 1) / 2``.

    ``base`` at step 0, ``final`` at ``total`` (BYOL §3.2, paper App. A.1: 0.996 -> 1.0).
    """
    progress = min(1.0, max(0.0, step / max(1, total)))
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
