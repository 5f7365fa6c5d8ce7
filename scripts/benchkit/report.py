"""What ``bench_pipeline.py`` prints and draws: a markdown table (``gpu_check.sh`` greps its
``|`` rows and ``SUMMARY`` lines), the summary lines and a bar chart."""
from __future__ import annotations

from pathlib import Path

# --train --device-sync-row: the masks feed timed again as GPU rounds 1-3 did (bench_pipeline.py
# writes the row, gpu_summary.py reads it)
DEVICE_SYNC_ROW = "masks-device-sync"
LABELS = {"decode": "decode", "bare": "+ crop, flip, normalize", "colour": "+ colour jitter, gray",
          "views": "+ blur, solarize",
          "highpass": "+ high-pass", "masks": "+ masks (as torch tensors)", "torchvision": "torchvision/PIL",
          "dali-plain": "DALI written plainly (views + high-pass, no masks)",
          "masks-priority": "+ masks, trainer on a high-priority stream",
          DEVICE_SYNC_ROW: "+ masks, timed as rounds 1-3 (windows of 4 steps, device-wide sync)",
          "masks-hp-late": "full, high-pass after normalize (previous order)",
          "masks-hp-loader": "full, high-pass as GEMMs in the loader (highpass.where=loader)",
          "masks-blur-loader": "full, blur and high-pass as GEMMs in the loader (data.blur_where=loader)",
          "masks-blur-dali": "full, blur in DALI (data.blur_where=pipeline, the GPU default to round 4)",
          "masks-crop-window": "full, views cut by random_crop_generator + ROI resize (previous crop)",
          "masks-concurrent": "full, DALI's full operator concurrency, a stream per branch",
          "masks-hold": "full, DALI's outputs held 2 batches longer (DaliLoader.hold)",
          "masks-thread": "full, batches taken by a background thread (data.feed_thread)",
          "masks-colour-loader": "full, colour, gray, blur and high-pass in the loader (data.colour_where=loader)",
          "masks-private": "full, DALI's outputs taken on the loader's own stream (data.handover=private)"}

CHAIN = ("decode", "bare", "colour", "views", "highpass", "masks")  # each adds to the one before
STEP = {"bare": "crop, flip, normalize", "colour": "colour jitter, gray", "views": "blur, solarize",
        "highpass": "high-pass", "masks": "masks (as torch tensors)"}


def stage_labels(stages) -> dict:
    """Row labels of the timed stages: a stage of the chain names every step it adds to the
    timed stage before it (``--stages decode,bare,masks``: the masks row adds colour, blur,
    solarize and the high-pass too, so the drop to it is not the masks' cost alone)."""
    out, last = {}, 0
    for k in stages:
        if k in CHAIN[1:]:
            i = CHAIN.index(k)
            out[k] = "+ " + ", ".join(STEP[c] for c in CHAIN[last + 1:i + 1])
            last = i
        else:
            out[k] = LABELS.get(k, k)
    return out


# ----------------------------------------------------------------------------------
# Output: a human table (gpu_check.sh greps the "|" rows and SUMMARY lines) and a chart
# ----------------------------------------------------------------------------------

def _gib(mem: dict | None) -> str:
    return f"{mem['device_used_bytes'] / 2**30:.1f}" if mem else "n/a"


def _row(label: str, m: dict, ref: float | None = None, note: str = "", views: bool = True) -> str:
    r = m["images_per_s"]
    rel = f"{r['median'] / ref:.2f}" if ref else ""
    node = f" (node {m['node_images_per_s']:.0f})" if "node_images_per_s" in m else ""
    vps = f"{m['views_per_s']['median']:.1f}" if views else "-"  # decode alone makes no views
    return (f"| {label} | {r['median']:.1f}{node} | {r['min']:.1f}-{r['max']:.1f} | "
            f"{vps} | {rel} | {m['cpu_util']:.2f} | {_gib(m['gpu_memory'])} | {note} |")


def table_rows(r: dict) -> list[str]:
    """Markdown-style rows: stages and baselines, then the sweep, then trainer mode."""
    head = "| {} | images/s | min-max | views/s | vs decode | CPU util | GPU GiB | note |"
    rule = "|---" * 8 + "|"
    decode = r["stages"].get("decode", {}).get("images_per_s", {}).get("median")
    rows = [head.format("run"), rule] if r["stages"] else []
    labels = stage_labels(r["stages"])
    rows += [_row(labels[k], m, decode, views=k != "decode") for k, m in r["stages"].items()]
    for name, m in r.get("baselines", {}).items():
        label = LABELS[name] + (f" x{m['workers']} workers" if "workers" in m else "")
        if len(m["window_images"]) != r["settings"]["repeats"] or m["window_images"][0] != \
                r["settings"]["batch"] * r["settings"]["iters"]:  # the torchvision baseline's own windows
            label += f" (median of {len(m['window_images'])} windows x {m['window_images'][0] // r['settings']['batch']} batches)"
        rows.append(_row(label, m, decode, f"mscn/{name} = {m['mscn_over_baseline']:.2f}x"))
    if "sweep" in r:
        rows += ["", head.format(f"sweep ({r['sweep']['stage']})"), rule]
        rows += [_row(" ".join(f"{k}={v}" for k, v in row["setting"].items()), row, None,
                      "best" if row["setting"] == r["sweep"]["best"] else "") for row in r["sweep"]["rows"]]
    if "train" in r:
        t = r["train"]
        windows = f"; median of {t['steps'] // t['window_steps']} windows x {t['window_steps']} steps"
        rows += ["", f"| train {t['arch']} ({t['method']}, {t['precision']}{windows}), fed by | images/s | min-max | "
                     "kept of synthetic | ms taken per step | host ms: batch + step | GPU GiB |", "|---" * 7 + "|",
                 _train_row("synthetic views on the device", t["synthetic"])]
        rows += [_train_row(LABELS[k], m) for k, m in t["feeds"].items()]
    return rows


def _train_row(label: str, m: dict) -> str:
    r = m["images_per_s"]
    kept = f"{100 * m['kept']:.1f}%" if "kept" in m else "100%"
    taken = f"{m['ms_taken_per_step']:.1f}" if "ms_taken_per_step" in m else "0"
    h = m.get("host_ms_per_step") or {}
    host = " + ".join(f"{h[k]:.1f}" for k in ("batch", "step") if k in h) or "n/a"
    return (f"| {label} | {r['median']:.1f} | {r['min']:.1f}-{r['max']:.1f} | {kept} | {taken} | {host} | "
            f"{_gib(m['gpu_memory'])} |")


def summary_lines(r: dict) -> list[str]:
    """The ``SUMMARY`` lines: one per headline figure."""
    s, out = r["settings"], []
    if "pipeline" in r:
        p = r["pipeline"]
        share = ""
        if "share_of_decode" in r:
            share = (f", {100 * r['share_of_decode']:.0f}% of decode-only "
                     f"{r['stages']['decode']['images_per_s']['median']:.1f}")
        out.append(f"pipeline ({p['name']}): {p['images_per_s']['median']:.1f} images/s, "
                   f"{p['views_per_s']['median']:.1f} views/s{share} "
                   f"[{s['device']}, batch {s['batch']}, {s['threads']} threads]")
        if "node_images_per_s" in p:
            out.append(f"node total over {s['world_size']} processes: {p['node_images_per_s']:.1f} images/s "
                       f"(per process {p['per_rank_images_per_s']})")
    for name, m in r.get("baselines", {}).items():
        share = f", {100 * m['share_of_decode']:.0f}% of decode-only" if "share_of_decode" in m else ""
        out.append(f"baseline {name}: {m['images_per_s']['median']:.1f} images/s{share}; "
                   f"mscn/{name} = {m['mscn_over_baseline']:.2f}x")
    if "sweep" in r:
        best = " ".join(f"{k}={v}" for k, v in r["sweep"]["best"].items())
        out.append(f"sweep best: {best} -> {r['sweep']['best_images_per_s']:.1f} images/s")
    if "train" in r:
        t = r["train"]
        feeds = ", ".join(f"{k} {100 * m['kept']:.1f}%" for k, m in t["feeds"].items())
        out.append(f"train {t['arch']}: synthetic {t['synthetic']['images_per_s']['median']:.1f} images/s; "
                   f"kept when fed by {feeds}")
        over = [k for k, m in t["feeds"].items() if m["kept"] > KEPT_NOISE]
        if over:  # a fed step cannot beat the same step on ready-made tensors: the windows measured noise
            out.append(f"WARNING kept above {100 * KEPT_NOISE:.0f}% ({', '.join(over)}): a fed row ran faster "
                       "than the synthetic one, so these figures are noise (windows too short, or other jobs "
                       "on the cores). Raise --train-steps and --repeats, and on the CPU give --torch-threads 1")
    return [f"SUMMARY {line}" for line in out]


# above this share kept, a fed row beat the synthetic one: the difference is noise
KEPT_NOISE = 1.05


def print_report(r: dict) -> None:
    env, s, ds = r["env"], r["settings"], r["dataset"]
    hw = f", hw_decoder_load {s['hw_decoder_load']}" if s["hw_decoder_load"] is not None else ""
    executor = [f"{k} {s[k]}" for k in ("op_concurrency", "stream_policy") if s.get(k)]  # absent in older JSON
    executor += ["threads pinned (data.thread_affinity)"] if s.get("thread_affinity") else []
    hw += f", DALI executor: {', '.join(executor)}" if executor else ""
    hw += ", outputs taken on the loader's own stream" if s.get("handover") == "private" else ""
    hw += f", windows end on a {s['sync']} sync" if s.get("sync") else ""  # GPU only; absent in older JSON
    print(f"\nmscn bench on {env['gpu_name'] or env['cpu_model']}: {env['usable_cores']} cores, DALI {env['dali']}, "
          f"torch {env['torch']} ({env['torch_threads']} threads), load {env['load_avg_1m']}\n"
          f"data: {ds['path']} ({ds['num_images']} images, {ds['format']}, median JPEG {'n/a (shards)' if ds['jpeg_kb_median'] is None else str(ds['jpeg_kb_median']) + ' KB'})\n"
          f"{s['device']}: batch {s['batch']} per process x {s['world_size']}, {s['views']} views at {s['size']} px, "
          f"{s['threads']} DALI threads{hw}; median of {s['repeats']} windows x {s['iters']} batches\n")
    print("\n".join(table_rows(r) + summary_lines(r)), flush=True)


def print_isolated(r: dict) -> None:
    """``--isolate``: each stage's median per round (own process each), the mean, and the
    mean against the first stage's."""
    env, s, iso = r["env"], r["settings"], r["isolated"]
    stages = list(iso)
    rounds = len(iso[stages[0]]["medians"])
    print(f"\nmscn bench --isolate {rounds} on {env['gpu_name'] or env['cpu_model']}: {env['usable_cores']} cores, "
          f"DALI {env['dali']}; {s['device']}, batch {s['batch']}, {s['threads']} DALI threads"
          f"{', windows end on a ' + s['sync'] + ' sync' if s.get('sync') else ''}; one process "
          f"per row, order {' '.join(r['order'])}\n")
    rows = ["| run | " + " | ".join(f"round {i + 1}" for i in range(rounds)) + " | mean | vs first |",
            "|---|" + "---|" * (rounds + 2)]
    first = iso[stages[0]]["mean"]
    for st in stages:
        ratio = iso[st]["mean"] / first if first else float("nan")
        rows.append(f"| {LABELS.get(st, st)} | " + " | ".join(f"{v:.1f}" for v in iso[st]["medians"])
                    + f" | {iso[st]['mean']:.1f} | {ratio:.2f}x |")
    rows += [f"SUMMARY isolated {st}: mean {iso[st]['mean']:.1f} images/s over {rounds} rounds "
             f"({', '.join(f'{v:.1f}' for v in iso[st]['medians'])})" for st in stages]
    print("\n".join(rows), flush=True)


def plot(r: dict, path: str) -> None:
    """Left: images/s of each stage (bars: median, whiskers: min-max). Right: the full
    pipeline against the baselines, labelled with the ratio."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    names = {**LABELS, **stage_labels(r["stages"])}

    def bars(ax, items, title, labels=None):
        med = [m["images_per_s"]["median"] for _, m in items]
        err = [[v - m["images_per_s"]["min"] for v, (_, m) in zip(med, items)],
               [m["images_per_s"]["max"] - v for v, (_, m) in zip(med, items)]]
        ax.bar(range(len(items)), med, yerr=err, capsize=4, color="tab:blue")
        ax.set_xticks(range(len(items)), [names.get(k, k) for k, _ in items], rotation=20, ha="right")
        for i, text in enumerate(labels or [f"{v:.0f}" for v in med]):
            ax.annotate(text, (i, med[i]), ha="center", va="bottom")
        ax.set_ylabel("images/s")
        ax.set_title(title)

    if not r["stages"]:  # a sweep or --train alone: nothing this chart draws
        print(f"bench_pipeline: --plot {path}: no stage rows to draw (the chart shows --stages and baselines)",
              flush=True)
        return
    comparisons = list(r.get("baselines", {}).items())
    fig, axes = plt.subplots(1, 2 if comparisons else 1, figsize=(12 if comparisons else 6, 4.5), squeeze=False)
    s = r["settings"]
    bars(axes[0][0], list(r["stages"].items()), f"stages ({s['device']}, batch {s['batch']}, {s['views']} views)")
    if comparisons:
        texts = [f"{r['pipeline']['images_per_s']['median']:.0f}"]
        # the baseline bars carry mscn's speed over theirs (0.80x: mscn makes 80 % of that baseline)
        texts += [f"mscn {m['mscn_over_baseline']:.2f}x this" for _, m in comparisons]
        bars(axes[0][1], [("mscn", r["pipeline"])] + comparisons,
             "full pipeline vs baselines (labels: mscn images/s ÷ the bar's)", texts)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


