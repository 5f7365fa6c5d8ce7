"""``mscn demo``: the whole MSCN path on the embedded synthetic dataset, on CPU or GPU.

1. synthesize the default dataset if absent (``mscn data synth``),
2. pretrain SimCLR + MSCN (high-pass, asymmetric masks, 2 + 2 views; paper §5),
3. linear probe (App. A.2) and kNN of the pretrained encoder and of a random-init one,
4. print a table and write it to ``<out_dir>/demo_results.md`` and ``.json``.

Re-running reuses the dataset and resumes (or skips) pretraining; the evaluation is
re-run (~15 s). ``--fresh`` starts over.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from mscn.config import Config, load_config
from mscn.errors import MscnError


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mscn demo",
        description="Synthesize the default dataset, pretrain SimCLR+MSCN, and linear-probe / kNN the "
                    "encoder against a random-init one. GPU if present, else CPU.")
    p.add_argument("--config", default="demo", help="recipe (default: demo)")
    p.add_argument("--out", default=None, help="run directory (default: train.out_dir if set, else runs/demo)")
    p.add_argument("--data", default=None, help="synthetic dataset directory (default: data.synthetic_dir)")
    p.add_argument("--fresh", action="store_true", help="delete the previous demo run first")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. schedule.epochs=2")
    return p.parse_intermixed_args(argv)  # overrides on both sides of an option


def prepare_data(cfg: Config) -> Config:
    """Create (or reuse) the synthetic ImageFolder and point data.root / data.val_root at it."""
    from mscn.train.pretrain import with_synthetic_data

    d = cfg.data
    if d.synthetic and not d.root:
        print(f"[demo] dataset: {d.synthetic_dir} ({d.synthetic_classes} classes x {d.synthetic_per_class} train / "
              f"{d.synthetic_val_per_class} val, {d.synthetic_size[0]}x{d.synthetic_size[1]} JPEGs)", flush=True)
    cfg = with_synthetic_data(cfg)
    if not cfg.data.root or not cfg.data.val_root:
        raise MscnError("the demo needs data.root and data.val_root (or data.synthetic=true "
                        "with data.synthetic_val_per_class > 0)")
    return cfg


def evaluate(ckpt: str, cfg: Config, train_root: str, val_root: str) -> list[dict]:
    """Linear probe + kNN (train/eval/standard.py) for the pretrained encoder and a random-init baseline."""
    from mscn.train.eval.pretrained import load_pretrained
    from mscn.train.eval.standard import linear_and_knn, random_backbone
    from mscn.train.runtime import setup_runtime

    rt = setup_runtime(cfg.train.device, cfg.train.precision)
    if rt.note:
        print(f"[mscn] {rt.note}", flush=True)
    rows = []
    for name, path in (("SimCLR + MSCN (pretrained)", ckpt), ("random init", "random")):
        if path == "random":
            backbone, ecfg = random_backbone(cfg.model.arch, cfg.train.seed), cfg  # same data/high-pass settings
        else:
            backbone, _, ecfg = load_pretrained(path)
        # the probe's 100 epochs as a progress bar, not 100 JSON lines each (`mscn eval linear` logs them)
        r = linear_and_knn(backbone, ecfg, train_root, val_root, rt, log_epochs=False)
        rows.append({"encoder": name, "linear_top1": r["linear_top1"], "linear_top5": r["linear_top5"],
                     "knn_top1": r["knn_top1"], "wall_s": r["wall_s"]})
        print(f"[demo] {name}: linear top-1 {r['linear_top1']:.1f}%, kNN top-1 {r['knn_top1']:.1f}%", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| encoder | linear top-1 | linear top-5 | kNN top-1 (k=20) |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['encoder']} | {r['linear_top1']:.1f} | {r['linear_top5']:.1f} | {r['knn_top1']:.1f} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    t_start = time.time()
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    if args.data:
        overrides.append(f"data.synthetic_dir={args.data}")
    cfg = load_config(args.config, overrides)
    if not cfg.train.out_dir:
        # the demo keeps one folder, so that re-running it resumes (or skips) pretraining;
        # mscn pretrain --config demo gets a fresh runs/demo-<time> instead
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir="runs/demo"))
    out = Path(cfg.train.out_dir)
    if args.fresh and out.exists():
        from mscn.train.rundir import clear_run_dir

        clear_run_dir(out)  # not under a live run: its lock stops --fresh in one line

    cfg = prepare_data(cfg)
    train_root, val_root = cfg.data.root, cfg.data.val_root
    t_data = time.time()

    from mscn.train.pretrain import run_pretrain

    try:
        summary = run_pretrain(cfg, resume="auto")
    except MscnError as e:  # pretraining's advice names its own flag; the demo starts over with --fresh
        if "--resume none" not in str(e):
            raise
        raise type(e)(str(e).replace("--resume none", "mscn demo --fresh")) from None
    ckpt = summary.get("final") or summary.get("checkpoint")
    if not ckpt or not Path(ckpt).is_file():
        raise MscnError(f"pretraining left no checkpoint in {out}; rerun with --fresh")
    t_pre = time.time()

    rows = evaluate(ckpt, cfg, train_root, val_root)
    t_end = time.time()
    margin = rows[0]["linear_top1"] - rows[1]["linear_top1"]
    timing = {"data_s": round(t_data - t_start, 1), "pretrain_s": round(t_pre - t_data, 1),
              "eval_s": round(t_end - t_pre, 1), "total_s": round(t_end - t_start, 1)}
    md = (f"{table(rows)}\n\nLinear-probe margin of the pretrained encoder over random init: "
          f"{margin:+.1f} points. Pretraining: {summary['step']} steps, "
          + (f"{summary['images_per_s']:.1f} images/s" if summary.get("images_per_s") is not None
             else "done before this run" if not summary.get("trained_steps") else "speed not measured")
          + f". Wall time: {timing['total_s']:.0f} s "
          f"(data {timing['data_s']:.0f} s, pretrain {timing['pretrain_s']:.0f} s, eval {timing['eval_s']:.0f} s).\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_results.md").write_text(md)
    (out / "demo_results.json").write_text(json.dumps(
        {"rows": rows, "margin_linear_top1": margin, "timing": timing, "pretrain": summary}, indent=2, default=str))
    print("\n" + md)
    print(f"[demo] results written to {out / 'demo_results.md'}")
    return 0


if __name__ == "__main__":
    from mscn.errors import run_cli

    raise SystemExit(run_cli(main, "mscn demo"))
