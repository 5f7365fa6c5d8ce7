"""Plain DALI processing functions: decode, one view's augmentations, normalize, high-pass.

They hold no reader and no sharding; the ``@pipeline_def`` wrappers in
train_pipeline.py / eval_pipeline.py own those and call these (the layout of DALI's
efficientnet example). Every function takes and returns DataNodes, and works on
both backends: ``device="gpu"`` decodes with ``device="mixed"`` and everything after
the decoder then runs on the GPU; per-sample random parameters (coin flips, crop
windows, jitter factors) are always drawn on the CPU, as DALI requires for
argument inputs.

Trace time vs run time: these functions run once, when the pipeline graph is built
(trace time). Python ``if`` on a config value (``if view.blur_prob > 0``) decides at
trace time whether an operator exists in the graph at all. ``if flag:`` on a
DataNode is a DALI conditional (``enable_conditionals=True``): it is traced into a
split/merge, and at run time every sample takes its own branch.

Augmentations follow SimCLR/BYOL (paper App. A.1), in torchvision's order:
random-resized-crop -> flip -> colour jitter (p) -> grayscale (p) -> blur (p) ->
solarize (p) -> normalize, then the high-pass of §5.1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.data_node import DataNode

from mscn.colour import DRAWS, ColourLaw
from mscn.config import ViewCfg

DALI_FLOAT = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.FLOAT}
# Where normalize_highpass filters, read at trace time: True blurs the uint8 image before
# the normalization (fewer bytes, one pass less); False normalizes first and blurs the
# float view (the earlier order). Same result to float rounding; the benchmark's
# "masks-hp-late" stage builds the pipeline with False to time both on one machine.
HIGHPASS_FIRST = True
# solarize (BYOL): invert every value >= 128, as torchvision's solarize(threshold=128)
_SOLARIZE = [float(v if v < 128 else 255 - v) for v in range(256)]


def decode(encoded: DataNode, device: str = "cpu", hw_decoder_load: float = 0.65) -> DataNode:
    """Encoded bytes -> HWC uint8 RGB (grayscale/CMYK JPEGs and PNGs come out RGB).

    GPU: ``device="mixed"`` (nvImageCodec; ``hw_decoder_load`` of the JPEGs go to the
    hardware JPEG decoder of A100/H100-class GPUs); the output lives on the GPU.
    """
    if device == "gpu":
        return fn.decoders.image(encoded, device="mixed", output_type=types.RGB,
                                 hw_decoder_load=hw_decoder_load)
    return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)


def coin(p: float) -> DataNode:
    """Per-sample boolean flag, True with probability ``p`` (drawn on the CPU)."""
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def uniform(lo: float, hi: float) -> DataNode | float:
    """Per-sample U[lo, hi]; an empty range (a strength of 0) is the constant ``lo``, as
    DALI's uniform refuses ``lo == hi``."""
    if hi < lo:
        raise ValueError(f"random range [{lo}, {hi}]: the low end is above the high end")
    return fn.random.uniform(range=[lo, hi]) if hi > lo else float(lo)


@dataclass
class ViewFlags:
    """Per-sample draws of one view, kept for debug outputs and statistics tests."""

    flip: DataNode
    jitter: DataNode
    gray: DataNode
    blur: DataNode
    solarize: DataNode
    crop_area: DataNode | None  # crop area / image area (None for the fused crop, which hides it)
    blur_sigma: DataNode | None = None  # a deferred blur's σ per sample, 0 where not blurred
    colour: DataNode | None = None  # a deferred colour step's (10,) uniforms per sample (mscn.colour.DRAWS)


def resized_crop(images: DataNode, shape: DataNode, size: int, scale, ratio,
                 op: str = "rrc") -> tuple[DataNode, DataNode | None]:
    """Random-resized-crop to ``size`` x ``size`` (torchvision's RandomResizedCrop rule:
    area in ``scale``, aspect in ``ratio``, 10 attempts, then a central fallback; antialiased;
    images smaller than ``size`` are upsampled), and the crop's area fraction.

    ``op`` (``data.crop``): "rrc" is DALI's fused ``fn.random_resized_crop``; it hides its
    window, so the area is None. "window" draws the window on the CPU with
    ``fn.random_crop_generator`` from ``shape`` (the decoded HWC shape, read from the header)
    and cuts it with one ROI ``fn.resize``, which is what the fused op does inside; the
    debug outputs use it for the area. Same windows (tests/test_pipeline_crop.py); "rrc"
    made the full GPU pipeline 13 % faster on an H200 (docs/PERFORMANCE.md).
    """
    if op not in ("rrc", "window"):
        raise ValueError(f"crop op {op!r}: must be 'rrc' or 'window'")
    if op == "rrc":
        crop = fn.random_resized_crop(images, size=[size, size], random_area=list(scale),
                                      random_aspect_ratio=list(ratio), antialias=True)
        return crop, None
    anchor, extent = fn.random_crop_generator(shape, random_area=list(scale), random_aspect_ratio=list(ratio))
    start = fn.cast(anchor, dtype=types.FLOAT)
    end = start + fn.cast(extent, dtype=types.FLOAT)
    crop = fn.resize(images, roi_start=start, roi_end=end, size=[size, size], antialias=True)
    hw = fn.cast(shape[0:2], dtype=types.FLOAT)
    ext = fn.cast(extent, dtype=types.FLOAT)
    return crop, (ext[0] * ext[1]) / (hw[0] * hw[1])


def colour(x: DataNode, view: ViewCfg) -> tuple[DataNode, DataNode, DataNode]:
    """SimCLR colour jitter (p), then grayscale (p): two conditional ``fn.color_twist`` passes.

    Returns (image, jitter flag, gray flag). Jitter factors are drawn as torchvision's:
    brightness/contrast/saturation ~ U[1-s, 1+s], hue ~ U[-h, h] of the hue circle (DALI
    takes degrees). Grayscale is ``saturation=0``: Y = 0.299 R + 0.587 G + 0.114 B
    (torchvision's weights). torchvision applies the four jitters in a random order and
    takes contrast around the image mean; DALI applies a fixed order (docs/PIPELINE.md).

    Measured alternatives, both rejected on an H200 (docs/perf/HISTORY.md): one twist on
    every sample with neutral parameters for the unjittered ones (no conditionals) cut the
    GPU pipeline from 7,655 to 5,583 images/s; one conditional twist on the samples with
    either flag, grayscale folded in as saturation 0, cut it from 7,436 to 3,806 (round 3).
    Two conditional twists on 80 % + 20 % of the samples are cheaper than either.
    """
    x, jit = _maybe(view.jitter_prob, x, lambda v: fn.color_twist(v, **_jitter_factors(view)))
    x, gray = _maybe(view.grayscale_prob, x, lambda v: fn.color_twist(v, saturation=0.0))
    return x, jit, gray


def _jitter_factors(view: ViewCfg) -> dict:
    """Per-sample colour-jitter factors (the two-pass graph's)."""
    return dict(brightness=uniform(max(0.0, 1 - view.brightness), 1 + view.brightness),
                contrast=uniform(max(0.0, 1 - view.contrast), 1 + view.contrast),
                saturation=uniform(max(0.0, 1 - view.saturation), 1 + view.saturation),
                hue=uniform(-360.0 * view.hue, 360.0 * view.hue))


def gaussian_blur(x: DataNode, view: ViewCfg) -> DataNode:
    """Blur with σ ~ U[blur_sigma]; window 0 lets DALI derive ``2*ceil(3σ)+1`` per sample.

    A fixed 23-tap window (torchvision's for 224 px) cost ~2-4x more on DALI's CPU path
    for the same result at σ <= 2 (28 vs 65 images/s on a 2-core machine), so it is used
    only when configured. On the GPU the comparison is still open (docs/PERFORMANCE.md).
    """
    sigma = uniform(*view.blur_sigma)
    if view.blur_window:
        return fn.gaussian_blur(x, sigma=sigma, window_size=view.blur_window)
    return fn.gaussian_blur(x, sigma=sigma)


def solarize(x: DataNode) -> DataNode:
    """BYOL solarization on uint8: a 256-entry lookup table, one pass."""
    return fn.lookup_table(x, keys=list(range(256)), values=_SOLARIZE, dtype=types.UINT8)


def _maybe(p: float, x: DataNode, op) -> tuple[DataNode, DataNode]:
    """Apply ``op`` with probability ``p``; returns (result, per-sample flag).

    The flag is always drawn (cheap), so debug outputs exist for every op. At trace
    time, p == 0 leaves ``op`` out of the graph and p == 1 applies it to every sample
    without a conditional; otherwise DALI's conditional runs ``op`` on the samples
    whose flag is set (run time) and merges them back with the others.
    """
    flag = coin(p)
    if p <= 0.0:
        return x, flag
    if p >= 1.0:
        return op(x), flag
    if flag:
        x = op(x)
    return x, flag


def blur_deferred(view: ViewCfg, blur_in_loader: bool) -> bool:
    """Whether this view's blur is left to the loader (``data.blur_where=loader``,
    mscn/blur.py): only where it may move past the normalization (``ViewCfg.blur_movable``:
    it blurs at all and no solarize follows; BYOL's views with solarize keep DALI's)."""
    return blur_in_loader and view.blur_movable()


def deferred_blur_sigma(view: ViewCfg) -> tuple[DataNode, DataNode]:
    """(flag, σ) of a blur the loader applies: σ ~ U[blur_sigma] where the flag is set, 0
    elsewhere. σ is drawn for every sample and zeroed by the flag, outside any conditional.
    DALI seeds operators by their place in the graph, so these draws are not the ones the
    ``pipeline`` graph's blur makes (tests/test_pipeline_blur.py compares at a constant σ)."""
    flag = coin(view.blur_prob)
    sigma = uniform(*view.blur_sigma)
    return flag, fn.cast(flag, dtype=types.FLOAT) * sigma


def colour_deferred(view: ViewCfg, blur_in_loader: bool, colour_in_loader: bool) -> bool:
    """Whether this view's colour jitter and grayscale are left to the loader
    (``data.colour_where=loader``, mscn/colour.py): only where nothing DALI applies after
    them is left in DALI (``ViewCfg.colour_movable``)."""
    return colour_in_loader and view.colour_movable(blur_in_loader)


def deferred_colour(view: ViewCfg, x: DataNode, area: DataNode | None,
                    defer_blur: bool) -> tuple[DataNode, ViewFlags]:
    """A view whose colour step the loader applies (:func:`colour_deferred`): the crop as it
    is, and one operator's draw of ten uniforms per sample (mscn.colour.DRAWS) in
    ``ViewFlags.colour``. The loader maps them to the jitter, gray and flip flags, the four
    factors and, where it blurs the view (``defer_blur``), the blur's flag and σ
    (mscn.colour.ColourLaw), and BYOL's solarize flag: one CPU operator instead of the ~15
    coin flips, uniforms, casts and stacks per view that drew them one by one
    (docs/perf/HISTORY.md, after round 4, second session).

    The other flags are DALI comparisons of the same draws with the same probabilities, so
    the debug outputs report exactly what the loader applies."""
    if view.blur_prob > 0 and not defer_blur:
        raise ValueError("a colour step followed by DALI's blur cannot move to the loader")
    law = ColourLaw.of(view, blur=defer_blur)
    u = fn.random.uniform(range=[0.0, 1.0], shape=[len(DRAWS)])
    col = {name: u[i] for i, name in enumerate(DRAWS)}
    flags = ViewFlags(flip=col["flip"] < law.p_flip, jitter=col["jitter"] < law.p_jitter,
                      gray=col["gray"] < law.p_gray, blur=col["blur"] < law.p_blur,
                      solarize=col["solarize"] < law.p_solarize, crop_area=area, colour=u)
    return x, flags


def augment_view(images: DataNode, shape: DataNode, view: ViewCfg, size: int,
                 crop_op: str = "rrc", defer_blur: bool = False,
                 defer_colour: bool = False) -> tuple[DataNode, ViewFlags]:
    """One view's uint8 HWC augmentations, before normalization (flip is done there).

    ``defer_blur`` (see :func:`blur_deferred`): the view is not blurred here; its per-sample
    σ is returned in ``ViewFlags.blur_sigma`` for the loader. ``defer_colour`` (see
    :func:`colour_deferred`): nor coloured nor flipped; the loader does both, and its blur,
    from the view's draws (:func:`deferred_colour`).
    """
    x, area = resized_crop(images, shape, size, view.scale, view.ratio, crop_op)
    if defer_colour:
        return deferred_colour(view, x, area, defer_blur)
    x, jit, gray = colour(x, view)
    sigma = None
    if defer_blur:
        if view.solarize_prob > 0:
            raise ValueError("a blur followed by solarize cannot move past the normalization")
        blur, sigma = deferred_blur_sigma(view)
    else:
        x, blur = _maybe(view.blur_prob, x, lambda v: gaussian_blur(v, view))
    x, sol = _maybe(view.solarize_prob, x, solarize)
    return x, ViewFlags(flip=coin(view.flip_prob), jitter=jit, gray=gray, blur=blur, solarize=sol, crop_area=area,
                        blur_sigma=sigma)


def normalize(x: DataNode, mean, std, flip: DataNode | int = 0, dtype=types.FLOAT,
              crop: int | None = None) -> DataNode:
    """(x - mean) / std on the 0-255 scale, HWC -> CHW, horizontal flip, cast (and an
    optional centered ``crop`` x ``crop`` window): one pass."""
    window = {"crop": [crop, crop], "crop_pos_x": 0.5, "crop_pos_y": 0.5} if crop else {}
    return fn.crop_mirror_normalize(x, mean=list(mean), std=list(std), mirror=flip,
                                    output_layout="CHW", dtype=dtype, **window)


def highpass(x: DataNode, sigma: float, window: int) -> DataNode:
    """``x - GaussianBlur(x, σ, window)`` on a float image (paper §5.1), any layout.

    DALI's border is reflect-101 (mscn/highpass.py). Kept for callers that hold an
    already-normalized float image; the views use :func:`normalize_highpass`.
    """
    return x - fn.gaussian_blur(x, sigma=sigma, window_size=window)


def normalize_highpass(x: DataNode, mean, std, flip, hp: tuple[float, int] | None, output_dtype: str,
                       crop: int | None = None) -> DataNode:
    """One view's uint8 HWC image -> its network input: normalized, high-passed (if
    ``hp`` = (σ, window)), flipped, CHW, in the output dtype (paper §5.1).

    The high-pass is computed *before* the normalization: normalization is a per-channel
    affine map and the Gaussian sums to 1 (also at reflect-101 borders), so
    ``hp((x - mean) / std) = (x - blur(x)) / std`` exactly. That lets the blur read the
    uint8 image (a quarter of the bytes of a float one) and folds the mean away; the
    ``1/std``, flip, HWC -> CHW and the cast are then one ``crop_mirror_normalize``
    pass, which also writes float16 directly. Passes over a view: blur (separable),
    subtract, normalize — against normalize, blur, subtract, cast before.

    ``crop``: centered ``crop`` x ``crop`` window (evaluation), cut *before* the blur so
    that the border is reflected at the crop edges, as when blurring the cropped view.
    float16 is emitted by DALI (half the bytes to copy); bfloat16 leaves DALI as float32
    and is cast by the loader (DALI has no bfloat16).
    """
    dtype = DALI_FLOAT[output_dtype]
    if hp is None:
        return normalize(x, mean, std, flip, dtype, crop)
    if not HIGHPASS_FIRST:
        y = highpass(normalize(x, mean, std, flip, types.FLOAT, crop), *hp)
        return fn.cast(y, dtype=dtype) if dtype != types.FLOAT else y
    if crop:
        x = fn.crop(x, crop=[crop, crop], crop_pos_x=0.5, crop_pos_y=0.5)
    sigma, window = hp
    detail = x - fn.gaussian_blur(x, sigma=sigma, window_size=window, dtype=types.FLOAT)
    return normalize(detail, (0.0, 0.0, 0.0), std, flip, dtype)


def parse_ascii_int(text: DataNode, max_digits: int = 10) -> DataNode:
    """Decimal ASCII bytes (a webdataset ``.cls``/``.idx`` member) -> int64 scalar.

    Right-pad the digits to ``max_digits``, read them as one fixed-width number, then
    divide by 10^(number of pad digits). Only digits are allowed (no sign, no newline).
    """
    digits = fn.cast(text, dtype=types.INT64) - 48
    n = text.shape(dtype=types.INT32)
    padded = fn.pad(digits, axes=[0], shape=[max_digits], fill_value=0)
    place = types.Constant(np.array([10 ** (max_digits - 1 - i) for i in range(max_digits)], dtype=np.int64))
    value = fn.reductions.sum(padded * place, axes=[0])
    scale = fn.lookup_table(max_digits - n, keys=list(range(max_digits + 1)),
                            values=[float(10 ** k) for k in range(max_digits + 1)], dtype=types.INT64)
    return fn.reshape(value // scale, shape=[])
