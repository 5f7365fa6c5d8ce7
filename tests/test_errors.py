"""run_cli: the one top-level handler of every mscn entry point."""
import pytest

from mscn.cli import main as mscn_main
from mscn.errors import ConfigError, DataError, run_cli
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
