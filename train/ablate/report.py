"""The ablation's outputs (paper §6.3 Fig. 5, done with seeds and error bars):
``ablation.json`` (one record per arm, the pairs within each grid and every arm against
random init), ``ablation.md`` (mean ± std and the difference to the baseline arm, then every
pair of arms within a grid and every arm against random init, each with a significance
mark) and ``ablation.png`` (one panel per swept parameter).

Significance rule: Welch's two-sided t-test at the 5 % level. The difference of two arm
means over SE = sqrt(s1²/n1 + s2²/n2) (s: sample standard deviation, n: seeds) is set against
Student's t with the Welch-Satterthwaite degrees of freedom; "significant" when p < 0.05.
With 2-3 seeds that asks for a difference of several SE (df = 2: 4.3 SE), not the 2 SE of a
normal approximation, which called differences significant that three seeds cannot show.
With fewer than 2 seeds on either side there is no error bar, and the table says so
("n=1, no error bar").
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


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (a continued fraction, modified
    Lentz; Numerical Recipes §6.4): Student's t tail without scipy, which mscn does not need."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side only
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def welch_p(a: dict, b: dict) -> float | None:
    """Two-sided p-value of Welch's t-test between two :func:`summary` records; None with
    fewer than 2 values on either side."""
    if a["n"] < 2 or b["n"] < 2:
        return None
    va, vb = a["std"] ** 2 / a["n"], b["std"] ** 2 / b["n"]
    diff = abs(a["mean"] - b["mean"])
    if va + vb == 0.0:  # no spread at all: any difference is beyond chance, none is none
        return 0.0 if diff > 0 else 1.0
    df = (va + vb) ** 2 / (va ** 2 / (a["n"] - 1) + vb ** 2 / (b["n"] - 1))
    t2 = diff ** 2 / (va + vb)
    return _betainc(df / 2.0, 0.5, df / (df + t2))


def significance(a: dict, b: dict) -> str:
    """Compare two :func:`summary` records: "significant" (Welch's t-test, p < 0.05), "not
    significant", or "n=1, no error bar" when either has fewer than 2 values."""
    p = welch_p(a, b)
    if p is None:
        return "n=1, no error bar"
    return "significant" if p < 0.05 else "not significant"


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
        p = welch_p(sa, sb)
        out[m] = {"diff": sb["mean"] - sa["mean"], "significance": significance(sa, sb),
                  "p": None if p is None else round(p, 4)}
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
             "and budget). A difference is \"significant\" when Welch's two-sided t-test gives p < 0.05 "
             "(t = Δ / sqrt(s1²/n1 + s2²/n2), Welch-Satterthwaite degrees of freedom: with 3 seeds a "
             "difference must exceed about 3-4 of those SE); with one seed there is no error bar."]
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
