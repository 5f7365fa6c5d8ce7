"""Result files of the evaluations and the paper-style tables built from them.

Every evaluation writes ``<out>/result.json`` (top-1/top-5 and every setting needed to
reproduce it), ``<out>/result.md`` (its one-row table) and appends one line to a
results CSV shared by all runs (default ``<out>/../results.csv``). ``mscn eval report``
merges result JSONs into one Markdown table laid out like the paper's Tables 1 and 3:
one row per model, one column per protocol, a "Label fraction" row, and optional
``(+x.x)`` deltas against a baseline row.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

from mscn.config import Config
from mscn.errors import MscnError

CSV_FIELDS = ("time", "name", "protocol", "dataset", "label_fraction", "arch", "top1", "top5",
              "epochs", "ckpt", "out")
TITLES = {"linear": "Linear Evaluation", "finetune": "Finetuning", "knn": "kNN"}


def model_name(ckpt: str, cfg: Config) -> str:
    """Row label in the paper's style: ``SimCLR``, ``SimCLR+MSCN``, ``BYOL+MSCN``, ``random init``."""
    if ckpt == "random":
        return "random init"
    base = {"simclr": "SimCLR", "byol": "BYOL"}.get(cfg.method.name, cfg.method.name)
    masked = any(v.mask.ratio > 0 for v in cfg.views)
    return f"{base}+MSCN" if masked and cfg.highpass.enabled else base


def column_key(result: dict) -> tuple[str, str]:
    """(column title, label-fraction cell) of one result."""
    proto = result["protocol"]
    title = f"Transfer {result.get('dataset', '')}".strip() if proto == "transfer" else TITLES.get(proto, proto)
    return title, f"{100 * float(result.get('label_fraction', 1.0)):g}%"


def write_result(result: dict, out_dir: str | Path, table: str | Path | None = None) -> dict[str, str]:
    """Write result.json + result.md into ``out_dir`` and append a line to the CSV ``table``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **result, "out": str(out)}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "result.md").write_text(markdown_table([result]))
    table = Path(table) if table else out.parent / "results.csv"
    table.parent.mkdir(parents=True, exist_ok=True)
    new = not table.exists() or table.stat().st_size == 0
    with open(table, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: _fmt_csv(result.get(k, "")) for k in CSV_FIELDS})
    return {"json": str(out / "result.json"), "md": str(out / "result.md"), "csv": str(table)}


def _fmt_csv(v):
    return f"{v:.2f}" if isinstance(v, float) else v


def load_results(paths: list[str]) -> list[dict]:
    """Result dicts from JSON files and/or folders searched recursively for result.json."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("result.json"))
            if not found:
                raise MscnError(f"{p}: no result.json below this folder (run an mscn eval command first)")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise MscnError(f"{p}: no such result file or folder")
    results = []
    for f in files:
        try:
            r = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MscnError(f"{f}: not a JSON file") from None
        if not isinstance(r, dict) or not {"protocol", "name", "top1"} <= r.keys():
            raise MscnError(f"{f}: not an mscn result (needs protocol, name, top1)")
        results.append(r | {"_file": str(f)})
    return results


def markdown_table(results: list[dict], metric: str = "top1", baseline: str | None = None) -> str:
    """Paper-style Markdown table: rows = models, columns = protocols (top-1 by default)."""
    if metric not in ("top1", "top5"):
        raise MscnError(f"--metric {metric}: must be top1 or top5")
    columns: list[tuple[str, str]] = []
    rows: dict[str, dict] = {}
    for r in sorted(results, key=lambda r: r.get("time", "")):
        key = column_key(r)
        if key not in columns:
            columns.append(key)
        cell = rows.setdefault(r["name"], {})
        if key in cell:
            print(f"mscn: note: {r['name']} / {key[0]}: {r.get('_file', '')} replaces an older result",
                  file=sys.stderr)
        cell[key] = float(r[metric])
    if baseline is not None and baseline not in rows:
        raise MscnError(f"--baseline {baseline!r}: no such row (rows: {', '.join(rows)})")
    lines = ["| Method | " + " | ".join(c[0] for c in columns) + " |",
             "| --- |" + " --- |" * len(columns),
             "| Label fraction | " + " | ".join(c[1] for c in columns) + " |"]
    for name, cells in rows.items():
        out = []
        for c in columns:
            if c not in cells:
                out.append("–")
                continue
            s = f"{cells[c]:.1f}"
            base = rows[baseline].get(c) if baseline is not None and name != baseline else None
            if base is not None:
                s += f" ({cells[c] - base:+.1f})"
            out.append(s)
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"
