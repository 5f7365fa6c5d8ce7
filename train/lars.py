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

    The step works on whole groups with torch's multi-tensor (``_foreach``) ops: a
    per-parameter loop made about 12 calls per weight tensor (400 per step for a
    ResNet-18's weights), and on a GPU box each is host time (Python, dispatch, a launch)
    on the cores DALI's threads want while the GPU waits. Now a group takes ~10 calls.
    The trust ratios of a group are computed together as one vector with ``torch.where``
    on the device: no host sync (``if norm > 0`` would force one per parameter). One call
    still launches a kernel per tensor on a GPU: scaling each tensor by its own 0-dim trust
    ratio is outside torch's fused multi-tensor path (sizes must match), so it loops in C++.
    On the CPU, for float32 parameters, each op is the same per-tensor arithmetic as the
    loop, so results are unchanged bit for bit (tested). ``foreach=False`` keeps the loop
    (torch's own optimizers have the same switch), for comparison
    (scripts/bench_optimizer.py); a group whose tensors live on several devices uses it
    too, as the stacked norms need one device.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 trust_coef: float = 0.001, foreach: bool = True):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coef=trust_coef, lars=True)
        super().__init__(params, defaults)
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            uniform = len({p.device for p in params}) == 1
            (self._group_step if self.foreach and uniform else self._group_loop)(group, params)
        return loss

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]

    def _group_loop(self, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            d = p.grad
            if group["weight_decay"] != 0:
                d = d.add(p, alpha=group["weight_decay"])
            if group["lars"]:
                w_norm = torch.linalg.vector_norm(p)
                d_norm = torch.linalg.vector_norm(d)
                d = d * _trust_ratio(w_norm, d_norm, group["trust_coef"])
            mu = self._momentum_buffer(p)
            mu.mul_(group["momentum"]).add_(d)
            p.add_(mu, alpha=-group["lr"])

    def _group_step(self, group: dict, params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        if group["weight_decay"] != 0:
            d = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        else:
            d = grads
        if group["lars"]:
            w_norm = torch.stack(torch._foreach_norm(params))
            d_norm = torch.stack(torch._foreach_norm(d))
            d = torch._foreach_mul(d, list(_trust_ratio(w_norm, d_norm, group["trust_coef"]).unbind()))
        bufs = [self._momentum_buffer(p) for p in params]
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, d)
        torch._foreach_add_(params, bufs, alpha=-group["lr"])


def _trust_ratio(w_norm: torch.Tensor, d_norm: torch.Tensor, coef: float) -> torch.Tensor:
    """``coef * ||w|| / ||d||``, or 1 where either norm is 0; on the device, no host sync."""
    return torch.where((w_norm > 0) & (d_norm > 0), coef * w_norm / d_norm, torch.ones_like(w_norm))


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
        opt = LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, trust_coef=cfg.trust_coef,
                   foreach=cfg.foreach)
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              foreach=cfg.foreach)
    return opt, f"{cfg.name}: {desc}"
