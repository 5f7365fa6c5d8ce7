"""Triton kernel that draws the MSCN mask decision tables (paper §5.2): one launch for all
the views of a batch that share a size and grid (the view is the grid's second axis).

The torch sampler (``mscn.maskspec.sample_mask_table``) is vectorised but costs dozens
of small kernel launches per view (argsorts, comparisons, gathers): ~1 ms per view on
an H200, ten times the fill itself. This kernel makes the same decisions, with the
same distribution, from Philox counters inside one launch:

* one *row* is one (sample, channel) plane; a program takes ``BLOCK_S`` rows and
  the ``NCELL`` (power of two >= nH * nW) cells of each;
* per sample: grid offset, channel independence, noise flag and the fill kernel's
  Philox seed; per channel draw: the focal flag, the rectangle (aspect, top, left)
  and one 32-bit score per cell;
* "exactly k cells uniformly without replacement" = the k smallest scores: the row's
  keys ``score * NCELL + cell`` are unique (no ties), and a radix select over their
  bits finds the k-th smallest in ~40 compare-and-count passes over registers, no
  sort (``tl.sort``'s xor reductions also crawl under the CPU interpreter);
* a channel that shares its sample's mask reads channel 0's counters, so the shared
  draw is identical in every channel without communication between rows.

``k = round(ratio * n)`` needs float64 to round exactly as the torch sampler does,
so the host computes it for the (at most 2 x 2) grid sizes an offset can produce.
Every counter is distinct per (sample, purpose, channel, cell) and every view gets
its own Philox key, drawn from the caller's ``torch.Generator``: a seeded generator
reproduces the tables. Under ``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from mscn.config import MaskCfg
from mscn.maskspec import MaskTable

from mscn.cuda_kernels.mask_triton import INTERPRETED, Launch

MAX_CELLS = 4096  # per plane; a finer grid than that (e.g. 3 px cells at 224) uses the torch sampler
# rows x cells per program: on a GPU, what stays in registers; the CPU interpreter pays
# per program and per op, not per element, so it gets few, large programs. On sm_90,
# 4096 (64 rows x 64 cells, 8 warps) took all 255 registers and spilled 40 B per thread;
# 2048 at 8 elements per thread spills nothing at any grid from 4 to 4096 cells
# (``python -m mscn.cuda_kernels.aot``, ptxas -v; on an H200 the table kernel then drew the
# 4 x 256 tables in 0.164 ms, round 4 in docs/PERFORMANCE.md)
_ELEMS_PER_PROGRAM = 65536 if INTERPRETED else 2048
_ELEMS_PER_THREAD = 8


@triton.jit
def plane_decisions(key, b, c, C, H, W, nW, nh_min, nw_min, k00, k01, k10, k11,
                    p_focal, p_ind, p_noise, log_lo, log_hi,
                    GRID: tl.constexpr, RANDOM_OFFSET: tl.constexpr, NCELL: tl.constexpr, KEY_BITS: tl.constexpr):
    """Every mask decision of the planes (sample ``b``, channel ``c``), blocks of S planes.

    The one place that lays out the Philox counters. Returns
    per plane (S,): grid offset ``dy``, ``dx``, channel independence, noise flag, the
    noise's Philox seed, the focal flag and rectangle (``fh``, ``fw``, ``top``, ``left``,
    in cells), and (S, NCELL) ``picked``: the random cells, the k smallest keys, inside
    the cells that touch the image.
    """
    stride = 8 + C * (NCELL + 4)  # counters per sample: 8 per-sample, then per channel draw
    base = b * stride

    # per-sample draws (every channel of the sample computes the same values)
    if RANDOM_OFFSET:
        dy = tl.minimum((tl.rand(key, base + 0) * GRID).to(tl.int32), GRID - 1)
        dx = tl.minimum((tl.rand(key, base + 1) * GRID).to(tl.int32), GRID - 1)
    else:
        dy = b * 0
        dx = b * 0
    indep = tl.rand(key, base + 2) < p_ind
    noisy = tl.rand(key, base + 3) < p_noise
    hi = tl.randint(key, base + 4).to(tl.int64) & 0x3FFFFFFF
    lo = tl.randint(key, base + 5).to(tl.int64) & 0xFFFFFFFF
    fill_seed = (hi << 32) | lo

    nh = (H + dy + GRID - 1) // GRID  # cells per side that touch the image
    nw = (W + dx + GRID - 1) // GRID
    big_h = nh > nh_min
    big_w = nw > nw_min
    k = tl.where(big_h, tl.where(big_w, k11, k10), tl.where(big_w, k01, k00))  # (S,) int32

    # per channel draw: a shared mask reads channel 0's counters
    ch = tl.where(indep, c, 0)
    cbase = base + 8 + ch * (NCELL + 4)
    focal = tl.rand(key, cbase + NCELL) < p_focal
    aspect = tl.exp(log_lo + tl.rand(key, cbase + NCELL + 1) * (log_hi - log_lo))
    kf = k.to(tl.float32)
    # correctly rounded sqrt and division, as torch's: compiled, ``/`` and ``tl.sqrt`` are
    # approximate (div.full.f32, sqrt.approx.f32, up to 2 ulp), and ``floor(q + 0.5)`` sits
    # on a tie whenever k / fh is exactly x.5 (k=125, fh=10 at grid 8 and 224 px): an
    # approximate 12.4999995 would give a 12-cell side where the sampler's law says 13
    fh = tl.minimum(tl.maximum(tl.floor(tl.sqrt_rn(kf * aspect) + 0.5).to(tl.int32), 1), nh)
    fw = tl.minimum(tl.maximum(tl.floor(tl.div_rn(kf, fh.to(tl.float32)) + 0.5).to(tl.int32), 1), nw)
    fh = tl.where(k > 0, fh, 0)
    top = tl.floor(tl.rand(key, cbase + NCELL + 2) * (nh - fh + 1).to(tl.float32)).to(tl.int32)
    left = tl.floor(tl.rand(key, cbase + NCELL + 3) * (nw - fw + 1).to(tl.float32)).to(tl.int32)

    j = tl.arange(0, NCELL)[None, :]  # (1, N): cell index r * nW + q in the padded table
    valid = (j // nW < nh[:, None]) & (j % nW < nw[:, None])  # (S, N)
    score = tl.randint(key, cbase[:, None] + j).to(tl.int64) & 0xFFFFFFFF
    keys = tl.where(valid, score, 0x100000000) * NCELL + j  # unique; invalid cells rank last
    # radix select of the k-th smallest key, high bit first: ``kth`` ends as the largest
    # value with fewer than k keys below it, i.e. the k-th smallest key itself
    kth = (b * 0).to(tl.int64)
    one = kth + 1
    for bit in tl.static_range(KEY_BITS - 1, -1, -1):
        trial = kth | (one << bit)
        below = tl.sum((keys < trial[:, None]).to(tl.int32), axis=1)
        kth = tl.where(below < k, trial, kth)
    picked = (keys <= kth[:, None]) & (k[:, None] > 0) & valid
    return dy, dx, indep, noisy, fill_seed, focal, fh, fw, top, left, picked


@triton.jit
def _table_kernel(key_ptr, kpar_ptr, fpar_ptr, cells_ptr, offset_ptr, noise_ptr, seed_ptr, focal_ptr, indep_ptr,
                  rows_total, C, H, W, nH, nW, nh_min, nw_min,
                  GRID: tl.constexpr, RANDOM_OFFSET: tl.constexpr,
                  BLOCK_S: tl.constexpr, NCELL: tl.constexpr, KEY_BITS: tl.constexpr):
    # axis 1 = the view: every view of a batch is drawn by the same launch, each with its
    # own Philox key and its own mask config (asymmetric masking, paper §5.2)
    v = tl.program_id(1)
    key = tl.load(key_ptr + v)
    k00 = tl.load(kpar_ptr + 4 * v)  # cells to mask for the 2 x 2 grid sizes an offset can give
    k01 = tl.load(kpar_ptr + 4 * v + 1)
    k10 = tl.load(kpar_ptr + 4 * v + 2)
    k11 = tl.load(kpar_ptr + 4 * v + 3)
    p_focal = tl.load(fpar_ptr + 5 * v)
    p_ind = tl.load(fpar_ptr + 5 * v + 1)
    p_noise = tl.load(fpar_ptr + 5 * v + 2)
    log_lo = tl.load(fpar_ptr + 5 * v + 3)
    log_hi = tl.load(fpar_ptr + 5 * v + 4)
    # this view's slice of the outputs (rows_total = B * C rows per view)
    B = rows_total // C
    cells_ptr += v.to(tl.int64) * rows_total * nH * nW
    offset_ptr += v * 2 * B
    noise_ptr += v * B
    seed_ptr += v * B
    focal_ptr += v * rows_total
    indep_ptr += v * B
    row = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)  # (S,) = b * C + c
    live = row < rows_total
    b = row // C
    c = row % C
    dy, dx, indep, noisy, fill_seed, focal, fh, fw, top, left, picked = plane_decisions(
        key, b, c, C, H, W, nW, nh_min, nw_min, k00, k01, k10, k11, p_focal, p_ind, p_noise, log_lo, log_hi,
        GRID, RANDOM_OFFSET, NCELL, KEY_BITS)
    j = tl.arange(0, NCELL)[None, :]  # (1, N): cell index r * nW + q in the padded table
    r = j // nW
    q = j % nW
    in_rect = ((r >= top[:, None]) & (r < (top + fh)[:, None])
               & (q >= left[:, None]) & (q < (left + fw)[:, None]))
    cells = tl.where(focal[:, None], in_rect, picked)

    tl.store(cells_ptr + row[:, None].to(tl.int64) * (nH * nW) + j, cells.to(tl.uint8),
             mask=live[:, None] & (j < nH * nW))
    tl.store(focal_ptr + row, focal.to(tl.uint8), mask=live)
    first = live & (c == 0)
    tl.store(offset_ptr + 2 * b, dy, mask=first)
    tl.store(offset_ptr + 2 * b + 1, dx, mask=first)
    tl.store(indep_ptr + b, indep.to(tl.uint8), mask=first)
    tl.store(noise_ptr + b, noisy.to(tl.uint8), mask=first)
    tl.store(seed_ptr + b, fill_seed, mask=first)


def table_shape(height: int, width: int, cfg: MaskCfg) -> tuple[int, int]:
    """(nH, nW): rows and columns of the padded table (room for the largest offset grid)."""
    span = cfg.grid - 1 if cfg.random_offset else 0
    return -(-(height + span) // cfg.grid), -(-(width + span) // cfg.grid)


def kernel_supports(height: int, width: int, cfg: MaskCfg) -> bool:
    nH, nW = table_shape(height, width, cfg)
    return nH * nW <= MAX_CELLS


def _cell_count_k(ratio: float, n: int) -> int:
    """round(ratio * n), halves up, in float64: the torch sampler's rule exactly."""
    return math.floor(ratio * n + 0.5)


def group_key(height: int, width: int, cfg: MaskCfg) -> tuple:
    """Views whose tables one launch can draw share this: the launch's compile-time shape."""
    return (height, width, cfg.grid, bool(cfg.random_offset))


# per-view parameters as device tensors, by (device, configs, shape): they are the same at
# every step, and building them anew would be a host-to-device copy from pageable memory,
# which waits for the stream (a host sync per batch)
_PARAMS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _build_params(dev: torch.device, height: int, width: int, cfgs: Sequence[MaskCfg]):
    kpar, fpar = [], []
    for cfg in cfgs:
        g = cfg.grid
        nh_min, nw_min = -(-height // g), -(-width // g)
        kpar += [_cell_count_k(cfg.ratio, (nh_min + i) * (nw_min + j)) for i in (0, 1) for j in (0, 1)]
        fpar += [float(cfg.p_focal), float(cfg.p_ind), float(cfg.p_noise), *(math.log(a) for a in cfg.focal_aspect)]
    return (torch.tensor(kpar, dtype=torch.int32).to(dev), torch.tensor(fpar, dtype=torch.float32).to(dev))


def _view_params(dev: torch.device, height: int, width: int, cfgs: Sequence[MaskCfg]):
    # by value: MaskCfg is a mutable dataclass (unhashable), and a changed config must miss
    key = (str(dev), height, width, tuple((c.ratio, c.grid, c.p_focal, c.p_ind, c.p_noise, tuple(c.focal_aspect))
                                          for c in cfgs))
    if key in _PARAMS:
        return _PARAMS[key]
    params = _build_params(dev, height, width, cfgs)
    # bounded: a sweep over many configs must not grow it forever. Entries are never
    # dropped (a launch on another stream may still read them); past the bound the
    # parameters are built per call (a host sync, for that odd case only)
    if len(_PARAMS) < 64:
        _PARAMS[key] = params
    return params


def sample_mask_tables_triton(batch: int, channels: int, height: int, width: int, cfgs: Sequence[MaskCfg],
                              keys: torch.Tensor) -> list[MaskTable]:
    """The :class:`MaskTable` of every view in ``cfgs``, drawn by **one** launch on
    ``keys``' device; view ``i`` uses Philox key ``keys[i]``.

    ``keys``: int64, one element per view (drawn from the caller's generator, so no host
    sync is needed to pass them). The views must share :func:`group_key` (size, grid,
    random offset); ratios and probabilities may differ per view. The tables' semantics
    are those of ``mscn.maskspec.sample_mask_table``; only the random stream differs, and
    view ``i``'s table is the one a launch for that view alone would draw with ``keys[i]``.
    """
    if not cfgs:
        return []
    groups = {group_key(height, width, c) for c in cfgs}
    if len(groups) != 1:
        raise ValueError(f"one launch draws views of one grid and offset rule, got {sorted(groups)}")
    if keys.numel() != len(cfgs):
        raise ValueError(f"{len(cfgs)} views need {len(cfgs)} keys, got {keys.numel()}")
    dev = keys.device
    launch, tables = table_launch(batch, channels, height, width, cfgs, keys)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        launch()
    return tables


def table_launch(batch: int, channels: int, height: int, width: int, cfgs: Sequence[MaskCfg],
                 keys: torch.Tensor) -> tuple[Launch, list[MaskTable]]:
    """The table kernel's launch and the tables it will fill (allocated on ``keys``' device)."""
    dev, cfg0, nv = keys.device, cfgs[0], len(cfgs)
    g = cfg0.grid
    nH, nW = table_shape(height, width, cfg0)
    ncell = triton.next_power_of_2(nH * nW)
    nh_min, nw_min = -(-height // g), -(-width // g)
    kpar, fpar = _view_params(dev, height, width, cfgs)
    cells = torch.empty(nv, batch, channels, nH, nW, dtype=torch.bool, device=dev)
    offset = torch.empty(nv, batch, 2, dtype=torch.int32, device=dev)
    noise = torch.empty(nv, batch, dtype=torch.bool, device=dev)
    seed = torch.empty(nv, batch, dtype=torch.int64, device=dev)
    focal = torch.empty(nv, batch, channels, dtype=torch.bool, device=dev)
    indep = torch.empty(nv, batch, dtype=torch.bool, device=dev)
    block_s = max(1, _ELEMS_PER_PROGRAM // ncell)
    rows = batch * channels
    launch = Launch(_table_kernel, (triton.cdiv(rows, block_s), nv),
                    (keys.reshape(-1), kpar, fpar, cells.view(torch.uint8), offset, noise.view(torch.uint8), seed,
                     focal.view(torch.uint8), indep.view(torch.uint8), rows, channels, height, width, nH, nW,
                     nh_min, nw_min),
                    dict(GRID=g, RANDOM_OFFSET=bool(cfg0.random_offset), BLOCK_S=block_s, NCELL=ncell,
                         KEY_BITS=33 + ncell.bit_length() - 1,
                         num_warps=min(16, max(4, ncell * block_s // (32 * _ELEMS_PER_THREAD)))))
    return launch, [MaskTable(cells=cells[i], offset=offset[i], noise=noise[i], seed=seed[i], focal=focal[i],
                              independent=indep[i], grid=g, noise_std=float(cfg.noise_std), height=height,
                              width=width)
                    for i, cfg in enumerate(cfgs)]


def sample_mask_table_triton(batch: int, channels: int, height: int, width: int, cfg: MaskCfg,
                             key: torch.Tensor) -> MaskTable:
    """One view's :class:`MaskTable`, drawn on ``key``'s device with Philox key ``key[0]``."""
    return sample_mask_tables_triton(batch, channels, height, width, [cfg], key.reshape(-1)[:1])[0]
