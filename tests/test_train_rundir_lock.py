"""One live run per run folder (train/rundir.lock_run_dir): a real ``flock`` held by
another process refuses a second run on every rank in one line, a file system that
cannot lock lets the run go on with a note, and ``mscn demo --fresh`` never deletes a
live run's folder."""
import errno
import time
import fcntl

import pytest
import torch
import torch.multiprocessing as mp
from lock_holder import held_lock

from mscn.config import load_config
from mscn.errors import MscnError
from mscn.train import rundir


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path/run/.lock`` as a live run's rank 0 does."""
    out = tmp_path / "run"
    out.mkdir()
    try:
        with held_lock(out) as pid:
            yield out, pid
    finally:
        rundir.unlock_run_dirs()


def test_a_held_folder_is_refused_naming_the_live_run(holder):
    out, pid = holder
    with pytest.raises(MscnError, match=rf"is in use by a live run \(pid {pid} on test\): .* train.out_dir=DIR"):
        rundir.lock_run_dir(out)


def test_this_process_holds_its_lock_until_released(tmp_path):
    out = tmp_path / "run"
    assert rundir.lock_run_dir(out) is None
    assert rundir.lock_run_dir(out) is None  # taken already: no second lock, no error
    with open(out / ".lock") as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what another process would meet
    rundir.unlock_run_dirs()
    with open(out / ".lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again


def test_a_file_system_without_flock_runs_on_with_a_note(tmp_path, monkeypatch):
    def no_flock(*_):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    note = rundir.lock_run_dir(tmp_path / "run")
    assert "cannot lock (Function not implemented)" in note and "would not be stopped" in note
    # said once per process and folder: mscn demo --fresh, then its pretraining, ask again
    assert rundir.lock_run_dir(tmp_path / "run") is None
    assert rundir.lock_run_dir(tmp_path / "other") is not None
    rundir.unlock_run_dirs()  # a run's end: the next run in this process is told again
    assert "cannot lock" in rundir.lock_run_dir(tmp_path / "run")
    rundir.unlock_run_dirs()


def test_demo_fresh_keeps_a_live_runs_folder_and_clears_an_idle_one(holder, tmp_path):
    out, pid = holder
    (out / "checkpoints").mkdir()
    (out / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(MscnError, match=f"pid {pid}"):
        rundir.clear_run_dir(out)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoints", "config.yaml"]
    idle = tmp_path / "idle"
    (idle / "checkpoints").mkdir(parents=True)
    (idle / "metrics.jsonl").write_text("{}\n")
    rundir.clear_run_dir(idle)
    assert [p.name for p in idle.iterdir()] == [".lock"]


def _claim_on_rank(rank, init_file, out, results):
    from mscn.train.distributed import cleanup, init_distributed
    from mscn.train.pretrain import _claim
    from mscn.train.runtime import Runtime

    torch.set_num_threads(1)
    info = init_distributed("cpu", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cfg = load_config(None, [f"train.out_dir={out}"])
        try:
            _claim(cfg, "auto", Runtime(info, torch.device("cpu")), None, lambda msg: None)
            got = "claimed"
        except MscnError as e:
            got = str(e)
        (results / f"rank{rank}.txt").write_text(got)
    finally:
        cleanup()


def test_every_rank_raises_rank0s_refusal(holder, tmp_path):
    """torchrun with 2 ranks (gloo): only rank 0 takes the lock; both raise its one line, no hang."""
    out, pid = holder
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_claim_on_rank, args=(str(tmp_path / "init"), str(out), results), nprocs=2, join=True)
    got = [(results / f"rank{r}.txt").read_text() for r in range(2)]
    assert got[0] == got[1] and f"is in use by a live run (pid {pid} on test)" in got[0]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written


def test_output_places_that_cannot_be_folders_are_named_by_their_key(tmp_path):
    from mscn.config import load_config
    from mscn.train.pretrain import with_synthetic_data

    (tmp_path / "file").write_text("x")
    with pytest.raises(MscnError, match=r"train.out_dir .*file: a file, not a folder"):
        rundir.lock_run_dir(tmp_path / "file")
    cfg = load_config("demo", [f"data.synthetic_dir={tmp_path / 'file' / 'synth'}"])
    with pytest.raises(MscnError, match=r"data.synthetic_dir=.*file/synth: cannot write the synthetic dataset there "
                                        r"\(Not a directory: .*\); set data.synthetic_dir to a writable folder"):
        with_synthetic_data(cfg)


def test_failed_starts_are_requeued_a_few_times_and_a_busy_folder_keeps_stopped(holder, tmp_path, capsys,
                                                                                 tiny_synth_train, monkeypatch):
    """STOPPED asks a requeue script for another start (docs/TRAINING.md). A start that fails
    before its claim (an edited config, data not mounted on the new node, a config typo, a
    bug) left it there, and the job was requeued forever; removed at the first failure, a
    node that failed for a moment (no GPU visible, a port in use) ended the job. Each failed
    start is now counted in STOPPED, once for all the ranks of a start, and the third in a
    row removes it; a live run's folder keeps its own."""
    from mscn.train.pretrain import main

    out = tmp_path / "stopped"
    out.mkdir()
    stop_line = "stopped by SIGTERM after step 8"
    (out / rundir.STOPPED).write_text(stop_line + "\n")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    for restart, bad in enumerate(([f"data.root={tmp_path / 'not_mounted'}"], ["optim.base_lrr=1"],
                                   ["train.device=cpu"])):  # the third: a bug, below
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
        for rank in ("0", "1"):  # the ranks of one start count once (the one that fails may not be rank 0)
            monkeypatch.setenv("RANK", rank)
            if restart < 2:
                assert main([f"train.out_dir={out}", "train.device=cpu", *bad]) == 2
            else:
                with pytest.MonkeyPatch.context() as m:
                    def bug(*a, **kw):
                        raise ZeroDivisionError("a bug at the start")
                    m.setattr("mscn.train.pretrain.run_pretrain", bug)
                    with pytest.raises(ZeroDivisionError):
                        main([f"train.out_dir={out}", *bad])
            said = capsys.readouterr().out
            if restart < 2:
                lines = (out / rundir.STOPPED).read_text().splitlines()
                assert lines[0] == stop_line and len(lines) == 2 + restart, lines
                assert lines[-1].startswith(f"failed start slurm-4242.{restart} ")
                assert f"[mscn] STOPPED kept: this start failed ({restart + 1} of 3 in a row" in said, said
            elif rank == "0":
                assert not (out / rundir.STOPPED).exists()
                assert "[mscn] STOPPED removed: 3 starts of this run failed in a row" in said, said
    monkeypatch.setenv("RANK", "0")
    # torchrun without SLURM: its run id and restart count name a start, on every node (the
    # ranks of one start on 3 nodes counted 3 starts, and removed STOPPED at once: a probe); the
    # same --rdzv_id relaunched later is another start
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "mscn_job")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    (out / rundir.STOPPED).write_text(stop_line + "\n")
    for node in ("node0", "node1", "node2"):
        monkeypatch.setattr(rundir.socket, "gethostname", lambda: node)
        assert main([f"train.out_dir={out}", "optim.base_lrr=1"]) == 2
    lines = (out / rundir.STOPPED).read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("failed start torchrun-mscn_job.0 "), lines
    assert abs(int(lines[1].split("@")[-1]) - time.time()) < 60  # seconds since the epoch
    (out / rundir.STOPPED).write_text(f"{stop_line}\nfailed start torchrun-mscn_job.0 (an hour ago) "
                                      f"@{int(time.time()) - 3600}\n")
    assert main([f"train.out_dir={out}", "optim.base_lrr=1"]) == 2
    assert len((out / rundir.STOPPED).read_text().splitlines()) == 3
    # the seconds are compared, not the local time: a rank in another time zone (or in a DST
    # hour) read one start as several, and removed STOPPED after one failure (a review)
    (out / rundir.STOPPED).write_text(stop_line + "\n")
    for zone in ("UTC", "Europe/Berlin", "Asia/Tokyo"):
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        assert main([f"train.out_dir={out}", "optim.base_lrr=1"]) == 2
    monkeypatch.delenv("TZ")
    time.tzset()
    assert len((out / rundir.STOPPED).read_text().splitlines()) == 2
    capsys.readouterr()
    busy, _ = holder
    (busy / rundir.STOPPED).write_text(stop_line + "\n")
    rc = main(["--out", str(busy), "train.device=cpu", f"data.root={tiny_synth_train}", "train.global_batch=8"])
    assert rc == 2 and "is in use by a live run" in capsys.readouterr().err
    assert (busy / rundir.STOPPED).read_text() == stop_line + "\n"


def test_a_killed_writers_files_are_removed_at_the_claim_and_are_no_started_run(tmp_path):
    """A kill -9 during a checkpoint left checkpoints/.ckpt_*.tmp<pid>, removed only by the
    next successful save: on a tight disk every resume then failed for space. A full disk at
    the first start left .write-test.<pid>, which made the folder count as a started run."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    stale = [out / "checkpoints" / ".ckpt_00000008.pt.tmp11124", out / "checkpoints" / ".write-test.77",
             out / ".final.pt.tmp99", out / ".STOPPED.tmp4242"]
    for f in stale:
        f.write_bytes(b"partial")
    assert not rundir.run_started(out)
    cfg = load_config(None, [f"train.out_dir={out}"])
    rundir.claim_run_dir(cfg, fresh=False)  # not locked (a file system without flock): a live run's, maybe
    assert all(f.exists() for f in stale)
    try:
        rundir.lock_run_dir(out)
        rundir.claim_run_dir(cfg, fresh=False)
    finally:
        rundir.unlock_run_dirs()
    assert not any(f.exists() for f in stale) and (out / "config.yaml").is_file()


def test_a_full_disk_at_the_start_says_so_and_leaves_no_probe(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.os, "fsync", full)
    with pytest.raises(MscnError, match=r"cannot write checkpoints into .*: No space left on device; free some space "
                                        r"there, or pass a new train.out_dir"):
        rundir.check_writable(folder)
    assert list(folder.iterdir()) == []
