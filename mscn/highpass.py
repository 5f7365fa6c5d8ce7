"""The high-pass filter of MSCN, shared by every stage: ``x - GaussianBlur(x, sigma)``.

Paper §5.1: zero then means "no information" and a zero-valued mask blends in; §5.3: the
filter runs after normalization; σ=5 (§5.1, App. B). This module is the one specification
of that filter:

- :func:`gaussian_kernel`: the 1-D weights, ``exp(-t²/2σ²)`` for ``t`` in
  ``[-r, r]`` with ``r = (window-1)/2``, normalized to sum 1. DALI's
  ``fn.gaussian_blur`` uses the same weights (window 0 there means ``2*ceil(3σ)+1``,
  like :func:`highpass_window`).
- **Border mode: reflect-101** (mirror about the edge pixel without repeating it,
  ``dcb|abcd|cba``). It is DALI's border for ``fn.gaussian_blur``, torch's
  ``F.pad(mode="reflect")`` and scipy's ``mode="mirror"``. Because a reflection
  reproduces a constant image, ``blur(c) = c``; normalization is a per-channel affine
  map, hence ``hp(norm(x)) = hp(x) / std`` exactly, borders included.
- :func:`highpass_torch`: the readable reference (separable convolution).
- :func:`highpass_matmul`: the same filter as two banded matrix products,
  ``x - Bᵀ x B``, with the border folded into ``B``. Dense GEMM wastes zeros but
  BLAS runs it ~6x faster than a direct 31-tap convolution on a CPU core, so the CPU
  path of the pipeline uses it (docs/PIPELINE.md).
- :func:`highpass_reference_f64`: float64 scipy reference for the tests.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from mscn.config_schema import HighPassCfg


def highpass_window(sigma: float, window: int = 0) -> int:
    """Odd Gaussian window of the high-pass (paper §5.1): ``window`` if set, else
    2*ceil(3*sigma)+1, i.e. 31 taps for the paper's sigma=5. Returns the window (int)."""
    return window if window else 2 * math.ceil(3.0 * sigma) + 1


def highpass_params(h: HighPassCfg) -> tuple[float, int] | None:
    """Returns (sigma, window) of the configured high-pass (paper §5.1), or None when it
    is switched off (the "masks without high-pass" ablation, §5.1)."""
    return (h.sigma, highpass_window(h.sigma, h.window)) if h.enabled else None


def gaussian_kernel(sigma: float, window: int) -> np.ndarray:
    """Normalized float64 Gaussian weights of odd length ``window``."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be odd and >= 1, got {window}")
    r = (window - 1) // 2
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(t * t) / (2.0 * sigma * sigma))
    return k / k.sum()


def reflect101_index(n: int, pad: int) -> np.ndarray:
    """Source index of each position of ``[-pad, n + pad)`` under reflect-101.

    Works for any ``pad`` (DALI reflects again past the far edge when the window is
    wider than the image; torch's ``F.pad`` refuses ``pad >= n``).
    """
    i = np.arange(-pad, n + pad)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.mod(i, period)
    return np.where(i < n, i, period - i)


def _blur_axis(x: torch.Tensor, k: torch.Tensor, dim: int) -> torch.Tensor:
    """1-D convolution of NCHW ``x`` along ``dim`` (-1: W, -2: H) with reflect-101 borders."""
    r, c = (k.numel() - 1) // 2, x.shape[1]
    idx = torch.as_tensor(reflect101_index(x.shape[dim], r), device=x.device)
    taps = (1, -1) if dim == -1 else (-1, 1)
    weight = k.to(x.dtype).view(1, 1, *taps).expand(c, 1, *k.view(*taps).shape)
    return F.conv2d(x.index_select(dim, idx), weight, groups=c)


def highpass_torch(x: torch.Tensor, sigma: float, window: int) -> torch.Tensor:
    """The high-pass of paper §5.1 on a normalized NCHW float batch: returns ``x - blur(x)``
    (same shape and dtype), with a separable Gaussian and reflect-101 borders as DALI's.

    The torch reference, within 1e-5 (relative) of :func:`highpass_reference_f64` in the
    tests; the GPU tests hold DALI's high-pass against it."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"highpass_torch expects a float NCHW tensor, got {tuple(x.shape)} {x.dtype}")
    k = torch.as_tensor(gaussian_kernel(sigma, window), dtype=torch.float32, device=x.device)
    return x - _blur_axis(_blur_axis(x, k, -1), k, -2)


@functools.lru_cache(maxsize=16)
def _blur_matrix_cpu(n: int, sigma: float, window: int) -> torch.Tensor:
    k = gaussian_kernel(sigma, window)
    return torch.from_numpy(np.tensordot(k, reflect101_shifts(n, (window - 1) // 2), 1)).float()


def reflect101_shifts(n: int, radius: int) -> np.ndarray:
    """(2r+1, n, n) float64: ``P[j][src, out] = 1`` where output ``out`` reads source ``src``
    at tap ``j - r`` under reflect-101 (several taps may land on one source on tiny images).
    A filter with taps ``k`` along the last axis is the matrix ``Σ_j k[j] P[j]``: the
    high-pass's ``B`` here, each sample's blur matrix in mscn/blur.py."""
    src = reflect101_index(n, radius)
    p = np.zeros((2 * radius + 1, n, n), dtype=np.float64)
    taps, outs = np.meshgrid(np.arange(2 * radius + 1), np.arange(n), indexing="ij")
    np.add.at(p, (taps, src[outs + taps], outs), 1.0)
    return p


def blur_matrix(n: int, sigma: float, window: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``B`` (n x n) with ``(x @ B)[..., j] = blur(x)[..., j]`` along the last axis.

    Cached per (size, σ, window, device, dtype): on a GPU the loader filters every batch,
    and a fresh host-to-device copy of ``B`` per batch would stall on pageable memory."""
    return _blur_matrix_on(n, float(sigma), int(window), str(torch.device(device or "cpu")), dtype)


@functools.lru_cache(maxsize=32)
def _blur_matrix_on(n: int, sigma: float, window: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    return _blur_matrix_cpu(n, sigma, window).to(device=device, dtype=dtype)


def highpass_matmul(x: torch.Tensor, sigma: float, window: int) -> torch.Tensor:
    """The high-pass of paper §5.1 as two matmuls: returns ``x - Bₕᵀ x B_w`` (same shape and
    dtype), equal to :func:`highpass_torch` to float32 rounding.

    The loader runs it this way on the GPU (``highpass.where=loader``; round 4's figures
    in docs/PERFORMANCE.md), with the blur matrices cached per size and device."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"highpass_matmul expects a float NCHW tensor, got {tuple(x.shape)} {x.dtype}")
    h, w = x.shape[-2:]
    bw = blur_matrix(w, sigma, window, x.device, x.dtype)
    bh = bw if h == w else blur_matrix(h, sigma, window, x.device, x.dtype)
    return x - torch.matmul(bh.t(), torch.matmul(x, bw))


def highpass_reference_f64(img: np.ndarray, sigma: float, window: int, channel_axis: int = -1) -> np.ndarray:
    """The float64 ground truth of the high-pass (paper §5.1): returns
    ``img - gaussian_filter(img)`` (scipy, ``mode="mirror"`` = reflect-101) as float64.

    ``img`` is HWC (``channel_axis=-1``) or CHW (``channel_axis=0``); channels are
    filtered independently. scipy is a test dependency, imported here only.
    """
    from scipy.ndimage import gaussian_filter

    x = np.asarray(img, dtype=np.float64)
    sig = [float(sigma)] * x.ndim
    sig[channel_axis] = 0.0
    r = (window - 1) // 2
    # scipy's radius is int(truncate * sigma + 0.5): truncate = r / sigma gives exactly r
    blurred = gaussian_filter(x, sigma=sig, mode="mirror", truncate=r / sigma)
    return x - blurred

