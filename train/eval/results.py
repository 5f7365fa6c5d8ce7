"""Result files of the evaluations and the paper-style tables built from them.

Every evaluation writes ``<out>/result.json`` (top-1/top-5 and every setting needed to
reproduce it), ``<out>/result.md`` (its one-row table) and appends one line to a
results CSV shared by all runs (default ``<out>/../results.csv``). ``mscn eval report``
merges result JSONs into one Markdown table laid out like the paper's Tables 1 and 3:
one row per model, one column per protocol, a "Label fraction" row, and optional
``(+x.x)`` deltas against a baseline row.

A result is keyed by its model name, protocol and settings (checkpoint, epochs, seed,
data roots and every entry of ``settings`` such as lr and batch): a newer result
replaces an older one only when all of these match. Results of one model and column
that differ in some setting are all shown, one row each, labelled with the settings
that differ (``SimCLR (epochs=10)``, ``SimCLR (epochs=100)``). Means over
``--seeds N`` show as ``mean ± std``.
"""
from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
from pathlib import Path

from mscn.config import Config
from mscn.errors import MscnError
from mscn.paths import not_creatable

CSV_FIELDS = ("time", "name", "protocol", "dataset", "label_fraction", "arch", "top1", "top5",
              "epochs", "seed", "ckpt", "out")
# plus every entry of "settings". "ckpt": the weights scored (ckpt_file, else the --ckpt given:
# random, or a result from before ckpt_file); "ckpt_step": a run directory scored at two steps
# (still training, then finished) gives two rows; "config", "arch" and "overrides": a random init
# of another recipe, or the same weights evaluated under other settings, are other rows
KEY_FIELDS = ("ckpt", "ckpt_step", "weights", "config", "arch", "overrides", "epochs", "seed", "seeds", "train_root",
              "val_root", "train_data", "val_data")
# digests of what was scored (mscn.train.eval.provenance): keys, but shown in a row's label only
# when the other settings do not tell its rows apart (a run retrained into the same folder)
DIGESTS = ("weights", "train_data", "val_data", "subset_data")
# overrides that change how fast, not what: the same numbers (evaluations are deterministic)
SPEED_KEYS = ("data.num_threads", "data.prefetch", "data.hw_decoder_load", "data.op_concurrency", "data.stream_policy",
              "data.thread_affinity", "data.handover", "data.feed_thread", "train.compile")
NOT_SETTINGS = {"world_size"}  # how a result was computed, not what: the same numbers on 1 or 8 ranks
TITLES = {"linear": "Linear Evaluation", "knn": "kNN", "finetune": "Finetuning"}  # also the columns' order


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


def check_outputs(out: Path, table: str | Path | None) -> None:
    """Before the evaluation runs (minutes to hours): ``out`` can be a result folder and the
    CSV ``table`` a file, else one line now rather than after the work."""
    why = not_creatable(out, folder=True)
    if why:
        raise MscnError(f"--out {out}: {why}; --out takes a folder for result.json")
    table = Path(table) if table else Path(out).parent / "results.csv"
    why = not_creatable(table) or _not_a_table(table, Path(out))
    if why:
        raise MscnError(f"--table {table}: {why}; it takes the CSV file to append a line to")


def _not_a_table(table: Path, out: Path) -> str:
    """Why appending a CSV line to ``table`` would damage a file ("" if it would not): a
    result's own files, or a file that is not a table of ours (its first line is our header)."""
    # result.json, result.md and the kept result.<time>.json / .md (results.csv there is a table)
    if table.resolve().parent == out.resolve() and table.name.startswith("result.") and table.suffix in (".json", ".md"):
        return "this evaluation writes that file itself (result.json and result.md in --out)"
    try:
        with open(table, newline="") as f:
            first = f.readline(4096)
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as e:
        return f"cannot be read as a CSV table ({e.strerror if isinstance(e, OSError) else 'not text'})"
    if first and not first.startswith(",".join(CSV_FIELDS[:3]) + ","):
        return ("it holds something else than a results table (its first line is not the header "
                f"{','.join(CSV_FIELDS[:3])},...), and a line appended would damage it")
    return ""


def write_result(result: dict, out_dir: str | Path, table: str | Path | None = None) -> dict[str, str]:
    """Write result.json + result.md into ``out_dir`` and append a line to the CSV ``table``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "result"
    try:
        kept = keep_previous(out)
    except OSError:  # the old result stays where it is; the new one goes beside it
        kept, name = None, f"result.new-{time.strftime('%Y%m%dT%H%M%S')}"
    result = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **result, "out": os.path.abspath(out)}
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown_table([result]))
    table = Path(table) if table else out.parent / "results.csv"
    table.parent.mkdir(parents=True, exist_ok=True)
    new = not table.exists() or table.stat().st_size == 0
    with open(table, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: _fmt_csv(result.get(k, "")) for k in CSV_FIELDS})
    return {"json": str(out / f"{name}.json"), "md": str(out / f"{name}.md"), "csv": str(table),
            **({"previous": str(kept)} if kept else {})}


def keep_previous(out: Path) -> Path | None:
    """An evaluation into a folder that already holds a result keeps the old one beside it,
    as ``result.<its time>.json`` (and ``.md``), which ``mscn eval report`` does not pick up
    (it reads ``result.json``). Returns the kept JSON's path, or None when there was none.

    The new name is claimed with a hard link, which fails rather than replace a file, so
    two evaluations sharing a folder cannot keep one result over another. Raises OSError
    when the old result cannot be kept (the caller then writes the new one elsewhere)."""
    old = out / "result.json"
    try:
        stamp = str(json.loads(old.read_text()).get("time", ""))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        stamp = ""
    stamp = re.sub(r"[^0-9A-Za-z_-]", "", stamp) or time.strftime("%Y%m%dT%H%M%S")
    for n in range(1, 1000):
        kept = out / (f"result.{stamp}.json" if n == 1 else f"result.{stamp}-{n}.json")
        if kept.with_suffix(".md").exists():
            continue
        try:
            os.link(old, kept)
        except FileExistsError:
            continue
        except FileNotFoundError:  # another evaluation kept it first
            return None
        old.unlink(missing_ok=True)
        md = out / "result.md"
        if md.is_file():
            try:
                os.link(md, kept.with_suffix(".md"))
                md.unlink()
            except OSError:
                pass  # the table is re-made from the JSON by mscn eval report
        return kept
    raise OSError(f"{out}: no free name to keep the previous result under")


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
        for key in ("top1", "top5", "label_fraction"):  # what the table reads as numbers
            v = r.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise MscnError(f"{f}: {key} must be a number, got {v!r}")
        results.append(r | {"_file": str(f)})
    return results


def setting_of(result: dict) -> dict[str, str]:
    """What makes two results of one model and protocol different runs (see the module docstring)."""
    s = {k: result[k] for k in KEY_FIELDS if result.get(k) not in (None, [])}
    s.setdefault("seeds", 1)  # a single run is one seed: labelled seeds=1 beside a --seeds 3 row, not seeds=-
    if result.get("ckpt_file"):
        s["ckpt"] = result["ckpt_file"]
    what = [o for o in s.get("overrides", []) if o.split("=", 1)[0].strip() not in SPEED_KEYS]
    if what:
        s["overrides"] = what
    else:
        s.pop("overrides", None)
    s.update({k: v for k, v in (result.get("settings") or {}).items() if k not in NOT_SETTINGS})
    return {k: json.dumps(v, sort_keys=True) if not isinstance(v, str) else v for k, v in s.items()}


def _short_forms(values) -> dict:
    """Each value as a row label shows it: a path by its last two parts, or as many more as it
    takes to tell the paths apart (``runs/<arm>/seed0/final.pt`` of two arms: two rows)."""
    values = sorted({str(v) for v in values})
    for parts in range(2, max((len(Path(v).parts) for v in values), default=2) + 1):
        forms = {v: "/".join(Path(v).parts[-parts:]) if "/" in v else v for v in values}
        if len(set(forms.values())) == len(values):
            return forms
    return {v: v for v in values}


def _cells(results: list[dict]):
    """(columns, {row label: {column: result}}): one row per model and distinct setting."""
    columns: list[tuple[str, str]] = []
    groups: dict[tuple, dict[str, dict]] = {}
    for r in sorted(results, key=lambda r: r.get("time", "")):
        col = column_key(r)
        if col not in columns:
            columns.append(col)
        group = groups.setdefault((r["name"], col), {})
        key = json.dumps(setting_of(r), sort_keys=True)
        if key in group:
            print(f"mscn: note: {r['name']} / {col[0]}: {r.get('_file', '')} replaces an older result "
                  "with the same settings", file=sys.stderr)
        group[key] = r
    # the paper's order, whatever order the files were written in: linear, kNN, fine-tuning by
    # label fraction, then transfer datasets (in the order they were first scored: a stable sort)
    order = {title: i for i, title in enumerate(TITLES.values())}
    columns.sort(key=lambda c: (order.get(c[0], len(order)), float(c[1].rstrip("%"))))
    rows: dict[str, dict] = {}
    for (name, col), group in groups.items():
        settings = [setting_of(r) for r in group.values()]
        fields = sorted({k for s in settings for k in s})
        differ = [k for k in fields if len({s.get(k) for s in settings}) > 1]
        for k in [k for k in differ if k in DIGESTS]:  # a digest where nothing else tells the rows apart
            rest = [d for d in differ if d != k]
            if len({tuple(s.get(d) for d in rest) for s in settings}) == len(settings):
                differ.remove(k)
        forms = {k: ({str(s.get(k, "-")): str(s.get(k, "-"))[:8] for s in settings} if k in DIGESTS else
                     _short_forms(s.get(k, "-") for s in settings)) for k in differ}
        for r, s in zip(group.values(), settings):
            label = name if not differ else name + " (" + ", ".join(f"{k}={forms[k][str(s.get(k, '-'))]}"
                                                                    for k in differ) + ")"
            rows.setdefault(label, {})[col] = r
    return columns, rows


def markdown_table(results: list[dict], metric: str = "top1", baseline: str | None = None) -> str:
    """Paper-style Markdown table: rows = models (one per distinct setting), columns =
    protocols (top-1 by default)."""
    if metric not in ("top1", "top5"):
        raise MscnError(f"--metric {metric}: must be top1 or top5")
    columns, results_at = _cells(results)
    rows = {label: {c: float(r[metric]) for c, r in cells.items()} for label, cells in results_at.items()}
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
            std = results_at[name][c].get(f"{metric}_std")
            if std is not None:
                s += f" ± {std:.1f}"
            base = rows[baseline].get(c) if baseline is not None and name != baseline else None
            if base is not None:
                s += f" ({cells[c] - base:+.1f})"
            out.append(s)
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"
