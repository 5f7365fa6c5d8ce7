"""Issue 11, pretraining half: exact resume after SIGKILL, SIGTERM checkpoints and stops,
runs never mix. Real DALI CPU pipeline, real masks (grid 8 on 32 px views), real
subprocesses and signals; torch on one thread (tests/conftest.py says why).
"""
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from lock_holder import held_lock
from pipeline_fixtures import bad_huffman_jpeg
from mscn.config import load_config
from mscn.train import checkpoint as ckpt
from mscn.train.pretrain import main, run_pretrain
from mscn.train.runlog import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# colour jitter, grayscale and masks on: every DALI and mask RNG matters for exactness
VIEW = "{scale: [0.5, 1.0], jitter_prob: 0.8, blur_prob: 0.0, grayscale_prob: 0.2, mask: {ratio: 0.2, grid: 8}}"
STEPS = 16  # 2 epochs of 8 steps: the run crosses a DALI epoch boundary


@pytest.fixture(scope="module")
def dataset(tiny_synth_train):
    return tiny_synth_train  # 64 images: 8 steps per epoch at global batch 8


def args(dataset, out_dir, *extra):
    return [f"data.root={dataset}", "data.image_size=32", "data.num_threads=1", "highpass.sigma=1.0",
            f"views=[{VIEW}, {VIEW}]", "model.arch=resnet18", "model.proj_hidden=64", "model.proj_out=32",
            "train.global_batch=8", "train.device=cpu", "schedule.epochs=2", "schedule.warmup_epochs=1",
            "optim.base_lr=2", f"train.out_dir={out_dir}", "train.log_every=1", "train.ckpt_every_steps=1",
            *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _start(dataset, out_dir, *extra):
    return subprocess.Popen([sys.executable, "-m", "mscn.train.pretrain", *args(dataset, out_dir, *extra)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, predicate, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    summary = run_pretrain(load_config(None, args(dataset, out)), resume="auto")
    assert summary["step"] == STEPS
    return out, summary


def _assert_same_run(ref, ref_summary, out, summary):
    rel = abs(summary["loss"] - ref_summary["loss"]) / abs(ref_summary["loss"])
    assert rel <= 1e-6, (summary["loss"], ref_summary["loss"])
    a = ckpt.load_checkpoint(ref / "final.pt")["model"]
    b = ckpt.load_checkpoint(out / "final.pt")["model"]
    for k, v in a.items():
        if v.is_floating_point():
            err = (b[k] - v).norm() / v.norm().clamp_min(1e-12)
            assert err <= 1e-6, (k, float(err))
    # each step logged once, with the uninterrupted run's loss
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))
    for r, q in zip(read_metrics(ref), read_metrics(out)):
        assert q["loss"] == pytest.approx(r["loss"], rel=1e-6), r["step"]


def test_sigkill_at_a_random_step_then_resume_is_exact(dataset, uninterrupted, tmp_path):
    out = tmp_path / "run"
    kill_after = random.Random().randint(2, STEPS - 3)  # any step; printed on failure
    proc = _start(dataset, out)
    try:
        _wait_for(proc, lambda: (out / "checkpoints" / f"ckpt_{kill_after:08d}.pt").exists(),
                  f"checkpoint {kill_after}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = ckpt.find_latest_valid(out / "checkpoints")[1]["step"]
    assert kill_after <= killed_at < STEPS and not (out / "final.pt").exists(), killed_at

    summary = run_pretrain(load_config(None, args(dataset, out)), resume="auto")
    assert summary["resumed_from"].endswith(f"ckpt_{killed_at:08d}.pt")
    _assert_same_run(*uninterrupted, out, summary)


def test_a_run_killed_by_a_bus_error_says_where_it_was(dataset, tmp_path):
    """A data file cut short under a live run (DALI reads files through memory maps) killed
    the process with SIGBUS and not a line (status 135). It now prints Python's fault report:
    every thread's stack, the loader's among them (here the signal is sent, as the kernel
    would: a real cut depends on when DALI maps the file)."""
    out = tmp_path / "run"
    proc = _start(dataset, out, "train.ckpt_every_steps=1000")
    try:
        _wait_for(proc, lambda: '"step": 2' in _text(out / "metrics.jsonl"), "step 2")
        proc.send_signal(signal.SIGBUS)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGBUS, proc.returncode
    assert "Fatal Python error: Bus error" in err and "train/pretrain.py" in err, err[-3000:]


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _signal_after_step_3(proc, out, while_live=None, sig=signal.SIGTERM) -> str:
    """Wait for step 3 of the run ``proc`` writes to ``out``, call ``while_live()``, send
    ``sig``; the run must exit with 128 + ``sig``. Its stderr."""
    try:
        _wait_for(proc, lambda: len(read_metrics(out)) >= 3, "step 3")
        if while_live is not None:
            while_live()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    return err


def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(dataset, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = _start(dataset, out, "train.ckpt_every_steps=1000")  # no periodic checkpoint before the signal

    def holds_the_folder():  # the live run holds the folder
        assert (out / ".lock").read_text().startswith(f"pid {proc.pid} on ")
        with open(out / ".lock") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)

    err = _signal_after_step_3(proc, out, holds_the_folder)
    line = err.strip().splitlines()[-1]
    assert line.startswith("mscn pretrain: stopped by SIGTERM after step "), line
    step = int(line.split("after step ")[1].split()[0])
    assert 3 <= step < STEPS and str(ckpt.ckpt_path(out / "checkpoints", step)) in line
    assert ckpt.find_latest_valid(out / "checkpoints")[1]["step"] == step  # the checkpoint of that step
    assert [r["step"] for r in read_metrics(out)][-1] == step  # it stopped after that step
    # the mark a requeue script reads (torchrun exits 1 on SIGTERM, not 143)
    assert (out / "STOPPED").read_text() == line.split(": ", 1)[1].split("; resume")[0] + "\n"

    summary = run_pretrain(load_config(None, args(dataset, out, "train.ckpt_every_steps=1000")), resume="auto")
    assert summary["resumed_from"].endswith(f"ckpt_{step:08d}.pt")
    _assert_same_run(*uninterrupted, out, summary)
    assert not (out / "STOPPED").exists()  # resumed, and finished


def test_sighup_of_a_dropped_session_is_a_stop_too(dataset, tmp_path):
    """A run started in an ssh session that drops gets SIGHUP: it ended at once (status 129,
    the steps since the last checkpoint lost). Now it stops as on SIGTERM, and the terminal
    it wrote to is gone (a write raises EIO), so the stop line must not end it with a
    traceback instead."""
    import pty

    out = tmp_path / "run"
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mscn.train.pretrain", *args(dataset, out, "train.ckpt_every_steps=1000")],
                            env=_env(), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)

    def drain():  # the terminal's reader, until the session drops
        try:
            while os.read(master, 65536):
                pass
        except OSError:
            pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        _wait_for(proc, lambda: len(read_metrics(out)) >= 3, "step 3")
        os.close(master)  # the ssh session drops: the terminal hangs up
        proc.send_signal(signal.SIGHUP)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGHUP
    stopped = (out / "STOPPED").read_text()
    assert stopped.startswith("stopped by SIGHUP after step "), stopped
    step = int(stopped.split("after step ")[1].split()[0])
    assert ckpt.find_latest_valid(out / "checkpoints")[1]["step"] == step >= 3


def test_a_run_under_nohup_is_not_stopped_by_sighup():
    """nohup sets SIGHUP to be ignored: the run must keep it so (it stopped at the next step)."""
    from mscn.train.preempt import StopFlag

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopFlag() as flag:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)
            assert flag.signum == 0 and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_run_fed_by_a_thread_stops_on_sigterm_and_resumes_exactly(dataset, uninterrupted, tmp_path):
    """data.feed_thread=true: a thread takes the batches, two ahead. SIGTERM mid-run still
    checkpoints the state after the last batch the trainer *used* (not the ones the thread
    had queued), the process exits cleanly, and the resumed run, fed by a thread again, is
    the uninterrupted run without one, step for step."""
    out = tmp_path / "run"
    proc = _start(dataset, out, "train.ckpt_every_steps=1000", "data.feed_thread=true")
    _signal_after_step_3(proc, out)
    step = ckpt.find_latest_valid(out / "checkpoints")[1]["step"]
    assert 3 <= step < STEPS and [r["step"] for r in read_metrics(out)][-1] == step
    summary = run_pretrain(load_config(None, args(dataset, out, "train.ckpt_every_steps=1000", "data.feed_thread=true")),
                           resume="auto")
    assert summary["resumed_from"].endswith(f"ckpt_{step:08d}.pt")
    _assert_same_run(*uninterrupted, out, summary)
    assert not [t for t in threading.enumerate() if t.name == "mscn-feeder"]  # closed at the end of the run


def test_a_second_launch_into_a_live_runs_folder_is_refused_and_changes_nothing(dataset, uninterrupted, tmp_path,
                                                                                capsys):
    """A folder whose ``.lock`` a live process holds (flock, as a running pretrain's rank 0
    does) refuses a second run in one line, also with --resume none (which would move the
    live run's files aside); once the holder is killed, the folder is free at once."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted[0], out)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with held_lock(out) as pid:
        for resume in ("auto", "none"):
            status = main(["--resume", resume, *args(dataset, out)])
            err = capsys.readouterr().err.strip().splitlines()
            assert status == 2 and len(err) == 1, "\n".join(err)
            assert f"is in use by a live run (pid {pid} on test)" in err[0] and "train.out_dir" in err[0]
            assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    summary = run_pretrain(load_config(None, args(dataset, out)), resume="auto")  # a finished run: nothing to do
    assert summary["step"] == STEPS


def test_a_different_run_in_the_same_directory_is_refused(dataset, uninterrupted, tmp_path, capsys):
    ref = uninterrupted[0]
    saved = (ref / "config.yaml").read_text()
    status = main(["--resume", "auto", *args(dataset, ref, "train.seed=1", "views.1.mask.ratio=0.1",
                                             "train.log_every=5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert "differs in train.seed, views.1.mask.ratio)" in err[0]  # log_every changes nothing: not named
    assert "train.out_dir=DIR (or --out DIR)" in err[0] and "--resume none" in err[0]
    assert (ref / "config.yaml").read_text() == saved  # written once, by the run that started here

    # a setting that changes nothing (logging) continues the run; config.yaml stays the first one
    again = run_pretrain(load_config(None, args(dataset, ref, "train.log_every=5")), resume="auto")
    assert again["step"] == STEPS and (ref / "config.yaml").read_text() == saved


def test_a_start_that_failed_before_its_first_step_does_not_hold_the_folder(dataset, tmp_path, capsys):
    """A typo in data.root stops the run before its folder is made. Data that fails at the
    first batch (every JPEG broken) fails after the folder got its config.yaml; the
    corrected command in the same folder must start, not be refused as "another run"."""
    out = tmp_path / "run"
    assert main(["--resume", "auto", *args(dataset, out, f"data.root={dataset}-typo")]) == 2
    assert "no such file or directory" in capsys.readouterr().err and not out.exists()
    assert main(["--resume", "auto", *args(dataset, out, "train.global_batch=4096")]) == 2  # more than the data
    assert "fewer than one global batch of 4096" in capsys.readouterr().err and not out.exists()
    broken = tmp_path / "broken" / "c0"
    broken.mkdir(parents=True)
    good = next(Path(dataset).rglob("*.jpg")).read_bytes()
    for i in range(16):  # a sound header and end: the check at the start passes them to DALI, which fails
        (broken / f"{i}.jpg").write_bytes(bad_huffman_jpeg(good))
    assert main(["--resume", "auto", *args(dataset, out, f"data.root={broken.parent}")]) == 2
    assert "cannot be decoded" in capsys.readouterr().err and (out / "config.yaml").is_file()
    summary = run_pretrain(load_config(None, args(dataset, out, "train.max_steps=1")), resume="auto")
    assert summary["step"] == 1 and f"root: {dataset}\n" in (out / "config.yaml").read_text()


def test_a_run_from_before_data_crop_continues_exactly_under_its_crop(dataset, uninterrupted, tmp_path, capsys):
    """A run saved before data.crop existed (window crop; no key in config.yaml or in the
    loader state) is refused under the new default with the value to pass, and given
    data.crop=window it continues exactly (DALI's checkpoint only loads into its own graph)."""
    out = tmp_path / "run"
    run_pretrain(load_config(None, args(dataset, out, "train.max_steps=6", "data.crop=window")), resume="auto")
    path, state = ckpt.find_latest_valid(out / "checkpoints")
    assert state["ranks"][0]["loader"]["crop"] == "window"
    for rank in state["ranks"]:  # as mscn wrote them before data.crop existed
        del rank["loader"]["crop"]
    ckpt.atomic_save(state, path)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["data"]["crop"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))

    assert main(["--resume", "auto", *args(dataset, out)]) == 2  # the default crop: another run
    err = capsys.readouterr().err
    assert "differs in data.crop); it predates data.crop and ran with data.crop=window: pass that" in err
    summary = run_pretrain(load_config(None, args(dataset, out, "data.crop=window")), resume="auto")
    assert summary["resumed_from"].endswith("ckpt_00000006.pt") and "not exact" not in capsys.readouterr().out
    ref = run_pretrain(load_config(None, args(dataset, tmp_path / "ref", "data.crop=window")), resume="auto")
    assert summary["loss"] == pytest.approx(ref["loss"], rel=1e-6)


def test_loader_state_of_the_other_crop_graph_is_not_resumed_exactly():
    from mscn.train.distributed import DistInfo
    from mscn.train.resume import this_rank

    cfg = load_config(None, [])
    info = DistInfo(rank=0, world_size=1, local_rank=0)
    mine = {"loader": {"crop": "rrc"}}
    assert this_rank({"ranks": [mine]}, info, cfg, False) == (mine, "")
    old = {"loader": {"dali": None}}  # saved before the key: the window crop
    got, why = this_rank({"ranks": [old]}, info, cfg, False)
    assert got is None and why == "its loader cut the views with data.crop=window, this run with rrc"
    assert this_rank({"ranks": [mine, mine]}, info, cfg, False)[0] is None  # another world size
    # the blur's place changes the graph too; a state from before the key had DALI's blur
    assert this_rank({"ranks": [{"loader": {"crop": "rrc", "blur_where": "pipeline"}}]}, info, cfg, False)[1] == ""
    # the default (auto) blurs in the loader on a GPU: a state of DALI's blur is not resumed there
    assert this_rank({"ranks": [mine]}, info, cfg, True)[1] == ("its loader blurred the views with "
                                                               "data.blur_where=pipeline, this run with loader")
    moved = load_config(None, ["data.blur_where=loader"])
    got, why = this_rank({"ranks": [mine]}, info, moved, False)
    assert got is None and why == ("its loader blurred the views with data.blur_where=pipeline, "
                                   "this run with loader")
    # blur_where=loader with no movable view (no blur, or solarize after it) keeps DALI's graph
    stays = load_config(None, ["data.blur_where=loader", *(f"views.{i}.blur_prob=0" for i in range(4))])
    assert this_rank({"ranks": [mine]}, info, stays, True) == (mine, "")
    # the colour's place too (a state from before the key had DALI's colour)
    coloured = load_config(None, ["data.blur_where=loader", "data.colour_where=loader"])
    moved_state = {"loader": {"crop": "rrc", "blur_where": "loader"}}
    got, why = this_rank({"ranks": [moved_state]}, info, coloured, False)
    assert got is None and why == ("its loader coloured the views with data.colour_where=pipeline, "
                                   "this run with loader")
    from mscn.colour import HANDOVER
    both = {"loader": {"crop": "rrc", "blur_where": "loader", "colour_where": "loader", "colour_handover": HANDOVER}}
    assert this_rank({"ranks": [both]}, info, coloured, False) == (both, "")
    # the colour's draws handed over in another form: DALI's checkpoint would not load
    other = {"loader": {**both["loader"], "colour_handover": "seven numbers per view"}}
    assert this_rank({"ranks": [other]}, info, coloured, False)[1] == (
        "its loader took the colour's draws from DALI in another form (an earlier mscn)")
    assert this_rank({"ranks": [both]}, info, moved, False)[1] == ("its loader coloured the views with "
                                                                  "data.colour_where=loader, this run with pipeline")


def test_resume_none_starts_over_and_keeps_the_old_run_aside(dataset, tmp_path):
    out = tmp_path / "run"
    run_pretrain(load_config(None, args(dataset, out, "train.max_steps=2")), resume="auto")
    summary = run_pretrain(load_config(None, args(dataset, out, "train.max_steps=1", "train.seed=3")), resume="none")
    assert summary["step"] == 1 and summary["resumed_from"] is None
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == 3
    (old,) = out.glob("superseded-*")
    assert [p.name for p in ckpt.list_checkpoints(old / "checkpoints")] == ["ckpt_00000001.pt", "ckpt_00000002.pt"]
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["ckpt_00000001.pt"]
    assert [r["step"] for r in read_metrics(out)] == [1]


def _files(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def test_resume_path_never_mixes_two_runs_nor_goes_back_over_one(dataset, uninterrupted, tmp_path, capsys):
    """``--resume PATH``: another folder's checkpoint branches into a new folder (exactly),
    never into a folder with a run of its own; a folder's own older checkpoint is refused
    (it would train over the newer steps, and keep_last would delete their checkpoints)."""
    ref, ref_summary = uninterrupted
    out = tmp_path / "run"
    run_pretrain(load_config(None, args(dataset, out, "train.max_steps=6")), resume="auto")
    before = _files(out)
    capsys.readouterr()
    for path, why in ((ref / "checkpoints" / "ckpt_00000015.pt", f"a checkpoint of another run folder ({ref}), "
                       f"but {out} holds a run of its own (at step 6)"),
                      (ref / "final.pt", "a checkpoint of another run folder"),
                      (out / "checkpoints" / "ckpt_00000005.pt", f"step 5, but {out} is already at step 6")):
        status = main(["--resume", str(path), *args(dataset, out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and why in err[0], err
        assert "train.out_dir=DIR" in err[0]
        assert _files(out) == before  # nothing moved, written or rotated away

    # into a new folder it branches: from ref's step 15, step 16 is the uninterrupted run's
    branch = run_pretrain(load_config(None, args(dataset, tmp_path / "branch")),
                          resume=str(ref / "checkpoints" / "ckpt_00000015.pt"))
    assert branch["step"] == STEPS and branch["trained_steps"] == 1
    assert branch["loss"] == pytest.approx(ref_summary["loss"], rel=1e-6)
    assert ckpt.step_of(tmp_path / "branch" / "final.pt") == STEPS
    # the branch command launched again (a requeued job): the folder's own run is named
    status = main(["--resume", str(ref / "checkpoints" / "ckpt_00000015.pt"), *args(dataset, tmp_path / "branch")])
    assert status == 2 and "--resume auto continues that run" in capsys.readouterr().err
    # ... but a branch killed before its first checkpoint (only its log) holds nothing to lose
    killed = tmp_path / "killed"
    killed.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(tmp_path / "branch" / name, killed / name)
    again = run_pretrain(load_config(None, args(dataset, killed)), resume=str(ref / "checkpoints" / "ckpt_00000015.pt"))
    assert again["step"] == STEPS and [r["step"] for r in read_metrics(killed)][-1] == STEPS

    # a finished checkpoint branched into a new folder: nothing to train, and the weights
    # are named where they are (this folder has no final.pt)
    capsys.readouterr()
    done = run_pretrain(load_config(None, args(dataset, tmp_path / "done")), resume=str(ref / "final.pt"))
    assert done["final"] is None and done["checkpoint"] == str(ref / "final.pt")
    assert f"nothing to train; its weights are in {ref / 'final.pt'}" in capsys.readouterr().out


def test_a_finished_run_rerun_reports_its_final_checkpoint_only_when_it_holds_the_weights(dataset, uninterrupted,
                                                                                         tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted[0], out)
    assert main(["--resume", "auto", *args(dataset, out)]) == 0
    log = capsys.readouterr().out
    assert f"done: step {STEPS}/{STEPS}, nothing left to train; final checkpoint {out / 'final.pt'}" in log
    assert "nan" not in log

    # a run resumed past its first end and stopped early: final.pt (here step 15) is older
    # than the newest checkpoint, so it is not reported as the run's weights
    (out / "final.pt").unlink()
    shutil.copy(tmp_path / "run" / "checkpoints" / "ckpt_00000015.pt", out / "final.pt")
    summary = run_pretrain(load_config(None, args(dataset, out, "train.max_steps=10")), resume="auto")
    assert summary["final"] is None and summary["checkpoint"].endswith("ckpt_00000016.pt")
    assert "its weights are in" in capsys.readouterr().out

    # killed after its last checkpoint, before final.pt: the rerun finishes it (a hard
    # link to that checkpoint), where it used to say "nothing to train" and leave none
    (out / "final.pt").unlink()
    summary = run_pretrain(load_config(None, args(dataset, out)), resume="auto")
    last = out / "checkpoints" / f"ckpt_{STEPS:08d}.pt"
    assert summary["final"] == str(out / "final.pt") and ckpt.step_of(out / "final.pt") == STEPS
    assert (out / "final.pt").stat().st_ino == last.stat().st_ino


def test_a_refused_resume_changes_nothing_and_a_misplaced_run_file_is_named_first(dataset, uninterrupted, tmp_path,
                                                                                  capsys):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted[0], out)
    # config.yaml lost: a resume under other settings is refused by the checkpoint, and the
    # folder is left as it was (config.yaml is not written with the refused settings)
    saved = (out / "config.yaml").read_text()
    (out / "config.yaml").unlink()
    before = _files(out)
    assert main(["--resume", "auto", *args(dataset, out, "optim.base_lr=0.5")]) == 2
    assert "differs in optim.base_lr" in capsys.readouterr().err
    assert _files(out) == before
    run_pretrain(load_config(None, args(dataset, out)), resume="auto")  # the run's own settings: it continues
    restored, lost = yaml.safe_load((out / "config.yaml").read_text()), yaml.safe_load(saved)
    assert restored["train"].pop("out_dir") == str(out) and lost["train"].pop("out_dir") != str(out)  # a copy
    assert restored == lost

    # a file where checkpoints/ should be: named before the run restarts and trims its metrics
    shutil.move(out / "checkpoints", tmp_path / "aside")
    (out / "checkpoints").write_text("not a folder")
    before = _files(out)
    assert main(["--resume", "auto", *args(dataset, out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'checkpoints'}: a file where the run keeps its checkpoints folder" in err
    assert _files(out) == before


def test_a_cut_short_config_yaml_is_called_damaged_not_another_run(dataset, uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted[0], out)
    text = (out / "config.yaml").read_text()
    for cut in (text[: len(text) // 2], text[: text.index("\nmodel:") + 1], ""):
        (out / "config.yaml").write_text(cut)
        assert main(["--resume", "auto", *args(dataset, out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{out / 'config.yaml'}: cut short or edited" in err[0], err
        assert "belongs to another run" not in err[0] and "or delete it (a resume writes it again" in err[0]
    # as the message says: deleted, it is written again from the checkpoint
    (out / "config.yaml").unlink()
    assert main(["--resume", "auto", *args(dataset, out)]) == 0
    again = (out / "config.yaml").read_text()
    assert again.replace(str(out), "OUT") == text.replace(str(uninterrupted[0]), "OUT")
    # an intact file of an older mscn lacks a key in its middle: another run, named by the key
    (out / "config.yaml").write_text("".join(ln for ln in text.splitlines(True) if not ln.startswith("  where:")))
    assert main(["--resume", "auto", *args(dataset, out)]) == 2
    assert "belongs to another run (differs in highpass.where)" in capsys.readouterr().err


def test_default_run_directory_is_new_per_run(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the demo recipe, shrunk to one tiny step; train.out_dir= left empty
        assert main(["--config", "demo", *args(dataset, "", "train.max_steps=1")]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.startswith("demo-") for r in runs), runs
    assert "to resume this run later pass train.out_dir=runs/demo-" in capsys.readouterr().out


def test_final_checkpoint_is_not_a_second_copy(uninterrupted):
    ref = uninterrupted[0]
    last = ckpt.list_checkpoints(ref / "checkpoints")
    assert len(last) == 2  # train.keep_last defaults to 2
    assert os.path.samefile(ref / "final.pt", last[-1])  # a hard link: no extra disk space


def test_pretrain_help_names_the_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: mscn pretrain") and "--out" in out


def test_tensorboard_logs_or_says_which_package_to_install(dataset, tmp_path):
    out = tmp_path / "tb"
    cfg = load_config(None, args(dataset, out, "train.max_steps=1", "train.tensorboard=true"))
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(Exception, match=r"pip install 'mscn\[tensorboard\]'"):
            run_pretrain(cfg, resume="auto")
        assert not Path(out, "checkpoints").exists()  # refused before training
        return
    run_pretrain(cfg, resume="auto")
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_a_run_with_the_blur_in_the_loader_resumes_exactly(dataset, tmp_path):
    """data.blur_where=loader: each sample's blur flag and σ are DALI draws handed to the
    loader, so they are in DALI's checkpoint; a run stopped at step 3 and resumed gives the
    uninterrupted run's loss at step 6."""
    blur = "{scale: [0.5, 1.0], jitter_prob: 0.8, blur_prob: 0.5, grayscale_prob: 0.2, mask: {ratio: 0.2, grid: 8}}"
    extra = [f"views=[{blur}, {blur}]", "data.blur_where=loader"]
    ref = run_pretrain(load_config(None, args(dataset, tmp_path / "ref", *extra, "train.max_steps=6")), resume="auto")
    run_pretrain(load_config(None, args(dataset, tmp_path / "run", *extra, "train.max_steps=3")), resume="auto")
    got = run_pretrain(load_config(None, args(dataset, tmp_path / "run", *extra, "train.max_steps=6")), resume="auto")
    assert got["resumed_from"].endswith("ckpt_00000003.pt")
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)


def test_a_run_with_the_colour_in_the_loader_resumes_exactly(dataset, tmp_path):
    """data.colour_where=loader: the jitter, gray, flip, blur and solarize flags and the
    factors come from one DALI draw per view, so they are in DALI's checkpoint; stopped at
    step 3 and resumed, the run (one view solarizes, as BYOL's) gives the uninterrupted
    run's loss at step 6."""
    view = "{scale: [0.5, 1.0], jitter_prob: 0.8, blur_prob: 0.5, grayscale_prob: 0.2, mask: {ratio: 0.2, grid: 8}}"
    byol = ("{scale: [0.5, 1.0], jitter_prob: 0.8, blur_prob: 0.5, grayscale_prob: 0.2, solarize_prob: 0.5, "
            "mask: {ratio: 0.2, grid: 8}}")  # its solarize moves with its colour and blur
    extra = [f"views=[{view}, {byol}]", "data.blur_where=loader", "data.colour_where=loader"]
    ref = run_pretrain(load_config(None, args(dataset, tmp_path / "ref", *extra, "train.max_steps=6")), resume="auto")
    run_pretrain(load_config(None, args(dataset, tmp_path / "run", *extra, "train.max_steps=3")), resume="auto")
    got = run_pretrain(load_config(None, args(dataset, tmp_path / "run", *extra, "train.max_steps=6")), resume="auto")
    assert got["resumed_from"].endswith("ckpt_00000003.pt")
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["colour_where"] == "loader"


def test_a_colour_setting_that_moves_nothing_is_said(dataset, tmp_path, capsys):
    """data.colour_where=loader on the CPU path, where the default views blur in DALI: the
    run goes on with DALI's colour and says so in one line, with what would move it."""
    view = "{scale: [0.5, 1.0], jitter_prob: 0.8, blur_prob: 0.5, grayscale_prob: 0.2, mask: {ratio: 0.2, grid: 8}}"
    run_pretrain(load_config(None, args(dataset, tmp_path / "run", "train.max_steps=1", f"views=[{view}, {view}]",
                                        "data.colour_where=loader")), resume="auto")
    out = capsys.readouterr().out
    assert "[mscn] data.colour_where=loader moves no view's colour on the CPU path" in out
    assert "add data.blur_where=loader" in out


def test_config_yaml_records_where_the_blur_ran_and_a_resume_elsewhere_is_told_the_value(dataset, tmp_path,
                                                                                         capsys):
    """data.blur_where=auto is resolved when a run starts (pipeline on the CPU path, loader
    on a GPU): config.yaml records the choice, the same config resumes, and an explicit
    value that would blur elsewhere is refused with the value that continues the run (only
    when nothing else differs)."""
    out = tmp_path / "run"
    run_pretrain(load_config(None, args(dataset, out, "train.max_steps=2")), resume="auto")
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["blur_where"] == "pipeline"
    assert main(["--resume", "auto", *args(dataset, out, "data.blur_where=loader")]) == 2
    err = capsys.readouterr().err
    assert "differs in data.blur_where); it ran with data.blur_where=pipeline: pass that to continue it" in err
    assert main(["--resume", "auto", *args(dataset, out, "data.blur_where=loader", "train.seed=5")]) == 2
    err = capsys.readouterr().err  # two keys differ: the blur's value alone would not continue it
    assert "differs in data.blur_where, train.seed)" in err and "pass that to continue it" not in err
    summary = run_pretrain(load_config(None, args(dataset, out, "train.max_steps=3")), resume="auto")
    assert summary["step"] == 3 and "not exact" not in capsys.readouterr().out


def test_a_run_keeps_the_blur_its_auto_chose_when_resumed_elsewhere(dataset, tmp_path, capsys):
    """A run whose config.yaml records a blur place other than what auto picks here (a GPU
    run resumed on the CPU, or one started before auto chose the loader on a GPU) continues
    with its own under data.blur_where=auto, says so once, and resumes exactly. Here: a CPU
    run started with the blur in the loader, resumed with the default."""
    out, ref = tmp_path / "run", tmp_path / "ref"
    blurred = "views=[" + ", ".join([VIEW.replace("blur_prob: 0.0", "blur_prob: 0.5")] * 2) + "]"
    run_pretrain(load_config(None, args(dataset, out, blurred, "train.max_steps=3", "data.blur_where=loader")), resume="auto")
    capsys.readouterr()
    summary = run_pretrain(load_config(None, args(dataset, out, blurred, "train.max_steps=6")), resume="auto")
    log = capsys.readouterr().out
    assert "data.blur_where=auto: this run started with loader and continues so (a new run here would use " \
           "pipeline)" in log and "not exact" not in log
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["blur_where"] == "loader"
    whole = run_pretrain(load_config(None, args(dataset, ref, blurred, "train.max_steps=6", "data.blur_where=loader")),
                         resume="auto")
    assert summary["step"] == whole["step"] == 6 and summary["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    capsys.readouterr()
    run_pretrain(load_config(None, args(dataset, out, blurred, "train.max_steps=7")), resume="auto")
    assert "continues so" in capsys.readouterr().out  # every resume says it
    fresh = tmp_path / "fresh"  # a run without a saved choice resolves auto here: no note
    run_pretrain(load_config(None, args(dataset, fresh, blurred, "train.max_steps=1")), resume="auto")
    assert "continues so" not in capsys.readouterr().out


def test_adopt_saved_choices_reads_the_resumed_runs_own_record(tmp_path):
    """rundir.adopt_saved_choices, case by case: the run folder's config.yaml decides under
    auto (and LEGACY's value for a run from before the key); a checkpoint path resumed into
    a new folder reads the checkpoint's run folder; --resume none, an explicit value and a
    run that never reached a step adopt nothing."""
    from mscn.train.rundir import adopt_saved_choices

    run = tmp_path / "a"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"blur_where": "loader"}}))
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    cfg = load_config(None, [f"train.out_dir={run}"])
    got, note = adopt_saved_choices(cfg, "auto", gpu=False)
    assert got.data.blur_where == "loader" and "started with loader" in note and "would use pipeline" in note
    got, note = adopt_saved_choices(cfg, "auto", gpu=True)  # what auto picks there anyway: no note
    assert got.data.blur_where == "loader" and note is None
    for resume in ("none", None):
        assert adopt_saved_choices(cfg, resume, gpu=False) == (cfg, None)
    pinned = load_config(None, [f"train.out_dir={run}", "data.blur_where=pipeline"])
    assert adopt_saved_choices(pinned, "auto", gpu=False) == (pinned, None)
    elsewhere = load_config(None, [f"train.out_dir={tmp_path / 'b'}"])
    for ckpt_path in (run / "checkpoints" / "ckpt_00000002.pt", run / "final.pt"):
        assert adopt_saved_choices(elsewhere, str(ckpt_path), gpu=False)[0].data.blur_where == "loader"
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"crop": "rrc"}}))  # before the key: DALI blurred
    got, note = adopt_saved_choices(cfg, "auto", gpu=True)
    assert got.data.blur_where == "pipeline" and "would use loader" in note
    (run / "metrics.jsonl").unlink()  # a start that never reached a step holds nothing to continue
    assert adopt_saved_choices(cfg, "auto", gpu=True) == (cfg, None)


def test_a_rank_that_cannot_see_rank_0s_checkpoint_says_why(tmp_path, monkeypatch):
    """Rank 0 picked a checkpoint in its train.out_dir; another node without that folder (not on
    a shared file system) was told to 'use --resume auto', which it had."""
    from mscn.config import load_config
    from mscn.errors import MscnError
    from mscn.train import resume as rs
    from mscn.train.distributed import DistInfo

    monkeypatch.setattr(rs, "broadcast_object", lambda obj: (str(tmp_path / "runs/x/checkpoints/ckpt_00000003.pt"), None))
    cfg = load_config("demo", [f"train.out_dir={tmp_path / 'runs/x'}"])
    with pytest.raises(MscnError, match=r"ckpt_00000003.pt \(rank 0 resumes from it, but rank 1 cannot see it: "
                                        r"train.out_dir must be on a file system every node shares"):
        rs.find_resume_state(cfg, "auto", DistInfo(rank=1, world_size=2))


def test_a_resume_onto_changed_data_is_refused_and_a_branch_onto_it_starts_a_fresh_order(tiny_synth_train, tmp_path,
                                                                                          capsys):
    """Files added to data.root between a stop and its resume: DALI restored the old reader
    state over the new list without a word (and with fewer files gave batches such as
    [7, 9, 9, 9]), and the schedule took another number of steps per epoch. Now the resume
    says so and changes nothing; a branch into a new folder continues on the new data."""
    from mscn.errors import MscnError

    data = tmp_path / "data"
    shutil.copytree(tiny_synth_train, data)
    run = tmp_path / "run"
    run_pretrain(load_config(None, args(data, run, "train.max_steps=2")), resume="auto")
    first_class = sorted(p for p in data.iterdir() if p.is_dir())[0]
    shutil.copy(next(first_class.iterdir()), first_class / "added.jpg")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(MscnError, match=r"ckpt_00000002\.pt: its loader read other data \(64 samples then, 65 now in .*: "
                                        r"another number of steps per epoch, another schedule\), so "
                                        r"it cannot continue exactly; .* --resume \S+ckpt_00000002\.pt --out NEW_DIR"):
        run_pretrain(load_config(None, args(data, run)), resume="auto")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    capsys.readouterr()
    branch = tmp_path / "branch"
    summary = run_pretrain(load_config(None, args(data, branch, "train.max_steps=3")),
                           resume=str(run / "checkpoints" / "ckpt_00000002.pt"))
    assert summary["step"] == 3
    assert "branched onto other data: its loader read other data (64 samples then, 65 now" in capsys.readouterr().out
    # a file moved to another class: as many samples, so no word of another schedule
    second_class = sorted(p for p in data.iterdir() if p.is_dir())[1]
    (first_class / "added.jpg").rename(second_class / "added.jpg")
    with pytest.raises(MscnError, match=r"ckpt_00000003\.pt: its loader read other data \(as many samples, 65, but "
                                        r"other file names, labels or classes in \S+\), so it cannot continue exactly;"):
        run_pretrain(load_config(None, args(data, branch)), resume="auto")


def test_the_same_data_at_another_path_continues_exactly_and_other_data_there_is_refused(dataset, uninterrupted,
                                                                                          tmp_path, capsys):
    """A job that stages the data to its node's disk resumes with another data.root: it was
    refused as "another run", and a branch from it took a fresh data order. The data is
    checked by what it holds (the loader state's digest), not where it is mounted."""
    from mscn.errors import MscnError
    from mscn.data.source import resolve_source
    from mscn.train import resume as rs

    out = tmp_path / "run"
    run_pretrain(load_config(None, args(dataset, out, "train.max_steps=5")), resume="auto")
    other = tmp_path / "other" / "train"  # one file fewer
    shutil.copytree(dataset, other)
    next(sorted(p for p in other.iterdir() if p.is_dir())[0].iterdir()).unlink()
    with pytest.raises(MscnError, match=r"ckpt_00000005\.pt: its loader read other data \(64 samples then, 63 now"):
        run_pretrain(load_config(None, args(other, out)), resume="auto")
    # resumed on another number of ranks, the loaders start afresh: any rank's state still says what it read
    state = ckpt.load_checkpoint(out / "checkpoints" / "ckpt_00000005.pt")
    assert rs.data_changed(state, None, resolve_source(str(other)), str(other)).startswith("its loader read other "
                                                                                        "data (64")
    staged = tmp_path / "staged" / "train"
    shutil.copytree(dataset, staged)
    assert rs.data_changed(state, None, resolve_source(str(staged)), str(staged)) == ""
    # a checkpoint from before the loader recorded its data: only the path can tell
    old = {**state, "ranks": [{**r, "loader": {k: v for k, v in r["loader"].items() if not k.startswith("data_")}}
                              for r in state["ranks"]]}
    assert rs.data_changed(old, None, resolve_source(str(staged)), str(staged)).startswith(
        "its checkpoint predates the record of the data it read, and data.root changed")
    assert rs.data_changed(old, None, resolve_source(str(dataset)), str(dataset)) == ""
    capsys.readouterr()
    summary = run_pretrain(load_config(None, args(staged, out)), resume="auto")
    assert "fresh data order" not in capsys.readouterr().out
    _assert_same_run(*uninterrupted, out, summary)


def test_a_run_whose_checkpoints_all_fail_to_load_is_not_restarted_over(dataset, tmp_path, capsys):
    """Every checkpoint of a run damaged (set aside as .unreadable): --resume auto started
    from step 0 in the run's folder, training over its progress and its metrics, with only
    "no valid checkpoint: starting from scratch". Now it stops; --resume none starts over."""
    from mscn.errors import MscnError

    out = tmp_path / "run"
    run_pretrain(load_config(None, args(dataset, out, "train.max_steps=2")), resume="auto")
    for f in (out / "checkpoints").glob("ckpt_*.pt"):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    with pytest.raises(MscnError, match=r"checkpoints: none of this run's checkpoints loads \(ckpt_00000001.pt.unreadable, "
                                        r"ckpt_00000002.pt.unreadable\), and starting from step 0 here would train "
                                        r"over its progress: .* --resume none"):
        run_pretrain(load_config(None, args(dataset, out, "train.max_steps=3")), resume="auto")
    assert [r["step"] for r in read_metrics(out)] == [1, 2]  # the log is as it was
    summary = run_pretrain(load_config(None, args(dataset, out, "train.max_steps=1")), resume="none")
    assert summary["step"] == 1 and any(p.name.startswith("superseded-") for p in out.iterdir())


def test_the_loader_refuses_a_state_saved_over_other_data(tmp_path):
    """For other projects that keep the loader state themselves (build_train_loader(state=))."""
    from pipeline_fixtures import make_folder, tiny_cfg

    from mscn.pipelines import build_train_loader, endless
    from mscn.pipelines.loader import LoaderStateMismatch

    root = make_folder(tmp_path / "d", classes=2, per_class=10)
    cfg = tiny_cfg(root, "train.global_batch=4")
    loader = build_train_loader(cfg, apply_mask=False)
    next(endless(loader))
    state = loader.state_dict()
    assert build_train_loader(cfg, apply_mask=False, state=state) is not None  # the same data: fine
    (root / "c1" / "000.jpg").rename(root / "c0" / "moved.jpg")  # relabelled: same count, other data
    with pytest.raises(LoaderStateMismatch, match=r"holds 20 samples, other data than the 20 samples"):
        build_train_loader(cfg, apply_mask=False, state=state)
    old = {k: v for k, v in state.items() if k not in ("data_digest", "data_samples", "data_layout")}
    assert build_train_loader(cfg, apply_mask=False, state=old) is not None  # saved before the key: not checked


def test_a_loader_state_of_shards_does_not_continue_over_a_pack_in_another_order(tmp_path):
    """Two packs of one folder with other shuffles have the same shard names, sizes and
    labels (the same digest): a reader's saved position replayed over the other order."""
    from pipeline_fixtures import make_folder, tiny_cfg

    from mscn.data.pack import pack
    from mscn.pipelines import build_train_loader, endless
    from mscn.pipelines.loader import LoaderStateMismatch

    root = make_folder(tmp_path / "d", classes=2, per_class=10)
    for name, seed in (("a", 0), ("b", 1)):
        pack(root, tmp_path / name, shard_size=8, progress=False, workers=1, shuffle_seed=seed)
    loader = build_train_loader(tiny_cfg(tmp_path / "a", "train.global_batch=4"), apply_mask=False)
    next(endless(loader))
    state = loader.state_dict()
    cfg_b = tiny_cfg(tmp_path / "b", "train.global_batch=4")
    with pytest.raises(LoaderStateMismatch, match=r"the same shards and samples, but in another order"):
        build_train_loader(cfg_b, apply_mask=False, state=state)
    shutil.copytree(tmp_path / "a", tmp_path / "a_staged")  # the same pack elsewhere: fine
    assert build_train_loader(tiny_cfg(tmp_path / "a_staged", "train.global_batch=4"), apply_mask=False,
                              state=state) is not None


def test_a_file_that_fails_mid_run_keeps_the_steps_trained_and_the_run_continues_exactly(dataset, uninterrupted,
                                                                                         tmp_path, capsys):
    """A JPEG cut short, met in batch 3: the loader's error ends the run, and the 2 steps
    trained go into a checkpoint first (they were lost up to the last periodic one). With the
    file mended, the same command continues it exactly, as if nothing had happened."""
    from mscn.pipelines.loader import build_train_loader

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    extra = "train.ckpt_every_steps=1000"  # no periodic checkpoint: the error's is the only one
    loader = build_train_loader(load_config(None, args(data, tmp_path / "unused", extra)))
    batches = iter(loader)
    third = [next(batches) for _ in range(3)][-1]
    bad = data / loader.source.files[int(third.index[0])]  # a file of batch 3, which steps 1-2 never read
    del batches, loader
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 3])
    out = tmp_path / "run"
    assert main(args(data, out, extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    kept = ckpt.ckpt_path(out / "checkpoints", 2)
    assert f"{bad}: cannot be decoded" in err and f"The 2 steps trained are kept in {kept}" in err, err
    assert f"--resume {kept} --out NEW_DIR" in err
    assert ckpt.find_latest_valid(out / "checkpoints")[1]["step"] == 2
    bad.write_bytes(good)  # mended: same file list, so the same folder continues exactly
    summary = run_pretrain(load_config(None, args(data, out, extra)), resume="auto")
    assert summary["resumed_from"] == str(kept)
    _assert_same_run(*uninterrupted, out, summary)


def _torchrun(*overrides) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2", "-m",
           "mscn.train.pretrain", *overrides]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def test_a_file_that_fails_on_one_rank_under_torchrun_keeps_the_steps_of_every_rank(dataset, tmp_path):
    """Under torchrun, a file in rank 1's batch 3 that only DALI finds damaged (it passes the
    check at the start): the other ranks waited for rank 1 in the step's all-reduce, and the
    steps since the last periodic checkpoint were lost. Now the ranks agree before the step,
    all of them checkpoint step 2 (rank 0 with its batch 3 put back), rank 0 says the one
    line, and the same command, with the file mended, continues exactly: step 2's checkpoint
    and the final weights are those of a run that never failed."""
    from mscn.pipelines.loader import build_train_loader

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    steps = "train.max_steps=4"
    ref = tmp_path / "ref"
    res = _torchrun(*args(data, ref, steps, "train.keep_last=8"))  # a checkpoint every step
    assert res.returncode == 0, res.stderr[-3000:]

    loader = build_train_loader(load_config(None, args(data, tmp_path / "unused", steps)), rank=1, world_size=2)
    batches = iter(loader)
    third = [next(batches) for _ in range(3)][-1]
    bad = data / loader.source.files[int(third.index[0])]  # rank 1's batch 3
    del batches, loader
    good = bad.read_bytes()
    bad.write_bytes(bad_huffman_jpeg(good))
    out, extra = tmp_path / "run", "train.ckpt_every_steps=1000"  # no periodic checkpoint before the failure
    res = _torchrun(*args(data, out, steps, extra))
    assert res.returncode != 0
    kept = ckpt.ckpt_path(out / "checkpoints", 2)
    said = [ln for ln in res.stderr.splitlines() if ln.startswith("mscn pretrain: ")]
    assert len(said) == 1, res.stderr[-3000:]  # once, by rank 0, although rank 1 met the file
    assert said[0].startswith(f"mscn pretrain: error: {bad}: ") and "(rank 1 of 2)" in said[0], said
    assert f"The 2 steps trained are kept in {kept}" in said[0], said
    assert ckpt.find_latest_valid(out / "checkpoints")[1]["step"] == 2
    a, b = ckpt.load_checkpoint(ckpt.ckpt_path(ref / "checkpoints", 2)), ckpt.load_checkpoint(kept)
    for r in range(2):  # each rank's loader as it was after step 2
        assert torch.equal(a["ranks"][r]["loader"]["dali"], b["ranks"][r]["loader"]["dali"]), r
        assert torch.equal(a["ranks"][r]["loader"]["mask"]["gen"], b["ranks"][r]["loader"]["mask"]["gen"]), r

    bad.write_bytes(good)
    res = _torchrun(*args(data, out, steps, extra))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = ckpt.load_checkpoint(ref / "final.pt"), ckpt.load_checkpoint(out / "final.pt")
    assert b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_a_metrics_line_cut_short_does_not_stop_the_resume(tmp_path, capsys):
    """A full disk or a kill mid-write leaves a partial last line (or NUL bytes) in
    metrics.jsonl; every resume after that crashed in json.loads until the file was mended
    by hand. Damaged lines are dropped and said, the rest is trimmed as usual."""
    from mscn.train.runlog import trim_metrics

    path = tmp_path / "metrics.jsonl"
    good = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7))
    path.write_text(good + '{"step": 7, "loss": 0.9, "vi' + "\x00" * 50 + "\n" + "\x00" * 200)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert trim_metrics(path, 5) == 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert trim_metrics(path, 5) == 0  # mended: nothing more to drop
    # a whole last record without its newline: kept, and ended, so the next one is not glued on
    path.write_text(good[:-1])
    assert trim_metrics(path, 6) == 0 and path.read_text() == good


def test_an_empty_resume_is_refused_not_taken_for_none(tmp_path, capsys):
    """`--resume "$CKPT"` with CKPT unset in a requeue script: it read as `none`, and each
    requeue moved the run aside and started over."""
    with pytest.raises(SystemExit) as e:
        main(["--config", "demo", "--out", str(tmp_path / "run"), "--resume", ""])
    assert e.value.code == 2
    assert "--resume '': empty (an unset variable?); pass auto, a checkpoint path, or none" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_typo_in_the_runs_config_yaml_is_named_as_an_edit(dataset, uninterrupted, tmp_path, capsys):
    """A hand-edited config.yaml with a misspelt key or a wrong type was refused as "another
    run (differs in train.max_stpes)", with a new folder as the fix."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted[0], out)
    saved = out / "config.yaml"
    good = saved.read_text()
    saved.write_text(good.replace("  max_steps:", "  max_stpes:", 1))
    assert main(["--resume", "auto", *args(dataset, out)]) == 2
    err = capsys.readouterr().err
    assert "max_stpes" in err and "(this run's own record, edited?); mend it, or delete it" in err, err
    assert err.count("\n") == 1
    saved.write_text(good.replace("  seed: 0", "  seed: zero", 1))
    assert main(["--resume", "auto", *args(dataset, out)]) == 2
    err = capsys.readouterr().err
    assert "train.seed" in err and "edited?" in err, err
    saved.unlink()  # deleted, as the message offers: the resume writes it again from the checkpoint
    assert main(["--resume", "auto", *args(dataset, out)]) == 0
    assert yaml.safe_load(saved.read_text())["train"]["max_steps"] == yaml.safe_load(good)["train"]["max_steps"]


def test_a_stray_checkpoint_of_another_run_names_the_way_out(dataset, uninterrupted, tmp_path, capsys):
    """Another run's checkpoint copied into checkpoints/ as the newest: the advice was to
    pass its settings, which the folder's own config.yaml then refused. The way out is to
    move that file, and the line now says so."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted[0], out)
    state = ckpt.load_checkpoint(out / "final.pt")
    state["config"]["optim"]["base_lr"] = 0.5
    stray = ckpt.ckpt_path(out / "checkpoints", STEPS + 5)
    torch.save(state, stray)
    assert main(["--resume", "auto", *args(dataset, out)]) == 2
    err = capsys.readouterr().err
    assert f"{stray} belongs to another run (differs in optim.base_lr)" in err, err
    assert f"if {stray.name} was copied in from another run, move it out of {out / 'checkpoints'}" in err, err


@pytest.mark.parametrize("damage", ["cut short", "bytes flipped"])
def test_a_checkpoint_named_by_hand_continues_past_a_newer_damaged_one(dataset, uninterrupted, tmp_path, capsys,
                                                                       damage):
    """``--resume ckpt_5`` while the folder's newer ``ckpt_6`` is cut short, or has bytes
    flipped inside a tensor (it opens, but fails its checksums): the folder's progress is its
    newest checkpoint that a resume would take (``--resume auto`` would continue from it too),
    so the named one continues the run, exactly. Before, the name of the damaged file made the
    folder "already at step 6" and the resume was refused. A file that is not a checkpoint at
    all (an image passed by mistake) is called that, not another run's."""
    ref, ref_summary = uninterrupted
    out = tmp_path / "run"
    run_pretrain(load_config(None, args(dataset, out, "train.max_steps=6")), resume="auto")
    older, newest = ckpt.list_checkpoints(out / "checkpoints")
    assert (ckpt.step_of(older), ckpt.step_of(newest)) == (5, 6)
    data = bytearray(newest.read_bytes())
    if damage == "cut short":  # a copy cut short
        data = data[:4096]
    else:  # a disk or a copy that went wrong: the archive's structure is whole
        mid = len(data) // 2
        data[mid:mid + 4096] = bytes(b ^ 1 for b in data[mid:mid + 4096])
    newest.write_bytes(data)
    assert not ckpt.opens(newest)
    capsys.readouterr()
    image = next(Path(dataset).rglob("*.jpg"))
    assert main(["--resume", str(image), *args(dataset, out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--resume {image}: not a readable checkpoint (not a torch checkpoint" in err[0], err
    summary = run_pretrain(load_config(None, args(dataset, out)), resume=str(older))
    assert summary["resumed_from"] == str(older)
    _assert_same_run(ref, ref_summary, out, summary)


def test_a_branch_into_a_folder_whose_checkpoints_all_fail_to_load_is_refused(dataset, uninterrupted, tmp_path,
                                                                              capsys):
    """``--resume <another folder's checkpoint>`` into a folder whose own checkpoints all fail
    their checksums: that folder still holds a run (``--resume auto`` refuses to start over
    it), so the branch is refused, naming them, not trained over it (a review)."""
    out = tmp_path / "run"
    run_pretrain(load_config(None, args(dataset, out, "train.max_steps=6")), resume="auto")
    for path in ckpt.list_checkpoints(out / "checkpoints"):
        data = bytearray(path.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 4096] = bytes(b ^ 1 for b in data[mid:mid + 4096])
        path.write_bytes(data)
    before = _files(out)
    other = ckpt.list_checkpoints(uninterrupted[0] / "checkpoints")[0]
    capsys.readouterr()
    assert main(["--resume", str(other), *args(dataset, out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of this run's checkpoints loads" in err[0], err
    assert _files(out) == before


def test_a_read_only_checkpoint_folder_is_found_before_the_first_step(dataset, tmp_path, monkeypatch, capsys):
    """A ``checkpoints/`` the run cannot write into (a read-only bind mount; root ignores
    file modes, so the refusal is made here) stops the run at its start, in one line,
    not at its first checkpoint after ``train.ckpt_every_steps`` steps of training."""
    import builtins
    import errno

    from mscn.train import rundir

    def read_only(path, mode="r", *a, **k):
        if "w" in mode and Path(path).parent.name == "checkpoints":
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return builtins.open(path, mode, *a, **k)

    monkeypatch.setattr(rundir, "open", read_only, raising=False)
    monkeypatch.delenv("MSCN_DEBUG", raising=False)
    out = tmp_path / "run"
    assert main(args(dataset, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mscn pretrain: error: cannot write checkpoints into {out / 'checkpoints'}: Read-only file "
                   f"system; make it writable, or pass a new train.out_dir=DIR (or --out DIR)"], err
    assert not (out / "metrics.jsonl").exists() and not list((out / "checkpoints").iterdir())
