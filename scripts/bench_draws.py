#!/usr/bin/env python3
"""What DALI's per-sample random draws cost its CPU threads: the numbers of a batch's
colour, gray, flip and blur steps drawn one by one (coin flips, uniforms, casts and a
stack per view: how ``data.colour_where=loader`` first drew them, ~15 CPU operators per
view) against one draw of ten uniforms per view (what it draws now, mapped by
``mscn.colour.ColourLaw`` in the loader's kernel). No images: only the draws, on DALI's
CPU path, so the figure is the operators' own cost.

Usage: ``python scripts/bench_draws.py [--batch 256] [--views 4] [--threads 2] [--iters 50]``.
Prints one line per graph: operators, milliseconds per batch, and the ratio.
"""
from __future__ import annotations

import argparse
import time

from nvidia.dali import fn, pipeline_def, types

from mscn.colour import DRAWS


def one_by_one(views: int):
    """Per view: jitter, gray, blur and flip coins, four factors and σ, their casts, a stack."""
    outs = []
    for _ in range(views):
        jit = fn.random.coin_flip(probability=0.8, dtype=types.BOOL)
        gray = fn.random.coin_flip(probability=0.2, dtype=types.BOOL)
        factors = [fn.random.uniform(range=r) for r in ([0.6, 1.4], [0.6, 1.4], [0.8, 1.2], [-36.0, 36.0])]
        blur = fn.random.coin_flip(probability=0.5, dtype=types.BOOL)
        sigma = fn.cast(blur, dtype=types.FLOAT) * fn.random.uniform(range=[0.1, 2.0])
        flip = fn.random.coin_flip(probability=0.5, dtype=types.BOOL)
        outs += [fn.stack(fn.cast(jit, dtype=types.FLOAT), *factors, fn.cast(gray, dtype=types.FLOAT),
                          fn.cast(flip, dtype=types.FLOAT)), sigma]
    return tuple(outs)


def one_draw(views: int):
    """Per view: one draw of ten uniforms (mscn.colour.DRAWS)."""
    return tuple(fn.random.uniform(range=[0.0, 1.0], shape=[len(DRAWS)]) for _ in range(views))


def time_graph(graph, batch: int, views: int, threads: int, iters: int) -> tuple[int, float]:
    """(operators, median ms per batch over ``iters`` batches after 5 warm-up batches)."""
    pipe = pipeline_def(graph, batch_size=batch, num_threads=threads, device_id=None, seed=1,
                        prefetch_queue_depth=1)(views)
    pipe.build()
    for _ in range(5):
        pipe.run()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        pipe.run()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return len(pipe._ops), times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=50)
    a = p.parse_args(argv)
    if min(a.batch, a.views, a.threads, a.iters) < 1:
        p.error("--batch, --views, --threads and --iters must be >= 1")
    rows = {name: time_graph(g, a.batch, a.views, a.threads, a.iters)
            for name, g in (("one by one", one_by_one), ("one draw per view", one_draw))}
    for name, (ops, ms) in rows.items():
        print(f"DRAWS {name}: {ops} operators, {ms:.3f} ms per batch of {a.batch} "
              f"({a.views} views, {a.threads} threads)")
    ratio = rows["one by one"][1] / max(rows["one draw per view"][1], 1e-9)
    print(f"SUMMARY draws: one by one / one draw per view = {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
