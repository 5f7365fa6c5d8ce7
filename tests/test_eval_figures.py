"""Diagnostic figures (paper Figs. 1-3, 7, 8) are written as non-blank PNGs."""
import argparse

import numpy as np
import pytest
from PIL import Image

from eval_testdata import make_checkpoint, make_image_folder
from mscn.errors import MscnError
from mscn.train.eval.cli import add_eval_commands


def _run(argv):
    parser = argparse.ArgumentParser()
    add_eval_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    args.func(args)


def test_figures_command_writes_three_pngs(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=1, size=(80, 60))
    ck = make_checkpoint(tmp_path / "ck.pt", overrides=["views.0.mask.ratio=0.5", "views.0.mask.p_noise=0.0"])
    _run(["eval", "figures", "--ckpt", str(ck), "--train-root", str(data), "--out", str(tmp_path / "fig")])
    for name in ("views.png", "histograms.png", "kernels.png"):
        img = np.asarray(Image.open(tmp_path / "fig" / name).convert("L"), dtype=np.float32)
        assert img.shape[0] > 100 and img.shape[1] > 100, name
        assert img.std() > 5, f"{name} looks blank"


def test_figures_need_an_image(tmp_path):
    with pytest.raises(MscnError, match="--image"):
        _run(["eval", "figures", "--out", str(tmp_path)])
    (tmp_path / "empty" / "c0").mkdir(parents=True)
    with pytest.raises(MscnError, match="no image"):
        _run(["eval", "figures", "--train-root", str(tmp_path / "empty"), "--out", str(tmp_path)])
    with pytest.raises(MscnError, match=r"nope.jpg: no such file or folder"):
        _run(["eval", "figures", "--image", str(tmp_path / "nope.jpg"), "--out", str(tmp_path)])


def test_figures_without_matplotlib_say_what_to_install(tmp_path):
    """matplotlib is an extra (mscn[plots]); without it `mscn eval figures` stopped with an
    ImportError traceback. matplotlib is made unimportable in a child process."""
    import os
    import subprocess
    import sys

    body = ("import sys; sys.modules['matplotlib'] = None\n"
            "from mscn.cli import main\n"
            f"raise SystemExit(main(['eval', 'figures', '--ckpt', 'random', '--image', {str(tmp_path / 'x.jpg')!r}, '--out', {str(tmp_path / 'f')!r}]))")
    env = {k: v for k, v in os.environ.items() if k != "MSCN_DEBUG"}
    proc = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "mscn: error: mscn eval figures draws with matplotlib, which is not installed: pip install 'mscn[plots]' "
        "(or pip install matplotlib)"], proc.stderr
