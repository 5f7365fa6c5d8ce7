"""Stamps of datasets whose files passed the start-up check (:mod:`mscn.data.filecheck`),
so that a restart does not read every file again when none has changed.

A preemptible job restarts many times, and each start read the first and last bytes of
every file of its share: about 20 s a rank for ImageNet on 8 ranks from a cold local
disk, a round trip a file on a network file system. A stamp records the ``stat`` of each
file the check read (size, inode, modification and change times); the next start
compares a fresh ``stat`` of each (30,000 files from the page cache on the 2-core CPU
machine: 0.12-0.15 s stamped against 0.67-0.69 s read) and reads the files again when any
differs. The change time is set by the kernel on every write and cannot be set back, so a
file damaged in place (same name, same size) is read again.

Like git's "racily clean" entries, a file changed within :data:`RACY_S` seconds of the
check is not stamped: a file system keeps times in ticks (a few ms locally, 1-2 s on
some servers), and a same-size change within one tick would keep its times.

Stamps live in ``$MSCN_CACHE_DIR`` (default ``$XDG_CACHE_HOME/mscn/filecheck``, else
``~/.cache/mscn/filecheck``), one small JSON file per dataset, rank and number of ranks;
``MSCN_CACHE_DIR=off`` turns them off. A stamp that cannot be written (a read-only home)
is skipped without a word: the check itself ran. A stamp not used for :data:`STALE_DAYS`
days is removed when another is written. Not in the paper: a guard of the input
pipeline.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import mscn

# bump when mscn.data.headers refuses more: a stamp of an older check does not cover the new rules
RULES = 1
RACY_S = 2.0
T = TypeVar("T")
# a stamp not used for this long (a data set deleted, another number of ranks, an older
# mscn's) is removed when another is written: the folder does not grow without end
STALE_DAYS = 90


def stamp_dir() -> Path | None:
    """Where stamps live (``MSCN_CACHE_DIR``, ``XDG_CACHE_HOME``, ``~/.cache``); None when
    ``MSCN_CACHE_DIR=off``."""
    env = os.environ.get("MSCN_CACHE_DIR", "")
    if env.strip().lower() in ("off", "0", "none", "false"):
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mscn" / "filecheck"


def _stat_chunk(paths: list[str]) -> tuple[bytes, int] | None:
    """The digest of the ``stat`` of ``paths`` and their newest change time; None when one
    cannot be stat'ed (the check then reads, and names it)."""
    h, newest = hashlib.sha1(), 0
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            return None
        h.update(f"{st.st_size} {st.st_ino} {st.st_mtime_ns} {st.st_ctime_ns}\n".encode())
        newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
    return h.digest(), newest


def map_chunks(fn: Callable[[Sequence[str]], T], paths: Sequence[str], threads: int | None = None) -> list[T]:
    """``fn`` of each run of 4,096 of ``paths``, in order, on ``threads`` threads (default:
    the cores, at most 8): on a network file system each ``stat`` waits on the server, so
    several are kept in flight. An exception of ``fn`` reaches the caller."""
    chunks = [paths[i:i + 4096] for i in range(0, len(paths), 4096)]
    threads = min(threads or min(8, os.cpu_count() or 1), max(1, len(chunks)))
    if threads <= 1:
        return [fn(c) for c in chunks]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(fn, chunks))


def fingerprint(paths: list[str], threads: int | None = None) -> str | None:
    """A digest of the ``stat`` of every one of ``paths``, in order, on ``threads`` threads
    (:func:`map_chunks`); None when one cannot be stat'ed or one changed within
    :data:`RACY_S` s of now (see the module's docstring)."""
    parts = map_chunks(_stat_chunk, paths, threads)
    if any(p is None for p in parts):
        return None
    if parts and max(n for _, n in parts) > time.time_ns() - int(RACY_S * 1e9):
        return None  # racy: a same-size change within one tick of the file system would not show
    h = hashlib.sha1(f"{len(paths)}\n".encode())
    for digest, _ in parts:
        h.update(digest)
    return h.hexdigest()


def _file(key: tuple) -> Path | None:
    where = stamp_dir()
    if where is None:
        return None
    name = hashlib.sha1(json.dumps([RULES, mscn.__version__, *key]).encode()).hexdigest()[:24]
    return where / f"{name}.json"


def stamped(key: tuple, fp: str | None) -> str | None:
    """When the stamp of ``key`` holds fingerprint ``fp``: the time of its check (ISO, UTC);
    else None."""
    path = _file(key)
    if fp is None or path is None:
        return None
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("fingerprint") != fp or stamp.get("key") != list(key):
        return None
    try:
        os.utime(path)  # in use: not stale (_prune)
    except OSError:
        pass
    return str(stamp.get("checked_at", "?"))


def _prune(where: Path) -> None:
    """Remove the stamps in ``where`` not used for :data:`STALE_DAYS` days."""
    cutoff = time.time() - STALE_DAYS * 86400
    try:
        old = [f for f in where.glob("*.json") if f.stat().st_mtime < cutoff]
    except OSError:
        return
    for f in old:
        try:
            f.unlink()
        except OSError:
            pass


def stamp(key: tuple, fp: str | None, files: int) -> None:
    """Record that the files of ``key`` with fingerprint ``fp`` passed the check. Written
    whole or not at all (a temporary file renamed); an error is ignored."""
    path = _file(key)
    if fp is None or path is None:
        return
    body = {"key": list(key), "fingerprint": fp, "files": files, "rules": RULES, "mscn": mscn.__version__,
            "checked_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(body))
        os.replace(tmp, path)
        _prune(path.parent)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
