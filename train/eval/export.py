"""Export a pretrained backbone for detection transfer (paper App. A.4, Table 4).

Two files:

* ``<name>.pth``: a torchvision ResNet ``state_dict`` without ``fc``; loads into
  ``torchvision.models.resnet50()`` (``strict=False``: only ``fc.*`` is missing) and
  into the body of ``torchvision.models.detection`` backbones.
* ``<name>.pkl``: the detectron2 checkpoint format used by MoCo/VISSL
  (``convert-pretrain-to-detectron2.py``): ``{"model": {name: numpy array},
  "__author__": ..., "matching_heuristics": True}`` with detectron2's parameter names
  (``conv1`` -> ``stem.conv1``, ``bn1`` -> ``stem.conv1.norm``, ``layerN`` -> ``res{N+1}``,
  ``bnK`` -> ``convK.norm``, ``downsample.0/1`` -> ``shortcut``/``shortcut.norm``).
  Load it with ``MODEL.WEIGHTS <name>.pkl`` and the ImageNet-pretrained-style
  ``MODEL.PIXEL_MEAN/STD`` of docs/EVALUATION.md.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from mscn.errors import MscnError

AUTHOR = "mscn"


def torchvision_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights under torchvision ResNet names, without ``fc``."""
    return {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items() if not k.startswith("fc.")}


def detectron2_name(name: str) -> str:
    """torchvision ResNet parameter name -> detectron2 ResNet parameter name."""
    if not name.startswith("layer"):
        name = "stem." + name  # conv1.* / bn1.* belong to detectron2's BasicStem
    name = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", name)
    name = re.sub(r"(^|\.)bn(\d)\.", r"\1conv\2.norm.", name)
    name = name.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return name


def detectron2_state_dict(sd: dict[str, torch.Tensor]) -> dict:
    """The detectron2 pickle payload (numpy arrays; BN counters dropped: FrozenBN has none)."""
    model = {detectron2_name(k): v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    return {"model": model, "__author__": AUTHOR, "matching_heuristics": True}


def export_paths(out_dir: str | Path, name: str, overwrite: bool = False) -> tuple[Path, Path]:
    """(``.pth``, ``.pkl``) paths of an export, or one MscnError line: a ``name`` with folders,
    or an earlier export of that name without ``overwrite``."""
    if not name or Path(name).name != name or name in (".", ".."):  # e.g. "../x" would write outside --out
        raise MscnError(f"--name {name!r}: a file stem without folders (e.g. backbone)")
    paths = Path(out_dir) / f"{name}.pth", Path(out_dir) / f"{name}.pkl"
    there = [p.name for p in paths if p.exists()]
    if there and not overwrite:
        raise MscnError(f"--out {out_dir}: {' and '.join(there)} already exist{'s' if len(there) == 1 else ''}; "
                        "pass another --name, or --force to replace them")
    return paths


def export_backbone(backbone: nn.Module, out_dir: str | Path, name: str = "backbone",
                    arch: str = "resnet50", overwrite: bool = False) -> dict[str, str]:
    """Write ``<out_dir>/<name>.pth`` (torchvision) and ``<name>.pkl`` (detectron2).

    An earlier export of the same name is kept unless ``overwrite`` (``--force``): it may be
    the weights a detection run was started from. Both files are written beside their final
    names and then renamed into place, so a run killed mid-write leaves no truncated file
    and no new ``.pth`` beside an old ``.pkl``.
    """
    pth, pkl = export_paths(out_dir, name, overwrite)
    out = Path(out_dir)
    made = [p for p in (out, *out.parents) if not p.exists()]  # innermost first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MscnError(f"--out {out_dir}: cannot create the folder ({e.strerror})") from None
    # both files written in full under temporary names first, then renamed: a run killed or
    # failing before the renames leaves the earlier pair as it was
    try:
        sd = torchvision_state_dict(backbone)
        first = _write_tmp(pth, lambda f: torch.save(sd, f))
        try:
            second = _write_tmp(pkl, lambda f: pickle.dump(detectron2_state_dict(sd), f))
        except BaseException:
            first.unlink(missing_ok=True)  # no stray temporary file beside the earlier pair
            raise
    except BaseException:
        for folder in made:  # folders this export made hold nothing now: not left behind as if they did
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    os.replace(first, pth)
    os.replace(second, pkl)
    return {"torchvision": str(pth), "detectron2": str(pkl), "arch": arch}


def _write_tmp(path: Path, dump) -> Path:
    """``dump(file)`` into a temporary file beside ``path``; returns it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            dump(f)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise MscnError(f"{path}: cannot write the export ({e.strerror})") from None
        raise
    return tmp
