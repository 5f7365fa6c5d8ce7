#!/usr/bin/env python
"""Profile the MSCN input pipeline: images/s, where the time goes, and whether training is input-bound.

    python scripts/bench_pipeline.py                       # CPU defaults: about a minute on 2 cores
    python scripts/bench_pipeline.py --data /data/imagenet/train --batch 256 --threads 8 \\
        --baseline torchvision --baseline-workers 16 --json bench.json --plot bench.png
    python scripts/bench_pipeline.py --data DIR --sweep threads=4,8,16 hw_decoder_load=0,0.65,0.9 batch=128,256
    python scripts/bench_pipeline.py --data DIR --train --arch resnet18      # input-bound fraction
    torchrun --standalone --nproc_per_node=8 scripts/bench_pipeline.py --data DIR   # per GPU + node total
    python scripts/bench_pipeline.py --data DIR --stages masks,masks-crop-window --isolate 3   # an A/B

Stages, each timed in this run (paper §5.1-5.2): ``decode`` alone; ``bare`` (+ the N
views' random-resized crop, flip and normalize); ``views`` (+ colour jitter, grayscale,
blur, solarize); ``highpass`` (+ the §5.1 high-pass); ``masks`` (+ the §5.2 masks: the
training input, delivered as torch tensors). Baselines: ``torchvision`` (PIL/torchvision
DataLoader doing the same work) and ``dali-plain`` (the pipeline a user would write by
hand with DALI's own ops: same views and high-pass, no masks).

``--train`` attributes the trainer's lost speed to the stages: the same training step
fed by synthetic views already on the device, then by each stage's pipeline (bare,
+ colour/blur, + high-pass, + masks), each row with images/s, the share of the
synthetic speed it keeps and the milliseconds per step it takes from the trainer.
``--isolate N`` times each of ``--stages`` in a process of its own, N rounds in
alternating order: rows of one process run in a fixed order, which can decide a close
A/B on a shared machine. ``--profile DIR`` profiles a few more steps of the full pipeline
(and of the synthetic and masks-fed training step), after every timed row, and prints
where the time went: on a GPU, how busy the device was per step and which kernels
(DALI's, the decoder's, mscn's, torch's, copies) took it. Config overrides (``key=value``) go before the flags. How to read the numbers:
docs/PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchkit import env as benv
from benchkit import profiling, report, steps, timing
from benchkit.outfile import check_target, write_json
from mscn.config import load_config, validate
from mscn.errors import ConfigError, MscnError, run_cli
from mscn.maskspec import MaskCoverageWarning
from mscn.paths import creatable
from mscn.pipelines.tuning import processes_per_node, usable_cores
from mscn.train.distributed import barrier
from mscn.train.preempt import Stopped

REPO = Path(__file__).resolve().parent.parent
STAGES = ("decode", "bare", "colour", "views", "highpass", "masks", "masks-hp-late", "masks-hp-loader",
          "masks-blur-loader", "masks-blur-dali", "masks-crop-window", "masks-concurrent", "masks-hold",
          "masks-colour-loader", "masks-private")
# the full pipeline built another way, on request: the blur and the high-pass in DALI, the
# high-pass after the normalization (the order before round 3); the blur in DALI and the
# high-pass as batched GEMMs in the loader (highpass.where=loader); both as GEMMs in the
# loader (data.blur_where=loader: what auto picks on a GPU since round 4);
# both in DALI (data.blur_where=pipeline: the GPU default until round 4); ...; the same graph
# under DALI's full operator concurrency, one stream per branch (data.op_concurrency=full,
# data.stream_policy=per_operator); the loader holding DALI's outputs two batches longer
# (DaliLoader.hold: does handing the buffers back wait for the trainer's kernels?); the
# colour jitter and grayscale in the loader too, with the blur and the high-pass
# (data.colour_where=loader: DALI only decodes and crops; mscn/colour.py); DALI's outputs
# imported on a stream of the loader's own, so that the trainer's stream waits for none of
# DALI's later kernels (data.handover=private; pipelines/loader.py)
VARIANTS = ("masks-hp-late", "masks-hp-loader", "masks-blur-loader", "masks-blur-dali", "masks-crop-window",
            "masks-concurrent", "masks-hold", "masks-colour-loader", "masks-private")
HOLD_BATCHES = 3  # masks-hold: this batch's outputs and those of the 2 before it
# --train feeds; masks-thread: the full pipeline's batches taken by a background thread
# (mscn.pipelines.feeder, data.feed_thread), a feed only: a pipeline alone gains nothing
THREAD_FEEDS = ("masks-thread",)
FEEDS = ("bare", "colour", "views", "highpass", "masks", *VARIANTS, *THREAD_FEEDS)
# Small on the 2-core CI box (the whole default run fits in ~1 min), ImageNet-scale on a GPU.
DEFAULTS = {"cpu": dict(batch=32, warmup=2, iters=3, repeats=3, train_steps=3, arch="resnet18",
                        baseline_workers=2),
            "cuda": dict(batch=256, warmup=5, iters=20, repeats=5, train_steps=30, arch=None,
                         baseline_workers=16)}
SYNTH_DIR = REPO / "data" / "synth_bench"  # ImageNet-sized JPEGs, few of them: ~6 s to make on 2 cores
SYNTH = dict(classes=10, per_class=20, size=(500, 375), seed=0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # no abbreviations: --isolate rebuilds its children's command lines from the options' full names
    p = argparse.ArgumentParser(prog="scripts/bench_pipeline.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                epilog="Config overrides (key=value) go before the flags.")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.prefetch=3 highpass.sigma=3")
    p.add_argument("--data", help="ImageFolder root, file list or folder of .tar shards "
                                  f"(default: synthesize {SYNTH_DIR.relative_to(REPO)})")
    p.add_argument("--config", default="simclr_r50_in1k", help="YAML recipe (default: simclr_r50_in1k)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch", type=int, help="images per batch and process (CPU 32, GPU 256; "
                   "a train.global_batch= override sets it too)")
    p.add_argument("--threads", type=int, help="DALI CPU threads (default: config; CPU: the cores this process may "
                   "use, shared by the processes of a node under torchrun)")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's); "
                   "the CPU path's high-pass and masks run in torch beside DALI's threads")
    p.add_argument("--hw-decoder-load", type=float, help="share of JPEGs for the hardware decoder (GPU)")
    p.add_argument("--views", type=int, default=4, help="views per image (default 4)")
    p.add_argument("--size", type=int, help="view side in pixels (default 224; a data.image_size= override sets it "
                   "too)")
    p.add_argument("--warmup", type=int, help="untimed batches first (CPU 2, GPU 5)")
    p.add_argument("--iters", type=int, help="batches per timed window (CPU 3, GPU 20)")
    p.add_argument("--repeats", type=int, help="timed windows (CPU 3, GPU 5)")
    p.add_argument("--stages", help=f"comma list of {','.join(STAGES)} (default: "
                                    f"{','.join(s for s in STAGES if s not in VARIANTS)}; none with --sweep/--train)")
    p.add_argument("--feeds", help=f"--train: comma list of {','.join(FEEDS)} (default: "
                                   f"{','.join(f for f in FEEDS if f not in (*VARIANTS, *THREAD_FEEDS))})")
    p.add_argument("--no-priority-row", action="store_true",
                   help="--train on a GPU: skip the row with the trainer on a high-priority CUDA stream")
    p.add_argument("--device-sync-row", action="store_true",
                   help="--train on a GPU: time the masks feed again as GPU rounds 1-3 did (windows of 4 steps "
                        "ending on a device-wide sync), beside the default's, in the same process")
    p.add_argument("--baseline", action="append", default=[], help="torchvision and/or dali-plain")
    p.add_argument("--baseline-workers", type=int, help="DataLoader workers of the torchvision baseline")
    p.add_argument("--sweep", nargs="+", metavar="KEY=V1,V2", help="e.g. threads=4,8 hw_decoder_load=0,0.65 batch=128")
    p.add_argument("--train", action="store_true", help="time training steps fed by the pipeline vs synthetic")
    p.add_argument("--arch", choices=("resnet18", "resnet34", "resnet50"),
                   help="model.arch for --train (CPU: resnet18; GPU: the recipe's)")
    p.add_argument("--train-steps", type=int, help="timed training steps per feed (CPU 3, GPU 30; rounded up to "
                   "whole windows of --repeats)")
    p.add_argument("--sync", choices=timing.SYNC_SCOPES,
                   help="GPU: what a window waits for before its clock reads: the current torch stream "
                        "(default: the steps' own work) or the whole device (also DALI's prefetch of later "
                        "batches: the figures of GPU rounds 1-3)")
    p.add_argument("--isolate", type=int, metavar="ROUNDS",
                   help="time each of --stages in a process of its own, ROUNDS times, alternating the "
                        "order: an A/B that a shared or drifting machine cannot bias by row order")
    p.add_argument("--json", help="write every figure and the environment here")
    p.add_argument("--plot", help="bar chart of the stage breakdown and baseline ratio (.png, .pdf or .svg)")
    p.add_argument("--profile", help="folder for torch.profiler traces of the full pipeline (with --train: of "
                   "the synthetic and the masks-fed training step), taken after every timed row, and a summary "
                   "of each in the log and JSON: GPU busy share, kernel time by owner and stream, the costliest "
                   "kernels")
    p.add_argument("--profile-steps", type=int, default=5, help="steps per profile (default 5)")
    p.add_argument("--profile-rows", default="", metavar="ROWS",
                   help="with --profile: also profile these --stages (and, with --train, these --feeds), "
                        "e.g. masks-blur-loader to see where a variant's GPU time goes")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _overridden(args: argparse.Namespace, key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in args.overrides)


def _from_overrides(args: argparse.Namespace, world_size: int) -> None:
    """``--size``/``--batch`` from a ``data.image_size=``/``train.global_batch=`` override when the
    flag is left out (the flags are what the bench applies: an override alone was ignored
    while the JSON listed it); both given and disagreeing is refused."""
    if not (_overridden(args, "data.image_size") or _overridden(args, "train.global_batch")):
        return
    cfg = load_config(args.config, args.overrides)
    for flag, key, given in (("size", "data.image_size", cfg.data.image_size),
                             ("batch", "train.global_batch", cfg.train.global_batch)):
        if not _overridden(args, key):
            continue
        if flag == "batch" and given % world_size:
            raise MscnError(f"{key}={given}: not divisible by the {world_size} processes")
        value = given // world_size if flag == "batch" else given  # --batch is per process
        if getattr(args, flag) is None:
            setattr(args, flag, value)
        elif getattr(args, flag) != value:
            raise MscnError(f"--{flag} {getattr(args, flag)} and {key}={given} disagree; give one of them")


PLOT_FORMATS = (".png", ".pdf", ".svg")


def fill_defaults(args: argparse.Namespace, device: torch.device, world_size: int = 1) -> None:
    """Per-device defaults for the flags left out; a ``key=value`` override beats a default."""
    if not args.train:  # a flag that changes nothing in this run must not look as if it had
        given = [flag for flag, on in (("--feeds", args.feeds), ("--arch", args.arch), ("--train-steps", args.train_steps),
                                       ("--no-priority-row", args.no_priority_row),
                                       ("--device-sync-row", args.device_sync_row)) if on not in (None, False)]
        if given:
            raise MscnError(f"{', '.join(given)}: only with --train (the training rows); add --train, or leave "
                            f"{'it' if len(given) == 1 else 'them'} out")
    _from_overrides(args, world_size)
    if args.size is None:
        args.size = 224
    for key, value in DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None and not (key == "arch" and _overridden(args, "model.arch")):
            setattr(args, key, value)
    if args.threads is None and device.type == "cpu" and not _overridden(args, "data.num_threads"):
        # DALI does all the work on the CPU path; torchrun's processes share the cores, as
        # the trainer's data.num_threads=auto shares them (pipelines/tuning.py)
        args.threads = max(1, usable_cores() // processes_per_node())
    names = [s for item in args.baseline for s in item.split(",") if s]
    bad = sorted(set(names) - {"torchvision", "dali-plain"})
    if bad:
        raise MscnError(f"--baseline {','.join(bad)}: must be torchvision or dali-plain")
    args.baseline = list(dict.fromkeys(names))
    if args.stages is None:
        stages = [] if (args.sweep or args.train) else [s for s in STAGES if s not in VARIANTS]
    else:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise MscnError(f"--stages {args.stages}: unknown {', '.join(unknown)} (valid: {','.join(STAGES)})")
    feeds = [f.strip() for f in (args.feeds or ",".join(f for f in FEEDS if f not in (*VARIANTS, *THREAD_FEEDS))).split(",")
             if f.strip()]
    unknown = sorted(set(feeds) - set(FEEDS))
    if unknown:
        raise MscnError(f"--feeds {args.feeds}: unknown {', '.join(unknown)} (valid: {','.join(FEEDS)})")
    args.feeds = [f for f in FEEDS if f in feeds]
    if args.profile and Path(args.profile).exists() and not Path(args.profile).is_dir():
        raise MscnError(f"--profile {args.profile}: a file is there; --profile takes a folder for the traces")
    if args.profile and not creatable(args.profile, folder=True):
        # checked before minutes of timing; made when the first trace is written (a refused or
        # stopped run leaves no empty folder)
        raise MscnError(f"--profile {args.profile}: cannot create the folder there")
    if args.plot and Path(args.plot).suffix.lower() not in PLOT_FORMATS:
        raise MscnError(f"--plot {args.plot}: name a {', '.join(PLOT_FORMATS)} file")
    for flag in ("json", "plot"):  # the figures are written last: a bad path must fail first
        check_target(f"--{flag}", getattr(args, flag))
    if args.profile_steps < 1:
        raise MscnError(f"--profile-steps must be >= 1, got {args.profile_steps}")
    args.profile_rows = [r.strip() for r in args.profile_rows.split(",") if r.strip()]
    if args.profile_rows and not args.profile:
        raise MscnError("--profile-rows needs --profile DIR (the folder for the traces)")
    timed = set(stages) | (set(args.feeds) if args.train else set())
    missing = [r for r in args.profile_rows if r not in timed]
    if missing:
        raise MscnError(f"--profile-rows {','.join(missing)}: not among the rows this run times "
                        f"({','.join(sorted(timed)) or 'none'})")
    if args.sweep:
        grid = benv.parse_sweep(args.sweep)  # fail on a typo now, not after the stages ran
        if device.type != "cuda" and any("hw_decoder_load" in g for g in grid):
            raise MscnError("--sweep hw_decoder_load: the CPU path has no hardware decoder; every row would be the same")
    if args.baseline and "masks" not in stages:
        stages.append("masks")  # a baseline ratio is against the full pipeline
    args.stages = [s for s in STAGES if s in stages]
    for key in ("batch", "iters", "repeats", "views", "size", "train_steps", "threads"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise MscnError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0 or args.baseline_workers < 0:
        bad = "--warmup" if args.warmup < 0 else "--baseline-workers"
        raise MscnError(f"{bad} must be >= 0, got {args.warmup if bad == '--warmup' else args.baseline_workers}")
    if args.hw_decoder_load is not None and not 0.0 <= args.hw_decoder_load <= 1.0:
        raise MscnError(f"--hw-decoder-load must be in [0, 1], got {args.hw_decoder_load}")
    if device.type != "cuda":  # as the sweep: a flag that changes nothing here must not look as if it had
        given = [f for f, on in (("--hw-decoder-load", args.hw_decoder_load is not None),
                                 ("--sync", args.sync is not None)) if on]
        if given:
            raise MscnError(f"{', '.join(given)}: GPU only (the CPU path has no hardware decoder and no device "
                            f"to wait for); leave {'it' if len(given) == 1 else 'them'} out, or use --device cuda")
    args.sync = args.sync or "stream"


# the config keys build_config sets from the bench's flags
FLAG_KEYS = {"train.global_batch": "--batch", "data.image_size": "--size",
             "data.num_threads": "--threads", "data.hw_decoder_load": "--hw-decoder-load"}


def build_config(args: argparse.Namespace, data_root: str, world_size: int, overrides: list[str] = (),
                 gpu: bool = False):
    """The recipe + user overrides + sweep overrides, then the bench flags (which win), with
    the choices ``auto`` makes per device resolved for ``gpu``.

    ``train.compile`` is off unless an override sets it: the default recipe compiles (its
    ResNet-50 is faster so), and a ``--train`` row must say which step it timed. The blur's
    place is resolved before any stage turns the high-pass off, so that every stage blurs
    where the full pipeline does."""
    given = [*args.overrides, *overrides]
    cfg = load_config(args.config, given)
    if not any(o.split("=", 1)[0].strip() == "train.compile" for o in given):
        cfg.train = dataclasses.replace(cfg.train, compile=False)
    cfg = cfg.resolved_for(gpu=gpu)
    d = cfg.data
    cfg.data = dataclasses.replace(
        d, root=data_root, image_size=args.size, val_resize=max(d.val_resize, args.size),
        num_threads=args.threads or d.num_threads,
        hw_decoder_load=d.hw_decoder_load if args.hw_decoder_load is None else args.hw_decoder_load)
    # N views: the recipe's, the last one repeated if more are asked ("extra masked views", §5.2)
    cfg.views = [cfg.views[min(i, len(cfg.views) - 1)] for i in range(args.views)]
    cfg.train = dataclasses.replace(cfg.train, global_batch=args.batch * world_size, seed=args.seed)
    if args.arch:
        cfg.model = dataclasses.replace(cfg.model, arch=args.arch)
    try:
        validate(cfg, f"{args.config} + bench flags", world_size=world_size)
    except ConfigError as e:  # a key the bench set from a flag: name the flag the user typed
        flag = next((f for key, f in FLAG_KEYS.items() if f"{key} = " in str(e)), None)
        raise ConfigError(f"{e} (set by {flag})" if flag else str(e)) from None
    return cfg


def resolve_data(args: argparse.Namespace, info) -> tuple[str, dict]:
    """The dataset root and a description of it; synthesizes the default one if needed."""
    from mscn.pipelines.readers import resolve_source

    root = args.data or load_config(args.config, args.overrides).data.root
    synthesized = False
    if not root:
        from mscn.data.synth import synthesize

        if info.is_main:  # one writer; the others find the finished folder after the barrier
            synthesize(SYNTH_DIR, **SYNTH, progress=False)
        barrier()
        root, synthesized = synthesize(SYNTH_DIR, **SYNTH, progress=False)["train"], True
    source = resolve_source(root, "auto", what="--data")
    files = [Path(source.root) / f for f in source.files[:2000]]
    kb = sorted(f.stat().st_size / 1024 for f in files) if files else []
    return root, {"path": str(root), "format": source.kind, "num_images": source.num_samples,
                  "synthesized": synthesized, "jpeg_kb_median": round(kb[len(kb) // 2], 1) if kb else None}


# ----------------------------------------------------------------------------------
# What one timed step is, per stage
# ----------------------------------------------------------------------------------

def stage_config(cfg, stage: str):
    """The config whose pipeline stops after ``stage`` (masks are the loader's switch)."""
    if stage in ("masks-hp-loader", "masks-blur-loader", "masks-colour-loader"):
        cfg = dataclasses.replace(cfg, highpass=dataclasses.replace(cfg.highpass, where="loader"))
    if stage in ("masks-blur-loader", "masks-colour-loader"):
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, blur_where="loader"))
    if stage == "masks-colour-loader":  # the colour moves only with the blur (ViewCfg.colour_movable)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, colour_where="loader"))
    if stage in ("masks-hp-late", "masks-hp-loader", "masks-blur-dali"):  # DALI blurs (the high-pass follows)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, blur_where="pipeline"))
    if stage == "masks-private":  # the same batches, handed over on the loader's own stream
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, handover="private"))
    if stage == "masks-crop-window":  # the crop the views had before the fused one
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, crop="window"))
    if stage == "masks-concurrent":  # the same graph, scheduled by DALI another way
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, op_concurrency="full",
                                                                stream_policy="per_operator"))
    if stage in ("bare", "colour", "views", "dali-plain"):
        cfg = dataclasses.replace(cfg, highpass=dataclasses.replace(cfg.highpass, enabled=False))
    off = {"bare": dict(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0),
           "colour": dict(blur_prob=0.0, solarize_prob=0.0)}.get(stage)
    if off:  # bare: crop + flip + normalize only; colour: + jitter and grayscale
        cfg = dataclasses.replace(cfg, views=[dataclasses.replace(v, **off) for v in cfg.views])
    return cfg


def stage_loader(cfg, stage: str, info, device: torch.device):
    from mscn.pipelines import ops
    from mscn.pipelines.loader import build_train_loader

    # the variant builds the full pipeline the earlier way (high-pass after normalization)
    # to time both orders in one run; the graph is traced right here
    default = ops.HIGHPASS_FIRST
    ops.HIGHPASS_FIRST = stage != "masks-hp-late" and default
    try:
        with warnings.catch_warnings():  # the share a grid masks changes what is learnt, not the timing
            warnings.simplefilter("ignore", MaskCoverageWarning)
            loader = build_train_loader(stage_config(cfg, stage), rank=info.rank, world_size=info.world_size,
                                        local_rank=info.local_rank, device=device if device.type == "cuda" else None,
                                        apply_mask=stage.startswith("masks"))
        if stage == "masks-hold":
            loader.hold(HOLD_BATCHES)
        return loader
    finally:
        ops.HIGHPASS_FIRST = default


def placed_dtype(cfg, device: torch.device) -> str:
    from mscn.pipelines.loader import plan

    return plan(cfg, device if device.type == "cuda" else None).output_dtype


def where(cfg, info, device: torch.device) -> steps.Placement:
    return steps.placement(cfg, device, info.rank, info.world_size, info.local_rank)


def stage_step(stage: str, cfg, info, device: torch.device):
    """(step, keep-alive object) for one stage; the step returns the images it produced."""
    if stage == "decode":
        return steps.decode_step(cfg, where(cfg, info, device))
    loader = stage_loader(cfg, stage, info, device)
    return steps.loader_step(loader), loader


def run_measure(name: str, make_step, args, info, device: torch.device, warmup=None, iters=None,
                repeats=None, profile: bool = False, sync: str | None = None, store=None) -> dict:
    """Build, time and free one configuration; per-rank figures are gathered on every rank.

    ``device_bytes_added``: device memory in use during the windows minus before the
    build (cudaMemGetInfo, DALI's pool included). DALI keeps its pool after a pipeline
    is freed, so this is the pipeline's own footprint only for the first pipeline of a
    process (gpu_check.sh measures it in a process of its own)."""
    barrier()  # all ranks time together: they share the node's CPUs
    before = timing.device_used_bytes(device)
    t0 = time.perf_counter()
    step, keep = make_step()
    m = timing.measure(name, step, views=args.views, warmup=args.warmup if warmup is None else warmup,
                       iters=iters or args.iters, repeats=repeats or args.repeats,
                       sync=timing.device_sync(device, sync or args.sync), device=device,
                       build_s=time.perf_counter() - t0)
    if before is not None:
        m.extra["device_bytes_added"] = m.gpu_memory["device_used_bytes"] - before
    step_ms = timing.per_step_ms(m, iters or args.iters)
    release(keep)
    del step, keep
    gc.collect()  # stop this stage's DALI threads before the next stage is timed
    out = benv.gather_measurement(m)
    if store is not None:  # stored before its line is printed: a stop after the line finds the row kept
        store(out)
    if info.is_main:  # a line per row as it ends: a long run is not silent until its table
        r = out["images_per_s"]
        print(f"bench: {name}: {r['median']:.1f} images/s (median of {r['n']} windows, {time.perf_counter() - t0:.0f} s "
              "with the build and warm-up)", file=sys.stderr, flush=True)
    if profile and args.profile:  # profiled at the end of the run (run_profiles), into this row
        args.pending_profiles.append((name, make_step, step_ms, out))
    return out


def release(keep) -> None:
    """Stop a row's feeder thread (masks-thread) before its loader may be freed: explicitly,
    not by garbage collection, so that no worker pulls batches beside the next row."""
    from mscn.pipelines.feeder import Feeder

    for obj in keep if isinstance(keep, tuple) else (keep,):
        if isinstance(obj, Feeder):
            obj.close()


def run_profiles(args, info, device: torch.device) -> None:
    """``--profile``: the rows asked for, each rebuilt, warmed up and run for a few steps under
    torch.profiler, after every timed row of the run, so that the profiler (CUPTI hooks,
    buffers) cannot slow a row that an A/B compares. The summary (where the device's, or on
    the CPU the calling thread's, time goes) is read against the row's unprofiled step time
    and stored in the row as ``profile``."""
    if args.pending_profiles:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    for name, make_step, step_ms, row in args.pending_profiles:
        barrier()
        step = keep = None
        try:
            step, keep = make_step()
            # device-wide on purpose: the profile's window must hold every stream's kernels
            sync = timing.device_sync(device, "device")
            for _ in range(max(1, args.warmup)):
                step()
            s = profiling.profile_steps(step, args.profile_steps, sync, device,
                                        Path(args.profile) / f"{name}_rank{info.rank}.json", step_ms=step_ms)
            lines = profiling.format_summary(name, s)
        except Exception as e:  # a diagnostic: it must never cost the run its timed figures
            s, lines = {"error": f"{type(e).__name__}: {e}"}, [f"PROFILE {name}: failed ({type(e).__name__}: {e})"]
        finally:
            release(keep)
            del step, keep
        gc.collect()
        row["profile"] = s
        if info.is_main:
            print("\n".join(lines), flush=True)


def full_stage(args) -> str:
    """The stage that is the training input: masks when timed, else the last one."""
    return "masks" if "masks" in args.stages else args.stages[-1]


def run_stages(args, cfg, info, device, out: dict) -> None:
    """Each of ``args.stages`` timed into ``out`` as it ends."""
    for stage in args.stages:
        run_measure(stage, lambda stage=stage: stage_step(stage, cfg, info, device), args, info, device,
                    profile=stage == full_stage(args) or stage in args.profile_rows,
                    store=lambda m, stage=stage: out.__setitem__(stage, m))


def run_baselines(args, cfg, info, device, stages: dict) -> dict:
    out = {}
    full = stages[full_stage(args)]["images_per_s"]["median"]
    for name in args.baseline:
        if name == "dali-plain":
            m = run_measure(name, lambda: steps.plain_step(cfg, where(cfg, info, device), args.views), args,
                            info, device)
        else:
            w = args.baseline_workers
            # the w workers deliver their batches in near-simultaneous bursts, one every
            # w batches: a window spans whole bursts (else windows alternate fast/slow),
            # the first burst is warm-up, and 3 windows suffice (at ~300 images/s, one
            # burst of 16 x 256 images takes ~14 s)
            per = max(1, w)
            iters = per * max(1, round(min(args.iters, 3) / per))
            m = run_measure(name, lambda: steps.torchvision_step(cfg, where(cfg, info, device), w, device), args,
                            info, device, warmup=max(args.warmup, w), iters=iters, repeats=min(args.repeats, 3))
            m["workers"] = w
        m["mscn_over_baseline"] = round(full / m["images_per_s"]["median"], 3)
        if "decode" in stages:
            m["share_of_decode"] = round(m["images_per_s"]["median"] / stages["decode"]["images_per_s"]["median"], 3)
        out[name] = m
    return out


def sweep_configs(args, info, device, data_root: str) -> list:
    """(setting, its flags, its config) per sweep row, every config built and checked before
    any row is timed (a value out of range fails now, not after the rows before it)."""
    out = []
    for setting in benv.parse_sweep(args.sweep):
        overrides, batch = benv.sweep_overrides(setting, len(load_config(args.config, args.overrides).views))
        sub = argparse.Namespace(**{**vars(args), "batch": args.batch if batch is None else batch})
        if "threads" in setting:
            sub.threads = None  # the sweep value arrives as an override: don't let the flag win
        if "hw_decoder_load" in setting:
            sub.hw_decoder_load = None
        out.append((setting, sub, build_config(sub, data_root, info.world_size, overrides, gpu=device.type == "cuda")))
    return out


def check_batches(args, grid: list | None, dataset: dict, world_size: int) -> None:
    """Every row's batch against the dataset, before the first row is timed: a set smaller
    than a batch was refused by the loader only when a row with masks was built, after the
    rows before it, and a decode-only row timed repeated images without a word."""
    rows = [("--batch", args.batch), *((f"the sweep's {', '.join(f'{k}={v}' for k, v in setting.items())}", sub.batch)
                                       for setting, sub, _ in grid or [])]
    what, batch = max(rows, key=lambda r: r[1])
    if batch * world_size > dataset["num_images"]:
        per = f" x {world_size} processes" if world_size > 1 else ""
        raise MscnError(f"{dataset['path']}: {dataset['num_images']} images, fewer than one batch of {batch}{per} "
                        f"({what}); lower it, or add images")


def run_sweep(args, info, device, grid: list, result: dict) -> None:
    """The sweep's rows into ``result["sweep"]`` as they are timed, then the best of them."""
    rows = []
    stage = full_stage(args) if args.stages else "masks"
    result["sweep"] = {"stage": stage, "rows": rows}
    for setting, sub, cfg in grid:
        run_measure(stage, lambda: stage_step(stage, cfg, info, device), sub, info, device,
                    store=lambda m: rows.append({"setting": setting, "batch": sub.batch, **m}))
    best = max(rows, key=lambda r: r["images_per_s"]["median"])
    result["sweep"].update(best=best["setting"], best_images_per_s=best["images_per_s"]["median"])


def run_train(args, cfg, info, device: torch.device, partial: dict | None = None) -> dict:
    """Stage attribution of the trainer's speed: ``--train-steps`` real training steps (the
    config's method, loss and LARS: pretrain.py's step) fed by synthetic views already on
    the device, then by each stage's pipeline in ``--feeds`` (bare, + colour/blur,
    + high-pass, + masks); on a GPU also the full pipeline with the training step on a
    high-priority CUDA stream, so that the trainer's kernels go first when DALI's wait.
    ``partial`` receives each row as it is timed (kept if the run stops before the end)."""
    from mscn.pipelines.feeder import Feeder
    from mscn.pipelines.loader import TORCH_DTYPES, endless
    from mscn.train.lars import build_optimizer
    from mscn.train.pretrain import amp_dtype, build_model, train_step
    from mscn.train.runtime import priority_stream
    from mscn.train.schedule import peak_lr

    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtype = amp_dtype(cfg.train.precision, device)
    method, model = build_model(cfg, device, info)
    model.train()
    # an early warm-up learning rate: the peak one on random weights can overflow within
    # a few steps, and a NaN run times nothing meaningful
    optimizer, _ = build_optimizer(cfg.optim, method, peak_lr(cfg.optim.base_lr, cfg.train.global_batch) / 1000)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    fmt = torch.channels_last if device.type == "cuda" and cfg.train.channels_last else torch.contiguous_format

    def feed(views):  # what pretrain.py does to every batch before the forward
        views = [v.to(device, non_blocking=True).contiguous(memory_format=fmt) for v in views]
        return views if dtype is not None else [v.float() for v in views]

    # host time per step, by part: taking the batch (DALI's handover and the loader's work)
    # and queueing the training step. The first build of a row is the timed one (a profile
    # rebuilds it later): its clock is clocks[row][0]
    clocks: dict[str, list[dict]] = {}

    def new_clock(row: str) -> dict:
        clock = {"batch": [], "step": []}
        clocks.setdefault(row, []).append(clock)
        return clock

    def synthetic():
        shape = (args.batch, 3, cfg.data.image_size, cfg.data.image_size)
        dtype_in = TORCH_DTYPES[placed_dtype(cfg, device)]
        views = feed([torch.randn(shape, dtype=dtype_in, device=device)
                      for _ in cfg.views])
        clock = new_clock("synthetic")

        def step() -> int:
            t0 = time.perf_counter()
            train_step(model, optimizer, scaler, views, dtype)
            clock["step"].append(time.perf_counter() - t0)
            return args.batch

        return step, views

    def fed(stage: str, priority: bool = False, row: str | None = None):
        def make():
            threaded = stage in THREAD_FEEDS
            loader = stage_loader(cfg, "masks" if threaded else stage, info, device)
            # as pretrain.py with data.feed_thread: the worker also snapshots the loader's
            # state after every batch (exact resume), so the row pays what a run would
            batches = (Feeder(endless(loader), snapshot=loader.state_dict, name="mscn-bench-feeder") if threaded
                       else endless(loader))
            clock = new_clock(row or stage)

            def step() -> int:
                # the batch is taken on the training stream too (as pretrain.py does): DALI hands
                # its outputs over host-synchronized, and the loader's filters and masks run
                # on the current stream
                with priority_stream(device) if priority else contextlib.nullcontext():
                    t0 = time.perf_counter()
                    views = feed(next(batches).views)
                    t1 = time.perf_counter()
                    train_step(model, optimizer, scaler, views, dtype)
                    clock["step"].append(time.perf_counter() - t1)
                    clock["batch"].append(t1 - t0)
                return views[0].shape[0]

            # the feeder first: its thread holds the loader until it has stopped
            return step, (batches, loader)

        return make

    repeats = min(args.repeats, args.train_steps)
    # whole windows of equal length, at least --train-steps steps in all
    timing_kw = dict(warmup=max(1, args.warmup), iters=-(-args.train_steps // repeats), repeats=repeats)
    partial = {} if partial is None else partial
    rows = partial.setdefault("feeds", {})
    try:
        syn = run_measure("train-synthetic", synthetic, args, info, device, profile=True,
                          store=lambda m: partial.__setitem__("synthetic", m), **timing_kw)
        # the default pipeline's row is profiled (or the last feed's when masks is not fed)
        profiled = "masks" if "masks" in args.feeds else args.feeds[-1]
        for stage in args.feeds:
            run_measure(f"train-{stage}", fed(stage), args, info, device,
                        profile=stage == profiled or stage in args.profile_rows,
                        store=lambda m, stage=stage: rows.__setitem__(stage, m), **timing_kw)
        if device.type == "cuda" and not args.no_priority_row and "masks" in args.feeds:
            rows["masks-priority"] = run_measure("train-masks-priority", fed("masks", priority=True,
                                                                             row="masks-priority"),
                                                 args, info, device, **timing_kw)
        if device.type == "cuda" and args.device_sync_row and "masks" in args.feeds:
            # the method of rounds 1-3 (20 steps in windows of 4, device-wide syncs): what the
            # method change alone moves, read against the "masks" row of this process
            rows[report.DEVICE_SYNC_ROW] = run_measure("train-masks-device-sync", fed("masks", row=report.DEVICE_SYNC_ROW),
                                                       args, info, device,
                                                warmup=timing_kw["warmup"], iters=4, repeats=5, sync="device")
    except torch.cuda.OutOfMemoryError:
        raise MscnError(f"GPU out of memory training {cfg.model.arch} on {args.batch} images x {args.views} "
                        f"views per GPU; use --batch {max(1, args.batch // 2)}") from None

    def rate(m: dict) -> float:  # the node's total under torchrun
        return m.get("node_images_per_s", m["images_per_s"]["median"])

    for row, m in (("synthetic", syn), *rows.items()):  # the timed steps: the last of the first build's
        m["host_ms_per_step"] = host_ms(clocks[row][0], last=max(1, sum(m["window_images"]) // args.batch))
    for m in rows.values():
        m["kept"] = round(rate(m) / rate(syn), 3)
        # per step of this process: its batch at its own rate, minus the same at the synthetic rate
        m["ms_taken_per_step"] = round(1e3 * args.batch * (1 / m["images_per_s"]["median"]
                                                           - 1 / syn["images_per_s"]["median"]), 2)
    full = rows.get("masks")
    return {"arch": cfg.model.arch, "method": cfg.method.name, "precision": str(dtype or torch.float32),
            "steps": timing_kw["iters"] * repeats, "window_steps": timing_kw["iters"], "synthetic": syn, "feeds": rows,
            "kept": full["kept"] if full else None,
            "input_bound_fraction": round(1.0 - full["kept"], 3) if full else None}


def host_ms(clock: dict, last: int) -> dict:
    """Median host milliseconds per step of each part of ``clock`` over its ``last`` steps
    (the timed windows; the warm-up came first). Read beside the profile's GPU busy share:
    a part that takes long while the GPU idles is where the feed waits."""
    out = {}
    for part, times in clock.items():
        times = times[-last:]
        if times:
            out[part] = round(1e3 * statistics.median(times), 3)  # of an even count: the mean of the middle two
    return out


# ----------------------------------------------------------------------------------
# --isolate: every stage in a process of its own, rounds in alternating order
# ----------------------------------------------------------------------------------

ISOLATE_TIMEOUT_S = 1800  # one stage's process: build, warm-up and windows


def isolation_order(stages: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, stage) in run order: even rounds forward, odd rounds backward, so that a
    drift over time (load, clocks, a neighbour's job) falls on every stage alike."""
    return [(r, s) for r in range(rounds) for s in (stages if r % 2 == 0 else stages[::-1])]


def _child_argv(argv: list[str]) -> list[str]:
    """``argv`` less the options that --isolate sets per child (--isolate, --stages, --json)."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        name = tok.split("=", 1)[0]
        if name in ("--isolate", "--stages", "--json"):
            skip = "=" not in tok
            continue
        out.append(tok)
    return out


class _Terminated(Stopped):
    """SIGTERM (timeout, SLURM, kill): the run unwinds, keeping what it can, and exits 143
    (the trainer's Stopped: run_cli prints it and returns its status)."""

    def __init__(self, what: str):
        super().__init__(f"stopped by SIGTERM{what}", signal.SIGTERM)


def on_sigterm(what: str = "") -> None:
    def stop(signum, frame):
        raise _Terminated(what)

    signal.signal(signal.SIGTERM, stop)


class _StopRequest:
    """SIGTERM or Ctrl-C during --isolate, noted by the handler and acted on by :func:`_child`.
    Raised from the handler, the stop could land inside ``Popen`` after its fork, before the
    child was ours to stop: that child ran on as an orphan (a flaky test caught it)."""

    def __init__(self):
        self.signum = 0

    def __call__(self, signum, frame) -> None:
        self.signum = signum

    def check(self) -> None:
        if self.signum == signal.SIGTERM:
            raise _Terminated(" (the isolated runs so far are not kept)")
        if self.signum:
            raise KeyboardInterrupt


def _child(cmd: list[str], timeout: float, stop: _StopRequest) -> subprocess.CompletedProcess:
    """One isolated run; stopped with the parent (a SIGTERM from timeout, SLURM or kill reaches
    only the parent, and the child would run on as an orphan)."""
    stop.check()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while True:  # short waits, so that a stop is seen within a fraction of a second
            try:
                out, err = proc.communicate(timeout=0.2)  # a retry loses no output (subprocess docs)
                break
            except subprocess.TimeoutExpired:
                stop.check()
                if time.monotonic() > deadline:
                    raise
    except BaseException:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_isolated(args: argparse.Namespace, argv: list[str]) -> int:
    """--isolate: run ``bench_pipeline.py --stages S`` per stage and round, print the medians."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MscnError("--isolate starts its own processes: run it without torchrun")
    if args.baseline or args.sweep or args.train or args.plot or args.profile:
        raise MscnError("--isolate times --stages only (no --baseline, --sweep, --train, --plot, --profile)")
    if args.isolate < 1:
        raise MscnError(f"--isolate must be >= 1, got {args.isolate}")
    stages = list(dict.fromkeys(s.strip() for s in (args.stages or "").split(",") if s.strip()))
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or len(stages) < 2:
        raise MscnError(f"--isolate needs --stages with two or more of {','.join(STAGES)}"
                        + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    rates: dict[str, list[float]] = {s: [] for s in stages}
    runs: dict[str, list[dict]] = {s: [] for s in stages}
    order = isolation_order(stages, args.isolate)
    stop = _StopRequest()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (r, stage) in enumerate(order, 1):
            out = Path(tmp) / f"{stage}_{r}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *_child_argv(argv), "--stages", stage,
                   "--json", str(out)]
            print(f"[isolate] {i}/{len(order)} round {r + 1} {stage}", flush=True)
            try:
                proc = _child(cmd, ISOLATE_TIMEOUT_S, stop)
            except subprocess.TimeoutExpired:
                raise MscnError(f"--isolate: the {stage} run (round {r + 1}) took over {ISOLATE_TIMEOUT_S} s; "
                                f"run it alone to see where it hangs: {' '.join(cmd)}") from None
            if proc.returncode != 0:
                raise MscnError(f"--isolate: the {stage} run failed (exit {proc.returncode}):\n"
                                + (proc.stderr or proc.stdout)[-2000:])
            doc = json.loads(out.read_text())
            m = doc["stages"][stage]
            rates[stage].append(m["images_per_s"]["median"])
            runs[stage].append({"round": r, "position": i, "images_per_s": m["images_per_s"],
                                "load_avg_1m": doc["env"].get("load_avg_1m")})
            env, settings = doc["env"], doc["settings"]
    env = {**env, "command": benv.command_line()}  # the user's command, not the last child's
    result = {"schema": 2, "env": env, "settings": {**settings, "stages": stages, "isolate": args.isolate},
              "isolated": {s: {"medians": rates[s], "mean": round(sum(rates[s]) / len(rates[s]), 2),
                               "runs": runs[s]} for s in stages},
              "order": [f"{r + 1}:{s}" for r, s in order]}
    report.print_isolated(result)
    if args.json:
        write_json(result, args.json)
    return 0


def run_all(args, cfg, info, device, result: dict, grid) -> None:
    """Every timed part of the run, each stored into ``result`` as soon as it is done."""
    run_stages(args, cfg, info, device, result["stages"])
    if result["stages"]:
        result["pipeline"] = result["stages"][full_stage(args)]
        if "decode" in result["stages"] and len(args.stages) > 1:
            result["share_of_decode"] = round(result["pipeline"]["images_per_s"]["median"]
                                              / result["stages"]["decode"]["images_per_s"]["median"], 3)
    if args.baseline:
        result["baselines"] = run_baselines(args, cfg, info, device, result["stages"])
    if args.sweep:
        run_sweep(args, info, device, grid, result)
    if args.train:  # rows timed so far sit in "train_timed" until the table is whole
        result["train"] = run_train(args, cfg, info, device, result.setdefault("train_timed", {}))
        del result["train_timed"]
    run_profiles(args, info, device)  # last: the profiler must not slow a timed row
    result["gpu_memory"] = timing.gpu_memory(device) if device.type == "cuda" else None


def main(argv: list[str] | None = None) -> int:
    from mscn.train.distributed import cleanup
    from mscn.train.runtime import setup_runtime

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.pending_profiles = []  # (name, make_step, step_ms, row) for run_profiles
    if args.torch_threads is not None and args.torch_threads < 1:
        raise MscnError(f"--torch-threads must be >= 1, got {args.torch_threads}")
    if args.isolate is not None:
        return run_isolated(args, argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    on_sigterm()  # the rows timed so far go to --json, as after Ctrl-C
    rt = setup_runtime(args.device, what="--device")  # torchrun: one pipeline per rank
    info, device = rt.dist, rt.device
    try:
        if rt.note:  # a benchmark must not silently measure the CPU instead of the GPU
            raise MscnError(f"--device {args.device}: no CUDA device is visible; use --device cpu")
        fill_defaults(args, device, info.world_size)
        data_root, dataset = resolve_data(args, info)
        cfg = build_config(args, data_root, info.world_size, gpu=device.type == "cuda")
        placed = where(cfg, info, device)  # "auto" settings resolved for this machine
        result = {"schema": 2, "env": benv.environment(device), "dataset": dataset,
                  "settings": {"device": device.type, "config": args.config, "overrides": args.overrides,
                               "batch": args.batch, "threads": placed.threads,
                               "hw_decoder_load": placed.hw_decoder_load if device.type == "cuda" else None,
                               "output_dtype": placed_dtype(cfg, device),
                               # DALI's executor (None: DALI's default; "masks-concurrent" sets its own)
                               **{k: None if getattr(cfg.data, k) == "auto" else getattr(cfg.data, k)
                                  for k in ("op_concurrency", "stream_policy")},
                               # where the default pipeline blurs (data.blur_where, resolved) and
                               # whether --train times a compiled step (train.compile)
                               "blur_where": cfg.data.blur_where, "compile": cfg.train.compile,
                               # the stream DALI's outputs are taken on, and DALI's threads pinned or not
                               "handover": cfg.data.handover, "thread_affinity": cfg.data.thread_affinity,
                               "views": args.views, "size": args.size, "highpass_sigma": cfg.highpass.sigma,
                               "warmup": args.warmup, "iters": args.iters, "repeats": args.repeats,
                               "sync": args.sync if device.type == "cuda" else None,
                               "world_size": info.world_size, "stages": args.stages},
                  "stages": {}}
        grid = sweep_configs(args, info, device, data_root) if args.sweep else None
        check_batches(args, grid, dataset, info.world_size)
        try:
            run_all(args, cfg, info, device, result, grid)
        except BaseException as e:  # a late failure or a stop must not cost the rows already timed
            timed = result["stages"] or result.get("sweep", {}).get("rows") or result.get("train_timed", {}).get(
                "synthetic") or result.get("baselines")
            if info.is_main and args.json and timed:
                # a stop says what stopped it; an error is named by its kind
                result["incomplete"] = str(e) if isinstance(e, Stopped) else f"{type(e).__name__}: {e}".strip(": ")
                write_json(result, args.json)
                print(f"bench_pipeline: the rows timed so far are in {args.json} (marked incomplete)",
                      file=sys.stderr, flush=True)
            raise
        if info.is_main:
            report.print_report(result)
            if args.json:
                write_json(result, args.json)
            if args.plot:
                report.plot(result, args.plot)
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "bench_pipeline"))
