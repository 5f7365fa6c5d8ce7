"""The stall watch (train/watchdog.py): a phase that lasts is said once, with the stacks."""
import re
import threading
import time

import pytest

from mscn.train.watchdog import StallWatch


class Lines:
    def __init__(self):
        self.lines, self.lock = [], threading.Lock()

    def __call__(self, text):
        with self.lock:
            self.lines.append(text)


def wait_for(pred, timeout=10.0):
    """``pred()`` once it holds, polling; a file it reads that the watch has not written yet
    (it prints the line first, then writes the stacks) counts as not yet."""
    def ask():
        try:
            return pred()
        except FileNotFoundError:
            return False

    end = time.monotonic() + timeout
    while not ask() and time.monotonic() < end:
        time.sleep(0.01)
    return ask()


def test_a_stalled_phase_is_said_once_with_the_stacks_then_its_end(tmp_path):
    out = Lines()
    with StallWatch(1, 2, 0.2, tmp_path / "stalls", printer=out) as watch:
        watch.at("data", 5)
        assert wait_for(lambda: out.lines)
        time.sleep(0.5)  # still stalled: no second line for the same stall
        assert len(out.lines) == 1
        line = out.lines[0]
        assert line.startswith("[mscn] rank 1 of 2: no batch from its loader for ") and "(step 5)" in line
        stacks = tmp_path / "stalls" / "rank1.txt"
        assert f"its threads' stacks: {stacks}" in line
        assert wait_for(lambda: "test_a_stalled_phase" in stacks.read_text())  # written after the line
        text = stacks.read_text()
        # the main thread's stack, where it stood: this test, in its sleep
        assert ": the wait for the batch of step 5\n" in text and "test_a_stalled_phase_is_said_once" in text
        watch.at("step", 6)
        assert wait_for(lambda: len(out.lines) == 2)
        assert "rank 1 of 2: moving again: the wait for the batch of step 5 took " in out.lines[1]
    n = len(out.lines)
    time.sleep(0.3)
    assert len(out.lines) == n  # the thread stopped with the block


@pytest.mark.parametrize("phase, says", [("step", "step 9 has run for"),
                                         ("checkpoint", "the checkpoint after step 9 has taken"),
                                         ("monitor", "the kNN monitor after step 9 has not moved for")])
def test_a_collective_phase_names_the_other_ranks_and_a_folder_that_cannot_be_written_is_said(tmp_path, phase,
                                                                                              says):
    out = Lines()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with StallWatch(0, 4, 0.1, blocker / "stalls", printer=out) as watch:  # under a file: no stacks
        watch.at(phase, 9)
        assert wait_for(lambda: len(out.lines) == 2)
    assert says in out.lines[0] and "another rank may be the stalled one" in out.lines[0]
    assert out.lines[1].startswith(f"[mscn] rank 0 of 4: its threads' stacks could not be written to {blocker}")


def test_the_line_comes_out_when_the_stacks_file_cannot_be_opened(tmp_path):
    """The run folder's file system may be what hangs: a FIFO nobody reads blocks the open,
    as a hung NFS would. The line was written after the stacks, so none came out."""
    import os

    out = Lines()
    (tmp_path / "stalls").mkdir()
    fifo = tmp_path / "stalls" / "rank0.txt"
    os.mkfifo(fifo)
    try:
        with StallWatch(0, 1, 0.1, tmp_path / "stalls", printer=out) as watch:
            watch.at("data", 3)
            assert wait_for(lambda: out.lines)
            assert "no batch from its loader for 0 s (step 3)" in out.lines[0]
            assert "another rank" not in out.lines[0]  # one process
    finally:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # let the stacks writer go
        time.sleep(0.2)
        os.close(fd)


def test_a_long_phase_that_beats_is_no_stall_until_it_stops_beating(tmp_path):
    """The kNN monitor's feature pass over a large data.root outlasts any threshold; its
    batches beat, so only a pass that stops moving is said."""
    from mscn.train.watchdog import beat

    out = Lines()
    beat()  # outside a watched loop: nothing to do
    with StallWatch(0, 2, 0.3, None, printer=out) as watch:
        watch.at("monitor", 40)
        for _ in range(60):  # 0.6 s in all, a batch every 10 ms
            beat()
            time.sleep(0.01)
        assert out.lines == []
        assert wait_for(lambda: out.lines)  # no beat any more
    assert "the kNN monitor after step 40 has not moved for 0 s" in out.lines[0]
    beat()  # after the block: no watch, nothing happens


def test_off_and_a_busy_loop_say_nothing(tmp_path):
    out = Lines()
    with StallWatch(0, 1, 0, tmp_path, printer=out) as watch:  # 0: off
        watch.at("data", 1)
        time.sleep(0.2)
    with StallWatch(0, 1, 0.5, tmp_path, printer=out) as watch:
        for step in range(40):
            watch.at("step", step)
            time.sleep(0.01)
    assert out.lines == [] and not (tmp_path / "rank0.txt").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_pretraining_marks_its_phases(tiny_synth_train, tmp_path, capsys):
    """The trainer's loop feeds the watch: with a threshold below any phase it reports one."""
    from mscn.config import load_config
    from mscn.train.pretrain import run_pretrain

    out = tmp_path / "run"
    cfg = load_config(None, [f"data.root={tiny_synth_train}", "data.image_size=32", "data.num_threads=1",
                             "model.arch=resnet18", "model.proj_hidden=64", "model.proj_out=32",
                             "train.global_batch=8", "train.device=cpu", "train.max_steps=3",
                             f"train.out_dir={out}", "train.stall_warn_s=0.001"])
    run_pretrain(cfg, resume="auto")
    log = capsys.readouterr().out
    assert re.search(r"\[mscn\] (no batch from its loader for 0 s \(step [123]\)|step [123] has run)", log)  # the loop's own marks, steps from 1
    assert "rank 0 of 1" not in log and "another rank" not in log  # one process: no ranks to name
    assert (out / "stalls" / "rank0.txt").is_file()


def test_an_evaluation_beats_with_every_batch_it_moves(tmp_path):
    """Evaluation loops take their batches through batch_to: a pass longer than the
    threshold that keeps moving is no stall; one that stops is said as the evaluation's."""
    import torch

    from mscn.pipelines.loader import MscnBatch
    from mscn.train.eval.common import batch_to

    batch = MscnBatch(views=[torch.zeros(2, 3, 4, 4)], labels=torch.zeros(2), index=torch.arange(2))
    out = Lines()
    with StallWatch(0, 2, 0.3, tmp_path / "stalls", printer=out, phase="eval"):
        for _ in range(60):  # 0.6 s in all, a batch every 10 ms
            batch_to(batch, torch.device("cpu"))
            time.sleep(0.01)
        assert out.lines == []
        assert wait_for(lambda: len(out.lines) == 1)
        assert wait_for(lambda: "=== rank 0 of 2" in (tmp_path / "stalls" / "rank0.txt").read_text())
    assert out.lines[0].startswith("[mscn] rank 0 of 2: the evaluation has not moved for 0 s; it waits for every "
                                   "rank, so another rank may be the stalled one")
    assert "the evaluation\n" in (tmp_path / "stalls" / "rank0.txt").read_text()
