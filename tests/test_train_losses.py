"""InfoNCE and BYOL losses on every view pair (paper §5.2 "Multicrops", App. A.1),
against naive per-pair, per-anchor references written with Python loops."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mscn.train.losses import byol_loss, info_nce


def naive_nt_xent_pair(za: torch.Tensor, zb: torch.Tensor, tau: float) -> float:
    """Chen et al. (2020a) NT-Xent over the 2N embeddings of one view pair, anchor by anchor."""
    z = F.normalize(torch.cat([za, zb]).double(), dim=1)
    n = za.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        total += -(float(z[i] @ z[pos]) / tau - math.log(denom))
    return total / (2 * n)


@pytest.mark.parametrize("n_views", [2, 3, 4])
def test_info_nce_matches_naive_reference(n_views):
    torch.manual_seed(n_views)
    views = [torch.randn(6, 5) for _ in range(n_views)]
    tau = 0.2
    expected = sum(naive_nt_xent_pair(a, b, tau) for a, b in itertools.combinations(views, 2))
    expected /= n_views * (n_views - 1) / 2
    assert info_nce(views, tau).item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_is_low_for_matching_views_and_high_for_random():
    torch.manual_seed(0)
    z = torch.randn(16, 32)
    aligned = info_nce([z, z + 0.01 * torch.randn_like(z)], 0.2).item()
    random = info_nce([z, torch.randn(16, 32)], 0.2).item()
    assert aligned < 0.5 < random


def naive_byol_pair(p: torch.Tensor, t: torch.Tensor) -> float:
    total = 0.0
    for i in range(p.shape[0]):
        cos = float(p[i].double() @ t[i].double()) / (float(p[i].double().norm()) * float(t[i].double().norm()))
        total += 2 - 2 * cos
    return total / p.shape[0]


@pytest.mark.parametrize("n_views", [2, 4])
def test_byol_loss_matches_naive_symmetric_reference(n_views):
    torch.manual_seed(10 + n_views)
    preds = [torch.randn(5, 7) for _ in range(n_views)]
    targets = [torch.randn(5, 7) for _ in range(n_views)]
    expected = sum(naive_byol_pair(preds[a], targets[b]) + naive_byol_pair(preds[b], targets[a])
                   for a, b in itertools.combinations(range(n_views), 2))
    expected /= n_views * (n_views - 1) / 2
    assert byol_loss(preds, targets).item() == pytest.approx(expected, rel=1e-5)


def test_byol_loss_does_not_backpropagate_into_targets():
    preds = [torch.randn(4, 3, requires_grad=True) for _ in range(2)]
    targets = [torch.randn(4, 3, requires_grad=True) for _ in range(2)]
    byol_loss(preds, targets).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in preds)
    assert all(t.grad is None for t in targets)
