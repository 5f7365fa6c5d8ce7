"""Semi-supervised fine-tuning on 1 % / 10 % of the labels (paper App. A.3, Table 1).

Protocol of Zbontar et al. (2021) as followed by the paper: the whole network is trained
for 20 epochs with SGD + momentum and no weight decay, batch 256; backbone lr 0.002,
classifier lr 0.5 (both scaled by batch/256), multiplied by 0.2 after epochs 12 and 16.
Views are those of the linear probe (random resized crop + flip + high-pass; test:
resize, center crop, high-pass). Batch norm trains (synchronised under DDP when
``model.sync_bn``). With fewer/more epochs than 20 the milestones scale with them
(12/20 and 16/20 of the run), so short CPU runs keep the schedule's shape.

The label subset is a file list of ``relpath label`` lines (``mscn data subset``) or an
official split file with one file name per line (SimCLR's ``1percent.txt`` /
``10percent.txt``: ``n01440764_10026.JPEG``), matched by file stem under the train root.
Every random choice (head init, crops, flips, data order) follows one ``seed``
(default ``train.seed``): the same seed gives the same numbers on the CPU.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mscn.config import Config
from mscn.data.imagefolder import find_classes, is_image_name, list_image_folder
from mscn.data.scan import read_file_list, report_path_for, write_file_list
from mscn.data.source import detect_format, read_sources_json
from mscn.data.subset import make_subset
from mscn.errors import DataError, MscnError
from mscn.train.distributed import convert_sync_batchnorm, mean_over_ranks
from mscn.train.eval.common import (MOMENTUM, batch_to, check_labels, eval_loader, evaluate_classifier, feature_dim,
                                    label_set, log_json, make_head, seeded, train_view_loader)
from mscn.train.eval.provenance import file_digest
from mscn.train.runtime import Runtime, setup_runtime
from mscn.train.schedule import peak_lr


def read_subset(path: str | Path, train_root: str | Path) -> list[tuple[str, int]]:
    """``[(relpath, label)]`` of a subset file, checked against the ImageFolder ``train_root``.

    ``relpath label`` lines (``mscn data subset``) are validated as a file list; a file
    of bare names (SimCLR's official split) is matched by file stem under the root.
    """
    path, root = Path(path), Path(train_root)
    if root.exists() and detect_format(root) != "folder":
        # the subset names image files, and the fine-tuning loader reads them from their folder
        where = ""
        if root.is_dir():
            packed = read_sources_json(root).get("root")
            where = f" (these shards were packed from {packed})" if packed else ""
        else:
            try:
                scanned = json.loads(report_path_for(root).read_text()).get("root")
            except (OSError, ValueError, AttributeError):  # no report beside the list, or not ours
                scanned = None
            where = f" (this list was scanned from {scanned})" if scanned else ""
        what = "a folder of .tar shards" if root.is_dir() else "a file list"
        raise DataError(f"--train-root {root}: {what}; fine-tuning on a label subset reads the images from their "
                        f"ImageFolder: pass that folder{where}, and a subset made from it (mscn data subset FOLDER "
                        "--fraction 0.01)")
    if path.is_dir():
        raise DataError(f"--subset {path}: a folder; it takes the subset file (mscn data subset {root} --fraction 0.01)")
    if not path.is_file():
        raise DataError(f"--subset {path}: no such file (write one with: mscn data subset {root} --fraction 0.01)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"--subset {path}: not a UTF-8 text file (byte {e.start}); it takes a subset list "
                        f"(mscn data subset {root} --fraction 0.01)") from None
    first = next((ln.strip().rsplit(maxsplit=1) for ln in text.splitlines() if ln.strip()), None)
    if first is None:
        raise DataError(f"--subset {path}: empty file")
    labelled = len(first) == 2 and first[1].isdigit()
    if len(first) == 2 and not labelled and not is_image_name(first[1]):  # nor a file name (may hold spaces)
        raise DataError(f"--subset {path}:1: expected 'relative/path label' with a class index as the label "
                        f"(mscn data subset), or one file name per line (an official split); got {' '.join(first)!r}")
    # entries missing under the root: most likely a list made for another root, which a rescan does not fix
    note = (f"its paths are relative to --train-root {root}: if {path.name} was made for another root, "
            f"write one for this root (mscn data subset {root} --fraction 0.01)")
    samples = read_file_list(path, root, root_note=note) if labelled else make_subset(root, None, official=path)
    classes = find_classes(root)
    bad = next((s for s in samples if not 0 <= s[1] < len(classes)), None)
    if bad:
        raise DataError(f"--subset {path}: label {bad[1]} of {bad[0]} is outside the {len(classes)} classes of {root}")
    if labelled:  # a list's label must be the class of the folder the file is in
        index = {c: i for i, c in enumerate(classes)}
        for rel, label in samples:
            folder = Path(rel).parts[0] if len(Path(rel).parts) > 1 else None
            if folder in index and index[folder] != label:
                raise DataError(f"--subset {path}: {rel} is labelled {label} ({classes[label]}) but lies in the "
                                f"folder of class {index[folder]} ({folder}); the labels are {root}'s class indices")
    return samples


def scaled_milestones(milestones, epochs: int, ref_epochs: int) -> list[int]:
    """Epochs after which the lr drops in a run of ``epochs`` epochs, given ``milestones``
    of a ``ref_epochs`` schedule (eval.finetune_epochs; paper A.3: 12, 16 of 20)."""
    return sorted({max(1, min(epochs, round(m * epochs / ref_epochs))) for m in milestones})


def finetune(backbone: nn.Module, cfg: Config, train_root: str, val_root: str, subset: str | Path,
             rt: Runtime | None = None, *, epochs: int | None = None,
             backbone_lr: float | None = None, head_lr: float | None = None, batch: int | None = None,
             seed: int | None = None) -> dict:
    """Fine-tune ``backbone`` + a linear head on ``subset`` of ``train_root``; top-1/5 on ``val_root``."""
    with seeded(cfg, seed) as cfg:
        return _finetune(backbone, cfg, train_root, val_root, subset, rt, epochs, backbone_lr, head_lr, batch)


def _finetune(backbone, cfg: Config, train_root, val_root, subset, rt, epochs, backbone_lr, head_lr, batch) -> dict:
    rt = rt or setup_runtime("auto", cfg.train.precision)
    e = cfg.eval
    epochs = e.finetune_epochs if epochs is None else epochs
    batch = e.finetune_batch if batch is None else batch
    base_b = e.finetune_backbone_lr if backbone_lr is None else backbone_lr
    base_h = e.finetune_head_lr if head_lr is None else head_lr
    if epochs < 1 or batch < 1 or base_b < 0 or base_h <= 0:  # the values as given, not scaled by the batch
        raise MscnError(f"fine-tuning: need epochs >= 1, batch >= 1, backbone lr >= 0, head lr > 0 (got {epochs}, "
                        f"{batch}, {base_b}, {base_h})")
    lr_b, lr_h = peak_lr(base_b, batch), peak_lr(base_h, batch)
    samples, subset_data = read_subset(subset, train_root), file_digest(subset)  # what was read
    _, everything = list_image_folder(train_root)
    classes, num_classes = label_set(train_root)

    backbone = backbone.to(rt.device)
    backbone.requires_grad_(True)
    head = make_head(feature_dim(backbone, cfg.data.image_size, rt.device), num_classes).to(rt.device)
    model = nn.Sequential(backbone, head)
    if rt.dist.enabled and cfg.model.sync_bn:
        model = convert_sync_batchnorm(model, rt.device.type)
    ddp = rt.wrap_ddp(model)
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": lr_b},
                           {"params": model[1].parameters(), "lr": lr_h}],
                          momentum=MOMENTUM, weight_decay=0.0)
    milestones = scaled_milestones(e.finetune_milestones, epochs, e.finetune_epochs)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=e.finetune_gamma)
    with tempfile.TemporaryDirectory() as tmp:  # per process: ranks on other nodes need no shared disk
        # the loader reads the list while it is built, so the file may go right after
        loader = train_view_loader(cfg, train_root, rt, batch,
                                   file_list=str(write_file_list(Path(tmp) / "subset.txt", samples, train_root)))
    t0 = time.time()
    losses: list[float] = []
    for epoch in range(epochs):
        ddp.train()
        total, steps = torch.zeros((), device=rt.device), 0
        for b in loader:
            x, y, _ = batch_to(b, rt.device)
            check_labels(y, num_classes, loader)
            with rt.autocast():
                logits = ddp(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
        mean_loss = mean_over_ranks(total, steps)  # one host sync per epoch; same on every rank
        if not math.isfinite(mean_loss):
            raise MscnError(f"fine-tuning: non-finite loss in epoch {epoch + 1}; lower --lr / --head-lr")
        losses.append(mean_loss)
        log_json(rt, protocol="finetune", epoch=epoch + 1, loss=mean_loss,
                 lr_backbone=opt.param_groups[0]["lr"], lr_head=opt.param_groups[1]["lr"])
        sched.step()  # per epoch: the drops happen "after the 12th and 16th epoch"
    res = evaluate_classifier(model, eval_loader(cfg, val_root, rt, batch, classes=classes), rt, num_classes)
    return {"top1": res["top1"], "top5": res["top5"], "n_val": res["n"], "num_classes": num_classes,
            "label_fraction": len(samples) / len(everything), "n_labelled": len(samples), "epochs": epochs,
            "seed": cfg.train.seed, "loss": [round(v, 5) for v in losses],
            "wall_s": round(time.time() - t0, 1),
            "settings": {"backbone_lr": lr_b, "head_lr": lr_h, "batch": batch, "weight_decay": 0.0,
                         "momentum": MOMENTUM, "milestones": milestones, "gamma": e.finetune_gamma,
                         # the file, and what it held: a subset rewritten in place is another setting
                         "subset": os.path.abspath(subset), "subset_data": subset_data,
                         "world_size": rt.dist.world_size}}
