#!/usr/bin/env python3
"""Which step of feeding the trainer makes the host wait for the GPU (run on a GPU machine).

    python scripts/probe_syncs.py --data /tmp/mscn_synth/train --json probe.json [KEY=VALUE ...]

Why: in round 4 on an H200 (docs/PERFORMANCE.md) the GPU sat idle about 9 ms of every
pipeline-fed ResNet-18 step, the same with the barest pipeline as with the full one, and
99 % busy on synthetic input. An idle GPU under a trainer that never reads a value back
means that something in the feed waits on the host until the trainer's queued kernels have
run, so that the next kernels are queued only after the host has fetched the next batch.

How: before each probe, about ``--queue-ms`` (200) of spin kernel is queued on the current
(the trainer's) stream; then the probed operation runs and the host time it took is
measured. An operation that returns well before the queued work is done does not wait for
the stream; one that takes about as long does. One line per probe (``SYNCPROBE``):

  h2d-pageable   a 4 KiB ``.to("cuda", non_blocking=True)`` from pageable memory (what the
                 loader did for labels, indices and σ before mscn.h2d)
  h2d-pinned     the same through mscn.h2d.to_device (pinned staging)
  dali-next      DALI's iterator: share_outputs (host-synchronized) and the DLPack handover
  convert        the loader's work on that batch: casts, blur and high-pass GEMMs, masks,
                 labels and indices to the device
  release        dropping the batch and DALI's outputs (the buffers go back to DALI)
  loader-next    the loader's whole ``next()``, as the trainer calls it
  loader-state   the loader's ``state_dict()`` (DALI's checkpoint), which the trainer takes
                 before every batch under torchrun (a file failing on one rank mid-run)

Two more probes time the GPU, not the host: how long the trainer's stream, empty, waits
because of DALI's DLPack handover, right after the previous batch, while DALI queues the
next ones. DALI's ``share_outputs`` has already waited for the batch on the host; the
handover then makes the stream it runs on wait for what DALI has queued up to then. Events
before and after the handover on the trainer's stream are apart by the host's time in it
plus that wait; the probe reports the difference:

  handover-trainer   the handover on the trainer's stream (``data.handover=trainer``)
  handover-private   the handover on the loader's own stream (``data.handover=private``),
                     the trainer's stream timed the same way: it should wait for nothing

Without a GPU it says so and exits 0; ``--cpu-dry-run`` runs every probe on DALI's CPU
path (no stream to wait for: the verdicts read "cpu") to test this script.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable

import torch

from mscn.config import load_config, validate
from mscn.h2d import to_device
from mscn.pipelines import build_train_loader, endless

WAITS_SHARE = 0.5  # returned after at least this share of the queued work: it waited


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="ImageFolder root, file list or folder of tar shards")
    p.add_argument("--config", default=None, help="recipe name or YAML path (default: the built-in config)")
    p.add_argument("--batch", type=int, default=256, help="images per batch (per view)")
    p.add_argument("--queue-ms", type=float, default=200.0, help="spin queued on the stream before each probe")
    p.add_argument("--repeats", type=int, default=3, help="runs of each probe (the median is reported)")
    p.add_argument("--json", default=None)
    p.add_argument("--cpu-dry-run", action="store_true", help="test this script on DALI's CPU path")
    p.add_argument("overrides", nargs="*", help="config overrides, KEY=VALUE")
    return p.parse_args(argv)


def verdict(host_ms: float, queued_ms: float | None) -> str:
    """'waits' when the host returned only after most of the queued work had run."""
    if queued_ms is None:
        return "cpu"
    return "waits for the stream" if host_ms >= WAITS_SHARE * queued_ms else "does not wait"


class Queue:
    """Queues about ``ms`` of spin kernel on the current CUDA stream (nothing on the CPU)."""

    def __init__(self, ms: float, cuda: bool):
        self.ms, self.cuda, self.cycles_per_ms = ms, cuda, None
        if cuda:  # calibrate torch.cuda._sleep's cycles on this card
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(10**7)
            end.record()
            end.synchronize()
            self.cycles_per_ms = 10**7 / start.elapsed_time(end)

    def run(self, op: Callable[[], object]) -> tuple[float, float | None, object]:
        """(host ms of ``op``, ms of GPU work queued before it, what ``op`` returned)."""
        if not self.cuda:
            t0 = time.perf_counter()
            out = op()
            return 1e3 * (time.perf_counter() - t0), None, out
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(int(self.cycles_per_ms * self.ms))
        end.record()
        t0 = time.perf_counter()
        out = op()
        host = 1e3 * (time.perf_counter() - t0)
        torch.cuda.synchronize()
        return host, start.elapsed_time(end), out


def probes(loader, device: torch.device, queue: Queue, repeats: int) -> list[dict]:
    """Every probe ``repeats`` times; DALI's prefetch queue is full before each one."""
    it = endless(loader)
    per_epoch, taken = max(1, len(loader)), 0

    def settle():  # DALI refills its prefetch queue: a probe must not wait on DALI's own work
        if device.type == "cuda":
            torch.cuda.synchronize()
        time.sleep(0.3)

    def dali_next():  # DALI's iterator alone; at an epoch's end it resets itself (auto_reset)
        with loader._handover_stream():
            try:
                return next(loader._iter)
            except StopIteration:
                return next(loader._iter)

    def stream_wait(handover):
        """(host ms, GPU ms the current stream waited beyond the host's time) of one
        handover, the current stream empty before it."""
        loader.handover = handover
        try:
            if device.type != "cuda":
                t0 = time.perf_counter()
                dali_next()
                return 1e3 * (time.perf_counter() - t0), None
            torch.cuda.current_stream().synchronize()  # only this stream: DALI's keeps its work
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record()
            t0 = time.perf_counter()
            data = dali_next()  # kept until the end: handing DALI's buffers back is not what is timed
            host = 1e3 * (time.perf_counter() - t0)
            after.record()
            after.synchronize()
            del data
            return host, max(0.0, before.elapsed_time(after) - host)
        finally:
            loader.handover = default_handover

    def take(get):
        """``get()``, counted; a probe must not time an epoch's end (DALI's reset, the
        reader's refill), so the first batch of a new epoch is taken here, untimed."""
        nonlocal taken
        if taken and taken % per_epoch == 0:
            dali_next()
            taken += 1
            settle()
        taken += 1
        return get()

    for _ in range(3):  # warm-up: build, first batches, Triton compiles
        take(lambda: next(it))
    host_src = torch.arange(512, dtype=torch.int64)
    default_handover = loader.handover
    rows, waits = {}, {}

    def record(name, host, queued):
        rows.setdefault(name, []).append((host, queued))

    for _ in range(repeats):
        settle()
        record("h2d-pageable", *queue.run(lambda: host_src.to(device, non_blocking=device.type == "cuda"))[:2])
        settle()
        record("h2d-pinned", *queue.run(lambda: to_device(host_src, device))[:2])
        settle()
        host, queued, data = take(lambda: queue.run(dali_next))
        record("dali-next", host, queued)
        host, queued, batch = queue.run(functools.partial(loader._convert, data[0]))
        record("convert", host, queued)
        settle()
        holder = [batch, data]
        del batch, data
        host, queued, _ = queue.run(holder.clear)  # the last references: DALI's buffers go back
        record("release", host, queued)
        settle()
        record("loader-next", *take(lambda: queue.run(lambda: next(it)))[:2])
        settle()
        record("loader-state", *queue.run(loader.state_dict)[:2])
        for handover in ("trainer", "private"):
            take(dali_next)  # DALI schedules the next batch now: its stream gets work
            if taken % per_epoch == 0 and per_epoch > 2:  # the timed take would start an epoch: its
                take(dali_next)  # reset (and settle) would fall between this take and it
            time.sleep(0.005)
            waits.setdefault(f"handover-{handover}", []).append(take(lambda: stream_wait(handover)))
    out = []
    for name, runs in rows.items():
        host = _median(h for h, _ in runs)
        queued = None if runs[0][1] is None else _median(q for _, q in runs)
        out.append({"probe": name, "host_ms": round(host, 3),
                    "queued_ms": None if queued is None else round(queued, 1), "verdict": verdict(host, queued)})
    for name, runs in waits.items():
        host = _median(h for h, _ in runs)
        gpu = None if runs[0][1] is None else _median(w for _, w in runs)
        out.append({"probe": name, "host_ms": round(host, 3), "queued_ms": None,
                    "stream_wait_ms": None if gpu is None else round(gpu, 3),
                    "verdict": "cpu" if gpu is None else f"the stream waited {gpu:.2f} ms on the GPU"})
    return out


def _median(values) -> float:
    """The middle value (the upper one of an even count), as every probe reports it."""
    values = sorted(values)
    return values[len(values) // 2]


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    if not cuda and not args.cpu_dry_run:
        print("probe_syncs: no CUDA device; nothing to probe (--cpu-dry-run tests the script)")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    cfg = load_config(args.config, [f"data.root={args.data}", f"train.global_batch={args.batch}", *args.overrides])
    validate(cfg, "probe_syncs")
    cfg = cfg.resolved_for(gpu=cuda)
    loader = build_train_loader(cfg, device=device if cuda else None)
    if len(loader) < 2:  # every batch would be an epoch's first: its reset would fall in the timing
        print(f"probe_syncs: {args.data} gives {len(loader)} batch per epoch at --batch {args.batch}; "
              "use a smaller --batch (at least 2 batches per epoch)", file=sys.stderr)
        return 2
    rows = probes(loader, device, Queue(args.queue_ms, cuda), max(1, args.repeats))
    for r in rows:
        queued = "" if r["queued_ms"] is None else f" with {r['queued_ms']:.0f} ms queued on the stream"
        if "stream_wait_ms" in r:
            queued = " with the stream empty"
        print(f"SYNCPROBE {r['probe']}: host {r['host_ms']:.2f} ms{queued} -> {r['verdict']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if cuda else "cpu", "batch": args.batch,
                       "blur_where": cfg.data.blur_where, "probes": rows,
                       "config": dataclasses.asdict(cfg.data)}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
