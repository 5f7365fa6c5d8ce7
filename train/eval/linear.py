"""Linear probe on a frozen backbone (paper App. A.2; transfer classification, Table 3).

Protocol of Zbontar et al. (2021) as followed by the paper: the backbone is frozen and
in eval mode (batch norm uses its running statistics), a linear classifier is trained
for 100 epochs with SGD (momentum 0.9, weight decay 1e-6), batch 256, base lr 1.0
scaled by batch/256 and a per-step cosine schedule. Training views: random resized
crop + flip + high-pass; test views: resize 256, center crop 224, high-pass, with the
image size and high-pass of the pretraining config.

The head is a non-affine BatchNorm followed by the linear layer, as in MAE (He et al.
2021, https://arxiv.org/abs/2111.06377, App. A.2 "Linear probing", after MoCo v3) and
MSN: the features of a frozen backbone can have any scale (a random-init or
early-checkpoint ResNet's pooled features reach the hundreds), and at base lr 1.0 a
bare linear head diverged on them (loss 2.67 -> 167 in 5 epochs). The BatchNorm
whitens every feature to zero mean, unit variance, and a fixed ``1/sqrt(dim)`` gives
the feature vector norm ~1 for any width (512 or 2048): the curvature of the loss is
then bounded (the feature covariance has trace ~1), so the default lr 1.0 cannot
diverge on any backbone. Neither has parameters; in eval mode both are fixed affine
maps that fold into the linear layer, so the classifier stays linear.

Every random choice (head init, crops, flips, data order) follows one ``seed``
(default ``train.seed``): the same seed gives the same numbers on the CPU.

``precompute=True`` extracts center-crop features once and trains on those. That is
much cheaper but *not* A.2: the classifier never sees random crops or flips, which
usually costs a little accuracy. Results record which variant ran.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from mscn.config import Config
from mscn.errors import MscnError
from mscn.train.distributed import broadcast_module, convert_sync_batchnorm, mean_over_ranks
from mscn.train.eval.common import (MOMENTUM, accuracy, batch_to, check_labels, epoch_bar, eval_loader,
                                    evaluate_classifier, extract_features, feature_dim, label_set, log_json,
                                    make_head, seeded, train_view_loader)
from mscn.train.runtime import Runtime, setup_runtime
from mscn.train.schedule import lr_at, peak_lr
from mscn.train.watchdog import beat


class Scale(nn.Module):
    """Multiply by a constant (no parameters)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """``BatchNorm1d(dim, affine=False)`` (MAE App. A.2, MSN), a fixed ``1/sqrt(dim)`` so the
    whitened feature has norm ~1 whatever the width, then the linear classifier."""
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False), Scale(dim ** -0.5), make_head(dim, num_classes))


def _step(head, opt, feats: torch.Tensor, labels: torch.Tensor, lr: float) -> torch.Tensor:
    for g in opt.param_groups:
        g["lr"] = lr
    loss = F.cross_entropy(head(feats), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()  # no .item(): the epoch total is read once, at the epoch's end


def _end_epoch(rt: Runtime, protocol: str, epoch: int, total: torch.Tensor, steps: int, lr: float,
               log: bool = True) -> float:
    loss = mean_over_ranks(total, steps)  # the one host sync of the epoch; same value on every rank
    if not math.isfinite(loss):
        raise MscnError(f"{protocol}: non-finite loss in epoch {epoch} (lr {lr:g}); lower --lr")
    if log:
        log_json(rt, protocol=protocol, epoch=epoch, loss=loss, lr=lr)
    return loss


def linear_probe(backbone: nn.Module, cfg: Config, train_root: str, val_root: str, rt: Runtime | None = None, *,
                 epochs: int | None = None, lr: float | None = None, batch: int | None = None,
                 weight_decay: float | None = None, precompute: bool | None = None, seed: int | None = None,
                 log_epochs: bool = True) -> dict:
    """Train a linear classifier on ``backbone``'s frozen features; top-1/top-5 on ``val_root``.

    Unset arguments come from ``cfg.eval`` (linear_epochs, linear_lr, linear_batch,
    linear_weight_decay, precompute_features) and ``cfg.train.seed``. ``lr`` is the
    base lr for batch 256. The result records the seed and the mean loss of every epoch;
    ``log_epochs`` also prints a JSON line per epoch; off (the demo's and an ablation's
    probes), a progress bar over the epochs stands in for the lines.
    """
    with seeded(cfg, seed) as cfg:
        return _linear_probe(backbone, cfg, train_root, val_root, rt, epochs, lr, batch, weight_decay, precompute,
                             log_epochs)


def _linear_probe(backbone, cfg: Config, train_root, val_root, rt, epochs, lr, batch, weight_decay,
                  precompute, log_epochs: bool = True) -> dict:
    rt = rt or setup_runtime("auto", cfg.train.precision)
    e = cfg.eval
    epochs = e.linear_epochs if epochs is None else epochs
    base_lr = e.linear_lr if lr is None else lr
    batch = e.linear_batch if batch is None else batch
    wd = e.linear_weight_decay if weight_decay is None else weight_decay
    precompute = e.precompute_features if precompute is None else precompute
    if epochs < 1 or batch < 1 or base_lr <= 0:
        raise MscnError(f"linear probe: need epochs >= 1, batch >= 1, lr > 0 (got {epochs}, {batch}, {base_lr})")
    peak = peak_lr(base_lr, batch)
    classes, num_classes = label_set(train_root)

    backbone = backbone.to(rt.device).eval()
    backbone.requires_grad_(False)
    broadcast_module(backbone)  # frozen, outside DDP: every rank must extract with rank 0's weights
    head = probe_head(feature_dim(backbone, cfg.data.image_size, rt.device), num_classes).to(rt.device)
    if rt.dist.enabled:  # the head's BatchNorm over the global batch, as one process has it
        head = convert_sync_batchnorm(head, rt.device.type)
    # only the head has gradients to average; the frozen backbone stays outside DDP
    model = rt.wrap_ddp(head)
    opt = torch.optim.SGD(head.parameters(), lr=peak, momentum=MOMENTUM, weight_decay=wd)
    t0 = time.time()
    losses: list[float] = []

    if precompute:
        from mscn.pipelines.loader import check_size  # DALI: imported on first use (eval.common)

        train_loader = eval_loader(cfg, train_root, rt, batch)
        # as the image loop's loader refuses it: fewer images than one batch would train one
        # smaller batch per epoch at the lr of the nominal one
        check_size(train_loader.source, batch, "one training batch of the evaluation")
        train_f, train_y = extract_features(backbone, train_loader, rt, num_classes, desc="features, train")
        val_f, val_y = extract_features(backbone, eval_loader(cfg, val_root, rt, batch, classes=classes), rt,
                                        num_classes, desc="features, val")
        g = torch.Generator().manual_seed(cfg.train.seed)  # same permutation on every rank
        losses = _train_on_features(model, opt, train_f, train_y, rt, epochs, batch, peak, g, log_epochs)
        head.eval()
        with torch.no_grad():
            res = accuracy(head(val_f), val_y)
    else:
        train_loader = train_view_loader(cfg, train_root, rt, batch)
        steps = len(train_loader)
        for epoch in epoch_bar(rt, epochs, "linear probe", log_epochs):
            head.train()
            total = torch.zeros((), device=rt.device)
            for i, b in enumerate(train_loader):
                x, y, _ = batch_to(b, rt.device)
                check_labels(y, num_classes, train_loader)
                with torch.no_grad(), rt.autocast():
                    f = backbone(x)
                total += _step(model, opt, f.float(), y, lr_at(epoch * steps + i, epochs * steps, 0, peak))
            losses.append(_end_epoch(rt, "linear probe", epoch + 1, total, steps, opt.param_groups[0]["lr"],
                                     log_epochs))
        val_loader = eval_loader(cfg, val_root, rt, batch, classes=classes)
        res = evaluate_classifier(nn.Sequential(backbone, head), val_loader, rt, num_classes)

    return {"top1": res["top1"], "top5": res["top5"], "n_val": res["n"], "num_classes": num_classes,
            "epochs": epochs, "seed": cfg.train.seed, "loss": [round(v, 5) for v in losses],
            "wall_s": round(time.time() - t0, 1),
            "settings": {"base_lr": base_lr, "lr": peak, "batch": batch, "weight_decay": wd,
                         "momentum": MOMENTUM, "schedule": "cosine", "head": "bn(affine=False)/sqrt(dim)+linear",
                         "precompute": precompute,
                         "train_views": "center-crop (precomputed)" if precompute else "rrc+flip+highpass",
                         "world_size": rt.dist.world_size}}


def _train_on_features(model, opt, feats, labels, rt: Runtime, epochs: int, batch: int, peak: float,
                       g: torch.Generator, log: bool = True) -> list[float]:
    """SGD over cached features. Every rank holds them all and takes its part of each
    global batch of a shared permutation, so the global batch is ``batch`` as in the
    image loop; the last partial batch is dropped, as the training loader does."""
    n = feats.shape[0]
    steps = max(1, n // batch)
    losses = []
    for epoch in epoch_bar(rt, epochs, "linear probe", log):
        perm = torch.randperm(n, generator=g).to(feats.device)
        total = torch.zeros((), device=feats.device)
        for i in range(steps):
            # tensor_split leaves no rank empty while the batch has >= world_size samples
            idx = perm[i * batch:(i + 1) * batch].tensor_split(rt.dist.world_size)[rt.dist.rank]
            lr = lr_at(epoch * steps + i, epochs * steps, 0, peak)
            beat()  # a step on cached features is progress too (mscn.train.watchdog)
            total += _step(model, opt, feats[idx], labels[idx], lr)
        losses.append(_end_epoch(rt, "linear probe (precomputed)", epoch + 1, total, steps, lr, log))
    return losses
