"""What a checkpoint holds for an exact resume, and how a resume puts it back.

A run killed at any step and resumed with ``--resume auto`` ends with the same loss and
weights as an uninterrupted one (tests/test_train_resume.py checks 1e-6 on CPU). Beyond
model, BYOL target, optimizer, scaler and step, that needs, for *every* rank (gathered
to rank 0 at each checkpoint, under ``ranks``):

- ``loader``: the DALI pipeline checkpoint (reader position, augmentation RNGs) of the
  batches consumed so far, and the mask generator (:meth:`DaliLoader.state_dict`);
- ``rng``: torch (and CUDA), numpy and Python RNG states;
- ``meter``: the loss summed since the last log line, so that the next logged mean
  covers the same steps.

A checkpoint from another world size (or one written before ``ranks`` existed) still
resumes, from fresh loaders seeded with ``train.seed + step`` and a notice that the data
order differs from an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist

from mscn.config import Config, to_dict
from mscn.errors import MscnError
from mscn.train import checkpoint as ckpt
from mscn.train.distributed import DistInfo, broadcast_object
from mscn.train.rundir import FRESH, check_same_run, differing_keys, run_started


def rank_state(loader, meter, loader_state: dict | None = None) -> dict:
    """This rank's part of a checkpoint (call at the step the checkpoint is taken);
    ``loader_state``: the loader's, taken before it handed out a batch the step never used."""
    return {"rng": ckpt.rng_state(), "loader": loader_state or loader.state_dict(), "meter": meter.state_dict()}


def gather_rank_states(mine: dict, info: DistInfo) -> list[dict]:
    """Every rank's :func:`rank_state`, in rank order (a collective under torchrun)."""
    if not info.enabled:
        return [mine]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, mine)
    return out


def checkpoint_state(cfg: Config, method, optimizer, scaler, step: int, steps_per_epoch: int,
                     ranks: list[dict]) -> dict:
    return {
        "model": method.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "step": step, "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
        "rng": ranks[0]["rng"], "ranks": ranks, "world_size": len(ranks), "config": to_dict(cfg),
        "arch": cfg.model.arch, "method": cfg.method.name, "backbone": method.backbone.state_dict(),
    }


def find_resume_state(cfg: Config, resume: str | None, info: DistInfo) -> tuple[dict | None, str | None]:
    """Rank 0 picks the checkpoint (auto: the newest valid one) and every rank loads that file."""
    if resume in FRESH:
        return None, None
    path, refused = None, None
    if info.is_main:
        if resume == "auto":
            ckpt_dir = Path(cfg.train.out_dir) / "checkpoints"
            found = ckpt.find_latest_valid(ckpt_dir, set_aside=True)
            path = str(found[0]) if found else None
            refused = None if found else _none_loads(ckpt_dir)
        else:
            path = resume
    path, refused = broadcast_object((path, refused))  # every rank loads the file rank 0 chose
    if refused:
        raise MscnError(refused)
    if path is None:
        return None, None
    if not info.is_main:  # rank 0 found it: missing here means this node sees another folder
        return ckpt.load_checkpoint(path, not_found=f"rank 0 resumes from it, but rank {info.rank} cannot see it: "
                                                    "train.out_dir must be on a file system every node shares, at "
                                                    "the same path"), path
    return ckpt.load_checkpoint(path), path


def _none_loads(ckpt_dir: Path) -> str | None:
    """Why ``--resume auto`` must not start from step 0 in a folder whose checkpoints all
    failed to load (damaged, set aside as ``*.unreadable``; or unreadable now): it trained
    over the run's progress and its metrics without a word. None when it had none."""
    kept = sorted(p.name for p in ckpt_dir.glob("ckpt_*.pt*")) if ckpt_dir.is_dir() else []
    if not kept:
        return None
    return (f"{ckpt_dir}: none of this run's checkpoints loads ({', '.join(kept[-3:])}"
            f"{f' and {len(kept) - 3} more' if len(kept) > 3 else ''}), and starting from step 0 here would train "
            f"over its progress: restore one (a {ckpt.UNREADABLE} file renamed back once mended, or the file system "
            "back), or start over with --resume none (the old files move to superseded-<time>/)")


def folder_step(out: Path) -> int | None:
    """How far the run in ``out`` got: the newest step among its checkpoints that open and its
    ``final.pt``; None when it has neither. A newer checkpoint that does not open or fails its
    checksums (cut short, bytes flipped) is not the run's progress: ``--resume auto`` would set
    it aside and continue from the newest that opens, and so may a checkpoint named by hand.
    Nor is a damaged ``final.pt`` (the last checkpoint's hard link: the same bytes)."""
    names = ckpt.list_checkpoints(out / "checkpoints")
    newest = next((p for p in reversed(names) if ckpt.opens(p)), None)
    steps = [ckpt.step_of(newest)] if newest else []
    final = out / "final.pt"
    if final.is_file() and ckpt.opens(final):
        steps.append(ckpt.step_of(final))
    steps = [s for s in steps if s is not None]
    return max(steps) if steps else None


def check_resume_path(cfg: Config, resume: str | None) -> None:
    """``--resume PATH`` (a checkpoint named by hand) never mixes two runs or goes back over
    a run's own progress; read-only, so every rank raises the same one line.

    - a checkpoint from another folder continues only into a folder with no progress of its
      own (it branches there): into a run with checkpoints its steps and metrics would follow
      that run's, and ``train.keep_last`` would rotate that run's newer checkpoints away. A
      folder whose run never wrote a checkpoint (killed before its first one) holds nothing
      to lose, so relaunching the branch command continues;
    - a checkpoint of this folder older than the folder's newest step would train over
      that progress and rotate its newer checkpoints away: branch into a new folder
      instead."""
    if resume in FRESH or resume == "auto":  # no checkpoint named
        return
    out, path = Path(cfg.train.out_dir), Path(resume)
    if not path.is_file() or not run_started(out):
        return  # a missing file is reported when it is loaded; an empty folder takes any checkpoint
    what = ckpt.not_a_checkpoint(path)
    if what:  # e.g. an image passed by mistake: not "a checkpoint of another run folder"
        raise MscnError(f"--resume {path}: not a readable checkpoint ({what}); pass a ckpt_*.pt or final.pt "
                        f"written by mscn pretrain, or --resume auto")
    here = folder_step(out)
    if here is None:
        # a folder whose checkpoints all fail to load still holds a run (a review: a branch
        # trained over it, its metrics cut); one killed before its first checkpoint holds none
        lost = None
        if not _of_folder(path, out):
            lost = _none_loads(out / "checkpoints") or (
                f"{out / 'final.pt'}: does not load, and a branch from {path} would train over this run"
                if (out / "final.pt").exists() else None)
        if lost:
            raise MscnError(f"--resume {path}: {lost}; or pass a new train.out_dir=DIR (or --out DIR) to branch "
                            "there")
        return
    if not _of_folder(path, out):
        real = path.resolve()  # a symlink names the folder it points into
        where = real.parent.parent if real.parent.name == "checkpoints" else real.parent
        raise MscnError(f"--resume {path}: a checkpoint of another run folder ({where}), but {out} holds a run of "
                        f"its own (at step {here}); --resume auto continues that run (e.g. a relaunched branch); "
                        f"to continue from {path.name} pass a new train.out_dir=DIR (or --out DIR), where it "
                        f"branches, or its own folder train.out_dir={where}; a copy of this folder's own checkpoint "
                        f"goes back into {out / 'checkpoints'}, then --resume auto")
    step = ckpt.step_of(path)
    if step is not None and step < here:
        raise MscnError(f"--resume {path}: step {step}, but {out} is already at step {here}: resuming would train "
                        f"over that progress and rotate away its newer checkpoints; --resume auto continues from "
                        f"step {here}, or pass a new train.out_dir=DIR (or --out DIR) with --resume {path} to "
                        f"branch from step {step}")


def is_branch(cfg: Config, resume: str | None) -> bool:
    """Whether ``--resume`` names a checkpoint of another folder than ``train.out_dir``: the
    run branches from it (check_resume_path allowed it: this folder has no progress)."""
    if resume in FRESH or resume == "auto":  # no checkpoint named
        return False
    return not _of_folder(Path(resume), Path(cfg.train.out_dir))


def _of_folder(path: Path, out: Path) -> bool:
    """Whether the checkpoint ``path`` is run folder ``out``'s own: in it or in its
    ``checkpoints/``, wherever a symlink points."""
    return path.resolve().parent in (out.resolve(), (out / "checkpoints").resolve())


def load_state(state: dict, path: str, cfg: Config, method, optimizer, scaler, branch: bool = False) -> list[str]:
    """Model, optimizer and scaler from ``state``, after checking it is this run's checkpoint.

    ``branch`` (another folder's checkpoint, into a folder of its own): the settings may
    differ, e.g. a lower ``optim.base_lr`` after a non-finite loss; returns the result-changing
    keys that differ (the caller starts fresh loaders: not an exact continuation). The
    weights and optimizer state must still fit."""
    if branch:
        changed = differing_keys(state["config"], cfg)
    else:
        try:
            check_same_run(state["config"], cfg, path, checkpoint=True)
        except MscnError as e:
            ckpts = Path(cfg.train.out_dir) / "checkpoints"
            if Path(path).parent.resolve() != ckpts.resolve() or not (ckpts.parent / "config.yaml").is_file():
                raise
            # the folder's config.yaml matched (check_run_dir): this file is the stray one
            raise MscnError(f"{e}; or, if {Path(path).name} was copied in from another run, move it out of "
                            f"{ckpts}: --resume auto then continues from this run's own newest") from None
        changed = []
    ckpt.check_compatible(state, cfg.model.arch, cfg.method.name, path)
    try:
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line, whole
        raise MscnError(f"{path}: checkpoint does not fit this model/optimizer ({detail}); "
                        "use the model.*/optim.* values it was trained with, or --resume none") from None
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return changed


def this_rank(state: dict, info: DistInfo, cfg: Config, gpu: bool) -> tuple[dict | None, str]:
    """This rank's saved part, or None and why when the checkpoint cannot resume exactly here.

    Not exactly: another world size, or a loader state of another pipeline graph. A DALI
    checkpoint names the pipeline's operators, so one saved by the other ``data.crop``
    (checkpoints from before that key used the window crop), ``data.blur_where`` or
    ``data.colour_where`` would not load at all.
    """
    ranks = state.get("ranks")
    if not ranks or len(ranks) != info.world_size:
        n = state.get("world_size")
        return None, (f"saved by {n} rank{'' if n == 1 else 's'}, resumed on {info.world_size}" if n is not None
                      else "saved by an older mscn")
    mine = ranks[info.rank]
    from mscn.pipelines.loader import graph_misfit  # DALI is heavy: imported only to resume

    why = graph_misfit(mine.get("loader") or {}, cfg.data.crop, "loader" if cfg.blur_in_loader(gpu) else "pipeline",
                       "loader" if cfg.colour_in_loader(gpu) else "pipeline", now="this run")
    if why:
        return None, why
    return mine, ""


def data_changed(state: dict, mine: dict | None, source, root: str) -> str:
    """Why the run saved in ``state`` cannot continue over ``source`` (``root``, the
    ``data.root`` given, resolved), or "" (``mscn.pipelines.loader.other_data``):
    this rank's loader state says what it read, else any rank's (resumed on another
    number of ranks, the loaders start afresh, but on the same data)."""
    from mscn.pipelines.loader import other_data  # DALI is heavy: imported only to resume

    saved = (mine or {}).get("loader") or next(
        (r["loader"] for r in state.get("ranks") or [] if isinstance(r, dict) and r.get("loader")), None)
    if not (saved or {}).get("data_digest"):
        # saved before the loader recorded its data: only the path can tell (data.root is neutral
        # to the run's identity since, for a staged copy: that needs the record)
        then = ((state.get("config") or {}).get("data") or {}).get("root")
        if then and os.path.realpath(then) != os.path.realpath(root):
            return (f"its checkpoint predates the record of the data it read, and data.root changed ({then} then, "
                    f"{root} now)")
        return ""
    return other_data(saved, source)


def restore_rng(state: dict, mine: dict | None, cfg: Config, info: DistInfo, start_step: int) -> None:
    """Put the RNG states back: last, after the model and loaders are built."""
    if mine is not None:
        ckpt.set_rng_state(mine["rng"])
    elif info.is_main:
        ckpt.set_rng_state(state["rng"])
    else:
        torch.manual_seed(cfg.train.seed + info.rank + start_step)


def loader_cfg(cfg: Config, mine: dict | None, start_step: int) -> Config:
    """The config the loader is built from: the run's own, or (no saved loader state) one
    with ``train.seed + step`` so that fresh loaders do not replay the first batches."""
    if mine is not None or not start_step:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + start_step))
