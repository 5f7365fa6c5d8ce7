"""run_cli: the one top-level handler of every mscn entry point."""
import re

import pytest

from mscn.cli import main as mscn_main
from mscn.errors import ConfigError, DataError, SignalStop, run_cli
from mscn.train.pretrain import main as pretrain_main


def _raise(exc):
    def body():
        raise exc
    return body


def test_mscn_error_is_one_line_and_status_2(capsys, monkeypatch):
    monkeypatch.delenv("MSCN_DEBUG", raising=False)
    assert run_cli(_raise(DataError("x.jpg: corrupt")), "tool") == 2
    assert capsys.readouterr().err == "tool: error: x.jpg: corrupt\n"


def test_success_interrupt_and_bugs(capsys, monkeypatch):
    monkeypatch.delenv("MSCN_DEBUG", raising=False)
    assert run_cli(lambda: None, "tool") == 0
    assert run_cli(lambda: 3, "tool") == 3
    assert run_cli(_raise(KeyboardInterrupt()), "tool") == 130
    assert capsys.readouterr().err == "tool: interrupted\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli(lambda: 1 / 0, "tool")


def test_mscn_warnings_are_one_line_and_others_keep_their_form(monkeypatch):
    """mscn's warnings name no file, line or source line; a library's warning keeps Python's
    form; a recorder (pytest.warns) still sees mscn's warning."""
    import os
    import subprocess
    import sys

    from mscn.config import load_config
    from mscn.train.eval.pretrained import HighPassMismatchWarning, check_highpass

    monkeypatch.delenv("MSCN_DEBUG", raising=False)
    pre, other = load_config(None, []), load_config(None, ["highpass.sigma=3.0"])

    # printed as a user sees it: in a process of its own, outside pytest's warning capture
    body = """
import warnings
from mscn.config import load_config
from mscn.errors import run_cli
from mscn.train.eval.pretrained import check_highpass

def body():
    warnings.simplefilter("always")
    # the real call site: evaluation with another sigma than pretraining
    check_highpass(load_config(None, []), load_config(None, ["highpass.sigma=3.0"]), "ck.pt", strict=False)
    warnings.warn("a library's own", DeprecationWarning)

raise SystemExit(run_cli(body, "tool"))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("MSCN_DEBUG", "PYTHONWARNINGS")}
    proc = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.splitlines()
    ours = [ln for ln in err if ln.startswith("tool: warning: ck.pt: pretrained with high-pass")]
    assert len(ours) == 1 and "drop the highpass.* override" in ours[0], err
    assert not any("HighPassMismatchWarning" in ln or "check_highpass(" in ln for ln in err), err
    assert any("DeprecationWarning: a library's own" in ln for ln in err), err  # Python's own form

    def recorded():
        with pytest.warns(HighPassMismatchWarning, match="pretrained with high-pass"):
            check_highpass(pre, other, "ck.pt", strict=False)

    assert run_cli(recorded, "tool") == 0


def test_mscn_debug_lets_the_traceback_through(monkeypatch):
    monkeypatch.setenv("MSCN_DEBUG", "1")
    with pytest.raises(DataError):
        run_cli(_raise(DataError("boom")), "tool")


@pytest.mark.parametrize("entry, argv, prog", [
    (pretrain_main, ["--config", "no_such_recipe"], "mscn pretrain"),
    (mscn_main, ["pretrain", "--config", "no_such_recipe"], "mscn pretrain"),
    (mscn_main, ["config", "--config", "no_such_recipe"], "mscn"),
])
def test_entry_points_share_the_handler(entry, argv, prog, capsys, monkeypatch):
    monkeypatch.delenv("MSCN_DEBUG", raising=False)
    assert entry(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: config file not found: no_such_recipe")
    monkeypatch.setenv("MSCN_DEBUG", "1")  # pretrain.main raises no SystemExit of its own
    with pytest.raises(ConfigError):
        entry(argv)


def test_a_path_the_machine_refuses_is_one_line(capsys, monkeypatch, tmp_path):
    """An unwritable --out, a read-only disk, a full disk: the machine's error, named, in one
    line (status 2); other OSErrors are bugs or surprises and keep their traceback."""
    import errno

    monkeypatch.delenv("MSCN_DEBUG", raising=False)
    assert run_cli(_raise(PermissionError(errno.EACCES, "Permission denied", "/ro/out")), "tool") == 2
    assert capsys.readouterr().err == "tool: error: cannot use /ro/out: Permission denied (MSCN_DEBUG=1 shows the traceback)\n"
    assert run_cli(_raise(OSError(errno.ENOSPC, "No space left on device", "/d/x.pt")), "tool") == 2
    err = capsys.readouterr().err
    assert err.startswith("tool: error: cannot use /d/x.pt: No space left on device; free some space") and \
        err.count("\n") == 1
    with pytest.raises(ConnectionResetError):  # not the machine's paths: a traceback
        run_cli(_raise(ConnectionResetError(errno.ECONNRESET, "reset")), "tool")
    with pytest.raises(FileNotFoundError):  # a missing file the code itself opens is a bug
        run_cli(_raise(FileNotFoundError(errno.ENOENT, "No such file or directory", "/pkg/internal.yaml")), "tool")
    with pytest.raises(PermissionError):  # no path to name: keep the traceback
        run_cli(_raise(PermissionError(errno.EACCES, "Permission denied")), "tool")
    # a full disk met by a buffered write's flush (metrics.jsonl, the run folder's lock)
    # names no file, and is the machine's all the same
    assert run_cli(_raise(OSError(errno.ENOSPC, "No space left on device")), "tool") == 2
    err = capsys.readouterr().err
    assert err.startswith("tool: error: cannot use the disk: No space left on device; free some space") and \
        err.count("\n") == 1
    monkeypatch.setenv("MSCN_DEBUG", "1")
    with pytest.raises(PermissionError):
        run_cli(_raise(PermissionError(errno.EACCES, "Permission denied", "/ro/out")), "tool")


def test_data_tool_writing_under_a_file_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("MSCN_DEBUG", raising=False)
    (tmp_path / "afile").write_text("x")
    assert mscn_main(["data", "synth", str(tmp_path / "afile" / "synth"), "--classes", "2", "--per-class", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "afile" in err[0] and "Not a directory" in err[0]


def test_a_checkpoint_on_a_full_disk_is_one_error_and_keeps_the_old_ones(tmp_path, monkeypatch):
    """A full disk, for real: the checkpoint's temporary file is /dev/full, where every write
    fails with ENOSPC inside torch's zip writer. The save names the file and the free space,
    and the earlier checkpoints and the folder are as they were."""
    import builtins
    import os

    import torch

    from mscn.errors import MscnError
    from mscn.train import checkpoint as ckpt

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    old = ckpt.save_checkpoint({"step": 1, "w": torch.zeros(3)}, tmp_path, keep_last=2)
    real_open = builtins.open
    monkeypatch.setattr(ckpt, "open", lambda path, mode="r", *a, **k: real_open("/dev/full", mode, *a, **k),
                        raising=False)
    with pytest.raises(MscnError, match=r"cannot write .*ckpt_00000002.pt: No space left on device \(\d+\.\d\d GiB "
                                        r"free there, about 0.00 GiB needed\); the checkpoints written before are "
                                        r"untouched"):
        ckpt.save_checkpoint({"step": 2, "w": torch.randn(1 << 16)}, tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [old.name]
    # the first checkpoint of a run: there is nothing before it to be untouched
    with pytest.raises(MscnError, match=r"no checkpoint of this run was written before: free some space"):
        ckpt.save_checkpoint({"step": 1, "w": torch.randn(1 << 16)}, tmp_path / "fresh", keep_last=2)


@pytest.mark.parametrize("command", ["pretrain", "demo", "ablate"])
def test_overrides_may_sit_on_both_sides_of_an_option(command, capsys, tmp_path):
    """key=value overrides before and after --config/--out are all read (argparse's plain
    parse_args called the ones after an option "unrecognized arguments"): the run gets as far
    as the missing data.root, which names itself."""
    argv = [command, "data.prefetch=1", "--config", "demo", "--out", str(tmp_path / "run"),
            f"data.root={tmp_path / 'absent'}", f"data.val_root={tmp_path / 'absent'}"]
    if command == "ablate":
        argv[4:4] = ["--arms", "highpass"]
    assert mscn_main(argv) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err and "absent" in err and "Traceback" not in err


def test_a_ctrl_c_during_the_interpreter_teardown_prints_nothing():
    """After the command, a Ctrl-C landing in an atexit hook (DALI unloads its library in one)
    printed "Exception ignored in atexit callback ... KeyboardInterrupt" below the command's
    last line. The hook here stands for DALI's: registered before the command, so run later."""
    import os
    import subprocess
    import sys

    body = """
import atexit, os, signal, time
atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.3)))
from mscn.errors import run_cli
raise SystemExit(run_cli(lambda: print("done"), "tool"))
"""
    env = {k: v for k, v in os.environ.items() if k != "MSCN_DEBUG"}
    proc = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "done\n", (proc.returncode, proc.stderr)
    assert "KeyboardInterrupt" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


def test_a_stop_on_a_signal_is_said_by_rank_0_only_and_an_error_by_every_rank(capsys, monkeypatch):
    from mscn.train.preempt import Stopped

    monkeypatch.delenv("MSCN_DEBUG", raising=False)
    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert run_cli(_raise(Stopped("stopped by SIGTERM after step 5 of 9", 15)), "tool") == 143
        assert capsys.readouterr().err == ("tool: stopped by SIGTERM after step 5 of 9\n" if said else "")
        assert run_cli(_raise(DataError("x.jpg: corrupt")), "tool") == 2
        assert capsys.readouterr().err == "tool: error: x.jpg: corrupt\n"
        # a data tool's own stop, run with a worker's RANK in its environment, is said on every rank
        assert run_cli(_raise(SignalStop("stopped by SIGTERM during scan x", 15)), "tool") == 143
        assert capsys.readouterr().err == "tool: stopped by SIGTERM during scan x\n"


def test_a_command_line_typo_is_said_by_rank_0_only_and_a_yaml_file_error_by_every_rank(capsys, monkeypatch,
                                                                                         tmp_path):
    """torchrun gives every rank the same command line: 8 ranks printed the same typo 8 times.
    A YAML file may differ between nodes, so its errors stay on every rank."""
    from mscn.config import load_config

    monkeypatch.delenv("MSCN_DEBUG", raising=False)
    bad_yaml = tmp_path / "r.yaml"
    bad_yaml.write_text("train: {glbal_batch: 8}\n")
    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert run_cli(lambda: load_config(None, ["train.glbal_batch=8"]), "tool") == 2
        err = capsys.readouterr().err
        if said:
            assert err.startswith("tool: error: command line: train.glbal_batch=8: unknown key") and err.count("\n") == 1
        else:
            assert err == ""
        assert run_cli(lambda: load_config(None, ["train.global_batch=many"]), "tool") == 2
        assert ("expected an integer" in capsys.readouterr().err) is said
        assert run_cli(lambda: load_config(str(bad_yaml)), "tool") == 2
        assert "unknown key 'train.glbal_batch'" in capsys.readouterr().err  # every rank


def test_a_rank_that_lost_the_others_says_so_in_one_line(tmp_path):
    """Real gloo, two processes: rank 1 dies after joining; rank 0's next collective fails in
    gloo's TCP pair. That is a symptom of rank 1's end, said in one line (it was a 40-line
    traceback ending in 'GLHF'), exit status 1."""
    import os
    import subprocess
    import sys

    init = f"file://{tmp_path / 'init'}"
    code = (
        "import os, sys, torch, torch.distributed as dist\n"
        "from mscn.errors import run_cli\n"
        "rank = int(os.environ['RANK'])\n"
        f"dist.init_process_group('gloo', init_method='{init}', rank=rank, world_size=2)\n"
        "if rank == 1:  # one collective first: the group is whole before it goes (not mid-setup)\n"
        "    dist.all_reduce(torch.ones(4))\n"
        "    os._exit(0)\n"
        "def body():\n"
        "    for _ in range(50):\n"
        "        dist.all_reduce(torch.ones(4))\n"
        "sys.exit(run_cli(body, 'mscn pretrain'))\n")
    import json
    import time

    env = {**os.environ, "WORLD_SIZE": "2", "MSCN_DEBUG": ""}
    error_file = tmp_path / "attempt_0" / "0" / "error.json"  # torchrun's layout
    error_file.parent.mkdir(parents=True)
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r), "TORCHELASTIC_ERROR_FILE":
                                                                 str(error_file) if r == 0 else ""},
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    err0 = procs[0].communicate(timeout=120)[1]
    procs[1].communicate(timeout=30)
    assert procs[0].returncode == 1, err0
    # torchrun's "Root Cause" is the earliest failure: a symptom is dated a minute late, so that
    # the rank that died first (dated when torchrun noticed it) is named, not this one
    recorded = json.loads(error_file.read_text())
    assert "lost the other ranks" in recorded["message"] and recorded["timestamp"] >= t0 + 59, recorded
    assert "Traceback" not in err0 and err0.count("\n") == 1, err0
    assert err0.startswith("mscn pretrain: error: rank 0 of 2 lost the other ranks (")
    assert "by peer" in err0 and "typically caused" not in err0  # gloo's first sentence only
    assert "another rank stopped first" in err0


def test_a_file_system_error_that_reads_like_a_lost_peer_is_not_one(monkeypatch):
    """Only torch.distributed's errors (or gloo's transport) count as a lost rank; a network
    file system's 'Broken pipe' in a multi-rank run is a bug or an error of its own."""
    from mscn.errors import lost_peers

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not lost_peers(RuntimeError("read /nfs/x.jpg: Broken pipe"))
    assert lost_peers(RuntimeError("[/gloo/transport/tcp/pair.cc:545] Connection reset by peer [127.0.0.1]:1"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not lost_peers(RuntimeError("[/gloo/transport/tcp/pair.cc:545] Connection reset by peer"))


def test_under_torchrun_a_shared_error_is_said_once_per_node_and_goes_into_the_summary(capsys, monkeypatch,
                                                                                        tmp_path):
    """torchrun's layout: <attempt>/<local rank>/error.json. A line every rank of the node
    finds is printed by the first; a rank's own line is printed; each rank's error file holds
    its line (torchrun's summary prints it instead of a link to its docs)."""
    import json

    monkeypatch.delenv("MSCN_DEBUG", raising=False)
    attempt = tmp_path / "run" / "attempt_0"
    said = []
    for rank in (0, 1):
        (attempt / str(rank)).mkdir(parents=True)
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(attempt / str(rank) / "error.json"))
        assert run_cli(_raise(DataError("/data/in1k: no such file or directory (data.root)")), "tool") == 2
        said.append(capsys.readouterr().err)
    assert said == ["tool: error: /data/in1k: no such file or directory (data.root)\n", ""]
    for rank in (0, 1):
        recorded = json.loads((attempt / str(rank) / "error.json").read_text())
        assert recorded["message"] == "tool: error: /data/in1k: no such file or directory (data.root)"
        assert isinstance(recorded["timestamp"], int)
    assert run_cli(_raise(DataError(f"x{rank}.jpg: corrupt")), "tool") == 2  # rank 1's own file
    assert capsys.readouterr().err == "tool: error: x1.jpg: corrupt\n"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "gone" / "0" / "error.json"))
    assert run_cli(_raise(DataError("/data/in1k: no such file or directory (data.root)")), "tool") == 2
    assert capsys.readouterr().err.startswith("tool: error: /data/in1k")  # cannot record: said all the same


@pytest.mark.slow
def test_torchrun_prints_a_shared_error_once_and_names_it_in_its_summary(tmp_path):
    """Real torchrun, two ranks, one YAML file with a typo: one line, and torchrun's summary
    quotes it (it said "To enable traceback see: https://pytorch.org/...")."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    bad = tmp_path / "r.yaml"
    bad.write_text("train: {glbal_batch: 8}\n")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "MSCN_DEBUG": ""}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "mscn", "pretrain",
                           "--config", str(bad)], env=env, capture_output=True, text=True, timeout=240)
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0, said
    line = f"mscn pretrain: error: {bad}: unknown key 'train.glbal_batch'"
    assert sum(ln.startswith(line) for ln in said.splitlines()) == 1, said
    assert re.search(r"traceback : mscn pretrain: error: .*unknown key 'train.glbal_batch'", said), said


def test_the_fault_report_goes_where_stderr_can_take_it(monkeypatch):
    """run_cli turns on Python's fault report (a SIGBUS said nothing); a stderr without a file
    descriptor (redirected to a StringIO, a notebook) made run_cli fail before its command
    ran (a review): the report then goes to the process's own stderr."""
    import contextlib
    import faulthandler
    import io
    import sys

    was = faulthandler.is_enabled()
    faulthandler.disable()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            assert run_cli(lambda: 0, "tool") == 0
        assert faulthandler.is_enabled()
    finally:
        faulthandler.disable()
        if was:  # pytest's own
            faulthandler.enable(file=sys.__stderr__)
