"""Weighted k-nearest-neighbour classifier on frozen features.

The non-parametric evaluation of InstDisc (Wu et al. 2018, https://arxiv.org/abs/1805.01978)
as used by DINO (``eval_knn.py``, https://arxiv.org/abs/2104.14294): features are L2
normalised, the k most cosine-similar training samples vote for their label with weight
``exp(similarity / T)``; k=20, T=0.07. Offline (``mscn eval knn``) and as an online
monitor during pretraining (:func:`knn_eval` restores the backbone's train mode).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mscn.errors import DataError, MscnError
from mscn.train.distributed import broadcast_module
from mscn.train.eval.common import data_name, extract_features, topk_correct
from mscn.train.runtime import Runtime
from mscn.train.watchdog import beat

DEFAULT_K = 20
DEFAULT_T = 0.07


@torch.no_grad()
def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
               num_classes: int, k: int = DEFAULT_K, T: float = DEFAULT_T, chunk: int = 1024) -> torch.Tensor:
    """Class votes ``[Q, C]``: sum of ``exp(cos/T)`` over each query's k nearest train samples.

    Queries are processed in chunks so that the ``[chunk, N]`` similarity matrix, not
    ``[Q, N]``, bounds the memory (ImageNet: N = 1.28M). Each query's votes are scaled
    by ``exp(-max_sim / T)`` (its nearest neighbour weighs 1): the same ranking as
    DINO's, without overflowing float32 at small T (exp(1/0.01) does).
    """
    if train_feats.shape[0] == 0:
        raise MscnError("kNN: the training set has no sample")
    if T <= 0:
        raise MscnError(f"kNN: temperature must be > 0, got {T}")
    train = F.normalize(train_feats.float(), dim=1)
    query = F.normalize(query_feats.float(), dim=1)
    k = min(k, train.shape[0])
    out = torch.zeros(query.shape[0], num_classes, device=query.device)
    for s in range(0, query.shape[0], chunk):
        beat()  # 50k queries against 1.28 M samples take a while: a chunk is progress, no stall
        sim = query[s:s + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = ((top_sim - top_sim[:, :1]) / T).exp()  # topk is sorted: column 0 is the max
        out[s:s + chunk].scatter_add_(1, train_labels[top_idx], weights)
    return out


def knn_classify(train_feats, train_labels, val_feats, val_labels, k: int = DEFAULT_K,
                 T: float = DEFAULT_T) -> dict:
    """Top-1/top-5 (%) of the weighted kNN classifier on given features.

    ``k`` in the result is the number of neighbours that voted: at most the training set's size.
    """
    num_classes = int(max(train_labels.max().item(), val_labels.max().item())) + 1
    scores = knn_scores(train_feats, train_labels.long(), val_feats, num_classes, k, T)
    c1, c5 = topk_correct(scores, val_labels.long())
    return {"top1": 100.0 * c1.float().mean().item(), "top5": 100.0 * c5.float().mean().item(),
            "n_train": int(train_feats.shape[0]), "n_val": int(val_feats.shape[0]),
            "k": min(k, int(train_feats.shape[0])), "T": T}


def knn_eval(backbone: nn.Module, train_loader, val_loader, rt: Runtime, k: int = DEFAULT_K,
             T: float = DEFAULT_T, progress: bool = False) -> dict:
    """kNN top-1/top-5 of ``backbone`` (unwrapped from DDP, on ``rt.device``) on eval-view loaders.

    Under torch.distributed every rank passes its own shard; features are gathered so
    that every rank returns the same numbers. Safe to call inside a training loop.
    ``progress``: a bar per feature pass on stderr (rank 0).
    """
    broadcast_module(backbone)  # no DDP syncs it here: rank 0's weights (and BN stats) on every rank
    # progress: bars on stderr (mscn eval knn); not inside pretraining, under its own bar
    train_f, train_y = extract_features(backbone, train_loader, rt, desc="kNN features, train" if progress else None)
    val_f, val_y = extract_features(backbone, val_loader, rt, desc="kNN features, val" if progress else None)
    # a val label no training sample has can never be voted for: a numbering mismatch (a
    # shard's .cls, a file list's labels), which would score silently low
    unknown = sorted(set(val_y.unique().tolist()) - set(train_y.unique().tolist()))
    if unknown:
        names = getattr(getattr(train_loader, "source", None), "classes", ()) or ()
        shown = ", ".join(f"{u} ({names[u]!r})" if 0 <= u < len(names) else str(u) for u in unknown[:5])
        raise DataError(f"{data_name(val_loader)}: label(s) {shown} that no training sample has: a class folder of "
                        f"the training set with no image in it, or labels (a shard's .cls, a file list's numbers) "
                        f"that do not match the training set's classes")
    return knn_classify(train_f, train_y, val_f, val_y, k, T)
