"""Whether a file starts like an image DALI's decoders read, and ends where its image does.

DALI 2.4's CPU decoder, handed a file it cannot decode, raises "Critical error in
pipeline"; when two such samples are decoded at once (two damaged files in one batch, or
one repeated: a shard's last sample pads its last batch, a small set wraps around in a
batch larger than itself) it segfaults instead: the process dies with status 139 and no
message, and a pretraining run whose kNN monitor reads such a set loses every step since
its last checkpoint. Measured on the CPU path: 25 JPEGs of which two were cut at 100 and
300 bytes, batch 32, crashed 3 runs of 3; with one of them, DALI raised. So the evaluation
loaders check every file of a folder or a file list before DALI sees it, and name the first
one no decoder would take:

- its first bytes: a JPEG, PNG, BMP, TIFF, JPEG 2000, WebP or PNM signature, and for PNG,
  BMP, TIFF and WebP the field after it that a file of zeros past its signature lacks;
- its last bytes: a JPEG with no end-of-image marker in its last 64 KiB is walked whole
  (:func:`jpeg_ends`: a camera's trailer after the marker is fine, a file cut short is
  not); a PNG without its IEND chunk, a BMP or WebP shorter than its header says, is cut
  short.

Damage inside the image data (bytes overwritten in the middle) is not found: DALI decodes
it with a warning and no failure. Not in the paper: a guard of the input pipeline.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from mscn.errors import DataError

HEAD_BYTES = 32
TAIL_BYTES = 64 * 1024  # a JPEG's end marker is looked for this far from its end before a whole read
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_BMP_DIB_SIZES = (12, 16, 40, 52, 56, 64, 108, 124)


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


def jpeg_ends(data: bytes) -> bool:
    """Whether the JPEG reaches its end-of-image marker (FFD9): walk the markers from the
    start, skipping each segment by its length and each scan's entropy-coded data up to the
    next marker (inside that data a 0xFF byte is followed only by 0x00 or a restart marker).
    False when the file ends before that marker: a download cut short, or its end
    overwritten with zeros, which PIL, libjpeg and nvJPEG decode as gray with at most a
    warning. Whatever follows the first image's end (a camera's trailer, an MP4 of a motion
    photo, an MPF second image) is not read. A header this walk cannot follow is left to the
    decoder (the scan's PIL has already decoded it; DALI decodes junk between markers with
    a warning)."""
    n = len(data)
    if data[:2] != b"\xff\xd8":
        return True
    i = 2
    while i + 1 < n:
        if data[i] != 0xFF:
            return True  # not a marker where one should be: the decoder's business
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xD9:
            return True
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if i + 3 >= n:
            return False
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
        if marker == 0xDA:  # start of scan: skip its entropy-coded data
            while True:
                k = data.find(b"\xff", i)
                if k < 0 or k + 1 >= n:
                    return False  # the file ends inside the scan
                if data[k + 1] == 0x00 or 0xD0 <= data[k + 1] <= 0xD7 or data[k + 1] == 0xFF:
                    i = k + 1 if data[k + 1] == 0xFF else k + 2
                    continue
                i = k
                break
    return False


def cut_short(fd: int, kind: str, head: bytes, size: int) -> str | None:
    """Why an open file (``fd``, of ``size`` bytes) whose ``head`` has the signature of
    ``kind`` cannot be that image: only its signature (zeros or junk after it), or it ends
    before its image does; None when neither shows. Reads its last bytes (64 KiB of a JPEG),
    and a whole JPEG only when no end-of-image marker is among them (a file cut short, or a
    trailer longer than that: a motion photo's video)."""
    if kind == "JPEG":
        if size >= 2 and os.pread(fd, 2, size - 2) == b"\xff\xd9":  # most JPEGs: 2 bytes read
            return None
        tail = os.pread(fd, min(size, TAIL_BYTES), max(0, size - TAIL_BYTES))
        if size > TAIL_BYTES and b"\xff\xd9" in tail:
            # an end marker near the end: a trailer after it (a phone's metadata) is common, and
            # coded image data never holds one (its 0xFF bytes are stuffed); only the start of
            # a file holds another image's (its EXIF thumbnail)
            return None
        data = os.pread(fd, size, 0)
        if not jpeg_ends(data):
            return "a JPEG cut short: it ends before its image data does"
        if b"\xff\xda" not in data:  # junk between markers decodes (with a warning); no scan at all does not
            return "a JPEG signature without image data after it (no start-of-scan marker)"
        return None
    if kind == "PNG":
        if head[12:16] != b"IHDR":
            return "a PNG signature without the PNG header after it"
        if size >= 12 and os.pread(fd, 12, size - 12) == _PNG_END:
            return None
        return None if b"IEND" in os.pread(fd, size, 0) else "a PNG cut short: it has no end chunk (IEND)"
    if kind == "BMP":
        if int.from_bytes(head[14:18], "little") not in _BMP_DIB_SIZES:
            return "a BMP signature without a BMP header after it"
        declared = int.from_bytes(head[2:6], "little")
        return f"a BMP cut short ({size} of {declared} bytes)" if size < declared else None
    if kind == "WebP":
        chunk, length = head[12:16], int.from_bytes(head[16:20], "little")
        # a lossy frame starts with its start code, a lossless one with its signature byte
        if (chunk not in (b"VP8 ", b"VP8L", b"VP8X") or not 0 < length <= size - 20
                or (chunk == b"VP8 " and head[23:26] != b"\x9d\x01\x2a") or (chunk == b"VP8L" and head[20] != 0x2F)):
            return "a WebP signature without a WebP image after it"
        declared = int.from_bytes(head[4:8], "little") + 8
        return f"a WebP cut short ({size} of {declared} bytes)" if size < declared else None
    if kind == "TIFF":
        order = "little" if head[:2] == b"II" else "big"
        first = int.from_bytes(head[4:8], order)
        return None if 8 <= first < size else "a TIFF whose first image directory is not in the file"
    return None  # JPEG 2000, PNM: the signature is all this reads


def _what(head: bytes) -> str:
    if not head:
        return "an empty file"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "a GIF image"
    return f"no JPEG, PNG, BMP, TIFF, JPEG 2000, WebP or PNM header (it starts with {head[:8]!r})"


def _first_bad(paths: list[str]) -> tuple[str, str] | None:
    """The first of ``paths`` that cannot be read, has no header DALI decodes, or is cut
    short (:func:`cut_short`)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                head = os.read(fd, HEAD_BYTES)
                kind = header_kind(head)
                why = cut_short(fd, kind, head, os.fstat(fd).st_size) if kind else None
            finally:
                os.close(fd)
        except OSError as e:
            return path, f"cannot be read ({e.strerror or e})"
        if kind is None:
            return path, _what(head) + ", which DALI cannot decode"
        if why:
            return path, why + ", which DALI cannot decode"
    return None


def first_undecodable(root: str, files, threads: int | None = None, per_task: int = 1024) -> tuple[str, str] | None:
    """``(path, why)`` of the first of ``files`` (relative to ``root``) that no DALI decoder
    would take (by :func:`header_kind` and :func:`cut_short`) or that cannot be read; None
    when all can. Reads 32 bytes and the last few of each file (a whole JPEG only when it
    does not end with its marker), ``per_task`` files per task of ``threads`` threads
    (default: the cores, at most 8; on a network file system the reads wait on the server)."""
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
    """One DataError naming the first file of a folder or file list ``source``
    (:class:`~mscn.data.source.Source`) that DALI cannot decode by its first and last bytes,
    or cannot read (a scan decoded every file it kept, but a file may have changed since, or
    the list been edited). Tar shards are not read here. Once per source and process."""
    if source.kind not in ("folder", "filelist") or source.digest() in _CHECKED:
        return
    bad = first_undecodable(source.root, source.files)
    if bad:
        path, why = bad
        fix = (f"run `mscn data scan {source.root} --out LIST.txt` (it leaves such files out) and give LIST.txt "
               "instead of the folder") if source.kind == "folder" else "replace the file, or rescan and use the new list"
        raise DataError(f"{path}: {why}; {fix}")
    _CHECKED.add(source.digest())
