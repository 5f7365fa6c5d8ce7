#!/usr/bin/env python3
"""The headline GPU figures of one ``gpu_check.sh`` run, against their targets, as one JSON.

    python scripts/gpu_summary.py RESULTS_DIR [--out gpu_summary.json]

Reads what ``gpu_check.sh`` left in RESULTS_DIR: ``bench.json`` (stages and baselines of
``bench_pipeline.py``), ``memory.json`` (the full pipeline alone in a fresh process),
``masks.json`` (``bench_masks.py``), ``train_r50.json`` / ``train_r18.json``
(``bench_pipeline.py --train``), with the ``--profile`` summaries they hold, and
``host_ceiling.json`` (the pipelines on tiny images: :func:`host_ceiling`). Missing
inputs leave their figures null. Prints one
line per figure with its target and writes the summary (figures, card, commands and
versions) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchkit import profiling  # beside this script, as for bench_pipeline.py
from benchkit.report import DEVICE_SYNC_ROW

# figure: (target, "min" = at least / "max" = at most, what it is)
TARGETS = {
    "share_of_decode": (0.85, "min", "full pipeline (views + high-pass + masks, as torch tensors) / decode-only"),
    "plain_dali_share_of_decode": (None, None, "DALI written plainly (views + high-pass, no masks) / decode-only"),
    "kept_resnet50": (0.97, "min", "ResNet-50 SimCLR bf16 step, pipeline-fed / synthetic"),
    "kept_resnet18": (0.90, "min", "ResNet-18 SimCLR bf16 step, pipeline-fed / synthetic"),
    "apply_masks_ms": (0.6, "max", "apply_masks (tables + fill), 4 x 256 x 3 x 224^2 fp32, ms"),
    "pipeline_gib": (3.0, "max", "device memory the full pipeline adds, batch 256, prefetch 2, GiB"),
    "torchvision_ratio": (None, None, "mscn / torchvision+PIL DataLoader, images/s"),
}


def _load(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _train_kept(r: dict | None) -> tuple[float | None, float | None]:
    """(kept by the full pipeline, best kept among its full-pipeline rows, e.g. high-priority stream)."""
    if not r or "train" not in r:
        return None, None
    feeds = r["train"]["feeds"]
    # every full-pipeline row but the one timed by the earlier method (bench --device-sync-row)
    full = [m["kept"] for k, m in feeds.items() if k.startswith("masks") and k != DEVICE_SYNC_ROW]
    return r["train"].get("kept"), max(full) if full else None


def summarize(results: Path, stages_from: Path | None = None) -> dict:
    bench, memory = _load(results / "bench.json"), _load(results / "memory.json")
    later = _load(stages_from) if stages_from else None
    masks, r50, r18 = _load(results / "masks.json"), _load(results / "train_r50.json"), _load(results / "train_r18.json")
    s: dict = {"schema": 1}
    first = next((r for r in (bench, memory, r50, r18) if r), None)
    env = first["env"] if first else {}
    s["card"] = env.get("gpu_name")
    s["versions"] = {k: env.get(k) for k in ("dali", "torch", "triton", "cuda", "python")}
    s["cores"] = env.get("usable_cores")
    s["commands"] = [r["env"]["command"] for r in (bench, memory, r50, r18) if r]
    s["share_of_decode"] = bench.get("share_of_decode") if bench else None
    if later:  # the pipeline re-timed after a change, minutes later on the same machine
        s["share_of_decode"] = later.get("share_of_decode")
        s["stages_from"] = {"file": stages_from.name, "command": later["env"]["command"],
                            "images_per_s": {k: m["images_per_s"]["median"] for k, m in later["stages"].items()}}
        s["commands"].append(later["env"]["command"])
    base = (bench or {}).get("baselines", {})
    s["plain_dali_share_of_decode"] = base.get("dali-plain", {}).get("share_of_decode")
    s["torchvision_ratio"] = base.get("torchvision", {}).get("mscn_over_baseline")
    s["kept_resnet50"], s["kept_resnet50_best"] = _train_kept(r50)
    s["kept_resnet18"], s["kept_resnet18_best"] = _train_kept(r18)
    ms = masks[0]["ms"] if isinstance(masks, list) and masks else {}
    s["apply_masks_ms"] = ms.get("apply_masks triton in place")
    s["mask_tables_ms"] = ms.get("tables, Triton kernel (draw_tables)")
    pipe = (memory or {}).get("stages", {}).get("masks", {})
    added = pipe.get("device_bytes_added")
    s["pipeline_gib"] = round(added / 2**30, 3) if added is not None else None
    s["device_gib_in_use"] = round(pipe["gpu_memory"]["device_used_bytes"] / 2**30, 3) if pipe.get("gpu_memory") else None
    # the LARS A/B (gpu_check.sh part 3): the step alone, and ResNet-18 kept with the old loop
    opt = _load(results / "optimizer.json")
    if opt:
        s["lars_step_ms"] = {r["arch"]: {"multi_tensor": r["multi_tensor_ms"], "loop": r["loop_ms"]} for r in opt["rows"]}
    s["kept_resnet18_lars_loop"] = _train_kept(_load(results / "train_r18_lars_loop.json"))[0]
    # the masks feed timed again in the same process as rounds 1-3 did (bench --device-sync-row):
    # windows of 4 steps ending on a device-wide sync; the JSON of earlier runs has no "sync"
    # because they all synced device-wide
    r18_train = (r18 or {}).get("train", {})
    s["kept_resnet18_device_sync"] = (r18_train.get("feeds", {}).get(DEVICE_SYNC_ROW) or {}).get("kept")
    s["kept_resnet18_window_steps"] = r18_train.get("window_steps")  # the default row's
    # None on the CPU, absent from the files of rounds 1-3
    s["sync"] = ((r18 or r50 or bench or memory or {}).get("settings") or {}).get("sync", "device" if first else None)
    # ResNet-18 and -50 under torch.compile (train.compile=true): kept, and the fed and synthetic rates
    for arch, (_, name) in COMPILED.items():
        comp = (_load(results / name) or {}).get("train", {})
        s[f"kept_{arch}_compiled"] = comp.get("kept")
        if comp:
            s[f"{arch}_compiled_images_per_s"] = {
                "synthetic": comp["synthetic"]["images_per_s"]["median"],
                "fed": comp["feeds"]["masks"]["images_per_s"]["median"] if "masks" in comp["feeds"] else None}
    s["profiles"] = profiles(results)
    # where the feed waits: probe_syncs.py's probes, and the host time per step of each
    # ResNet-18 row (taking the batch, queueing the step); absent before round 5
    probe = _load(results / "probe_syncs.json")
    if probe:
        s["sync_probes"] = {p["probe"]: {k: p[k] for k in ("host_ms", "queued_ms", "stream_wait_ms", "verdict") if k in p}
                            for p in probe["probes"]}
    host = {feed: m["host_ms_per_step"] for feed, m in
            (("synthetic", r18_train.get("synthetic", {})), *r18_train.get("feeds", {}).items())
            if m.get("host_ms_per_step")}
    if host:
        s["host_ms_per_step_resnet18"] = host
    if bench:
        st = bench["settings"]
        # blur_where / compile: where the default blurred and whether --train compiled (round 5 on)
        s["settings"] = {k: st.get(k) for k in ("batch", "threads", "hw_decoder_load", "views", "size", "output_dtype",
                                                "blur_where", "compile")}
        s["images_per_s"] = {k: m["images_per_s"]["median"] for k, m in bench["stages"].items()}
        s["images_per_s"].update({f"baseline {k}": m["images_per_s"]["median"] for k, m in base.items()})
    ceiling = host_ceiling(bench, _load(results / "host_ceiling.json"))
    if ceiling:
        s["host_ceiling"] = ceiling
    # a bench that failed or was stopped keeps the rows it timed, marked (bench_pipeline.py)
    stopped = {f.name: doc["incomplete"] for f in sorted(results.glob("*.json"))
               if isinstance(doc := _load(f), dict) and isinstance(doc.get("incomplete"), str)}  # not this summary's own
    if stopped:
        s["incomplete"] = stopped
    return s


def _rates(doc: dict) -> dict[str, float]:
    """Median images/s of every row of a bench_pipeline.py JSON: its stages and baselines."""
    rows = {k: m["images_per_s"]["median"] for k, m in doc.get("stages", {}).items()}
    rows.update({k: m["images_per_s"]["median"] for k, m in doc.get("baselines", {}).items()})
    return rows


def host_ceiling(bench: dict | None, tiny: dict | None) -> dict:
    """Each pipeline's rate against its rate on tiny images (gpu_check.sh's ``host-ceiling``
    step: 32 px views of 48x36 JPEGs, same batch and graph). There the pixels cost next to
    nothing and what is left is per batch and per sample: DALI's operators' setup and
    argument draws on its CPU threads, the kernel launches, the loader's Python. So the
    tiny rate is the ceiling the host allows; a row near 100 % of it is host-bound (fewer
    operators, draws or launches is the fix), one far below is bound by the pixel work.
    Rows in both files only; {} where either is missing or the tiny run is not smaller."""
    if not bench or not tiny:
        return {}
    size, tiny_size = (d.get("settings", {}).get("size") for d in (bench, tiny))
    if not size or not tiny_size or tiny_size >= size:
        return {}
    full, low = _rates(bench), _rates(tiny)
    return {k: {"images_per_s": full[k], "ceiling_images_per_s": low[k], "size": size, "ceiling_size": tiny_size,
                "of_ceiling": round(full[k] / low[k], 4) if low[k] else None}
            for k in full if k in low}


def profiles(results: Path) -> dict:
    """The ``--profile`` summaries of the run (bench_pipeline.py, benchkit/profiling.py), by
    where they were taken: the pipeline alone, and each trainer row that was profiled."""
    out = {}
    bench = _load(results / "bench.json") or {}
    for stage, m in bench.get("stages", {}).items():
        if "profile" in m:
            out[f"pipeline {stage}"] = m["profile"]
    for name in ("train_r18.json", "train_r50.json"):
        t = (_load(results / name) or {}).get("train", {})
        rows = {"synthetic": t.get("synthetic", {}), **t.get("feeds", {})}
        for feed, m in rows.items():
            if "profile" in m:
                out[f"{t['arch']} fed by {feed}"] = m["profile"]
    return out


# The A/B rows of gpu_check.sh part 3: (variant, what switching to it means). The default is
# the "masks" row (or the multi-tensor LARS step, or the eager model).
PIPELINE_AB = {
    "masks-hp-loader": "make highpass.where=loader the GPU default",
    "masks-blur-loader": "make data.blur_where=auto mean loader on the CPU path too (on a GPU this row is the default)",
    "masks-blur-dali": "make data.blur_where=auto mean pipeline on the GPU again (Config.blur_where_on)",
    "masks-hp-late": "set pipelines/ops.py HIGHPASS_FIRST = False",
    "masks-crop-window": "set data.crop=window by default",
    "masks-thread": "make data.feed_thread=true the default on the GPU path",
    "masks-hold": "make the training loader hold DALI's outputs 2 batches (DaliLoader.hold) by default",
    "masks-concurrent": "make auto mean op_concurrency=full, stream_policy=per_operator on the GPU path (tuning.executor)",
    "masks-colour-loader": "make data.colour_where=loader the GPU default (an auto like data.blur_where's)",
    "masks-private": "make data.handover=private the default on the GPU path",
}

# Variants that change the filters' order or place *in DALI* are read against the pipeline
# that blurs in DALI (masks-blur-dali) where the default blurs in the loader (the GPU path
# since round 5): against "masks" they would also measure the blur's move.
DALI_BLUR_VARIANTS = ("masks-hp-late", "masks-hp-loader")


# variants that build the default's own graph when the default blurs there: no A/B
SAME_GRAPH = {"loader": "masks-blur-loader", "pipeline": "masks-blur-dali"}


def _base(variant: str, rows: dict, blur_where: str | None) -> str | None:
    """The row a variant is judged against, or None when the run lacks it or the variant is
    the default itself (then a noise-level "better" would name a switch that changes nothing)."""
    if SAME_GRAPH.get(blur_where) == variant:
        return None
    if variant in DALI_BLUR_VARIANTS and blur_where == "loader":
        return "masks-blur-dali" if "masks-blur-dali" in rows else None
    if variant == "masks-colour-loader" and blur_where != "loader":
        # it moves the blur too: against the blur moved alone, so that it measures the colour's move
        return "masks-blur-loader" if "masks-blur-loader" in rows else None
    return "masks" if "masks" in rows else None


# torch.compile rows (gpu_check.sh part 3) against the eager train_r18/r50.json, per backbone:
# the recipes train ResNet-50, so only its verdict speaks for them
COMPILED = {"resnet18": ("train_r18.json", "train_r18_compile.json"),
            "resnet50": ("train_r50.json", "train_r50_compile.json")}  # arch: (eager, compiled)
COMPILE_SWITCH = {"resnet18": "set train.compile=true for GPU ResNet-18 runs (docs/TRAINING.md)",
                  "resnet50": "set train.compile=true in the GPU recipes (simclr/byol_r50_in1k.yaml)"}


def _spread(m: dict) -> tuple[float, float, float]:
    """(median, low, high) images/s of a bench row: its interquartile range."""
    r = m["images_per_s"]
    return r["median"], r["q1"], r["q3"]


def _call(a: tuple[float, float, float], b: tuple[float, float, float]) -> str:
    """B against A: "better" / "worse" when their ranges do not overlap, else "inside the spread"."""
    if b[1] > a[2]:
        return "better"
    if b[2] < a[1]:
        return "worse"
    return "inside the spread"


def decisions(results: Path) -> list[dict]:
    """Every A/B of the run with its size and a verdict: the variant is "better" or "worse"
    only when the two rows' ranges (interquartile, or min-max over isolated rounds) do not
    overlap. What a "better" would switch is named; nothing is switched here."""
    out = []

    def add(what: str, variant: str, a: tuple, b: tuple, switch: str, base: str = "masks"):
        call = _call(a, b)  # (median, low, high) of the default and the variant; higher is better
        out.append({"what": what, "variant": variant, "base": base, "default": round(a[0], 4),
                    "value": round(b[0], 4), "change": round(b[0] / a[0] - 1, 4) if a[0] else None,
                    "verdict": call, "switch": switch if call == "better" else None})

    def blur_where(doc) -> str | None:  # where the run's default blurred; files before round 5: in DALI
        return ((doc or {}).get("settings") or {}).get("blur_where", "pipeline")

    bench = _load(results / "bench.json")
    stages = (bench or {}).get("stages", {})
    for v, switch in PIPELINE_AB.items():
        base = _base(v, stages, blur_where(bench))
        if v in stages and base:
            add("pipeline images/s (one process)", v, _spread(stages[base]), _spread(stages[v]), switch, base)
    iso_doc = _load(results / "ab_isolated.json")
    iso = (iso_doc or {}).get("isolated", {})

    def rng(st):
        m = iso[st]["medians"]
        return iso[st]["mean"], min(m), max(m)

    for v, switch in PIPELINE_AB.items():
        base = _base(v, iso, blur_where(iso_doc))
        if v in iso and base:
            add("pipeline images/s (isolated rounds)", v, rng(base), rng(v), switch, base)
    for name in ("train_r18.json", "train_r50.json"):
        doc = _load(results / name)
        t = (doc or {}).get("train", {})
        feeds = t.get("feeds", {})
        for v, switch in PIPELINE_AB.items():
            base = _base(v, feeds, blur_where(doc))
            if v in feeds and base:
                add(f"{t['arch']} trainer images/s, pipeline-fed", v, _spread(feeds[base]), _spread(feeds[v]),
                    switch, base)
    loop = (_load(results / "train_r18_lars_loop.json") or {}).get("train", {}).get("feeds", {})
    r18 = (_load(results / "train_r18.json") or {}).get("train", {}).get("feeds", {})
    if "masks" in loop and "masks" in r18:  # here the *default* is the new step: "better" = the loop wins
        add("resnet18 trainer images/s, pipeline-fed", "LARS per-parameter loop", _spread(r18["masks"]),
            _spread(loop["masks"]), "set optim.foreach=false by default")
    for arch, (eager_name, name) in COMPILED.items():  # what counts is the fed rate: compile speeds both rows
        eager = (_load(results / eager_name) or {}).get("train", {}).get("feeds", {})
        comp = (_load(results / name) or {}).get("train", {}).get("feeds", {})
        if "masks" in comp and "masks" in eager:
            add(f"{arch} trainer images/s, pipeline-fed", "train.compile=true", _spread(eager["masks"]),
                _spread(comp["masks"]), COMPILE_SWITCH[arch])
    return out


def verdict(key: str, value) -> str:
    target, kind, _ = TARGETS[key]
    if value is None:
        return "not measured"
    if target is None:
        return ""
    met = value >= target if kind == "min" else value <= target
    return f"{'met' if met else 'NOT met'} (target {'>=' if kind == 'min' else '<='} {target})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="folder with gpu_check.sh's JSON files")
    ap.add_argument("--out", help="where to write the summary (default RESULTS/gpu_summary.json)")
    ap.add_argument("--stages-from", help="a later bench_pipeline.py JSON (decode + masks stages) of the same "
                                          "machine whose share of decode-only replaces bench.json's")
    ap.add_argument("--note", help="a sentence to keep with the figures (e.g. what changed between runs)")
    a = ap.parse_args(argv)
    s = summarize(Path(a.results), Path(a.stages_from) if a.stages_from else None)
    if a.note:
        s["note"] = a.note
    s["decisions"] = decisions(Path(a.results))
    out = Path(a.out) if a.out else Path(a.results) / "gpu_summary.json"
    out.write_text(json.dumps(s, indent=1))
    print(f"SUMMARY card: {s['card']} ({s['cores']} cores), DALI {s['versions'].get('dali')}, "
          f"torch {s['versions'].get('torch')}")
    for key, (_, _, what) in TARGETS.items():
        print(f"SUMMARY {key} = {s[key]}: {what} {verdict(key, s[key])}")
    if s["kept_resnet18_device_sync"] is not None:
        print(f"SUMMARY kept_resnet18_device_sync = {s['kept_resnet18_device_sync']}: the masks feed timed as in "
              f"rounds 1-3 (windows of 4 steps, device-wide sync), same process, against kept_resnet18 = "
              f"{s['kept_resnet18']} (windows of {s['kept_resnet18_window_steps']} steps, {s['sync']} sync)")
    for d in s["decisions"]:
        change = f"{100 * d['change']:+.1f} %" if d["change"] is not None else "n/a"
        base = "default" if d.get("base", "masks") == "masks" else d["base"]
        print(f"DECIDE {d['what']}: {d['variant']} {d['value']} vs {base} {d['default']} ({change}): "
              f"{d['verdict']}" + (f" -> {d['switch']}" if d["switch"] else ""))
    for where, p in s["profiles"].items():  # the bench's own PROFILE line for each
        print(profiling.format_summary(where, p)[0])
    for row, c in s.get("host_ceiling", {}).items():
        share = f"{100 * c['of_ceiling']:.0f} %" if c["of_ceiling"] is not None else "n/a"
        print(f"CEILING {row}: {c['images_per_s']:.0f} images/s = {share} of its {c['ceiling_images_per_s']:.0f} "
              f"on tiny images ({c['ceiling_size']} px views, not {c['size']}): the rate the host allows")
    for feed, h in s.get("host_ms_per_step_resnet18", {}).items():
        print(f"HOST resnet18 fed by {feed}: " + ", ".join(f"{k} {v} ms" for k, v in h.items()) + " per step")
    for name, why in s.get("incomplete", {}).items():
        print(f"INCOMPLETE {name}: the run stopped ({why}); its figures are the rows timed before")
    print(f"summary written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
