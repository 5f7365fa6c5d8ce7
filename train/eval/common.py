"""What every evaluation protocol shares (paper App. A.2-A.4).

* :func:`load_pretrained` turns a pretraining checkpoint (or ``"random"``) into a
  torchvision ResNet backbone without its classifier, plus the pretraining config, so
  that the evaluation views use the same image size and high-pass as pretraining.
* :func:`extract_features` / :func:`evaluate_classifier` run a model over an eval
  loader on CPU, one GPU or several ranks, and gather the results on every rank.
  DALI pads the last shard with repeated samples, so results are de-duplicated by the
  sample index of each batch before anything is counted.
* :func:`topk_correct` / :func:`accuracy`: top-1/top-5 in percent.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mscn.config import Config, apply_override, from_dict, highpass_window, load_config, to_dict
from mscn.data.imagefolder import find_classes
from mscn.errors import ConfigError, DataError, MscnError
from mscn.train.distributed import DistInfo, env_local_rank, init_distributed, pick_device
from mscn.train.models import ARCHS, build_backbone

MOMENTUM = 0.9  # SGD momentum of the linear probe and fine-tuning (paper A.2, A.3)


class HighPassMismatchWarning(UserWarning):
    """Evaluation views use another high-pass filter than the pretraining views."""


def _apply_overrides(cfg: Config, overrides: list[str], src: str) -> Config:
    tree = to_dict(cfg)
    for item in overrides:
        apply_override(tree, item)
    return from_dict(tree, src)


def _read_checkpoint(path: str) -> dict:
    p = Path(path)
    if p.is_dir():  # a run directory: its final.pt, else its newest checkpoint that loads
        from mscn.train.checkpoint import find_latest_valid

        if (p / "final.pt").is_file():
            return _read_checkpoint(str(p / "final.pt"))
        found = find_latest_valid(p / "checkpoints" if (p / "checkpoints").is_dir() else p)
        if found is None:
            raise MscnError(f"{path}: no final.pt and no readable checkpoints/ckpt_*.pt in this run directory")
        return found[1]
    if not p.is_file():
        raise MscnError(f"checkpoint not found: {path} (pass a file written by mscn pretrain, or 'random')")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors: a truncated or foreign file
        raise MscnError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    missing = [k for k in ("backbone", "arch", "config") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise MscnError(f"{path}: not an mscn pretraining checkpoint (missing {', '.join(missing)}); "
                        "expected the file written by mscn pretrain")
    return ckpt


def check_highpass(pre: Config, cfg: Config, src: str, strict: bool = False) -> None:
    """Warn (or raise with ``strict``) when eval views would use another high-pass.

    The encoder only ever saw high-passed inputs of one sigma; paper App. B changes the
    evaluation sigma together with the pretraining one.
    """
    a, b = pre.highpass, cfg.highpass
    pre_desc = f"enabled={a.enabled}, sigma={a.sigma}, window={highpass_window(a.sigma, a.window)}"
    new_desc = f"enabled={b.enabled}, sigma={b.sigma}, window={highpass_window(b.sigma, b.window)}"
    if pre_desc == new_desc:
        return
    msg = (f"{src}: pretrained with high-pass ({pre_desc}) but evaluated with ({new_desc}); "
           "drop the highpass.* override to evaluate as pretrained (paper App. B)")
    if strict:
        raise ConfigError(msg + ", or drop --strict to allow it")
    warnings.warn(msg, HighPassMismatchWarning, stacklevel=2)


def load_pretrained(path: str, arch: str | None = None, overrides: list[str] | None = None,
                    config: str | None = None, strict: bool = False) -> tuple[nn.Module, str, Config]:
    """Backbone, its architecture and the config to evaluate it with.

    ``path`` is a checkpoint written by the pretraining loop (``backbone`` = torchvision
    ResNet state_dict without ``fc``, ``arch``, ``config`` = plain dict), a run
    directory (its newest valid ``ckpt_*.pt``), or ``"random"``
    for a random-init baseline (config from ``config`` + ``overrides``, arch from
    ``arch`` or ``model.arch``). ``overrides`` (``key=value``) are applied on top of the
    pretraining config; a requested architecture other than the checkpoint's is a
    :class:`MscnError`, a different high-pass is a warning (an error with ``strict``).
    """
    overrides = list(overrides or [])
    if path == "random":
        if arch:
            overrides.append(f"model.arch={arch}")
        cfg = load_config(config, overrides)
        backbone, _ = build_backbone(cfg.model.arch)
        return backbone, cfg.model.arch, cfg

    ckpt = _read_checkpoint(path)
    ck_arch = ckpt["arch"]
    if ck_arch not in ARCHS:
        raise MscnError(f"{path}: unknown architecture {ck_arch!r} in the checkpoint (supported: {', '.join(ARCHS)})")
    try:
        pre = from_dict(ckpt["config"], src=f"{path} (config)")
    except ConfigError as e:
        raise MscnError(f"{e} -- the checkpoint's config does not fit this mscn version") from None
    cfg = _apply_overrides(pre, overrides, src=f"{path} + overrides") if overrides else pre
    wanted = arch or cfg.model.arch
    if wanted != ck_arch:
        raise MscnError(f"{path} holds a {ck_arch} backbone but {wanted} was requested "
                        f"(--arch / model.arch); evaluate it as {ck_arch} or pick a {wanted} checkpoint")
    if config:
        warnings.warn(f"--config {config} ignored: {path} carries its own pretraining config "
                      "(use key=value overrides)", stacklevel=2)
    check_highpass(pre, cfg, path, strict)
    backbone, _ = build_backbone(ck_arch)
    try:
        backbone.load_state_dict(ckpt["backbone"], strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)[:200]
        raise MscnError(f"{path}: backbone weights do not fit a torchvision {ck_arch} ({first[:200]})") from None
    return backbone, ck_arch, cfg


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


# ----------------------------------------------------------------------------------
# Running models over eval loaders (any rank count)
# ----------------------------------------------------------------------------------

def autocast(device: torch.device):
    """bf16 autocast on CUDA (as in pretraining); full fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_to(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, index) of one ``MscnBatch`` (one view) on ``device``."""
    images = batch.views[0].to(device, non_blocking=True).float()
    labels = batch.labels.to(device, non_blocking=True).long().view(-1)
    index = batch.index.to(device, non_blocking=True).long().view(-1)
    return images, labels, index


def _gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a per-rank tensor (first dim may differ) across all ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    if t.dtype == torch.bool:  # not every backend gathers bools
        return _gather_cat(t.to(torch.uint8)).bool()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


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


@torch.no_grad()
def extract_features(backbone: nn.Module, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and labels of every sample of ``loader``, on every rank.

    The backbone runs in eval mode (BN uses its running statistics) and its mode is
    restored afterwards, so this is safe as an online monitor inside pretraining.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels, index = [], [], []
    for batch in loader:
        x, y, i = batch_to(batch, device)
        with autocast(device):
            f = backbone(x)
        feats.append(f.float())
        labels.append(y)
        index.append(i)
    backbone.train(was_training)
    if not feats:
        raise MscnError("the evaluation loader yielded no batch (empty dataset?)")
    f, y, i = (_gather_cat(torch.cat(t)) for t in (feats, labels, index))
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
def evaluate_classifier(model: nn.Module, loader, device: torch.device) -> dict:
    """Top-1/top-5 of ``model`` (images -> logits) over ``loader``, exact under DDP."""
    was_training = model.training
    model.eval()
    c1s, c5s, index = [], [], []
    for batch in loader:
        x, y, i = batch_to(batch, device)
        with autocast(device):
            logits = model(x)
        c1, c5 = topk_correct(logits.float(), y)
        c1s.append(c1)
        c5s.append(c5)
        index.append(i)
    model.train(was_training)
    if not index:
        raise MscnError("the evaluation loader yielded no batch (empty dataset?)")
    c1, c5, i = (_gather_cat(torch.cat(t)) for t in (c1s, c5s, index))
    _, c1, c5 = unique_by_index(i, c1, c5)
    return {"top1": 100.0 * c1.float().mean().item(), "top5": 100.0 * c5.float().mean().item(),
            "n": int(c1.numel())}


# ----------------------------------------------------------------------------------
# Runtime: device and process group (torchrun env vars), and the eval data
# ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Runtime:
    """Where an evaluation runs: its rank layout and its torch device."""

    dist: DistInfo
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.dist.is_main


def setup_runtime(device: str = "auto") -> Runtime:
    """CPU, one GPU, or one rank of a torchrun job (NCCL on GPU, gloo on CPU)."""
    if device not in ("auto", "cuda", "cpu"):
        raise MscnError(f"--device {device}: must be auto, cuda or cpu")
    dev, note = pick_device(device, env_local_rank(), what="--device")  # same CPU fallback as pretraining
    if note:
        print(f"[mscn] {note}", flush=True)
    return Runtime(init_distributed(dev.type), dev)


def class_count(train_root: str, val_root: str) -> int:
    """Number of classes of an ImageFolder pair; their class folders must agree, since
    labels are indices into the sorted folder names."""
    train, val = find_classes(train_root), find_classes(val_root)
    if train != val:
        only = sorted(set(train) ^ set(val))[:3]
        raise DataError(f"{val_root}: its {len(val)} class folders differ from the {len(train)} of {train_root} "
                        f"(e.g. {', '.join(only) or 'same names, other order'}); labels would not match")
    return len(train)


def per_rank_batch(global_batch: int, rt: Runtime) -> int:
    if global_batch % rt.dist.world_size:
        raise MscnError(f"--batch {global_batch}: must be divisible by the world size ({rt.dist.world_size})")
    return global_batch // rt.dist.world_size


def mean_over_ranks(total: torch.Tensor, steps: int) -> float:
    """Mean of a per-rank sum over ``steps`` steps, across all ranks (a collective).

    Note: host sync point. Every rank gets the same number, so a non-finite check on it
    stops all ranks together instead of one rank raising while the others wait in DDP.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = total.clone()
        dist.all_reduce(total)
        total /= dist.get_world_size()
    return total.item() / max(1, steps)


def log_json(rt: Runtime, **fields) -> None:
    """One JSON line on stdout, from rank 0 only."""
    if rt.is_main:
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in fields.items()}), flush=True)


def eval_loader(cfg: Config, root: str, rt: Runtime, global_batch: int, train_views: bool = False,
                file_list: str | None = None):
    """This rank's DALI evaluation loader over ``root`` (``mscn.pipelines.build_eval_loader``).

    train_views=False: resize + center crop + high-pass, every sample once across ranks;
    True: random-resized-crop + flip + high-pass (paper A.2 training views), shuffled,
    last partial batch dropped. ``file_list``: a ``relpath label`` list relative to root.
    """
    from mscn.pipelines import build_eval_loader  # DALI is imported on first use only

    return build_eval_loader(cfg, root, rank=rt.dist.rank, world_size=rt.dist.world_size,
                             local_rank=rt.dist.local_rank, device=rt.device,
                             batch_size=per_rank_batch(global_batch, rt), train_views=train_views,
                             file_list=file_list)
