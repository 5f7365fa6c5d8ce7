"""The views' Gaussian blur (paper App. A.1, SimCLR/BYOL's "GaussianBlur" augmentation)
applied by the loader instead of DALI (``data.blur_where=loader``): one σ per sample.

Why: on an H200, DALI's ``fn.gaussian_blur`` ran as CUTLASS convolutions that took 15 of
DALI's 24 ms of GPU time per ResNet-18 step when they ran beside the trainer
(docs/perf/HISTORY.md, round 3). Here the blur is two batched GEMMs per view on the views'
device, like the high-pass of ``highpass.where=loader`` (mscn/highpass.py).

The same filter as DALI's: weights ``exp(-t²/2σ²)`` for ``|t| <= r``, normalized, with
``r = ceil(3σ)`` when the window is 0 (DALI's ``2*ceil(3σ)+1``) or ``(window-1)/2``; border
reflect-101. σ = 0 means "not blurred" (the identity). Each sample's 1-D filter is a
banded ``n x n`` matrix ``B_s`` with ``(x @ B_s)[..., j] = blur(x)[..., j]``, built as
``Σ_t w_s(t) P_t`` from the reflect-101 shift matrices ``P_t`` (cached), so nothing
leaves the device and no sample needs a host sync.

Where it may run: the blur is linear and its weights sum to 1 (also at reflect-101
borders), so it commutes with the per-channel affine normalization and, being symmetric,
with the flip: blurring the normalized view equals normalizing the blurred one. It does
not commute with solarize (BYOL), so views with ``solarize_prob > 0`` keep DALI's blur,
unless ``data.colour_where=loader`` moves the solarize too (mscn/colour.py).
Against DALI's blur the loader's differs by DALI's rounding of the blurred image to uint8
(at most half a level, before normalization).
"""
from __future__ import annotations

import functools
import math

import torch

from mscn.h2d import to_device
from mscn.highpass import reflect101_shifts


def blur_radius(sigma_hi: float, window: int = 0) -> int:
    """The largest half-width a view's blur can take: ``ceil(3 σ_hi)``, or ``(window-1)/2``."""
    if window:
        if window < 1 or window % 2 == 0:
            raise ValueError(f"blur window must be odd and >= 1 (or 0 for 2*ceil(3σ)+1), got {window}")
        return (window - 1) // 2
    return math.ceil(3.0 * sigma_hi)


@functools.lru_cache(maxsize=16)
def _shifts_on(n: int, radius: int, device: str) -> torch.Tensor:
    """The reflect-101 shift matrices (mscn.highpass.reflect101_shifts) on ``device``."""
    return torch.from_numpy(reflect101_shifts(n, radius)).float().to(device)


def blur_weights(sigma: torch.Tensor, radius: int, window: int = 0) -> torch.Tensor:
    """(B, 2·radius+1) float32 normalized taps, one row per σ; σ <= 0 gives the identity."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    s = sigma.reshape(-1, 1).float()
    # σ <= 0: the identity below; a σ so small that σ² underflows would give 0/0: clamp
    safe = torch.where(s > 0, s.clamp(min=1e-6), torch.ones_like(s))
    r = torch.ceil(3.0 * safe) if not window else torch.full_like(safe, float((window - 1) // 2))
    w = torch.exp(-(t * t) / (2.0 * safe * safe)) * (t.abs() <= r)
    w = torch.where(s > 0, w, (t == 0).float().expand_as(w))
    return w / w.sum(dim=1, keepdim=True)


def blur_matrices(sigma: torch.Tensor, n: int, radius: int, window: int = 0, dtype=torch.float32) -> torch.Tensor:
    """(B, n, n) per-sample matrices ``B_s`` with ``x @ B_s`` = the blur along the last axis."""
    w = blur_weights(sigma, radius, window)
    p = _shifts_on(n, radius, str(w.device))
    return (w @ p.reshape(2 * radius + 1, n * n)).reshape(-1, n, n).to(dtype)


def blur_per_sample(x: torch.Tensor, sigma: torch.Tensor, radius: int, window: int = 0) -> torch.Tensor:
    """Blur NCHW float ``x`` (B, C, H, W), sample ``b`` with ``sigma[b]`` (0: untouched):
    ``B_hᵀ x B_w`` as batched matrix products in ``x``'s dtype (float16 on a GPU, as the
    loader's high-pass; float32 matrices would double the bytes).

    On a GPU every sample goes through the GEMMs (identity matrices where σ = 0): picking
    the blurred ones would need their count on the host, a sync per batch. On the CPU only
    the blurred samples are multiplied (half of them at p = 0.5)."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"blur_per_sample expects a float NCHW tensor, got {tuple(x.shape)} {x.dtype}")
    # DALI hands σ over on the host: to a GPU through pinned memory (no host sync, mscn.h2d)
    sigma = to_device(sigma.reshape(-1), x.device)
    if sigma.numel() != x.shape[0]:
        raise ValueError(f"{sigma.numel()} blur sigmas for a batch of {x.shape[0]}")
    if x.is_cuda:
        return _blur_all(x, sigma, radius, window)
    todo = (sigma > 0).nonzero().flatten()
    out = x.clone()
    if todo.numel():
        out[todo] = _blur_all(x[todo], sigma[todo], radius, window)
    return out


def _blur_all(x: torch.Tensor, sigma: torch.Tensor, radius: int, window: int) -> torch.Tensor:
    b, c, h, w = x.shape
    bw = blur_matrices(sigma, w, radius, window, x.dtype)
    bh_t = (bw if h == w else blur_matrices(sigma, h, radius, window, x.dtype)).transpose(-1, -2)
    # (B, C·H, W) @ (B, W, W) along the rows, then (B, H, H) @ (B, H, W) per channel: bmm on
    # views of x; a broadcast (B, 1, n, n) matmul would first copy each matrix C times
    rows = torch.bmm(x.reshape(b, c * h, w), bw).view(b, c, h, w)
    return torch.stack([torch.bmm(bh_t, rows[:, k]) for k in range(c)], 1)
