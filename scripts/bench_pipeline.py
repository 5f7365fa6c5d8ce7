#!/usr/bin/env python
"""Profile the MSCN input pipeline: images/s, where the time goes, and whether training is input-bound.

    python scripts/bench_pipeline.py                       # CPU defaults: about a minute on 2 cores
    python scripts/bench_pipeline.py --data /data/imagenet/train --batch 256 --threads 8 \\
        --baseline torchvision --baseline-workers 16 --json bench.json --plot bench.png
    python scripts/bench_pipeline.py --data DIR --sweep threads=4,8,16 hw_decoder_load=0,0.65,0.9 batch=128,256
    python scripts/bench_pipeline.py --data DIR --train --arch resnet18      # input-bound fraction
    torchrun --standalone --nproc_per_node=8 scripts/bench_pipeline.py --data DIR   # per GPU + node total

Stages, each timed in this run (paper §5.1-5.2): ``decode`` alone; ``views`` (+ the N
random-resized-crop/flip/colour/grayscale/blur/normalize views); ``highpass`` (+ the
§5.1 high-pass); ``masks`` (+ the §5.2 masks: the training input). Baselines:
``torchvision`` (PIL/torchvision DataLoader doing the same work) and ``dali-plain``
(DALI without high-pass and masks). Config overrides (``key=value``) go before the
flags. How to read the numbers: docs/PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

from mscn.config import load_config, validate
from mscn.errors import MscnError
from mscn.pipelines import bench
from mscn.train.distributed import barrier, pick_device

REPO = Path(__file__).resolve().parent.parent
STAGES = ("decode", "views", "highpass", "masks")
LABELS = {"decode": "decode", "views": "+ views", "highpass": "+ high-pass", "masks": "+ masks",
          "torchvision": "torchvision/PIL", "dali-plain": "DALI plain (no high-pass/masks)"}
# Small on the 2-core CI box (the whole default run fits in ~1 min), ImageNet-scale on a GPU.
DEFAULTS = {"cpu": dict(batch=32, warmup=2, iters=3, repeats=3, train_steps=3, arch="resnet18",
                        baseline_workers=2),
            "cuda": dict(batch=256, warmup=5, iters=20, repeats=5, train_steps=20, arch=None,
                         baseline_workers=16)}
SYNTH_DIR = REPO / "data" / "synth_bench"  # ImageNet-sized JPEGs, few of them: ~6 s to make on 2 cores
SYNTH = dict(classes=10, per_class=20, size=(500, 375), seed=0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench_pipeline.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Config overrides (key=value) go before the flags.")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.prefetch=3 highpass.sigma=3")
    p.add_argument("--data", help="ImageFolder root, file list or folder of .tar shards "
                                  f"(default: synthesize {SYNTH_DIR.relative_to(REPO)})")
    p.add_argument("--config", default="simclr_r50_in1k", help="YAML recipe (default: simclr_r50_in1k)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch", type=int, help="images per batch and GPU (CPU 32, GPU 256)")
    p.add_argument("--threads", type=int, help="DALI CPU threads (default: config; CPU: all cores)")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's); "
                   "the CPU path's high-pass and masks run in torch beside DALI's threads")
    p.add_argument("--hw-decoder-load", type=float, help="share of JPEGs for the hardware decoder (GPU)")
    p.add_argument("--views", type=int, default=4, help="views per image (default 4)")
    p.add_argument("--size", type=int, default=224, help="view side in pixels (default 224)")
    p.add_argument("--warmup", type=int, help="untimed batches first (CPU 2, GPU 5)")
    p.add_argument("--iters", type=int, help="batches per timed window (CPU 3, GPU 20)")
    p.add_argument("--repeats", type=int, help="timed windows (CPU 3, GPU 5)")
    p.add_argument("--stages", help=f"comma list of {','.join(STAGES)} (default: all, "
                                    "none with --sweep/--train)")
    p.add_argument("--baseline", action="append", default=[], help="torchvision and/or dali-plain")
    p.add_argument("--baseline-workers", type=int, help="DataLoader workers of the torchvision baseline")
    p.add_argument("--sweep", nargs="+", metavar="KEY=V1,V2", help="e.g. threads=4,8 hw_decoder_load=0,0.65 batch=128")
    p.add_argument("--train", action="store_true", help="time training steps fed by the pipeline vs synthetic")
    p.add_argument("--arch", choices=("resnet18", "resnet34", "resnet50"), help="model.arch for --train")
    p.add_argument("--train-steps", type=int, help="timed training steps per feed (CPU 3, GPU 20)")
    p.add_argument("--json", help="write every figure and the environment here")
    p.add_argument("--plot", help="bar chart of the stage breakdown and baseline ratio (PNG)")
    p.add_argument("--profile", help="folder for a torch.profiler trace of the full pipeline (and training)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _overridden(args: argparse.Namespace, key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in args.overrides)


def fill_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Per-device defaults for the flags left out; a ``key=value`` override beats a default."""
    for key, value in DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None and not (key == "arch" and _overridden(args, "model.arch")):
            setattr(args, key, value)
    if args.threads is None and device.type == "cpu" and not _overridden(args, "data.num_threads"):
        args.threads = bench.usable_cores()  # the recipe's 8 threads oversubscribe a small box
    names = [s for item in args.baseline for s in item.split(",") if s]
    bad = sorted(set(names) - {"torchvision", "dali-plain"})
    if bad:
        raise MscnError(f"--baseline {','.join(bad)}: must be torchvision or dali-plain")
    args.baseline = list(dict.fromkeys(names))
    if args.stages is None:
        stages = [] if (args.sweep or args.train) else list(STAGES)
    else:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise MscnError(f"--stages {args.stages}: unknown {', '.join(unknown)} (valid: {','.join(STAGES)})")
    if args.sweep:
        bench.parse_sweep(args.sweep)  # fail on a typo now, not after the stages ran
    if args.baseline and "masks" not in stages:
        stages.append("masks")  # a baseline ratio is against the full pipeline
    args.stages = [s for s in STAGES if s in stages]
    for key in ("batch", "iters", "repeats", "views", "size", "train_steps"):
        if getattr(args, key) < 1:
            raise MscnError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")


def build_config(args: argparse.Namespace, data_root: str, world_size: int, overrides: list[str] = ()):
    """The recipe + user overrides + sweep overrides, then the bench flags (which win)."""
    cfg = load_config(args.config, [*args.overrides, *overrides])
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
    validate(cfg, f"{args.config} + bench flags", world_size=world_size)
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
    source = resolve_source(root, "auto")
    files = [Path(source.root) / f for f in source.files[:2000]]
    kb = sorted(f.stat().st_size / 1024 for f in files) if files else []
    return root, {"path": str(root), "format": source.kind, "num_images": source.num_samples,
                  "synthesized": synthesized, "jpeg_kb_median": round(kb[len(kb) // 2], 1) if kb else None}


# ----------------------------------------------------------------------------------
# What one timed step is, per stage
# ----------------------------------------------------------------------------------

def stage_step(stage: str, cfg, info, device: torch.device):
    """(step, keep-alive object) for one stage; the step returns the images it produced."""
    from mscn.pipelines.loader import build_train_loader

    if stage == "decode":
        return bench.decode_step(cfg, info, device)
    if stage in ("views", "dali-plain"):
        cfg = dataclasses.replace(cfg, highpass=dataclasses.replace(cfg.highpass, enabled=False))
    loader = build_train_loader(cfg, rank=info.rank, world_size=info.world_size, local_rank=info.local_rank,
                                device=device if device.type == "cuda" else None, apply_mask=stage == "masks")
    return bench.loader_step(loader), loader


def run_measure(name: str, make_step, args, info, device: torch.device, warmup=None, iters=None,
                repeats=None, profile: bool = False) -> dict:
    """Build, time and free one configuration; per-rank figures are gathered on every rank."""
    barrier()  # all ranks time together: they share the node's CPUs
    t0 = time.perf_counter()
    step, keep = make_step()
    m = bench.measure(name, step, views=args.views, warmup=args.warmup if warmup is None else warmup,
                      iters=iters or args.iters, repeats=repeats or args.repeats,
                      sync=bench.device_sync(device), device=device, build_s=time.perf_counter() - t0)
    if profile and args.profile:
        bench.profile_steps(step, Path(args.profile) / f"{name}_rank{info.rank}.json", 2,
                            bench.device_sync(device), device)
    del step, keep
    gc.collect()  # stop this stage's DALI threads before the next stage is timed
    return bench.gather_measurement(m, info)


def run_stages(args, cfg, info, device) -> dict:
    out = {}
    for stage in args.stages:
        out[stage] = run_measure(stage, lambda: stage_step(stage, cfg, info, device), args, info, device,
                                 profile=stage == args.stages[-1])
    return out


def run_baselines(args, cfg, info, device, stages: dict) -> dict:
    out = {}
    full = stages[args.stages[-1]]["images_per_s"]["median"]
    for name in args.baseline:
        if name == "dali-plain" and "views" in stages:
            m = dict(stages["views"], reused_from="views")  # the same pipeline, timed once
        elif name == "dali-plain":
            m = run_measure(name, lambda: stage_step("dali-plain", cfg, info, device), args, info, device)
        else:
            w = args.baseline_workers
            # the w workers deliver their batches in near-simultaneous bursts, one every
            # w batches: a window spans whole bursts (else windows alternate fast/slow),
            # the first burst is warm-up, and 3 windows suffice (at ~300 images/s, one
            # burst of 16 x 256 images takes ~14 s)
            per = max(1, w)
            iters = per * max(1, round(min(args.iters, 3) / per))
            m = run_measure(name, lambda: bench.torchvision_step(cfg, args.batch, w, info, device), args,
                            info, device, warmup=max(args.warmup, w), iters=iters, repeats=min(args.repeats, 3))
            m["workers"] = w
        m["mscn_over_baseline"] = round(full / m["images_per_s"]["median"], 3)
        out[name] = m
    return out


def run_sweep(args, info, device, data_root: str) -> dict:
    rows = []
    stage = args.stages[-1] if args.stages else "masks"
    for setting in bench.parse_sweep(args.sweep):
        overrides, batch = bench.sweep_overrides(setting)
        sub = argparse.Namespace(**{**vars(args), "batch": batch or args.batch})
        if "threads" in setting:
            sub.threads = None  # the sweep value arrives as an override: don't let the flag win
        if "hw_decoder_load" in setting:
            sub.hw_decoder_load = None
        cfg = build_config(sub, data_root, info.world_size, overrides)
        m = run_measure(stage, lambda: stage_step(stage, cfg, info, device), sub, info, device)
        rows.append({"setting": setting, "batch": sub.batch, **m})
    best = max(rows, key=lambda r: r["images_per_s"]["median"])
    return {"stage": stage, "rows": rows, "best": best["setting"],
            "best_images_per_s": best["images_per_s"]["median"]}


def run_train(args, cfg, info, device: torch.device) -> dict:
    """``--train-steps`` real training steps (the config's method, loss and LARS, pretrain.py's
    step) fed by the pipeline, then fed by synthetic views already on the device."""
    from mscn.pipelines.loader import TORCH_DTYPES, build_train_loader, endless
    from mscn.train.lars import build_optimizer
    from mscn.train.pretrain import amp_dtype, build_model, train_step
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

    def synthetic():
        shape = (args.batch, 3, cfg.data.image_size, cfg.data.image_size)
        views = feed([torch.randn(shape, dtype=TORCH_DTYPES[cfg.data.output_dtype], device=device)
                      for _ in cfg.views])

        def step() -> int:
            train_step(model, optimizer, scaler, views, dtype)
            return args.batch

        return step, views

    def fed():
        loader = build_train_loader(cfg, rank=info.rank, world_size=info.world_size, local_rank=info.local_rank,
                                    device=device if device.type == "cuda" else None)
        batches = endless(loader)

        def step() -> int:
            views = feed(next(batches).views)
            train_step(model, optimizer, scaler, views, dtype)
            return views[0].shape[0]

        return step, loader

    repeats = min(args.repeats, args.train_steps)
    timing = dict(warmup=max(1, args.warmup), iters=max(1, args.train_steps // repeats), repeats=repeats)
    try:
        syn = run_measure("train-synthetic", synthetic, args, info, device, **timing)
        pipe = run_measure("train-pipeline", fed, args, info, device, profile=True, **timing)
    except torch.cuda.OutOfMemoryError:
        raise MscnError(f"GPU out of memory training {cfg.model.arch} on {args.batch} images x {args.views} "
                        f"views per GPU; use --batch {max(1, args.batch // 2)}") from None
    def rate(m: dict) -> float:  # the node's total under torchrun
        return m.get("node_images_per_s", m["images_per_s"]["median"])

    return {"arch": cfg.model.arch, "method": cfg.method.name, "precision": str(dtype or torch.float32),
            "steps": timing["iters"] * repeats, "synthetic": syn, "pipeline": pipe,
            "input_bound_fraction": round(1.0 - rate(pipe) / rate(syn), 3)}


# ----------------------------------------------------------------------------------
# Output: a human table (gpu_check.sh greps the "|" rows and SUMMARY lines) and a chart
# ----------------------------------------------------------------------------------

def _gib(mem: dict | None) -> str:
    return f"{mem['device_used_bytes'] / 2**30:.1f}" if mem else "n/a"


def _row(label: str, m: dict, ref: float | None = None, note: str = "") -> str:
    r = m["images_per_s"]
    rel = f"{r['median'] / ref:.2f}" if ref else ""
    node = f" (node {m['node_images_per_s']:.0f})" if "node_images_per_s" in m else ""
    return (f"| {label} | {r['median']:.1f}{node} | {r['min']:.1f}-{r['max']:.1f} | "
            f"{m['views_per_s']['median']:.1f} | {rel} | {m['cpu_util']:.2f} | {_gib(m['gpu_memory'])} | {note} |")


def table_rows(r: dict) -> list[str]:
    """Markdown-style rows: stages and baselines, then the sweep, then trainer mode."""
    head = "| {} | images/s | min-max | views/s | vs decode | CPU util | GPU GiB | note |"
    rule = "|---" * 8 + "|"
    decode = r["stages"].get("decode", {}).get("images_per_s", {}).get("median")
    rows = [head.format("run"), rule] if r["stages"] else []
    rows += [_row(LABELS[k], m, decode) for k, m in r["stages"].items()]
    for name, m in r.get("baselines", {}).items():
        label = LABELS[name] + (f" x{m['workers']} workers" if "workers" in m else "")
        rows.append(_row(label, m, decode, f"mscn/{name} = {m['mscn_over_baseline']:.2f}x"))
    if "sweep" in r:
        rows += ["", head.format(f"sweep ({r['sweep']['stage']})"), rule]
        rows += [_row(" ".join(f"{k}={v}" for k, v in row["setting"].items()), row, None,
                      "best" if row["setting"] == r["sweep"]["best"] else "") for row in r["sweep"]["rows"]]
    if "train" in r:
        t = r["train"]
        rows += ["", head.format(f"train {t['arch']} ({t['method']}, {t['precision']})"), rule,
                 _row("fed by the pipeline", t["pipeline"]), _row("fed by synthetic tensors", t["synthetic"])]
    return rows


def summary_lines(r: dict) -> list[str]:
    """The ``SUMMARY`` lines: one per headline figure."""
    s, out = r["settings"], []
    if "pipeline" in r:
        p = r["pipeline"]
        share = ""
        if "share_of_decode" in r:
            share = (f", {100 * r['share_of_decode']:.0f}% of decode-only "
                     f"{r['stages']['decode']['images_per_s']['median']:.1f}")
        out.append(f"pipeline ({s['stages'][-1]}): {p['images_per_s']['median']:.1f} images/s, "
                   f"{p['views_per_s']['median']:.1f} views/s{share} "
                   f"[{s['device']}, batch {s['batch']}, {s['threads']} threads]")
        if "node_images_per_s" in p:
            out.append(f"node total over {s['world_size']} processes: {p['node_images_per_s']:.1f} images/s "
                       f"(per process {p['per_rank_images_per_s']})")
    for name, m in r.get("baselines", {}).items():
        out.append(f"baseline {name}: {m['images_per_s']['median']:.1f} images/s; "
                   f"mscn/{name} = {m['mscn_over_baseline']:.2f}x")
    if "sweep" in r:
        best = " ".join(f"{k}={v}" for k, v in r["sweep"]["best"].items())
        out.append(f"sweep best: {best} -> {r['sweep']['best_images_per_s']:.1f} images/s")
    if "train" in r:
        t = r["train"]
        out.append(f"train {t['arch']}: pipeline-fed {t['pipeline']['images_per_s']['median']:.1f} images/s, "
                   f"synthetic {t['synthetic']['images_per_s']['median']:.1f} images/s, "
                   f"input-bound fraction {t['input_bound_fraction']:.2f}")
    return [f"SUMMARY {line}" for line in out]


def print_report(r: dict) -> None:
    env, s, ds = r["env"], r["settings"], r["dataset"]
    hw = f", hw_decoder_load {s['hw_decoder_load']}" if s["hw_decoder_load"] is not None else ""
    print(f"\nmscn bench on {env['gpu_name'] or env['cpu_model']}: {env['usable_cores']} cores, DALI {env['dali']}, "
          f"torch {env['torch']} ({env['torch_threads']} threads), load {env['load_avg_1m']}\n"
          f"data: {ds['path']} ({ds['num_images']} images, {ds['format']}, median JPEG {ds['jpeg_kb_median']} KB)\n"
          f"{s['device']}: batch {s['batch']} per process x {s['world_size']}, {s['views']} views at {s['size']} px, "
          f"{s['threads']} DALI threads{hw}; median of {s['repeats']} windows x {s['iters']} batches\n")
    print("\n".join(table_rows(r) + summary_lines(r)), flush=True)


def plot(r: dict, path: str) -> None:
    """Left: images/s of each stage (bars: median, whiskers: min-max). Right: the full
    pipeline against the baselines, labelled with the ratio."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    def bars(ax, items, title, labels=None):
        med = [m["images_per_s"]["median"] for _, m in items]
        err = [[v - m["images_per_s"]["min"] for v, (_, m) in zip(med, items)],
               [m["images_per_s"]["max"] - v for v, (_, m) in zip(med, items)]]
        ax.bar(range(len(items)), med, yerr=err, capsize=4, color="tab:blue")
        ax.set_xticks(range(len(items)), [LABELS.get(k, k) for k, _ in items], rotation=20, ha="right")
        for i, text in enumerate(labels or [f"{v:.0f}" for v in med]):
            ax.annotate(text, (i, med[i]), ha="center", va="bottom")
        ax.set_ylabel("images/s")
        ax.set_title(title)

    comparisons = list(r.get("baselines", {}).items())
    fig, axes = plt.subplots(1, 2 if comparisons else 1, figsize=(12 if comparisons else 6, 4.5), squeeze=False)
    s = r["settings"]
    bars(axes[0][0], list(r["stages"].items()), f"stages ({s['device']}, batch {s['batch']}, {s['views']} views)")
    if comparisons:
        items = [("mscn", r["pipeline"])] + comparisons
        texts = [f"{r['pipeline']['images_per_s']['median']:.0f}"]
        texts += [f"mscn = {m['mscn_over_baseline']:.2f}x" for _, m in comparisons]
        bars(axes[0][1], items, "full pipeline vs baselines (ratio to mscn)", texts)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from mscn.train.distributed import cleanup, init_distributed

    args = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    wants_cuda = args.device != "cpu" and torch.cuda.is_available()
    info = init_distributed("cuda" if wants_cuda else "cpu")
    try:
        device, _ = pick_device(args.device, info.local_rank, strict=True, what="--device")
        fill_defaults(args, device)
        data_root, dataset = resolve_data(args, info)
        cfg = build_config(args, data_root, info.world_size)
        result = {"schema": 1, "env": bench.environment(device), "dataset": dataset,
                  "settings": {"device": device.type, "config": args.config, "overrides": args.overrides,
                               "batch": args.batch, "threads": cfg.data.num_threads,
                               "hw_decoder_load": cfg.data.hw_decoder_load if device.type == "cuda" else None,
                               "views": args.views, "size": args.size, "highpass_sigma": cfg.highpass.sigma,
                               "warmup": args.warmup, "iters": args.iters, "repeats": args.repeats,
                               "world_size": info.world_size, "stages": args.stages},
                  "stages": run_stages(args, cfg, info, device)}
        if result["stages"]:
            result["pipeline"] = result["stages"][args.stages[-1]]
            if "decode" in result["stages"] and len(args.stages) > 1:
                result["share_of_decode"] = round(result["pipeline"]["images_per_s"]["median"]
                                                  / result["stages"]["decode"]["images_per_s"]["median"], 3)
        if args.baseline:
            result["baselines"] = run_baselines(args, cfg, info, device, result["stages"])
        if args.sweep:
            result["sweep"] = run_sweep(args, info, device, data_root)
        if args.train:
            result["train"] = run_train(args, cfg, info, device)
        result["gpu_memory"] = bench.gpu_memory(device) if device.type == "cuda" else None
        if info.is_main:
            print_report(result)
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(result, indent=1))
            if args.plot:
                plot(result, args.plot)
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MscnError as e:
        if os.environ.get("MSCN_DEBUG"):
            raise
        print(f"bench_pipeline: error: {e}", file=sys.stderr)
        sys.exit(2)
