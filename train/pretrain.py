"""MSCN pretraining: SimCLR or BYOL on masked multi-view batches (paper §5, App. A.1).

    python -m mscn.train.pretrain --config simclr_r50_in1k [--resume auto|PATH|none] [key=value ...]
    torchrun --standalone --nproc_per_node=8 -m mscn.train.pretrain --config ...

The loop reads top to bottom: data -> forward -> loss -> backward -> step -> schedule
-> log/checkpoint. lr = optim.base_lr * train.global_batch / 256, linear warm-up over
schedule.warmup_epochs then cosine to the end of schedule.epochs, set every step.
Each rank gets global_batch / world_size images (x V views) per step.

Run directory (train/rundir.py): ``train.out_dir``, by default
``runs/<recipe>-<YYYYmmdd-HHMMSS>``, belongs to one run; its ``config.yaml`` is written
once. To resume a run, pass its folder again: ``train.out_dir=runs/demo-20260101-120000``
(or ``--out``). ``--resume auto`` (the default) then continues from its newest valid
checkpoint, and refuses, naming the keys, if the config changed anything that changes
the result. ``--resume none`` starts over (the old files move to ``superseded-<time>/``).

Exact resume (train/resume.py): every checkpoint holds model, BYOL target, optimizer,
scaler and step, and per rank the DALI pipeline checkpoint, the mask generator and the
RNG states, so a run killed at any step and resumed ends with the same loss and weights
as an uninterrupted one. ``metrics.jsonl`` keeps each step once.

Preemption (train/preempt.py): SIGINT/SIGTERM/SIGHUP finish the current step, write a
checkpoint, and exit with status 128 + signal (130, 143, 129), naming where it resumes.

Host syncs: the loss is read back (``.item()``) only at logging and checkpoint steps;
in between a non-finite loss is remembered on the device (``torch.where``) and
reported, with its step, at the next of those points, before anything is saved.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mscn.config import Config, load_config, validate
from mscn.data.filecheck import check_training_files
from mscn.maskspec import MaskCoverageWarning, coverage_notes
from mscn.errors import ENVIRONMENT_ERRNOS, DataError, MscnError, RunDataError, SignalStop, run_cli, say_once
from mscn.train import checkpoint as ckpt
from mscn.train.distributed import (DistInfo, barrier, broadcast_object, check_same_data, cleanup, convert_sync_batchnorm,
                                    gather_objects)
from mscn.train.lars import build_optimizer
from mscn.train import resume as rs
from mscn.train.meter import NonFiniteGuard, StepMeter  # noqa: F401  (NonFiniteGuard: importable here as before)
from mscn.train.methods import SiameseMethod, build_method
from mscn.train.monitor import check_val_root, monitor_off_reason, monitor_runs_after, online_knn
from mscn.train.preempt import StopFlag, Stopped
from mscn.train.rundir import (FAILED_STARTS, FRESH, STOPPED, RunDirBusy, adopt_saved_choices, check_run_dir,
                               claim_run_dir, count_failed_start, default_out_dir, ensure_config, lock_run_dir,
                               mark_stopped, unlock_run_dirs)
from mscn.train.runlog import RunLog, last_logged, read_metrics, require_tensorboard
from mscn.train.runtime import Runtime, amp_dtype, autocast, setup_runtime, wrap_ddp  # noqa: F401  (amp_dtype: API)
from mscn.train.schedule import lr_at, peak_lr
from mscn.train.watchdog import StallWatch

# rank 0's progress bar for the check of the training files from this many files a rank: 50 k
# files took 1-2 s from the page cache and 6 s from a cold disk (2-core CPU machine, 8
# threads), and a network file system waits on the server at every open
CHECK_BAR_FILES = 50_000


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
        try:
            synthesize(out, d.synthetic_classes, d.synthetic_per_class, size=tuple(d.synthetic_size),
                       seed=cfg.train.seed, val_per_class=d.synthetic_val_per_class)
        except OSError as e:
            if e.errno not in ENVIRONMENT_ERRNOS:
                raise
            raise MscnError(f"data.synthetic_dir={out}: cannot write the synthetic dataset there ({e.strerror}: "
                            f"{e.filename}); set data.synthetic_dir to a writable folder (mscn demo: --data DIR)") from None
    if info is not None:
        barrier()  # the other ranks read the folder rank 0 has just written
    val_root = d.val_root or (str(out / "val") if d.synthetic_val_per_class else "")
    return dataclasses.replace(cfg, data=dataclasses.replace(d, root=str(out / "train"), val_root=val_root))


def run_pretrain(cfg: Config, resume: str | None = "auto", recipe: str | None = None) -> dict:
    """Pretrain as configured; returns a summary (steps, loss, images/s, checkpoint paths).

    ``recipe`` names the default run directory when ``train.out_dir`` is empty.
    Raises :class:`~mscn.train.preempt.Stopped` after a checkpoint on SIGINT/SIGTERM/SIGHUP.
    """
    rt = setup_runtime(cfg.train.device, cfg.train.precision, what="train.device")
    try:
        # the whole run on a high-priority stream (GPU), model set-up and DDP included, so
        # that autograd and DDP keep to the stream the steps run on
        with rt.priority_stream(cfg.train.priority_stream), StopFlag() as stop:
            return _run(cfg, resume, rt, recipe, stop)
    finally:
        unlock_run_dirs()
        cleanup()


def _claim(cfg: Config, resume: str | None, rt: Runtime, recipe: str | None, say) -> Config:
    """The run directory: named (rank 0) if unset, checked (every rank), then claimed (rank 0)."""
    if not cfg.train.out_dir:
        out = broadcast_object(str(default_out_dir(recipe)) if rt.is_main else None)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=out))
        say(f"run directory {out}; to resume this run later pass train.out_dir={out}")
    busy = None
    if rt.is_main:  # one live run per folder; every rank raises rank 0's error
        try:
            note = lock_run_dir(cfg.train.out_dir)
            if note:
                say(f"note: {note}")
        except MscnError as e:
            busy = str(e)
    busy = broadcast_object(busy)
    if busy:
        raise RunDirBusy(busy)
    check_run_dir(cfg, resume)  # read-only on every rank: all raise the same error
    rs.check_resume_path(cfg, resume)
    barrier()  # ... before rank 0 writes config.yaml
    if rt.is_main:
        moved = claim_run_dir(cfg, fresh=resume in FRESH)
        if moved:
            say(f"--resume none: the previous run's files in {cfg.train.out_dir} moved to {moved}")
    return cfg


def _run(cfg: Config, resume: str | None, rt: Runtime, recipe: str | None, stop: StopFlag) -> dict:
    from mscn.pipelines import build_train_loader, endless  # DALI is heavy: imported only to train
    from mscn.pipelines.feeder import Feeder
    from mscn.pipelines.loader import ColourWhereWarning, check_size
    from mscn.pipelines.readers import ShardDriftWarning, drift_note, resolve_source

    validate(cfg, recipe or "config", world_size=rt.dist.world_size)  # the world size is known here
    cfg, adopted = adopt_saved_choices(cfg, resume, gpu=rt.device.type == "cuda")  # a resumed run keeps its choice
    cfg = cfg.resolved_for(gpu=rt.device.type == "cuda")  # config.yaml records what runs
    if cfg.train.tensorboard:
        require_tensorboard()  # every rank, before anything is written
    cfg = with_synthetic_data(cfg, rt.dist)
    check_val_root(cfg)  # every rank, before the run folder is claimed
    # once (the loader takes it), before the run folder is claimed and the model built: a
    # mistyped data.root leaves no folder behind. Every rank the same data: another copy on one
    # node would plan another schedule
    source = resolve_source(cfg.data.root, cfg.data.format)
    check_size(source, cfg.train.global_batch, "train.global_batch")
    check_same_data(source, rt.dist)
    say = (lambda msg: print(f"[mscn] {msg}", flush=True)) if rt.is_main else (lambda msg: None)
    if cfg.data.check_files:  # two damaged files in one batch crash DALI with no message (mscn.data.filecheck)
        before = check_training_files(source, rt.dist.rank, rt.dist.world_size, gather=gather_objects,
                                      show=rt.is_main and source.num_samples >= CHECK_BAR_FILES * rt.dist.world_size)
        if before:
            say(f"data check: the files{' of rank 0' if rt.dist.world_size > 1 else ''} are unchanged since their "
                f"check of {before}, not read again "
                "(MSCN_CACHE_DIR=off reads them)")
    cfg = _claim(cfg, resume, rt, recipe, say)
    monitor_note = monitor_off_reason(cfg)
    for note in (rt.note, monitor_note, adopted, cfg.colour_where_note(gpu=rt.device.type == "cuda"),
                 *coverage_notes([v.mask for v in cfg.views], cfg.data.image_size)):
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
    state, resumed_from = rs.find_resume_state(cfg, resume, rt.dist)
    if state is None:
        start_step, mine = 0, None
        if resume == "auto":
            say(f"no valid checkpoint in {Path(cfg.train.out_dir) / 'checkpoints'}: starting from scratch")
    else:
        branch = rs.is_branch(cfg, resume)
        changed = rs.load_state(state, resumed_from, cfg, method, optimizer, scaler, branch=branch)
        start_step, (mine, why) = int(state["step"]), rs.this_rank(state, rt.dist, cfg, rt.device.type == "cuda")
        if changed:  # a branch under other settings: its loader state belongs to the old ones
            mine, why = None, f"branched with other settings: {', '.join(changed)}"
        moved = rs.data_changed(state, mine, source, cfg.data.root)
        if moved and not branch:  # every rank reads the same data (checked above): all stop here
            raise MscnError(f"{resumed_from}: {moved}, so it cannot continue exactly; restore the data it trained "
                            "on, or continue from it with a fresh data order in a new folder: --resume "
                            f"{resumed_from} --out NEW_DIR")
        if moved:
            mine, why = None, f"branched onto other data: {moved}"
        say(f"resumed from {resumed_from} at step {start_step}" + ("" if mine else
            f" ({why}: fresh data order, not exact)"))
    if rt.is_main:
        ensure_config(cfg)  # a started run that lost its config.yaml gets it back once its checkpoint fits

    with warnings.catch_warnings():  # the coverage notes were said above, once, by rank 0; the drift below
        warnings.simplefilter("ignore", MaskCoverageWarning)
        warnings.simplefilter("ignore", ShardDriftWarning)
        warnings.simplefilter("ignore", ColourWhereWarning)
        loader = build_train_loader(rs.loader_cfg(cfg, mine, start_step), rank=rt.dist.rank,
                                    world_size=rt.dist.world_size, local_rank=rt.dist.local_rank, device=rt.device,
                                    state=mine["loader"] if mine else None, source=source)
    drift = drift_note(loader.source, rt.dist.world_size, loader.replay.even_shards)
    if drift:
        say(f"note: {drift}")
    run = _Run(cfg, rt, method, optimizer, scaler, steps_per_epoch=len(loader), start_step=start_step,
               monitor=not monitor_note, say=say, loader=loader, stop=stop,
               resumed_here=state is not None and not rs.is_branch(cfg, resume))
    if mine is not None:
        run.meter.load_state_dict(mine["meter"])
    if state is not None:
        rs.restore_rng(state, mine, cfg, rt.dist, start_step)  # last: building the model and loader draws none after this
    if start_step >= run.end_step:  # e.g. re-running a finished run: report what is on disk
        run.last_path = Path(resumed_from) if resumed_from else None
        # final.pt only when it holds these weights: a run resumed past its first end has
        # an older final.pt, and a folder a finished checkpoint branched into has none
        # (rank 0's, as at a run's end: the other ranks do not report it)
        run.final_path = (run.final if rt.is_main and run.final.is_file() and ckpt.step_of(run.final) == start_step
                          else None)
        own = run.last_path is not None and run.last_path.parent.resolve() == run.ckpt_dir.resolve()
        if run.final_path is None and own and start_step == run.end_step and rt.is_main:
            # killed between its last checkpoint and final.pt: the run ended, so finish it
            run.final_path = ckpt.link_or_save(run.last_path, state, run.final)
        run.log.notice(f"already at step {start_step} of {run.end_step}: nothing to train"  # above the bar
                       + (f"; its weights are in {run.last_path}" if run.final_path is None and run.last_path else ""))
    memory_format = torch.channels_last if rt.device.type == "cuda" and cfg.train.channels_last else torch.contiguous_format
    # under torchrun a file failing on one rank is looked for only once every rank has checkpointed
    loader.explain_later = rt.dist.world_size > 1
    batches, feeder = endless(loader), None
    if cfg.data.feed_thread and start_step < run.end_step:
        # a thread takes the batches (mscn.pipelines.feeder); checkpoints take the loader
        # state of the last batch it handed over, not of those waiting in its queue
        feeder = Feeder(batches, snapshot=loader.state_dict)
        batches = run.loader = feeder
    model.train()
    try:
        with StallWatch(rt.dist.rank, rt.dist.world_size, cfg.train.stall_warn_s,
                        Path(cfg.train.out_dir) / "stalls") as run.watch:
            _loop(run, model, batches, memory_format, peak)
        elapsed = run.meter.elapsed()
    finally:
        if feeder is not None:
            feeder.close()  # before the loader can be freed: the worker may be inside DALI
        run.log.close()
    img_s = run.meter.run_images_per_s(elapsed)
    img_s = img_s if math.isfinite(img_s) else None  # no timed step (one step, or none left): no figure
    loss = run.meter.last_loss
    if not math.isfinite(loss):  # nothing trained now: the run's last logged loss (the guard stops real NaNs)
        loss = last_logged(cfg.train.out_dir, "loss", upto=start_step)
    return {"step": max(start_step, run.end_step), "trained_steps": max(0, run.end_step - start_step),
            "total_steps": run.total_steps,
            "steps_per_epoch": run.steps_per_epoch, "loss": loss, "images_per_s": img_s,
            "views_per_s": img_s * len(cfg.views) if img_s is not None else None, "out_dir": cfg.train.out_dir,
            "checkpoint": str(run.last_path) if run.last_path else None,
            "final": str(run.final_path) if run.final_path else None, "resumed_from": resumed_from,
            "world_size": rt.dist.world_size}


def _loop(run: "_Run", model: torch.nn.Module, batches, memory_format, peak: float) -> None:
    """The recipe: data -> forward/loss -> backward -> step -> schedule -> bookkeeping."""
    cfg, rt, method, optimizer = run.cfg, run.rt, run.method, run.optimizer
    multi = rt.dist.world_size > 1
    run.catch_up_monitor(peak)
    for step in range(run.start_step, run.end_step):
        run.watch.at("data", step + 1)  # steps counted from 1, as in the log lines
        # under torchrun, this rank's loader state before the batch (0.2 ms): if another rank's
        # file fails, every rank checkpoints the steps trained with its own batch not yet taken
        before = run.loader.state_dict() if multi and step > run.start_step else None
        try:
            batch, failed = next(batches), None
        except DataError as e:  # a file that cannot be read, mid-run: keep the steps trained
            batch, failed = None, e
        run.watch.at("step", step + 1)  # to the end of the bookkeeping (its collectives wait for every rank)
        signum, failed_rank = run.stop.agreed(failed is not None)  # every rank, every step
        if failed_rank is not None:  # on any rank: no rank enters the step
            try:
                raise run.kept_on_data_error(step, failed, failed_rank, before) from None
            finally:  # the error's traceback holds this frame: no cycle through it may keep the
                failed = None  # loader alive (DALI's mapping of the failed file, read again by a rerun)
        views = [v.to(rt.device, non_blocking=True).contiguous(memory_format=memory_format) for v in batch.views]
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
        run.meter.update(loss, step + 1)  # steps done, counted from 1 as in metrics.jsonl and ckpt names
        run.log.advance()
        run.maybe_log(step + 1, lr)
        run.maybe_checkpoint(step + 1)
        run.maybe_monitor(step + 1, lr)
        run.maybe_stop(step + 1, signum)


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
    loader: object  # the DaliLoader (or its Feeder, data.feed_thread): its state goes into every checkpoint
    stop: StopFlag
    resumed_here: bool = False  # continues a checkpoint of its own folder (not a start, not a branch)
    last_path: Path | None = None
    final_path: Path | None = None
    saved_step: int = -1
    watch: StallWatch = field(default_factory=lambda: StallWatch(0, 1, 0, None))  # off until _run's is set

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

    def maybe_checkpoint(self, done: int, now: bool = False, loader_state: dict | None = None) -> None:
        """loader_state: this rank's loader state after step ``done`` (default: the loader's own)."""
        if not now and done % self.cfg.train.ckpt_every_steps and done % self.steps_per_epoch and done != self.end_step:
            return
        self.watch.at("checkpoint", done)
        self.meter.guard.check(self.ckpt_dir, self.rt.dtype)  # never overwrite the last good checkpoint with a bad state
        mine = rs.rank_state(self.loader, self.meter, loader_state)
        ranks = rs.gather_rank_states(mine, self.rt.dist)  # every rank
        if self.rt.is_main:
            state = rs.checkpoint_state(self.cfg, self.method, self.optimizer, self.scaler, done,
                                        self.steps_per_epoch, ranks)
            self.last_path = ckpt.save_checkpoint(state, self.ckpt_dir, self.cfg.train.keep_last)
            if done == self.end_step:
                self.final_path = ckpt.link_or_save(self.last_path, state, self.final)
        self.saved_step = done

    def maybe_stop(self, done: int, signum: int) -> None:
        """After a SIGINT/SIGTERM/SIGHUP (on any rank; ``signum`` as the ranks agreed before this
        step): checkpoint this step, then raise Stopped. Every rank stops after the same one."""
        if not signum or done == self.end_step:
            return
        if self.saved_step != done:
            self.maybe_checkpoint(done, now=True)
        if self.rt.is_main:  # what a requeue script reads: torchrun's own exit status is 1 here
            mark_stopped(self.cfg.train.out_dir, f"stopped by {StopFlag.name(signum)} after step {done} of "
                                                 f"{self.end_step}; checkpoint {ckpt.ckpt_path(self.ckpt_dir, done)}")
        raise Stopped(f"stopped by {StopFlag.name(signum)} after step {done} of {self.end_step}; checkpoint "
                      f"{ckpt.ckpt_path(self.ckpt_dir, done)}; resume with the same command and "
                      f"train.out_dir={self.cfg.train.out_dir} (--resume auto)", signum)

    def kept_on_data_error(self, done: int, err: DataError | None, failed_rank: int,
                           before: dict | None) -> DataError:
        """The loader of rank ``failed_rank`` failed on a file (a file cut short or not an
        image, met mid-epoch) after ``done`` steps: checkpoint them first, on every rank (a
        collective under torchrun, as :meth:`StopFlag.agreed` told every rank). The failed
        batch was not consumed, and each other rank's loader state is ``before`` it took its
        batch, so the run continues exactly once the file is fixed. ``err``: this rank's
        error (None on the ranks whose batch came). Returns the error to raise: the failed
        rank's, naming the checkpoint and both ways on; under torchrun every rank raises it
        and rank 0 says it (:class:`RunDataError`)."""
        from mscn.pipelines.loader import UnexplainedDataError

        multi = self.rt.dist.world_size > 1
        if done > self.start_step:
            if self.saved_step != done:
                self.maybe_checkpoint(done, now=True, loader_state=before)
            path = ckpt.ckpt_path(self.ckpt_dir, done)
            kept = (f". The {done} steps trained are kept in {path}: with that file replaced by a good one, rerun "
                    "the same command and the run continues exactly; with the data changed (the scan's list instead "
                    f"of the folder), continue from it in a new folder with --resume {path} --out NEW_DIR")
        else:  # nothing trained since this start: the checkpoint it started from still holds everything
            kept = ""
        if isinstance(err, UnexplainedDataError):  # after the checkpoint: the search may take minutes
            self.watch.at("data", done + 1)  # a stall line says: no batch (the others: in the gather below)
            try:
                err = err.explained()
            except Exception as e:  # the others wait for this rank's line: it must come
                err = DataError(f"{err} (the search for the file failed: {type(e).__name__}: {e})")
        if not multi:
            return DataError(f"{err}{kept}") if kept else err
        # the others wait here for the failed rank's search, on the flag's CPU group
        said = gather_objects(str(err) if err is not None else None, group=self.stop.group)[failed_rank]
        return RunDataError(f"{said} (rank {failed_rank} of {self.rt.dist.world_size}){kept}")

    def maybe_monitor(self, done: int, lr: float, loss: float | None = None) -> None:
        if not (self.monitor and monitor_runs_after(self.cfg, done, self.steps_per_epoch)):
            return
        self.watch.at("monitor", done)
        knn = online_knn(self.cfg, self.method.backbone, self.rt)  # all ranks; returns to train mode
        epoch = done // self.steps_per_epoch
        # no images_per_s: a monitor record is not a training window (the bar keeps its last figure)
        self.log.log(done, {"epoch": epoch, "loss": self.meter.last_loss if loss is None else loss, "lr": lr,
                            "knn_top1": knn["top1"], "knn_top5": knn["top5"]})
        self.log.notice(f"epoch {epoch}: kNN top-1 {knn['top1']:.1f}%")  # above the bar, not glued to it


    def catch_up_monitor(self, peak: float) -> None:
        """The kNN monitor of the step the run starts from, when metrics.jsonl lacks its line:
        a run killed between an epoch's checkpoint and that epoch's monitor (kill -9, a lost
        node) lost the epoch's kNN point for good (the fault-injection probe). Measured now,
        on the same weights; whatever the monitor draws comes after the checkpoint's RNG
        state, as in the run that was killed, so the run still continues exactly. Every rank
        (the monitor is a collective), on rank 0's reading of the file."""
        done = self.start_step
        if not (self.resumed_here and self.monitor and monitor_runs_after(self.cfg, done, self.steps_per_epoch)):
            return  # a branch's source folder holds that line (the reuse probe: measured again, loss null)
        logged = None
        if self.rt.is_main:
            logged = any(r.get("step") == done and "knn_top1" in r for r in read_metrics(self.cfg.train.out_dir))
        if broadcast_object(logged):
            return
        self.log.notice(f"epoch {done // self.steps_per_epoch}: no kNN line in metrics.jsonl for step {done} (the "
                        "run stopped before its monitor): measuring it now")
        lr = lr_at(done - 1, self.total_steps, self.warmup_steps, peak, self.cfg.schedule.min_lr_ratio)
        self.maybe_monitor(done, lr, loss=last_logged(self.cfg.train.out_dir, "loss", upto=done))


def main(argv: list[str] | None = None) -> int:
    """CLI entry (``mscn pretrain``, ``python -m`` / ``torchrun -m mscn.train.pretrain``):
    the exit status; an MscnError is one line and status 2 on every rank (:func:`run_cli`; rank 0's line
    only for a command-line typo, the same on every rank)."""
    parser = argparse.ArgumentParser(prog="mscn pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML recipe (a path or a bundled name)")
    parser.add_argument("--out", default=None,
                        help="run directory, same as train.out_dir=DIR (default: runs/<recipe>-<YYYYmmdd-HHMMSS>); "
                             "pass a run's directory again to resume it")
    parser.add_argument("--resume", default="auto",
                        help="auto (newest valid checkpoint of this run directory), a ckpt path (this run's, at "
                             "or past its newest step; another run's only into a new directory, where it "
                             "branches), or none (start over here; the old files move to superseded-<time>/)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.global_batch=256")
    args = parser.parse_intermixed_args(argv)  # overrides on both sides of an option
    if not args.resume.strip():
        # `--resume "$CKPT"` with CKPT unset: starting over would supersede the run on every requeue
        parser.error("--resume '': empty (an unset variable?); pass auto, a checkpoint path, or none")
    return run_cli(lambda: _command(args), "mscn pretrain")


def _command(args: argparse.Namespace) -> None:
    overrides = list(args.overrides) + ([f"train.out_dir={args.out}"] if args.out else [])
    recipe = Path(args.config).stem if args.config else None
    try:
        summary = run_pretrain(load_config(args.config, overrides), resume=args.resume, recipe=recipe)
    except Exception as e:
        # a start that fails may fail again: the STOPPED of the run it was to continue requeues
        # it only FAILED_STARTS times in a row (docs/TRAINING.md); a stop, or another live
        # run's folder, leaves it as it is
        counted = None if isinstance(e, (SignalStop, RunDirBusy)) else count_failed_start(
            _out_dir_of(args.config, overrides))
        if counted and counted[1]:  # once per node, as the error line (every rank counts)
            say_once(f"[mscn] {STOPPED} removed: {counted[0]} starts of this run failed in a row, so a requeue "
                     "script will not start it again")
        elif counted:
            say_once(f"[mscn] {STOPPED} kept: this start failed ({counted[0]} of {FAILED_STARTS} in a row before it "
                     "is removed), so a requeue script starts it again")
        raise
    if summary["final"] and not summary["trained_steps"]:  # no loss or speed to report
        print(f"[mscn] done: step {summary['step']}/{summary['total_steps']}, nothing left to train; "
              f"final checkpoint {summary['final']}", flush=True)
    elif summary["final"]:
        img_s = summary["images_per_s"]
        print(f"[mscn] done: step {summary['step']}/{summary['total_steps']}, loss {round(summary['loss'], 4)}, "
              + (f"{img_s:.1f} images/s" if img_s is not None else "no images/s (one step is not timed)")
              + f"; final checkpoint {summary['final']}", flush=True)


def _out_dir_of(config: str | None, overrides: list[str]) -> str | None:
    """The run folder a command line names, even when its config does not load (a typo):
    the last ``train.out_dir=`` override, else the recipe's."""
    given = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == "train.out_dir"]
    if given:
        return given[-1] or None
    try:
        return load_config(config, []).train.out_dir or None
    except MscnError:
        return None


if __name__ == "__main__":
    sys.exit(main())
