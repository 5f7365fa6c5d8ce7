"""A pretrained backbone and the config to evaluate it with (paper App. A.2-A.4).

:func:`load_pretrained` turns a pretraining checkpoint, a run directory or ``"random"``
into a torchvision ResNet backbone without its classifier, plus the pretraining config,
so that the evaluation views use the same image size and high-pass as pretraining.
"""
from __future__ import annotations

import warnings

from torch import nn

from mscn.config import Config, apply_override, from_dict, load_config, to_dict
from mscn.errors import ConfigError, MscnError
from mscn.highpass import highpass_window
from mscn.train.checkpoint import load_pretrained_state
from mscn.train.models import ARCHS, build_backbone


class HighPassMismatchWarning(UserWarning):
    """Evaluation views use another high-pass filter than the pretraining views."""


def _apply_overrides(cfg: Config, overrides: list[str], src: str) -> Config:
    tree = to_dict(cfg)
    for item in overrides:
        apply_override(tree, item)
    return from_dict(tree, src)


def check_highpass(pre: Config, cfg: Config, src: str, strict: bool = False) -> None:
    """Warn (or raise with ``strict``) when eval views would use another high-pass.

    The encoder only ever saw high-passed inputs of one sigma; paper App. B changes the
    evaluation sigma together with the pretraining one.
    """
    a, b = pre.highpass, cfg.highpass
    pre_desc = f"enabled={a.enabled}, sigma={a.sigma}, window={highpass_window(a.sigma, a.window)}"
    new_desc = f"enabled={b.enabled}, sigma={b.sigma}, window={highpass_window(b.sigma, b.window)}"
    if pre_desc == new_desc:
        return
    msg = (f"{src}: pretrained with high-pass ({pre_desc}) but evaluated with ({new_desc}); "
           "drop the highpass.* override to evaluate as pretrained (paper App. B)")
    if strict:
        raise ConfigError(msg + ", or drop --strict to allow it")
    warnings.warn(msg, HighPassMismatchWarning, stacklevel=2)


def load_pretrained(path: str, arch: str | None = None, overrides: list[str] | None = None,
                    config: str | None = None, strict: bool = False,
                    state: dict | None = None) -> tuple[nn.Module, str, Config]:
    """Backbone, its architecture and the config to evaluate it with.

    ``path`` is a checkpoint written by the pretraining loop (``backbone`` = torchvision
    ResNet state_dict without ``fc``, ``arch``, ``config`` = plain dict), a run
    directory (its newest weights, checkpoint.pick_pretrained), or ``"random"``
    for a random-init baseline (config from ``config`` + ``overrides``, arch from
    ``arch`` or ``model.arch``). ``overrides`` (``key=value``) are applied on top of the
    pretraining config; a requested architecture other than the checkpoint's is a
    :class:`MscnError`, a different high-pass is a warning (an error with ``strict``).
    ``state``: the file's contents when the caller has loaded them already
    (checkpoint.pick_pretrained), so that it is read once.
    """
    overrides = list(overrides or [])
    if path == "random":
        if arch:
            overrides.append(f"model.arch={arch}")
        cfg = load_config(config, overrides)
        backbone, _ = build_backbone(cfg.model.arch)
        return backbone, cfg.model.arch, cfg

    ckpt = state if state is not None else load_pretrained_state(path)
    ck_arch = ckpt["arch"]
    if ck_arch not in ARCHS:
        raise MscnError(f"{path}: unknown architecture {ck_arch!r} in the checkpoint (supported: {', '.join(ARCHS)})")
    try:
        pre = from_dict(ckpt["config"], src=f"{path} (config)")
    except ConfigError as e:
        raise MscnError(f"{e} -- the checkpoint's config does not fit this mscn version") from None
    cfg = _apply_overrides(pre, overrides, src=f"{path} + overrides") if overrides else pre
    wanted = arch or cfg.model.arch
    if wanted != ck_arch:
        raise MscnError(f"{path} holds a {ck_arch} backbone but {wanted} was requested "
                        f"(--arch / model.arch); evaluate it as {ck_arch} or pick a {wanted} checkpoint")
    if config:
        warnings.warn(f"--config {config} ignored: {path} carries its own pretraining config "
                      "(use key=value overrides)", stacklevel=2)
    check_highpass(pre, cfg, path, strict)
    backbone, _ = build_backbone(ck_arch)
    try:
        backbone.load_state_dict(ckpt["backbone"], strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)[:200]
        raise MscnError(f"{path}: backbone weights do not fit a torchvision {ck_arch} ({first[:200]})") from None
    return backbone, ck_arch, cfg
