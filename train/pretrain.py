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
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from mscn.config import Config, load_config, to_dict, validate
from mscn.errors import MscnError
from mscn.train import checkpoint as ckpt
from mscn.train.distributed import (DistInfo, barrier, broadcast_object, cleanup, convert_sync_batchnorm,
                                    env_local_rank, init_distributed, pick_device)
from mscn.train.lars import build_optimizer
from mscn.train.methods import SiameseMethod, build_method
from mscn.train.monitor import due, monitor_off_reason, online_knn
from mscn.train.runlog import RunLog
from mscn.train.schedule import lr_at, peak_lr


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: ``auto`` is bf16 on GPU and fp32 (no autocast) on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


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
    model: torch.nn.Module = method
    if info.enabled:
        model = DDP(method, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
    if cfg.train.compile:
        model = torch.compile(model)
    return method, model


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               views: list[torch.Tensor], dtype: torch.dtype | None) -> torch.Tensor:
    """forward -> loss -> backward -> optimizer step; returns the detached loss (no sync)."""
    device_type = views[0].device.type
    with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
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


class NonFiniteGuard:
    """Remembers, on the device, the first step whose loss was NaN/Inf (no host sync per step)."""

    def __init__(self, device: torch.device, info: DistInfo):
        self.first_bad = torch.tensor(-1, device=device)
        self.info = info

    def update(self, loss: torch.Tensor, step: int) -> None:
        self.first_bad = torch.where(torch.isfinite(loss) | (self.first_bad >= 0), self.first_bad, step)

    def check(self, ckpt_dir: Path, dtype: torch.dtype | None) -> None:
        """Note: host sync point (and a collective under DDP): raise if any step went bad."""
        if self.info.enabled:
            dist.all_reduce(self.first_bad, op=dist.ReduceOp.MAX)
        first_bad = int(self.first_bad.item())
        if first_bad >= 0:
            last = ckpt.list_checkpoints(ckpt_dir)
            fix = "lower optim.base_lr" + (" or use train.precision=fp32" if dtype is not None else "")
            raise MscnError(f"non-finite loss at step {first_bad}; stopped. Last good checkpoint: "
                            f"{last[-1] if last else 'none'}; {fix}")


def run_pretrain(cfg: Config, resume: str | None = "auto") -> dict:
    """Pretrain as configured; returns a summary (steps, loss, images/s, checkpoint paths)."""
    device, device_note = pick_device(cfg.train.device, env_local_rank())
    info = init_distributed(device.type)
    try:
        return _run(cfg, resume, device, device_note, info)
    finally:
        cleanup()


def _run(cfg: Config, resume: str | None, device: torch.device, device_note: str | None, info: DistInfo) -> dict:
    from mscn.pipelines import build_train_loader, endless  # DALI is heavy: imported only to train

    validate(cfg, "<config>", world_size=info.world_size)
    cfg = with_synthetic_data(cfg, info)
    say = (lambda msg: print(f"[mscn] {msg}", flush=True)) if info.is_main else (lambda msg: None)
    if device_note:
        say(device_note)
    monitor_note = monitor_off_reason(cfg)
    if monitor_note:
        say(monitor_note)
    torch.manual_seed(cfg.train.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtype = amp_dtype(cfg.train.precision, device)
    peak = peak_lr(cfg.optim.base_lr, cfg.train.global_batch)

    method, model = build_model(cfg, device, info)
    optimizer, groups_desc = build_optimizer(cfg.optim, method, peak)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    say(f"{cfg.method.name}/{cfg.model.arch} on {info.world_size} x {device.type}, "
        f"{cfg.train.global_batch // info.world_size} images x {len(cfg.views)} views per rank, "
        f"precision {dtype or torch.float32}; param groups: {groups_desc}")

    state, resumed_from = _resume_state(cfg, resume, info)
    start_step = 0
    if state is not None:
        _load_state(state, resumed_from, cfg, method, optimizer, scaler)
        start_step = int(state["step"])
        if info.is_main:
            ckpt.set_rng_state(state["rng"])
        else:
            torch.manual_seed(cfg.train.seed + info.rank + start_step)
        say(f"resumed from {resumed_from} at step {start_step}")
        del state
    elif resume == "auto":
        say(f"no valid checkpoint in {Path(cfg.train.out_dir) / 'checkpoints'}: starting from scratch")

    # a fresh DALI iterator after a resume: another seed, so it does not replay step 0's batches
    loader_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + start_step))
    loader = build_train_loader(loader_cfg, rank=info.rank, world_size=info.world_size,
                                local_rank=info.local_rank, device=device)
    steps_per_epoch = len(loader)
    total_steps = cfg.schedule.epochs * steps_per_epoch
    warmup_steps = cfg.schedule.warmup_epochs * steps_per_epoch
    end_step = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
    log = RunLog(cfg, info.is_main, end_step, start_step)
    ckpt_dir = Path(cfg.train.out_dir) / "checkpoints"
    memory_format = torch.channels_last if device.type == "cuda" and cfg.train.channels_last else torch.contiguous_format

    guard = NonFiniteGuard(device, info)
    loss_sum, loss_count = torch.zeros((), device=device), 0
    last_loss, last_path, final_path = float("nan"), None, None
    t_log, window_steps, t_first, steps_timed = time.perf_counter(), 0, None, 0
    if start_step >= end_step:  # e.g. re-running a finished run: report what is on disk
        say(f"already at step {start_step} of {end_step}: nothing to train")
        last_path = Path(resumed_from) if resumed_from else None
        final_path = Path(cfg.train.out_dir) / "final.pt" if (Path(cfg.train.out_dir) / "final.pt").is_file() else None
    batches = endless(loader)
    model.train()
    try:
        for step in range(start_step, end_step):
            views = [v.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                     for v in next(batches).views]
            if dtype is None:
                views = [v.float() for v in views]
            lr = lr_at(step, total_steps, warmup_steps, peak, cfg.schedule.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                loss = train_step(model, optimizer, scaler, views, dtype)
            except torch.cuda.OutOfMemoryError:
                raise _oom_error(cfg, info) from None
            method.after_optimizer_step(step, total_steps)  # BYOL: EMA of the target
            guard.update(loss, step)
            loss_sum += torch.nan_to_num(loss)
            loss_count += 1
            done = step + 1
            log.advance()
            # images/s counts from the end of the first step: start-up and compile excluded
            if t_first is None:
                if device.type == "cuda":
                    torch.cuda.synchronize()  # once: the clock starts when step 1 is really done
                t_first = t_log = time.perf_counter()
            else:
                steps_timed += 1
                window_steps += 1

            if done % cfg.train.log_every == 0 or done == end_step:
                guard.check(ckpt_dir, dtype)
                if info.enabled:
                    dist.all_reduce(loss_sum)
                    loss_sum /= info.world_size
                last_loss = loss_sum.item() / loss_count  # note: host sync point
                now = time.perf_counter()
                img_s = cfg.train.global_batch * window_steps / (now - t_log) if window_steps else float("nan")
                log.log(done, {"epoch": step // steps_per_epoch, "loss": last_loss, "lr": lr,
                               "images_per_s": img_s, "views_per_s": img_s * len(cfg.views)})
                loss_sum.zero_()
                loss_count, window_steps, t_log = 0, 0, now
            if done % cfg.train.ckpt_every_steps == 0 or done % steps_per_epoch == 0 or done == end_step:
                guard.check(ckpt_dir, dtype)  # never overwrite the last good checkpoint with a bad state
                if info.is_main:
                    state = _checkpoint_state(cfg, method, optimizer, scaler, done, steps_per_epoch)
                    last_path = ckpt.save_checkpoint(state, ckpt_dir, cfg.train.keep_last)
                    if done == end_step:
                        final_path = ckpt.atomic_save(state, Path(cfg.train.out_dir) / "final.pt")
                    del state
            if due(cfg, done, steps_per_epoch) and not monitor_note:
                knn = online_knn(cfg, method.backbone, info, device)  # all ranks; returns to train mode
                log.log(done, {"epoch": done // steps_per_epoch, "loss": last_loss, "lr": lr,
                               "images_per_s": float("nan"), "knn_top1": knn["top1"], "knn_top5": knn["top5"]})
                say(f"epoch {done // steps_per_epoch}: kNN top-1 {knn['top1']:.1f}%")
        elapsed = time.perf_counter() - t_first if t_first else 0.0
    finally:
        log.close()
    img_s = cfg.train.global_batch * steps_timed / elapsed if steps_timed else float("nan")
    return {"step": max(start_step, end_step), "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
            "loss": last_loss, "images_per_s": img_s, "views_per_s": img_s * len(cfg.views),
            "out_dir": cfg.train.out_dir, "checkpoint": str(last_path) if last_path else None,
            "final": str(final_path) if final_path else None, "resumed_from": resumed_from,
            "world_size": info.world_size}


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns 0, or exits with status 2 after printing an MscnError as one line."""
    parser = argparse.ArgumentParser(prog="python -m mscn.train.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML recipe (a path or a bundled name)")
    parser.add_argument("--resume", default="auto", help="auto (newest valid checkpoint), a ckpt path, or none")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.global_batch=256")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = run_pretrain(cfg, resume=args.resume)
    except MscnError as e:  # one line, no traceback; exit status 2 under torchrun and mscn alike
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if summary["final"]:
        loss = summary["loss"]
        print(f"[mscn] done: step {summary['step']}/{summary['total_steps']}, "
              f"loss {loss if math.isnan(loss) else round(loss, 4)}, {summary['images_per_s']:.1f} images/s; "
              f"final checkpoint {summary['final']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
