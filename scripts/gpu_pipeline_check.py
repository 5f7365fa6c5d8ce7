#!/usr/bin/env python3
"""Check the GPU pipeline against its CPU twin (run on a GPU machine; timings are bench_pipeline.py's).

    python scripts/gpu_pipeline_check.py --data /tmp/mscn_synth/train --json out.json

Checks (exit code 1 if one fails):
  1. the decoders: mean |GPU - CPU| of the decoded uint8 pixels of the same JPEGs, for
     the CUDA (hybrid) decoder and the hardware decoder (``hw_decoder_load`` 0 and 1);
  2. the eval view, GPU vs CPU, same samples: the difference must stay within what the
     decoders start with (``2 * gap / min(std)``: resize/crop average, the high-pass
     ``I - G`` at most doubles a difference, normalization divides it by std);
  3. DALI's GPU high-pass against the float64 torch reference on the same GPU view;
  4. the training loader on the GPU: shapes, dtype, labels, masks, flag frequencies.

Without a GPU it prints a message and exits 0. ``--cpu-dry-run`` runs the same code
on DALI's CPU path on both sides, to test this script on a CPU-only machine.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from benchkit.steps import Placement, decode_pipeline
from mscn.config import load_config
from mscn.highpass import highpass_params
from mscn.highpass import highpass_torch
from mscn.pipelines import FLAG_NAMES, build_train_loader, eval_pipeline, output_names, resolve_source, views_pipeline


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="ImageFolder root, file list or folder of tar shards")
    p.add_argument("--batch", type=int, default=64, help="images per check batch")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--json", default=None)
    p.add_argument("--cpu-dry-run", action="store_true", help="test this script on DALI's CPU path")
    return p.parse_args(argv)


def as_numpy(tl) -> list[np.ndarray]:
    """A DALI TensorList (CPU or GPU) as a list of float64 arrays (samples may differ in shape)."""
    tl = tl.as_cpu() if hasattr(tl, "as_cpu") else tl
    return [np.asarray(x, dtype=np.float64) for x in tl]


def decode_gaps(source, a, dev: str) -> dict:
    """{hw_decoder_load: mean |dev - CPU| of the decoded uint8 pixels} over one batch."""
    gaps = {}
    for load in (0.0, 1.0):
        out = {}
        for side in dict.fromkeys((dev, "cpu")):  # a dry run (dev "cpu") decodes once
            where = Placement(side, 0 if side == "gpu" else None, a.threads, load, a.batch, prefetch=1)
            pipe = decode_pipeline(source, where, shuffle_buffer=1)
            pipe.build()
            out[side] = as_numpy(pipe.run()[0])
        gaps[load] = float(np.mean([np.abs(x - y).mean() for x, y in zip(out[dev], out["cpu"])]))
    return gaps


def check_eval(source, cfg, a, dev: str, results: dict) -> bool:
    d, hp = cfg.data, highpass_params(cfg.highpass)
    ok = True
    gaps = decode_gaps(source, a, dev)
    results["decoded_gpu_vs_cpu_mean_abs_levels"] = gaps
    for load, gap in gaps.items():
        common = dict(image_size=d.image_size, resize=d.val_resize, mean=d.mean, std=d.std, batch_size=a.batch,
                      num_threads=a.threads, seed=0, hw_decoder_load=load)
        outs = {}
        for name, device, highpass in (("dev_hp", dev, hp), ("dev_raw", dev, None), ("cpu_hp", "cpu", hp)):
            pipe = eval_pipeline(source, highpass=highpass, device=device,
                                 device_id=0 if device == "gpu" else None, **common)
            pipe.build()
            outs[name] = np.stack(as_numpy(pipe.run()[0]))
        ref = highpass_torch(torch.from_numpy(outs["dev_raw"]), *hp).numpy()
        hp_err = float(np.linalg.norm(outs["dev_hp"] - ref) / np.linalg.norm(ref))
        diff = float(np.abs(outs["dev_hp"] - outs["cpu_hp"]).mean())
        bound = 2 * gap / min(d.std) + 2e-3
        corr = float(np.corrcoef(outs["dev_hp"].ravel(), outs["cpu_hp"].ravel())[0, 1])
        good = hp_err < 1e-3 and diff <= bound and corr > 0.98
        ok &= good
        results[f"eval_hw_decoder_load_{load}"] = {"decoded_gap_levels": gap, "view_mean_abs": diff, "bound": bound,
                                                   "corr": corr, "highpass_rel_err": hp_err}
        print(f"check eval (hw_decoder_load {load}): decoded pixels differ by {gap:.3f} levels; views by "
              f"{diff:.4f} (bound {bound:.4f}), corr {corr:.4f}; high-pass vs float64 rel err {hp_err:.1e} "
              f"-> {'ok' if good else 'FAILED'}")
    return ok


def check_train(source, cfg, a, dev: str, results: dict) -> bool:
    device = torch.device("cuda", 0) if dev == "gpu" else None
    batch = next(iter(build_train_loader(cfg, device=device)))
    want = torch.float16 if dev == "gpu" else torch.float32  # data.output_dtype=auto
    ok = (len(batch.views) == len(cfg.views) and all(v.dtype == want for v in batch.views)
          and all(v.shape == (a.batch, 3, cfg.data.image_size, cfg.data.image_size) for v in batch.views)
          and batch.labels.shape == (a.batch,) and (batch.views[0] == 0).float().mean().item() > 0.01)
    pipe = views_pipeline(source, cfg.views, image_size=cfg.data.image_size, device=dev, debug_outputs=True,
                          batch_size=a.batch, num_threads=a.threads, device_id=0 if dev == "gpu" else None, seed=1)
    pipe.build()
    names = output_names(len(cfg.views), source, debug_outputs=True)
    flags = dict(zip(names, pipe.run()))["view0_flags"]
    frac = np.stack(as_numpy(flags)).mean(axis=0)
    v0 = cfg.views[0]
    probs = np.array([v0.flip_prob, v0.jitter_prob, v0.grayscale_prob, v0.blur_prob, v0.solarize_prob])
    tol = 5 * np.sqrt(probs * (1 - probs) / a.batch) + 1e-9
    ok = ok and bool((np.abs(frac - probs) <= tol).all())
    results["train_view0_flag_fractions"] = dict(zip(FLAG_NAMES, map(float, frac)))
    print(f"check train loader: shapes/dtype/masks + view0 flag fractions {np.round(frac, 3).tolist()} "
          f"(p = {probs.tolist()}) -> {'ok' if ok else 'FAILED'}")
    return ok


def main(argv=None) -> int:
    a = parse_args(argv)
    if not torch.cuda.is_available() and not a.cpu_dry_run:
        print("gpu_pipeline_check: no CUDA device here; nothing to check (use --cpu-dry-run to test the script)")
        return 0
    dev = "cpu" if a.cpu_dry_run else "gpu"
    cfg = load_config(None, [f"data.root={a.data}", f"train.global_batch={a.batch}", f"data.num_threads={a.threads}"])
    source = resolve_source(a.data)
    if source.num_samples < a.batch:
        print(f"gpu_pipeline_check: {a.data} has {source.num_samples} images < batch {a.batch}")
        return 1
    results = {"device": torch.cuda.get_device_name(0) if dev == "gpu" else "cpu (dry run)",
               "batch": a.batch, "threads": a.threads, "images": source.num_samples}
    ok = check_eval(source, cfg, a, dev, results) & check_train(source, cfg, a, dev, results)
    results["ok"] = bool(ok)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    print("SUMMARY gpu_pipeline_check", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
