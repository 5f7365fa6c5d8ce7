"""Triton kernel of the MSCN mask fill (paper §5.2), one pass over memory.

One program masks a (4 * BLOCK_R) x BLOCK_W tile of one (sample, channel) plane, as
four sub-tiles of BLOCK_R rows. Per element it looks up the cell bit in the table's
bitmap (tens of KB at most, cache-resident) and, for noisy samples, draws N(0, 1) with Philox
(``tl.randn4x``: one call gives the four sub-tiles' noise, so no full-size random
tensor ever exists).

* In place, the kernel only *writes* the masked elements: the unmasked ones keep
  their bits without being read, so memory traffic is ~ratio of the view.
* Out of place, it reads every element once and writes it once.

Semantics are those of ``mask_reference.apply_table_reference`` for the same table.
Under ``TRITON_INTERPRET=1`` (set before import) the same kernel runs on CPU tensors.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from mscn.errors import MscnError
from mscn.maskspec import MaskTable


def _interpreted() -> bool:
    """Whether @triton.jit below builds for the CPU interpreter (decided at import)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones read the variable
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


INTERPRETED = _interpreted()


@dataclass
class Launch:
    """One kernel launch, built but not run: ``kernel[grid](*args, **kwargs)``.

    The host functions build their launches with pure functions (no device checks), so
    ``mscn.cuda_kernels.aot`` can compile exactly what they would launch, for a GPU
    target, on a machine without one.
    """

    kernel: Any  # a @triton.jit function
    grid: tuple
    args: tuple
    kwargs: dict

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ELEMS_PER_PROGRAM = 2048  # 8-16 elements per thread at 4 warps: enough bytes in flight


@triton.jit
def tile_noise(noisy, seed, c, H, W, h0, r, cols, noise_std,
               BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, NOISE: tl.constexpr):
    """The fill values of a tile's 4 sub-tiles: zeros, or for a noisy sample N(0, noise_std²)
    keyed by its Philox ``seed``. One ``tl.randn4x`` gives all four."""
    r0 = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    r1 = r0
    r2 = r0
    r3 = r0
    if NOISE:
        if noisy:
            # counter = index of the pixel in the first sub-tile: unique within the sample,
            # and the sample's own seed keys Philox, so no two elements share a draw
            counter = (c * H + h0 + r) * W + cols
            r0, r1, r2, r3 = tl.randn4x(seed, counter)
            r0 = r0 * noise_std
            r1 = r1 * noise_std
            r2 = r2 * noise_std
            r3 = r3 * noise_std
    return r0, r1, r2, r3


@triton.jit
def sub_tile(r0, r1, r2, r3, k: tl.constexpr):
    """Sub-tile ``k``'s fill values (``k`` is unrolled, so this costs nothing)."""
    if k == 0:
        fill = r0
    elif k == 1:
        fill = r1
    elif k == 2:
        fill = r2
    else:
        fill = r3
    return fill


@triton.jit
def write_sub_tile(x_plane, y_plane, y_ptr, rows, sxh, syh, inside, hit, fill, INPLACE: tl.constexpr):
    """Write one sub-tile: in place only the masked elements (the rest keep their bits
    unread); out of place every element, the fill where masked."""
    y = y_plane + rows.to(tl.int64) * syh
    if INPLACE:
        tl.store(y, fill.to(y_ptr.dtype.element_ty), mask=hit)
    else:
        v = tl.load(x_plane + rows.to(tl.int64) * sxh, mask=inside)
        tl.store(y, tl.where(hit, fill.to(v.dtype), v), mask=inside)


@triton.jit
def _mask_kernel(x_ptr, y_ptr, cells_ptr, offset_ptr, noise_ptr, seed_ptr,
                 C, H, W, nH, nW, tiles_w,
                 sxb, sxc, sxh, sxw, syb, syc, syh, syw, noise_std,
                 GRID: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
                 INPLACE: tl.constexpr, NOISE: tl.constexpr):
    plane = tl.program_id(0)  # b * C + c: planes on axis 0, which has no 65535 limit
    tile = tl.program_id(1)
    b = plane // C
    c = plane % C
    h0 = (tile // tiles_w) * (4 * BLOCK_R)
    r = tl.arange(0, BLOCK_R)[:, None]  # (BLOCK_R, 1): rows of one sub-tile
    cols = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]  # (1, BLOCK_W), contiguous
    dy = tl.load(offset_ptr + 2 * b)
    dx = tl.load(offset_ptr + 2 * b + 1)
    cell_col = (cols + dx) // GRID
    x_plane = x_ptr + b.to(tl.int64) * sxb + c.to(tl.int64) * sxc + cols * sxw
    y_plane = y_ptr + b.to(tl.int64) * syb + c.to(tl.int64) * syc + cols * syw

    # fill values of the 4 sub-tiles; the branch is per program, so clean samples skip Philox
    r0, r1, r2, r3 = tile_noise(tl.load(noise_ptr + b) != 0, tl.load(seed_ptr + b), c, H, W, h0, r, cols,
                                noise_std, BLOCK_R, BLOCK_W, NOISE)
    for k in tl.static_range(4):
        rows = h0 + k * BLOCK_R + r
        inside = (rows < H) & (cols < W)
        bit = tl.load(cells_ptr + (plane * nH + (rows + dy) // GRID) * nW + cell_col, mask=inside, other=0)
        write_sub_tile(x_plane, y_plane, y_ptr, rows, sxh, syh, inside, inside & (bit != 0),
                       sub_tile(r0, r1, r2, r3, k), INPLACE)


def _tile(width: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_W): the widest row segment that wastes the fewest lanes at the edge.

    Rows of >= 32 contiguous elements keep every load a whole 128-byte line (fp32);
    a tile is 4 sub-tiles of BLOCK_R rows, one per output of ``tl.randn4x``.
    """
    _, neg_w = min((-(-width // w) * w - width, -w) for w in (128, 64, 32))
    return _ELEMS_PER_PROGRAM // (-4 * neg_w), -neg_w


def kernel_unsupported(x: torch.Tensor) -> str | None:
    """Why the kernel cannot mask ``x`` here, or None if it can."""
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} (the kernel handles float32, float16, bfloat16)"
    if x.is_cuda and INTERPRETED:
        return "TRITON_INTERPRET=1 is set, the kernel was built for the CPU interpreter"
    if not x.is_cuda and not INTERPRETED:
        return "a CPU tensor (set TRITON_INTERPRET=1 before importing mscn.cuda_kernels to interpret the kernel)"
    if x.shape[1] * x.shape[2] * x.shape[3] >= 2**31:
        return "a sample of >= 2**31 elements (Philox counters are 32-bit)"
    return None


def apply_table_triton(x: torch.Tensor, table: MaskTable, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Mask ``x`` (B, C, H, W) into ``out`` (``x`` itself for in place; a new tensor if None).

    Any strides work (NCHW or channels-last); one launch per view; no host sync.
    """
    why = kernel_unsupported(x)
    if why:
        raise MscnError(f"the Triton mask kernel cannot run on {why}; use backend='torch'")
    if out is None:
        out = torch.empty_like(x)
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise MscnError(f"mask output {tuple(out.shape)} {out.dtype} on {out.device} does not match "
                        f"the view {tuple(x.shape)} {x.dtype} on {x.device}")
    table.check_view(x)
    # Triton launches on the *current* CUDA device: pin it to the view's device so callers
    # that never called torch.cuda.set_device (multi-GPU in one process) stay correct.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        fill_launch(x, out, table)()
    return out


def fill_launch(x: torch.Tensor, out: torch.Tensor, table: MaskTable) -> Launch:
    """The fill kernel's launch for view ``x`` into ``out`` (``x`` itself: in place)."""
    B, C, H, W = x.shape
    block_r, block_w = _tile(W)
    tiles_w = -(-W // block_w)
    _, _, nH, nW = table.cells.shape
    args = (x, out, table.cells.contiguous().view(torch.uint8), table.offset.contiguous(),
            table.noise.contiguous().view(torch.uint8), table.seed.contiguous(),
            C, H, W, nH, nW, tiles_w, *x.stride(), *out.stride(), table.noise_std)
    return Launch(_mask_kernel, (B * C, -(-H // (4 * block_r)) * tiles_w), args,
                  dict(GRID=table.grid, BLOCK_R=block_r, BLOCK_W=block_w, INPLACE=out is x,
                       NOISE=table.noise_std > 0, num_warps=4))
