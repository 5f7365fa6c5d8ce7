"""Online kNN monitor during pretraining (k=20 cosine, temperature-weighted; InstDisc/DINO).

Every ``train.knn_every_epochs`` epochs, the backbone's features of ``data.root`` (eval
views: resize + center-crop + high-pass) vote for the labels of ``data.val_root``. Every
rank takes part (the DALI eval loaders are sharded and features are gathered), so call
it on all ranks at the same step.
"""
from __future__ import annotations

import torch

from mscn.config import Config
from mscn.train.distributed import DistInfo


def monitor_off_reason(cfg: Config) -> str | None:
    """Why the configured monitor cannot run (a notice, not an error: recipes such as
    demo.yaml switch it on, and a user who points data.root elsewhere may have no labels)."""
    if cfg.train.knn_every_epochs and not cfg.data.val_root:
        return (f"kNN monitor off: train.knn_every_epochs = {cfg.train.knn_every_epochs} needs data.val_root "
                "(labelled evaluation images)")
    return None


def due(cfg: Config, done: int, steps_per_epoch: int) -> bool:
    every = cfg.train.knn_every_epochs
    return bool(every) and done % steps_per_epoch == 0 and (done // steps_per_epoch) % every == 0


@torch.no_grad()
def online_knn(cfg: Config, backbone: torch.nn.Module, info: DistInfo, device: torch.device) -> dict:
    """kNN top-1/top-5 (%) of ``backbone`` on (data.root -> data.val_root)."""
    from mscn.train.eval_common import Runtime, eval_loader
    from mscn.train.knn import knn_eval

    rt = Runtime(info, device)
    # largest global batch <= eval.linear_batch that splits evenly over the ranks
    batch = max(info.world_size, cfg.eval.linear_batch - cfg.eval.linear_batch % info.world_size)
    loaders = [eval_loader(cfg, root, rt, batch) for root in (cfg.data.root, cfg.data.val_root)]
    return knn_eval(backbone, *loaders, k=cfg.eval.knn_k, T=cfg.eval.knn_temperature, device=device)
