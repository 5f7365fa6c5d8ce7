"""Run every (arm, seed) of an ablation: pretrain, then the standard evaluation (linear probe +
kNN, train/eval/standard.py), each kept under ``<out>/runs/<arm>/seed<k>/`` with its
``result.json``; a random-init encoder is scored once per seed under ``<out>/random/seed<k>/``.

Resumable: a run whose ``result.json`` matches its config (fingerprint) is skipped, and a
pretraining cut short resumes from its checkpoint (``--resume auto``), so an interrupted
ablation costs only the run in flight. Two arms with the same resolved config (e.g. the
``method`` grid's ``simclr`` and the baseline of a SimCLR recipe) run once.
Paper: §5.1-5.2, §6.3 (Fig. 5).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import yaml

from mscn.config import Config, to_dict
from mscn.errors import MscnError
from mscn.paths import write_atomic
from mscn.train.ablate.arms import Arm
from mscn.train.eval.results import keep_previous
from mscn.train.rundir import LEGACY, NEUTRAL, check_run_dir, flatten, lock_run_dir, run_started

RESULT = "result.json"


# Neutral to resuming a run (rundir.NEUTRAL) but not to its result: the data it trains on and
# is scored on, and where pretraining stops (a run stopped at step 1 is no finished run). The
# data count by what they hold (DATA_KEYS), not by their paths
RESULT_KEYS = frozenset({"data.root", "data.val_root", "train.max_steps"})
DATA_KEYS = ("data.root", "data.val_root")
# What a random-init encoder's scores depend on: the evaluation's data, views and settings, the
# network and the seed; not the pretraining recipe (its views, masks, method, optimizer, schedule)
RANDOM_INIT_KEYS = ("data.", "highpass.", "eval.", "model.arch", "train.seed", "train.precision")


def fingerprint(cfg: Config, random_init: bool = False, data: dict[str, str] | None = None) -> str:
    """Hash of everything that changes a run's result: the config less where and how verbosely
    it runs (rundir.NEUTRAL, but for :data:`RESULT_KEYS`); evaluation settings count (they
    change the numbers). ``random_init``: only :data:`RANDOM_INIT_KEYS`, marked ``-random``.

    ``data``: what ``data.root`` and ``data.val_root`` hold (:func:`data_digests`), in place of
    their paths, so that a job that stages its data to another local path each time (a SLURM
    job's ``$TMPDIR``) finds its finished runs; without it, the paths count (the fingerprints
    of results written before the data digests (2026-11-29), still accepted by :meth:`Runner.plan`)."""
    keys = {k: v for k, v in flatten(to_dict(cfg)).items() if k not in NEUTRAL or k in RESULT_KEYS}
    if data is not None:
        keys.update({k: f"data:{data[k]}" for k in DATA_KEYS})
    if random_init:
        keys = {k: v for k, v in keys.items() if k.startswith(RANDOM_INIT_KEYS) and k != "train.max_steps"}
    digest = hashlib.sha1(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return digest + ("-random" if random_init else "")


def data_digests(train_root: str, val_root: str, fmt: str = "auto") -> dict[str, str]:
    """What the train and val data hold, by config key (``data.format`` reads the train
    root, as the loaders do): the files' names relative to the root, labels, classes and
    sizes (:func:`mscn.data.source.sized_digest`), not where they lie."""
    from mscn.train.eval.provenance import data_digest

    return {"data.root": data_digest(train_root, fmt), "data.val_root": data_digest(val_root)}


def with_run(cfg: Config, seed: int, out_dir: Path) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed, out_dir=str(out_dir)))


def with_data(cfg: Config, root: str, val_root: str) -> Config:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=root, val_root=val_root))


def load_done(path: Path, *fps: str) -> dict | None:
    """The stored result of a finished run with one of the fingerprints ``fps``, or None
    (absent, unreadable, or another config)."""
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(res, dict) or res.get("fingerprint") not in fps:
        return None
    # a damaged or hand-edited file without its scores is no finished run: it is run again
    scores = [res.get(k) for k in ("linear_top1", "knn_top1")]
    return res if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores) else None


def _write(path: Path, res: dict) -> Path | None:
    """``res`` as ``path`` (a run's result.json). A result already there for another config
    (the ablation rerun with other overrides or evaluation settings) is kept beside it as
    ``result.<its time>.json``, as ``mscn eval`` keeps one; returns where, or None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = None
    if path.exists() and load_done(path, res["fingerprint"]) is None:
        try:
            kept = keep_previous(path.parent)
        except OSError as e:
            raise MscnError(f"{path}: cannot keep the earlier config's result ({e}); move it away and rerun") from None
    res.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_atomic(path, json.dumps(res, indent=2, default=str))  # a run killed while writing leaves no half result
    return kept


def _clock(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Runner:
    """Runs the (arm, seed) grid in order; ``results[arm][seed]`` and ``random[seed]`` hold the records."""

    def __init__(self, out: Path, train_root: str, val_root: str, say=print):
        self.out, self.train_root, self.val_root, self.say = Path(out), train_root, val_root, say
        self._rt = None
        self.t0 = time.time()
        self.ran = 0  # runs computed in this invocation
        self.current = ""  # the run under way, for a stop's message
        self.took: dict[str, list[float]] = {"random": [], "pretrain": []}  # seconds per computed run, by kind

    def runtime(self, cfg: Config):
        from mscn.train.runtime import setup_runtime

        if self._rt is None:
            self._rt = setup_runtime(cfg.train.device, cfg.train.precision)
        return self._rt

    def plan(self, arms: list[Arm], cfgs: dict[str, Config], base: Config, seeds: list[int]) -> list[dict]:
        """Every job in order, seed by seed (random init, then every arm), with its config,
        folder, fingerprint and whether it is already done (or shares an earlier job's config).

        Seed-major, so that an ablation cut short (a time limit, a lost machine) has every
        arm at the same number of seeds, and its table compares like with like."""
        jobs, fps = [], set()
        data = data_digests(self.train_root, self.val_root, base.data.format)
        gpu = self.runtime(base).device.type == "cuda"
        blur = self._blur_choice(base, gpu)
        order = [(name, s, arm) for s in seeds for name, arm in [("random", None)] + [(a.name, a) for a in arms]]
        for name, seed, arm in order:
            where = self.out / ("random" if arm is None else f"runs/{name}") / f"seed{seed}"
            cfg = with_run(with_data(base if arm is None else cfgs[name], self.train_root, self.val_root), seed, where)
            # as run_pretrain saves it: with the choices ``auto`` makes per device (data.blur_where),
            # so that the fingerprint names the graph that runs, and a finished run's
            # config.yaml matches this config (check_run_dir)
            if blur and cfg.data.blur_where == "auto":
                cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, blur_where=blur))
            cfg = cfg.resolved_for(gpu=gpu)
            fp = fingerprint(cfg, random_init=arm is None, data=data)
            # a result written before the data digests, at these same paths, is finished too
            done = (fp, fingerprint(cfg, random_init=arm is None))
            todo = fp not in fps and load_done(where / RESULT, *done) is None
            jobs.append({"name": name, "seed": seed, "random": arm is None, "cfg": cfg, "where": where,
                         "fp": fp, "done": done, "todo": todo})
            fps.add(fp)
        return jobs

    def _blur_choice(self, base: Config, gpu: bool) -> str | None:
        """Where this ablation's runs blur under ``data.blur_where=auto``: where its first
        pretraining did (an ablation started before round 5, or on the other kind of
        device), so that every arm runs the same graph and no finished arm is redone; None
        for a new ablation (auto resolves per device)."""
        for saved in sorted((self.out / "runs").glob("*/seed*/config.yaml")):
            if not run_started(saved.parent):
                continue
            try:
                tree = yaml.safe_load(saved.read_text()) or {}
            except yaml.YAMLError:
                continue
            value = flatten(tree).get("data.blur_where", LEGACY["data.blur_where"])
            if value in ("pipeline", "loader"):
                now = base.blur_where_on(gpu)
                if value != now and base.data.blur_where == "auto":
                    self.say(f"[ablate] data.blur_where=auto: this ablation's runs blur in the {value} "
                             f"(its first runs did); a new ablation here would use {now}")
                return value
        return None

    def run_all(self, jobs: list[dict]) -> tuple[dict, dict]:
        """Run what is not done; ``(results[arm][seed], random[seed])``."""
        by_fp: dict[str, dict] = {}
        results: dict[str, dict[int, dict]] = {}
        random: dict[int, dict] = {}
        left = {kind: sum(j["todo"] and j["random"] == (kind == "random") for j in jobs)
                for kind in ("random", "pretrain")}
        for i, j in enumerate(jobs, 1):
            name, seed, where, fp = j["name"], j["seed"], j["where"], j["fp"]
            tag = f"[ablate] {i}/{len(jobs)} {name} seed {seed}"
            self.current = f"run {i}/{len(jobs)} ({name} seed {seed}, in {where})"
            # a result written before the data digests counts at its own paths, as it did; it is
            # not stamped with today's digest, which its data may not have had
            res = load_done(where / RESULT, *j["done"])
            if res is None and fp in by_fp:  # same resolved config as an earlier arm: share its run
                res = dict(by_fp[fp], fingerprint=fp, same_as=by_fp[fp]["arm"], arm=name)
                self._kept(tag, _write(where / RESULT, res))
            if res is not None:
                self.say(f"{tag}: done (linear {res['linear_top1']:.1f} %, kNN {res['knn_top1']:.1f} %"
                         f"{', same config as ' + res['same_as'] if res.get('same_as') else ''}), skipped")
            else:
                self.say(f"{tag}: running in {where}")
                t = time.time()
                res = self._random(j["cfg"], seed) if j["random"] else self._train_and_eval(j["cfg"], seed, tag)
                res.update(arm=name, seed=seed, fingerprint=fp, wall_s=round(time.time() - t, 1))
                self._kept(tag, _write(where / RESULT, res))
                kind = "random" if j["random"] else "pretrain"
                self.ran += 1
                self.took[kind].append(time.time() - t)
                left[kind] -= 1
                self.say(f"{tag}: linear {res['linear_top1']:.1f} %, kNN {res['knn_top1']:.1f} % "
                         f"({_clock(res['wall_s'])}; elapsed {_clock(time.time() - self.t0)}, {self._eta(left)})")
            if res.get("fingerprint") == fp:  # a result from before the data digests is shared with no other arm
                by_fp.setdefault(fp, res)
            if j["random"]:
                random[seed] = res
            else:
                results.setdefault(name, {})[seed] = res
        return results, random

    def _eta(self, left: dict[str, int]) -> str:
        """``ETA 4m10s, 2 runs left``: each kind of run at its own pace (a random-init probe takes
        seconds, a pretraining minutes); no ETA before a run of each kind still to come has ended."""
        n = sum(left.values())
        runs = f"{n} run{'' if n == 1 else 's'} left"
        unknown = [k for k in left if left[k] and not self.took[k]]
        if unknown:
            return f"ETA after the first {'pretraining' if 'pretrain' in unknown else 'random-init probe'}, {runs}"
        eta = sum(left[k] * sum(self.took[k]) / len(self.took[k]) for k in left if left[k])
        return f"ETA {_clock(eta)}, {runs}"

    def _kept(self, tag: str, kept: Path | None) -> None:
        if kept:
            self.say(f"{tag}: the result of its earlier config kept as {kept}")

    def _train_and_eval(self, cfg: Config, seed: int, tag: str) -> dict:
        from mscn.train.eval.common import watched
        from mscn.train.eval.pretrained import load_pretrained
        from mscn.train.eval.standard import linear_and_knn
        from mscn.train.pretrain import run_pretrain

        # resumes a run cut short, skips a finished one. A folder left by another config (an
        # earlier recipe, or an mscn that lacked a key) cannot be resumed and is not this
        # arm's run: start over as ``--resume none`` does, which moves its files into
        # ``superseded-<time>/`` there (nothing is deleted)
        resume = "auto"
        note = lock_run_dir(cfg.train.out_dir)  # a live run's folder stops here, before any message
        if note:
            self.say(f"{tag}: note: {note}")
        try:
            check_run_dir(cfg, resume)
        except MscnError as e:
            self.say(f"{tag}: {str(e).split(';')[0]}; its files go to superseded-<time>/ there, starting over")
            resume = "none"
        summary = run_pretrain(cfg, resume=resume)
        end = min(summary["total_steps"], cfg.train.max_steps or summary["total_steps"])
        if summary["step"] > end:  # the folder's run went further (train.max_steps was higher): not this arm's
            self.say(f"{tag}: its run is at step {summary['step']}, past this ablation's last step ({end}); its "
                     "files go to superseded-<time>/ there, starting over")
            summary = run_pretrain(cfg, resume="none")
        ckpt = summary.get("final") or summary.get("checkpoint")
        if not ckpt or not Path(ckpt).is_file():
            raise MscnError(f"pretraining left no checkpoint in {cfg.train.out_dir}; delete that folder and rerun")
        backbone = load_pretrained(ckpt)[0]
        # an epoch line per probe epoch (100 in the demo) would bury the one [ablate] line per run
        rt = self.runtime(cfg)
        with watched(cfg, rt, Path(cfg.train.out_dir) / "stalls"):
            # scored with this ablation's evaluation settings, not those saved with the weights: a
            # rerun with other eval.* (neutral to the pretraining it resumes) must score with them
            res = linear_and_knn(backbone, cfg, self.train_root, self.val_root, rt, seed=seed, log_epochs=False)
        res["pretrain"] = {k: summary.get(k) for k in ("step", "loss", "images_per_s")}
        return res

    def _random(self, cfg: Config, seed: int) -> dict:
        from mscn.train.eval.common import watched
        from mscn.train.eval.standard import linear_and_knn, random_backbone

        rt = self.runtime(cfg)
        with watched(cfg, rt, Path(cfg.train.out_dir) / "stalls"):
            return linear_and_knn(random_backbone(cfg.model.arch, seed), cfg, self.train_root, self.val_root, rt,
                                  seed=seed, log_epochs=False)
