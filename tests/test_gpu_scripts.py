"""The GPU check's scripts on the CPU path, so that a lent GPU's minutes are not lost to a typo:
``gpu_pipeline_check.py --cpu-dry-run`` runs every check with DALI's CPU backend on both sides,
and ``gpu_summary.py`` turns real bench JSON files (from CPU runs) into the headline summary."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_fixtures import make_folder

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
TINY = ["--size", "32", "--batch", "4", "--warmup", "1", "--iters", "1", "--repeats", "2", "--torch-threads", "1"]


def run(script: str, *args, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


def test_gpu_pipeline_check_dry_run_passes_every_check(tmp_path):
    root = make_folder(tmp_path / "data", classes=2, per_class=6, size=(96, 72))
    proc = run("gpu_pipeline_check.py", "--data", root, "--batch", "8", "--threads", "1", "--cpu-dry-run",
               "--json", tmp_path / "p.json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((tmp_path / "p.json").read_text())
    assert r["ok"] and r["decoded_gpu_vs_cpu_mean_abs_levels"] == {"0.0": 0.0, "1.0": 0.0}
    for load in (0.0, 1.0):  # CPU against CPU: identical views, exact high-pass
        e = r[f"eval_hw_decoder_load_{load}"]
        assert e["view_mean_abs"] == 0.0 and e["highpass_rel_err"] < 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """bench.json, memory.json and train_r18.json as gpu_check.sh leaves them, from CPU runs."""
    out = tmp_path_factory.mktemp("gpu_results")
    data = make_folder(out / "data", classes=2, per_class=6)
    common = ["--data", data, *TINY]
    for name, args in (("bench", ["--stages", "decode,masks,masks-hp-late,masks-crop-window", "--baseline", "dali-plain"]),
                       ("memory", ["--stages", "masks"]),
                       ("train_r18", ["--train", "--arch", "resnet18", "--train-steps", "2", "--feeds", "masks"])):
        proc = run("bench_pipeline.py", *common, *args, "--json", out / f"{name}.json")
        assert proc.returncode == 0, proc.stderr[-3000:]
    # the LARS step, multi-tensor vs loop (on the meta device here: host work only)
    proc = run("bench_optimizer.py", "--arch", "resnet18", "--iters", "1", "--repeats", "1", "--json",
               out / "optimizer.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resnet18  simclr: 66 tensors, multi-tensor" in proc.stdout and "meta device" in proc.stdout
    return out


def test_gpu_summary_reads_the_bench_files(results):
    proc = run("gpu_summary.py", results)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((results / "gpu_summary.json").read_text())
    bench = json.loads((results / "bench.json").read_text())
    train = json.loads((results / "train_r18.json").read_text())
    assert s["card"] is None and s["cores"] >= 1 and s["versions"]["dali"]
    assert s["share_of_decode"] == bench["share_of_decode"]
    assert list(bench["stages"]) == ["decode", "masks", "masks-hp-late", "masks-crop-window"]
    assert bench["pipeline"] == bench["stages"]["masks"]  # the variants are not the training input
    assert s["plain_dali_share_of_decode"] == bench["baselines"]["dali-plain"]["share_of_decode"]
    assert s["kept_resnet18"] == train["train"]["feeds"]["masks"]["kept"] and s["kept_resnet50"] is None
    assert s["apply_masks_ms"] is None and s["pipeline_gib"] is None  # CPU runs: not measured
    assert s["apply_masks_fused_ms"] is None
    lars = json.loads((results / "optimizer.json").read_text())["rows"][0]
    assert s["lars_step_ms"] == {"resnet18": {"multi_tensor": lars["multi_tensor_ms"], "loop": lars["loop_ms"]}}
    assert s["kept_resnet18_lars_loop"] is None  # not run here
    # the A/B verdicts: a variant is better or worse only when the rows' ranges do not overlap
    got = {d["variant"]: d for d in s["decisions"]}
    assert set(got) == {"masks-hp-late", "masks-crop-window"}  # the variants this bench ran
    for v, d in got.items():
        a, b = (bench["stages"][k]["images_per_s"] for k in ("masks", v))
        want = "better" if b["q1"] > a["q3"] else "worse" if b["q3"] < a["q1"] else "inside the spread"
        assert d["verdict"] == want and d["value"] == round(b["median"], 4)
        assert (d["switch"] is not None) == (want == "better")
        assert any(ln.startswith(f"DECIDE pipeline images/s (one process): {v} ") for ln in proc.stdout.splitlines())
    assert len(s["commands"]) == 3
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY")]
    assert any(ln.startswith("SUMMARY kept_resnet50 = None") and "not measured" in ln for ln in lines)
    assert any(ln.startswith("SUMMARY share_of_decode =") and "target >= 0.85" in ln for ln in lines)
