"""End-to-end pretraining on CPU with the real DALI loader over a tiny synthetic ImageFolder.

Crash safety and resume (issue: SIGKILL mid-run, clean stop, non-finite loss,
incompatible checkpoint) and the torchrun path with 2 gloo ranks.
Torch runs on one thread: on a shared 2-core box, OpenMP threads that wait on each
other turn a 0.15 s step into seconds.
"""
import copy
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mscn.config import load_config
from mscn.errors import MscnError
from mscn.train import checkpoint as ckpt
from mscn.train.pretrain import main, run_pretrain
from mscn.train.runlog import read_metrics
from mscn.train.schedule import lr_at

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

GENTLE = "{scale: [0.7, 1.0], jitter_prob: 0.0, blur_prob: 0.0, grayscale_prob: 0.0, mask: {ratio: 0.0, grid: 8}}"
TINY_MODEL = ["model.arch=resnet18", "model.proj_hidden=64", "model.proj_out=32", "model.pred_hidden=64"]


@pytest.fixture(scope="module")
def dataset(tiny_synth_train):
    return tiny_synth_train  # 64 images: 8 steps per epoch at global batch 8


def overrides(dataset, out_dir, *extra):
    """Two gentle, unmasked 32 px views: the loss falls visibly within 24 steps."""
    return [f"data.root={dataset}", "data.image_size=32", "data.num_threads=1", "highpass.sigma=1.0",
            f"views=[{GENTLE}, {GENTLE}]", *TINY_MODEL, "train.global_batch=8", "train.device=cpu",
            "schedule.epochs=8", "schedule.warmup_epochs=0", "optim.base_lr=32", f"train.out_dir={out_dir}",
            "train.log_every=1", "train.ckpt_every_steps=8", "train.keep_last=2", *extra]


@pytest.fixture(scope="module")
def base_run(dataset, tmp_path_factory):
    """A clean stop: 24 of the schedule's 64 steps (train.max_steps caps the run)."""
    out = tmp_path_factory.mktemp("base") / "run"
    summary = run_pretrain(load_config(None, overrides(dataset, out, "train.max_steps=24")), resume="auto")
    return out, summary


def window(records, lo, hi):
    values = [r["loss"] for r in records if lo < r["step"] <= hi]
    return sum(values) / len(values)


def test_clean_stop_then_resume_continues_the_loss_curve(dataset, base_run, tmp_path):
    base, summary = base_run
    assert summary["step"] == 24 and summary["total_steps"] == 64 and summary["steps_per_epoch"] == 8
    assert [p.name for p in ckpt.list_checkpoints(base / "checkpoints")] == ["ckpt_00000016.pt", "ckpt_00000024.pt"]
    assert ckpt.load_checkpoint(base / "final.pt")["step"] == 24
    run = tmp_path / "run"
    shutil.copytree(base, run)

    resumed = run_pretrain(load_config(None, overrides(dataset, run, "train.max_steps=32")), resume="auto")
    assert resumed["resumed_from"].endswith("ckpt_00000024.pt") and resumed["step"] == 32
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 33))  # appended, no step twice
    # strict JSON (no NaN): the first window after the start and after the resume has no rate
    import json

    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl: {line}"))
    assert records[0]["images_per_s"] is None and records[24]["images_per_s"] is None
    after = [r for r in records if r["step"] > 24]
    assert after[0]["lr"] == pytest.approx(lr_at(24, 64, 0, 32 * 8 / 256))  # schedule position restored
    start, before, resumed_loss = window(records, 0, 6), window(records, 18, 24), window(records, 24, 30)
    assert start - before > 0.3, records  # it learned before the stop...
    assert resumed_loss < start - 0.5 * (start - before), (start, before, resumed_loss)  # ...and kept it


def _as_if_trained_with(run, key: str, value):
    """Rewrite a copied run's saved configs (config.yaml, every checkpoint) with ``key``
    set to ``value``: a run that was set up with that value (a resume refuses a change)."""
    section, name = key.split(".")
    (run / "config.yaml").unlink()
    for path in ckpt.list_checkpoints(run / "checkpoints"):
        state = torch.load(path, weights_only=True)
        state["config"][section][name] = value
        torch.save(state, path)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(dataset, base_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base_run[0], run)
    _as_if_trained_with(run, "optim.base_lr", 1.0e30)
    before = [p.name for p in ckpt.list_checkpoints(run / "checkpoints")]
    cfg = load_config(None, overrides(dataset, run, "optim.base_lr=1.0e+30", "train.max_steps=40"))
    # steps count from 1, as in metrics.jsonl: the run resumed after step 24, so 25 is its first
    good = run / "checkpoints" / "ckpt_00000024.pt"
    with pytest.raises(MscnError, match=r"non-finite loss at step (2[5-9]|3\d).*ckpt_00000024\.pt") as e:
        run_pretrain(cfg, resume="auto")
    assert f"branch from it: --resume {good} --out NEW_DIR" in str(e.value)
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == before
    state = ckpt.load_checkpoint(good)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert ckpt.load_checkpoint(run / "final.pt")["step"] == 24

    # the way out the error names: a branch with the lower lr, which says what changed
    capsys.readouterr()
    fixed = run_pretrain(load_config(None, overrides(dataset, tmp_path / "branch", "train.max_steps=26")),
                         resume=str(good))
    assert fixed["step"] == 26 and math.isfinite(fixed["loss"])
    assert "(branched with other settings: optim.base_lr: fresh data order, not exact)" in capsys.readouterr().out


def test_incompatible_resume_is_one_clear_error(dataset, base_run, capsys):
    base = base_run[0]
    assert main(["--resume", "auto", *overrides(dataset, base, "method.name=byol")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mscn pretrain: error: ") and "differs in method.name)" in err[0], err
    with pytest.raises(MscnError, match=r"differs in model\.arch\)"):
        run_pretrain(load_config(None, overrides(dataset, base, "model.arch=resnet34")), resume="auto")
    assert [r["step"] for r in read_metrics(base)][-1] == 24  # nothing was appended


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_sigkill_mid_training_then_resume_auto_reaches_the_same_final_step(dataset, tmp_path, capsys):
    """The default 4 masked views, killed with SIGKILL once a checkpoint exists."""
    run = tmp_path / "run"
    args = [f"data.root={dataset}", "data.image_size=32", "data.num_threads=1", "highpass.sigma=1.0",
            *[f"views.{i}.mask.grid=8" for i in range(4)], *TINY_MODEL, "train.global_batch=8",
            "schedule.epochs=3", "schedule.warmup_epochs=1", "optim.base_lr=4", f"train.out_dir={run}",
            "train.log_every=2", "train.ckpt_every_steps=4", "train.keep_last=2"]
    proc = subprocess.Popen([sys.executable, "-m", "mscn.train.pretrain", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not ckpt.list_checkpoints(run / "checkpoints") and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert ckpt.list_checkpoints(run / "checkpoints"), "no checkpoint within 180 s"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = ckpt.find_latest_valid(run / "checkpoints")[1]["step"]
    assert 4 <= killed_at < 24
    assert not (run / "final.pt").exists()

    assert main(["--resume", "auto", *args]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {ckpt.ckpt_path(run / 'checkpoints', killed_at)} at step {killed_at}" in out
    assert ckpt.load_checkpoint(run / "final.pt")["step"] == 24
    names = [p.name for p in ckpt.list_checkpoints(run / "checkpoints")]
    assert names[-1] == "ckpt_00000024.pt" and len(names) == 2
    assert not list((run / "checkpoints").glob(".*tmp*"))  # a killed writer's temporary is cleaned up
    steps = [r["step"] for r in read_metrics(run)]  # steps between the checkpoint and the kill repeat
    assert steps[-1] == 24 and steps.count(24) == 1
    again = run_pretrain(load_config(None, args), resume="auto")  # a finished run: nothing to do
    assert again["step"] == 24 and again["final"] == str(run / "final.pt")


def test_torchrun_two_gloo_ranks(dataset, tmp_path):
    """The multi-process path: env:// rendezvous, DALI shards, CPU SyncBN, rank-0 checkpoints."""
    run = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "mscn.train.pretrain",
           *overrides(dataset, run, "train.max_steps=3", "model.sync_bn=true", "train.log_every=3")]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("[mscn] done: step 3/64") == 1, res.stdout  # rank 0 only
    state = ckpt.load_checkpoint(run / "final.pt")
    assert state["step"] == 3 and state["config"]["train"]["global_batch"] == 8
    assert [r["step"] for r in read_metrics(run)] == [3]
    # started again, finished: said once too (every rank said it: a probe)
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("[mscn] done: step 3/64, nothing left to train") == 1, res.stdout


def test_workers_checkpoint_and_stop_when_torchrun_is_killed(dataset, tmp_path):
    """kill -9 of the launcher (the OOM killer, a user) left its workers training on as orphans
    that held the run folder. Now the kernel sends them SIGTERM (PR_SET_PDEATHSIG): the
    trainer's preemption, a checkpoint at one agreed step, STOPPED, nothing left running."""
    run = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "mscn.train.pretrain",
           *overrides(dataset, run, "schedule.epochs=500", "train.ckpt_every_steps=100000")]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not ((run / "metrics.jsonl").is_file() and any(r.get("step", 0) >= 2 for r in read_metrics(run))):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.5)
        proc.kill()  # SIGKILL: torchrun's own cleanup never runs
        proc.wait(timeout=30)
        while not (run / "STOPPED").is_file():
            assert time.monotonic() < deadline + 60, "the orphaned workers did not stop"
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        if not (run / "STOPPED").is_file():  # the fix failed: no orphan may outlive the test
            subprocess.run(["pkill", "-9", "-f", f"train.out_dir={run}"], check=False)
    stopped = (run / "STOPPED").read_text()
    assert stopped.startswith("stopped by SIGTERM after step "), stopped
    step = int(stopped.split("after step ")[1].split()[0])
    assert ckpt.find_latest_valid(run / "checkpoints")[1]["step"] == step
    import fcntl

    from mscn.train.rundir import LOCK_FILE

    with open(run / LOCK_FILE, "a+") as f:  # the workers exit after writing STOPPED: the lock comes free
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline + 90, "a worker still holds the run folder"
                time.sleep(0.5)


def test_online_knn_monitor_logs_every_n_epochs(dataset, base_run, tmp_path, capsys):
    """The monitor logs after epochs 1 and 2, and changes nothing the run computes: the
    weights after step 16 are those of the same run without it, to the bit (which is why
    ``train.knn_every_epochs`` may change on a resume, rundir.NEUTRAL)."""
    out = tmp_path / "knn"
    run_pretrain(load_config(None, overrides(dataset, out, "train.max_steps=16", "train.knn_every_epochs=1",
                                             f"data.val_root={dataset}", "eval.linear_batch=16")), resume=None)
    knn = [r for r in read_metrics(out) if "knn_top1" in r]
    assert [r["step"] for r in knn] == [8, 16]  # end of epochs 1 and 2
    assert all(0.0 <= r["knn_top1"] <= r["knn_top5"] <= 100.0 for r in knn)
    assert not any("images_per_s" in r for r in knn)  # a monitor record is no throughput window
    captured = capsys.readouterr()
    assert "img_s=nan" not in captured.err  # the bar keeps its last real figure
    # the kNN line is written above the bar (tqdm.write), on a line of its own
    assert [ln for ln in captured.out.splitlines() if "kNN top-1" in ln][0].startswith("[mscn] epoch 1: kNN top-1")
    without = ckpt.load_checkpoint(base_run[0] / "checkpoints" / "ckpt_00000016.pt")["model"]
    with_monitor = ckpt.load_checkpoint(out / "final.pt")["model"]
    assert without.keys() == with_monitor.keys()
    assert all(torch.equal(without[k], with_monitor[k]) for k in without)


def test_a_run_killed_before_its_monitor_measures_that_epoch_when_it_resumes(dataset, tmp_path, monkeypatch,
                                                                              capsys):
    """Killed between an epoch's checkpoint and its kNN monitor, a run lost that epoch's kNN
    line for good (the fault-injection probe). The resumed run measures it first, with the
    same figures as a run never killed, and still continues exactly."""
    import mscn.train.pretrain as pretrain

    settings = ("train.max_steps=16", "train.knn_every_epochs=1", f"data.val_root={dataset}", "eval.linear_batch=16")
    ref = tmp_path / "ref"
    run_pretrain(load_config(None, overrides(dataset, ref, *settings)), resume=None)
    out, real = tmp_path / "killed", pretrain.online_knn

    def killed(*a, **k):
        raise SystemExit(137)  # as the process dies: after the checkpoint of step 8, before its monitor

    with monkeypatch.context() as m:
        m.setattr(pretrain, "online_knn", killed)
        with pytest.raises(SystemExit):
            run_pretrain(load_config(None, overrides(dataset, out, *settings)), resume=None)
    assert ckpt.step_of(ckpt.list_checkpoints(out / "checkpoints")[-1]) == 8
    assert not [r for r in read_metrics(out) if "knn_top1" in r]
    assert pretrain.online_knn is real
    capsys.readouterr()
    run_pretrain(load_config(None, overrides(dataset, out, *settings)), resume="auto")
    assert "epoch 1: no kNN line in metrics.jsonl for step 8" in capsys.readouterr().out

    def knn(run):
        return [(r["step"], r["epoch"], r["knn_top1"], r["knn_top5"], r["lr"], r["loss"])
                for r in read_metrics(run) if "knn_top1" in r]

    assert [k[0] for k in knn(out)] == [8, 16] and knn(out) == knn(ref)
    a, b = (ckpt.load_checkpoint(r / "final.pt")["model"] for r in (ref, out))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a branch from an epoch's checkpoint: its source folder holds that line (it was measured
    # again, with a null loss, at the branch's start: a probe)
    branch = tmp_path / "branch"
    capsys.readouterr()
    run_pretrain(load_config(None, overrides(dataset, branch, *settings)), resume=str(ref / "checkpoints" /
                                                                                         "ckpt_00000008.pt"))
    assert "no kNN line" not in capsys.readouterr().out
    assert [k[0] for k in knn(branch)] == [16]


def test_knn_monitor_without_val_root_is_switched_off_with_a_notice(dataset, tmp_path, capsys):
    out = tmp_path / "r"
    run_pretrain(load_config(None, overrides(dataset, out, "train.knn_every_epochs=1", "train.max_steps=8")),
                 resume=None)
    assert "kNN monitor off" in capsys.readouterr().out
    assert not [r for r in read_metrics(out) if "knn_top1" in r]


def test_a_missing_val_root_stops_the_run_before_it_starts(dataset, tmp_path, capsys):
    """The monitor reads data.val_root only after an epoch: a typo there must stop the run
    at once, naming data.val_root (not data.root), before the run folder is written."""
    out = tmp_path / "r"
    status = main(overrides(dataset, out, "train.knn_every_epochs=1", f"data.val_root={tmp_path / 'nope'}"))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].endswith("nope: no such file or directory (data.val_root)")
    assert not out.exists()


def test_a_val_root_the_monitor_cannot_score_stops_the_run_before_it_starts(dataset, tmp_path, capsys):
    """A val class the training set lacks, or a val root without labels (which would score
    0 % quietly), stops the run at once, not after the first epoch."""
    first = sorted(p for p in Path(dataset).iterdir() if p.is_dir())[0]
    shutil.copytree(first, tmp_path / "val" / "not_a_train_class")
    (tmp_path / "flat").mkdir()
    for img in sorted(first.iterdir())[:4]:
        shutil.copy(img, tmp_path / "flat" / img.name)
    shutil.copytree(Path(dataset), tmp_path / "val_text")
    (sorted((tmp_path / "val_text").iterdir())[0] / "notes.jpg").write_text("not an image")  # DALI could segfault
    for val, why in ((tmp_path / "val", "'not_a_train_class' is not among"), (tmp_path / "flat", "has no labels"),
                     (tmp_path / "val_text", "notes.jpg: no JPEG, PNG")):
        out = tmp_path / f"r_{val.name}"
        status = main(overrides(dataset, out, "train.knn_every_epochs=1", f"data.val_root={val}"))
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and why in err[0], err
        assert not out.exists()


def test_damaged_training_files_stop_the_run_before_it_starts(dataset, tmp_path, capsys):
    """A JPEG cut short in the training set (two in one batch can segfault DALI, which lost
    every step since the last checkpoint with no message) is named at the start, before the
    run folder is written; data.check_files=false leaves it to DALI, which names it when it
    meets it (mid-run, after the steps of the epoch before it)."""
    root = tmp_path / "train"
    shutil.copytree(Path(dataset), root)
    cut = sorted(sorted(p for p in root.iterdir() if p.is_dir())[-1].iterdir())[-1]
    cut.write_bytes(cut.read_bytes()[:150])
    out = tmp_path / "r"
    status = main(overrides(root, out))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"mscn pretrain: error: {cut}: a JPEG cut short"), err
    assert not out.exists()
    status = main(overrides(root, out, "data.check_files=false"))  # the run starts; DALI meets the file in epoch 1
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith(f"mscn pretrain: error: {cut}: cannot be decoded"), err
    assert (out / "config.yaml").is_file()


def test_a_restart_does_not_read_the_checked_files_again(dataset, tmp_path, capsys, monkeypatch):
    """A preempted run restarts many times: the second start finds the files unchanged since
    the first start's check (mscn.data.checkstamp) and says so instead of reading them."""
    from mscn.data import checkstamp, filecheck

    root = tmp_path / "train"
    shutil.copytree(Path(dataset), root)
    time.sleep(checkstamp.RACY_S + 0.1)  # files written within a tick of the check are not stamped
    out = tmp_path / "r"
    assert main(overrides(root, out, "train.max_steps=1")) == 0
    assert "data check" not in capsys.readouterr().out
    monkeypatch.setattr(filecheck, "_CHECKED", set())  # as a new process
    assert main(overrides(root, out, "train.max_steps=2")) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "data check" in line]
    assert len(said) == 1 and said[0].startswith("[mscn] data check: the files are unchanged since their check of ") \
        and said[0].endswith("UTC, not read again (MSCN_CACHE_DIR=off reads them)"), said


def test_compiled_byol_has_the_eager_loss_and_gradients(dataset, tmp_path):
    """The BYOL recipe compiles too (train.compile=true in byol_r50_in1k.yaml): the online
    network, the predictor and the stop-gradient target under torch.compile give the eager
    loss and gradients (the target's EMA update runs outside the compiled forward)."""
    from mscn.train.distributed import DistInfo
    from mscn.train.pretrain import build_model

    cfg = load_config(None, overrides(dataset, tmp_path / "unused", "train.compile=true", "method.name=byol"))
    torch.manual_seed(0)
    method, compiled = build_model(cfg, torch.device("cpu"), DistInfo())
    eager = copy.deepcopy(method)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    views = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    out = []
    for model, params in ((compiled, method), (eager, eager)):
        model.train()
        loss = model(views)
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None}))
    (loss_c, g_c), (loss_e, g_e) = out
    assert loss_c == pytest.approx(loss_e, rel=1e-5)
    assert list(g_c) == list(g_e) and g_e  # the target has no gradients in either
    # per tensor, relative to its norm, except for the biases right before a BatchNorm: their
    # exact gradient is 0 and both sides hold rounding noise (~1e-7 here), compared to the
    # largest gradient instead. Exactly those three fall under the floor
    scale = max(b.norm().item() for b in g_e.values())
    floored = {n for n, b in g_e.items() if b.norm().item() < 1e-4 * scale}
    assert floored == {"projector.0.bias", "projector.3.bias", "predictor.0.bias"}, floored
    err = {n: ((g_c[n] - b).norm() / max(b.norm().item(), 1e-4 * scale)).item() for n, b in g_e.items()}
    assert max(err.values()) < 1e-3, max(err.items(), key=lambda kv: kv[1])


def test_compiled_model_has_the_eager_gradients_and_its_checkpoint_resumes_eager(dataset, base_run, tmp_path):
    """``train.compile=true`` wraps the model in torch.compile (after DDP, pretrain.build_model).
    Its loss and gradients equal the eager model's on the same views and weights, and a
    compiled run writes a checkpoint that an eager run resumes (the weights are saved from
    the bare module, not from the compiled wrapper with its ``_orig_mod.`` keys)."""
    from mscn.train.distributed import DistInfo
    from mscn.train.pretrain import build_model

    cfg = load_config(None, overrides(dataset, tmp_path / "unused", "train.compile=true"))
    torch.manual_seed(0)
    method, compiled = build_model(cfg, torch.device("cpu"), DistInfo())
    eager = copy.deepcopy(method)
    assert compiled is not method and isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    views = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    grads = []
    for model in (compiled, eager):
        model.train()
        loss = model(views)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in (method if model is compiled else eager).parameters()]))
    (loss_c, g_c), (loss_e, g_e) = grads
    assert loss_c == pytest.approx(loss_e, rel=1e-5)
    # per tensor, relative to its norm: float32 rounding gives ~4e-5 here (elementwise,
    # a few small entries differ more, as any reordering of a sum makes them)
    err = [((a - b).norm() / b.norm()).item() for a, b in zip(g_c, g_e)]
    assert len(err) == len(list(eager.parameters())) and max(err) < 1e-3, max(err)

    # a short compiled run: its first loss is the eager run's (same data, same seed); an
    # eager run resumes from its checkpoint
    base, out = base_run[0], tmp_path / "run"
    run_pretrain(load_config(None, overrides(dataset, out, "train.max_steps=8", "train.compile=true")), resume="auto")
    first = {str(d): next(r["loss"] for r in read_metrics(d) if r["step"] == 1) for d in (base, out)}
    assert first[str(out)] == pytest.approx(first[str(base)], rel=1e-4)
    summary = run_pretrain(load_config(None, overrides(dataset, out, "train.max_steps=10")), resume="auto")
    assert summary["step"] == 10


def _worker_of_rank(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker with ``RANK=rank`` (its environment says which)."""
    kids = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split()
    for pid in map(int, kids):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def test_a_stalled_rank_is_said_by_its_peer_and_the_run_goes_on(dataset, tmp_path):
    """SIGSTOP of rank 1 (as a hung file system would stall it): rank 0, waiting in the step's
    all-reduce, says so after train.stall_warn_s with its stacks, instead of 30 silent minutes
    until gloo's timeout; after SIGCONT it says it moves again and the run trains on."""
    import queue
    import threading

    run = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "mscn.train.pretrain",
           *overrides(dataset, run, "schedule.epochs=500", "train.ckpt_every_steps=100000", "train.stall_warn_s=3")]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()

    def wait_line(pattern: str, seconds: float) -> str:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if pattern in line:
                return line
        pytest.fail(f"no line with {pattern!r} in {seconds} s")

    stopped = None
    try:
        deadline = time.monotonic() + 240
        while not ((run / "metrics.jsonl").is_file() and any(r.get("step", 0) >= 2 for r in read_metrics(run))):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.5)
        stopped = _worker_of_rank(proc.pid, 1)
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        # the step's all-reduce, or the epoch's checkpoint if the stop lands there: both wait for rank 1
        line = wait_line("another rank may be the stalled one", 60)
        assert line.startswith("[mscn] rank 0 of 2: ") and str(run / "stalls" / "rank0.txt") in line
        stacks, end = run / "stalls" / "rank0.txt", time.monotonic() + 30  # written just after the line
        while not (stacks.is_file() and " in _loop" in stacks.read_text()) and time.monotonic() < end:
            time.sleep(0.2)
        assert " in _loop" in stacks.read_text()  # faulthandler's frames: the training loop
        os.kill(stopped, signal.SIGCONT)
        stopped = None
        wait_line("rank 0 of 2: moving again: ", 60)
        before = max(r["step"] for r in read_metrics(run))
        end = time.monotonic() + 60
        while max(r["step"] for r in read_metrics(run)) <= before:  # it trains on
            assert proc.poll() is None and time.monotonic() < end, "the run did not go on"
            time.sleep(0.5)
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        proc.terminate()  # torchrun forwards SIGTERM: the trainer's preemption
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            subprocess.run(["pkill", "-9", "-f", f"train.out_dir={run}"], check=False)
