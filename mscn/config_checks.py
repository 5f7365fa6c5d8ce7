"""Range checks of the config schema: one ConfigError line naming the key and the file.

:func:`validate` runs on every config that :mod:`mscn.config` builds (YAML, overrides,
checkpoints), one helper per section; :func:`validate_view` and :func:`validate_mask` also
guard ViewCfgs and MaskCfgs built in code (App. A.1, paper §5.2 ranges). All are importable
from ``mscn.config`` as well; ``mscn.config.checked`` adds the schema's types for configs built
in code.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from mscn.config_schema import HANDOVERS, OP_CONCURRENCY, STREAM_POLICIES
from mscn.errors import ConfigError

if TYPE_CHECKING:  # annotations only
    from mscn.config_schema import Config, DataCfg, EvalCfg, HighPassCfg, MaskCfg, TrainCfg, ViewCfg



def _check(cond: bool, src: str, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{src}: {key} = {value!r}: {why}")


def _check_prob(src: str, key: str, v: float) -> None:
    _check(0.0 <= v <= 1.0, src, key, v, "must be a probability in [0, 1]")


def _check_range(src: str, key: str, lo_hi: tuple, lo_min: float, strict_low: bool = False) -> None:
    lo, hi = lo_hi
    ok = (lo > lo_min if strict_low else lo >= lo_min) and lo <= hi
    _check(ok, src, key, lo_hi, f"must be an increasing pair with min {'>' if strict_low else '>='} {lo_min}")


UNIT_SCALE = ("is on the 0-1 scale (with the mean): mscn normalizes pixels of 0-255, as DALI decodes them "
              "(ImageNet's: mean [123.675, 116.28, 103.53], std [58.395, 57.12, 57.375]); multiply both by 255")


def on_unit_scale(mean, std) -> bool:
    """Whether ``mean``/``std`` are torchvision's 0-1 values (std 0.229...) where 0-255 ones
    belong: the views would come out ~255x too large, with no error anywhere."""
    return max(std) < 1.0 and max(abs(m) for m in mean) <= 1.0


def validate_mask(m: MaskCfg, src: str, key: str = "mask", max_grid: int | None = None) -> None:
    """The ranges of one view's mask (paper §5.2); also used for MaskCfgs built in code."""
    _check(0.0 <= m.ratio < 1.0, src, f"{key}.ratio", m.ratio, "must be in [0, 1)")
    ok = isinstance(m.grid, int) and 1 <= m.grid and (max_grid is None or m.grid <= max_grid)
    _check(ok, src, f"{key}.grid", m.grid,
           f"must be an integer in [1, data.image_size={max_grid}]" if max_grid else "must be an integer >= 1")
    for name in ("p_focal", "p_ind", "p_noise"):
        _check_prob(src, f"{key}.{name}", getattr(m, name))
    _check_range(src, f"{key}.focal_aspect", m.focal_aspect, 0.0, strict_low=True)
    _check(m.noise_std >= 0.0 and math.isfinite(m.noise_std), src, f"{key}.noise_std", m.noise_std,
           "must be a finite number >= 0")


def validate(cfg: Config, src: str = "<config>", world_size: int = 1, siamese: bool = True) -> None:
    """Reject out-of-range values with one line naming the key (and the file).

    ``siamese=False``: the config feeds a loader only (another project's trainer), so the
    siamese trainer's own needs (2 views, a batch of 2 for InfoNCE's negatives) do not apply."""
    _validate_data(cfg.data, src)
    _validate_views(cfg.views, src, cfg.data.image_size, 2 if siamese else 1)
    _validate_highpass(cfg.highpass, src)
    # the high-pass must see the blurred view: a blur moved to the loader takes it along
    _check(not (cfg.data.blur_where == "loader" and cfg.blur_in_loader(gpu=True) and cfg.highpass.enabled and cfg.highpass.where == "pipeline"), src,
           "highpass.where", cfg.highpass.where, "data.blur_where=loader blurs the views after DALI, so the "
           "high-pass must run there too: set highpass.where=auto or loader")
    _check(not (cfg.data.colour_where == "loader" and cfg.highpass.enabled and cfg.highpass.where == "pipeline"
                and (cfg.colour_in_loader(gpu=True) or cfg.colour_in_loader(gpu=False))), src,
           "highpass.where", cfg.highpass.where, "data.colour_where=loader colours the views after DALI, so the "
           "high-pass must run there too: set highpass.where=auto or loader")
    _validate_model(cfg, src)
    _validate_optim(cfg, src)
    _validate_train(cfg.train, src, world_size, 2 if siamese else 1)
    _validate_eval(cfg.eval, src)


def _validate_data(d: DataCfg, src: str) -> None:
    _check(d.format in ("auto", "folder", "filelist", "wds"), src, "data.format", d.format,
           "must be one of auto, folder, filelist, wds")
    _check(d.image_size >= 8, src, "data.image_size", d.image_size, "must be >= 8")
    _check(d.val_resize >= d.image_size, src, "data.val_resize", d.val_resize, "must be >= data.image_size")
    _check(d.num_threads == "auto" or (isinstance(d.num_threads, int) and d.num_threads >= 1), src,
           "data.num_threads", d.num_threads, "must be auto or an integer >= 1")
    _check(d.hw_decoder_load == "auto" or (isinstance(d.hw_decoder_load, float) and 0.0 <= d.hw_decoder_load <= 1.0),
           src, "data.hw_decoder_load", d.hw_decoder_load, "must be auto or a number in [0, 1]")
    _check(d.prefetch >= 1, src, "data.prefetch", d.prefetch, "must be >= 1")
    _check(d.shuffle_buffer >= 1, src, "data.shuffle_buffer", d.shuffle_buffer, "must be >= 1")
    _check(d.crop in ("rrc", "window"), src, "data.crop", d.crop, "must be rrc or window")
    _check(d.blur_where in ("auto", "pipeline", "loader"), src, "data.blur_where", d.blur_where,
           "must be auto, pipeline or loader")
    _check(d.colour_where in ("pipeline", "loader"), src, "data.colour_where", d.colour_where,
           "must be pipeline or loader")
    _check(d.handover in HANDOVERS, src, "data.handover", d.handover, "must be " + " or ".join(HANDOVERS))
    _check(d.op_concurrency in ("auto", *OP_CONCURRENCY), src, "data.op_concurrency", d.op_concurrency,
           "must be auto, " + ", ".join(OP_CONCURRENCY))
    _check(d.stream_policy in ("auto", *STREAM_POLICIES), src, "data.stream_policy", d.stream_policy,
           "must be auto, " + ", ".join(STREAM_POLICIES))
    _check(d.output_dtype in ("float32", "float16", "bfloat16", "auto"), src, "data.output_dtype", d.output_dtype,
           "must be float32, float16, bfloat16 or auto")
    _check(all(s > 0 for s in d.std), src, "data.std", d.std, "must be > 0")
    _check(not on_unit_scale(d.mean, d.std), src, "data.std", d.std, UNIT_SCALE)
    _check(d.synthetic_classes >= 2, src, "data.synthetic_classes", d.synthetic_classes, "must be >= 2")
    _check(d.synthetic_per_class >= 1, src, "data.synthetic_per_class", d.synthetic_per_class, "must be >= 1")
    _check(min(d.synthetic_size) >= 16, src, "data.synthetic_size", d.synthetic_size, "must be >= 16 pixels")
    _check(d.synthetic_val_per_class >= 0, src, "data.synthetic_val_per_class", d.synthetic_val_per_class, "must be >= 0")


def _validate_views(views: list[ViewCfg], src: str, image_size: int, least: int = 2) -> None:
    if least > 1:
        _check(len(views) >= least, src, "views", len(views), "a siamese network needs at least 2 views")
    _check(len(views) >= 1, src, "views", len(views), "needs at least 1 view")
    for i, v in enumerate(views):
        validate_view(v, src, f"views[{i}]", image_size)


def validate_view(v: ViewCfg, src: str, k: str = "view", image_size: int | None = None) -> None:
    """The ranges of one view (App. A.1) and its mask; also used for ViewCfgs built in code."""
    _check_range(src, f"{k}.scale", v.scale, 0.0, strict_low=True)
    _check(v.scale[1] <= 1.0, src, f"{k}.scale", v.scale, "area fraction must be <= 1")
    _check_range(src, f"{k}.ratio", v.ratio, 0.0, strict_low=True)
    for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
        _check_prob(src, f"{k}.{name}", getattr(v, name))
    for name in ("brightness", "contrast", "saturation"):
        _check(0.0 <= getattr(v, name) < 1.0, src, f"{k}.{name}", getattr(v, name), "must be in [0, 1)")
    _check(0.0 <= v.hue <= 0.5, src, f"{k}.hue", v.hue, "must be in [0, 0.5]")
    _check_range(src, f"{k}.blur_sigma", v.blur_sigma, 0.0, strict_low=True)
    _check(v.blur_window == 0 or (v.blur_window >= 3 and v.blur_window % 2 == 1), src,
           f"{k}.blur_window", v.blur_window, "must be 0 (auto) or an odd number >= 3")
    # a mask of ratio 0 is never drawn: its grid may exceed small views (an evaluation's)
    validate_mask(v.mask, src, f"{k}.mask", max_grid=image_size if v.mask.ratio > 0 else None)


def _validate_highpass(h: HighPassCfg, src: str) -> None:
    _check(h.sigma > 0, src, "highpass.sigma", h.sigma, "must be > 0")
    _check(h.window == 0 or (h.window >= 3 and h.window % 2 == 1), src, "highpass.window", h.window,
           "must be 0 (auto) or an odd number >= 3")
    _check(h.where in ("auto", "pipeline", "loader"), src, "highpass.where", h.where,
           "must be auto, pipeline or loader")


def _validate_model(cfg: Config, src: str) -> None:
    """model.* and method.*"""
    _check(cfg.model.arch in ("resnet18", "resnet34", "resnet50"), src, "model.arch", cfg.model.arch,
           "must be resnet18, resnet34 or resnet50")
    for name in ("proj_hidden", "proj_out", "pred_hidden"):
        _check(getattr(cfg.model, name) >= 1, src, f"model.{name}", getattr(cfg.model, name), "must be >= 1")
    me = cfg.method
    _check(me.name in ("simclr", "byol"), src, "method.name", me.name, "must be simclr or byol")
    _check(me.temperature > 0, src, "method.temperature", me.temperature, "must be > 0")
    _check(0.0 <= me.ema_base <= 1.0, src, "method.ema_base", me.ema_base, "must be in [0, 1]")
    _check(0.0 <= me.ema_final <= 1.0, src, "method.ema_final", me.ema_final, "must be in [0, 1]")
    _check(me.ema_base <= me.ema_final, src, "method.ema_final", me.ema_final,
           f"must be >= method.ema_base ({me.ema_base}): the EMA rises to it")


def _validate_optim(cfg: Config, src: str) -> None:
    """optim.* and schedule.*"""
    o = cfg.optim
    _check(o.name in ("lars", "sgd"), src, "optim.name", o.name, "must be lars or sgd")
    _check(o.base_lr > 0, src, "optim.base_lr", o.base_lr, "must be > 0")
    _check(0.0 <= o.momentum < 1.0, src, "optim.momentum", o.momentum, "must be in [0, 1)")
    _check(o.weight_decay >= 0, src, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(o.trust_coef > 0, src, "optim.trust_coef", o.trust_coef, "must be > 0")
    s = cfg.schedule
    _check(s.epochs >= 1, src, "schedule.epochs", s.epochs, "must be >= 1")
    _check(0 <= s.warmup_epochs <= s.epochs, src, "schedule.warmup_epochs", s.warmup_epochs,
           "must be in [0, schedule.epochs]")
    _check(0.0 <= s.min_lr_ratio <= 1.0, src, "schedule.min_lr_ratio", s.min_lr_ratio, "must be in [0, 1]")


def _validate_train(t: TrainCfg, src: str, world_size: int, least: int = 2) -> None:
    if least > 1:
        _check(t.global_batch >= least, src, "train.global_batch", t.global_batch,
               "must be >= 2 (SimCLR's InfoNCE needs negatives, and batch norm a second image)")
    _check(t.global_batch >= 1, src, "train.global_batch", t.global_batch, "must be >= 1")
    _check(t.global_batch % world_size == 0, src, "train.global_batch", t.global_batch,
           f"must be divisible by the world size ({world_size})")
    _check(t.device in ("auto", "cuda", "cpu"), src, "train.device", t.device, "must be auto, cuda or cpu")
    _check(t.precision in ("auto", "bf16", "fp16", "fp32"), src, "train.precision", t.precision,
           "must be auto, bf16, fp16 or fp32")
    for name in ("max_steps", "knn_every_epochs", "stall_warn_s"):
        _check(getattr(t, name) >= 0, src, f"train.{name}", getattr(t, name), "must be >= 0")
    for name in ("ckpt_every_steps", "keep_last", "log_every"):
        _check(getattr(t, name) >= 1, src, f"train.{name}", getattr(t, name), "must be >= 1")


def _validate_eval(e: EvalCfg, src: str) -> None:
    for name in ("linear_lr", "finetune_head_lr", "finetune_gamma", "knn_temperature"):
        _check(getattr(e, name) > 0, src, f"eval.{name}", getattr(e, name), "must be > 0")
    _check(e.finetune_backbone_lr >= 0, src, "eval.finetune_backbone_lr", e.finetune_backbone_lr, "must be >= 0")
    _check(e.linear_weight_decay >= 0, src, "eval.linear_weight_decay", e.linear_weight_decay, "must be >= 0")
    _check(0 < e.finetune_milestones[0] <= e.finetune_milestones[1], src, "eval.finetune_milestones",
           e.finetune_milestones, "must be an increasing pair of epochs > 0")
    _check(0.0 < e.label_fraction <= 1.0, src, "eval.label_fraction", e.label_fraction, "must be in (0, 1]")
    _check(e.knn_k >= 1, src, "eval.knn_k", e.knn_k, "must be >= 1")
    for name in ("linear_epochs", "finetune_epochs", "linear_batch", "finetune_batch"):
        _check(getattr(e, name) >= 1, src, f"eval.{name}", getattr(e, name), "must be >= 1")
