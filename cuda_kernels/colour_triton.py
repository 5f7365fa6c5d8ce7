"""Triton kernel of the loader's colour step (paper App. A.1; ``mscn.colour``), one pass.

One program handles ``BLOCK`` output pixels of one sample. It maps the sample's ten
uniforms to its flags and factors (``mscn.colour.ColourLaw``; the first program of each
sample also writes the blur's σ for the loader), reads each pixel's three uint8 channels
from the HWC crop, from the mirrored column where the flip flag is set, builds the
sample's jitter matrix (a few dozen scalar flops, so no matrix ever goes through memory
and the step is one launch per view), applies the
jitter and the grayscale where their flags are set, each rounded and clamped to uint8 as
DALI's ``fn.color_twist`` does, then writes ``(x - mean) / std`` in CHW and the output
dtype: DALI's ``crop_mirror_normalize`` pass is folded in too. Memory traffic: 3 bytes
read and 3 values written per pixel.

Semantics are those of ``mscn.colour.params_from_draws`` followed by
``mscn.colour.colour_reference``. Under ``TRITON_INTERPRET=1``
(set before import) the same kernel runs on CPU tensors, which is how CI tests it.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from mscn.colour import DRAWS, HALF_RANGE, RGB2YIQ, YIQ2RGB, ColourLaw
from mscn.cuda_kernels.mask_triton import INTERPRETED, Launch
from mscn.errors import MscnError

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024  # pixels per program: 3 KB read, 6-12 KB written; 49 programs per 224² sample
# the kernel's a.. and q.. arguments: DALI's YIQ matrices, row by row
_YIQ_ARGS = tuple(float(v) for row in YIQ2RGB for v in row) + tuple(float(v) for row in RGB2YIQ for v in row)


@triton.jit
def _round_sat(v):
    # DALI's ConvertSat<uint8> on its CPU: half away from zero (v >= 0 past the clamp), clamp
    return tl.minimum(tl.maximum(tl.floor(v + 0.5), 0.0), 255.0)


@triton.jit
def _colour_kernel(x_ptr, u_ptr, out_ptr, sigma_ptr, hw, width,
                   mean0, mean1, mean2, inv0, inv1, inv2,
                   a00, a01, a02, a10, a11, a12, a20, a21, a22,
                   q00, q01, q02, q10, q11, q12, q20, q21, q22,
                   deg2rad, half_range,
                   p_jit, b_lo, b_span, c_lo, c_span, s_lo, s_span, h_lo, h_span, p_gray, p_flip, p_blur,
                   sg_lo, sg_span,
                   NDRAW: tl.constexpr, BLOCK: tl.constexpr):
    # a = YIQ2RGB, q = RGB2YIQ (DALI's constants, passed in so that they live in one place)
    b = tl.program_id(0).to(tl.int64)  # the batch on axis 0: no 65,535 limit there
    pid = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    keep = offs < hw
    base = b * 3 * hw  # the same for the HWC crop and the CHW view: 3 values per pixel

    # the sample's uniforms -> its flags (u < p) and factors (lo + span u): ColourLaw
    up = u_ptr + b * NDRAW
    on = tl.load(up + 0) < p_jit
    bri = b_lo + b_span * tl.load(up + 1)
    con = c_lo + c_span * tl.load(up + 2)
    sat = s_lo + s_span * tl.load(up + 3)
    hue = (h_lo + h_span * tl.load(up + 4)) * deg2rad
    gon = tl.load(up + 5) < p_gray
    flip = tl.load(up + 6) < p_flip
    # the blur's σ for the loader's blur: one program per sample writes it
    sigma = tl.where(tl.load(up + 7) < p_blur, sg_lo + sg_span * tl.load(up + 8), 0.0)
    tl.store(sigma_ptr + b, sigma, mask=pid == 0)

    # the flip: read column width-1-w of the crop for output column w
    row = offs // width
    col = offs - row * width
    col = tl.where(flip, width - 1 - col, col)
    src = x_ptr + base + (row * width + col) * 3
    r = tl.load(src, mask=keep, other=0).to(tl.float32)
    g = tl.load(src + 1, mask=keep, other=0).to(tl.float32)
    bl = tl.load(src + 2, mask=keep, other=0).to(tl.float32)

    ch = tl.cos(hue)
    sh = tl.sin(hue)
    # M = (b c · YIQ2RGB) · Hue · Sat · RGB2YIQ, in DALI's order of products. Hue · Sat has
    # rows (1, 0, 0), (0, s cos, s sin), (0, -s sin, s cos); T = (b c · YIQ2RGB) · Hue · Sat
    k = bri * con
    t00 = k * a00
    t01 = k * a01 * sat * ch - k * a02 * sat * sh
    t02 = k * a01 * sat * sh + k * a02 * sat * ch
    t10 = k * a10
    t11 = k * a11 * sat * ch - k * a12 * sat * sh
    t12 = k * a11 * sat * sh + k * a12 * sat * ch
    t20 = k * a20
    t21 = k * a21 * sat * ch - k * a22 * sat * sh
    t22 = k * a21 * sat * sh + k * a22 * sat * ch
    m00 = t00 * q00 + t01 * q10 + t02 * q20
    m01 = t00 * q01 + t01 * q11 + t02 * q21
    m02 = t00 * q02 + t01 * q12 + t02 * q22
    m10 = t10 * q00 + t11 * q10 + t12 * q20
    m11 = t10 * q01 + t11 * q11 + t12 * q21
    m12 = t10 * q02 + t11 * q12 + t12 * q22
    m20 = t20 * q00 + t21 * q10 + t22 * q20
    m21 = t20 * q01 + t21 * q11 + t22 * q21
    m22 = t20 * q02 + t21 * q12 + t22 * q22
    off = (half_range - half_range * con) * bri

    r1 = tl.where(on, _round_sat(m00 * r + m01 * g + m02 * bl + off), r)
    g1 = tl.where(on, _round_sat(m10 * r + m11 * g + m12 * bl + off), g)
    b1 = tl.where(on, _round_sat(m20 * r + m21 * g + m22 * bl + off), bl)
    # grayscale: saturation 0, so every row of the matrix is YIQ2RGB[i][0] · RGB2YIQ[0]
    y0 = _round_sat(a00 * (q00 * r1 + q01 * g1 + q02 * b1))
    y1 = _round_sat(a10 * (q00 * r1 + q01 * g1 + q02 * b1))
    y2 = _round_sat(a20 * (q00 * r1 + q01 * g1 + q02 * b1))
    r2 = tl.where(gon, y0, r1)
    g2 = tl.where(gon, y1, g1)
    b2 = tl.where(gon, y2, b1)

    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + base + offs, ((r2 - mean0) * inv0).to(ty), mask=keep)
    tl.store(out_ptr + base + hw + offs, ((g2 - mean1) * inv1).to(ty), mask=keep)
    tl.store(out_ptr + base + 2 * hw + offs, ((b2 - mean2) * inv2).to(ty), mask=keep)


def kernel_unsupported(x: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot take ``x`` (None: it can)."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[3] != 3:
        return f"{tuple(x.shape)} {x.dtype} (needs uint8 (B, H, W, 3))"
    if x.is_cuda and INTERPRETED:
        return "a CUDA tensor: TRITON_INTERPRET=1 is set, the kernel was built for the CPU interpreter"
    if not x.is_cuda and not INTERPRETED:
        return "a CPU tensor (set TRITON_INTERPRET=1 before importing mscn.cuda_kernels to interpret the kernel)"
    if not x.is_contiguous():
        return "a non-contiguous view"
    if dtype not in DTYPES:
        return f"output dtype {dtype}"
    return None


def colour_launch(x: torch.Tensor, draws: torch.Tensor, law: ColourLaw, out: torch.Tensor, sigma: torch.Tensor,
                  mean, std) -> Launch:
    """The launch that fills ``out`` and ``sigma`` (pure: no device checks, for
    mscn.cuda_kernels.aot too)."""
    b, h, w, _ = x.shape
    hw = h * w
    args = (x, draws, out, sigma, hw, w, *(float(m) for m in mean), *(1.0 / float(s) for s in std),
            *_YIQ_ARGS, math.pi / 180.0, HALF_RANGE, *law.constants())
    return Launch(_colour_kernel, (b, triton.cdiv(hw, BLOCK)), args, {"NDRAW": len(DRAWS), "BLOCK": BLOCK})


def colour_triton(x: torch.Tensor, draws: torch.Tensor, law: ColourLaw, mean, std,
                  dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``mscn.colour.params_from_draws`` then ``colour_reference``, as one kernel launch:
    uint8 (B, H, W, 3) crops ``x`` -> ((B, 3, H, W) views in ``dtype``, (B,) float32 σ).
    ``draws``: (B, 10) float32 on ``x``'s device."""
    why = kernel_unsupported(x, dtype)
    if why is not None:
        raise MscnError(f"colour kernel: cannot take {why}")
    if draws.device != x.device or draws.dtype != torch.float32 or not draws.is_contiguous():
        raise MscnError(f"colour kernel: draws must be contiguous float32 on {x.device}, "
                        f"got {draws.dtype} on {draws.device}")
    b, h, w, _ = x.shape
    out = torch.empty((b, 3, h, w), dtype=dtype, device=x.device)
    sigma = torch.empty((b,), dtype=torch.float32, device=x.device)
    if x.numel():
        # Triton launches on the current device: make it x's (a process that never called
        # torch.cuda.set_device, with views on another GPU), as the mask kernels do
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            colour_launch(x, draws, law, out, sigma, mean, std)()
    return out, sigma
