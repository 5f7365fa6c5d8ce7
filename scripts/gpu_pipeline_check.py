#!/usr/bin/env python3
"""Check the GPU pipeline against its CPU twin, then time it (run on a GPU machine).

    python scripts/gpu_pipeline_check.py --data /tmp/mscn_synth/train --batch 256 --json out.json

Checks (exit code 1 if one fails):
  1. eval pipeline, GPU vs CPU, same samples: pixels agree up to the decoders' JPEG
     rounding (nvJPEG vs libjpeg-turbo upsample chroma differently);
  2. DALI's GPU high-pass vs the torch reference on the same GPU-decoded images;
  3. the training loader on the GPU: shapes, dtype, labels, masks, flag frequencies.
Timings at ``--batch`` (images/s, after warm-up, synchronized): decode only,
decode + views, + high-pass, the full loader (+ masks), and optionally the
torchvision reference (``--reference-workers``). GPU memory: device-wide bytes in
use (cudaMemGetInfo, which includes DALI's pool) before and after.

Without a GPU it prints a message and exits 0. ``--cpu-dry-run`` runs the same code
on DALI's CPU path with small sizes, to test this script on a CPU-only machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from mscn.config import highpass_window, load_config
from mscn.highpass import highpass_torch
from mscn.pipelines import (FLAG_NAMES, READER_NAME, build_reference_loader, build_train_loader,
                            eval_pipeline, mask_fn_from_cfgs, output_names, rank_seed, resolve_source,
                            views_pipeline)
from mscn.pipelines.reference import ReferenceLoader


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="ImageFolder root, file list or folder of tar shards")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--hw-decoder-load", type=float, default=0.65)
    p.add_argument("--iters", type=int, default=30, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reference-workers", type=int, default=0, help="also time the torchvision reference")
    p.add_argument("--json", default=None)
    p.add_argument("--cpu-dry-run", action="store_true", help="test this script on DALI's CPU path")
    return p.parse_args(argv)


def device_used_bytes() -> int | None:
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return total - free


def sync(dev: str) -> None:
    if dev == "gpu":
        torch.cuda.synchronize()


def as_numpy(tl) -> np.ndarray:
    """A DALI TensorList (CPU or GPU) as one numpy array."""
    return np.array(tl.as_cpu().as_array() if hasattr(tl, "as_cpu") else tl.as_array())


def time_pipeline(pipe, dev: str, batch: int, iters: int, warmup: int) -> float:
    """images/s of ``pipe.run()`` (outputs stay in DALI: no copy to torch)."""
    pipe.build()
    for _ in range(warmup):
        pipe.run()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        pipe.run()
    sync(dev)
    return batch * iters / (time.perf_counter() - t0)


def time_loader(loader, iters: int, warmup: int, dev: str) -> float:
    it, n = iter(loader), 0
    for _ in range(warmup):
        next(it)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        try:
            b = next(it)
        except StopIteration:  # a short dataset: start the next epoch
            it = iter(loader)
            b = next(it)
        n += b.views[0].shape[0]
    sync(dev)
    return n / (time.perf_counter() - t0)


def check_eval(source, cfg, a, dev: str, results: dict) -> bool:
    """GPU vs CPU eval outputs, and DALI's GPU high-pass vs torch on the same decode."""
    d, hp = cfg.data, (cfg.highpass.sigma, highpass_window(cfg.highpass.sigma, cfg.highpass.window))
    common = dict(image_size=d.image_size, resize=d.val_resize, mean=d.mean, std=d.std, batch_size=64,
                  num_threads=a.threads, seed=0, hw_decoder_load=a.hw_decoder_load)
    outs = {}
    for name, device, highpass in (("dev_hp", dev, hp), ("dev_raw", dev, None), ("cpu_hp", "cpu", hp)):
        pipe = eval_pipeline(source, highpass=highpass, device=device,
                             device_id=0 if device == "gpu" else None, **common)
        pipe.build()
        outs[name] = as_numpy(pipe.run()[0])
    ours = torch.from_numpy(outs["dev_hp"])
    ref = highpass_torch(torch.from_numpy(outs["dev_raw"]).double(), *hp).float()
    hp_err = float((ours - ref).norm() / ref.norm())
    diff = np.abs(outs["dev_hp"] - outs["cpu_hp"])
    corr = float(np.corrcoef(outs["dev_hp"].ravel(), outs["cpu_hp"].ravel())[0, 1])
    results["eval_gpu_vs_cpu"] = {"mean_abs": float(diff.mean()), "max_abs": float(diff.max()), "corr": corr}
    results["highpass_rel_err"] = hp_err
    ok = hp_err < 1e-3 and corr > 0.98 and diff.mean() < 0.05
    print(f"check eval: GPU vs CPU mean |diff| {diff.mean():.4f} corr {corr:.4f}; "
          f"high-pass vs torch rel err {hp_err:.2e} -> {'ok' if ok else 'FAILED'}")
    return ok


def check_train(source, cfg, a, dev: str, results: dict) -> bool:
    device = torch.device("cuda", 0) if dev == "gpu" else None
    loader = build_train_loader(cfg, device=device)
    batch = next(iter(loader))
    want = torch.float32
    ok = (len(batch.views) == len(cfg.views) and all(v.dtype == want for v in batch.views)
          and all(v.shape == (a.batch, 3, cfg.data.image_size, cfg.data.image_size) for v in batch.views)
          and batch.labels.shape == (a.batch,) and (batch.views[0] == 0).float().mean().item() > 0.01)
    pipe = views_pipeline(source, cfg.views, image_size=cfg.data.image_size, device=dev, debug_outputs=True,
                          batch_size=a.batch, num_threads=a.threads, device_id=0 if dev == "gpu" else None, seed=1)
    pipe.build()
    names = output_names(len(cfg.views), source, debug_outputs=True)
    flags = dict(zip(names, pipe.run()))["view0_flags"]
    frac = as_numpy(flags).mean(axis=0)
    v0 = cfg.views[0]
    probs = [v0.flip_prob, v0.jitter_prob, v0.grayscale_prob, v0.blur_prob, v0.solarize_prob]
    tol = 5 * np.sqrt(np.array(probs) * (1 - np.array(probs)) / a.batch) + 1e-9
    ok = ok and bool((np.abs(frac - probs) <= tol).all())
    results["train_view0_flag_fractions"] = dict(zip(FLAG_NAMES, map(float, frac)))
    print(f"check train loader: shapes/dtype/masks + view0 flag fractions {np.round(frac, 3).tolist()} "
          f"(p = {probs}) -> {'ok' if ok else 'FAILED'}")
    return ok


def main(argv=None) -> int:
    a = parse_args(argv)
    if not torch.cuda.is_available() and not a.cpu_dry_run:
        print("gpu_pipeline_check: no CUDA device here; nothing to check (use --cpu-dry-run to test the script)")
        return 0
    dev = "cpu" if a.cpu_dry_run else "gpu"
    cfg = load_config(None, [f"data.root={a.data}", f"train.global_batch={a.batch}",
                             f"data.num_threads={a.threads}", f"data.hw_decoder_load={a.hw_decoder_load}"])
    source = resolve_source(a.data)
    if source.num_samples < a.batch:
        print(f"gpu_pipeline_check: {a.data} has {source.num_samples} images < batch {a.batch}")
        return 1
    results = {"device": torch.cuda.get_device_name(0) if dev == "gpu" else "cpu (dry run)",
               "batch": a.batch, "threads": a.threads, "hw_decoder_load": a.hw_decoder_load,
               "images": source.num_samples, "memory_before_bytes": device_used_bytes()}
    ok = check_eval(source, cfg, a, dev, results) & check_train(source, cfg, a, dev, results)

    d = cfg.data
    hp = (cfg.highpass.sigma, highpass_window(cfg.highpass.sigma, cfg.highpass.window))
    kw = dict(batch_size=a.batch, num_threads=a.threads, device_id=0 if dev == "gpu" else None, seed=2,
              prefetch_queue_depth=d.prefetch)
    common = dict(image_size=d.image_size, mean=d.mean, std=d.std, device=dev, hw_decoder_load=a.hw_decoder_load,
                  shuffle_buffer=d.shuffle_buffer)
    decode_only = _decode_only(source, dev, a.hw_decoder_load, **kw)
    rates = {"decode": time_pipeline(decode_only, dev, a.batch, a.iters, a.warmup),
             "decode+views": time_pipeline(views_pipeline(source, cfg.views, highpass=None, **common, **kw),
                                           dev, a.batch, a.iters, a.warmup),
             "decode+views+highpass": time_pipeline(views_pipeline(source, cfg.views, highpass=hp, **common, **kw),
                                                    dev, a.batch, a.iters, a.warmup)}
    device = torch.device("cuda", 0) if dev == "gpu" else None
    rates["loader (+masks, to torch)"] = time_loader(build_train_loader(cfg, device=device), a.iters, a.warmup, dev)
    if a.reference_workers:
        ref = build_reference_loader(cfg, a.batch, workers=a.reference_workers, apply_mask=device is None)
        if device is not None:
            # mask on the GPU, as a user's loop (and bench.torchvision_step) would: the
            # default mask_fn masks the CPU batch with the torch reference in this
            # process (4 x 256 x 3 x 224^2 floats) and makes the baseline look slower
            ref = ReferenceLoader(ref.loader, ref.num_views, _masks_on(device, cfg))
        name = f"torchvision reference, {a.reference_workers} workers"
        rates[name] = time_loader(ref, max(3, a.iters // 10), 1, dev)
    results["images_per_s"] = rates
    results["memory_after_bytes"] = device_used_bytes()
    results["ok"] = bool(ok)
    print(f"\n| what (batch {a.batch}, {a.threads} threads, hw_decoder_load {a.hw_decoder_load}) | images/s |")
    print("| --- | --- |")
    for name, r in rates.items():
        print(f"| {name} | {r:,.0f} |")
    dec = rates["decode"]
    print(f"| views+high-pass / decode | {rates['decode+views+highpass'] / dec:.0%} |")
    if results["memory_after_bytes"] is not None:
        print(f"device memory in use: {results['memory_before_bytes'] / 2**30:.2f} GiB before, "
              f"{results['memory_after_bytes'] / 2**30:.2f} GiB after (all pipelines of this script alive)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    print("SUMMARY gpu_pipeline_check", "ok" if ok else "FAILED")
    return 0 if ok else 1


def _masks_on(device: torch.device, cfg):
    """views -> views moved to ``device`` (non-blocking) and masked there."""
    mask = mask_fn_from_cfgs([v.mask for v in cfg.views], rank_seed(cfg.train.seed, 0))
    return lambda views: mask([v.to(device, non_blocking=True) for v in views])


def _decode_only(source, dev, hw_decoder_load, **kw):
    from nvidia.dali import pipeline_def

    from mscn.pipelines.ops import decode
    from mscn.pipelines.readers import read

    @pipeline_def(**kw)
    def pipe():
        encoded, _, _ = read(source, shard_id=0, num_shards=1, shuffle=True, shuffle_buffer=4096,
                             stick_to_shard=False, name=READER_NAME)
        return decode(encoded, dev, hw_decoder_load)  # pipe.run() leaves it in DALI: no copy

    return pipe()


if __name__ == "__main__":
    sys.exit(main())
