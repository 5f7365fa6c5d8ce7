"""Where the samples come from, in pure Python: a dataset path -> :class:`Source`.

``resolve_source(path)`` turns ``data.root`` into a :class:`Source` (and raises one
DataError line for anything missing). It needs no DALI, so ``mscn data pack`` lists
files without it; ``mscn.pipelines.readers.read`` adds the DALI reader of a Source to
a pipeline. Every sample has a canonical **index**: its position in the sorted
ImageFolder listing (torchvision's order) or in the file list; ``mscn data pack``
stores it in each tar sample (``.idx``), so the file and tar readers agree.

Formats (``data.format=auto`` picks by what the path is):

- ``folder``: a directory of class sub-folders, ``ROOT/<class>/**/<image>``, or a flat
  folder of images without class folders (unlabelled).
- ``filelist``: a ``relpath label`` text file (``mscn data scan`` writes them), or one
  ``relpath`` per line (unlabelled). Paths
  are relative to, in this order: the ``file_root`` given by the caller, the ``root``
  recorded in the scan report beside the list (``X.filelist.txt`` -> ``X.scan.json``),
  else the list's own directory (DALI's ``file_list`` rule).
- ``wds``: a directory of ``*.tar`` shards, each with its DALI index file beside it
  (``shard-000000.tar`` -> ``shard-000000.idx``). Samples need an image member and
  ``.cls`` (ASCII label; shards without it are unlabelled); ``.idx`` (ASCII canonical
  index) is optional. ``mscn data pack`` writes ``sources.json`` beside the shards: the
  classes and the source file of every canonical index (diagnose.py names it).

Labels: a sample without one has label -1 (:data:`UNLABELLED`); such data can be
pretrained on, not evaluated. ``classes=`` (the train root's :attr:`Source.classes`)
maps an evaluation root's labels by class name, so a val set with a subset of the
classes keeps the train set's labels; a class outside that set is a DataError.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from mscn.data.checkstamp import map_chunks
from mscn.data.imagefolder import (UNLABELLED, check_names, class_labels, hidden, is_flat_folder,
                                   list_flat_folder, list_image_folder, nfc)
from mscn.data.scan import read_file_list, report_path_for
from mscn.data.shardindex import read_ends, start_fault
from mscn.errors import DataError

SOURCES_JSON = "sources.json"  # beside packed shards: {"root", "classes", "files"} (mscn.data.pack)


@dataclass(frozen=True)
class Source:
    """A resolved dataset. File kinds: ``root`` + ``files``/``labels``; wds: ``tars``/``indexes``."""

    kind: str  # folder | filelist | wds
    root: str
    num_samples: int
    files: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()
    tars: tuple[str, ...] = ()
    indexes: tuple[str, ...] = ()
    has_index: bool = True  # wds without .idx members: index is -1
    classes: tuple[str, ...] = ()  # class names by label, where known (folders, scanned lists, packed shards)
    labelled: bool = True  # False: every label is -1 (flat folder, list or shards without labels)

    @property
    def label_in_stream(self) -> bool:
        """True when the reader yields labels; else the index is mapped through ``labels``."""
        return self.kind == "wds" and self.labelled

    @property
    def num_classes(self) -> int:
        """Size of the label set: the class names, else the largest label + 1."""
        return len(self.classes) or (max(self.labels) + 1 if self.labels else 0)

    def digest(self) -> str:
        """What the readers will read, not where it lies: the kind, the files (relative to the
        root) and labels, or the shards' names and sizes in samples, and the classes. Two
        nodes with the dataset mounted at other paths agree; two copies that differ do not.
        Computed once per Source (it hashes every file name: 0.34 s for 1.28M names): a run
        asks for it to compare ranks, resumes and checkpoints."""
        cached = self.__dict__.get("_digest")
        if cached is None:
            h = hashlib.sha1(f"{self.kind}\n{self.num_samples}\n{self.labelled}\n".encode())
            for part in (self.files, self.labels, tuple(Path(t).name for t in self.tars), self.classes):
                h.update("\0".join(map(str, part)).encode("utf-8", "surrogateescape") + b"\1")
            cached = h.hexdigest()[:16]
            object.__setattr__(self, "_digest", cached)  # frozen: not a field, so eq/hash ignore it
        return cached


def sized_digest(source: Source) -> str:
    """:meth:`Source.digest` and the size of every file (of every shard, for tar shards): what
    tells apart two copies of a data set that share their names but not their images (one
    resized or re-encoded), for results keyed by the data they scored (``mscn eval``'s
    result.json, ``mscn ablate``'s fingerprints). Not the bytes: a ``stat`` a file, 8 at a
    time (30,000 files from the page cache: 0.08 s on the 2-core CPU machine, so ImageNet's
    1.28 M about 3 s, against an evaluation of hours). A file that cannot be stat'ed is a
    DataError naming it."""
    h = hashlib.sha1(source.digest().encode())
    paths = source.tars if source.kind == "wds" else [os.path.join(source.root, f) for f in source.files]
    for sizes in map_chunks(_sizes, paths):
        h.update(sizes)
    return h.hexdigest()[:16]


def _sizes(paths: list[str] | tuple[str, ...]) -> bytes:
    out = []
    for path in paths:
        try:
            out.append(f"{os.stat(path).st_size}\n")
        except OSError as e:
            raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    return "".join(out).encode()


def layout_digest(source: Source) -> str:
    """Where each sample lies, beyond :meth:`Source.digest`: for tar shards, the contents of
    their DALI indexes (a pack of the same images with another shuffle has the same shard
    names and sizes but another order in them, which a reader's saved position would replay
    without a word); "" for files, whose list is their order. Read once per Source (an
    ImageNet pack's 1,281 indexes: ~50 MB)."""
    cached = source.__dict__.get("_layout")
    if cached is None:
        cached = ""
        if source.kind == "wds":
            h = hashlib.sha1()
            for idx in source.indexes:
                with open(idx, "rb") as f:
                    h.update(hashlib.sha1(f.read()).digest())
            cached = h.hexdigest()[:16]
        object.__setattr__(source, "_layout", cached)  # frozen: not a field, as _digest
    return cached


def detect_format(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".txt":
            return "filelist"
        raise DataError(f"{path}: a file but not a .txt file list; give an ImageFolder root, "
                        "a file list from `mscn data scan` or a folder of .tar shards")
    if any(path.glob("*.tar")) or any(path.glob("*.tar.gz")) or any(path.glob("*.tgz")):
        return "wds"  # (compressed shards are refused there, by name)
    return "folder"


def list_root(list_path: Path, file_root: str | None) -> tuple[Path, str | None]:
    """The directory a file list's paths are relative to (see the module docstring), and
    where it was guessed (no ``file_root``, no scan report) what to tell the user if the
    guess is wrong."""
    if file_root:
        return Path(file_root), None
    report = report_path_for(list_path)
    if report.is_file():
        try:
            root = Path(json.loads(report.read_text())["root"])
            return (root if root.is_absolute() else report.parent / root), None  # older reports: relative
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):  # TypeError: a list, or "root": null
            raise DataError(f"{report}: not a scan report with a 'root' entry; fix or delete it") from None
    return list_path.parent, (
        f"no scan report beside the list ({report.name}) says which folder its paths are relative to, so "
        f"they were looked for in the list's own folder; is it a file list written by `mscn data scan IMAGES "
        f"--out {list_path.name}` with its report moved or renamed? Put the report back beside it, or rescan")


def eval_root_setting(data, root: str) -> tuple[str, str]:
    """(format, the setting it came from) for an evaluation ``root`` of the config section
    ``data``: the training root keeps ``data.format``; any other root is detected (the
    evaluation loader and the pretraining monitor's early check read roots alike)."""
    if root == data.root:
        return data.format, "data.root"
    return "auto", "data.val_root" if root == data.val_root else "the evaluation root"


def resolve_source(path: str, fmt: str = "auto", file_root: str | None = None,
                   classes: tuple[str, ...] | list[str] | None = None, what: str = "data.root") -> Source:
    """Resolve ``data.root`` (or ``data.val_root``) into a Source; DataError on any problem.

    ``classes``: the label set to map class names into (an evaluation root gets the
    train root's classes); None keeps this dataset's own. ``what``: the setting or flag the
    path came from, named in the error (``data.val_root``, ``--data``...)."""
    if path and not isinstance(path, (str, os.PathLike)):  # Path() of a list raises TypeError from pathlib
        raise TypeError(f"resolve_source: expected a path (str or os.PathLike), got {type(path).__name__}; images "
                        "listed in Python go into a file list ('relative/path label' lines, or bare paths) or a folder")
    if not path:
        raise DataError(f"no dataset given: set {what} (an ImageFolder root, a file list "
                        "or a folder of .tar shards)")
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory ({what})")
    kind = detect_format(p) if fmt == "auto" else fmt
    if kind == "folder":
        if is_flat_folder(p):  # images, no class folders: unlabelled
            samples, names = list_flat_folder(p), ()
        else:
            names, samples = list_image_folder(p, classes=classes)
        check_names(p, samples)
        return _file_source("folder", p, samples, names)
    if kind == "filelist":
        if not p.is_file():
            raise DataError(f"{p}: data.format=filelist needs a .txt file list, got a directory")
        root, guessed = list_root(p, file_root)
        samples = read_file_list(p, root, guessed)
        own = report_classes(p)
        if own:  # a line edited by hand: kNN would score it as a class of its own
            _labels_within(p, samples, len(own), "classes its scan report names", "mend the line, or rescan")
        if classes is not None and own:  # the scan report names the list's classes: map them
            remap = class_labels(own, classes, p)
            samples = [(rel, lab if lab == UNLABELLED else remap[lab]) for rel, lab in samples]
            own = list(classes)
        elif classes:  # no names: its labels are taken as the label set's numbers
            _labels_within(p, samples, len(classes), "classes of the training set",
                           "without its scan report beside it the list's labels cannot be mapped by class name: "
                           "write the list with `mscn data scan`")
        return _file_source("filelist", root, samples, own)
    if kind == "wds":
        return _wds_source(p, classes)
    raise DataError(f"data.format={kind!r}: must be auto, folder, filelist or wds")


def _labels_within(path: Path, samples: list[tuple[str, int]], n: int, what: str, fix: str) -> None:
    """One DataError naming the highest label of a file list when it is not below ``n``."""
    top = max((lab for _, lab in samples if lab != UNLABELLED), default=-1)
    if top >= n:
        rel = next(r for r, lab in samples if lab == top)
        raise DataError(f"{path}: label {top} ({rel}) is outside the {n} {what} (0-{n - 1}); {fix}")


def report_classes(list_path: Path) -> list[str]:
    """The class names of a scan's file list, from its report beside it ([] if none)."""
    report = report_path_for(list_path)
    try:
        classes = json.loads(report.read_text()).get("classes", []) if report.is_file() else []
    except (ValueError, AttributeError, UnicodeDecodeError):
        return []  # list_root already names a broken report
    return [str(c) for c in classes] if isinstance(classes, list) else []


def _file_source(kind: str, root: Path, samples: list[tuple[str, int]], classes) -> Source:
    labels = tuple(lab for _, lab in samples)
    return Source(kind, str(root), len(samples), files=tuple(r for r, _ in samples), labels=labels,
                  classes=tuple(classes), labelled=any(lab != UNLABELLED for lab in labels))


PACKING = ".packing"  # in a folder `mscn data pack` is writing: removed once it has finished


def read_sources_json(folder: Path) -> dict:
    """``sources.json`` beside packed shards (``{}`` for shards packed elsewhere)."""
    path = Path(folder) / SOURCES_JSON
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise DataError(f"{path}: not a JSON file; repack the shards or delete it") from None


def _wds_source(folder: Path, classes=None) -> Source:
    if not folder.is_dir():
        raise DataError(f"{folder}: data.format=wds needs a folder of .tar shards")
    tars = sorted(folder.glob("*.tar"))
    half = sorted(p.name for p in folder.glob("*.tar.tmp"))
    if (folder / PACKING).exists() or half:
        raise DataError(f"{folder}: an `mscn data pack` that did not finish ({PACKING if not half else half[0]} is "
                        "there): its shards hold part of the set; rerun the pack into this folder")
    gz = sorted(p.name for p in folder.glob("*.tar.gz")) + sorted(p.name for p in folder.glob("*.tgz"))
    if gz:  # beside plain shards they would be left out without a word
        raise DataError(f"{folder}: compressed shards ({gz[0]}{', ...' if len(gz) > 1 else ''}): DALI reads plain "
                        ".tar only; decompress them (gunzip) or repack with `mscn data pack`")
    if not tars:
        if any(e.is_dir() and not hidden(e.name) for e in folder.iterdir()):  # class folders
            raise DataError(f"{folder}: an image folder, not .tar shards (data.format=wds); read it with "
                            f"data.format=auto, or pack it into another folder: `mscn data pack {folder} OUT`")
        raise DataError(f"{folder}: no .tar shards; write them with `mscn data pack ROOT {folder}`")
    total, exts = 0, set()
    for tar in tars:
        idx = tar.with_suffix(".idx")
        if not idx.is_file():
            raise DataError(f"{idx}: missing DALI index of {tar.name}; write it with `mscn data index {folder}`")
        line, first, last = read_ends(idx)
        head = line.split()
        if len(head) != 2 or head[0] != "v1.2" or not head[1].isdigit():
            raise DataError(f"{idx}: not a DALI v1.2 webdataset index; write it again with `mscn data index {folder}`")
        total += int(head[1])
        # v1.2 lines: ext offset size name, repeated per member; the reader matches extensions
        # in any case (case_sensitive_extensions=False): a .CLS is a label
        exts.update(e.lower() for e in first.split()[0::4])
        fault = start_fault(tar, idx, first, last)
        if fault:
            raise DataError(fault)
    meta = read_sources_json(folder)
    if isinstance(meta.get("files"), list) and len(meta["files"]) != total:
        raise DataError(f"{folder}: its {SOURCES_JSON} lists {len(meta['files'])} packed images but the shards' "
                        f"indexes hold {total}: shards of two packs, or some missing; repack into an empty folder")
    own = list(meta.get("classes", []))
    labelled = "cls" in exts  # shards without .cls are unlabelled: the loader gives label -1
    if classes is not None and own and list(map(nfc, own)) != list(map(nfc, classes[:len(own)])):
        # the reader yields the packed label itself: it can only be kept, not remapped
        class_labels(own, classes, folder)  # a class outside the label set is named first
        raise DataError(f"{folder}: its classes {own[:3]}... are numbered unlike the training set's; pack it "
                        "from an ImageFolder with the same class folders, or evaluate from the image folder")
    return Source("wds", str(folder), total, tars=tuple(map(str, tars)),
                  indexes=tuple(str(t.with_suffix(".idx")) for t in tars), has_index="idx" in exts,
                  labels=() if labelled else (UNLABELLED,) * total, classes=tuple(own), labelled=labelled)
