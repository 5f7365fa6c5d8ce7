"""The check of a dataset's images before DALI reads them: every file of a folder or a file
list, or the image member of every sample of tar shards (at the offset its DALI index
gives), judged by its first and last bytes (:mod:`mscn.data.headers`).

DALI 2.4's CPU decoder raises on one sample it cannot decode, but segfaults (status 139, no
message) when two meet in one batch, so the evaluation loaders check their whole set
(:func:`check_headers`) and the training loader and ``mscn pretrain`` the ranks' shares of
the training set (:func:`check_training_files`, ``data.check_files``), and they name the
first damaged image in one line. A share that passed is stamped (:mod:`mscn.data.checkstamp`):
the next process reads its files again only when one changed. Not in the paper: a guard of
the input pipeline.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from tqdm import tqdm

from mscn.data import checkstamp
from mscn.data.headers import undecodable
from mscn.data.imagefolder import TAR_IMAGE_EXTS
from mscn.errors import DataError


def _first_bad(paths: list[tuple[int, str]]) -> tuple[int, str, str] | None:
    """``(place, path, why)`` of the first of ``paths`` (``(place, path)`` pairs) that cannot
    be read or holds no image DALI decodes (:func:`~mscn.data.headers.undecodable`)."""
    for place, path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                why = undecodable(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        except OSError as e:
            why = f"cannot be read ({e.strerror or e})"
        if why:
            return place, path, why
    return None


def _chunks(items: list, size: int = 1024) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _in_tasks(check: Callable, tasks: list, threads: int | None, progress: Callable[[int], None] | None):
    """The first non-None ``check(task)`` in the tasks' order, on ``threads`` threads
    (default: the cores, at most 8); ``progress(len(task))`` after each task found clean."""
    threads = min(threads or min(8, os.cpu_count() or 1), max(1, len(tasks)))
    pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
    try:
        for task, bad in zip(tasks, pool.map(check, tasks) if pool else map(check, tasks)):  # in order
            if bad:
                return bad
            if progress:
                progress(len(task))
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)  # a bad file early: the rest is not read
    return None


def first_undecodable(root: str, files, threads: int | None = None, per_task: int = 1024) -> tuple[str, str] | None:
    """``(path, why)`` of the first of ``files`` (relative to ``root``) that no DALI decoder
    would take (by :func:`header_kind` and :func:`cut_short`) or that cannot be read; None
    when all can. Reads 32 bytes and the last few of each file (a whole JPEG only when it
    does not end with its marker), ``per_task`` files per task of ``threads`` threads
    (default: the cores, at most 8; on a network file system the reads wait on the server)."""
    bad = _in_tasks(_first_bad, _chunks(list(enumerate(os.path.join(root, f) for f in files)), per_task), threads, None)
    return (bad[1], bad[2]) if bad else None


# the sources this process has checked whole (:func:`_key`), and (key, rank, world size) for
# a rank's share of a training set: once per run, not per loader
_CHECKED: set = set()


def _key(source) -> tuple[str, str]:
    """Which files a source's check read: its root as well as its digest, which names the
    files relative to the root (a copy of a checked set, damaged since, has its digest)."""
    return source.digest(), os.path.realpath(source.root)


WDS_FIX = ("run `mscn data scan` on the ImageFolder these shards came from, then `mscn data pack "
           "<its .filelist.txt> OUT` again")


def _fix(source) -> str:
    if source.kind == "wds":  # scan reads image folders, not shards
        return WDS_FIX
    if source.kind == "folder":
        return (f"run `mscn data scan {source.root} --out LIST.txt` (it leaves such files out) and give LIST.txt "
                "instead of the folder")
    return "replace the file, or rescan and use the new list"


def check_headers(source) -> None:
    """One DataError naming the first file of a folder or file list ``source``
    (:class:`~mscn.data.source.Source`), or the first image member of its tar shards, that
    DALI cannot decode by its first and last bytes, or cannot be read (a scan decoded every
    file it kept, but a file may have changed since, or the list been edited). Once per
    source and process."""
    check_training_files(source)  # one rank: the whole set, and the same stamp


def check_training_files(source, rank: int = 0, world_size: int = 1, gather=None, show: bool = False) -> str | None:
    """:func:`check_headers` for a training set, its files (or its shards' samples) split
    between the ranks: rank ``r`` reads every ``world_size``-th from the ``r``-th (1.28 M
    files on 8 ranks: 160 k each), since every rank's reader goes through the whole set over
    the epochs.

    ``gather``: a collective that returns every rank's finding from this rank's (torch's
    ``all_gather_object``), so that every rank raises the same error, naming the first
    damaged file of the whole list; without it (a loader built by another project's trainer,
    which may build it on some ranks only) a rank raises for its own share, and the other
    ranks' shares are checked by their own loaders. ``show``: a progress bar (rank 0 of a
    set large enough to take a while). Once per source, rank and process; a share whose
    files are unchanged since a check that passed (its stamp) is not read again.

    Returns the time of that earlier check when this rank's share was not read for it,
    else None.
    """
    key = (_key(source), rank, world_size)
    found, stamp, before = None, None, None
    if key[0] not in _CHECKED and key not in _CHECKED:  # read before: with a gather, still take part
        try:
            stamp = _Stamp(source, rank, world_size)
            before = stamp.still_good()
            if not before:
                found = _first_bad_in(source, rank, world_size, show)
        except Exception as e:  # noqa: BLE001 - a rank that raised alone would leave the others in the gather
            if gather is None:
                raise
            found = (-1, source.root, f"the check of rank {rank}'s share failed ({type(e).__name__}: {e})")
    found = [f for f in (gather(found) if gather else [found]) if f]
    _raise_first(source, min(found) if found else None)
    if stamp is not None and not before:
        stamp.write()
    # every rank read its share and none found a damaged file (or one rank read it all): the
    # whole set is checked, and the kNN monitor's evaluation loader over it reads nothing again
    _CHECKED.add(key[0] if gather or world_size == 1 else key)
    return before


class _Stamp:
    """The stamp (:mod:`mscn.data.checkstamp`) of one rank's share of ``source``: the stat
    of its files (of every shard and index, for shards), taken before they are read."""

    def __init__(self, source, rank: int, world_size: int):
        self.key = (source.kind, *_key(source), rank, world_size)
        self.fp = None
        if checkstamp.stamp_dir() is not None:
            paths = ([p for pair in zip(source.tars, source.indexes) for p in pair] if source.kind == "wds" else
                     [os.path.join(source.root, f) for f in source.files[rank::world_size]])
            self.fp = checkstamp.fingerprint(paths)
        self.files = len(range(rank, source.num_samples, world_size))

    def still_good(self) -> str | None:
        return checkstamp.stamped(self.key, self.fp)

    def write(self) -> None:
        checkstamp.stamp(self.key, self.fp, self.files)


def _first_bad_in(source, rank: int, world_size: int, show: bool) -> tuple[int, str, str] | None:
    """``(place, where, why)`` of the first damaged sample of this rank's share of ``source``:
    ``place`` its number in the whole set, ``where`` its path (``tar:offset:member`` in a
    shard)."""
    if source.kind == "wds":
        check, unit, mine = _first_bad_member, "image", _image_members(source, rank, world_size)
    else:  # place: the file's index in the whole list
        check, unit = _first_bad, "file"
        mine = list(zip(range(rank, source.num_samples, world_size),
                        (os.path.join(source.root, f) for f in source.files[rank::world_size])))
    with tqdm(total=len(mine), desc=f"checking the {unit}s", unit=unit, dynamic_ncols=True, disable=not show) as bar:
        return _in_tasks(check, _chunks(mine), None, bar.update)


def _raise_first(source, found: tuple[int, str, str] | None) -> None:
    if found is None:
        return
    _, path, why = found
    if source.kind == "wds":
        from mscn.data.pack import packed_origin
        from mscn.data.shardindex import stale_note

        # an index rewritten in its middle points at the wrong bytes (the run's start checks
        # only its ends): name the index, not an image that is fine
        stale = stale_note(path.rsplit(":", 2)[0])
        if stale:
            raise DataError(stale)
        path = packed_origin(path)
    raise DataError(f"{path}: {why}; {_fix(source)}")


def _image_members(source, rank: int, world_size: int) -> list[tuple[int, str, int, int, str]]:
    """``(place, tar, data offset, size, member)`` of the image member of every
    ``world_size``-th sample of tar shards from the ``rank``-th, read from their DALI indexes:
    ``place`` is the sample's number in the whole set (shards in order, samples as indexed)."""
    mine, place = [], 0
    for tar, idx in zip(source.tars, source.indexes):
        with open(idx, encoding="utf-8", errors="surrogateescape") as f:
            f.readline()  # v1.2 <samples>
            for line in f:
                fields = line.split()
                if not fields:
                    continue
                if place % world_size == rank:
                    for i in range(0, len(fields) - 3, 4):  # ext offset size name, per member
                        if fields[i].lower() in TAR_IMAGE_EXTS and fields[i + 1].isdecimal() and fields[i + 2].isdecimal():
                            mine.append((place, tar, int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]))
                            break  # (a malformed line is left to the reader, which names it)
                place += 1
    return mine


def _first_bad_member(members: list[tuple[int, str, int, int, str]]) -> tuple[int, str, str] | None:
    """``(place, tar:offset:member, why)`` of the first image member that cannot be read or
    holds no image DALI decodes (:func:`~mscn.data.headers.undecodable`)."""
    fds: dict[str, tuple[int, int]] = {}  # tar -> (fd, size)
    try:
        for place, tar, offset, size, name in members:
            try:
                if tar not in fds:
                    fd = os.open(tar, os.O_RDONLY)
                    fds[tar] = fd, os.fstat(fd).st_size
                fd, tar_size = fds[tar]
                why = (undecodable(fd, size, offset) if offset + size <= tar_size else
                       f"its index places it past the end of the shard (byte {offset + size} of {tar_size})")
            except OSError as e:
                why = f"cannot be read ({e.strerror or e})"
            if why:
                return place, f"{tar}:{offset}:{name}", why  # as DALI names a sample of a shard
    finally:
        for fd, _ in fds.values():
            os.close(fd)
    return None
