"""What a result scored, as short digests recorded in its ``result.json``: the weights, the
datasets and a fine-tuning subset. Paths alone do not tell two results apart when a run is
retrained into the same folder or a subset file is rewritten in place, so ``mscn eval
report`` keys results by these too (:mod:`mscn.train.eval.results`). Not in the paper: the
bookkeeping of its evaluation protocols (§6, App. A.2-A.4).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from mscn.data.source import resolve_source, sized_digest


def weights_digest(module: nn.Module) -> str:
    """16 hex digits of every tensor of ``module``'s state dict (name, dtype, shape, bytes),
    taken before the protocol trains anything. A copy of a checkpoint has its digest; the
    same path retrained does not. 0.1 s for a ResNet-50 on the 2-core CPU machine."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def data_digest(root: str, fmt: str = "auto") -> str:
    """The dataset at ``root`` as the loaders read it: its files (relative to the root), their
    labels and sizes, or its shards and their sizes, and its classes
    (:func:`mscn.data.source.sized_digest`: copies that share their names but not their
    images, one resized, differ)."""
    return sized_digest(resolve_source(root, fmt))


def file_digest(path: str | Path) -> str:
    """16 hex digits of a (small) file's bytes: a fine-tuning subset list."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16]
