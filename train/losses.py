"""Joint-embedding losses on every pair of views (paper §5.2 "Multicrops", App. A.1).

With V same-resolution views per image (2 main + 2 extra masked views by default) the
paper "applies the siamese network loss on every pair of them". How the pairs are
averaged here, chosen so that V=2 gives back each method's original loss exactly:

* SimCLR (:func:`info_nce`): for each unordered pair {a, b} the NT-Xent loss of Chen et
  al. (2020a) over the 2N embeddings of views a and b (N = global batch): every anchor
  has one positive (the same image in the other view) and 2N-2 negatives (all other
  embeddings of the two views, from every rank). The pair loss is the mean over its 2N
  anchors; the total is the mean over the V(V-1)/2 pairs.
* BYOL (:func:`byol_loss`): for each unordered pair {a, b} the symmetric loss
  ``l(p_a, t_b) + l(p_b, t_a)`` of Grill et al. (2020), with ``l = 2 - 2 cos`` averaged
  over the batch; the total is the mean over the V(V-1)/2 pairs.

So every pair weighs the same and the loss scale does not grow with V.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mscn.train.distributed import gather_with_grad


def _no_autocast(t: torch.Tensor):
    """Autocast off for the loss: the loop calls the model (and so these losses) inside
    ``torch.autocast(bf16)``, where ``@``/``einsum`` recast even fp32 inputs to bf16; a
    ``.float()`` alone would not keep the similarities in fp32."""
    return torch.autocast(t.device.type, enabled=False)


def info_nce(views: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """NT-Xent averaged over all view pairs, negatives gathered from every rank.

    ``views[v]`` is this rank's (B, D) embedding of view v. Only this rank's anchors are
    scored (against all ranks' keys), so each rank returns the mean over its own anchors;
    DDP's gradient averaging makes that the mean over the global batch.
    """
    with _no_autocast(views[0]):
        return _info_nce(views, temperature)


def _info_nce(views: list[torch.Tensor], temperature: float) -> torch.Tensor:
    n_views, b = len(views), views[0].shape[0]
    # fp32 for the similarity matrix whatever the autocast dtype (autocast is off here):
    # logits/temperature need the mantissa, and exp() of bf16 logits is coarse.
    queries = F.normalize(torch.cat(views).float(), dim=1)  # (V*B, D), view-major
    keys = gather_with_grad(queries)  # (W*V*B, D), rank-major then view-major
    world = keys.shape[0] // (n_views * b)
    keys = keys.view(world, n_views, b, -1).transpose(0, 1).reshape(n_views * world * b, -1)
    n = world * b  # global batch
    logits = (queries @ keys.T / temperature).view(n_views, b, n_views, n)

    rank = torch.distributed.get_rank() if world > 1 else 0
    own = torch.arange(b, device=queries.device) + rank * b  # global index of each anchor
    self_mask = F.one_hot(own, n).bool()  # (B, N): an anchor is not its own negative
    target = own + n  # the positive sits in the second half of [same-view keys, other-view keys]
    losses = []
    for a in range(n_views):
        same = logits[a, :, a].masked_fill(self_mask, float("-inf"))
        for c in range(n_views):
            if c != a:
                losses.append(F.cross_entropy(torch.cat([same, logits[a, :, c]], dim=1), target))
    # mean over ordered pairs == mean over unordered pairs of the 2-direction NT-Xent
    return torch.stack(losses).mean()


def byol_loss(preds: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """BYOL's normalized MSE, symmetric in each pair, averaged over the view pairs.

    ``preds[v]``: online predictions of view v; ``targets[v]``: target projections
    (treated as constants). For V=2 this is exactly BYOL's ``L + L~``.
    """
    with _no_autocast(preds[0]):  # fp32 cosines even inside the loop's bf16 autocast
        return _byol_loss(preds, targets)


def _byol_loss(preds: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    n_views = len(preds)
    p = F.normalize(torch.stack(preds).float(), dim=-1)  # (V, B, D)
    t = F.normalize(torch.stack(targets).float().detach(), dim=-1)
    cos = torch.einsum("ibd,jbd->ijb", p, t).mean(-1)  # (V, V): cos(p_i, t_j) over the batch
    off_diag = ~torch.eye(n_views, dtype=torch.bool, device=cos.device)
    n_pairs = n_views * (n_views - 1) / 2
    return (2 - 2 * cos[off_diag]).sum() / n_pairs
