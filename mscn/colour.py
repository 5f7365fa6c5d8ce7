"""The views' colour jitter and grayscale (paper App. A.1, SimCLR/BYOL's "ColorJitter" and
"RandomGrayscale") applied by the loader instead of DALI (``data.colour_where=loader``).

Why: the pipeline's colour stage is where it loses. On an H200 decode + crop + flip +
normalize ran at 81 % of decode-only and adding the colour, grayscale and blur stages
dropped it to 22-30 % (docs/perf/HISTORY.md, round 1); the pipeline alone is host-bound
(its GPU was busy 9.5 of 22.1 ms per batch in round 4). Moved here, DALI only decodes
and crops, and hands over the uint8 HWC crop and ten uniforms per sample (:data:`DRAWS`); one kernel per
view then flips, colours, grays, normalizes and transposes it to CHW in one pass.

The same arithmetic as DALI's ``fn.color_twist`` (``ColorTwistBase::DetermineTransformation``
in DALI's source): per sample a 3x3 matrix and an offset,

    M = b · c · YIQ2RGB · Hue(h) · Sat(s) · RGB2YIQ,   offset = (128 - 128 c) · b,

with DALI's YIQ constants (:data:`RGB2YIQ`, :data:`YIQ2RGB`), the result rounded and
clamped to uint8; grayscale is the same op with saturation 0 (Y = 0.299 R + 0.587 G +
0.114 B, scaled by YIQ2RGB's first column, 0.9997-1.0028, per channel), rounded again;
then ``(x - mean) / std``. Contrast is taken around 128, not the image mean
(docs/PIPELINE.md). Rounding is half away from zero, as DALI's CPU operator's
(``std::round``; its GPU operator rounds half to even). A value within float rounding of
a half level may still land one level away from DALI's, as the two sum the products in
another order: below 0.1 % of the pixels (tests/test_pipeline_colour.py).

What DALI hands over per sample, ``view{i}_colour``: ten uniforms in [0, 1)
(:data:`DRAWS`), drawn by one operator per view. A :class:`ColourLaw` (the view's
probabilities and ranges, App. A.1) maps them to the flags (``u < p``) and factors
(``lo + (hi - lo) u``): :data:`PARAMS` and the blur's σ (0 where not blurred). Why one
draw: DALI runs each of its CPU operators sample by sample, and the ~15 coin flips,
uniforms, casts and stacks per view (60 for four views) that drew these one by one cost
12.9-15.2 ms per batch of 256 on 2 cores, against 0.8-1.8 ms for one draw per view
(``scripts/bench_draws.py``). The draw is in DALI's
graph, so its checkpoint still resumes a run exactly. The flip (a mirror of the columns)
commutes with every per-pixel step, so applying it while reading the crop gives DALI's
``crop_mirror_normalize`` result.

Where it may run: a view whose every step after the colour can move with it. Its blur must
move to the loader too (``data.blur_where``) or be absent
(:meth:`mscn.config_schema.ViewCfg.colour_movable`). BYOL's solarize moves with them:
such a view leaves the kernel on the uint8 scale, is blurred, then solarized and
normalized (:func:`solarize_normalize`).

This module is the arithmetic and its plain-torch reference, :func:`colour_reference`
(the CPU path, and what the kernel is tested against). ``mscn.cuda_kernels.colour``
applies it to a batch: on CUDA tensors a Triton kernel (``colour_triton``), one launch per
view with the matrices built in the kernel (no small torch ops, no host sync).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mscn.h2d import to_device


PARAMS = ("jitter", "brightness", "contrast", "saturation", "hue", "gray", "flip")  # what the step applies
DRAWS = (*PARAMS, "blur", "sigma", "solarize")  # view{i}_colour: one uniform in [0, 1) each, in this order
# the form of DALI's hand-over, recorded in a run's loader state: DALI's checkpoint only
# loads into the graph it came from, so a change of the form (another draw, another
# order) must change this, and a resume across it is refused (train/resume.py)
HANDOVER = f"one uniform draw of {','.join(DRAWS)} per view"
# DALI's RGB -> YIQ matrix (color_twist.h) and its exact inverse: DALI 2.4's operator maps
# neutral factors to the identity (probed with float images: its matrices equal these
# products to 2e-7), where DALI 1.x used an inverse rounded to three digits
RGB2YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.321), (0.211, -0.523, 0.311))
YIQ2RGB = tuple(tuple(float(v) for v in row) for row in np.linalg.inv(np.array(RGB2YIQ, dtype=np.float64)))
HALF_RANGE = 128.0  # DALI's contrast centre for integer images


@dataclass(frozen=True)
class ColourLaw:
    """How one view's :data:`DRAWS` become what is applied (App. A.1, as ``ops.colour`` and
    ``ops._jitter_factors`` draw them in DALI): a flag is ``u < p``, a factor
    ``lo + (hi - lo) u``; σ is 0 where the blur flag is off."""

    p_jitter: float
    brightness: tuple[float, float]
    contrast: tuple[float, float]
    saturation: tuple[float, float]
    hue: tuple[float, float]  # degrees
    p_gray: float
    p_flip: float
    p_blur: float  # 0 for a view whose blur the loader does not apply
    sigma: tuple[float, float]
    p_solarize: float = 0.0  # BYOL: applied by the loader after its blur (solarize_normalize)

    @classmethod
    def of(cls, view, blur: bool) -> "ColourLaw":
        """The law of a ``mscn.config.ViewCfg``; ``blur``: whether the loader blurs it."""
        def around_one(s: float) -> tuple[float, float]:
            return max(0.0, 1.0 - s), 1.0 + s
        return cls(view.jitter_prob, around_one(view.brightness), around_one(view.contrast),
                   around_one(view.saturation), (-360.0 * view.hue, 360.0 * view.hue), view.grayscale_prob,
                   view.flip_prob, view.blur_prob if blur else 0.0, tuple(view.blur_sigma), view.solarize_prob)

    def constants(self) -> tuple[float, ...]:
        """The kernel's arguments: p_jitter, then (lo, hi - lo) of each factor, p_gray,
        p_flip, p_blur, (lo, hi - lo) of σ (solarize comes after the blur, outside the kernel)."""
        span = [(float(lo), float(hi) - float(lo)) for lo, hi in (self.brightness, self.contrast, self.saturation,
                                                                   self.hue)]
        return (float(self.p_jitter), *(v for pair in span for v in pair), float(self.p_gray), float(self.p_flip),
                float(self.p_blur), float(self.sigma[0]), float(self.sigma[1]) - float(self.sigma[0]))


def params_from_draws(draws: torch.Tensor, law: ColourLaw) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 10) :data:`DRAWS` -> ((B, 7) :data:`PARAMS`, (B,) σ), in float32 as the kernel maps them."""
    u = draws.float()
    k = [torch.tensor(v, dtype=torch.float32, device=u.device) for v in law.constants()]
    flag = lambda col, p: (u[:, col] < p).float()  # noqa: E731
    factor = lambda col, lo, span: lo + span * u[:, col]  # noqa: E731
    params = torch.stack([flag(0, k[0]), factor(1, k[1], k[2]), factor(2, k[3], k[4]), factor(3, k[5], k[6]),
                          factor(4, k[7], k[8]), flag(5, k[9]), flag(6, k[10])], 1)
    sigma = torch.where(u[:, 7] < k[11], factor(8, k[12], k[13]), torch.zeros_like(u[:, 8]))
    return params, sigma


def solarize_flags(draws: torch.Tensor, law: ColourLaw) -> torch.Tensor:
    """(B,) bool: where the view's solarize applies (``u < p_solarize``)."""
    return draws[:, DRAWS.index("solarize")].float() < torch.tensor(law.p_solarize, dtype=torch.float32)


def solarize_normalize(x: torch.Tensor, flag: torch.Tensor, mean, std) -> torch.Tensor:
    """BYOL's solarize, then ``(x - mean) / std``, on views the loader left on the uint8
    scale (a view that solarizes is normalized only after its blur): rounded to whole
    levels first, as DALI's blur hands solarize a uint8 image, then every level >= 128 is
    inverted where ``flag`` is set (torchvision's threshold, ``ops.solarize``)."""
    v = _round_sat(x.float())  # half away from zero, as DALI's CPU blur rounds
    v = torch.where(to_device(flag, v.device)[:, None, None, None] & (v >= 128.0), 255.0 - v, v)
    return _normalize(v, mean, std).to(x.dtype)


def _normalize(v: torch.Tensor, mean, std) -> torch.Tensor:
    """``(v - mean) / std`` per channel of float NCHW ``v``; the constants reach a GPU through
    pinned memory (a pageable copy may wait for the stream, mscn.h2d)."""
    mean_t = to_device(torch.tensor(mean, dtype=torch.float32), v.device)[None, :, None, None]
    std_t = to_device(torch.tensor(std, dtype=torch.float32), v.device)[None, :, None, None]
    return (v - mean_t) / std_t


def twist_matrices(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, 3) matrices and (B,) offsets of the jitter, in float32 and DALI's order of
    products (left to right), from the (B, 7) ``params`` (:data:`PARAMS`)."""
    p = params.float()
    b, c, s, h = p[:, 1], p[:, 2], p[:, 3], p[:, 4]
    n = p.shape[0]
    rad = h * (torch.pi / 180.0)
    hue = torch.eye(3, device=p.device).repeat(n, 1, 1)
    hue[:, 1, 1], hue[:, 2, 2] = torch.cos(rad), torch.cos(rad)
    hue[:, 1, 2], hue[:, 2, 1] = torch.sin(rad), -torch.sin(rad)
    sat = torch.eye(3, device=p.device).repeat(n, 1, 1)
    sat[:, 1, 1], sat[:, 2, 2] = s, s
    yiq2rgb = torch.tensor(YIQ2RGB, device=p.device)
    rgb2yiq = torch.tensor(RGB2YIQ, device=p.device)
    m = (b * c)[:, None, None] * yiq2rgb  # mat3(b) * mat3(c) * Yiq2Rgb
    m = m @ hue @ sat @ rgb2yiq
    return m, (HALF_RANGE - HALF_RANGE * c) * b


def gray_matrix(device=None) -> torch.Tensor:
    """DALI's twist with saturation 0: ``YIQ2RGB · diag(1, 0, 0) · RGB2YIQ``."""
    keep_y = torch.diag(torch.tensor([1.0, 0.0, 0.0], device=device))
    return torch.tensor(YIQ2RGB, device=device) @ keep_y @ torch.tensor(RGB2YIQ, device=device)


def _round_sat(x: torch.Tensor) -> torch.Tensor:
    """DALI's ``ConvertSat<uint8>`` on its CPU: round half away from zero, clamp to [0, 255]."""
    return torch.floor(x + 0.5).clamp_(0.0, 255.0)


def colour_reference(x: torch.Tensor, params: torch.Tensor, mean, std, dtype=torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, 3) RGB crops ``x`` -> (B, 3, H, W) views in ``dtype``: mirrored where
    ``params[:, 6]``, jittered where ``params[:, 0]``, grayed where ``params[:, 5]``, then
    normalized. The plain-torch reference."""
    params = params.float().to(x.device)
    y = x.permute(0, 3, 1, 2).float()
    y = torch.where(params[:, 6, None, None, None] > 0.5, y.flip(-1), y)
    m, off = twist_matrices(params)
    jit = torch.einsum("bij,bjhw->bihw", m, y) + off[:, None, None, None]
    y = torch.where(params[:, 0, None, None, None] > 0.5, _round_sat(jit), y)
    gray = torch.einsum("ij,bjhw->bihw", gray_matrix(x.device), y)
    y = torch.where(params[:, 5, None, None, None] > 0.5, _round_sat(gray), y)
    return _normalize(y, mean, std).to(dtype).contiguous()
