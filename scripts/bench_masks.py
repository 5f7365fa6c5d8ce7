"""Benchmark of the MSCN mask step (paper §5.2): Triton kernels vs torch reference vs a copy.

GPU: median time per call over --runs windows, with their min-max (``ms_spread`` in the
JSON: min, quartiles, max) (benchkit's ``measure``: synchronized
before every clock read, so a call's launch overhead counts as it does in training),
for 4 views x 256 x 3 x 224 x 224 fp32 by default: the tables (Triton table kernel and
torch sampler), the fill kernel in place and out of place, the whole ``apply_masks``,
the torch reference on the same GPU, and a device-to-device copy of the same bytes.
"Effective GB/s" counts every view element read once and written once (2 x bytes),
the issue's yardstick, whatever the kernel really moves (in place it only writes the
masked ~ratio of the elements).
CPU: the reference's cost per batch (perf_counter, median) at the demo size and at 224 px.

    python scripts/bench_masks.py                   # picks GPU presets if CUDA, else CPU
    python scripts/bench_masks.py --preset demo --runs 20 --json masks.json
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from benchkit.outfile import check_target, write_json
from benchkit.timing import device_sync, measure
from mscn.config import load_config
from mscn.cuda_kernels import apply_masks, apply_tables, draw_tables, sample_tables
from mscn.errors import MscnError, run_cli

# name: (views, batch, channels, height, width, config whose view masks are used)
PRESETS = {
    "h100": (4, 256, 3, 224, 224, None),  # the target size, default 224 px masks (grid 32)
    "demo": (4, 64, 3, 64, 64, "demo"),  # `mscn demo`: 64 px, grid 16
    "cpu224": (4, 32, 3, 224, 224, None),
}


def window_ms(fn, runs: int, warmup: int, device: torch.device) -> list[float]:
    """Wall time of one fn() call in ms, per window: ``runs`` windows of 10 calls each."""
    def step() -> int:
        fn()
        return 1

    m = measure("masks", step, views=1, warmup=warmup, iters=10, repeats=runs, sync=device_sync(device, "device"),
                device=device if device.type == "cuda" else None)
    return [t / 10 * 1e3 for t in m.window_s]


def spread_ms(ms: list[float]) -> dict:
    """min, quartiles and max of the windows' ms: how far one median can be trusted (a shared
    or throttling GPU spreads them)."""
    q1, q3 = np.percentile(ms, [25, 75])
    return {"min": round(min(ms), 4), "q1": round(float(q1), 4), "q3": round(float(q3), 4),
            "max": round(max(ms), 4), "n": len(ms)}


def bench_preset(name: str, args, device: torch.device) -> dict:
    n_views, B, C, H, W, config = PRESETS[name]
    cfgs = [v.mask for v in load_config(args.config or config).views][:n_views]
    if len(cfgs) < n_views:
        raise MscnError(f"--config {args.config or config}: {len(cfgs)} views, preset {name} needs {n_views}")
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    gen = torch.Generator(device).manual_seed(0)
    views = [torch.randn(B, C, H, W, device=device, dtype=dtype) for _ in range(n_views)]
    nbytes = sum(v.numel() * v.element_size() for v in views)
    runs = args.runs or (20 if cuda else 3)
    warmup = 3 if cuda else 1
    tables = sample_tables(views, cfgs, gen)

    rows: dict[str, float] = {}  # each step's median ms
    windows: dict[str, list[float]] = {}  # and its windows' ms, for the spread

    def row(step: str, fn, n: int = runs) -> None:
        windows[step] = window_ms(fn, n, warmup, device)
        rows[step] = float(np.median(windows[step]))

    row("tables, torch sampler (sample_tables)", lambda: sample_tables(views, cfgs, gen))
    if cuda:
        row("tables, Triton kernel (draw_tables)", lambda: draw_tables(views, cfgs, gen, backend="triton"))
        row("triton in place", lambda: apply_tables(views, tables, inplace=True, backend="triton"))
        row("triton out of place", lambda: apply_tables(views, tables, inplace=False, backend="triton"))
        row("apply_masks triton in place", lambda: apply_masks(views, cfgs, gen, backend="triton"))
        flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(flat)
        row("d2d copy of the same bytes", lambda: dst.copy_(flat))
        del flat, dst
    ref_runs = max(3, runs // 5) if cuda else runs
    row("torch reference in place", lambda: apply_tables(views, tables, inplace=True, backend="torch"), ref_runs)
    row("torch reference out of place", lambda: apply_tables(views, tables, inplace=False, backend="torch"), ref_runs)
    row("apply_masks torch in place", lambda: apply_masks(views, cfgs, gen, backend="torch"), ref_runs)

    ref = rows["torch reference in place"]
    copy = rows.get("d2d copy of the same bytes")
    print(f"\n{name}: {n_views} views x {B} x {C} x {H} x {W} {args.dtype} on {device_name(device)}, "
          f"{nbytes / 1e9:.3f} GB per direction, median of {runs} runs (reference: {ref_runs})")
    print("| step | ms | min-max ms | effective GB/s | speed-up vs torch reference in place | time / d2d copy time |")
    print("|---|---:|---:|---:|---:|---:|")
    spreads = {step: spread_ms(w) for step, w in windows.items()}
    for step, ms in rows.items():
        lo_hi = f"{spreads[step]['min']:.3f}-{spreads[step]['max']:.3f}"
        if step.startswith("tables"):  # draws the decisions only: moves none of the views' bytes
            print(f"| {step} | {ms:.3f} | {lo_hi} | - | - | - |")
            continue
        gbs = 2 * nbytes / ms / 1e6
        vs_copy = f"{ms / copy:.2f}x" if copy else "-"
        print(f"| {step} | {ms:.3f} | {lo_hi} | {gbs:.0f} | {ref / ms:.1f}x | {vs_copy} |")
    result = {"preset": name, "device": device_name(device), "shape": [n_views, B, C, H, W],
              "dtype": args.dtype, "bytes_per_direction": nbytes, "runs": runs, "ms": dict(rows),
              "ms_spread": spreads}
    if cuda:
        k = rows["apply_masks triton in place"]
        print(f"SUMMARY masks {name} on {device_name(device)}: apply_masks {k:.3f} ms (tables "
              f"{rows['tables, Triton kernel (draw_tables)']:.3f} ms) "
              f"({2 * nbytes / k / 1e6:.0f} GB/s effective), kernel out of place "
              f"{rows['triton out of place']:.3f} ms, {ref / k:.1f}x the torch reference, "
              f"copy {copy:.3f} ms ({2 * nbytes / copy / 1e6:.0f} GB/s)")
    else:
        print(f"SUMMARY masks {name} on CPU ({torch.get_num_threads()} threads): "
              f"apply_masks (reference) {rows['apply_masks torch in place']:.1f} ms per batch")
    return result


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS),
                    help="repeatable; default: h100 on a GPU, demo and cpu224 on CPU")
    ap.add_argument("--config", default=None, help="take the view masks from this config (path or recipe name)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--runs", type=int, default=None, help="timed windows of 10 calls per step (default 20 GPU, 3 CPU)")
    ap.add_argument("--cpu", action="store_true", help="benchmark the CPU reference even if a GPU is present")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        raise MscnError(f"--runs must be >= 1, got {args.runs}")
    check_target("--json", args.json)  # before the timing
    if args.config:
        load_config(args.config)  # a typo fails before the timing, not after
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    presets = args.preset or (["h100"] if cuda else ["demo", "cpu224"])
    results = [bench_preset(p, args, device) for p in presets]
    if args.json:
        write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "bench_masks"))
