"""``mscn ablate``: one recipe under named grids of arms and seeds, every run evaluated the
same way (paper §5.1-5.2, §6.3 Fig. 5; issue 12).

    mscn ablate --config demo --arms highpass --seeds 3 --out runs/ablate [key=value ...]
    mscn ablate --out runs/ablate --report-only      # rewrite ablation.md/.png from ablation.json

Every arm's config is resolved and validated before anything runs; the synthetic dataset
(if the recipe uses it) is made once and shared by every arm and seed. Outputs in
``--out``: ablation.json, ablation.md, ablation.png (train/ablate/report.py).
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import time
from pathlib import Path

from mscn.config import load_config
from mscn.errors import MscnError, sigterm_raises
from mscn.paths import creatable
from mscn.train.ablate import report
from mscn.train.ablate.arms import GRIDS, OWN_KEYS, expand, resolve
from mscn.train.ablate.run import Runner
from mscn.train.preempt import Stopped

# The online kNN monitor is off in ablation runs: every run gets the full kNN at its end.
DEFAULTS = ["train.knn_every_epochs=0"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mscn ablate",
        description="Run the paper's ablations (§5.1-5.2, §6.3 Fig. 5) on a recipe: each arm x seed is "
                    "pretrained and scored by the recipe's evaluation (linear probe + kNN, eval.*), random init per seed. "
                    "Resumable: finished runs in --out are skipped.")
    p.add_argument("--config", default=None, help="recipe (default: demo)")
    p.add_argument("--arms", default="", help=f"comma-separated grids: {', '.join(GRIDS)}, paper (= all); "
                                              "the baseline arm (no masks, no high-pass) always runs")
    p.add_argument("--arms-file", default=None,
                   help="YAML of custom arms: 'name: [key=value, ...]' or 'name: {overrides: [...], param: P, value: V}'")
    p.add_argument("--seeds", type=int, default=None, help="runs per arm, seeds train.seed .. +N-1 (default 3)")
    p.add_argument("--out", default="runs/ablate", help="output folder (default: runs/ablate)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rewrite ablation.md and ablation.png from --out's ablation.json")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every arm, e.g. schedule.epochs=4")
    return p.parse_intermixed_args(argv)  # overrides on both sides of an option


def check_batches(root: str, fmt: str, cfgs: dict) -> None:
    """Every arm's global batch fits the training set, checked before the first run (the
    random-init probe of seed 0 would otherwise run, and only the first pretraining fail)."""
    from mscn.pipelines.loader import check_size
    from mscn.pipelines.readers import resolve_source

    source = resolve_source(root, fmt)
    for name, cfg in cfgs.items():
        try:
            check_size(source, cfg.train.global_batch, "train.global_batch")
        except MscnError as e:
            raise MscnError(f"arm '{name}': {e}") from None


def write_report(doc: dict, out: Path) -> str:
    """ablation.md and ablation.png in ``out`` from the ablation.json document; returns the
    markdown and prints where it went."""
    md = report.markdown(doc)
    (out / "ablation.md").write_text(md)
    why = report.figure(doc, out / "ablation.png")
    print("\n" + md)
    print(f"[ablate] written {out / 'ablation.md'}" + (f"; {why}" if why else f", {out / 'ablation.png'}"), flush=True)
    return md


def _check_scores(doc: dict, path: Path) -> None:
    """Every score the report reads is a number, every arm has one per seed, the baseline is
    there: a hand-edited or damaged file gets one line naming the entry."""
    def number(v) -> bool:  # json.loads takes NaN and Infinity: no score
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not isinstance(doc["seeds"], list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in doc["seeds"]):
        raise MscnError(f"--report-only: {path}: seeds must be a list of integers, got {doc['seeds']!r}")
    names = []
    for i, a in enumerate(doc["arms"] if isinstance(doc["arms"], list) and doc["arms"] else [None]):
        if not isinstance(a, dict) or not isinstance(a.get("name"), str):
            raise MscnError(f"--report-only: {path}: arms[{i}] is not an arm record (with a name)")
        names.append(a["name"])
        for m in report.METRICS:
            vals = a.get(m)
            if not isinstance(vals, list) or not vals or not all(number(v) for v in vals):
                raise MscnError(f"--report-only: {path}: arm {a['name']!r} {m} must be a list of numbers, got {vals!r}")
        if len({len(a[m]) for m in report.METRICS}) > 1:
            raise MscnError(f"--report-only: {path}: arm {a['name']!r} has not as many {' as '.join(report.METRICS)} "
                            "scores (one per seed each)")
        if not isinstance(a.get("overrides", []), list):
            raise MscnError(f"--report-only: {path}: arm {a['name']!r} overrides must be a list")
    if doc["baseline"] not in names:
        raise MscnError(f"--report-only: {path}: the baseline arm {doc['baseline']!r} is not among the arms")
    rnd = doc["random_init"]
    if not isinstance(rnd, list) or not rnd or not all(isinstance(r, dict) and all(number(r.get(m)) for m in
                                                                                   report.METRICS) for r in rnd):
        raise MscnError(f"--report-only: {path}: random_init must be a list of entries with numeric "
                        f"{', '.join(report.METRICS)} (one per seed)")


def _from_scores(doc: dict) -> None:
    """Every figure the report derives, recomputed from the per-seed scores (the file's truth):
    a hand-edited or older file with a mean, a std or an ``n`` missing, null or out of step
    with its scores gets them from the scores; fields only the figure reads get defaults."""
    for a in doc["arms"]:
        for m in report.METRICS:
            s = report.summary(a[m])
            a[f"{m}_mean"], a[f"{m}_std"] = s["mean"], s["std"]
        a["n"] = len(a[report.METRICS[0]])
        a.setdefault("overrides", [])
        for k in ("grid", "param", "value"):
            a.setdefault(k, "")
        a.setdefault("same_as", None)


def _essence(doc: dict) -> dict:
    """What an ablation asked (recipe, overrides, seeds, each arm's overrides) and found (its
    scores), as it reads back from JSON: a rerun with the same essence rewrites its report in
    place; any other field (times, counts, fields added later) does not count."""
    arms = [{k: a.get(k) for k in ("name", "overrides", "seeds", *report.METRICS)} if isinstance(a, dict) else a
            for a in (doc.get("arms") or [])]
    rnd = [{k: r.get(k) for k in ("seed", *report.METRICS)} if isinstance(r, dict) else r
           for r in (doc.get("random_init") or [])]
    return json.loads(json.dumps({"config": doc.get("config"), "overrides": doc.get("overrides"),
                                  "seeds": doc.get("seeds"), "baseline": doc.get("baseline"), "arms": arms,
                                  "random_init": rnd}))


REPORT_FILES = ("ablation.json", "ablation.md", "ablation.png")


def keep_previous_report(out: Path, doc: dict) -> str | None:
    """Before ``doc`` replaces ``out``'s report: when the report there is of another ablation
    (another recipe, overrides, arms, seeds or scores: :func:`_essence`; or it cannot be
    read), keep its files as
    ``ablation.<its time>.json/.md/.png`` beside the new ones. Returns the kept JSON's name,
    or None (no report there, or the same ablation)."""
    old = out / "ablation.json"
    try:
        prev = json.loads(old.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError):
        prev = None
    if isinstance(prev, dict) and _essence(prev) == _essence(doc):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(old.stat().st_mtime))
    for n in range(1, 1000):
        tag = stamp if n == 1 else f"{stamp}-{n}"
        if not any((out / f"ablation.{tag}{Path(f).suffix}").exists() for f in REPORT_FILES):
            break
    for f in REPORT_FILES:
        if (out / f).exists():
            (out / f).rename(out / f"ablation.{tag}{Path(f).suffix}")
    return f"ablation.{tag}.json"


def report_only(out: Path) -> int:
    """--report-only: the report of a finished (or older) ablation, rewritten from its JSON."""
    path = out / "ablation.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise MscnError(f"--report-only: {path} does not exist; run the ablation first (without --report-only)") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MscnError(f"--report-only: cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict) or not {"arms", "baseline", "random_init", "seeds"} <= set(doc):
        raise MscnError(f"--report-only: {path} is not an ablation.json (needs arms, baseline, random_init, seeds)")
    if doc.get("schema") != report.SCHEMA:
        raise MscnError(f"--report-only: {path} has schema {doc.get('schema')!r}; this mscn reads schema {report.SCHEMA}")
    _check_scores(doc, path)
    _from_scores(doc)
    doc["pairs"], doc["vs_random_init"] = report.pairs(doc), report.vs_random(doc)  # an older file lacks them
    path.write_text(json.dumps(doc, indent=2))
    write_report(doc, out)
    return 0


class _Terminated(BaseException):
    """SIGTERM outside a pretraining (which stops on it by itself): during an evaluation."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__()
        self.signum = signum


def stoppable(runner: Runner, work):
    """``work()``, where a stop (Ctrl-C, SIGTERM from a scheduler or ``timeout``) says what it
    stopped and that rerunning the same command continues: a pretraining's own stop line names
    its run folder and ``train.out_dir``, which is not how an ablation resumes, and a SIGTERM
    during an evaluation ended the process without a word."""
    try:
        with sigterm_raises(_Terminated):
            return work()
    except (Stopped, KeyboardInterrupt, _Terminated) as e:
        if isinstance(e, Stopped):  # pretraining wrote a checkpoint, then stopped
            signum, then = e.status - 128, "its pretraining resumes from the checkpoint it wrote"
        else:  # an evaluation, or a second Ctrl-C inside a pretraining
            signum = signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM
            then = "it resumes from its last checkpoint if it wrote one, else starts over"
        stop = Stopped(f"stopped by {signal.Signals(signum).name} during {runner.current or 'the first run'}; the "
                       f"finished runs are kept: rerun the same mscn ablate command to continue ({then}; finished "
                       "runs are skipped)", signum)
        stop.from_signal = getattr(e, "from_signal", False)  # a SIGTERM mid-evaluation: mscn.errors.run_cli
        raise stop from None


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.report_only:
        if args.overrides or args.arms or args.arms_file or args.config or args.seeds is not None:
            raise MscnError("--report-only rewrites the report of --out's ablation.json: it takes no --arms, "
                            "--arms-file, --config, --seeds or overrides (the JSON holds what was run)")
        return report_only(Path(args.out))
    args.config = args.config or "demo"
    args.seeds = 3 if args.seeds is None else args.seeds
    if args.seeds < 1:
        raise MscnError(f"--seeds must be >= 1, got {args.seeds}")
    for o in args.overrides:  # else dropped without a word: the runner sets it for every run
        if o.split("=", 1)[0].strip() == "train.out_dir":
            raise MscnError(f"{o}: mscn ablate sets train.out_dir per run ({OWN_KEYS['train.out_dir']}); pass --out")
    overrides = DEFAULTS + list(args.overrides)
    base = load_config(args.config, overrides)  # a bad override fails here, naming it
    arms = expand(args.arms, base, args.arms_file)
    cfgs = resolve(arms, args.config, overrides)  # ... and a bad arm here, before anything runs
    seeds = [base.train.seed + k for k in range(args.seeds)]
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # found before the first run, not when its result is written
        raise MscnError(f"--out {out}: a file; --out takes the ablation's folder")
    if not creatable(out, folder=True):
        raise MscnError(f"--out {out}: not writable; pass a folder you can write")
    run_files = [f for f in ("config.yaml", "checkpoints", "final.pt") if (out / f).exists()]
    if {"checkpoints", "final.pt"} & set(run_files):  # its runs, random/ and the report would go in beside them
        raise MscnError(f"--out {out}: a pretraining run's folder (it holds {', '.join(run_files)}); an ablation "
                        "takes a folder of its own, e.g. --out runs/ablate")
    print(f"[ablate] {len(arms)} arms x {len(seeds)} seeds {seeds} + random init -> {out}: "
          + ", ".join(a.name for a in arms), flush=True)

    from mscn.train.demo import prepare_data

    t0 = time.time()
    data_cfg = prepare_data(base)  # once: every arm and seed sees the same images
    check_batches(data_cfg.data.root, data_cfg.data.format, cfgs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MscnError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    runner = Runner(out, data_cfg.data.root, data_cfg.data.val_root, say=lambda s: print(s, flush=True))
    results, random = stoppable(runner, lambda: runner.run_all(runner.plan(arms, cfgs, data_cfg, seeds)))

    doc = report.records(arms, results, random, seeds)
    doc.update(config=args.config, overrides=list(args.overrides), wall_s=round(time.time() - t0, 1),
               computed_runs=runner.ran)
    out.mkdir(parents=True, exist_ok=True)
    kept = keep_previous_report(out, doc)
    if kept:
        print(f"[ablate] {out} held the report of another ablation (other recipe, overrides, arms, seeds or scores): "
              f"kept as {kept}", flush=True)
    (out / "ablation.json").write_text(json.dumps(doc, indent=2))
    write_report(doc, out)
    print(f"[ablate] {runner.ran} runs computed in {doc['wall_s']:.0f} s; written {out / 'ablation.json'}", flush=True)
    return 0


if __name__ == "__main__":
    from mscn.errors import run_cli

    raise SystemExit(run_cli(main, "mscn ablate"))
