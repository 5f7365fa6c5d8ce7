"""Whether a file's bytes start like an image DALI's decoders read, and end where its image does.

DALI 2.4's CPU decoder, handed a file it cannot decode, raises "Critical error in
pipeline"; when two such samples are decoded at once (two damaged files in one batch, or
one repeated: a shard's last sample pads its last batch, a small set wraps around in a
batch larger than itself) it can segfault instead: the process dies with status 139 and no
message. Measured on the CPU path: 25 JPEGs of which two were cut at 100 and 300 bytes,
evaluation batch 32, crashed 3 runs of 3 (with one of them, DALI raised); a training set of
102 JPEGs with two cut at 100 bytes crashed at batch 64 (and raised at 32 and 96); tar
shards with the same two members likewise. :mod:`mscn.data.filecheck` runs these checks
over a dataset before DALI reads it. :func:`undecodable` reads:

- its first bytes: a JPEG, PNG, BMP, TIFF (or BigTIFF), JPEG 2000, WebP or PNM signature,
  and for PNG, BMP, TIFF and WebP the field after it that a file of zeros past its
  signature lacks; a JPEG's header, segment by segment to its scan (:func:`jpeg_header`,
  as DALI's parser reads it);
- its last bytes: a JPEG with no end-of-image marker after its scan starts, within its last
  64 KiB, is walked whole (:func:`jpeg_ends`: a camera's trailer after the marker is fine,
  a file cut short is not); a PNG without its IEND chunk, a BMP, WebP or binary PNM
  shorter than its header says, is cut short.

Damage inside the image data (bytes overwritten in the middle) is not found: DALI decodes
it with a warning and no failure; nor is a TIFF or JPEG 2000 cut inside its data (DALI
raises on it, naming no file, and the loaders' replay names it). Not in the paper: a guard
of the input pipeline.
"""
from __future__ import annotations

import os
from typing import Callable


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


def undecodable(fd: int, size: int, base: int = 0) -> str | None:
    """Why the ``size`` bytes of ``fd`` from ``base`` (a file, or a member of a tar shard)
    are no image DALI decodes, by :func:`header_kind` and :func:`cut_short`; None if they are."""
    head = os.pread(fd, min(HEAD_BYTES, size), base)
    kind = header_kind(head)
    why = cut_short(fd, kind, head, size, base) if kind else _what(head)
    return why + ", which DALI cannot decode" if why else None
