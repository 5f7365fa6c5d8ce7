"""The standard evaluation of one encoder: linear probe (paper App. A.2) + kNN.

``mscn demo`` and ``mscn ablate`` (paper §5.1-5.2 and §6.3 ablations, Fig. 5) score every
encoder the same way, so that numbers from the two are comparable: the linear probe
with ``cfg.eval``'s settings (``eval.precompute_features`` picks the cached-feature
variant) and the weighted kNN (``eval.knn_k``, ``eval.knn_temperature``), both under
one ``seed`` (default ``train.seed``).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from mscn.config import Config
from mscn.train.runtime import Runtime


# the settings of cfg.eval that this evaluation reads: a result records them
SETTINGS = ("linear_epochs", "linear_lr", "linear_batch", "linear_weight_decay", "precompute_features", "knn_k",
            "knn_temperature")


def linear_and_knn(backbone: nn.Module, cfg: Config, train_root: str, val_root: str, rt: Runtime,
                   seed: int | None = None, log_epochs: bool = True) -> dict:
    """``{"linear_top1", "linear_top5", "knn_top1", "seed", "wall_s", "eval"}`` of a frozen
    ``backbone``; ``eval``: the :data:`SETTINGS` it ran with."""
    from mscn.train.eval.common import eval_loader, seeded
    from mscn.train.eval.knn import knn_eval
    from mscn.train.eval.linear import linear_probe

    t0 = time.time()
    lin = linear_probe(backbone, cfg, train_root, val_root, rt, seed=seed, log_epochs=log_epochs)
    with seeded(cfg, seed) as scfg:  # the kNN loaders' DALI seeds follow the same seed
        batch = scfg.eval.linear_batch
        knn = knn_eval(backbone, eval_loader(scfg, train_root, rt, batch), eval_loader(scfg, val_root, rt, batch),
                       rt, k=scfg.eval.knn_k, T=scfg.eval.knn_temperature)
    return {"linear_top1": lin["top1"], "linear_top5": lin["top5"], "knn_top1": knn["top1"],
            "seed": lin["seed"], "wall_s": round(time.time() - t0, 1),
            "eval": {k: getattr(cfg.eval, k) for k in SETTINGS}}


def random_backbone(arch: str, seed: int) -> nn.Module:
    """A random-init backbone whose weights follow ``seed`` (the baseline of every table)."""
    from mscn.train.models import build_backbone

    torch.manual_seed(seed)
    backbone, _ = build_backbone(arch)
    return backbone
