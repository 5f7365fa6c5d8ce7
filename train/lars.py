"""LARS (You et al., 2017), the optimizer of paper App. A.1 (SimCLR and BYOL recipes).

For a parameter ``w`` with gradient ``g`` in an adapted group::

    d  = g + weight_decay * w
    d *= trust_coef * ||w|| / ||d||        (1 where either norm is 0)
    mu = momentum * mu + d
    w -= lr * mu

Biases and batch-norm parameters (every parameter with ``ndim <= 1``) go into a group
with neither weight decay nor the trust ratio, as in SimCLR and BYOL. The groups are
built explicitly by :func:`param_groups` and their sizes are reported for the log.
"""
from __future__ import annotations

import torch
from torch import nn

from mscn.config import OptimCfg


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with heavy-ball momentum.

    Groups carry a ``lars`` flag: True applies weight decay and the trust ratio.
    The trust ratio is computed with ``torch.where`` on device tensors: no per-parameter
    host sync (``if norm > 0`` would force one for every parameter of every step).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 trust_coef: float = 0.001):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coef=trust_coef, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"] != 0:
                    d = d.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm = torch.linalg.vector_norm(p)
                    d_norm = torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["trust_coef"] * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    d = d * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                mu = state["momentum_buffer"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict], str]:
    """Two groups: weights (decay + LARS) and biases/norm params (neither); plus a log line.

    Frozen parameters (BYOL's target network) are left out: the EMA updates them.
    """
    adapted, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (plain if p.ndim <= 1 else adapted).append(p)
    groups = [
        {"name": "weights", "params": adapted, "weight_decay": weight_decay, "lars": True},
        {"name": "bias_and_norm", "params": plain, "weight_decay": 0.0, "lars": False},
    ]
    desc = ", ".join(f"{g['name']}: {len(g['params'])} tensors / {sum(p.numel() for p in g['params']):,} values"
                     for g in groups)
    return groups, desc


def build_optimizer(cfg: OptimCfg, model: nn.Module, lr: float) -> tuple[torch.optim.Optimizer, str]:
    """LARS (the paper's) or SGD with momentum over :func:`param_groups`; the lr is set per step."""
    groups, desc = param_groups(model, cfg.weight_decay)
    if cfg.name == "lars":
        opt = LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, trust_coef=cfg.trust_coef)
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return opt, f"{cfg.name}: {desc}"
