"""Packaging: one import namespace, non-editable install, console entry point."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_non_editable_install_imports_all_namespaces(tmp_path):
    target = tmp_path / "site"
    # --no-deps/--no-build-isolation: dependencies are already in this venv; we test the
    # package_dir mapping, i.e. that the repo-root folders land under mscn.* only.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        check=True, cwd=tmp_path,
    )
    top = sorted(p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info")))
    assert "mscn" in top
    for generic in ("train", "pipelines", "cuda_kernels", "configs"):
        assert generic not in top, f"{generic} leaked into site-packages"
    code = (
        "import mscn, mscn.pipelines, mscn.cuda_kernels, mscn.train, mscn.train.eval, mscn.data, mscn.configs;"
        "from mscn.config import load_config;"
        "c = load_config('simclr_r50_in1k'); assert c.method.name == 'simclr';"
        "import pathlib; assert str(pathlib.Path(mscn.__file__)).startswith(%r)" % str(target)
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path,
                   env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})


def test_console_help_for_every_subcommand():
    exe = Path(sys.executable).parent / "mscn"
    for cmd in ([], ["data"], ["data", "synth"], ["data", "photos"], ["data", "scan"], ["data", "subset"],
                ["data", "pack"], ["pretrain"], ["eval"], ["eval", "linear"], ["demo"], ["config"]):
        r = subprocess.run([str(exe), *cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0, (cmd, r.stderr)
        assert "usage" in r.stdout.lower(), cmd


def test_config_typo_is_one_line_error():
    exe = Path(sys.executable).parent / "mscn"
    r = subprocess.run([str(exe), "config", "--config", "demo", "train.globl_batch=3"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    # the typo is on the command line, so the error names it there, not demo.yaml
    assert len(lines) == 1 and lines[0].startswith("mscn: error: command line: train.globl_batch=3: ")
