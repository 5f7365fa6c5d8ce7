"""scripts/bench_pipeline.py and its harness (scripts/benchkit/), on real DALI/torch on the CPU.

The CLI runs as a subprocess with tiny settings (64x48 JPEGs, 32 px views, batch 4);
the JSON must hold every figure with values that agree with each other. Benchmarks
are not timed tests: no assertion here is about speed, only about what the numbers mean.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mscn.data.synth import synthesize
from mscn.errors import ConfigError, MscnError
from mscn.pipelines.tuning import usable_cores

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "bench_pipeline.py"
sys.path.insert(0, str(REPO / "scripts"))  # benchkit lives beside the scripts, outside the package
from benchkit import env as benv  # noqa: E402
from benchkit import timing  # noqa: E402
TINY = ["--size", "32", "--batch", "4", "--warmup", "1", "--torch-threads", "1"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("bench") / "synth"
    return synthesize(out, classes=4, per_class=4, size=(64, 48), workers=1, progress=False)["train"]


def run_bench(*args, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def check_measurement(m: dict, batch: int, iters: int, repeats: int, views: int = 4) -> None:
    r = m["images_per_s"]
    assert 0 < r["min"] <= r["q1"] <= r["median"] <= r["q3"] <= r["max"], m
    assert r["n"] == repeats and len(m["window_s"]) == repeats
    assert m["window_images"] == [batch * iters] * repeats
    rates = sorted(n / t for n, t in zip(m["window_images"], m["window_s"]))
    assert r["min"] == pytest.approx(rates[0], rel=1e-2, abs=0.01)
    assert m["views_per_s"]["median"] == pytest.approx(views * r["median"], rel=1e-2, abs=0.05)
    assert m["wall_s"] == pytest.approx(sum(m["window_s"]), abs=2e-3)
    # CPU time is bounded by what the cores could give while it was read (1 tick of slack each read)
    assert m["cpu_wall_s"] >= m["wall_s"] - 2e-3
    assert 0 <= m["cpu_seconds"] <= m["cores"] * m["cpu_wall_s"] + 0.05, m
    assert m["gpu_memory"] is None  # CPU run: n/a


def test_cli_json_holds_every_figure(tiny_data, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = run_bench("--data", tiny_data, *TINY, "--iters", "2", "--repeats", "2",
                     "--stages", "decode,bare,views,highpass,masks", "--baseline", "torchvision,dali-plain",
                     "--baseline-workers", "0", "--train", "--arch", "resnet18", "--train-steps", "2",
                     "--json", out, "--plot", png)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())

    import nvidia.dali
    import torch

    env = r["env"]
    assert env["cpu_count"] >= 1 and env["usable_cores"] >= 1 and env["gpu_name"] is None
    assert env["dali"] == nvidia.dali.__version__ and env["torch"] == torch.__version__
    assert "--train-steps 2" in env["command"] and env["torch_threads"] == 1
    assert r["dataset"] == {"path": tiny_data, "format": "folder", "num_images": 16, "synthesized": False,
                            "jpeg_kb_median": r["dataset"]["jpeg_kb_median"]}
    assert r["settings"]["batch"] == 4 and r["settings"]["views"] == 4 and r["settings"]["size"] == 32
    # the default recipe compiles; the bench times the eager step unless asked, and says so;
    # data.blur_where=auto resolved for the CPU path
    assert r["settings"]["compile"] is False and r["settings"]["blur_where"] == "pipeline"

    for stage in ("decode", "bare", "views", "highpass", "masks"):
        check_measurement(r["stages"][stage], batch=4, iters=2, repeats=2)
    rate = {k: m["images_per_s"]["median"] for k, m in r["stages"].items()}
    assert rate["decode"] > rate["masks"]  # decode alone is a strict subset of the work
    assert r["pipeline"] == r["stages"]["masks"]
    assert r["share_of_decode"] == pytest.approx(rate["masks"] / rate["decode"], rel=1e-2, abs=1e-3)

    tv, plain = r["baselines"]["torchvision"], r["baselines"]["dali-plain"]
    check_measurement(tv, batch=4, iters=2, repeats=2)
    assert tv["workers"] == 0
    assert tv["mscn_over_baseline"] == pytest.approx(rate["masks"] / tv["images_per_s"]["median"], rel=1e-2)
    check_measurement(plain, batch=4, iters=2, repeats=2)  # the hand-written DALI pipeline
    assert plain["mscn_over_baseline"] == pytest.approx(rate["masks"] / plain["images_per_s"]["median"], rel=1e-2)
    # stored rounded to 3 decimals: at a few % of decode-only that is up to 0.0005 absolute
    assert plain["share_of_decode"] == pytest.approx(plain["images_per_s"]["median"] / rate["decode"],
                                                     rel=1e-2, abs=5e-4)

    t = r["train"]
    assert (t["arch"], t["method"], t["steps"]) == ("resnet18", "simclr", 2)
    assert list(t["feeds"]) == ["bare", "colour", "views", "highpass", "masks"]  # no priority row on the CPU
    check_measurement(t["synthetic"], batch=4, iters=1, repeats=2)
    syn = t["synthetic"]["images_per_s"]["median"]
    for feed, m in t["feeds"].items():
        check_measurement(m, batch=4, iters=1, repeats=2)
        rate = m["images_per_s"]["median"]
        assert m["kept"] == pytest.approx(rate / syn, abs=2e-3)
        assert m["ms_taken_per_step"] == pytest.approx(1e3 * 4 * (1 / rate - 1 / syn), abs=0.02)
        # host time per step: taking the batch (DALI and the loader) and queueing the step
        assert set(m["host_ms_per_step"]) == {"batch", "step"} and min(m["host_ms_per_step"].values()) > 0
        # medians over the timed steps only (here one per window): each part lies within a window
        assert max(m["host_ms_per_step"].values()) <= 1e3 * max(m["window_s"])
    assert set(t["synthetic"]["host_ms_per_step"]) == {"step"}
    assert t["kept"] == t["feeds"]["masks"]["kept"]
    assert t["input_bound_fraction"] == pytest.approx(1 - t["kept"], abs=2e-3)
    assert r["gpu_memory"] is None

    lines = proc.stdout.splitlines()
    summary = [ln for ln in lines if ln.startswith("SUMMARY")]
    assert any("baseline torchvision" in ln for ln in summary)
    assert any(ln.startswith("SUMMARY train resnet18") and "masks" in ln for ln in summary)
    assert sum(ln.startswith("| + masks (as torch tensors) |") for ln in lines) == 2  # stage row, train row
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_sweep_picks_the_fastest_and_profiles(tiny_data, tmp_path):
    out, prof = tmp_path / "sweep.json", tmp_path / "prof"
    proc = run_bench("--data", tiny_data, *TINY, "--iters", "1", "--repeats", "2", "--stages", "masks",
                     "--sweep", "batch=2,4", "threads=1,2", "--profile", prof, "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = json.loads(out.read_text())["sweep"]
    assert [row["setting"] for row in sweep["rows"]] == [
        {"batch": 2, "threads": 1}, {"batch": 2, "threads": 2}, {"batch": 4, "threads": 1}, {"batch": 4, "threads": 2}]
    for row in sweep["rows"]:
        check_measurement(row, batch=row["setting"]["batch"], iters=1, repeats=2)
    best = max(sweep["rows"], key=lambda row: row["images_per_s"]["median"])
    assert sweep["best"] == best["setting"] and sweep["best_images_per_s"] == best["images_per_s"]["median"]
    assert any(ln.startswith("SUMMARY sweep best:") for ln in proc.stdout.splitlines())
    trace = json.loads((prof / "masks_rank0.json").read_text())
    assert any(str(e.get("name", "")).startswith("bench_step_") for e in trace["traceEvents"])


def test_train_feeds_from_a_thread_and_with_held_outputs(tiny_data, tmp_path):
    """The round-5 feeds: masks-thread (batches taken by the data.feed_thread worker) and
    masks-hold (DALI's outputs held longer) train like the masks feed, with their rows."""
    out = tmp_path / "bench.json"
    proc = run_bench("--data", tiny_data, *TINY, "--iters", "1", "--repeats", "2", "--train", "--arch", "resnet18",
                     "--train-steps", "2", "--feeds", "masks,masks-hold,masks-thread", "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    t = json.loads(out.read_text())["train"]
    assert list(t["feeds"]) == ["masks", "masks-hold", "masks-thread"]
    for m in t["feeds"].values():
        check_measurement(m, batch=4, iters=1, repeats=2)
        assert m["kept"] > 0 and set(m["host_ms_per_step"]) == {"batch", "step"}
    assert "batches taken by a background thread" in proc.stdout and "held 2 batches longer" in proc.stdout


def test_profile_summary_on_the_cpu(tiny_data, tmp_path):
    out, prof = tmp_path / "bench.json", tmp_path / "prof"
    proc = run_bench("--data", tiny_data, *TINY, "--iters", "1", "--repeats", "2", "--stages", "decode,masks",
                     "--train", "--arch", "resnet18", "--train-steps", "2", "--feeds", "masks",
                     "--profile", prof, "--profile-steps", "2", "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gpuGetDeviceCount" not in proc.stderr, proc.stderr[-3000:]  # torch asking for a GPU there is none of
    r = json.loads(out.read_text())
    assert "profile" not in r["stages"]["decode"]  # only the full pipeline is profiled
    rows = {"masks": r["stages"]["masks"]["profile"], "train-synthetic": r["train"]["synthetic"]["profile"],
            "train-masks": r["train"]["feeds"]["masks"]["profile"]}
    for name, p in rows.items():
        assert p["steps"] == 2 and p["trace"] == str(prof / f"{name}_rank0.json")
        assert (prof / f"{name}_rank0.json").is_file()
        assert "busy_ms" not in p  # no device here: host figures only
        assert 0 < p["torch_ops_ms"] and p["step_ms"] == p["wall_ms"] > 0
        assert p["torch_ops_share"] == pytest.approx(p["torch_ops_ms"] / p["wall_ms"], abs=2e-3)
        ms = [row["ms"] for row in p["top"]]
        assert ms == sorted(ms, reverse=True) and sum(ms) <= p["torch_ops_ms"] + 0.01  # rows rounded to 1 µs
        assert not any(row["name"].startswith("bench_step_") for row in p["top"])
        assert f"PROFILE {name}: torch ops on the calling thread" in proc.stdout
    # the masks stage's host work is the CPU path's high-pass and masks in torch; a
    # training step's is the convolutions
    assert any(row["name"].startswith("aten::conv") or "convolution" in row["name"]
               for row in rows["train-synthetic"]["top"])
    bad = run_bench("--data", tiny_data, *TINY, "--stages", "masks", "--profile", out, timeout=120)
    assert bad.returncode == 2 and "takes a folder" in bad.stderr and "Traceback" not in bad.stderr


def test_profile_rows_adds_rows_to_profile(tiny_data, tmp_path):
    """--profile-rows: a variant's row is profiled too (the next GPU run's masks-blur-loader);
    a row the run does not time, or the flag without --profile, is refused up front."""
    out, prof = tmp_path / "bench.json", tmp_path / "prof"
    proc = run_bench("--data", tiny_data, *TINY, "--iters", "1", "--repeats", "1", "--stages", "decode,bare",
                     "--profile", prof, "--profile-steps", "1", "--profile-rows", "decode", "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["stages"]["decode"]["profile"]["steps"] == 1 and r["stages"]["bare"]["profile"]["steps"] == 1
    for argv, msg in ((["--profile", str(prof), "--profile-rows", "masks-blur-loader"], "not among the rows"),
                      (["--profile-rows", "bare"], "needs --profile")):
        bad = run_bench("--data", tiny_data, *TINY, "--stages", "bare", *argv, timeout=120)
        assert bad.returncode == 2 and msg in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]


def test_device_profile_summary_from_events():
    """The GPU side of the profile summary, on events shaped as CUPTI's: busy is the union of
    the intervals (overlap counted once), kernel time their sum, copies are no launches."""
    from benchkit import profiling as pr

    dali = "void dali::kernels::resampling::BatchedSeparableResample<float, 2>(dali::kernels::Sample const*)"
    events = [  # (name, start ns, duration ns, stream) over 2 steps
        (dali, 0, 4_000_000, 20),
        ("_mask_kernel", 1_000_000, 2_000_000, 7),                # inside the DALI kernel: overlaps
        ("void cudnn::engines_precompiled::nchwToNhwcKernel<float>(int, float const*)", 10_000_000, 1_000_000, 7),
        ("Memcpy DtoD (Device -> Device)", 12_000_000, 500_000, 7),
        (dali, 20_000_000, 4_000_000, 20),
        ("nvjpeg::decode_kernel<3>(int)", 24_000_000, 2_000_000, 21),  # touches the DALI kernel's end
    ]
    s = pr.summarize_device(events, steps=2, step_ms=20.0)
    assert s["busy_ms"] == pytest.approx((4 + 1 + 0.5 + 6) / 2)    # 0-4, 10-11, 12-12.5, 20-26 ms
    assert s["kernel_ms"] == pytest.approx((4 + 2 + 1 + 0.5 + 4 + 2) / 2)
    assert s["busy_share"] == pytest.approx(s["busy_ms"] / 20.0, abs=1e-3)
    assert s["launches"] == 2.5  # 5 kernels over 2 steps; the copy launches nothing
    assert s["by_owner_ms"] == {"dali": 4.0, "decode": 1.0, "mscn": 1.0, "other": 0.5, "copy": 0.25}
    assert s["streams"] == [{"stream": 20, "ms": 4.0, "by_owner_ms": {"dali": 4.0}},
                            {"stream": 7, "ms": 1.75, "by_owner_ms": {"mscn": 1.0, "other": 0.5, "copy": 0.25}},
                            {"stream": 21, "ms": 1.0, "by_owner_ms": {"decode": 1.0}}]
    top = s["top"]
    assert top[0] == {"name": "dali::kernels::resampling::BatchedSeparableResample", "owner": "dali",
                      "calls": 1.0, "ms": 4.0}
    assert [row["ms"] for row in top] == sorted((row["ms"] for row in top), reverse=True)
    assert pr.short_name("void at::native::(anonymous namespace)::f<float>(float*)") == "at::native::anon::f"
    assert pr.short_name("Memcpy DtoD (Device -> Device)") == "Memcpy DtoD"
    lines = pr.format_summary("masks", s)
    assert lines[0].startswith("PROFILE masks: GPU busy 5.75 ms per step = 29 % of a 20.0 ms step")
    assert "dali 4.00" in lines[0] and "2 launches per step" in lines[0]
    assert "  stream 20: 4.00 ms per step (dali 4.00)" in lines
    assert pr.format_summary("x", {"error": "no device events"}) == ["PROFILE x: failed (no device events)"]
    # a kernel whose name says "dali" only in its template arguments: the row and the owner
    # totals credit the same owner
    cub = pr.summarize_device([("void cub::DeviceReduceKernel<dali::kernels::Sum>(int)", 0, 1_000_000, 9)], steps=1)
    assert cub["top"][0]["owner"] == "dali" and cub["by_owner_ms"]["dali"] == 1.0


def test_generic_kernels_on_dalis_own_stream_are_dalis():
    """DALI's GaussianBlur runs as CUTLASS convolutions with no "dali" in their names: on a
    stream that runs only DALI's (and the decoder's) named kernels they count as DALI's,
    while the same name on torch's stream (the trainer, next to mscn's kernels) stays
    "other", as does a stream with no named kernel at all."""
    from benchkit import profiling as pr

    conv = "void cutlass::Kernel<cutlass::conv::kernel::ImplicitGemmConvolution<...>>(Params)"
    events = [
        ("void dali::kernels::lin_trans::LinearTransformationKernel<uint8_t>(int)", 0, 1_000_000, 30),
        (conv, 1_000_000, 3_000_000, 30),                    # DALI's blur
        ("nvjpeg::rgba2rgb(int)", 4_000_000, 1_000_000, 31),
        (conv, 5_000_000, 2_000_000, 31),                    # a decoder-only stream: not evidence
        ("_mask_kernel", 0, 1_000_000, 7),
        (conv, 1_000_000, 5_000_000, 7),                     # the trainer's own convolution
        (conv, 6_000_000, 1_000_000, 40),                    # alone on its stream: no evidence
    ]
    s = pr.summarize_device(events, steps=1)
    assert s["by_owner_ms"] == {"dali": 4.0, "decode": 1.0, "mscn": 1.0, "other": 8.0, "copy": 0.0}
    by_stream = {r["stream"]: r["by_owner_ms"] for r in s["streams"]}
    assert by_stream[30] == {"dali": 4.0} and by_stream[7] == {"mscn": 1.0, "other": 5.0}
    assert by_stream[40] == {"other": 1.0}
    assert by_stream[31] == {"decode": 1.0, "other": 2.0}
    # one name on two owners' streams: a row each in the top table
    assert {(r["owner"], r["ms"]) for r in s["top"] if r["name"].startswith("cutlass::Kernel")} == \
        {("dali", 3.0), ("other", 8.0)}
    # a stream with a torch kernel is torch's, whatever DALI-named kernel also ran there
    mixed = pr.summarize_device([("void dali::kernels::Copy(int)", 0, 1_000_000, 7),
                                 ("void at::native::vectorized_elementwise_kernel<4>(int)", 0, 1_000_000, 7),
                                 (conv, 1_000_000, 2_000_000, 7)], steps=1)
    assert mixed["by_owner_ms"]["other"] == 3.0 and mixed["by_owner_ms"]["dali"] == 1.0


class _Event:
    """A kineto event as torch 2.11 gives it (no activity_type()), or as later ones do."""

    def __init__(self, name, device, start, dur, annotation=False, kind=None, stream=7):
        from torch.autograd import DeviceType

        self._n, self._d, self._s, self._t, self._a, self._r = (  # start and dur in µs, kept in ns
            name, DeviceType.CUDA if device else DeviceType.CPU, start * 1000, dur * 1000, annotation, stream)
        if kind is not None:
            self.activity_type = lambda: kind

    def name(self): return self._n  # noqa: E704
    def device_type(self): return self._d  # noqa: E704
    def start_ns(self): return self._s  # noqa: E704
    def end_ns(self): return self._s + self._t  # noqa: E704
    def duration_ns(self): return self._t  # noqa: E704
    def is_user_annotation(self): return self._a  # noqa: E704
    def device_resource_id(self): return self._r  # noqa: E704


@pytest.mark.parametrize("with_kind", [False, True], ids=["torch-2.11", "activity_type"])
def test_device_events_keep_device_work_inside_the_profiled_steps(with_kind):
    """Only kernels, copies and sets count, only within the profiled steps: not the GPU mirror
    of a record_function span (an optimizer step's would double the busy time), not sync
    records, not a kernel DALI ran before the first step or one with a broken timestamp."""
    from benchkit import profiling as pr

    k = (lambda kind: kind) if with_kind else (lambda kind: None)
    events = [
        _Event("bench_step_0", False, 100, 50, annotation=True, kind=k("user_annotation")),
        _Event("cudaDeviceSynchronize", False, 140, 20, kind=k("cuda_runtime")),     # ends the window at 160
        _Event("Optimizer.step#LARS.step", True, 110, 30, annotation=True, kind=k("gpu_user_annotation")),
        _Event("Context Sync", True, 150, 5, kind=k("cuda_sync")),
        _Event("void dali::kernels::Blur<float>(int)", True, 110, 10, kind=k("kernel"), stream=20),
        _Event("Memset (Device)", True, 121, 2, kind=k("gpu_memset")),
        _Event("_mask_kernel", True, 130, 5, kind=k("kernel")),
        _Event("void dali::kernels::Early(int)", True, 90, 20, kind=k("kernel"), stream=20),  # before the window
        _Event("void bogus(int)", True, 0, 10 ** 9, kind=k("kernel")),  # a broken timestamp
    ]
    got, dropped = pr.device_events(events)
    assert [e[0] for e in got] == ["void dali::kernels::Blur<float>(int)", "Memset (Device)", "_mask_kernel"]
    assert got[0][1:] == (110_000, 10_000, 20) and dropped == 2
    s = pr.summarize_device(got, steps=1)
    assert s["busy_ms"] == pytest.approx(0.017) and s["launches"] == 2.0


def test_profile_knows_the_names_of_mscn_kernels():
    """The summary credits mscn's Triton kernels by name: a renamed kernel must fail here,
    not silently count as torch's."""
    import triton

    from mscn.cuda_kernels import mask_tables_triton, mask_triton
    from benchkit.profiling import MSCN_KERNELS

    jitted = {name for mod in (mask_triton, mask_tables_triton)
              for name, obj in vars(mod).items() if isinstance(obj, triton.runtime.KernelInterface)
              and name.endswith("_kernel")}
    assert set(MSCN_KERNELS) == jitted


def test_cli_bad_input_is_one_line(tmp_path):
    proc = run_bench("--data", tmp_path / "missing", *TINY, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing" in proc.stderr and "Traceback" not in proc.stderr


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_pipeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flags", [["--stages", "decode,unzip"], ["--baseline", "pillow"], ["--feeds", "bare,gpu"],
                                   ["--sweep", "cores=1,2"], ["--batch", "0"]])
def test_bad_flags_raise_mscn_errors(flags):
    script = _load_script()
    args = script.parse_args(flags)
    with pytest.raises(MscnError):
        import torch

        script.fill_defaults(args, torch.device("cpu"))


def test_parse_sweep_is_the_grid_in_order():
    grid = benv.parse_sweep(["threads=4,8", "hw_decoder_load=0,0.65", "batch=128"])
    assert grid == [{"threads": t, "hw_decoder_load": h, "batch": 128} for t in (4, 8) for h in (0.0, 0.65)]
    assert benv.sweep_overrides(grid[1]) == (["data.num_threads=4", "data.hw_decoder_load=0.65"], 128)
    assert benv.sweep_overrides({"blur_window": 23}, num_views=2) == (
        ["views.0.blur_window=23", "views.1.blur_window=23"], None)
    assert benv.parse_sweep(["affinity=false,True"]) == [{"affinity": False}, {"affinity": True}]
    assert benv.sweep_overrides({"affinity": True}) == (["data.thread_affinity=True"], None)
    for bad in (["threads"], ["threads=a,b"], ["nope=1"], ["batch=1", "batch=2"], ["affinity=yes"]):
        with pytest.raises(ConfigError):
            benv.parse_sweep(bad)


def test_measure_counts_windows_and_images():
    calls = []

    def step() -> int:
        calls.append(1)
        time.sleep(0.01)  # sleeping costs wall time, not CPU time
        return 5

    m = timing.measure("sleep", step, views=2, warmup=2, iters=3, repeats=4)
    d = m.to_dict()
    assert len(calls) == 2 + 3 * 4 and d["window_images"] == [15] * 4
    assert 5 / 0.03 <= d["images_per_s"]["max"] <= 5 / 0.01  # at least 10 ms per step
    assert d["views_per_s"]["median"] == pytest.approx(2 * d["images_per_s"]["median"], rel=1e-3)
    assert d["cpu_util"] < 0.5
    assert timing.spread([1, 2, 3, 4, 100]) == {"median": 3.0, "min": 1.0, "max": 100.0, "q1": 2.0, "q3": 4.0, "n": 5}


def test_cpu_util_is_over_the_time_the_cpu_was_read():
    """The syncs between windows burn CPU time that the windows' wall time leaves out: one thread
    busy in them read as 1.5 threads busy. The share is over the wall time the CPU time was read in."""
    def spin() -> None:  # 30 ms of this thread's CPU time: on a loaded machine 30 ms of wall time held less
        end = time.thread_time() + 0.03
        while time.thread_time() < end:
            pass

    def step() -> int:
        time.sleep(0.01)
        return 1

    d = timing.measure("spin", step, views=1, warmup=0, iters=1, repeats=3, sync=spin).to_dict()
    assert d["cpu_seconds"] > 0.1  # the spins were counted
    assert d["cpu_util"] * d["cores"] <= 1.05, d  # one thread was busy at most, never 1.5


def _own_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_cpu_time_includes_live_children():
    child = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<3: pass"])
    try:
        time.sleep(0.2)
        before, child_before = timing.process_tree_cpu_seconds(), _own_cpu_seconds(child.pid)
        time.sleep(1.0)  # the child spins; this process sleeps
        spent, child_spent = timing.process_tree_cpu_seconds() - before, _own_cpu_seconds(child.pid) - child_before
    finally:
        child.kill()
        child.wait()
    assert child_spent >= 0.05  # it ran, even on a loaded machine
    assert child_spent - 0.03 <= spent <= 1.0 * usable_cores() + 0.1, (spent, child_spent)


def test_isolation_order_alternates_and_children_drop_the_parent_options():
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_pipeline as bp

    assert bp.isolation_order(["a", "b", "c"], 3) == [(0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a"),
                                                      (2, "a"), (2, "b"), (2, "c")]
    argv = ["data.prefetch=3", "--isolate", "2", "--stages", "masks,bare", "--json=x.json", "--batch", "4"]
    assert bp._child_argv(argv) == ["data.prefetch=3", "--batch", "4"]


def test_isolate_runs_every_stage_in_its_own_process(tiny_data, tmp_path):
    out = tmp_path / "iso.json"
    proc = run_bench("--data", tiny_data, *TINY, "--iters", "1", "--repeats", "2", "--isolate", "2",
                     "--stages", "masks,masks-blur-loader", "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["order"] == ["1:masks", "1:masks-blur-loader", "2:masks-blur-loader", "2:masks"]
    for st in ("masks", "masks-blur-loader"):  # (the blur in the loader: a variant)
        iso = r["isolated"][st]
        assert len(iso["medians"]) == 2 and all(v > 0 for v in iso["medians"])
        assert iso["mean"] == pytest.approx(sum(iso["medians"]) / 2, abs=0.01)
        assert [run["position"] for run in iso["runs"]] == ([1, 4] if st == "masks" else [2, 3])
    assert "SUMMARY isolated masks: mean" in proc.stdout
    # the command recorded is the one typed, not the last child's (with its temporary --json)
    assert "--isolate 2 --stages masks,masks-blur-loader --json" in r["env"]["command"], r["env"]["command"]
    bad = run_bench("--data", tiny_data, *TINY, "--isolate", "1", "--stages", "masks", "--train", timeout=120)
    assert bad.returncode != 0 and "--isolate" in bad.stderr and "Traceback" not in bad.stderr


def test_every_stage_and_feed_has_a_report_label():
    """A stage without a label runs for minutes and then fails printing its row."""
    from benchkit.report import LABELS
    spec = importlib.util.spec_from_file_location("bench_pipeline_labels", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert set(bench.STAGES) | set(bench.FEEDS) | {"masks-priority"} <= set(LABELS)


def test_output_paths_are_checked_before_the_timing(tmp_path):
    """--json, --plot and --profile are written after minutes of timing: a path that cannot be
    written fails at once."""
    import torch

    script = _load_script()
    (tmp_path / "afile").write_text("x")
    for flags, match in ((["--json", str(tmp_path)], "--json"), (["--plot", str(tmp_path)], "--plot"),
                         (["--profile", str(tmp_path / "afile" / "prof")], "--profile")):
        with pytest.raises(MscnError, match=match):
            script.fill_defaults(script.parse_args(flags), torch.device("cpu"))
    with pytest.raises(MscnError, match="--profile-steps"):  # refused: and no empty folder left behind
        script.fill_defaults(script.parse_args(["--profile", str(tmp_path / "p"), "--profile-steps", "0"]),
                             torch.device("cpu"))
    assert not (tmp_path / "p").exists()
    ok = script.parse_args(["--json", str(tmp_path / "new" / "deeper" / "b.json")])
    script.fill_defaults(ok, torch.device("cpu"))  # missing parents are made when it is written


def test_sync_scopes():
    """--sync: a window waits for the current stream (default) or the whole device on a GPU;
    the CPU has nothing queued. The CUDA barriers themselves run only on a GPU
    (gpu_check.sh times the ResNet-18 row both ways)."""
    import torch

    for scope in timing.SYNC_SCOPES:
        assert timing.device_sync(torch.device("cpu"), scope) is timing.no_sync
    with pytest.raises(ValueError, match="sync scope 'all'"):
        timing.device_sync(torch.device("cpu"), "all")
    if torch.cuda.is_available():
        for scope in timing.SYNC_SCOPES:
            timing.device_sync(torch.device("cuda"), scope)()


def test_host_ms_reads_the_timed_steps_only_and_release_stops_a_feeder():
    """host_ms: medians over the last ``last`` steps (the timed windows), not the warm-up;
    release: a row's feeder thread is stopped explicitly when the row ends."""
    import threading

    from mscn.pipelines.feeder import Feeder

    bench = _load_script()
    clock = {"batch": [9.0, 9.0, 0.001, 0.002, 0.003], "step": [5.0, 0.010, 0.020, 0.030, 0.040]}
    assert bench.host_ms(clock, last=3) == {"batch": 2.0, "step": 30.0}
    assert bench.host_ms({"batch": [], "step": [0.004]}, last=3) == {"step": 4.0}
    # an even count: the mean of the middle two, as the images/s medians (was the upper one)
    assert bench.host_ms({"step": [3.6, 0.4, 0.5, 0.6]}, last=4) == {"step": 550.0}

    def endless():
        n = 0
        while True:
            yield n
            n += 1

    feeder = Feeder(endless(), name="mscn-bench-feeder")
    assert next(feeder) == 0
    bench.release((feeder, object()))
    assert not [t for t in threading.enumerate() if t.name == "mscn-bench-feeder"]


def test_bench_draws_times_both_graphs_and_refuses_nonsense():
    """scripts/bench_draws.py: one line per graph (its operators and ms per batch), the ratio;
    a batch of 0 is one usage error."""
    script = REPO / "scripts" / "bench_draws.py"
    r = subprocess.run([sys.executable, str(script), "--batch", "8", "--iters", "2", "--views", "2"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert any(ln.startswith("DRAWS one by one: 30 operators, ") for ln in lines), r.stdout
    assert any(ln.startswith("DRAWS one draw per view: 2 operators, ") for ln in lines), r.stdout
    assert any(ln.startswith("SUMMARY draws: one by one / one draw per view = ") for ln in lines)
    bad = subprocess.run([sys.executable, str(script), "--batch", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "must be >= 1" in bad.stderr


@pytest.fixture(scope="module")
def bad_image_data(tiny_data, tmp_path_factory) -> Path:
    """tiny_data's 16 images and one JPEG cut in half."""
    import shutil

    out = tmp_path_factory.mktemp("bad") / "train"
    shutil.copytree(tiny_data, out)
    good = next(out.glob("*/*.jpg")).read_bytes()
    (next(out.glob("*/*.jpg")).parent / "cut.jpg").write_bytes(good[: len(good) // 2])
    return out


def test_cli_bad_image_is_one_line_naming_it(bad_image_data):
    """decode-only runs its pipeline without the loader, so it translates DALI's failure itself."""
    proc = run_bench("--data", bad_image_data, *TINY, "--stages", "decode", "--iters", "4", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and last.startswith("bench_pipeline: error: ")
    assert "cut.jpg: cannot be decoded" in last and "mscn data scan" in last


@pytest.mark.parametrize("baseline", ["dali-plain", "torchvision"])
def test_baselines_name_a_bad_image_in_one_line(bad_image_data, baseline):
    import torch
    from benchkit import steps
    from pipeline_fixtures import tiny_cfg

    from mscn.errors import DataError

    cfg = tiny_cfg(bad_image_data, "train.global_batch=4")
    where = steps.placement(cfg, torch.device("cpu"))
    if baseline == "dali-plain":
        step, _ = steps.plain_step(cfg, where, 4)
    else:  # a worker process decodes: torch wraps its error in the worker's traceback
        step, _ = steps.torchvision_step(cfg, where, 1, torch.device("cpu"))
    with pytest.raises(DataError) as err:
        for _ in range(20):  # 17 images in batches of 4: the cut one comes within two epochs
            step()
    msg = str(err.value)
    assert "cut.jpg: cannot be decoded" in msg and "\n" not in msg and "Traceback" not in msg


def test_size_and_batch_overrides_are_applied_or_refused():
    """data.image_size= / train.global_batch= overrides were listed in the JSON but the flags'
    defaults (224 px, batch 32) were benched instead."""
    import torch

    script = _load_script()
    args = script.parse_args(["data.image_size=32", "train.global_batch=8"])
    script.fill_defaults(args, torch.device("cpu"))
    assert (args.size, args.batch) == (32, 8)
    args = script.parse_args(["train.global_batch=8"])
    script.fill_defaults(args, torch.device("cpu"), world_size=2)
    assert (args.size, args.batch) == (224, 4)  # per process
    with pytest.raises(MscnError, match=r"--size 64 and data.image_size=32 disagree; give one of them"):
        script.fill_defaults(script.parse_args(["data.image_size=32", "--size", "64"]), torch.device("cpu"))
    with pytest.raises(MscnError, match=r"train.global_batch=9: not divisible by the 2 processes"):
        script.fill_defaults(script.parse_args(["train.global_batch=9"]), torch.device("cpu"), world_size=2)


@pytest.mark.parametrize("flags, match", [
    (["--sweep", "batch=4,0"], r"batch must be >= 1, got 0"),  # the row was labelled batch=0 but ran batch 4
    (["--sweep", "threads=,"], r"no values"),
    (["--sweep", "hw_decoder_load=0,2"], r"hw_decoder_load must be in \[0, 1\], got 2.0"),
    (["--sweep", "hw_decoder_load=0,0.9"], r"the CPU path has no hardware decoder"),
    (["--plot", "chart"], r"--plot chart: name a .png, .pdf, .svg file"),
    (["--plot", "chart.xyz"], r"name a .png"),
    (["--baseline-workers", "-1"], r"--baseline-workers must be >= 0, got -1"),
    (["--threads", "0"], r"--threads must be >= 1, got 0"),
    (["--hw-decoder-load", "1.5"], r"--hw-decoder-load must be in \[0, 1\]"),
    # GPU-only flags on the CPU: accepted, they changed nothing (the sweep of hw_decoder_load was refused)
    (["--hw-decoder-load", "0.5"], r"^--hw-decoder-load: GPU only .* leave it out, or use --device cuda$"),
    (["--sync", "device", "--hw-decoder-load", "1"], r"^--hw-decoder-load, --sync: GPU only .* leave them out"),
    # training-row flags without --train: the run would time no training and say nothing
    (["--arch", "resnet50"], r"^--arch: only with --train"),
    (["--feeds", "masks", "--train-steps", "8"], r"^--feeds, --train-steps: only with --train .* leave them out"),
    (["--no-priority-row"], r"--no-priority-row: only with --train"),
])
def test_flags_that_would_run_something_else_are_refused_before_timing(flags, match):
    import torch

    script = _load_script()
    with pytest.raises(MscnError, match=match):
        script.fill_defaults(script.parse_args(flags), torch.device("cpu"))


def test_a_batch_larger_than_the_set_is_refused_before_any_row_is_timed(tiny_data, tmp_path):
    """16 images: a decode row timed repeated images without a word, and a masks row after it
    failed only once the rows before it were timed (minutes on real data)."""
    for flags, what in ((["--batch", "32", "--stages", "decode,masks"], "--batch"),
                        (["--batch", "4", "--sweep", "batch=4,64"], "the sweep's batch=64")):
        proc = run_bench("--data", tiny_data, "--size", "32", "--warmup", "1", "--torch-threads", "1", *flags,
                         "--json", tmp_path / "b.json", timeout=120)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
        assert err[0] == (f"bench_pipeline: error: {tiny_data}: 16 images, fewer than one batch of "
                          f"{32 if what == '--batch' else 64} ({what}); lower it, or add images"), err
        assert not (tmp_path / "b.json").exists()


def test_cpu_threads_are_shared_by_the_processes_of_a_node(monkeypatch):
    """Under torchrun every rank took all the cores; the trainer's auto gives each its share."""
    import torch

    from mscn.pipelines.tuning import usable_cores

    script = _load_script()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    args = script.parse_args([])
    script.fill_defaults(args, torch.device("cpu"), world_size=2)
    assert args.threads == max(1, usable_cores() // 2)


def test_a_fed_row_faster_than_the_synthetic_one_is_called_noise():
    """A fed step cannot beat the same step on ready-made tensors: 'kept 187 %' (a loaded
    2-core box, windows of a few steps) was printed as a figure."""
    from benchkit.report import summary_lines

    def result(kept):
        feeds = {"bare": {"kept": kept[0]}, "masks": {"kept": kept[1]}}
        return {"settings": {}, "train": {"arch": "resnet18", "synthetic": {"images_per_s": {"median": 10.0}},
                                          "feeds": feeds}}

    lines = summary_lines(result((1.87, 1.01)))
    assert lines[-1].startswith("SUMMARY WARNING kept above 105% (bare): a fed row ran faster"), lines
    assert not any("WARNING" in ln for ln in summary_lines(result((0.98, 1.04))))


def test_torch_threads_below_one_is_one_line():
    proc = run_bench("--torch-threads", "-1", timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "bench_pipeline: error: --torch-threads must be >= 1, got -1", proc.stderr


def test_stage_labels_name_every_step_a_row_adds():
    from benchkit.report import stage_labels

    got = stage_labels(["decode", "bare", "masks", "masks-hold"])
    assert got["bare"] == "+ crop, flip, normalize"
    assert got["masks"] == "+ colour jitter, gray, blur, solarize, high-pass, masks (as torch tensors)"
    assert stage_labels(["decode", "highpass", "masks"])["masks"] == "+ masks (as torch tensors)"
    assert got["masks-hold"].startswith("full, ")


@pytest.mark.parametrize("sig, rows, rc, why", [
    ("SIGINT", ["--stages", "decode,bare,views,highpass,masks"], 130, "KeyboardInterrupt"),
    ("SIGTERM", ["--stages", "decode,bare,views,highpass,masks"], 143, "stopped by SIGTERM"),
    ("SIGINT", ["--sweep", "threads=1,2,1,2"], 130, "KeyboardInterrupt"),
    ("SIGTERM", ["--train", "--feeds", "bare,views,masks", "--train-steps", "2"], 143, "stopped by SIGTERM"),
])
def test_rows_are_reported_as_they_end_and_kept_when_the_run_stops(tiny_data, tmp_path, sig, rows, rc, why):
    """A line per row on stderr while the run goes; Ctrl-C or SIGTERM (timeout, SLURM) after
    the first row keeps it in the JSON, marked incomplete (before, everything timed was lost)."""
    import signal

    out = tmp_path / "b.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # SIGINT as a terminal delivers it: a test run in the background (CI, `&`) inherits it
    # ignored, and Python then installs no KeyboardInterrupt handler
    # 30 iterations a window: the rows after the first outlast a test process that a loaded
    # machine deschedules for a second (with 2, the run had ended before the signal came)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--data", tiny_data, *TINY, "--iters", "30",
                             "--repeats", "2", *rows, "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = proc.stderr.readline()
        assert first.startswith("bench: ") and "images/s (median of 2 windows" in first, first
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == rc, err
    doc = json.loads(out.read_text())
    assert doc["incomplete"].startswith(why) and "(marked incomplete)" in err
    if "--sweep" in rows:
        assert 1 <= len(doc["sweep"]["rows"]) < 4 and "best" not in doc["sweep"]
    elif "--train" in rows:  # the synthetic row and the feeds timed so far, apart from a whole table
        assert "train" not in doc and "synthetic" in doc["train_timed"] and "masks" not in doc["train_timed"]["feeds"]
    else:
        assert "decode" in doc["stages"] and "masks" not in doc["stages"]


def test_bench_masks_runs_and_refuses_bad_input_in_one_line(tmp_path):
    script = REPO / "scripts" / "bench_masks.py"

    def run(*args):
        return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=240,
                              cwd=tmp_path)

    (tmp_path / "a_file").write_text("")
    for args, msg in ((["--config", "nosuch"], "config file not found: nosuch"), (["--runs", "0"], "--runs must be >= 1"),
                      (["--json", str(tmp_path / "a_file" / "m.json")], "cannot be written there (not writable)"),
                      (["--json", str(tmp_path)], "cannot be written there (a folder)")):
        proc = run(*args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and msg in proc.stderr, proc.stderr
    proc = run("--preset", "demo", "--runs", "2", "--json", str(tmp_path / "new" / "m.json"))  # its folder made
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "new" / "m.json").read_text())
    assert doc[0]["runs"] == 2 and doc[0]["ms"]["apply_masks torch in place"] > 0
    # every median comes with its windows' spread, in the table and the JSON
    for step, ms in doc[0]["ms"].items():
        sp = doc[0]["ms_spread"][step]
        assert sp["n"] == 2 and sp["min"] <= round(ms, 4) <= sp["max"], (step, ms, sp)
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f"| {step} |"))
        assert f"| {sp['min']:.3f}-{sp['max']:.3f} |" in line, line
    # drawing the tables moves none of the views' bytes: no bandwidth or speed-up claimed for it
    assert "| tables, torch sampler (sample_tables) | " in proc.stdout
    row = next(ln for ln in proc.stdout.splitlines() if ln.startswith("| tables, torch sampler"))
    assert row.endswith("| - | - | - |"), row


def test_sigterm_to_an_isolate_run_stops_its_child_too(tiny_data, tmp_path):
    """timeout, SLURM and kill send SIGTERM to the parent only: its running child must not
    run on as an orphan."""
    import signal

    def children() -> list[int]:
        found = []
        for d in Path("/proc").iterdir():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if d.name.isdigit() and str(SCRIPT).encode() in cmd and b"31337" in cmd and b"--isolate" not in cmd:
                found.append(int(d.name))
        return found

    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--data", tiny_data, *TINY, "--seed", "31337",
                             "--iters", "2", "--repeats", "2", "--isolate", "1", "--stages", "masks,bare"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout.readline().startswith("[isolate] 1/2")
        deadline = time.time() + 60
        while not children() and time.time() < deadline:
            time.sleep(0.2)
        assert children(), "the isolated child never started"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "stopped by SIGTERM" in err, err
    time.sleep(0.5)
    assert children() == []


def test_a_value_set_from_a_flag_names_the_flag():
    import torch

    script = _load_script()
    args = script.parse_args(["--batch", "1"])
    script.fill_defaults(args, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"train.global_batch = 1: must be >= 2 .*\(set by --batch\)$"):
        script.build_config(args, "/nowhere", 1)
