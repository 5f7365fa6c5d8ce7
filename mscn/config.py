"""The one typed configuration schema of mscn.

Defaults -> YAML file -> ``a.b=value`` CLI overrides, in that order. Unknown keys,
wrong types and out-of-range values raise :class:`~mscn.errors.ConfigError` with one
line naming the key and the file. The resolved config is written into the run
directory (``config.yaml``) so that a run can always be reproduced and resumed.

Paper references: views and masks (§5.2, Fig. 3), high-pass (§5.1, App. B),
SimCLR/BYOL recipes (App. A.1), linear probe (A.2), fine-tuning (A.3).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mscn.errors import ConfigError

# ImageNet statistics (0-255 scale): the normalization applied before the high-pass.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass
class MaskCfg:
    """Grid/focal/channel-independent/noisy mask of one view (paper §5.2).

    Paper values: ratio 0.15 (Fig. 5a), grid 32 (Fig. 5b), p_focal 0.4 (Fig. 5c),
    "high" p_ind (Fig. 5d). Ours: p_ind 0.8, p_noise and noise_std (the paper gives
    no numbers), and the per-view asymmetry of the default view list.
    """

    ratio: float = 0.15  # fraction of grid cells masked; 0 disables masking of this view
    grid: int = 32  # cell size in pixels
    random_offset: bool = True  # shift the grid by a random (dy, dx) in [0, grid)
    p_focal: float = 0.4  # probability that the mask is one contiguous block of cells
    focal_aspect: tuple[float, float] = (0.5, 2.0)  # aspect-ratio range of the block
    p_ind: float = 0.8  # probability that every channel draws its own mask
    p_noise: float = 0.5  # probability that masked values are N(0, noise_std^2), else 0
    noise_std: float = 0.25  # std of the noise, in high-passed normalized units


@dataclass
class ViewCfg:
    """Augmentations of one view (SimCLR/BYOL recipe, paper App. A.1) + its mask."""

    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random-resized-crop aspect ratio
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_window: int = 0  # 0: DALI derives 2*ceil(3*sigma)+1 per sample from the drawn sigma
    solarize_prob: float = 0.0
    mask: MaskCfg = field(default_factory=MaskCfg)


def default_views() -> list[ViewCfg]:
    """2 main + 2 extra masked views (paper §5.2 "Multicrops"), asymmetric masks.

    Main view 0 is masked strongly, main view 1 weakly (asymmetric augmentation,
    Wang et al. 2022 as used in §5.2); the two extra views use the paper's ratio.
    BYOL's blur/solarize asymmetry (1.0/0.1 and 0.0/0.2) is set in byol_r50_in1k.yaml.
    """
    return [
        ViewCfg(mask=MaskCfg(ratio=0.15, p_noise=0.5)),
        ViewCfg(mask=MaskCfg(ratio=0.05, p_noise=0.2)),
        ViewCfg(mask=MaskCfg(ratio=0.15, p_noise=0.5)),
        ViewCfg(mask=MaskCfg(ratio=0.15, p_noise=0.5)),
    ]


@dataclass
class DataCfg:
    root: str = ""  # ImageFolder root, a file list from `mscn data scan`, or a folder of .tar shards
    format: str = "auto"  # auto | folder | filelist | wds
    val_root: str = ""  # evaluation data (same formats)
    synthetic: bool = False  # use (and create if absent) the embedded synthetic dataset
    synthetic_dir: str = "data/synth"  # where the synthetic dataset lives
    synthetic_classes: int = 10
    synthetic_per_class: int = 100
    synthetic_val_per_class: int = 30
    synthetic_size: tuple[int, int] = (500, 375)  # width, height of synthetic JPEGs
    image_size: int = 224  # side of every view
    val_resize: int = 256  # eval: resize shorter side, then center-crop image_size
    # "auto" for both is resolved per machine by mscn.pipelines.tuning (docs/PERFORMANCE.md
    # says which measurements chose the rules)
    num_threads: int | str = "auto"  # DALI CPU threads per pipeline, or "auto"
    hw_decoder_load: float | str = "auto"  # share of JPEGs for the GPU's hardware JPEG decoder, or "auto"
    prefetch: int = 2  # DALI prefetch queue depth
    shuffle_buffer: int = 4096  # DALI random_shuffle buffer (samples) for file/wds readers
    output_dtype: str = "float32"  # float32 | float16 | bfloat16
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class HighPassCfg:
    """x - GaussianBlur(x, sigma) after normalization (paper §5.1, sigma=5 from App. B)."""

    enabled: bool = True
    sigma: float = 5.0
    window: int = 0  # 0: 2*ceil(3*sigma)+1 (31 for sigma=5)


@dataclass
class ModelCfg:
    arch: str = "resnet50"  # resnet18 | resnet34 | resnet50
    proj_hidden: int = 2048
    proj_out: int = 256
    pred_hidden: int = 4096  # BYOL predictor
    sync_bn: bool = True  # SyncBatchNorm under DDP


@dataclass
class MethodCfg:
    name: str = "simclr"  # simclr | byol
    temperature: float = 0.2  # InfoNCE (SimCLR)
    ema_base: float = 0.996  # BYOL target momentum at step 0, cosine to ema_final
    ema_final: float = 1.0


@dataclass
class OptimCfg:
    name: str = "lars"  # lars | sgd
    base_lr: float = 0.3  # per 256 images: lr = base_lr * global_batch / 256 (SimCLR: 4.8 at 4096)
    momentum: float = 0.9
    weight_decay: float = 1e-6
    trust_coef: float = 0.001  # LARS eta


@dataclass
class ScheduleCfg:
    epochs: int = 800
    warmup_epochs: int = 10
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr


@dataclass
class TrainCfg:
    global_batch: int = 4096
    out_dir: str = "runs/pretrain"
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    channels_last: bool = True  # GPU only
    compile: bool = False
    max_steps: int = 0  # >0: stop after this many optimizer steps (smoke tests)
    ckpt_every_steps: int = 500
    keep_last: int = 3
    log_every: int = 10
    tensorboard: bool = False
    knn_every_epochs: int = 0  # >0: online kNN monitor on data.val_root


@dataclass
class EvalCfg:
    # linear probe / transfer (paper A.2)
    linear_epochs: int = 100
    linear_lr: float = 1.0  # scaled by batch / 256
    linear_batch: int = 256
    linear_weight_decay: float = 1e-6
    precompute_features: bool = False  # center-crop features once (not equivalent to A.2's random crops)
    # semi-supervised fine-tuning (paper A.3)
    finetune_epochs: int = 20
    finetune_backbone_lr: float = 0.002
    finetune_head_lr: float = 0.5
    finetune_milestones: tuple[int, int] = (12, 16)
    finetune_gamma: float = 0.2
    finetune_batch: int = 256
    label_fraction: float = 0.01
    # kNN monitor (InstDisc / DINO)
    knn_k: int = 20
    knn_temperature: float = 0.07


@dataclass
class Config:
    data: DataCfg = field(default_factory=DataCfg)
    views: list[ViewCfg] = field(default_factory=default_views)
    highpass: HighPassCfg = field(default_factory=HighPassCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    method: MethodCfg = field(default_factory=MethodCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)


# ----------------------------------------------------------------------------------
# Building a typed Config from plain dicts
# ----------------------------------------------------------------------------------

def _convert(value: Any, tp: Any, key: str, src: str) -> Any:
    """Coerce ``value`` to type ``tp`` or raise a one-line ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: {key}: expected a mapping, got {value!r}")
        return _build(tp, value, key, src)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{src}: {key}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{src}: {key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]", src) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (typing.Union, types.UnionType):  # e.g. int | str: "auto" or a number
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key, src)
            except ConfigError:
                continue
        names = " or ".join("a number" if a in (int, float) else "a string" for a in typing.get_args(tp))
        raise ConfigError(f"{src}: {key}: expected {names}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{src}: {key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{src}: {key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{src}: {key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{src}: {key}: expected a string, got {value!r}")
    raise ConfigError(f"{src}: {key}: unsupported type {tp}")  # schema bug, not user error


def _build(cls: type, data: dict, prefix: str, src: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"{src}: unknown key '{where}' (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            key = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _convert(data[f.name], hints[f.name], key, src)
    return cls(**kwargs)


def _merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def to_dict(cfg: Any) -> Any:
    """Plain dict/list form (tuples as lists) suitable for YAML and checkpoints."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def from_dict(data: dict, src: str = "<dict>") -> Config:
    cfg = _build(Config, data or {}, "", src)
    validate(cfg, src)
    return cfg


# ----------------------------------------------------------------------------------
# Overrides: a.b=value, views.1.mask.ratio=0.3, views=[...] (YAML values)
# ----------------------------------------------------------------------------------

def apply_override(tree: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value (e.g. train.global_batch=256)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node: Any = tree
    for i, p in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            idx = _index(p, node, key)
            node = node[idx]
            continue
        if p not in node or node[p] is None:
            node[p] = [] if nxt.isdigit() else {}
        node = node[p]
    last = parts[-1]
    if isinstance(node, list):
        node[_index(last, node, key)] = value
    else:
        node[last] = value


def _index(p: str, node: list, key: str) -> int:
    if not p.isdigit() or int(p) >= len(node):
        raise ConfigError(f"override '{key}': '{p}' is not a valid index (list has {len(node)} items)")
    return int(p)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (a path or a bundled recipe name), then overrides."""
    tree = to_dict(Config())
    src = "<overrides>" if overrides else "<defaults>"
    if path:
        p = resolve_config_path(path)
        src = str(p)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{src}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{src}: expected a mapping at the top level")
        # a YAML view list replaces the default list wholesale (views are not merged by index)
        tree = _merge(tree, loaded)
    for item in overrides or []:
        try:
            apply_override(tree, item)
        except ConfigError as e:
            raise ConfigError(f"{src}: {e}") from None
    try:
        return from_dict(tree, src)
    except ConfigError as e:
        msg = str(e)
        if overrides and not msg.startswith(src):
            msg = f"{src}: {msg}"
        raise ConfigError(msg) from None


def resolve_config_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    bundled = Path(__file__).resolve().parent.parent / "configs"
    try:  # installed (non-editable): configs ship as the mscn.configs package
        import mscn.configs as _c

        bundled = Path(_c.__file__).parent
    except ImportError:
        pass
    name = p.name if p.suffix else p.name + ".yaml"
    if (bundled / name).is_file():
        return bundled / name
    raise ConfigError(f"config file not found: {path} (bundled recipes: "
                      f"{', '.join(sorted(x.stem for x in bundled.glob('*.yaml')))})")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------
# Range checks
# ----------------------------------------------------------------------------------

def _check(cond: bool, src: str, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{src}: {key} = {value!r}: {why}")


def _check_prob(src: str, key: str, v: float) -> None:
    _check(0.0 <= v <= 1.0, src, key, v, "must be a probability in [0, 1]")


def _check_range(src: str, key: str, lo_hi: tuple, lo_min: float, strict_low: bool = False) -> None:
    lo, hi = lo_hi
    ok = (lo > lo_min if strict_low else lo >= lo_min) and lo <= hi
    _check(ok, src, key, lo_hi, f"must be an increasing pair with min {'>' if strict_low else '>='} {lo_min}")


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


def validate(cfg: Config, src: str = "<config>", world_size: int = 1) -> None:
    """Reject out-of-range values with one line naming the key (and the file)."""
    d = cfg.data
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
    _check(d.output_dtype in ("float32", "float16", "bfloat16"), src, "data.output_dtype", d.output_dtype,
           "must be float32, float16 or bfloat16")
    _check(all(s > 0 for s in d.std), src, "data.std", d.std, "must be > 0")
    _check(d.synthetic_classes >= 2, src, "data.synthetic_classes", d.synthetic_classes, "must be >= 2")
    _check(d.synthetic_per_class >= 1, src, "data.synthetic_per_class", d.synthetic_per_class, "must be >= 1")
    _check(min(d.synthetic_size) >= 16, src, "data.synthetic_size", d.synthetic_size, "must be >= 16 pixels")

    _check(len(cfg.views) >= 2, src, "views", len(cfg.views), "a siamese network needs at least 2 views")
    for i, v in enumerate(cfg.views):
        k = f"views[{i}]"
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
        validate_mask(v.mask, src, f"{k}.mask", max_grid=d.image_size)

    h = cfg.highpass
    _check(h.sigma > 0, src, "highpass.sigma", h.sigma, "must be > 0")
    _check(h.window == 0 or (h.window >= 3 and h.window % 2 == 1), src, "highpass.window", h.window,
           "must be 0 (auto) or an odd number >= 3")

    _check(cfg.model.arch in ("resnet18", "resnet34", "resnet50"), src, "model.arch", cfg.model.arch,
           "must be resnet18, resnet34 or resnet50")
    for name in ("proj_hidden", "proj_out", "pred_hidden"):
        _check(getattr(cfg.model, name) >= 1, src, f"model.{name}", getattr(cfg.model, name), "must be >= 1")
    me = cfg.method
    _check(me.name in ("simclr", "byol"), src, "method.name", me.name, "must be simclr or byol")
    _check(me.temperature > 0, src, "method.temperature", me.temperature, "must be > 0")
    _check(0.0 <= me.ema_base <= me.ema_final <= 1.0, src, "method.ema_base", me.ema_base,
           "need 0 <= ema_base <= ema_final <= 1")
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
    t = cfg.train
    _check(t.global_batch >= 2, src, "train.global_batch", t.global_batch, "must be >= 2 (InfoNCE needs negatives)")
    _check(t.global_batch % world_size == 0, src, "train.global_batch", t.global_batch,
           f"must be divisible by the world size ({world_size})")
    _check(t.device in ("auto", "cuda", "cpu"), src, "train.device", t.device, "must be auto, cuda or cpu")
    _check(t.precision in ("auto", "bf16", "fp16", "fp32"), src, "train.precision", t.precision,
           "must be auto, bf16, fp16 or fp32")
    for name in ("max_steps", "knn_every_epochs"):
        _check(getattr(t, name) >= 0, src, f"train.{name}", getattr(t, name), "must be >= 0")
    for name in ("ckpt_every_steps", "keep_last", "log_every"):
        _check(getattr(t, name) >= 1, src, f"train.{name}", getattr(t, name), "must be >= 1")
    e = cfg.eval
    _check(d.synthetic_val_per_class >= 0, src, "data.synthetic_val_per_class", d.synthetic_val_per_class, "must be >= 0")
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


def highpass_window(sigma: float, window: int = 0) -> int:
    """Odd Gaussian window: ``window`` if set, else 2*ceil(3*sigma)+1 (31 for sigma=5)."""
    return window if window else 2 * math.ceil(3.0 * sigma) + 1


def highpass_params(h: HighPassCfg) -> tuple[float, int] | None:
    """(sigma, window) of the configured high-pass, or None when it is switched off."""
    return (h.sigma, highpass_window(h.sigma, h.window)) if h.enabled else None
