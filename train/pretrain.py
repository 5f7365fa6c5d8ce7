"""MSCN pretraining: SimCLR or BYOL on masked multi-view batches (paper §5, App. A.1).

    python -m mscn.train.pretrain --config simclr_r50_in1k [--resume auto|PATH|none] [key=value ...]
    torchrun --standalone --nproc_per_node=8 -m mscn.train.pretrain --config ...

The loop reads top to bottom: data -> forward -> loss -> backward -> step -> schedule
-> log/checkpoint. lr = optim.base_lr * train.global_batch / 256, linear warm-up over
schedule.warmup_epochs then cosine to the end of schedule.epochs, set every step.
Each rank gets global_batch / world_size images (x V views) per step.

Resume (``--resume auto``, the default): the newest checkpoint of
``{out_dir}/checkpoints`` that loads restores model, BYOL target, optimizer, scaler,
the step counter and RNG states. Data position is kept at step granularity: the
schedule continues at the saved global step, and the batches after it come from a
fresh DALI iterator (seeded with ``train.seed + step`` so a resumed run does not
replay the first batches it already saw). Each DALI epoch still visits every image
once; after a mid-epoch resume the DALI epochs are shifted against the schedule's
epochs by the steps already done in the interrupted epoch. The resumed run ends at
exactly the same step count as an uninterrupted one.

Host syncs: the loss is read back (``.item()``) only at logging and checkpoint steps;
in between a non-finite loss is remembered on the device (``torch.where``) and
reported, with its step, at the next of those points, before anything is saved.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mscn.config import Config, load_config, to_dict, validate
from mscn.errors import MscnError, run_cli
from mscn.train import checkpoint as ckpt
from mscn.train.distributed import DistInfo, barrier, broadcast_object, cleanup, convert_sync_batchnorm
from mscn.train.lars import build_optimizer
from mscn.train.meter import NonFiniteGuard, StepMeter  # noqa: F401  (NonFiniteGuard: importable here as before)
from mscn.train.methods import SiameseMethod, build_method
from mscn.train.monitor import monitor_off_reason, monitor_runs_after, online_knn
from mscn.train.runlog import RunLog
from mscn.train.runtime import Runtime, amp_dtype, autocast, setup_runtime, wrap_ddp  # noqa: F401  (amp_dtype: API)
from mscn.train.schedule import lr_at, peak_lr


def build_model(cfg: Config, device: torch.device, info: DistInfo) -> tuple[SiameseMethod, torch.nn.Module]:
    """The method module and what the loop calls (DDP- and compile-wrapped as configured).

    Order matters: SyncBN conversion and the device/memory-format move happen on the
    bare module (BYOL's target included), *then* DDP wraps it, *then* torch.compile.
    """
    method = build_method(cfg)
    if info.enabled and cfg.model.sync_bn:
        method = convert_sync_batchnorm(method, device.type)
    method.to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        method.to(memory_format=torch.channels_last)
    model = wrap_ddp(method, device, info, gradient_as_bucket_view=True)
    if cfg.train.compile:
        model = torch.compile(model)
    return method, model


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               views: list[torch.Tensor], dtype: torch.dtype | None) -> torch.Tensor:
    """forward -> loss -> backward -> optimizer step; returns the detached loss (no sync)."""
    with autocast(views[0].device.type, dtype):
        loss = model(views)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # the scaler is a pass-through unless precision is fp16
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def _checkpoint_state(cfg: Config, method: SiameseMethod, optimizer, scaler, step: int, steps_per_epoch: int) -> dict:
    return {
        "model": method.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "step": step, "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
        "rng": ckpt.rng_state(), "config": to_dict(cfg), "arch": cfg.model.arch, "method": cfg.method.name,
        "backbone": method.backbone.state_dict(),
    }


def _resume_state(cfg: Config, resume: str | None, info: DistInfo) -> tuple[dict | None, str | None]:
    """Rank 0 picks the checkpoint (auto: the newest valid one) and every rank loads that file."""
    if resume in (None, "", "none"):
        return None, None
    path = None
    if info.is_main:
        if resume == "auto":
            found = ckpt.find_latest_valid(Path(cfg.train.out_dir) / "checkpoints")
            path = str(found[0]) if found else None
        else:
            path = resume
    path = broadcast_object(path)  # every rank loads the file rank 0 chose
    if path is None:
        return None, None
    return ckpt.load_checkpoint(path), path


def _load_state(state: dict, path: str, cfg: Config, method, optimizer, scaler) -> None:
    ckpt.check_compatible(state, cfg.model.arch, cfg.method.name, path)
    try:
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise MscnError(f"{path}: checkpoint does not fit this model/optimizer ({str(e).splitlines()[0][:160]}); "
                        "use the model.*/optim.* values it was trained with, or --resume none") from None
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def _oom_error(cfg: Config, info: DistInfo) -> MscnError:
    per_gpu = cfg.train.global_batch // info.world_size
    return MscnError(
        f"GPU out of memory at {per_gpu} images x {len(cfg.views)} views per GPU ({cfg.model.arch}, "
        f"{cfg.data.image_size}px, train.global_batch={cfg.train.global_batch} over {info.world_size} GPU(s)); "
        f"use train.global_batch={max(info.world_size, cfg.train.global_batch // 2)} or more GPUs")


def with_synthetic_data(cfg: Config, info: DistInfo | None = None) -> Config:
    """``data.synthetic`` without ``data.root``: create (rank 0, once) and use the synthetic set."""
    d = cfg.data
    if not d.synthetic or d.root:
        return cfg
    from mscn.data.synth import synthesize

    out = Path(d.synthetic_dir)
    if info is None or info.is_main:  # idempotent: returns at once when the folder already holds this dataset
        synthesize(out, d.synthetic_classes, d.synthetic_per_class, size=tuple(d.synthetic_size),
                   seed=cfg.train.seed, val_per_class=d.synthetic_val_per_class)
    if info is not None:
        barrier()  # the other ranks read the folder rank 0 has just written
    val_root = d.val_root or (str(out / "val") if d.synthetic_val_per_class else "")
    return dataclasses.replace(cfg, data=dataclasses.replace(d, root=str(out / "train"), val_root=val_root))


def run_pretrain(cfg: Config, resume: str | None = "auto") -> dict:
    """Pretrain as configured; returns a summary (steps, loss, images/s, checkpoint paths)."""
    rt = setup_runtime(cfg.train.device, cfg.train.precision, what="train.device")
    try:
        # the whole run on a high-priority stream (GPU), model set-up and DDP included, so
        # that autograd and DDP keep to the stream the steps run on
        with rt.priority_stream(cfg.train.priority_stream):
            return _run(cfg, resume, rt)
    finally:
        cleanup()


def _run(cfg: Config, resume: str | None, rt: Runtime) -> dict:
    from mscn.pipelines import build_train_loader, endless  # DALI is heavy: imported only to train

    validate(cfg, "<config>", world_size=rt.dist.world_size)
    cfg = with_synthetic_data(cfg, rt.dist)
    say = (lambda msg: print(f"[mscn] {msg}", flush=True)) if rt.is_main else (lambda msg: None)
    monitor_note = monitor_off_reason(cfg)
    for note in (rt.note, monitor_note):
        if note:
            say(note)
    torch.manual_seed(cfg.train.seed)
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    peak = peak_lr(cfg.optim.base_lr, cfg.train.global_batch)

    method, model = build_model(cfg, rt.device, rt.dist)
    optimizer, groups_desc = build_optimizer(cfg.optim, method, peak)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    say(f"{cfg.method.name}/{cfg.model.arch} on {rt.dist.world_size} x {rt.device.type}, "
        f"{rt.per_rank(cfg.train.global_batch)} images x {len(cfg.views)} views per rank, "
        f"precision {rt.dtype or torch.float32}; param groups: {groups_desc}")
    start_step, resumed_from = _resume(cfg, resume, rt, method, optimizer, scaler, say)

    # a fresh DALI iterator after a resume: another seed, so it does not replay step 0's batches
    loader_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + start_step))
    loader = build_train_loader(loader_cfg, rank=rt.dist.rank, world_size=rt.dist.world_size,
                                local_rank=rt.dist.local_rank, device=rt.device)
    run = _Run(cfg, rt, method, optimizer, scaler, steps_per_epoch=len(loader), start_step=start_step,
               monitor=not monitor_note, say=say)
    if start_step >= run.end_step:  # e.g. re-running a finished run: report what is on disk
        say(f"already at step {start_step} of {run.end_step}: nothing to train")
        run.last_path = Path(resumed_from) if resumed_from else None
        run.final_path = run.final if run.final.is_file() else None
    memory_format = torch.channels_last if rt.device.type == "cuda" and cfg.train.channels_last else torch.contiguous_format
    batches = endless(loader)
    model.train()
    try:
        _loop(run, model, batches, memory_format, peak)
        elapsed = run.meter.elapsed()
    finally:
        run.log.close()
    img_s = run.meter.run_images_per_s(elapsed)
    return {"step": max(start_step, run.end_step), "total_steps": run.total_steps,
            "steps_per_epoch": run.steps_per_epoch, "loss": run.meter.last_loss, "images_per_s": img_s,
            "views_per_s": img_s * len(cfg.views), "out_dir": cfg.train.out_dir,
            "checkpoint": str(run.last_path) if run.last_path else None,
            "final": str(run.final_path) if run.final_path else None, "resumed_from": resumed_from,
            "world_size": rt.dist.world_size}


def _loop(run: "_Run", model: torch.nn.Module, batches, memory_format, peak: float) -> None:
    """The recipe: data -> forward/loss -> backward -> step -> schedule -> bookkeeping."""
    cfg, rt, method, optimizer = run.cfg, run.rt, run.method, run.optimizer
    for step in range(run.start_step, run.end_step):
        views = [v.to(rt.device, non_blocking=True).contiguous(memory_format=memory_format)
                 for v in next(batches).views]
        if rt.dtype is None:
            views = [v.float() for v in views]
        lr = lr_at(step, run.total_steps, run.warmup_steps, peak, cfg.schedule.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            loss = train_step(model, optimizer, run.scaler, views, rt.dtype)
        except torch.cuda.OutOfMemoryError:
            raise _oom_error(cfg, rt.dist) from None
        method.after_optimizer_step(step, run.total_steps)  # BYOL: EMA of the target
        run.meter.update(loss, step)
        run.log.advance()
        run.maybe_log(step + 1, lr)
        run.maybe_checkpoint(step + 1)
        run.maybe_monitor(step + 1, lr)


def _resume(cfg: Config, resume: str | None, rt: Runtime, method, optimizer, scaler, say) -> tuple[int, str | None]:
    """Restore the checkpoint ``--resume`` names (if any); returns (start step, its path)."""
    state, resumed_from = _resume_state(cfg, resume, rt.dist)
    if state is None:
        if resume == "auto":
            say(f"no valid checkpoint in {Path(cfg.train.out_dir) / 'checkpoints'}: starting from scratch")
        return 0, None
    _load_state(state, resumed_from, cfg, method, optimizer, scaler)
    start_step = int(state["step"])
    if rt.is_main:
        ckpt.set_rng_state(state["rng"])
    else:
        torch.manual_seed(cfg.train.seed + rt.dist.rank + start_step)
    say(f"resumed from {resumed_from} at step {start_step}")
    return start_step, resumed_from


@dataclass
class _Run:
    """What the loop's bookkeeping needs: the step plan, meter, run log and checkpoint paths.

    The ``maybe_*`` helpers run after optimizer step ``done`` (1-based) on every rank:
    the log and checkpoint points are collectives (loss all-reduce, non-finite check).
    """

    cfg: Config
    rt: Runtime
    method: SiameseMethod
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    start_step: int
    monitor: bool  # the kNN monitor is configured and can run
    say: Callable[[str], None]
    last_path: Path | None = None
    final_path: Path | None = None

    def __post_init__(self):
        spe, t = self.steps_per_epoch, self.cfg.train
        self.total_steps = self.cfg.schedule.epochs * spe
        self.warmup_steps = self.cfg.schedule.warmup_epochs * spe
        self.end_step = min(self.total_steps, t.max_steps) if t.max_steps else self.total_steps
        self.ckpt_dir = Path(t.out_dir) / "checkpoints"
        self.final = Path(t.out_dir) / "final.pt"
        self.meter = StepMeter(self.rt.device, self.rt.dist, t.global_batch)
        self.log = RunLog(self.cfg, self.rt.is_main, self.end_step, self.start_step)

    def maybe_log(self, done: int, lr: float) -> None:
        if done % self.cfg.train.log_every and done != self.end_step:
            return
        self.meter.guard.check(self.ckpt_dir, self.rt.dtype)
        loss, img_s = self.meter.read()  # note: host sync point
        self.log.log(done, {"epoch": (done - 1) // self.steps_per_epoch, "loss": loss, "lr": lr,
                            "images_per_s": img_s, "views_per_s": img_s * len(self.cfg.views)})

    def maybe_checkpoint(self, done: int) -> None:
        if done % self.cfg.train.ckpt_every_steps and done % self.steps_per_epoch and done != self.end_step:
            return
        self.meter.guard.check(self.ckpt_dir, self.rt.dtype)  # never overwrite the last good checkpoint with a bad state
        if self.rt.is_main:
            state = _checkpoint_state(self.cfg, self.method, self.optimizer, self.scaler, done, self.steps_per_epoch)
            self.last_path = ckpt.save_checkpoint(state, self.ckpt_dir, self.cfg.train.keep_last)
            if done == self.end_step:
                self.final_path = ckpt.atomic_save(state, self.final)

    def maybe_monitor(self, done: int, lr: float) -> None:
        if not (self.monitor and monitor_runs_after(self.cfg, done, self.steps_per_epoch)):
            return
        knn = online_knn(self.cfg, self.method.backbone, self.rt)  # all ranks; returns to train mode
        epoch = done // self.steps_per_epoch
        self.log.log(done, {"epoch": epoch, "loss": self.meter.last_loss, "lr": lr, "images_per_s": float("nan"),
                            "knn_top1": knn["top1"], "knn_top5": knn["top5"]})
        self.say(f"epoch {epoch}: kNN top-1 {knn['top1']:.1f}%")


def main(argv: list[str] | None = None) -> int:
    """CLI entry (``mscn pretrain``, ``python -m`` / ``torchrun -m mscn.train.pretrain``):
    the exit status; an MscnError is one line and status 2 on every rank (:func:`run_cli`)."""
    parser = argparse.ArgumentParser(prog="python -m mscn.train.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML recipe (a path or a bundled name)")
    parser.add_argument("--resume", default="auto", help="auto (newest valid checkpoint), a ckpt path, or none")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.global_batch=256")
    args = parser.parse_args(argv)
    return run_cli(lambda: _command(args), "mscn pretrain")


def _command(args: argparse.Namespace) -> None:
    summary = run_pretrain(load_config(args.config, args.overrides), resume=args.resume)
    if summary["final"]:
        loss = summary["loss"]
        print(f"[mscn] done: step {summary['step']}/{summary['total_steps']}, "
              f"loss {loss if math.isnan(loss) else round(loss, 4)}, {summary['images_per_s']:.1f} images/s; "
              f"final checkpoint {summary['final']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
