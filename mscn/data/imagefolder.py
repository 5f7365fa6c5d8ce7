"""List an ImageFolder root the way torchvision's ``ImageFolder`` does (and the
parallel per-file loop that the data tools share).

``ROOT/<class>/**/<image>``: classes are the sorted sub-folder names and a sample's
label is its class's index in that order, so a file list written here, DALI's
``fn.readers.file(file_root=ROOT)`` and torchvision agree on every label. A val root
is listed against the train root's classes (``classes=``), so a val set with a subset
of the classes keeps the train set's labels. ``ROOT/<image>`` with no class folders
is an unlabelled set (:func:`list_flat_folder`, label -1): most SSL data has no labels.
Every user-fixable problem (missing path, empty folder, no images) is one DataError
line naming the path.
"""
from __future__ import annotations

import os
import signal
import unicodedata
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from mscn.errors import DataError, SignalStop, sigterm_raises
from mscn.machine import usable_cores

# torchvision's IMG_EXTENSIONS; matched case-insensitively (ImageNet uses .JPEG).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# a tar sample's image member, by extension without the dot: the webdataset reader's one image
# output (pipelines/readers.py) and what `mscn data index` checks samples for
TAR_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMG_EXTENSIONS + (".jpe",))
SPLIT_NAMES = {"train", "val", "validation", "test"}
# The image formats (PIL's names) DALI's decoder (nvImageCodec) reads. A file in another
# format under an image extension (a GIF, AVIF or ICO named .jpg) opens in PIL but stops
# DALI with "nvImageCodec failure", naming no file: scan excludes it, diagnose names it.
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "JPEG2000", "WEBP", "PPM"})


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


# a macOS zip's resource forks (__MACOSX/._x.jpg, no images): no class, and no reason to
# take a flat folder for an ImageFolder
IGNORED_DIRS = frozenset({"__MACOSX"})


def hidden(name: str) -> bool:
    """Whether a folder entry is left out of every listing: hidden files and folders
    (.DS_Store, ._x.jpg, .git) and :data:`IGNORED_DIRS`."""
    return name.startswith(".") or name in IGNORED_DIRS


def entries(path) -> list[os.DirEntry]:
    """``os.scandir(path)`` as a list, its handle closed (a generator left open leaks a
    ResourceWarning into the caller's ``pytest -W error``)."""
    with os.scandir(path) as it:
        return list(it)


def is_dir(e: os.DirEntry) -> bool:
    """``e.is_dir()``, following links; False for a link that loops (ELOOP) or that cannot be
    followed, which ``DirEntry.is_dir`` raises as an OSError."""
    try:
        return e.is_dir()
    except OSError:
        return False


def is_file(e: os.DirEntry) -> bool:
    """``e.is_file()``, following links; False for a link that loops or cannot be followed."""
    try:
        return e.is_file()
    except OSError:
        return False


def _has_subdir(path: Path) -> bool:
    return any(is_dir(e) for e in entries(path))


def find_classes(root: str | os.PathLike) -> list[str]:
    """Sorted class folder names under ``root``; DataError if there are none."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such directory; pass an ImageFolder root (ROOT/<class>/<image>)")
    if not root.is_dir():
        raise DataError(f"{root}: not a directory; pass an ImageFolder root (ROOT/<class>/<image>)")
    listed = [e for e in entries(root) if not hidden(e.name)]  # once, for the checks below
    classes = sorted(e.name for e in listed if is_dir(e))
    if not classes:
        files = [e.name for e in listed if is_file(e)]
        if not files:
            raise DataError(f"{root}: empty folder, no class sub-folders; expected ROOT/<class>/<image>")
        # files but no class folders: say what they are, since the fix depends on it
        tars = sum(n.endswith(".tar") for n in files)
        what = (f"{tars} .tar shard(s): a webdataset folder, which data.format=auto (or wds) reads as it is"
                if tars else f"{len(files)} file(s) directly in it, e.g. {sorted(files)[0]}")
        raise DataError(f"{root}: no class sub-folders but {what}; an ImageFolder (ROOT/<class>/<image>) is "
                        "expected here")
    loose = sorted(e.name for e in listed if is_file(e) and is_image_name(e.name))
    if loose:
        # both shapes at once: an ImageFolder would leave the top's images out without a word
        # (torchvision's does), a flat folder the sub-folders'; neither guess is safe
        raise DataError(f"{root}: {len(loose)} image(s) directly in it (e.g. {loose[0]}) and {len(classes)} "
                        f"sub-folder(s) (e.g. {classes[0]}/): an ImageFolder keeps every image in a class folder, "
                        "a flat folder of unlabelled images has none; move the images or the folders so that it is "
                        "one or the other")
    if set(classes) <= SPLIT_NAMES and all(_has_subdir(root / c) for c in classes):
        # A root holding train/<class>/ and val/<class>/ is a dataset, not an
        # ImageFolder: taking the splits as two classes would mislabel every image.
        raise DataError(
            f"{root}: holds split folders {classes}, not classes; pass {root / classes[0]} instead"
        )
    return classes


def walk_class(root: Path, cls: str, images_only: bool = True) -> list[str]:
    """Sorted paths (relative to ``root``, '/'-separated) of the files under one class.

    Regular files only, told apart by ``os.scandir``'s entry types (no stat per file, which a
    network file system would feel on a million images): a FIFO named .jpg would block the
    reader forever, and a dangling or looping symlink has nothing to read."""
    found, seen = [], set()
    top, own = os.path.realpath(root), os.path.realpath(root / cls)
    stack = [(root / cls, cls)]
    while stack:
        folder, rel_dir = stack.pop()
        real = os.path.realpath(folder)
        # a symlinked folder is followed (a class kept on other storage), but not twice (a
        # loop) and not back into the dataset outside this class: another class's images
        # would be listed again under this class's label
        elsewhere = real == top or (real.startswith(top + os.sep) and real != own
                                    and not real.startswith(own + os.sep))
        if real in seen or elsewhere:
            continue
        seen.add(real)
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not hidden(e.name)), key=lambda e: e.name)
        subdirs = []
        for e in entries:
            if is_dir(e):  # follows symlinks, as os.walk(followlinks=True) did
                subdirs.append((folder / e.name, f"{rel_dir}/{e.name}"))
            elif is_file(e) and not (images_only and not is_image_name(e.name)):
                if e.is_symlink() and _into_another_class(os.path.realpath(e.path), top, own):
                    continue  # another class's image (or the root's): it would be listed under two labels
                found.append(f"{rel_dir}/{e.name}")
        stack += reversed(subdirs)  # depth first in name order, as os.walk: the first alias of a folder wins
    return sorted(found)


def _into_another_class(real: str, top: str, own: str) -> bool:
    """Whether the real path ``real`` of a linked file lies in the dataset ``top`` outside
    the class folder ``own``."""
    return real.startswith(top + os.sep) and not real.startswith(own + os.sep)


def not_utf8(name: str) -> bool:
    """Whether a file name (as Python decodes it from the file system) is not valid UTF-8:
    a file list, the scan's report and DALI's reader (which takes the names as UTF-8
    strings) cannot hold it. Such a name comes from a Latin-1 system, e.g. b'caf\\xe9.jpg'."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_names(root, samples: list[tuple[str, int]]) -> None:
    """One DataError naming the first sample whose name is not valid UTF-8 (:func:`not_utf8`):
    DALI's reader stopped with "Unsupported argument type with name files", naming none."""
    bad = next((rel for rel, _ in samples if not_utf8(rel)), None)
    if bad is not None:
        raise DataError(f"{printable(str(Path(root) / bad))}: a file name that is not valid UTF-8, which DALI's "
                        f"reader and file lists cannot take; rename it (`mscn data scan {root}` lists every such "
                        "file as bad_name and leaves it out)")


def printable(name: str) -> str:
    """A file name as text any terminal takes: its bytes that are not UTF-8 as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


UNLABELLED = -1  # the label of a sample without one (flat folders, lists and shards without labels)


def is_flat_folder(root: str | os.PathLike) -> bool:
    """True for a folder of images without class sub-folders (an unlabelled set)."""
    root = Path(root)
    if not root.is_dir():
        return False
    listed = entries(root)  # once: a flat folder may hold a million images
    return (not any(is_dir(e) and not hidden(e.name) for e in listed)
            and any(is_file(e) and is_image_name(e.name) for e in listed))


def list_flat_folder(root: str | os.PathLike) -> list[tuple[str, int]]:
    """``[(name, -1), ...]``, sorted: the images directly in ``root``, unlabelled."""
    root = Path(root)
    return [(e.name, UNLABELLED) for e in sorted(entries(root), key=lambda e: e.name)
            if is_file(e) and not hidden(e.name) and is_image_name(e.name)]


def nfc(name: str) -> str:
    """A name in one Unicode normal form: a macOS copy writes NFD ('é' as 'e' + a combining
    accent), other bytes for the same letters."""
    return unicodedata.normalize("NFC", name)


def class_labels(found: list[str], classes: list[str] | tuple[str, ...] | None, root) -> list[int]:
    """Label of each class folder in ``found``: its index in ``classes`` (the train set's
    label set), or in ``found`` itself when None. A class outside the label set is an error
    naming it: its images would get another class's label, or none."""
    if classes is None:
        return list(range(len(found)))
    index = {c: i for i, c in enumerate(classes)}
    # a name in another Unicode normal form is the same class (nfc)
    same = {}
    for i, c in enumerate(classes):
        same.setdefault(nfc(c), []).append(i)
    for c in found:
        if c not in index and len(same.get(nfc(c), [])) == 1:
            index[c] = same[nfc(c)][0]
    missing = [c for c in found if c not in index]
    if missing:
        raise DataError(f"{root}: class {missing[0]!r}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''} "
                        f"is not among the {len(classes)} classes of the training set; labels are matched by "
                        "class name, so every evaluation class must exist in training")
    return [index[c] for c in found]


def _no_alias_classes(root: Path, found: list[str]) -> None:
    """One line for a class folder that is a link to another class's folder (or into it):
    its images would be listed twice, under two labels."""
    real = {c: os.path.realpath(root / c) for c in found}
    for c in found:
        for other in found:
            if other != c and (real[c] == real[other] or real[c].startswith(real[other] + os.sep)) \
                    and os.path.islink(root / c):
                raise DataError(f"{root / c}: a link to the class folder {other!r} of the same dataset, so its images "
                                f"would be listed twice, under two labels; remove the link (or make {c!r} a folder of "
                                "its own)")


def list_image_folder(
    root: str | os.PathLike, images_only: bool = True, classes: list[str] | tuple[str, ...] | None = None
) -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, [(relpath, label), ...])`` for an ImageFolder root, sorted by path.

    ``images_only=False`` also returns files without an image extension (``scan``
    uses it to report them); hidden files and folders are always skipped.
    ``classes``: the label set (the train root's classes); this root's class folders
    must be among them and take their labels from it. The returned classes are then
    ``classes``, not this root's folders.
    """
    root = Path(root)
    found = find_classes(root)
    _no_alias_classes(root, found)
    labels = class_labels(found, classes, root)
    samples = [
        (rel, label)
        for label, cls in zip(labels, found)
        for rel in walk_class(root, cls, images_only)
    ]
    if not samples:
        kind = "images" if images_only else "files"
        raise DataError(
            f"{root}: no {kind} in its {len(found)} class folders "
            f"(looked for {', '.join(IMG_EXTENSIONS)})"
        )
    return (list(classes) if classes is not None else found), samples


def parallel_imap(fn: Callable, tasks: list, workers: int | None, desc: str, progress: bool = True) -> Iterator:
    """``fn(task)`` for every task over a process pool, in completion order, with a bar.

    ``workers`` defaults to every core this process may use (its affinity); 1 runs in this
    process (no pickling, easy to debug). Callers must not depend on the order: results
    arrive as they finish. A worker that dies (the kernel's out-of-memory killer, a crash in
    a decoder) is one DataError: ``multiprocessing.Pool`` replaced it and waited for its
    tasks forever (scan and pack hung at 1484/1500).
    """
    workers = max(1, min(workers or usable_cores(), len(tasks)))
    with tqdm(total=len(tasks), desc=desc, unit="file", disable=not progress) as bar, _stop_on_sigterm(desc):
        if workers == 1:
            for task in tasks:
                yield fn(task)
                bar.update()
            return
        size = max(1, min(16, len(tasks) // (4 * workers)))
        pool = ProcessPoolExecutor(workers, initializer=_worker_init)
        try:
            pending = [pool.submit(_run_chunk, fn, tasks[i:i + size]) for i in range(0, len(tasks), size)]
            for done in as_completed(pending):
                try:
                    results = done.result()
                except BrokenProcessPool:
                    raise DataError(f"{desc}: a worker process died (killed, e.g. by the kernel when memory ran "
                                    "out, or crashed); what it had done is not written: rerun the same command "
                                    "(with fewer --workers if memory ran out)") from None
                for result in results:
                    yield result
                    bar.update()
        finally:  # also on an exception in fn, a stop, or an abandoned generator
            procs = _processes(pool)  # before shutdown, which forgets them
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in procs:  # the running tasks too: as Pool.terminate() did
                proc.terminate()
            for proc in procs:
                proc.join()


def _run_chunk(fn: Callable, chunk: list) -> list:
    return [fn(task) for task in chunk]


def _processes(pool: ProcessPoolExecutor) -> list:
    """The pool's worker processes (``ProcessPoolExecutor`` keeps them in ``_processes``;
    Python 3.14's ``terminate_workers`` is the public way, not in 3.10-3.13)."""
    return list((getattr(pool, "_processes", None) or {}).values())


def _worker_init() -> None:
    """A pool worker leaves Ctrl-C to the main process, which stops the pool: each worker's
    own KeyboardInterrupt traceback was printed under the command's one line. SIGTERM ends a
    worker at once, as the pool's terminate() expects (a fork inherits the main process's
    handler, which would raise inside the worker's loop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stop_on_sigterm(desc: str):
    """SIGTERM (kill, timeout, a scheduler) during the work: the pool is stopped and the
    command says so in one line (it died at once, its workers printing BrokenPipeError
    tracebacks)."""
    return sigterm_raises(lambda signum: SignalStop(f"stopped by SIGTERM during {desc}; what it had done is not "
                                                    "written: rerun the same command", signum))
