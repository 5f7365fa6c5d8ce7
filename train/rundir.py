"""One run per run directory: its default name, its ``config.yaml``, and the check that
a resume continues the *same* run.

A run directory belongs to the run that created it. ``config.yaml`` is written once,
when that run starts. ``--resume auto`` (or a checkpoint path) continues it only when
the new config matches the saved one on every key that changes what the run computes
(data, model, method, views, masks, high-pass, schedule, optim, global batch, seed,
precision...). Keys in :data:`NEUTRAL` (logging, checkpoint cadence, ``max_steps``,
threads, device, output folder, evaluation settings) may change between invocations.
Anything else stops with one line naming the differing keys and the two ways forward.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from mscn.config import Config, checked, save_config, to_dict, yaml_error_text
from mscn.errors import ConfigError, MscnError

# Keys that never change the weights or the loss of a run: how often it logs and saves,
# where it stops this time, where and how fast it runs, and the evaluation settings.
# data.root: where the data is mounted (a job that stages it to local disk); what it holds is
# checked on resume against the loader state's digest (train/resume.data_changed)
NEUTRAL = frozenset({
    "data.root", "train.out_dir", "train.log_every", "train.ckpt_every_steps", "train.keep_last", "train.max_steps",
    "train.tensorboard", "train.knn_every_epochs", "train.stall_warn_s", "train.device", "train.compile", "train.channels_last",
    "train.priority_stream", "data.num_threads", "data.hw_decoder_load", "data.prefetch", "data.val_root",
    "data.op_concurrency", "data.stream_policy", "data.feed_thread", "data.handover", "data.thread_affinity",
    "data.check_files",
    "optim.foreach",
})
NEUTRAL_SECTIONS = ("eval.",)
# Result-changing keys added after runs already existed, with the value every earlier run
# had: a saved config.yaml without the key is read with it, so an older run continues
# exactly when given that value, and is refused (with the value to pass) otherwise.
LEGACY = {"data.crop": "window", "data.blur_where": "pipeline", "data.colour_where": "pipeline"}
# Result-changing keys whose default changed or is resolved per device (``auto``): a run
# that differs only there continues when given its saved value, which the refusal names.
PINNABLE = ("data.blur_where", "data.crop")
# a run's own files; result.json is the one an ablation writes beside its run (train/ablate)
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "final.pt", "tb", "result.json", "STOPPED",
             "stalls")
STOPPED = "STOPPED"  # present while the run is stopped on a signal, waiting to be resumed (mark_stopped)
LOCK_FILE = ".lock"  # held by the live run's rank 0 (lock_run_dir); never moved or deleted
_LOCKS: dict[str, Any] = {}  # folder -> the open lock file of this process
_UNLOCKABLE: set[str] = set()  # folders whose file system cannot lock: noted once per process
FRESH = (None, "", "none", "never")  # --resume values that start over instead of continuing


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": v, "views.0.mask.ratio": v, ...}``; lists of scalars stay one value."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, (list, tuple)) and any(isinstance(v, dict) for v in tree):
        out = {f"{prefix}len": len(tree)}  # e.g. views.len: a different number of views
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def differing_keys(saved: dict, cfg: Config) -> list[str]:
    """The result-changing keys on which ``saved`` (a plain config dict) and ``cfg`` differ."""
    a, b = {**LEGACY, **flatten(saved)}, flatten(to_dict(cfg))
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in NEUTRAL and not k.startswith(NEUTRAL_SECTIONS) and a.get(k) != b.get(k)]


def check_same_run(saved: dict, cfg: Config, where: str | Path, checkpoint: bool = False) -> None:
    """One-line MscnError unless ``saved`` describes the same run as ``cfg``. ``where`` is a
    run folder, or (``checkpoint``) a checkpoint file, whose fix is its own settings."""
    diff = differing_keys(saved, cfg)
    if diff:
        older = [k for k in diff if k in LEGACY and k not in flatten(saved)]
        # keys added since, and keys whose default changed or is resolved per device: when
        # the run differs only there, their saved values continue it
        pinned = [k for k in diff if k in PINNABLE and k in flatten(saved)]
        hint = ""
        if set(diff) <= set(pinned) | set(older):
            hint = "".join(f"; it predates {k} and ran with {k}={LEGACY[k]}: pass that to continue it" for k in older)
            hint += "".join(f"; it ran with {k}={flatten(saved)[k]}: pass that to continue it" for k in pinned)
        if checkpoint:
            raise MscnError(
                f"{where} belongs to another run (differs in {', '.join(diff)}){hint}; to continue from it, pass "
                f"the values it was trained with (its run folder's config.yaml), or --resume none to start over "
                f"in {cfg.train.out_dir}")
        raise MscnError(
            f"{where} belongs to another run (differs in {', '.join(diff)}){hint}; to start a new run pass a new "
            f"train.out_dir=DIR (or --out DIR), or --resume none to start over in {cfg.train.out_dir}")


def adopt_saved_choices(cfg: Config, resume: str | None, gpu: bool) -> tuple[Config, str | None]:
    """``cfg`` with ``data.blur_where=auto`` replaced by the value that the run in
    ``cfg.train.out_dir`` resolved when it started (its ``config.yaml``; ``pipeline`` for a
    run from before the key), when that run is resumed; and a note when that is not what
    ``auto`` would choose on this path (``gpu``), or None.

    ``auto`` is resolved per device when a run starts (Config.resolved_for), and the GPU's
    choice changed in round 5: without this, every GPU run started before it, and every
    run moved between a GPU and the CPU, would be refused on resume as another run. An
    explicit value is left alone (a conflict is then refused, with the value to pass)."""
    if cfg.data.blur_where != "auto" or resume in FRESH:
        return cfg, None
    # the run resumed: this folder's, or (a checkpoint path into a folder without a run) the
    # one the checkpoint was written in: <run>/checkpoints/ckpt_*.pt or <run>/final.pt
    folders = [Path(cfg.train.out_dir)] if cfg.train.out_dir else []
    if resume != "auto" and not (folders and run_started(folders[0])):
        folders = [Path(resume).parent.parent, Path(resume).parent]
    saved = next((f / "config.yaml" for f in folders if (f / "config.yaml").is_file() and run_started(f)), None)
    if saved is None:
        return cfg, None
    try:
        tree = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError:
        return cfg, None  # check_run_dir says what is wrong with it
    value = flatten(tree).get("data.blur_where", LEGACY["data.blur_where"])
    if value not in ("pipeline", "loader"):
        return cfg, None
    now = cfg.blur_where_on(gpu)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, blur_where=value))
    if value == now:
        return cfg, None
    return cfg, (f"data.blur_where=auto: this run started with {value} and continues so (a new run here "
                 f"would use {now})")


def default_out_dir(recipe: str | None, root: str = "runs") -> Path:
    """``runs/<recipe>-<YYYYmmdd-HHMMSS>``, created here so that two runs started in the
    same second still get two folders (``-2``, ``-3``...). Call on rank 0 only."""
    base = Path(root) / f"{recipe or 'pretrain'}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


def run_started(out: str | Path) -> bool:
    """Whether a run in ``out`` got as far as a logged step or a checkpoint. A folder with
    only ``config.yaml`` is a start that failed before its first step (a typo in
    ``data.root``, a batch larger than the dataset): it holds nothing to lose or continue."""
    out = Path(out)
    metrics = out / "metrics.jsonl"
    ckpts = out / "checkpoints"
    # hidden files (a killed writer's .ckpt_*.tmp*, a start's .write-test.*) are no checkpoint
    return ((metrics.is_file() and metrics.stat().st_size > 0) or (out / "final.pt").exists()
            or (ckpts.is_dir() and any(not p.name.startswith(".") for p in ckpts.iterdir())))


def lock_run_dir(out: str | Path) -> str | None:
    """Rank 0, before anything in ``out`` is read or written: hold ``out/.lock`` for the
    rest of this run, or one MscnError line if another live run holds it. Returns a note
    to print when the file system cannot lock (the run goes on, unguarded), else None.

    Two runs started into one folder would otherwise both pass the resume check and then
    write interleaved checkpoints and metrics. ``flock`` is held by the open file: the
    kernel drops it when the process ends, SIGKILL included, so a killed run's folder can
    be resumed at once.
    """
    out = Path(out)
    key = str(out.resolve())
    if key in _LOCKS or key in _UNLOCKABLE:  # this process holds it already, or said it cannot
        return None                            # (mscn demo --fresh, then its pretraining; ablate)
    if out.exists() and not out.is_dir():
        raise MscnError(f"train.out_dir {out}: a file, not a folder; pass a folder (or a new name) for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / LOCK_FILE, "a+")
    except OSError as e:
        what = "cannot write in the run folder" if out.is_dir() else "cannot create the run folder"
        raise MscnError(f"train.out_dir {out}: {what} ({e.strerror})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held by another live process
        f.seek(0)
        holder = ([ln for ln in f.read().splitlines() if ln.strip()] or ["another process"])[-1].strip()
        f.close()
        raise RunDirBusy(f"{out} is in use by a live run ({holder}): wait for it, stop it (it resumes from its "
                         "checkpoint), or pass another train.out_dir=DIR (or --out DIR)") from None
    except OSError as e:  # ENOSYS, EOPNOTSUPP, ENOLCK: e.g. Lustre mounted without -o flock
        f.close()
        _UNLOCKABLE.add(key)
        return (f"{out}: the file system cannot lock ({e.strerror}), so a second run launched into this folder "
                "would not be stopped")
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
    except OSError as e:  # a full disk: the folder cannot take a run either
        f.close()
        raise MscnError(f"{out / LOCK_FILE}: cannot write ({e.strerror})") from None
    _LOCKS[key] = f
    return None


def clear_run_dir(out: str | Path) -> None:
    """Delete a run folder's contents for a fresh start (``mscn demo --fresh``), after taking
    its lock: a live run's folder stops this in one line instead of being deleted under it."""
    out = Path(out)
    note = lock_run_dir(out)
    if note:
        print(f"[mscn] note: {note}", flush=True)
    for p in out.iterdir():
        if p.name != LOCK_FILE:  # the lock this process holds stays with the folder
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def unlock_run_dirs() -> None:
    """Release this process's run-folder locks (the end of a run; process exit does it too)."""
    for f in _LOCKS.values():
        f.close()
    _LOCKS.clear()
    _UNLOCKABLE.clear()


_RESTORE = ("restore it from a copy, or delete it (a resume writes it again from the checkpoint), or pass a "
            "new train.out_dir=DIR (or --out DIR), or --resume none to start over in")


def check_run_dir(cfg: Config, resume: str | None) -> None:
    """Before anything is written: refuse to continue another run's directory (every rank;
    read-only, so all ranks raise the same error). A directory whose run never reached a
    step (:func:`run_started`) belongs to nobody: the new run takes it over."""
    out = Path(cfg.train.out_dir)
    saved = out / "config.yaml"
    if resume in FRESH:
        return
    # a run file of the wrong kind would first read as "no checkpoint" (and restart the run,
    # trimming its metrics) and only then fail: say so before anything is touched
    for name, folder in (("checkpoints", True), ("config.yaml", False), ("metrics.jsonl", False), ("final.pt", False)):
        path = out / name
        if path.exists() and path.is_dir() != folder:
            raise MscnError(f"{path}: a {'file' if folder else 'folder'} where the run keeps its "
                            f"{'checkpoints folder' if folder else name + ' file'}; move it away (or pass --resume "
                            f"none to start over, or a new train.out_dir=DIR)")
    if not saved.is_file() or not run_started(out):
        return
    text = saved.read_text()
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MscnError(f"{saved}: cut short or edited, not valid YAML ({yaml_error_text(e)}); {_RESTORE} "
                        f"{cfg.train.out_dir}") from None
    missing = cut_short(tree, text, cfg)
    if missing:  # not another run: this run's own record, damaged
        raise MscnError(f"{saved}: cut short or edited, it lacks {len(missing)} key(s) this run writes (from "
                        f"{missing[0]} on); {_RESTORE} {cfg.train.out_dir}")
    try:
        check_same_run(tree, cfg, cfg.train.out_dir)
    except MscnError:
        try:  # a key or value the schema refuses is an edit by hand, not another run
            checked(tree, str(saved))
        except ConfigError as e:
            raise MscnError(f"{e} (this run's own record, edited?); mend it, or delete it (a resume writes it "
                            f"again from the checkpoint), or pass a new train.out_dir=DIR, or --resume none to "
                            f"start over in {cfg.train.out_dir}") from None
        raise


def cut_short(saved: Any, text: str, cfg: Config) -> list[str]:
    """The keys a damaged run config lacks, in file order, or [] for an intact one.

    ``config.yaml`` is written in schema order (save_config), so a file cut short lacks a
    *tail* of the keys. An intact file of an older mscn lacks only keys added since, which
    are not a tail of whole sections and leave the file ending with its newline: that run
    is refused as another run (or continued, for :data:`LEGACY` keys) by check_same_run."""
    want = list(flatten(to_dict(cfg)))
    if not isinstance(saved, dict):
        return want  # empty, or cut inside its first line
    have = flatten(saved)
    present = [i for i, k in enumerate(want) if k in have]
    tail = want[present[-1] + 1:] if present else want
    if not any(k not in LEGACY and k not in NEUTRAL and not k.startswith(NEUTRAL_SECTIONS) for k in tail):
        return []
    sections = {k.split(".")[0] for k in want}
    if text.endswith("\n") and all(s in saved for s in sections):
        return []
    return tail


def claim_run_dir(cfg: Config, fresh: bool) -> Path | None:
    """Rank 0, after :func:`check_run_dir`: write ``config.yaml`` if the run starts here.

    ``fresh`` (``--resume none``): a previous run's files are moved into
    ``superseded-<time>/`` first, so that its checkpoints can never be resumed into the new
    run (and nothing is deleted). Returns that folder, or None.
    """
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    moved = None
    if fresh and any((out / name).exists() for name in RUN_FILES):
        moved = out / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
        moved.mkdir(exist_ok=True)
        for name in RUN_FILES:
            if (out / name).exists():
                shutil.move(str(out / name), str(moved / name))
    (out / STOPPED).unlink(missing_ok=True)  # this run goes on (or starts): no longer waiting
    if str(out.resolve()) in _LOCKS:  # unlocked (a file system without flock): another live run may be writing them
        remove_stale_files(out)
    if not run_started(out):
        save_config(cfg, out / "config.yaml")  # written once: a resume never rewrites it
    check_writable(out / "checkpoints")
    # a started run without its config.yaml gets it from ensure_config, once the checkpoint
    # it resumes from is known to fit: a refused resume must leave the folder as it was
    return moved


def check_writable(folder: Path) -> None:
    """Rank 0, at the start: the run can write its checkpoints into ``folder``. A read-only
    ``checkpoints/`` (a bind mount, a copied folder) was otherwise found at the first
    checkpoint, after ``train.ckpt_every_steps`` steps of training were lost with it."""
    probe = folder / f".write-test.{os.getpid()}"
    try:
        folder.mkdir(exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"mscn")
            f.flush()
            os.fsync(f.fileno())  # a full disk or quota shows at the flush, not at the open
    except OSError as e:
        fix = ("free some space there" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable")
        raise MscnError(f"cannot write checkpoints into {folder}: {e.strerror or e}; {fix}, or pass a "
                        f"new train.out_dir=DIR (or --out DIR)") from None
    finally:
        try:
            probe.unlink(missing_ok=True)  # left behind, it made the folder look like a started run
        except OSError:
            pass


def remove_stale_files(out: Path) -> list[str]:
    """Rank 0, holding the folder's lock: the temporary files of writers that were killed
    (``checkpoints/.ckpt_*.pt.tmp<pid>``, ``.final.pt.tmp<pid>``, ``.write-test.<pid>``,
    ``.STOPPED.tmp*``).
    No live process of this run writes them now. A kill -9 during a checkpoint left a
    partial file that only the next successful save removed: on a tight disk that save
    never came, and every resume failed for space. Returns the names removed."""
    gone = []
    for pattern in ("checkpoints/.ckpt_*.pt.tmp*", ".final.pt.tmp*", "checkpoints/.write-test.*", f".{STOPPED}.tmp*"):
        for stale in out.glob(pattern):
            try:
                stale.unlink()
                gone.append(str(stale.relative_to(out)))
            except OSError:
                pass
    return gone


# a requeued job whose start fails (a node without its GPU, a port in use, data not mounted
# there; or a config edited between requeues, which fails every time) is started again until
# this many starts of the run failed in a row; then STOPPED goes, and the requeues end
FAILED_STARTS = 3


# the ranks of one start fail within this of each other; two starts of one name further apart
# (a torchrun relaunched with the same --rdzv_id, or without one: torchrun's "none") are two
SAME_START_S = 600


def start_attempt() -> str:
    """What names one start of a job, alike on all its ranks and nodes: SLURM's job and requeue
    count, else torchrun's run id (``--rdzv_id``; a new one per ``--standalone`` launch) and
    restart count, else the process."""
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}.{env.get('SLURM_RESTART_COUNT', '0')}"
    if env.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}.{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return f"pid-{os.getpid()}@{socket.gethostname()}"


def _failed_starts(lines: list[str]) -> list[tuple[str, float]]:
    """The starts the ``failed start <attempt> <date> <time> @<epoch s>`` lines of a STOPPED
    file name, as (attempt, seconds since the epoch): the seconds, not the local time, are
    compared (ranks in other time zones, a DST hour told one start from another: a review),
    and lines of one attempt within :data:`SAME_START_S` of each other are one start."""
    starts: list[tuple[str, float]] = []
    for ln in lines:
        parts = ln.split()
        if not (ln.startswith("failed start ") and len(parts) >= 3):
            continue
        try:
            when = float(parts[-1][1:]) if parts[-1].startswith("@") else 0.0
        except ValueError:
            when = 0.0
        if not any(a == parts[2] and abs(t - when) < SAME_START_S for a, t in starts):
            starts.append((parts[2], when))
    return starts


def count_failed_start(out: str | Path | None) -> tuple[int, bool] | None:
    """Any rank, when a start into ``out`` fails before its claim: count the start in
    ``STOPPED`` (a line ``failed start <attempt> <time>``; the ranks of one start count once,
    :func:`start_attempt`). At :data:`FAILED_STARTS` failed starts ``STOPPED`` is removed, so
    that a requeue script stops starting a job that fails every time (:func:`claim_run_dir`
    removes it on a start that gets that far, so the count is of starts in a row).

    ``(failed starts, removed)``, or None when there was no ``STOPPED`` (nothing to requeue)."""
    if not out:  # any rank: on several nodes the rank that failed may not be rank 0, which waits
        return None
    path = Path(out) / STOPPED
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):  # absent, or not ours to read
        return None
    attempt, now = start_attempt(), time.time()
    failed = _failed_starts(lines)
    new = not any(a == attempt and abs(now - when) < SAME_START_S for a, when in failed)
    count = len(failed) + new
    try:
        if count >= FAILED_STARTS:
            path.unlink(missing_ok=True)
            return count, True
        if new:
            lines.append(f"failed start {attempt} {time.strftime('%Y-%m-%d %H:%M:%S %Z')} @{int(now)}")
            tmp = path.parent / f".{STOPPED}.tmp{os.getpid()}"
            tmp.write_text("".join(ln + "\n" for ln in lines))
            tmp.replace(path)
    except OSError:  # not ours to write: the requeue goes on as it would have
        return None
    return count, False


class RunDirBusy(MscnError):
    """Another live run holds the folder: its ``STOPPED`` is its own, not this start's."""


def mark_stopped(out: str | Path, line: str) -> None:
    """Rank 0, after the checkpoint of a run stopped by SIGTERM/SIGINT: ``out/STOPPED`` holds
    ``line``, until the run is resumed. A requeue script tests for it (docs/TRAINING.md):
    torchrun exits with status 1 when it is sent SIGTERM, so the 143 of a single process
    cannot be read there, and a run that failed or finished leaves no such file."""
    tmp = Path(out) / f".{STOPPED}.tmp"
    tmp.write_text(line + "\n")
    tmp.replace(Path(out) / STOPPED)


def ensure_config(cfg: Config) -> None:
    """Rank 0, once the run's checkpoint is loaded (or none was found): write ``config.yaml``
    if the run's folder lacks it (deleted by hand or lost)."""
    path = Path(cfg.train.out_dir) / "config.yaml"
    if not path.is_file():
        save_config(cfg, path)
