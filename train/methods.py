"""SimCLR and BYOL as modules mapping a list of views to a scalar loss (paper App. A.1).

The encoder sees all V views in one forward (``torch.cat``): one big batch keeps the
GPU busy, and batch norm then normalises over all views of the (global, with SyncBN)
batch, as SimCLR does with its two views.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from mscn.config import Config
from mscn.train.heads import byol_mlp, simclr_projector
from mscn.train.losses import byol_loss, info_nce
from mscn.train.models import build_backbone
from mscn.train.schedule import ema_at


class SiameseMethod(nn.Module):
    """What the loop needs: ``forward(views) -> loss`` and a hook after each optimizer step."""

    backbone: nn.Module

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called once after optimizer step ``step`` (0-based); nothing by default."""


class SimCLR(SiameseMethod):
    """Encoder + projector 2048-2048-256 (BN after every layer), InfoNCE at tau=0.2."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.backbone, feat_dim = build_backbone(cfg.model.arch)
        self.projector = simclr_projector(feat_dim, cfg.model.proj_hidden, cfg.model.proj_out)
        self.temperature = cfg.method.temperature

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        z = self.projector(self.backbone(torch.cat(views)))
        return info_nce(list(z.chunk(len(views))), self.temperature)


class BYOL(SiameseMethod):
    """Online encoder+projector+predictor; the target is their EMA (Grill et al., 2020).

    The target encoder and projector start as copies of the online ones and follow them
    with momentum ``ema_at(step)``: 0.996 -> 1.0 on a cosine over the run (App. A.1).
    The target runs in train mode (batch statistics) like BYOL's, without gradients.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.backbone, feat_dim = build_backbone(m.arch)
        self.projector = byol_mlp(feat_dim, m.proj_hidden, m.proj_out)
        self.predictor = byol_mlp(m.proj_out, m.pred_hidden, m.proj_out)
        # the target must copy the online weights *before* any device move or SyncBN
        # conversion so both follow the same transformations applied to the whole module
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.ema_base, self.ema_final = cfg.method.ema_base, cfg.method.ema_final
        self.foreach = cfg.optim.foreach

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(views)
        p = self.predictor(self.projector(self.backbone(x)))
        with torch.no_grad():
            t = self.target_projector(self.target_backbone(x))
        return byol_loss(list(p.chunk(len(views))), list(t.chunk(len(views))))

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online, for every parameter.

        BN running statistics are buffers, not parameters: the target's own train-mode
        forwards keep them up to date. ``momentum`` is a Python float: no host sync. One
        multi-tensor lerp for all parameters, or a lerp per tensor with ``optim.foreach=false``
        (train/lars.py says why).
        """
        online = [*self.backbone.parameters(), *self.projector.parameters()]
        target = [*self.target_backbone.parameters(), *self.target_projector.parameters()]
        if self.foreach:
            torch._foreach_lerp_(target, online, 1.0 - momentum)
        else:
            for o, t in zip(online, target):
                t.lerp_(o, 1.0 - momentum)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        self.update_target(ema_at(step, total_steps, self.ema_base, self.ema_final))


METHODS: dict[str, type[SiameseMethod]] = {"simclr": SimCLR, "byol": BYOL}


def build_method(cfg: Config) -> SiameseMethod:
    return METHODS[cfg.method.name](cfg)
