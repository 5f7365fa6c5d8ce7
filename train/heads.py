"""Projector and predictor MLPs of paper App. A.1.

* SimCLR projector: ``in -> hidden -> out`` (2048-2048-256), ReLU between the two
  layers and batch norm after *every* layer, the last included (SimCLR v2 style).
  The linear layers carry no bias because a BN follows each of them.
* BYOL projector ``in -> 4096 -> 256`` and predictor ``256 -> 4096 -> 256``: ReLU
  between, batch norm after every layer *except* the last (Grill et al., 2020).

Widths come from ``cfg.model`` (proj_hidden, proj_out, pred_hidden).
"""
from __future__ import annotations

from torch import nn


def simclr_projector(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear-BN (BN after every layer)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out, bias=False),
        nn.BatchNorm1d(out),
    )


def byol_mlp(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear: BYOL's projector and predictor (no BN after the last layer)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out),
    )
