"""Whether a file starts like an image DALI's decoders read, and ends where its image does.

DALI 2.4's CPU decoder, handed a file it cannot decode, raises "Critical error in
pipeline"; when two such samples are decoded at once (two damaged files in one batch, or
one repeated: a shard's last sample pads its last batch, a small set wraps around in a
batch larger than itself) it segfaults instead: the process dies with status 139 and no
message, and a pretraining run whose kNN monitor reads such a set loses every step since
its last checkpoint. Measured on the CPU path: 25 JPEGs of which two were cut at 100 and
300 bytes, batch 32, crashed 3 runs of 3; with one of them, DALI raised. A training set of
102 JPEGs with two cut at 100 bytes crashed at batch 64 (and raised at 32 and 96). So the
evaluation loaders check every file of a folder or a file list before DALI sees it
(:func:`check_headers`), the training loader and ``mscn pretrain`` the ranks' shares of the
training files (:func:`check_training_files`, ``data.check_files``), and they name the first
one no decoder would take. Tar shards are read the same way, each sample's image member at
the offset its DALI index gives (two damaged members crashed DALI as two files did):

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
from typing import Callable

from tqdm import tqdm

from mscn.data.imagefolder import TAR_IMAGE_EXTS
from mscn.errors import DataError

HEAD_BYTES = 32
TAIL_BYTES = 64 * 1024  # a JPEG's end marker is looked for this far from its end before a whole read
# where a JPEG's first two segments (APP0 JFIF, APP1 EXIF: 64 KiB each at most) end at the
# latest: an end marker before it may be a thumbnail's, not the image's
_APP_SPAN = 2 + 2 * (4 + 0xFFFF)
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
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):  # classic TIFF, BigTIFF
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
    decoder (the scan's PIL has already decoded it; junk in a header, which PIL and libjpeg
    skip with a warning but DALI's parser fails on, is the loaders' check's: :func:`jpeg_header`)."""
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


# frame headers (SOFn): baseline, extended, progressive, lossless, and their arithmetic-coded
# forms; C4 (DHT), C8 (JPG) and CC (DAC) are not frames
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PAGE = 4096


def jpeg_header(pread: Callable[[int, int], bytes], size: int) -> tuple[int | None, str | None]:
    """Walk a JPEG's header, segment by segment, from its signature to its first start-of-scan
    marker, as DALI's JPEG parser (nvImageCodec) does before it decodes: ``(the position of
    that marker, None)``; ``(None, why)`` for a header that ends before a scan, a segment
    that runs past the end of the file, a byte that is no marker where one should be (junk
    between two segments: libjpeg skips it with a warning, DALI's parser fails with "Invalid
    marker", and DALI 2.4 segfaulted when two such files met in a batch), or a scan with no
    frame header (SOF) before it (a header overwritten with zeros); ``(None, None)`` when
    the walk cannot tell. ``pread(n, at)`` reads the file; the header's 4 KiB pages only."""
    buf, start = pread(min(size, _PAGE), 0), 0  # the header's bytes from ``start``: its first page, mostly

    def at(i: int, n: int) -> bytes:
        nonlocal buf, start
        if i < start or i + n > start + len(buf):  # a segment past this page: read on from i
            buf, start = pread(max(0, min(size - i, _PAGE)), i), i
        return buf[i - start:i - start + n]

    cut = "a JPEG cut short: it ends before its image data does"  # inside its header
    pos, frame = 2, False
    for _ in range(100_000):  # segments and fill bytes; a header of more is left to the decoder
        two = at(pos, 2)
        if len(two) < 2:
            return None, cut
        if two[0] != 0xFF:  # libjpeg skips such junk with a warning; DALI's parser fails ("Invalid marker")
            return None, f"a JPEG whose header is damaged: no marker at byte {pos}"
        marker = two[1]
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
        elif marker == 0xDA:
            if not frame:
                return None, "a JPEG whose header is damaged: no frame header (SOF) before its image data"
            return pos, None
        elif marker == 0xD9:
            return None, "a JPEG whose header ends before its image data (no start-of-scan marker)"
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
        elif marker < 0xC0:
            return None, f"a JPEG whose header is damaged: an invalid marker (0xFF{marker:02X}) at byte {pos}"
        else:
            length = at(pos + 2, 2)
            if len(length) < 2:
                return None, cut
            n = int.from_bytes(length, "big")
            if n < 2:
                return None, f"a JPEG whose header is damaged: a segment of length {n} at byte {pos}"
            frame = frame or marker in _SOF
            pos += 2 + n
            if pos > size:
                return None, cut
    return None, None


def cut_short(fd: int, kind: str, head: bytes, size: int, base: int = 0) -> str | None:
    """Why an open file (``fd``) whose ``size`` bytes from ``base`` (a member of a tar shard;
    0: the whole file) start with ``head``, the signature of ``kind``, cannot be that image:
    only its signature (zeros or junk after it), or it ends before its image does; None when
    neither shows. Reads its last bytes (64 KiB of a JPEG), and a whole JPEG only when no
    end-of-image marker is among them (a file cut short, or a trailer longer than that: a
    motion photo's video)."""
    def pread(n: int, at: int) -> bytes:
        return os.pread(fd, n, base + at)

    if kind == "JPEG":
        if len(head) > 3 and head[3] < 0xC0:  # every JPEG segment starts with a marker, 0xFFC0 to 0xFFFE
            return "a JPEG signature without a JPEG marker after it"
        scan, why = jpeg_header(pread, size)
        if why:
            return why
        if size >= 2 and pread(2, size - 2) == b"\xff\xd9":  # most JPEGs: 2 bytes read
            return None
        tail = pread(min(size, TAIL_BYTES), max(0, size - TAIL_BYTES))
        last = tail.rfind(b"\xff\xd9")
        if size > TAIL_BYTES and last >= 0 and size - len(tail) + last > (scan or _APP_SPAN):
            # an end marker near the end: a trailer after it (a phone's metadata) is common, and
            # coded image data never holds one (its 0xFF bytes are stuffed); only the header
            # holds another image's (a thumbnail in an EXIF, JFIF or Photoshop segment), so
            # one before the image data starts does not count
            return None
        data = pread(size, 0)
        if not jpeg_ends(data):
            return "a JPEG cut short: it ends before its image data does"
        if b"\xff\xda" not in data:  # a header too long for jpeg_header to walk, and no scan in it
            return "a JPEG signature without image data after it (no start-of-scan marker)"
        return None
    if kind == "PNG":
        if head[12:16] != b"IHDR":
            return "a PNG signature without the PNG header after it"
        if size >= 12 and pread(12, size - 12) == _PNG_END:
            return None
        return None if b"IEND" in pread(size, 0) else "a PNG cut short: it has no end chunk (IEND)"
    if kind == "BMP":
        if int.from_bytes(head[14:18], "little") not in _BMP_DIB_SIZES:
            return "a BMP signature without a BMP header after it"
        declared = int.from_bytes(head[2:6], "little")
        return f"a BMP cut short ({size} of {declared} bytes)" if size < declared else None
    if kind == "WebP":
        chunk, length = head[12:16], int.from_bytes(head[16:20], "little")
        # a lossy frame starts with its start code, a lossless one with its signature byte
        if (chunk not in (b"VP8 ", b"VP8L", b"VP8X") or length == 0
                or (chunk == b"VP8 " and head[23:26] != b"\x9d\x01\x2a") or (chunk == b"VP8L" and head[20] != 0x2F)):
            return "a WebP signature without a WebP image after it"
        declared = max(int.from_bytes(head[4:8], "little") + 8, 20 + length)
        return f"a WebP cut short ({size} of {declared} bytes)" if size < declared else None
    if kind == "TIFF":
        order = "little" if head[:2] == b"II" else "big"
        big = head[2:4] in (b"+\x00", b"\x00+")  # BigTIFF: 8-byte offsets, the first at byte 8
        first = int.from_bytes(head[8:16] if big else head[4:8], order)
        return None if (16 if big else 8) <= first < size else "a TIFF whose first image directory is not in the file"
    if kind == "PNM" and head[1:2] in b"456":  # binary: the header's numbers give the pixel bytes
        declared = _pnm_size(pread(min(size, 512), 0))
        return f"a PNM image cut short ({size} of {declared} bytes)" if declared and size < declared else None
    return None  # JPEG 2000, ASCII PNM: the signature is all this reads


def _pnm_size(start: bytes) -> int | None:
    """The size a binary PNM (P4 bitmap, P5 gray, P6 colour) must have, from its header
    (comments skipped), or None when the header does not parse."""
    fields, i, kind = [], 2, start[1:2]
    wanted = 2 if kind == b"4" else 3  # width, height (and maxval)
    while len(fields) < wanted and i < len(start):
        c = start[i:i + 1]
        if c == b"#":
            nl = start.find(b"\n", i)
            if nl < 0:
                return None
            i = nl + 1
        elif c.isspace():
            i += 1
        else:
            j = i
            while j < len(start) and start[j:j + 1].isdigit():
                j += 1
            if j == i:
                return None
            fields.append(int(start[i:j]))
            i = j
    if len(fields) < wanted or i >= len(start):
        return None
    i += 1  # the single whitespace byte before the pixels
    w, h = fields[0], fields[1]
    if kind == b"4":
        return i + (w + 7) // 8 * h
    return i + w * h * (3 if kind == b"6" else 1) * (2 if fields[2] > 255 else 1)


def _what(head: bytes) -> str:
    if not head:
        return "an empty file"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "a GIF image"
    return f"no JPEG, PNG, BMP, TIFF, JPEG 2000, WebP or PNM header (it starts with {head[:8]!r})"


def _undecodable(fd: int, size: int, base: int = 0) -> str | None:
    """Why the ``size`` bytes of ``fd`` from ``base`` (a file, or a member of a tar shard)
    are no image DALI decodes, by :func:`header_kind` and :func:`cut_short`; None if they are."""
    head = os.pread(fd, min(HEAD_BYTES, size), base)
    kind = header_kind(head)
    why = cut_short(fd, kind, head, size, base) if kind else _what(head)
    return why + ", which DALI cannot decode" if why else None


def _first_bad(paths: list[tuple[int, str]]) -> tuple[int, str, str] | None:
    """``(place, path, why)`` of the first of ``paths`` (``(place, path)`` pairs) that cannot
    be read or holds no image DALI decodes (:func:`_undecodable`)."""
    for place, path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                why = _undecodable(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        except OSError as e:
            why = f"cannot be read ({e.strerror or e})"
        if why:
            return place, path, why
    return None


def _first_bad_at(root: str, files: list, threads: int | None, per_task: int,
                  progress: Callable[[int], None] | None, places: range | None = None) -> tuple[int, str, str] | None:
    """``(place, path, why)`` of the first file :func:`_first_bad` names, or None; ``place``:
    its entry of ``places`` (default: its index in ``files``). ``progress(n)`` after each
    task of ``n`` files found clean."""
    places = places if places is not None else range(len(files))
    tasks = [list(zip(places[i:i + per_task], (os.path.join(root, f) for f in files[i:i + per_task])))
             for i in range(0, len(files), per_task)]
    return _in_tasks(_first_bad, tasks, threads, progress)


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
    bad = _first_bad_at(root, list(files), threads, per_task, None)
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
    if _key(source) in _CHECKED:
        return
    _raise_first(source, _first_bad_in(source, 0, 1, show=False))
    _CHECKED.add(_key(source))


def check_training_files(source, rank: int = 0, world_size: int = 1, gather=None, show: bool = False) -> None:
    """:func:`check_headers` for a training set, its files (or its shards' samples) split
    between the ranks: rank ``r`` reads every ``world_size``-th from the ``r``-th (1.28 M
    files on 8 ranks: 160 k each), since every rank's reader goes through the whole set over
    the epochs.

    ``gather``: a collective that returns every rank's finding from this rank's (torch's
    ``all_gather_object``), so that every rank raises the same error, naming the first
    damaged file of the whole list; without it (a loader built by another project's trainer,
    which may build it on some ranks only) a rank raises for its own share, and the other
    ranks' shares are checked by their own loaders. ``show``: a progress bar (rank 0 of a
    set large enough to take a while). Once per source, rank and process.
    """
    key = (_key(source), rank, world_size)
    found = None
    if key[0] not in _CHECKED and key not in _CHECKED:  # read before: with a gather, still take part
        try:
            found = _first_bad_in(source, rank, world_size, show)
        except Exception as e:  # noqa: BLE001 - a rank that raised alone would leave the others in the gather
            if gather is None:
                raise
            found = (-1, source.root, f"the check of rank {rank}'s share failed ({type(e).__name__}: {e})")
    found = [f for f in (gather(found) if gather else [found]) if f]
    _raise_first(source, min(found) if found else None)
    # every rank read its share and none found a damaged file: the whole set is checked (the
    # kNN monitor's evaluation loader over the training set reads nothing again)
    _CHECKED.add(key[0] if gather else key)


def _first_bad_in(source, rank: int, world_size: int, show: bool) -> tuple[int, str, str] | None:
    """``(place, where, why)`` of the first damaged sample of this rank's share of ``source``:
    ``place`` its number in the whole set, ``where`` its path (``tar:offset:member`` in a
    shard)."""
    if source.kind == "wds":
        mine = _image_members(source, rank, world_size)
        with tqdm(total=len(mine), desc="checking the shards' images", unit="image", dynamic_ncols=True,
                  disable=not show) as bar:
            return _in_tasks(_first_bad_member, [mine[i:i + 1024] for i in range(0, len(mine), 1024)], None,
                             bar.update)
    mine = list(source.files[rank::world_size])
    with tqdm(total=len(mine), desc="checking the image files", unit="file", dynamic_ncols=True,
              disable=not show) as bar:
        return _first_bad_at(source.root, mine, None, 1024, bar.update,
                             places=range(rank, source.num_samples, world_size))


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
    holds no image DALI decodes (:func:`_undecodable`)."""
    fds: dict[str, tuple[int, int]] = {}  # tar -> (fd, size)
    try:
        for place, tar, offset, size, name in members:
            try:
                if tar not in fds:
                    fd = os.open(tar, os.O_RDONLY)
                    fds[tar] = fd, os.fstat(fd).st_size
                fd, tar_size = fds[tar]
                why = (_undecodable(fd, size, offset) if offset + size <= tar_size else
                       f"its index places it past the end of the shard (byte {offset + size} of {tar_size})")
            except OSError as e:
                why = f"cannot be read ({e.strerror or e})"
            if why:
                return place, f"{tar}:{offset}:{name}", why  # as DALI names a sample of a shard
    finally:
        for fd, _ in fds.values():
            os.close(fd)
    return None
