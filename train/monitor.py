"""Online kNN monitor during pretraining (k=20 cosine, temperature-weighted; InstDisc/DINO).

Every ``train.knn_every_epochs`` epochs, the backbone's features of ``data.root`` (eval
views: resize + center-crop + high-pass) vote for the labels of ``data.val_root``. Every
rank takes part (the DALI eval loaders are sharded and features are gathered), so call
it on all ranks at the same step.
"""
from __future__ import annotations

import torch

from mscn.config import Config
from mscn.train.runtime import Runtime


def monitor_off_reason(cfg: Config) -> str | None:
    """Why the configured monitor cannot run (a notice, not an error: recipes such as
    demo.yaml switch it on, and a user who points data.root elsewhere may have no labels)."""
    if not cfg.train.knn_every_epochs:
        return None
    if not cfg.data.val_root:
        return (f"kNN monitor off: train.knn_every_epochs = {cfg.train.knn_every_epochs} needs data.val_root "
                "(labelled evaluation images)")
    from mscn.data.source import resolve_source
    from mscn.errors import DataError

    try:
        labelled = resolve_source(cfg.data.root, cfg.data.format).labelled
    except DataError:
        return None  # the training loader reports a bad data.root, with its own message
    if not labelled:
        return (f"kNN monitor off: data.root {cfg.data.root} has no labels (no class folders, list or shards "
                "without labels); the monitor votes with the training labels")
    return None


def check_val_root(cfg: Config) -> None:
    """Before the run starts (and before its folder is claimed): a ``data.val_root`` the
    monitor will read must exist, or the run would train an epoch and only then stop on it."""
    if cfg.train.knn_every_epochs and cfg.data.val_root:
        from mscn.data.filecheck import check_headers
        from mscn.data.source import eval_root_setting, resolve_source
        from mscn.errors import DataError

        try:
            train = resolve_source(cfg.data.root, cfg.data.format)
        except DataError:
            train = None  # the training loader reports a bad data.root, with its own message
        # as the monitor's loader will read it: labelled, and its classes among the training
        # set's (checked here, not after the first epoch); an unlabelled training set turns
        # the monitor off (monitor_off_reason)
        classes = (train.classes or None) if train is not None and train.labelled else None
        fmt, what = eval_root_setting(cfg.data, cfg.data.val_root)
        val = resolve_source(cfg.data.val_root, fmt, classes=classes, what=what)
        check_headers(val)  # a file no decoder takes would stop (or crash) the monitor after an epoch
        if train is not None and train.labelled and not val.labelled:
            raise DataError(f"{cfg.data.val_root}: has no labels (flat folder, list or shards without labels); "
                            "the kNN monitor needs a labelled data.val_root (or train.knn_every_epochs=0)")


def monitor_runs_after(cfg: Config, done: int, steps_per_epoch: int) -> bool:
    """Whether the kNN monitor runs after optimizer step ``done``: at the end of every
    ``train.knn_every_epochs``-th epoch (never when that is 0)."""
    every = cfg.train.knn_every_epochs
    return bool(every) and done % steps_per_epoch == 0 and (done // steps_per_epoch) % every == 0


@torch.no_grad()
def online_knn(cfg: Config, backbone: torch.nn.Module, rt: Runtime) -> dict:
    """kNN top-1/top-5 (%) of ``backbone`` on (data.root -> data.val_root), under the run's autocast."""
    from mscn.train.eval.common import eval_loader, label_set
    from mscn.train.eval.knn import knn_eval

    # largest global batch <= eval.linear_batch that splits evenly over the ranks
    world = rt.dist.world_size
    batch = max(world, cfg.eval.linear_batch - cfg.eval.linear_batch % world)
    classes, _ = label_set(cfg.data.root, cfg.data.format)  # val labels by the train set's class names
    loaders = [eval_loader(cfg, cfg.data.root, rt, batch), eval_loader(cfg, cfg.data.val_root, rt, batch,
                                                                       classes=classes)]
    return knn_eval(backbone, *loaders, rt, k=cfg.eval.knn_k, T=cfg.eval.knn_temperature)
