"""The ablation's outputs (paper §6.3 Fig. 5, done with seeds and error bars):
``ablation.json`` (one record per arm, the pairs within each grid and every arm against
random init), ``ablation.md`` (mean ± std and the difference to the baseline arm, then every
pair of arms within a grid and every arm against random init, each with a significance
mark) and ``ablation.png`` (one panel per swept parameter).

Significance rule: the difference of two arm means is "not significant" when it lies within
2 standard errors of the difference, SE = sqrt(s1²/n1 + s2²/n2) (s: sample standard
deviation, n: seeds). With fewer than 2 seeds on either side there is no error bar, and the
table says so ("n=1, no error bar").
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from mscn.train.ablate.arms import BASELINE, Arm

METRICS = ("linear_top1", "knn_top1")
SCHEMA = 1


def summary(values: list[float]) -> dict:
    """``{"mean", "std", "n"}``; std is the sample std (n-1), None for one value."""
    n = len(values)
    return {"mean": statistics.fmean(values) if n else None,
            "std": statistics.stdev(values) if n >= 2 else None, "n": n}


def significance(a: dict, b: dict) -> str:
    """Compare two :func:`summary` records: "significant", "not significant" (|diff| <= 2 SE),
    or "n=1, no error bar" when either has fewer than 2 values."""
    if a["n"] < 2 or b["n"] < 2:
        return "n=1, no error bar"
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    return "significant" if abs(a["mean"] - b["mean"]) > 2 * se else "not significant"


def records(arms: list[Arm], results: dict, random: dict, seeds: list[int]) -> dict:
    """The ``ablation.json`` document."""
    out = []
    for a in arms:
        runs = [results[a.name][s] for s in seeds]
        rec = {"name": a.name, "grid": a.grid, "param": a.param, "value": a.value, "overrides": list(a.overrides),
               "seeds": seeds, "same_as": next((r["same_as"] for r in runs if r.get("same_as")), None)}
        for m in METRICS:
            vals = [r[m] for r in runs]
            s = summary(vals)
            rec[m] = vals
            rec.update({f"{m}_mean": s["mean"], f"{m}_std": s["std"]})
        rec["n"] = len(seeds)
        out.append(rec)
    rnd = [{"seed": s, **{m: random[s][m] for m in METRICS}} for s in seeds]
    doc = {"schema": SCHEMA, "baseline": BASELINE, "seeds": seeds, "arms": out, "random_init": rnd}
    doc["pairs"], doc["vs_random_init"] = pairs(doc), vs_random(doc)
    return doc


def _diff(a: dict, b: dict) -> dict:
    """b − a on both metrics, each with its :func:`significance`."""
    out = {}
    for m in METRICS:
        sa, sb = _stat(a, m), _stat(b, m)
        out[m] = {"diff": sb["mean"] - sa["mean"], "significance": significance(sa, sb)}
    return out


def pairs(doc: dict) -> list[dict]:
    """Every pair of arms within a grid, in grid order: ``b − a`` with its significance.

    The questions of a grid are differences between its arms (is a ratio of 0.15 better than
    0.5?), which the baseline column does not answer: two arms can both differ from the
    baseline and not from each other."""
    by_grid: dict[str, list[dict]] = {}
    for r in doc["arms"]:
        if r["name"] != doc["baseline"]:
            by_grid.setdefault(r["grid"], []).append(r)
    return [{"grid": grid, "a": a["name"], "b": b["name"], **_diff(a, b)}
            for grid, rows in by_grid.items() for i, a in enumerate(rows) for b in rows[i + 1:]]


def _random_record(doc: dict) -> dict:
    rnd = {m: summary([x[m] for x in doc["random_init"]]) for m in METRICS}
    return {"n": len(doc["random_init"]),
            **{f"{m}_{k}": rnd[m][k] for m in METRICS for k in ("mean", "std")}}


def vs_random(doc: dict) -> list[dict]:
    """Every arm against the random-init encoder of the same seeds: what pretraining bought."""
    rnd = _random_record(doc)
    return [{"arm": r["name"], **_diff(rnd, r)} for r in doc["arms"]]


def _stat(rec: dict, m: str) -> dict:
    return {"mean": rec[f"{m}_mean"], "std": rec[f"{m}_std"], "n": rec["n"]}


def _pm(s: dict) -> str:
    return f"{s['mean']:.1f}" + (f" ± {s['std']:.1f}" if s["std"] is not None else "")


def markdown(doc: dict) -> str:
    """Mean ± std per arm and the difference to the baseline arm, then the pairs within each
    grid and every arm against random init (``doc["pairs"]``, ``doc["vs_random_init"]``)."""
    base = next(r for r in doc["arms"] if r["name"] == doc["baseline"])
    lines = ["| arm | grid | n | linear top-1 | Δ linear vs baseline | kNN top-1 | Δ kNN vs baseline |",
             "| --- | --- | ---: | ---: | --- | ---: | --- |"]
    for r in doc["arms"]:
        cells = [f"`{r['name']}`", r["grid"], str(r["n"])]
        for m in METRICS:
            s, b = _stat(r, m), _stat(base, m)
            cells.append(_pm(s))
            cells.append("—" if r is base else f"{s['mean'] - b['mean']:+.1f} ({significance(s, b)})")
        lines.append("| " + " | ".join(cells) + " |")
    rl = [x["linear_top1"] for x in doc["random_init"]]
    rk = [x["knn_top1"] for x in doc["random_init"]]
    lines.append(f"| random init | — | {len(rl)} | {_pm(summary(rl))} | — | {_pm(summary(rk))} | — |")
    notes = ["", f"Seeds {doc['seeds']}. Baseline: `{doc['baseline']}` (no masks, no high-pass, same views "
             "and budget). A difference is \"not significant\" when it lies within 2 standard errors, "
             "SE = sqrt(s1²/n1 + s2²/n2); with one seed there is no error bar."]
    cell = lambda d, m: f"{d[m]['diff']:+.1f} ({d[m]['significance']})"  # noqa: E731
    grid_pairs = doc["pairs"]  # records() adds them; --report-only adds them to an older file
    if grid_pairs:
        notes += ["", "Within each grid, every pair of arms (Δ = second − first, same rule):", "",
                  "| grid | arms | Δ linear | Δ kNN |", "| --- | --- | --- | --- |"]
        notes += [f"| {p['grid']} | `{p['a']}` → `{p['b']}` | {cell(p, 'linear_top1')} | {cell(p, 'knn_top1')} |"
                  for p in grid_pairs]
    notes += ["", "Against the random-init encoder of the same seeds (what pretraining bought):", "",
              "| arm | Δ linear | Δ kNN |", "| --- | --- | --- |"]
    notes += [f"| `{v['arm']}` | {cell(v, 'linear_top1')} | {cell(v, 'knn_top1')} |" for v in doc["vs_random_init"]]
    shared = [f"`{r['name']}` = `{r['same_as']}`" for r in doc["arms"] if r.get("same_as")]
    if shared:
        notes += ["", "Same resolved config, run once: " + ", ".join(shared) + "."]
    notes += ["", "Overrides per arm:", ""]
    notes += [f"- `{r['name']}`: " + (" ".join(f"`{o}`" for o in r["overrides"]) or "(the recipe)")
              for r in doc["arms"]]
    return "\n".join(lines + notes) + "\n"


def figure(doc: dict, path: Path) -> str | None:
    """Fig. 5-style plot: one panel per swept parameter, mean linear top-1 with ±std bars, the
    baseline and random init as horizontal lines. Returns why it was skipped, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on servers and CI
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'mscn[plots]'): ablation.png not written"
    panels: dict[str, list[dict]] = {}
    for r in doc["arms"]:
        if r["name"] != doc["baseline"]:
            panels.setdefault(r["param"] or r["grid"], []).append(r)
    if not panels:
        return "only the baseline arm ran: nothing to plot"
    base = next(r for r in doc["arms"] if r["name"] == doc["baseline"])
    rnd = statistics.fmean(x["linear_top1"] for x in doc["random_init"])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (param, rows) in zip(axes[0], panels.items()):
        numeric = all(isinstance(r["value"], (int, float)) for r in rows)
        xs = [r["value"] for r in rows] if numeric else list(range(len(rows)))
        ys = [r["linear_top1_mean"] for r in rows]
        err = [r["linear_top1_std"] or 0.0 for r in rows]
        # categorical arms (e.g. masks / high-pass) get no connecting line: their order means nothing
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, ls="-" if numeric else "none", label="arm (mean ± std)")
        if not numeric:
            ax.set_xticks(xs, [str(r["value"]) for r in rows], rotation=20, fontsize=8)
        ax.axhline(base["linear_top1_mean"], color="gray", ls="--", label="baseline (no masks, no high-pass)")
        ax.axhline(rnd, color="gray", ls=":", label="random init")
        ax.set_title(param)
        ax.set_ylabel("linear top-1 (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
