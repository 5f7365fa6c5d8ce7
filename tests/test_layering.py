"""The folders are the architecture: data flows pipelines/ -> cuda_kernels/ -> train/,
and mscn/ (the core) holds what every stage shares, so it imports no stage.

Every .py file of the packages is parsed (no import runs, so DALI or a GPU is not
needed) and every import is checked, function-level lazy imports included.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# repo folder -> package, as setup.py's package_dir installs them
PACKAGES = {"mscn": "mscn", "configs": "mscn.configs", "pipelines": "mscn.pipelines",
            "cuda_kernels": "mscn.cuda_kernels", "train": "mscn.train"}
STAGES = ("mscn.pipelines", "mscn.cuda_kernels", "mscn.train")
FORBIDDEN = {  # package prefix of the importer -> what it must not import
    "mscn": STAGES,  # the core: mscn, mscn.data, mscn.configs
    "mscn.pipelines": ("mscn.train",),
    "mscn.cuda_kernels": ("mscn.pipelines", "mscn.train"),
}
# The `mscn` command is the top of the program, not a shared helper: it dispatches to
# every stage (mscn pretrain / mscn eval / mscn demo) and nothing in the core imports it.
EXEMPT = {"mscn.cli"}


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    parts = list(rel.with_suffix("").parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source``, at any depth, relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            # `from mscn import train` imports the module mscn.train
            found += [(node.lineno, f"{base}.{a.name}" if base else a.name) for a in node.names]
            found.append((node.lineno, base))
    return found


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    if module in EXEMPT:
        return []
    # the most specific rule: mscn.pipelines.x follows "mscn.pipelines", not "mscn"
    owner = max((p for p in FORBIDDEN if module == p or module.startswith(p + ".")), key=len, default=None)
    if owner is None or (owner == "mscn" and module.startswith(STAGES)):
        return []  # mscn.train may import anything below it
    bad = []
    for line, name in imported_modules(source, module, is_package):
        if any(name == s or name.startswith(s + ".") for s in FORBIDDEN[owner]):
            bad.append(f"{module}:{line} imports {name}")
    return bad


def all_files() -> list[Path]:
    return sorted(p for folder in PACKAGES for p in (REPO / folder).rglob("*.py"))


def test_every_package_folder_is_scanned():
    names = {module_name(p) for p in all_files()}
    assert names >= {*PACKAGES.values(), "mscn.data", "mscn.cli", "mscn.train.pretrain"}


def test_no_stage_imports_against_the_data_flow():
    bad = []
    for path in all_files():
        bad += violations(module_name(path), path.read_text(), path.name == "__init__.py")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


@pytest.mark.parametrize("module, source", [
    ("mscn.data.pack", "def f():\n    from mscn.pipelines.readers import resolve_source\n"),
    ("mscn.config", "import mscn.train.pretrain\n"),
    ("mscn.data", "from mscn import cuda_kernels\n"),
    ("mscn.data.scan", "from ..train import checkpoint\n"),
    ("mscn.pipelines.loader", "def f():\n    if True:\n        from mscn.train.distributed import barrier\n"),
    ("mscn.cuda_kernels.mask_triton", "from mscn.pipelines import loader\n"),
    ("mscn.cuda_kernels", "from . import x\nfrom ..train.lars import build_optimizer\n"),
])
def test_a_bad_import_is_flagged(module, source):
    assert violations(module, source, is_package=module in ("mscn.data", "mscn.cuda_kernels"))


@pytest.mark.parametrize("module, source", [
    ("mscn.train.pretrain", "from mscn.pipelines import build_train_loader\nimport mscn.cuda_kernels\n"),
    ("mscn.pipelines.loader", "from mscn.cuda_kernels import apply_masks\nfrom mscn.data.source import Source\n"),
    ("mscn.data.pack", "from mscn.data.source import resolve_source\nimport mscn.errors\n"),
    ("mscn.cli", "from mscn.train.pretrain import main\n"),
])
def test_imports_along_the_data_flow_pass(module, source):
    assert violations(module, source) == []
