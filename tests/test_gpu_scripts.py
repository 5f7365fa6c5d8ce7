"""The GPU check's scripts on the CPU path, so that a lent GPU's minutes are not lost to a typo:
``gpu_pipeline_check.py --cpu-dry-run`` runs every check with DALI's CPU backend on both sides,
and ``gpu_summary.py`` turns real bench JSON files (from CPU runs) into the headline summary."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
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


def test_probe_syncs_dry_run_runs_every_probe(tmp_path):
    """probe_syncs.py --cpu-dry-run: every probe of the feed runs (on DALI's CPU path, with no
    stream to wait for) and lands in the JSON; the verdict rule reads a host time against the
    queued GPU time."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        from probe_syncs import verdict
    finally:
        sys.path.remove(str(SCRIPTS))
    assert verdict(190.0, 200.0) == "waits for the stream" and verdict(3.0, 200.0) == "does not wait"
    assert verdict(3.0, None) == "cpu"
    root = make_folder(tmp_path / "data", classes=2, per_class=8, size=(96, 72))
    proc = run("probe_syncs.py", "--data", root, "--batch", "4", "--repeats", "1", "--cpu-dry-run",
               "--json", tmp_path / "p.json", "data.image_size=32", "data.num_threads=1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((tmp_path / "p.json").read_text())
    assert [p["probe"] for p in r["probes"]] == ["h2d-pageable", "h2d-pinned", "dali-next", "convert", "release",
                                                 "loader-next", "loader-state", "handover-trainer",
                                                 "handover-private"]
    assert all(p["verdict"] == "cpu" and p["host_ms"] >= 0 for p in r["probes"])
    assert all(p["stream_wait_ms"] is None for p in r["probes"][-2:])  # a GPU figure: none here
    assert r["blur_where"] == "pipeline"  # auto, resolved for the CPU path
    assert proc.stdout.count("SYNCPROBE ") == 9
    one = run("probe_syncs.py", "--data", root, "--batch", "16", "--cpu-dry-run", "data.image_size=32")
    assert one.returncode == 2 and "at least 2 batches per epoch" in one.stderr and "Traceback" not in one.stderr


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """bench.json, memory.json and train_r18.json as gpu_check.sh leaves them, from CPU runs."""
    out = tmp_path_factory.mktemp("gpu_results")
    data = make_folder(out / "data", classes=2, per_class=6)
    common = ["--data", data, *TINY]
    for name, args in (("bench", ["--stages", "decode,masks,masks-hp-late,masks-crop-window,masks-concurrent", "--baseline", "dali-plain"]),
                       ("memory", ["--stages", "masks"]),
                       ("train_r18", ["--train", "--arch", "resnet18", "--train-steps", "2", "--feeds", "masks",
                                      "--profile", out / "prof", "--profile-steps", "1"])):
        proc = run("bench_pipeline.py", *common, *args, "--json", out / f"{name}.json")
        assert proc.returncode == 0, proc.stderr[-3000:]
    # the LARS step, multi-tensor vs loop (on the meta device here: host work only)
    proc = run("bench_optimizer.py", "--arch", "resnet18", "--iters", "1", "--repeats", "1", "--json",
               out / "optimizer.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resnet18  simclr: 66 tensors, multi-tensor" in proc.stdout and "meta device" in proc.stdout
    # a --json that cannot be written fails in one line, before the timing (it was a traceback after it)
    proc = run("bench_optimizer.py", "--arch", "resnet18", "--json", out / "optimizer.json" / "x.json")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "bench_optimizer: error: --json" in proc.stderr and "cannot be written there (not writable)" in proc.stderr
    assert "LARS step" not in proc.stdout
    return out


def test_gpu_summary_reads_the_bench_files(results):
    proc = run("gpu_summary.py", results)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((results / "gpu_summary.json").read_text())
    bench = json.loads((results / "bench.json").read_text())
    train = json.loads((results / "train_r18.json").read_text())
    assert s["card"] is None and s["cores"] >= 1 and s["versions"]["dali"]
    assert s["share_of_decode"] == bench["share_of_decode"]
    assert list(bench["stages"]) == ["decode", "masks", "masks-hp-late", "masks-crop-window", "masks-concurrent"]
    assert bench["pipeline"] == bench["stages"]["masks"]  # the variants are not the training input
    assert s["plain_dali_share_of_decode"] == bench["baselines"]["dali-plain"]["share_of_decode"]
    assert s["kept_resnet18"] == train["train"]["feeds"]["masks"]["kept"] and s["kept_resnet50"] is None
    assert s["apply_masks_ms"] is None and s["pipeline_gib"] is None  # CPU runs: not measured
    lars = json.loads((results / "optimizer.json").read_text())["rows"][0]
    assert s["lars_step_ms"] == {"resnet18": {"multi_tensor": lars["multi_tensor_ms"], "loop": lars["loop_ms"]}}
    assert s["kept_resnet18_lars_loop"] is None  # not run here
    # the A/B verdicts: a variant is better or worse only when the rows' ranges do not overlap
    got = {d["variant"]: d for d in s["decisions"]}
    assert set(got) == {"masks-hp-late", "masks-crop-window", "masks-concurrent"}  # the variants this bench ran
    for v, d in got.items():
        a, b = (bench["stages"][k]["images_per_s"] for k in ("masks", v))
        want = "better" if b["q1"] > a["q3"] else "worse" if b["q3"] < a["q1"] else "inside the spread"
        assert d["verdict"] == want and d["value"] == round(b["median"], 4)
        assert (d["switch"] is not None) == (want == "better")
        assert any(ln.startswith(f"DECIDE pipeline images/s (one process): {v} ") for ln in proc.stdout.splitlines())
    assert len(s["commands"]) == 3
    assert "incomplete" not in s and "INCOMPLETE" not in proc.stdout
    # the --profile summaries the run holds (here: the trainer's, from a CPU run)
    assert set(s["profiles"]) == {"resnet18 fed by synthetic", "resnet18 fed by masks"}
    assert s["profiles"]["resnet18 fed by masks"] == train["train"]["feeds"]["masks"]["profile"]
    assert "PROFILE resnet18 fed by synthetic: torch ops" in proc.stdout
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY")]
    assert any(ln.startswith("SUMMARY kept_resnet50 = None") and "not measured" in ln for ln in lines)
    assert any(ln.startswith("SUMMARY share_of_decode =") and "target >= 0.85" in ln for ln in lines)


def test_gpu_summary_names_a_bench_that_stopped(results, tmp_path):
    """A bench that fails late keeps its timed rows, marked incomplete: the summary says so."""
    import shutil

    for f in results.glob("*.json"):
        shutil.copy(f, tmp_path / f.name)
    doc = json.loads((tmp_path / "bench.json").read_text())
    doc["incomplete"] = "MscnError: the dali-plain row failed"
    (tmp_path / "bench.json").write_text(json.dumps(doc))
    proc = run("gpu_summary.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((tmp_path / "gpu_summary.json").read_text())
    assert s["incomplete"] == {"bench.json": "MscnError: the dali-plain row failed"}
    assert "INCOMPLETE bench.json: the run stopped (MscnError: the dali-plain row failed)" in proc.stdout


PART3_STEPS = ["tests", "probe", "masks", "draws", "bench", "host-ceiling", "train18", "train50", "memory", "pipeline",
               "train50-compile", "ab-isolated", "train18-compile", "sweep-affinity"]


def _gpu_check(tmp_path, budget: int, sleep: float, share: int = 0,
               steps: str = "") -> tuple[subprocess.CompletedProcess, list[str], float]:
    """gpu_check.sh part 3 with a stand-in python that only logs its arguments and sleeps
    (not for the version probe): the script's own bookkeeping (budget, skips, cuts, summary,
    hand-back to $OUT), no GPU."""
    fake, calls = tmp_path / "python", tmp_path / "calls.txt"
    fake.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\ncase "$*" in "-P -c "*) exit 0 ;; esac\nsleep {sleep}\n')
    fake.chmod(0o755)
    (tmp_path / "data" / "train").mkdir(parents=True, exist_ok=True)  # as if synthesized: no synth step
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "MSCN_GPU_RESULTS": str(tmp_path / "r"),
           "MSCN_BENCH_DATA": str(tmp_path / "data"), "MSCN_GPU_BUDGET_S": str(budget), "MSCN_GPU_RESERVE_S": "0",
           "MSCN_GPU_MIN_STEP_S": "1", "MSCN_GPU_STEP_SHARE": str(share), "MSCN_GPU_STEPS": steps}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "3"], capture_output=True, text=True, env=env,
                          timeout=120, cwd=REPO)
    wall = time.monotonic() - t0
    name = "gpu_check_part3_followup.log" if steps else "gpu_check_part3.log"
    log = (tmp_path / "r" / name).read_text()
    ran = [ln[4:].split(":", 1)[0] for ln in log.splitlines() if ln.startswith("=== ") and " done in " not in ln]
    assert (tmp_path / "out" / name).is_file() and (tmp_path / "out" / "results_part3.tar.gz").is_file()
    assert "scripts/gpu_summary.py" in calls.read_text()  # the summary always runs
    return proc, ran, wall


def _digest(proc, word: str) -> list[str]:
    """Step names on the digest's ``WORD name:`` lines (the digest follows "--- summary")."""
    digest = proc.stdout.split("--- summary\n", 1)[1].splitlines()
    return [ln.split()[1].rstrip(":") for ln in digest if ln.startswith(word + " ")]


def test_gpu_check_without_a_budget_runs_every_step(tmp_path):
    proc, ran, _ = _gpu_check(tmp_path, budget=0, sleep=0)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ran == PART3_STEPS + ["summary"] and "SKIPPED" not in proc.stdout


def test_gpu_check_budget_skips_the_last_steps_and_keeps_the_summary(tmp_path):
    """A lent GPU's call is cut at 600 s: with MSCN_GPU_BUDGET_S the run stops starting steps
    when the budget is spent, names what it skipped, and still writes the summary."""
    proc, ran, wall = _gpu_check(tmp_path, budget=3, sleep=0.6)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ran[-1] == "summary"
    done = ran[:-1]
    assert 1 <= len(done) < len(PART3_STEPS) and done == PART3_STEPS[:len(done)]  # a prefix, in order
    assert _digest(proc, "SKIPPED") == PART3_STEPS[len(done):]  # the rest, each named in the digest
    assert wall < 3 + 0.6 + 0.6 + 3  # the summary comes on top of the budget; slack


def test_gpu_check_skips_a_step_that_would_not_fit_and_goes_on(tmp_path):
    """A step starts only with half its own limit left (MSCN_GPU_STEP_SHARE 50): with 50 s the
    steps limited to over 100 s are skipped, and the shorter ones after them still run."""
    proc, ran, _ = _gpu_check(tmp_path, budget=50, sleep=0, share=50)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    fits = ["probe", "masks", "draws", "host-ceiling", "memory", "pipeline"]  # limits of 60-90 s
    assert ran == fits + ["summary"]
    assert _digest(proc, "SKIPPED") == [s for s in PART3_STEPS if s not in fits]


def test_gpu_check_follow_up_call_runs_only_the_named_steps_and_keeps_the_first_log(tmp_path):
    """MSCN_GPU_STEPS: a second call on the warm machine runs the steps the first one's
    budget skipped, then the summary over all results; the first call's log stays."""
    first, _, _ = _gpu_check(tmp_path, budget=0, sleep=0)
    assert first.returncode == 0
    kept = (tmp_path / "r" / "gpu_check_part3.log").read_text()
    proc, ran, _ = _gpu_check(tmp_path, budget=0, sleep=0, steps="train18-compile,ab-isolated")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ran == ["ab-isolated", "train18-compile", "summary"]  # the script's order, not the list's
    assert (tmp_path / "r" / "gpu_check_part3.log").read_text() == kept


def test_gpu_check_marks_a_step_the_budget_stopped_as_cut(tmp_path):
    proc, ran, _ = _gpu_check(tmp_path, budget=3, sleep=6)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]  # a cut is not a failure
    assert ran == ["tests", "summary"] and _digest(proc, "CUT") == ["tests"] and "FAILED" not in proc.stdout
    assert _digest(proc, "SKIPPED") == PART3_STEPS[1:]


def test_gpu_check_refuses_a_bad_budget(tmp_path):
    # a step name that is no step (a renamed one, copied from old docs) would run nothing, silently
    for env in ({"MSCN_GPU_BUDGET_S": "9m"}, {"MSCN_GPU_MIN_STEP_S": "0"},
                {"MSCN_GPU_STEPS": "train18-compile,tests-stats"}):
        proc = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "3"], capture_output=True, text=True,
                              env={**os.environ, **env, "OUT": str(tmp_path / "o"),
                                   "MSCN_GPU_RESULTS": str(tmp_path / "r")}, timeout=30, cwd=REPO)
        assert proc.returncode == 2 and "gpu_check.sh:" in proc.stderr and not (tmp_path / "r").exists()
    assert "MSCN_GPU_STEPS: no step 'tests-stats' (steps: ab-isolated " in proc.stderr
    # started from inside scripts/ the script still finds its own step list (it grepped "$0"
    # after its cd, found nothing, and refused every step)
    proc = subprocess.run(["bash", "gpu_check.sh", "3"], capture_output=True, text=True, timeout=30,
                          cwd=SCRIPTS, env={**os.environ, "MSCN_GPU_STEPS": "nosuch", "OUT": str(tmp_path / "o"),
                                            "MSCN_GPU_RESULTS": str(tmp_path / "r")})
    assert proc.returncode == 2 and "MSCN_GPU_STEPS: no step 'nosuch' (steps: ab-isolated " in proc.stderr


def test_gpu_summary_decides_on_torch_compile_by_the_fed_rate(results, tmp_path):
    """train_r18_compile.json (gpu_check.sh's train18-compile step) against train_r18.json: the
    verdict follows the fed rows' spreads; here the compiled rows are made 2x faster."""
    import shutil

    res = tmp_path / "results"
    shutil.copytree(results, res, ignore=shutil.ignore_patterns("prof", "data"))
    doc = json.loads((res / "train_r18.json").read_text())
    for m in [doc["train"]["synthetic"], *doc["train"]["feeds"].values()]:
        m["images_per_s"] = {k: (v * 2 if k != "n" else v) for k, v in m["images_per_s"].items()}
    (res / "train_r18_compile.json").write_text(json.dumps(doc))
    proc = run("gpu_summary.py", res)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((res / "gpu_summary.json").read_text())
    assert s["kept_resnet18_compiled"] == doc["train"]["kept"]
    assert s["resnet18_compiled_images_per_s"]["fed"] == doc["train"]["feeds"]["masks"]["images_per_s"]["median"]
    d = next(d for d in s["decisions"] if d["variant"] == "train.compile=true")
    assert d["verdict"] == "better" and d["switch"].startswith("set train.compile=true for GPU ResNet-18")
    assert d["what"].startswith("resnet18") and s["kept_resnet50_compiled"] is None  # no ResNet-50 row in these results
    # ResNet-50: its own eager and compiled files, its own verdict (here compiled is slower)
    r50 = json.loads(json.dumps(doc))
    r50["train"]["arch"] = "resnet50"
    (res / "train_r50.json").write_text(json.dumps(r50))
    for m in [r50["train"]["synthetic"], *r50["train"]["feeds"].values()]:
        m["images_per_s"] = {k: (v / 4 if k != "n" else v) for k, v in m["images_per_s"].items()}
    (res / "train_r50_compile.json").write_text(json.dumps(r50))
    proc = run("gpu_summary.py", res)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((res / "gpu_summary.json").read_text())
    d50 = next(d for d in s["decisions"] if d["what"].startswith("resnet50") and d["variant"] == "train.compile=true")
    assert d50["verdict"] == "worse" and d50["switch"] is None and d50["change"] == pytest.approx(-0.75, abs=1e-3)
    assert s["kept_resnet50_compiled"] == r50["train"]["kept"]
    assert d["change"] == pytest.approx(1.0, abs=1e-3)


def test_gpu_summary_reports_the_device_sync_row_beside_the_default(results, tmp_path):
    """train_r18.json with bench's masks-device-sync row (--device-sync-row, a GPU-only row,
    added here to a CPU run's file): its kept is reported beside the default's and is never
    the "best" full-pipeline kept; a file from before the setting reads as device-synced."""
    import shutil

    res = tmp_path / "results"
    shutil.copytree(results, res, ignore=shutil.ignore_patterns("prof", "data"))
    doc = json.loads((res / "train_r18.json").read_text())
    row = json.loads(json.dumps(doc["train"]["feeds"]["masks"]))
    row["kept"] = 9.0  # far above any real row: it must not become kept_resnet18_best
    doc["train"]["feeds"]["masks-device-sync"] = row
    doc["settings"]["sync"] = "stream"
    (res / "train_r18.json").write_text(json.dumps(doc))
    proc = run("gpu_summary.py", res)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((res / "gpu_summary.json").read_text())
    assert s["kept_resnet18_device_sync"] == 9.0 and s["kept_resnet18_best"] < 9.0 and s["sync"] == "stream"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY kept_resnet18_device_sync = 9.0: "))
    steps = doc["train"]["window_steps"]  # what the CPU run timed per window
    assert steps >= 1 and f"kept_resnet18 = {doc['train']['kept']} (windows of {steps} steps, stream sync)" in line
    del doc["settings"]["sync"], doc["train"]["feeds"]["masks-device-sync"]  # as rounds 1-3 wrote it
    (res / "train_r18.json").write_text(json.dumps(doc))
    for name in ("bench.json", "memory.json"):
        old = json.loads((res / name).read_text())
        old["settings"].pop("sync", None)
        (res / name).write_text(json.dumps(old))
    assert run("gpu_summary.py", res).returncode == 0
    s = json.loads((res / "gpu_summary.json").read_text())
    assert s["sync"] == "device" and s["kept_resnet18_device_sync"] is None


def test_gpu_summary_reads_round_5_files(results, tmp_path):
    """Where the default blurs in the loader (settings.blur_where, GPU runs since round 5), a
    variant that moves the high-pass within DALI is judged against masks-blur-dali, not
    against masks; files without the setting (earlier rounds) keep masks. The sync probes and
    the host time per ResNet-18 row reach the summary."""
    import shutil

    res = tmp_path / "results"
    shutil.copytree(results, res, ignore=shutil.ignore_patterns("prof", "data"))
    bench = json.loads((res / "bench.json").read_text())
    st = bench["stages"]
    st["masks-blur-dali"] = json.loads(json.dumps(st["masks"]))
    st["masks-blur-dali"]["images_per_s"] = {k: (v / 4 if k != "n" else v) for k, v in st["masks"]["images_per_s"].items()}
    bench["settings"]["blur_where"] = "loader"
    (res / "bench.json").write_text(json.dumps(bench))
    (res / "probe_syncs.json").write_text(json.dumps({"probes": [
        {"probe": "release", "host_ms": 180.2, "queued_ms": 200.0, "verdict": "waits for the stream"}]}))
    proc = run("gpu_summary.py", res)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((res / "gpu_summary.json").read_text())
    got = {d["variant"]: d for d in s["decisions"] if d["what"] == "pipeline images/s (one process)"}
    late = got["masks-hp-late"]
    assert late["base"] == "masks-blur-dali" and late["verdict"] == "better"  # 4x the slowed base
    assert late["default"] == round(st["masks-blur-dali"]["images_per_s"]["median"], 4)
    assert got["masks-blur-dali"]["base"] == "masks" and got["masks-blur-dali"]["verdict"] == "worse"
    assert got["masks-concurrent"]["base"] == "masks"
    assert any(ln.startswith("DECIDE pipeline images/s (one process): masks-hp-late ") and " vs masks-blur-dali "
               in ln for ln in proc.stdout.splitlines())
    assert s["sync_probes"] == {"release": {"host_ms": 180.2, "queued_ms": 200.0, "verdict": "waits for the stream"}}
    train = json.loads((res / "train_r18.json").read_text())["train"]
    assert s["host_ms_per_step_resnet18"]["masks"] == train["feeds"]["masks"]["host_ms_per_step"]
    assert set(s["host_ms_per_step_resnet18"]["synthetic"]) == {"step"}
    assert any(ln.startswith("HOST resnet18 fed by masks: batch ") for ln in proc.stdout.splitlines())
    assert s["settings"]["blur_where"] == "loader" and s["settings"]["compile"] is False
    # the variant that *is* the default's graph gets no verdict (masks-blur-loader here)
    st["masks-blur-loader"] = st["masks-blur-dali"]
    (res / "bench.json").write_text(json.dumps(bench))
    s = json.loads(run_ok(res))
    assert "masks-blur-loader" not in {d["variant"] for d in s["decisions"]}
    # without masks-blur-dali in such a run, those variants get no verdict (nothing fair to read them against)
    del st["masks-blur-dali"]
    (res / "bench.json").write_text(json.dumps(bench))
    s = json.loads(run_ok(res))
    assert "masks-hp-late" not in {d["variant"] for d in s["decisions"] if d["what"].startswith("pipeline")}
    # a file from before round 5 (no settings.blur_where: DALI blurred): read against masks
    del bench["settings"]["blur_where"]
    (res / "bench.json").write_text(json.dumps(bench))
    s = json.loads(run_ok(res))
    got = {d["variant"]: d for d in s["decisions"] if d["what"] == "pipeline images/s (one process)"}
    assert got["masks-hp-late"]["base"] == "masks" and "masks-blur-loader" in got


def test_gpu_summary_judges_the_colour_move_alone(results, tmp_path):
    """masks-colour-loader moves the colour *and* the blur: where the default already blurs
    in the loader (a GPU run) it is read against masks; elsewhere against masks-blur-loader,
    so that its verdict is the colour's move alone (none without that row)."""
    import shutil

    res = tmp_path / "results"
    shutil.copytree(results, res, ignore=shutil.ignore_patterns("prof", "data"))
    bench = json.loads((res / "bench.json").read_text())
    st = bench["stages"]
    st["masks-colour-loader"] = json.loads(json.dumps(st["masks"]))
    st["masks-colour-loader"]["images_per_s"] = {k: (v * 4 if k != "n" else v)
                                                 for k, v in st["masks"]["images_per_s"].items()}

    def colour_row(blur_where, with_blur_row):
        bench["settings"]["blur_where"] = blur_where
        if with_blur_row:
            st["masks-blur-loader"] = json.loads(json.dumps(st["masks"]))
        else:
            st.pop("masks-blur-loader", None)
        (res / "bench.json").write_text(json.dumps(bench))
        s = json.loads(run_ok(res))
        return {d["variant"]: d for d in s["decisions"] if d["what"] == "pipeline images/s (one process)"}

    got = colour_row("loader", False)["masks-colour-loader"]
    assert got["base"] == "masks" and got["verdict"] == "better"
    assert "data.colour_where=loader" in got["switch"]
    assert colour_row("pipeline", True)["masks-colour-loader"]["base"] == "masks-blur-loader"
    assert "masks-colour-loader" not in colour_row("pipeline", False)


def run_ok(res) -> str:
    proc = run("gpu_summary.py", res)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return (res / "gpu_summary.json").read_text()


def test_gpu_summary_sets_each_pipeline_against_its_host_ceiling(results, tmp_path):
    """host_ceiling.json (gpu_check.sh's host-ceiling step: the same pipelines on smaller views)
    gives every row the two files share its share of the tiny rate; a file that is not smaller
    than the bench's is not a ceiling and gives none."""
    import shutil

    res = tmp_path / "results"
    shutil.copytree(results, res, ignore=shutil.ignore_patterns("prof", "data"))
    data = make_folder(tmp_path / "data", classes=2, per_class=6, size=(24, 18))
    small = [a if a != "32" else "16" for a in TINY]
    grids = [f"views.{i}.mask.grid=8" for i in range(4)]  # the recipe's 32 px grid needs views of 32 px or more
    proc = run("bench_pipeline.py", *grids, "--data", data, *small, "--stages", "decode,masks", "--baseline",
               "dali-plain", "--json", res / "host_ceiling.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = json.loads((res / "bench.json").read_text())
    tiny = json.loads((res / "host_ceiling.json").read_text())
    proc = run("gpu_summary.py", res)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((res / "gpu_summary.json").read_text())
    assert set(s["host_ceiling"]) == {"decode", "masks", "dali-plain"}  # the rows both files have
    for row, c in s["host_ceiling"].items():
        full = (bench["stages"].get(row) or bench["baselines"][row])["images_per_s"]["median"]
        low = (tiny["stages"].get(row) or tiny["baselines"][row])["images_per_s"]["median"]
        assert (c["images_per_s"], c["ceiling_images_per_s"]) == (full, low)
        assert c["of_ceiling"] == round(full / low, 4) and (c["size"], c["ceiling_size"]) == (32, 16)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CEILING ")]
    assert len(lines) == 3 and any(ln.startswith("CEILING masks: ") and "(16 px views, not 32)" in ln for ln in lines)
    tiny["settings"]["size"] = 32  # the same size as the bench's: no ceiling
    (res / "host_ceiling.json").write_text(json.dumps(tiny))
    assert "host_ceiling" not in json.loads(run_ok(res))


def test_every_python_started_with_m_or_c_cannot_import_the_checkouts_folder():
    """On the GPU box the package is installed beside the checkout, and these scripts run in
    its root: a Python started there with ``-m`` or ``-c`` puts the root first on sys.path, so
    the checkout's ``mscn/`` folder (without ``mscn.pipelines``, which lives in pipelines/)
    shadows the installed package. ``-P`` guards that one process; a test that starts Python
    itself (tests/test_pipeline_colour.py) needs ``PYTHONSAFEPATH=1`` in the environment."""
    bad = []
    for script in ("gpu_check.sh", "gpu_ablate.sh"):
        for n, line in enumerate((SCRIPTS / script).read_text().splitlines(), 1):
            for m in re.finditer(r"\$PY((?: -[A-Za-z]+)*?) -([mc])\b", line):
                flags, kind = m.group(1).split(), m.group(2)
                guarded = "-P" in flags or "PYTHONSAFEPATH=1" in line[:m.start()]
                if kind == "m" and line[m.end():].lstrip().startswith("pytest"):
                    guarded = "PYTHONSAFEPATH=1" in line[:m.start()]  # its tests' own subprocesses too
                if not guarded:
                    bad.append(f"{script}:{n}: {line.strip()[:90]}")
    assert not bad, "\n".join(bad)
