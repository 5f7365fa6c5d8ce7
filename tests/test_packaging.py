"""Packaging: one import namespace, non-editable install, console entry point."""
import ast
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


def _module_level_imports(tree):
    """Top-level package names imported when a module is imported: its body and the ``if``
    and ``try`` blocks in it, not function bodies (lazy imports) nor a ``try`` whose
    ``except ImportError`` handles the package being absent."""
    found, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.If):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            guarded = any(isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                          for h in node.handlers)
            todo += ([] if guarded else node.body) + node.orelse + node.finalbody
    return found


def test_what_the_package_imports_on_import_a_plain_install_brings():
    """Every third-party package a module of mscn imports when it is imported comes with
    ``pip install .``: install_requires and what they require. scipy was only in the test
    extra, so in a plain install `mscn data synth`, and so `mscn demo`, stopped with a
    ModuleNotFoundError traceback. An extra (matplotlib, tensorboard) is imported lazily
    or under ``except ImportError`` with the line that says what to install."""
    import importlib.metadata as md
    import re

    def norm(name):
        return re.sub(r"[-_.]+", "-", name).lower()

    def requires(dist):
        reqs = md.requires(dist) or []
        return [re.match(r"[A-Za-z0-9._-]+", r).group(0) for r in reqs if "extra ==" not in r]

    closure, todo = set(), requires("mscn")
    while todo:
        name = norm(todo.pop())
        if name in closure:
            continue
        closure.add(name)
        try:
            todo += requires(name)
        except md.PackageNotFoundError:  # a requirement for another platform
            pass
    providers = md.packages_distributions()
    missing = {}
    for folder in ("mscn", "pipelines", "cuda_kernels", "train"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for top in _module_level_imports(ast.parse(path.read_text())):
                if top in sys.stdlib_module_names or top == "mscn":
                    continue
                dists = {norm(d) for d in providers.get(top, [top])}
                if not dists & closure:
                    missing.setdefault(top, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"imported on import, not installed by `pip install .`: {missing}"
