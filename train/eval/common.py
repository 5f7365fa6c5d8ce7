"""What every evaluation protocol shares (paper App. A.2-A.4).

* :func:`extract_features` / :func:`evaluate_classifier` run a model over an eval
  loader on CPU, one GPU or several ranks, under the run's autocast
  (``train.precision``), and gather the results on every rank. DALI pads the last
  shard with repeated samples, so results are de-duplicated by the sample index of
  each batch before anything is counted.
* :func:`topk_correct` / :func:`accuracy`: top-1/top-5 in percent.
* :func:`eval_loader` (center-crop views) and :func:`train_view_loader` (random
  crops, shuffled): this rank's DALI loaders. An evaluation root's labels are mapped
  by class name into the train root's label set (:func:`label_set`).
* :func:`seeded`: one seed for every random choice of a protocol (python, numpy,
  torch, the DALI pipelines' seeds and data order), so a protocol run twice on the
  CPU gives the same numbers.
"""
from __future__ import annotations

import dataclasses
import json
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mscn.config import Config
from mscn.data.source import resolve_source
from mscn.errors import DataError, MscnError
from mscn.train.distributed import check_same_data, gather_cat
from mscn.train.runtime import Runtime
from mscn.train.watchdog import StallWatch, beat

MOMENTUM = 0.9  # SGD momentum of the linear probe and fine-tuning (paper A.2, A.3)


def make_head(dim: int, num_classes: int) -> nn.Linear:
    """Linear classifier initialised as in Barlow Twins' evaluate.py (N(0, 0.01), zero bias)."""
    head = nn.Linear(dim, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head


@torch.no_grad()
def feature_dim(backbone: nn.Module, image_size: int, device: torch.device) -> int:
    """Width of the pooled feature (512 for resnet18/34, 2048 for resnet50)."""
    was = backbone.training
    backbone.eval()
    d = backbone(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1]
    backbone.train(was)
    return int(d)


def watched(cfg: Config, rt: Runtime, stacks_dir: str | Path) -> StallWatch:
    """A context for an evaluation under a stall watch (``train.stall_warn_s`` of its recipe,
    which a ``train.stall_warn_s=`` override sets): a rank whose loader or peer hangs says so,
    with its threads' stacks in ``stacks_dir``, instead of waiting out the process group's
    timeout in silence (:mod:`mscn.train.watchdog`). Every batch (:func:`batch_to`), step on
    cached features and kNN chunk is progress."""
    return StallWatch(rt.dist.rank, rt.dist.world_size, cfg.train.stall_warn_s, stacks_dir, phase="eval")


def batch_to(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, index) of one ``MscnBatch`` (one view) on ``device``.

    Every evaluation loop over images takes its batches here, so a batch is progress for the
    stall watch (:func:`mscn.train.watchdog.beat`; pretraining's kNN monitor included): a
    feature pass over 1.28 M images moves, it is no stall."""
    beat()
    images = batch.views[0].to(device, non_blocking=True).float()
    labels = batch.labels.to(device, non_blocking=True).long().view(-1)
    index = batch.index.to(device, non_blocking=True).long().view(-1)
    return images, labels, index


def data_name(loader) -> str:
    """The dataset a loader reads, for a message (its Source's root; any iterable works)."""
    return getattr(getattr(loader, "source", None), "root", "the evaluation data")


def check_labels(y: torch.Tensor, num_classes: int | None, loader) -> None:
    """One DataError naming the dataset when a batch holds a label that is not a class of
    the training set (``0 <= y < num_classes``; only ``y >= 0`` when unknown): a shard's
    ``.cls`` or a file list's label out of range would otherwise score silently wrong (kNN)
    or fail deep in a loss (IndexError, a device assert on the GPU). One host sync per batch."""
    bad = (y < 0) | (y >= num_classes) if num_classes else (y < 0)
    if not bool(bad.any()):
        return
    v = int(y[bad][0])
    root = data_name(loader)
    what = (f"a sample labelled {v}, outside the {num_classes} classes of the training set" if v >= 0
            else f"a sample without a label ({v})")
    raise DataError(f"{root}: {what}; its labels (a shard's .cls, a file list's numbers) do not match its classes: "
                    "rescan it (mscn data scan) or repack it (mscn data pack)")


def unique_by_index(index: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Keep the first row of every sample index, sorted by index (drops DALI's padding).

    Index -1 means "unknown" (tar shards without ``.idx`` members): those rows cannot be
    de-duplicated and are all kept (PARTIAL already dropped the padding); collapsing
    them would leave a single sample.
    """
    order = torch.argsort(index, stable=True)
    idx = index[order]
    keep = torch.ones_like(idx, dtype=torch.bool)
    keep[1:] = (idx[1:] != idx[:-1]) | (idx[1:] < 0)
    return (idx[keep], *(t[order][keep] for t in tensors))


def epoch_bar(rt: Runtime, epochs: int, desc: str, log: bool):
    """``range(epochs)``; when the epochs are not logged one JSON line each (``log``), a
    progress bar on stderr (rank 0) instead, so that a quiet probe is not a silent one."""
    if log or not rt.is_main:
        return range(epochs)
    return tqdm(range(epochs), desc=desc, unit="epoch", mininterval=2.0, leave=False, dynamic_ncols=True)


@torch.no_grad()
def extract_features(backbone: nn.Module, loader, rt: Runtime, num_classes: int | None = None,
                     desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and labels of every sample of ``loader``, on every rank (labels
    checked against ``num_classes``, :func:`check_labels`). ``desc``: a progress bar on
    stderr under that name (rank 0; None, as inside pretraining, for none).

    The backbone runs in eval mode (BN uses its running statistics) and its mode is
    restored afterwards, so this is safe as an online monitor inside pretraining.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels, index = [], [], []
    batches = loader
    if desc and rt.is_main:  # ImageNet's 1.28 M images take minutes even on a GPU: not in silence
        batches = tqdm(loader, total=len(loader), desc=desc, unit="batch", mininterval=2.0, leave=False,
                       dynamic_ncols=True)
    for batch in batches:
        x, y, i = batch_to(batch, rt.device)
        check_labels(y, num_classes, loader)
        with rt.autocast():
            f = backbone(x)
        feats.append(f.float())
        labels.append(y)
        index.append(i)
    backbone.train(was_training)
    if not feats:
        raise MscnError("the evaluation loader yielded no batch (empty dataset?)")
    f, y, i = (gather_cat(torch.cat(t)) for t in (feats, labels, index))
    _, f, y = unique_by_index(i, f, y)
    return f, y


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Per-sample booleans: is the label among the top-k scores (k capped at #classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels.view(-1, 1)
    return [hit[:, : min(k, kmax)].any(dim=1) for k in ks]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """``{"top1": %, "top5": %, "n": samples}``."""
    c1, c5 = topk_correct(logits, labels)
    return {"top1": 100.0 * c1.float().mean().item(), "top5": 100.0 * c5.float().mean().item(),
            "n": int(labels.numel())}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, rt: Runtime, num_classes: int | None = None) -> dict:
    """Top-1/top-5 of ``model`` (images -> logits) over ``loader``, exact under DDP; labels
    checked against ``num_classes`` (:func:`check_labels`)."""
    was_training = model.training
    model.eval()
    c1s, c5s, index = [], [], []
    for batch in loader:
        x, y, i = batch_to(batch, rt.device)
        check_labels(y, num_classes, loader)
        with rt.autocast():
            logits = model(x)
        c1, c5 = topk_correct(logits.float(), y)
        c1s.append(c1)
        c5s.append(c5)
        index.append(i)
    model.train(was_training)
    if not index:
        raise MscnError("the evaluation loader yielded no batch (empty dataset?)")
    c1, c5, i = (gather_cat(torch.cat(t)) for t in (c1s, c5s, index))
    _, c1, c5 = unique_by_index(i, c1, c5)
    return {"top1": 100.0 * c1.float().mean().item(), "top5": 100.0 * c5.float().mean().item(),
            "n": int(c1.numel())}


def label_set(train_root: str, fmt: str = "auto") -> tuple[tuple[str, ...] | None, int]:
    """(class names, number of classes) of the training set, which define the labels of
    every evaluation root (None: a file list or shards without class names, whose numeric
    labels are taken as they are). DataError for data without labels."""
    src = resolve_source(train_root, fmt)
    if not src.labelled:
        raise DataError(f"{train_root}: has no labels (flat folder, list or shards without labels); "
                        "evaluations need ROOT/<class>/<image> or a 'relpath label' list")
    return (src.classes or None), src.num_classes


@contextmanager
def seeded(cfg: Config, seed: int | None):
    """Seed python, numpy and torch with ``seed`` (default ``train.seed``) and turn on
    torch's deterministic algorithms (warn-only: a CUDA op without a deterministic
    version warns instead of failing); yields ``cfg`` with ``train.seed = seed``, from
    which the DALI loaders derive their pipeline and shuffle seeds. Restores torch's
    deterministic setting afterwards (this may run inside pretraining or tests)."""
    seed = cfg.train.seed if seed is None else seed
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


def log_json(rt: Runtime, **fields) -> None:
    """One JSON line on stdout, from rank 0 only."""
    if rt.is_main:
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in fields.items()}), flush=True)


def eval_loader(cfg: Config, root: str, rt: Runtime, global_batch: int, file_list: str | None = None,
                classes: tuple[str, ...] | None = None):
    """This rank's DALI loader of evaluation views over ``root``: resize + center crop +
    high-pass, every sample once across ranks (``mscn.pipelines.build_eval_loader``).
    ``file_list``: a ``relpath label`` list relative to root. ``classes``: the label set
    (:func:`label_set` of the train root) that ``root``'s class names map into."""
    return _loader(cfg, root, rt, global_batch, file_list, False, classes)


def train_view_loader(cfg: Config, root: str, rt: Runtime, global_batch: int, file_list: str | None = None,
                      classes: tuple[str, ...] | None = None):
    """This rank's DALI loader of classifier-training views over ``root``: random resized
    crop + flip + high-pass (paper A.2), shuffled, the last partial batch dropped."""
    return _loader(cfg, root, rt, global_batch, file_list, True, classes)


def _loader(cfg: Config, root: str, rt: Runtime, global_batch: int, file_list: str | None, train_views: bool,
            classes: tuple[str, ...] | None):
    from mscn.pipelines import build_eval_loader  # DALI is imported on first use only

    loader = build_eval_loader(cfg, root, rank=rt.dist.rank, world_size=rt.dist.world_size,
                               local_rank=rt.dist.local_rank, device=rt.device,
                               batch_size=rt.per_rank(global_batch), train_views=train_views,
                               file_list=file_list, classes=classes)
    # every rank scores its slice: a node with another copy would score other images (all ranks, one line)
    check_same_data(loader.source, rt.dist)
    if not loader.source.labelled:  # every label -1: each prediction would count as wrong, 0 % quietly
        raise DataError(f"{loader.source.root}: has no labels (flat folder, list or shards without labels); an "
                        "evaluation needs labelled images: ROOT/<class>/<image>, a 'relpath label' list or shards "
                        "with .cls")
    return loader
