"""Triton kernel that draws the MSCN mask decisions *inside* the fill (paper §5.2): one
launch per view, no decision table in memory.

``apply_masks`` on the GPU otherwise makes two passes of launches: the table kernel
(mask_tables_triton.py) writes every view's decision table, and the fill kernel
(mask_triton.py) reads it back. The fill runs at ~1.2x a device copy; what is left of the
mask step's time is the host work around the tables (allocating them, launching, slicing
them per view). Here every fill program recomputes its own (sample, channel) plane's
decisions with the table kernel's own ``plane_decisions`` (same Philox counters):

* the per-sample draws (grid offset, channel independence, noise flag, the noise's
  Philox seed) and the per-channel draws (focal flag, rectangle) are a few scalars;
* the random cells: the plane's ``NCELL`` scores, the same radix select of the k-th
  smallest key, and the picked cells folded into one 64-bit word, so that an element's
  cell bit is a shift (hence ``NCELL <= 64``: the 224 px / 32 px grid is 8 x 8 = 64).

Same key and counters as the table kernel, so the masks equal, bit for bit, those of
``sample_mask_tables_triton`` + ``apply_table_triton`` with the same key (tested), and a
caller that wants the tables (``return_masks``) draws them with that key. Under
``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from mscn.config import MaskCfg
from mscn.cuda_kernels.mask_tables_triton import _cell_count_k, plane_decisions, table_shape
from mscn.cuda_kernels.mask_triton import Launch, _tile, kernel_unsupported, sub_tile, tile_noise, write_sub_tile
from mscn.errors import MscnError

MAX_FUSED_CELLS = 64  # the picked cells of a plane fit one int64


@triton.jit
def _fused_kernel(x_ptr, y_ptr, key_ptr, v, C, H, W, nW, tiles_w, nh_min, nw_min, k00, k01, k10, k11,
                  sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                  p_focal, p_ind, p_noise, log_lo, log_hi, noise_std,
                  GRID: tl.constexpr, RANDOM_OFFSET: tl.constexpr, NCELL: tl.constexpr, KEY_BITS: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, INPLACE: tl.constexpr, NOISE: tl.constexpr):
    plane = tl.program_id(0)  # b * C + c
    tile = tl.program_id(1)
    b = plane // C
    c = plane % C
    key = tl.load(key_ptr + v)
    # --- the decisions: the table kernel's own helper, for this one plane (a block of 1) ----
    one_plane = tl.zeros([1], dtype=tl.int32)
    dy1, dx1, _, noisy1, seed1, focal1, fh1, fw1, top1, left1, picked = plane_decisions(
        key, one_plane + b, one_plane + c, C, H, W, nW, nh_min, nw_min, k00, k01, k10, k11,
        p_focal, p_ind, p_noise, log_lo, log_hi, GRID, RANDOM_OFFSET, NCELL, KEY_BITS)
    # the block of 1 as scalars, and the picked cells as the bits of one int64
    dy = tl.sum(dy1, axis=0)
    dx = tl.sum(dx1, axis=0)
    noisy = tl.sum(noisy1.to(tl.int32), axis=0) != 0
    fill_seed = tl.sum(seed1, axis=0)
    focal = tl.sum(focal1.to(tl.int32), axis=0) != 0
    fh = tl.sum(fh1, axis=0)
    fw = tl.sum(fw1, axis=0)
    top = tl.sum(top1, axis=0)
    left = tl.sum(left1, axis=0)
    j = tl.arange(0, NCELL)[None, :].to(tl.int64)
    bits = tl.sum(tl.sum(tl.where(picked, (j * 0 + 1) << j, 0), axis=1), axis=0)

    # --- the fill: mask_triton._mask_kernel's tile loop, with the cell bit from ``bits`` -------
    h0 = (tile // tiles_w) * (4 * BLOCK_R)
    r = tl.arange(0, BLOCK_R)[:, None]
    cols = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    ccol = (cols + dx) // GRID
    col_in = (ccol >= left) & (ccol < left + fw)
    x_plane = x_ptr + b.to(tl.int64) * sxb + c.to(tl.int64) * sxc + cols * sxw
    y_plane = y_ptr + b.to(tl.int64) * syb + c.to(tl.int64) * syc + cols * syw
    r0, r1, r2, r3 = tile_noise(noisy, fill_seed, c, H, W, h0, r, cols, noise_std, BLOCK_R, BLOCK_W, NOISE)
    for s in tl.static_range(4):
        rows = h0 + s * BLOCK_R + r
        inside = (rows < H) & (cols < W)
        crow = (rows + dy) // GRID
        cell = tl.minimum(crow * nW + ccol, 63).to(tl.int64)  # (only rows past H reach 64: masked off)
        in_rect = (crow >= top) & (crow < top + fh) & col_in
        hit = inside & tl.where(focal, in_rect, ((bits >> cell) & 1) != 0)
        write_sub_tile(x_plane, y_plane, y_ptr, rows, sxh, syh, inside, hit, sub_tile(r0, r1, r2, r3, s), INPLACE)


def fused_supports(x: torch.Tensor, cfg: MaskCfg) -> bool:
    """Whether :func:`apply_mask_fused` can take this view: the kernel's dtypes and device,
    and a padded table of at most 64 cells."""
    nH, nW = table_shape(x.shape[2], x.shape[3], cfg)
    return kernel_unsupported(x) is None and triton.next_power_of_2(nH * nW) <= MAX_FUSED_CELLS


def apply_mask_fused(x: torch.Tensor, cfg: MaskCfg, keys: torch.Tensor, v: int, *,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Mask view ``x`` (B, C, H, W) with the decisions the table kernel would draw with key
    ``keys[v]``, computed inside the fill: one launch, no table, no host sync.

    ``out``: ``x`` itself for in place, a new tensor if None.
    """
    if not fused_supports(x, cfg):
        raise MscnError(f"the fused mask kernel cannot take a {tuple(x.shape)} {x.dtype} view on {x.device} "
                        f"with grid {cfg.grid} (at most {MAX_FUSED_CELLS} cells); use apply_masks")
    if out is None:
        out = torch.empty_like(x)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        fused_launch(x, out, cfg, keys, v)()
    return out


def fused_launch(x: torch.Tensor, out: torch.Tensor, cfg: MaskCfg, keys: torch.Tensor, v: int) -> Launch:
    """The fused kernel's launch for view ``x`` into ``out`` (``x`` itself: in place)."""
    B, C, H, W = x.shape
    g = cfg.grid
    nH, nW = table_shape(H, W, cfg)
    ncell = triton.next_power_of_2(nH * nW)
    nh_min, nw_min = -(-H // g), -(-W // g)
    ks = [_cell_count_k(cfg.ratio, (nh_min + i) * (nw_min + j)) for i in (0, 1) for j in (0, 1)]
    lo, hi = (math.log(a) for a in cfg.focal_aspect)
    block_r, block_w = _tile(W)
    tiles_w = -(-W // block_w)
    return Launch(_fused_kernel, (B * C, -(-H // (4 * block_r)) * tiles_w),
                  (x, out, keys, v, C, H, W, nW, tiles_w, nh_min, nw_min, *ks, *x.stride(), *out.stride(),
                   float(cfg.p_focal), float(cfg.p_ind), float(cfg.p_noise), lo, hi, float(cfg.noise_std)),
                  dict(GRID=g, RANDOM_OFFSET=bool(cfg.random_offset), NCELL=ncell, KEY_BITS=33 + ncell.bit_length() - 1,
                       BLOCK_R=block_r, BLOCK_W=block_w, INPLACE=out is x, NOISE=cfg.noise_std > 0, num_warps=4))
