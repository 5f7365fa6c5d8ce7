"""Tiny on-disk data for the evaluation tests: JPEG ImageFolders and checkpoints.

The checkpoints follow the pretraining loop's format (``backbone``, ``arch``, ``config``)
that ``mscn.train.eval.pretrained.load_pretrained`` reads.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mscn.config import load_config, to_dict
from mscn.train.models import build_backbone

# 32 px views (resize 36, center crop 32); the mask grid must fit in a view
TINY = ["data.image_size=32", "data.val_resize=36", "data.num_threads=1", "highpass.sigma=1.0",
        *(f"views.{i}.mask.grid=8" for i in range(4)),
        "eval.linear_batch=16", "eval.finetune_batch=16"]


def make_image_folder(root: Path, classes: int = 3, per_class: int = 12, size=(64, 48), seed: int = 0) -> Path:
    """``root/c<k>/<i>.jpg``: class k is a stripe orientation (k * 180/classes degrees)
    with random phase, colours and noise. Orientation survives the high-pass (a plain
    colour would not: the high-pass removes it), crops and flips of a vertical axis."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    for c in range(classes):
        d = root / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        theta = np.pi * c / classes
        for i in range(per_class):
            wave = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / 8.0 + rng.uniform(0, 2 * np.pi))
            lo, hi = rng.uniform(0, 110, 3), rng.uniform(150, 255, 3)
            img = lo + (hi - lo) * (0.5 + 0.5 * wave[..., None]) + rng.normal(0, 12, (h, w, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:03d}.jpg", quality=90)
    return root


def make_checkpoint(path: Path, arch: str = "resnet18", overrides: list[str] | None = None,
                    seed: int = 0) -> Path:
    """A checkpoint in the trainer's format, with random (seeded) weights."""
    torch.manual_seed(seed)
    backbone, _ = build_backbone(arch)
    cfg = load_config(None, [f"model.arch={arch}", *TINY, *(overrides or [])])
    torch.save({"backbone": backbone.state_dict(), "arch": arch, "config": to_dict(cfg)}, path)
    return path
