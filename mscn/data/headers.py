"""Whether a file starts like an image DALI's decoders read, from its first bytes.

DALI 2.4's CPU decoder, handed a file no codec recognises (a text file or a GIF named
``.jpg``), raises "Critical error in pipeline" and, in an evaluation loader whose batch
spans the file (batch 32+ over 17 files, or 1 run in 2 at batch 128 over 400), then
segfaults inside ``share_outputs``: the process dies with status 139 and no message, and
a pretraining run whose kNN monitor reads such a set loses every step since its last
checkpoint. So the evaluation loaders read 16 bytes of every file first and name the
first one no decoder would take, before DALI sees it. A damaged file with a valid header
(cut short, zeroed) is left to the loader's own diagnosis (:mod:`mscn.pipelines.diagnose`),
which DALI survives.

Not in the paper: a guard of the input pipeline.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from mscn.errors import DataError

HEAD_BYTES = 16


def header_kind(head: bytes) -> str | None:
    """The image format whose signature ``head`` (a file's first bytes) starts with, among
    those DALI decodes (JPEG, PNG, BMP, TIFF, JPEG 2000, WebP, PNM); None for any other."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head.startswith((b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  \r\n\x87\n")):
        return "JPEG 2000"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "PNM"
    return None


def _what(head: bytes) -> str:
    if not head:
        return "an empty file"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "a GIF image"
    return f"no JPEG, PNG, BMP, TIFF, JPEG 2000, WebP or PNM header (it starts with {head[:8]!r})"


def _first_bad(paths: list[str]) -> tuple[str, str] | None:
    """The first of ``paths`` that cannot be read or has no header DALI decodes."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                head = os.read(fd, HEAD_BYTES)
            finally:
                os.close(fd)
        except OSError as e:
            return path, f"cannot be read ({e.strerror or e})"
        if header_kind(head) is None:
            return path, _what(head) + ", which DALI cannot decode"
    return None


def first_undecodable(root: str, files, threads: int | None = None, per_task: int = 1024) -> tuple[str, str] | None:
    """``(path, why)`` of the first of ``files`` (relative to ``root``) that no DALI decoder
    would take (by :func:`header_kind`) or that cannot be read; None when all can. Reads
    16 bytes per file, ``per_task`` files per task of ``threads`` threads (default: the cores,
    at most 8; on a network file system the reads wait on the server; 200k cached files took
    0.7 s on 2 cores)."""
    files = list(files)
    tasks = [[os.path.join(root, f) for f in files[i:i + per_task]] for i in range(0, len(files), per_task)]
    if len(tasks) <= 1:
        return _first_bad(tasks[0]) if tasks else None
    threads = threads or min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=min(threads, len(tasks)))
    try:
        for bad in pool.map(_first_bad, tasks):  # in order: the first bad file of the list
            if bad:
                return bad
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a bad file early: the rest is not read
    return None


_CHECKED: set[str] = set()  # digests of the sources this process has checked: once per run, not per loader


def check_headers(source) -> None:
    """One DataError naming the first file of a folder ``source`` (:class:`~mscn.data.source.Source`)
    that DALI cannot decode by its header, or cannot read. File lists (a scan decoded every
    file it kept) and tar shards are not read here. Once per source and process."""
    if source.kind != "folder" or source.digest() in _CHECKED:
        return
    bad = first_undecodable(source.root, source.files)
    if bad:
        path, why = bad
        raise DataError(f"{path}: {why}; run `mscn data scan {source.root} --out LIST.txt` (it leaves such "
                        "files out) and give LIST.txt instead of the folder")
    _CHECKED.add(source.digest())
