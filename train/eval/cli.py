"""``mscn eval ...``: linear, knn, finetune, transfer, export, report, figures.

Each protocol runs on the CPU, one GPU, or every rank of a torchrun job
(``torchrun --nproc_per_node=8 -m mscn eval linear ...``); rank 0 writes the results:
``<out>/result.json``, ``<out>/result.md`` and one line of ``<table>`` (default
``<out>/../results.csv``). Every protocol takes ``--seed`` (default: the config's
``train.seed``) and gives the same numbers for the same seed on the CPU; ``linear`` and
``transfer`` take ``--seeds N`` (seeds seed..seed+N-1, mean ± std). Commands and
protocols: docs/EVALUATION.md.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import re
import statistics
import sys
from pathlib import Path

from mscn.data.imagefolder import SPLIT_NAMES
from mscn.errors import MscnError, SignalStop, sigterm_raises


class _Stopped(SignalStop):
    """SIGTERM during an evaluation; under torchrun every rank gets it, and rank 0 says it."""

    rank0_says = True


def _stoppable(command):
    """``command(args)``, where SIGTERM (a scheduler, ``timeout``, ``kill``) is one line and
    status 143, as Ctrl-C is one line and 130: it ended the process without a word. An
    evaluation writes its result when it ends, so a stop loses the time spent, nothing else."""

    @functools.wraps(command)
    def run(args):
        what = f"eval {args.command_eval}"
        with sigterm_raises(lambda signum: _Stopped(f"stopped by SIGTERM during {what}; it writes its result when it "
                                                    "ends, so nothing was written: rerun it", signum)):
            return command(args)

    return run


def _dataset_name(root: str) -> str:
    p = Path(root).resolve()
    return p.parent.name if p.name.lower() in SPLIT_NAMES else p.name


def _default_out(args, protocol: str) -> Path:
    p = Path(args.ckpt).resolve()
    run_dir = p if p.is_dir() else p.parent
    if run_dir.name == "checkpoints":  # <run>/checkpoints/ckpt_X.pt: name it after <run>
        run_dir = run_dir.parent
    run = "random" if args.ckpt == "random" else run_dir.name
    tag = "scratch" if getattr(args, "from_scratch", False) else re.sub(r"[^\w.-]+", "_", run)
    if getattr(args, "ckpt_file", None) and Path(args.ckpt_file).name != "final.pt" and args.ckpt_step is not None:
        tag += f"-step{args.ckpt_step}"  # a checkpoint during training: its own folder, its own row
    return Path("runs/eval") / f"{tag}-{protocol}"


def _checkpoint(args) -> dict:
    """``load_pretrained``'s source for ``--ckpt``: the file it means (a run directory: its
    newest weights) with its state, read once; kept on ``args`` with its step for the result.
    ``random`` stays ``random``."""
    from mscn.train.checkpoint import pick_pretrained

    args.ckpt_file, args.ckpt_step = None, None
    if args.ckpt == "random":
        return {"path": args.ckpt}
    path, args.ckpt_step, note, state = pick_pretrained(args.ckpt)
    args.ckpt_file = str(path.resolve())
    if note is None and Path(args.ckpt).is_dir():  # a run directory: say which of its files it means
        note = f"{args.ckpt}: evaluating {path} (step {args.ckpt_step})"
    if note and os.environ.get("RANK", "0") == "0":  # under torchrun: said once
        print(f"[mscn] {note}", flush=True)
    return {"path": str(path), "state": state}


def _prepare(args, protocol: str):
    from mscn.train.eval.common import seeded
    from mscn.train.eval.pretrained import load_pretrained
    from mscn.train.eval.provenance import data_digest, weights_digest
    from mscn.train.eval.results import check_outputs, model_name
    from mscn.train.models import build_backbone
    from mscn.train.runtime import setup_runtime

    for flag in ("train_root", "val_root"):
        if not getattr(args, flag):
            raise MscnError(f"eval {protocol}: --{flag.replace('_', '-')} is required")
        if not Path(getattr(args, flag)).exists():  # named by its flag: the loader only knows config keys
            raise MscnError(f"eval {protocol}: --{flag.replace('_', '-')} {getattr(args, flag)}: no such file "
                            "or directory")
    if Path(args.train_root).resolve() == Path(args.val_root).resolve() and os.environ.get("RANK", "0") == "0":
        # allowed (a sanity check of a pipeline), but a score of ~100 % says nothing of the encoder
        print(f"[mscn] note: --train-root and --val-root are the same data ({args.val_root}): the scores measure "
              "how well the training images are recalled, not how the features generalize", flush=True)
    backbone, arch, cfg = load_pretrained(**_checkpoint(args), arch=args.arch, overrides=args.overrides,
                                          config=args.config, strict=args.strict)
    if args.ckpt == "random" and not args.config and os.environ.get("RANK", "0") == "0":
        # a baseline on other views or another network than the pretraining compared against scores
        # something else: say which recipe this one is
        print(f"[mscn] --ckpt random without --config: the default recipe ({cfg.model.arch}, "
              f"{cfg.data.image_size} px views); give the pretraining's recipe (e.g. --config demo) to "
              "compare like with like", flush=True)
    name = args.name or model_name(args.ckpt, cfg)
    if args.seed is None:
        args.seed = cfg.train.seed  # recorded in the result, and the default of every protocol
    if args.ckpt == "random" or getattr(args, "from_scratch", False):
        # random weights drawn from the seed too: the baseline is as repeatable as the rest
        with seeded(cfg, args.seed):
            backbone, _ = build_backbone(arch)
        if getattr(args, "from_scratch", False):  # same views/arch as the checkpoint, random weights
            name = args.name or "from scratch"
    # what is scored, before anything trains (fine-tuning changes the backbone in place)
    args.weights = weights_digest(backbone)
    args.data = {"train_data": data_digest(args.train_root), "val_data": data_digest(args.val_root)}
    out = Path(args.out) if args.out else _default_out(args, protocol)
    check_outputs(out, args.table)
    rt = setup_runtime(args.device, cfg.train.precision)  # autocast as in pretraining
    if rt.note:
        print(f"[mscn] {rt.note}", flush=True)
    return backbone, arch, cfg, rt, name, out


def _finish(args, rt, protocol: str, name: str, arch: str, out: Path, res: dict) -> None:
    from mscn.train.distributed import cleanup
    from mscn.train.eval.results import write_result

    cleanup()  # every rank leaves the process group; the numbers are already on rank 0
    if not rt.is_main:
        return
    # ckpt as given (a run directory names the run in the tables); ckpt_file and ckpt_step:
    # the file that was scored, weights: what it held; the roots as absolute paths (a result
    # read from another folder still says where its data was), train_data and val_data: what
    # they held
    result = {"protocol": protocol, "name": name, "ckpt": args.ckpt, "ckpt_file": args.ckpt_file,
              "ckpt_step": args.ckpt_step, "weights": args.weights, "arch": arch,
              "overrides": list(args.overrides or []),
              # the recipe of a random init (a checkpoint carries its own config)
              "config": args.config if args.ckpt == "random" else None,
              "dataset": args.dataset or _dataset_name(args.val_root), "label_fraction": 1.0,
              "train_root": os.path.abspath(args.train_root), "val_root": os.path.abspath(args.val_root),
              **args.data, "seed": args.seed, **res}
    paths = write_result(result, out, args.table)
    if "previous" in paths:
        print(f"{out} already held a result: kept as {paths['previous']}")
    spread = f" ± {res['top1_std']:.2f} over {len(res['runs'])} seeds" if "runs" in res else ""
    print(f"{protocol}: top-1 {res['top1']:.2f}{spread}  top-5 {res['top5']:.2f}  ->  {paths['json']}, {paths['csv']}")


def _linear(args) -> None:
    from mscn.train.eval.common import watched
    from mscn.train.eval.linear import linear_probe

    protocol = "transfer" if args.command_eval == "transfer" else "linear"
    backbone, arch, cfg, rt, name, out = _prepare(args, protocol)
    if args.seeds < 1:
        raise MscnError(f"eval {protocol}: --seeds {args.seeds}: must be >= 1")
    with watched(cfg, rt, out / "stalls"):
        runs = [linear_probe(backbone, cfg, args.train_root, args.val_root, rt, epochs=args.epochs, lr=args.lr,
                             batch=args.batch, weight_decay=args.weight_decay,
                             precompute=args.precompute, seed=args.seed + i)
                for i in range(args.seeds)]
    _finish(args, rt, protocol, name, arch, out, runs[0] if len(runs) == 1 else over_seeds(runs))


def over_seeds(runs: list[dict]) -> dict:
    """One result from probes that differ only in their seed: top-1/top-5 are the means,
    ``top1_std``/``top5_std`` the sample standard deviations, ``runs`` every seed's figures."""
    res = {k: v for k, v in runs[0].items() if k not in ("loss", "wall_s")}
    for k in ("top1", "top5"):
        vals = [r[k] for r in runs]
        res[k], res[f"{k}_std"] = statistics.fmean(vals), statistics.stdev(vals)
    res["seed"] = runs[0]["seed"]
    res["seeds"] = len(runs)
    res["runs"] = [{"seed": r["seed"], "top1": r["top1"], "top5": r["top5"], "loss": r["loss"]} for r in runs]
    res["wall_s"] = round(sum(r["wall_s"] for r in runs), 1)
    return res


def _knn(args) -> None:
    from mscn.train.eval.common import eval_loader, label_set, seeded, watched
    from mscn.train.eval.knn import knn_eval

    backbone, arch, cfg, rt, name, out = _prepare(args, "knn")
    # `is None`, not `or`: an explicit 0 must reach the range check, not turn into the default
    k = cfg.eval.knn_k if args.k is None else args.k
    t = cfg.eval.knn_temperature if args.temperature is None else args.temperature
    batch = cfg.eval.linear_batch if args.batch is None else args.batch
    if k < 1 or t <= 0 or batch < 1:
        raise MscnError(f"knn: need --k >= 1, --temperature > 0 and --batch >= 1 (got {k}, {t}, {batch})")
    backbone = backbone.to(rt.device)
    classes, _ = label_set(args.train_root)
    # kNN draws nothing, but the DALI seeds still follow --seed
    with watched(cfg, rt, out / "stalls"), seeded(cfg, args.seed) as cfg:
        res = knn_eval(backbone, eval_loader(cfg, args.train_root, rt, batch),
                       eval_loader(cfg, args.val_root, rt, batch, classes=classes), rt, k, t, progress=True)
    if res["k"] < k and rt.is_main:
        # the result's k is the neighbours that voted; settings keep the k asked for
        given = f"--k {k}" if args.k is not None else f"k={k} (eval.knn_k)"
        print(f"knn: {given} is more than the {res['n_train']} training samples: all of them voted (k={res['k']})",
              file=sys.stderr)
    res["settings"] = {"k": k, "temperature": t, "batch": batch}
    _finish(args, rt, "knn", name, arch, out, res)


def _finetune(args) -> None:
    from mscn.train.eval.common import watched
    from mscn.train.eval.finetune import finetune

    backbone, arch, cfg, rt, name, out = _prepare(args, "finetune")
    with watched(cfg, rt, out / "stalls"):
        res = finetune(backbone, cfg, args.train_root, args.val_root, args.subset, rt, epochs=args.epochs,
                       backbone_lr=args.lr, head_lr=args.head_lr, batch=args.batch, seed=args.seed)
    _finish(args, rt, "finetune", name, arch, out, res)


def _export(args) -> None:
    from mscn.train.eval.export import export_backbone, export_paths
    from mscn.train.eval.pretrained import load_pretrained

    export_paths(args.out, args.name, args.force)  # a bad --name or an earlier export: before the checkpoint loads
    backbone, arch, _ = load_pretrained(**_checkpoint(args), arch=args.arch, overrides=args.overrides,
                                        config=args.config, strict=args.strict)
    paths = export_backbone(backbone, args.out, args.name, arch, overwrite=args.force)
    print(f"exported {arch}: {paths['torchvision']} (torchvision), {paths['detectron2']} (detectron2)")


def _report(args) -> None:
    from mscn.train.eval.results import load_results, markdown_table

    from mscn.paths import not_creatable

    why = args.out and not_creatable(args.out)
    if why:
        raise MscnError(f"--out {args.out}: {why}; it takes the .md file to write the table to")
    table = markdown_table(load_results(args.runs), args.metric, args.baseline)
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(table)
        except OSError as e:
            raise MscnError(f"--out {args.out}: cannot write the table ({e.strerror})") from None
    print(table, end="")


def _figures(args) -> None:
    from mscn.train.eval.figures import all_figures, find_image
    from mscn.train.eval.pretrained import load_pretrained

    backbone, arch, cfg = load_pretrained(**_checkpoint(args), arch=args.arch, overrides=args.overrides,
                                          config=args.config, strict=args.strict)
    if not (args.image or args.train_root):
        raise MscnError("eval figures: pass --image IMG or --train-root DIR (its first image is used)")
    image = find_image(args.image or args.train_root)
    title = f"{arch} conv1: {args.ckpt}"
    for p in all_figures(image, cfg, backbone, args.out, args.seed, title):
        print(p)


def _finite(text: str) -> float:
    """argparse type: a finite float (a NaN learning rate or weight decay would only show up
    as a diverged run, minutes later)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _add_model_args(p: argparse.ArgumentParser, ckpt_required: bool = True) -> None:
    p.add_argument("--ckpt", required=ckpt_required, default=None if ckpt_required else "random",
                   help="pretraining checkpoint (mscn pretrain), a run directory (its newest weights: final.pt, "
                        "or a checkpoint past it), or 'random' for a random-init baseline")
    p.add_argument("--arch", default=None, help="expected architecture; a checkpoint of another one is an error")
    p.add_argument("--config", default=None, help="YAML recipe for --ckpt random (a checkpoint has its own)")
    p.add_argument("--strict", action="store_true", help="refuse a high-pass different from pretraining")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. data.num_threads=8)")


def _add_protocol_args(p: argparse.ArgumentParser, lr_help: str | None) -> None:
    _add_model_args(p)
    p.add_argument("--train-root", help="the training images: an ImageFolder (ROOT/<class>/<image>), a file list "
                                        "from mscn data scan, or a folder of .tar shards (finetune: the ImageFolder)")
    p.add_argument("--val-root", help="the evaluation images, in any of those forms")
    p.add_argument("--out", default=None, help="result folder (default runs/eval/<run>-<protocol>)")
    p.add_argument("--table", default=None, help="results CSV to append to (default <out>/../results.csv)")
    p.add_argument("--name", default=None, help="row label in tables (default from the checkpoint, e.g. SimCLR+MSCN)")
    p.add_argument("--dataset", default=None, help="dataset label in tables (default from --val-root)")
    if lr_help:  # protocols that train something
        p.add_argument("--epochs", type=int, default=None, help="default from the config's eval section")
        p.add_argument("--lr", type=_finite, default=None, help=lr_help)
    p.add_argument("--batch", type=int, default=None, help="global batch size (default 256, from the config)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--seed", type=int, default=None,
                   help="seed of every random choice (head init, crops, data order; default: the config's "
                        "train.seed); the same seed gives the same result on the CPU")


def add_eval_commands(subparsers) -> None:
    """Register ``mscn eval <protocol>``; each sub-command sets ``func``."""
    ev = subparsers.add_parser("eval", help="linear probe, kNN, fine-tuning, transfer, export, report, figures")
    sub = ev.add_subparsers(dest="command_eval", metavar="PROTOCOL")
    sub.required = True

    for cmd, what in (("linear", "linear probe on frozen features (paper A.2)"),
                      ("transfer", "linear probe on another dataset (paper Table 3)")):
        p = sub.add_parser(cmd, help=what, description=what)
        _add_protocol_args(p, "base lr for batch 256 (default 1.0; tune it per dataset for transfer)")
        p.add_argument("--weight-decay", type=_finite, default=None, help="default 1e-6")
        p.add_argument("--seeds", type=int, default=1, metavar="N",
                       help="run the probe N times, seeds seed..seed+N-1; report mean ± std (default 1)")
        p.add_argument("--precompute", action=argparse.BooleanOptionalAction, default=None,
                       help="train on cached center-crop features (faster; not exactly A.2: no random crops); "
                            "--no-precompute: random crops as A.2 (default: the checkpoint's "
                            "eval.precompute_features, on in the demo recipe)")
        p.set_defaults(func=_stoppable(_linear))

    p = sub.add_parser("knn", help="weighted kNN on frozen features (k=20, T=0.07)")
    _add_protocol_args(p, None)
    p.add_argument("--k", type=int, default=None, help="neighbours (default 20)")
    p.add_argument("--temperature", type=_finite, default=None, help="vote temperature (default 0.07)")
    p.set_defaults(func=_stoppable(_knn))

    p = sub.add_parser("finetune", help="semi-supervised fine-tuning on a 1%%/10%% label subset (paper A.3)")
    _add_protocol_args(p, "backbone base lr for batch 256 (default 0.002)")
    p.add_argument("--subset", required=True, help="subset file: 'relpath label' lines (mscn data subset) "
                   "or an official split (SimCLR 1percent.txt)")
    p.add_argument("--head-lr", type=_finite, default=None, help="classifier base lr (default 0.5)")
    p.add_argument("--from-scratch", action="store_true", help="random-init backbone (the baseline), same config")
    p.set_defaults(func=_stoppable(_finetune))

    p = sub.add_parser("export", help="backbone as torchvision .pth and detectron2 .pkl (paper A.4)")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", default="backbone", help="file stem (default backbone)")
    p.add_argument("--force", action="store_true", help="replace an earlier export of the same --name")
    p.set_defaults(func=_export)

    p = sub.add_parser("report", help="merge result.json files into one paper-style Markdown table")
    p.add_argument("runs", nargs="+", help="result.json files or folders searched for them")
    p.add_argument("--metric", default="top1", choices=("top1", "top5"))
    p.add_argument("--baseline", default=None, help="row name to show (+x.x) deltas against, e.g. SimCLR")
    p.add_argument("--out", default=None, help="also write the table to this .md file")
    p.set_defaults(func=_report)

    p = sub.add_parser("figures", help="masked views, colour histograms and conv1 kernels (Figs. 1-3, 7, 8)")
    _add_model_args(p, ckpt_required=False)
    p.add_argument("--image", default=None, help="image to draw (default: the first of --train-root)")
    p.add_argument("--train-root", default=None, help="take the first image of this folder")
    p.add_argument("--out", required=True, help="output folder for the PNG files")
    p.add_argument("--seed", type=int, default=0, help="mask seed")
    p.set_defaults(func=_figures)
