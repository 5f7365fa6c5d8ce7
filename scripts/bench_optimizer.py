"""Time the LARS step (paper App. A.1) with multi-tensor ops against the per-parameter loop.

Why it matters for input-bound training: every op of the optimizer step is host time
(Python, dispatch, a kernel launch) spent while DALI's threads want the same cores. The
loop issues ~12 ops per weight tensor; the multi-tensor step a few per group.

On a GPU: wall milliseconds per ``optimizer.step()`` (synchronized), on the real
method (backbone + projector; BYOL's predictor too). Without one: the same step on
the ``meta`` device, which runs no kernel at all, so what it times is host work only
(torch's meta functions are partly Python, so its absolute figures are a proxy).

    python scripts/bench_optimizer.py [--arch resnet18,resnet50] [--method simclr] [--json F]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchkit.outfile import check_target, write_json
from mscn.config import load_config
from mscn.errors import run_cli
from mscn.train.lars import build_optimizer
from mscn.train.methods import build_method


def time_steps(opt, device: torch.device, iters: int, repeats: int) -> list[float]:
    """Milliseconds per step, one figure per repeat of ``iters`` steps."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    opt.step()  # momentum buffers, allocator warm-up
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            opt.step()
        sync()
        out.append(1e3 * (time.perf_counter() - t0) / iters)
    return out


def bench(arch: str, method: str, device: torch.device, iters: int, repeats: int) -> dict:
    cfg = load_config("simclr_r50_in1k", [f"model.arch={arch}", f"method.name={method}"])
    model = build_method(cfg).to(device)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3 if device.type != "meta" else torch.empty_like(p)
    row = {"arch": arch, "method": method, "device": str(device),
           "tensors": sum(1 for p in model.parameters() if p.requires_grad)}
    for foreach in (True, False):
        opt, _ = build_optimizer(cfg.optim, model, lr=1e-4)
        opt.foreach = foreach
        ms = time_steps(opt, device, iters, repeats)
        row["multi_tensor_ms" if foreach else "loop_ms"] = round(statistics.median(ms), 3)
    row["speedup"] = round(row["loop_ms"] / row["multi_tensor_ms"], 2)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--arch", default="resnet18,resnet50")
    p.add_argument("--method", default="simclr", choices=("simclr", "byol"))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    check_target("--json", args.json)  # before the timing, not after it
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("meta")
    where = torch.cuda.get_device_name() if device.type == "cuda" else "meta device (host work only, no kernels)"
    print(f"LARS step, multi-tensor vs per-parameter loop, on {where}")
    rows = []
    for arch in args.arch.split(","):
        row = bench(arch, args.method, device, args.iters, args.repeats)
        rows.append(row)
        print(f"{arch:9s} {args.method}: {row['tensors']} tensors, multi-tensor {row['multi_tensor_ms']:.3f} ms, "
              f"loop {row['loop_ms']:.3f} ms per step ({row['speedup']}x)")
    if args.json:
        write_json({"device": where, "torch": torch.__version__, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "bench_optimizer"))
