"""Where the samples come from: ImageFolder, file list or WebDataset shards, sharded.

``resolve_source(path)`` turns ``data.root`` into a :class:`Source` (and raises one
DataError line for anything missing); ``read(source, ...)`` adds the DALI reader to a
pipeline. Every sample has a canonical **index**: its position in the sorted
ImageFolder listing (torchvision's order) or in the file list; ``mscn data pack``
stores it in each tar sample (``.idx``), so the file and tar readers agree.

Formats (``data.format=auto`` picks by what the path is):

- ``folder``: a directory of class sub-folders, ``ROOT/<class>/**/<image>``.
- ``filelist``: a ``relpath label`` text file (``mscn data scan`` writes them). Paths
  are relative to, in this order: the ``file_root`` given by the caller, the ``root``
  recorded in the scan report beside the list (``X.filelist.txt`` -> ``X.scan.json``),
  else the list's own directory (DALI's ``file_list`` rule).
- ``wds``: a directory of ``*.tar`` shards, each with its DALI index file beside it
  (``shard-000000.tar`` -> ``shard-000000.idx``). Samples need an image member and
  ``.cls`` (ASCII label); ``.idx`` (ASCII canonical index) is optional.

Sharding (DALI "Sharding and Shuffling"): ``shard_id`` is the *global* rank,
``num_shards`` the world size; ``pad_last_batch=True`` pads every shard to the same
number of batches (the iterator drops the padding under PARTIAL and the last batch
under DROP), so all ranks run the same number of steps and every sample is read at
most once per epoch across ranks (exactly once under PARTIAL). Training leaves
``stick_to_shard=False``: shard k reads the (k+epoch)-th slice, still a partition of
the dataset in every epoch, and each rank sees all the data over the epochs.
Evaluation sticks to its shard.

Shuffling: ``random_shuffle=True`` makes the file reader shuffle its whole list
once, with a seed fixed inside DALI, so all ranks agree on the partition; then each
rank draws batches at random from a buffer of ``data.shuffle_buffer`` samples
(``initial_fill``) that it refills in read order. The tar reader has no global
shuffle (it reads the archives in order), which is why ``mscn data pack`` writes the
samples in a seeded random order.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nvidia.dali import fn

from mscn.data.imagefolder import IMG_EXTENSIONS, list_image_folder
from mscn.data.scan import read_file_list, report_path_for
from mscn.errors import DataError
from mscn.pipelines.ops import parse_ascii_int

READER_NAME = "Reader"  # the iterators find the reader (epoch size, shards) by this name
# image members of a tar sample; one output, whichever extension the sample has
WDS_IMAGE_EXTS = ";".join(e.lstrip(".") for e in IMG_EXTENSIONS + (".jpe",))


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

    @property
    def label_in_stream(self) -> bool:
        """True when the reader yields labels; else the index is mapped through ``labels``."""
        return self.kind == "wds"


def detect_format(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".txt":
            return "filelist"
        raise DataError(f"{path}: a file but not a .txt file list; give an ImageFolder root, "
                        "a file list from `mscn data scan` or a folder of .tar shards")
    if any(path.glob("*.tar")):
        return "wds"
    return "folder"


def list_root(list_path: Path, file_root: str | None) -> Path:
    """The directory a file list's paths are relative to (see the module docstring)."""
    if file_root:
        return Path(file_root)
    report = report_path_for(list_path)
    if report.is_file():
        try:
            root = Path(json.loads(report.read_text())["root"])
            return root if root.is_absolute() else report.parent / root  # older reports: relative
        except (ValueError, KeyError):
            raise DataError(f"{report}: not a scan report with a 'root' entry; fix or delete it") from None
    return list_path.parent


def resolve_source(path: str, fmt: str = "auto", file_root: str | None = None) -> Source:
    """Resolve ``data.root`` (or ``data.val_root``) into a Source; DataError on any problem."""
    if not path:
        raise DataError("no dataset given: set data.root (an ImageFolder root, a file list "
                        "or a folder of .tar shards)")
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory (data.root)")
    kind = detect_format(p) if fmt == "auto" else fmt
    if kind == "folder":
        _, samples = list_image_folder(p)
        return _file_source("folder", p, samples)
    if kind == "filelist":
        if not p.is_file():
            raise DataError(f"{p}: data.format=filelist needs a .txt file list, got a directory")
        root = list_root(p, file_root)
        return _file_source("filelist", root, read_file_list(p, root))
    if kind == "wds":
        return _wds_source(p)
    raise DataError(f"data.format={kind!r}: must be auto, folder, filelist or wds")


def _file_source(kind: str, root: Path, samples: list[tuple[str, int]]) -> Source:
    return Source(kind, str(root), len(samples), files=tuple(r for r, _ in samples),
                  labels=tuple(lab for _, lab in samples))


def _wds_source(folder: Path) -> Source:
    if not folder.is_dir():
        raise DataError(f"{folder}: data.format=wds needs a folder of .tar shards")
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise DataError(f"{folder}: no .tar shards; write them with `mscn data pack ROOT {folder}`")
    total, exts = 0, set()
    for tar in tars:
        idx = tar.with_suffix(".idx")
        if not idx.is_file():
            raise DataError(f"{idx}: missing DALI index of {tar.name}; rerun `mscn data pack` "
                            f"or DALI's `wds2idx {tar} {idx}`")
        with open(idx) as f:
            head = f.readline().split()
            first = f.readline().split()
        if len(head) != 2 or head[0] != "v1.2" or not head[1].isdigit():
            raise DataError(f"{idx}: not a DALI v1.2 webdataset index; regenerate it with `wds2idx`")
        total += int(head[1])
        exts.update(first[0::4])  # v1.2 lines: ext offset size name, repeated per member
    if "cls" not in exts:
        raise DataError(f"{tars[0]}: samples have no .cls label member; pack with `mscn data pack`")
    return Source("wds", str(folder), total, tars=tuple(map(str, tars)),
                  indexes=tuple(str(t.with_suffix(".idx")) for t in tars), has_index="idx" in exts)


def read(source: Source, *, shard_id: int, num_shards: int, shuffle: bool, shuffle_buffer: int,
         stick_to_shard: bool, seed: int = -1, name: str = READER_NAME):
    """Add the reader: returns ``(encoded, label, index)``; ``label`` is None for file
    kinds (the loader maps index -> label: DALI's file reader carries one integer per
    file and it carries the index), ``index`` is None for tars without ``.idx``.
    ``seed`` fixes the shuffle (-1: drawn from the pipeline's seed); diagnose.py
    replays the reader with it."""
    common = dict(shard_id=shard_id, num_shards=num_shards, random_shuffle=shuffle, initial_fill=shuffle_buffer,
                  pad_last_batch=True, stick_to_shard=stick_to_shard, seed=seed, name=name)
    if source.kind != "wds":
        encoded, index = fn.readers.file(file_root=source.root, files=list(source.files),
                                         labels=list(range(source.num_samples)), **common)
        return encoded, None, index
    exts = [WDS_IMAGE_EXTS, "cls"] + (["idx"] if source.has_index else [])
    members = fn.readers.webdataset(paths=list(source.tars), index_paths=list(source.indexes), ext=exts,
                                    missing_component_behavior="error",
                                    case_sensitive_extensions=False, **common)
    label = parse_ascii_int(members[1])
    index = parse_ascii_int(members[2]) if source.has_index else None
    return members[0], label, index
