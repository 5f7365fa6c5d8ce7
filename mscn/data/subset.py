"""`mscn data subset`: class-balanced label subsets for semi-supervised evaluation.

The paper fine-tunes on 1% of the ImageNet labels (§6.1, Table 1; App. A.3); 10% is the
other split of SimCLR's semi-supervised protocol, which the paper does not report. ``make_subset`` draws ``round(fraction * n_c)`` images (at least
one) from every class ``c`` with an RNG seeded by ``(seed, class name)``, so a class's
draw does not depend on which other classes exist. ``official=`` instead converts
the published SimCLR subset files (``n01440764_10026.JPEG`` per line) to our
``relpath label`` list by matching file-name stems under ``root``.
"""
from __future__ import annotations

import sys
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np

from mscn.data.imagefolder import is_flat_folder, list_image_folder
from mscn.data.scan import default_outputs, is_label, read_file_list, report_path_for, write_file_list
from mscn.errors import DataError


def default_subset_path(root, fraction: float | None, seed: int, official=None) -> Path:
    """``./<name>.subset<pct>pct.seed<seed>.txt`` (or ``.<official stem>.txt``) in the CWD."""
    if Path(root).is_file():  # a scan's list: named after it (in1k_train.filelist.txt -> in1k_train)
        name = Path(root).name.removesuffix(".txt").removesuffix(".filelist")
    else:
        name = default_outputs(root)[0].name.removesuffix(".filelist.txt")
    tag = Path(official).stem if official else f"subset{fraction * 100:g}pct.seed{seed}"
    return Path.cwd() / f"{name}.{tag}.txt"


def _balanced(classes, samples, fraction: float, seed: int) -> list[tuple[str, int]]:
    by_class = defaultdict(list)
    for rel, label in samples:
        by_class[label].append(rel)
    chosen = []
    for label, rels in sorted(by_class.items()):
        k = max(1, round(fraction * len(rels)))
        # crc32, not hash(): Python salts str hashes per process.
        rng = np.random.default_rng([seed, zlib.crc32(classes[label].encode())])
        chosen += [(rels[i], label) for i in rng.choice(len(rels), size=k, replace=False)]
    return sorted(chosen)


def _official(samples, official: Path, root: Path) -> list[tuple[str, int]]:
    if not official.is_file():
        raise DataError(f"{official}: official subset file not found")
    by_stem = defaultdict(list)
    for rel, label in samples:
        by_stem[Path(rel).stem].append((rel, label))
    names = [line.split()[0] for line in official.read_text().splitlines() if line.strip()]
    chosen, unmatched = [], []
    for lineno, name in enumerate(names, 1):
        hits = by_stem.get(Path(name.replace("\\", "/")).stem, [])
        if len(hits) > 1:
            raise DataError(f"{official}:{lineno}: {name} matches {len(hits)} files under {root} "
                            f"({hits[0][0]}, {hits[1][0]}); file-name stems must be unique")
        if hits:
            chosen.append(hits[0])
        else:
            unmatched.append(name)
    if not chosen:
        raise DataError(f"{official}: none of its {len(names)} names matches a file under {root}; "
                        f"is {root} the ImageNet train folder?")
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (", ..." if len(unmatched) > 5 else "")
        print(f"subset: {len(unmatched)} of {len(names)} names in {official} not found under {root}: {shown}",
              file=sys.stderr)
    return sorted(set(chosen))


def check_replaceable(out: Path) -> None:
    """``out`` may be replaced only if it is a file list (an earlier subset, say): every line
    ``relpath label``. Any other file there (notes, a list of one's own in another form) is
    refused rather than overwritten."""
    if not out.exists():
        return
    if out.is_dir():
        raise DataError(f"--out {out}: a folder; pass a file name for the list")
    if report_path_for(out).is_file():  # a scan's list: the subset would replace the whole set's list,
        # and the report beside it would still count the whole set
        raise DataError(f"--out {out}: the file list `mscn data scan` wrote (its report {report_path_for(out).name} "
                        "is beside it); a subset goes to a file of its own, e.g. --out "
                        f"{out.with_name(out.stem + '_subset' + out.suffix)}")
    try:
        lines = [ln for ln in out.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError):
        lines = ["?"]
    if not all(len(ln.rsplit(" ", 1)) == 2 and is_label(ln.rsplit(" ", 1)[1].lstrip("-")) for ln in lines):
        raise DataError(f"--out {out}: a file is already there that is not a file list ('relpath label' lines); "
                        "pass another --out, or move it away")


def make_subset(root, fraction: float | None, seed: int = 0, out=None, official=None) -> list[tuple[str, int]]:
    """A sorted ``[(relpath, label), ...]`` subset of the ImageFolder ``root``.

    Class-balanced and deterministic for ``(fraction, seed)``; or, with ``official``,
    the images named in an official subset file (``fraction``/``seed`` unused).
    Written as a DALI file list to ``out`` when given.
    """
    root = Path(root)
    if official is None and (fraction is None or not 0 < fraction <= 1):
        raise DataError(f"subset: --fraction must be in (0, 1], got {fraction}")
    if out:
        check_replaceable(Path(out))
    if root.is_file():  # a scan's file list: the draw takes only the files the scan kept
        root, classes, samples = _scanned(root)
    elif is_flat_folder(root):
        raise DataError(f"{root}: a flat folder of images without labels; a subset keeps a share of each class, for "
                        "fine-tuning on few labels: it needs an ImageFolder (ROOT/<class>/<image>)")
    else:
        classes, samples = list_image_folder(root)
    if official is not None:
        chosen = _official(samples, Path(official), root)
    else:
        chosen = _balanced(classes, samples, fraction, seed)
    if out:
        write_file_list(out, chosen, root)
    return chosen


def _scanned(list_path: Path) -> tuple[Path, list[str], list[tuple[str, int]]]:
    """(image root, classes, samples) of a file list written by ``mscn data scan``: its
    report beside it names the root and the classes the labels number."""
    from mscn.data.source import list_root, report_classes

    root, guessed = list_root(list_path, None)
    classes = report_classes(list_path)
    if not guessed and not classes and is_flat_folder(root):
        raise DataError(f"{list_path}: the scan of a flat folder ({root}), whose images have no labels; a subset "
                        "keeps a share of each class, for fine-tuning on few labels: it needs an ImageFolder "
                        "(ROOT/<class>/<image>) or the scan of one")
    if guessed or not classes:
        raise DataError(f"{list_path}: a subset is drawn from an ImageFolder, or from a file list written by "
                        f"`mscn data scan` with its report beside it ({report_path_for(list_path).name}), which "
                        "names the images' folder and the classes")
    samples = read_file_list(list_path, root)
    if any(not 0 <= label < len(classes) for _, label in samples):
        raise DataError(f"{list_path}: labels outside the {len(classes)} classes of its scan report")
    return root, classes, samples
