"""A tar shard and its DALI index (``shard-000000.tar`` + ``shard-000000.idx``).

DALI's webdataset reader trusts the index: it reads each member at the data offset and
size the index gives, and reads nothing the index leaves out. So an index that no longer
describes its shard fails quietly: a shard rewritten after indexing hands the decoder
the wrong bytes, and samples appended after indexing are never read. Format ``v1.2``, as
DALI's ``wds2idx`` writes it: a ``v1.2 <samples>`` line, then one line per sample of
``<ext> <data offset> <size> <member name>`` per member.

Two checks, at two prices:

- :func:`start_fault`, at every run start: the index's first and last line against the
  tar headers they point at, and the block after the last member (a few reads per shard,
  whatever its size), so a cut-short copy, a rewrite and an append are refused before the
  reader starts;
- :func:`index_matches`, after a decode failure: every member against the index.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

from mscn.paths import write_atomic

BLOCK = 512  # tar's header and padding unit


def dali_index_members(tar_path: Path) -> list[list[tuple[str, int, int, str]]]:
    """Per sample, its members' ``(ext, data offset, size, name)``, in the tar's order."""
    samples: list[list[tuple[str, int, int, str]]] = []
    last_key = None
    with tarfile.open(tar_path, mode="r:") as tar:  # plain tar only: DALI reads no compressed shard
        for m in tar:
            base = m.name.rsplit("/", 1)[-1]
            if not m.isfile() or base.startswith("."):  # as wds2idx: hidden files (.DS_Store) are no members
                continue
            key, _, ext = base.partition(".")  # DALI: the extension starts at the first dot
            if key != last_key:
                samples.append([])
                last_key = key
            samples[-1].append((ext, m.offset_data, m.size, m.name))
    return samples


def index_entries(members: list[list[tuple[str, int, int, str]]]) -> list[list[str]]:
    """:func:`dali_index_members`' samples as the index writes them: ``ext offset size name``."""
    return [[f"{ext} {offset} {size} {name}" for ext, offset, size, name in sample] for sample in members]


def dali_index_samples(tar_path: Path) -> list[list[str]]:
    """Per sample, its members' ``ext offset size name`` entries, in the tar's order."""
    return index_entries(dali_index_members(tar_path))


def dali_index_text(samples: list[list[str]]) -> str:
    """The v1.2 index file of :func:`dali_index_samples`' samples."""
    return f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)


def write_dali_index(tar_path: Path, idx_path: Path) -> int:
    """Write DALI's v1.2 index of ``tar_path``; returns the number of samples."""
    samples = dali_index_samples(tar_path)
    write_atomic(idx_path, dali_index_text(samples))
    return len(samples)


def index_matches(tar_path: str | Path, idx_path: str | Path) -> bool:
    """Whether ``idx_path`` is the index of ``tar_path`` as it is now: every member's
    extension, data offset, size and name (reads every header of the tar)."""
    try:
        have = [ln.split() for ln in Path(idx_path).read_text().splitlines()[1:] if ln.strip()]
        return have == [" ".join(s).split() for s in dali_index_samples(Path(tar_path))]
    except (OSError, tarfile.TarError, UnicodeDecodeError):
        return False


def stale_note(tar: str | Path) -> str | None:
    """:func:`stale_message` for ``tar`` when its ``.idx`` beside it no longer describes it
    (a damaged-looking sample is then the index's fault, not the image's); None when it does,
    or either file is gone."""
    idx = Path(tar).with_suffix(".idx")
    if not Path(tar).is_file() or not idx.is_file() or index_matches(tar, idx):
        return None
    return stale_message(tar, idx)


def stale_message(tar: str | Path, idx: str | Path) -> str:
    """The one line for an index that no longer describes its shard."""
    return (f"{idx}: not the index of {tar} as it is now (the shard was rewritten or appended to after its index "
            f"was made, or DALI's wds2idx indexed member names over 100 bytes), so DALI would read the wrong bytes "
            f"or leave samples out; make it again: `mscn data index {Path(tar).parent}`")


def _members(line: str) -> list[tuple[int, int, str]]:
    """``(offset, size, name)`` of each member of one index line (``ext offset size name`` ...)."""
    f = line.split()
    return [(int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f) - 3, 4)]


def _header_fits(tar, offset: int, size: int, name: str) -> bool:
    """Whether the block before ``offset`` is the tar header of a regular file of ``size``
    bytes named ``name``. Only an ASCII name of at most 99 bytes stands in that header as it
    is: a longer one, or one with other letters ('café.jpg'), travels in an extra header
    before it (pax, GNU), the header itself holding a cut or '?'-replaced form, so then only
    the size is compared."""
    if offset < BLOCK:
        return False
    tar.seek(offset - BLOCK)
    try:  # frombuf checks the header's checksum: a block of image bytes is no header
        info = tarfile.TarInfo.frombuf(tar.read(BLOCK), "utf-8", "surrogateescape")
    except tarfile.TarError:
        return False
    plain = name.isascii() and len(name) <= 99
    return info.isreg() and info.size == size and (info.name == name or not plain)


def _appended(tar, end: int) -> bool:
    """Whether a regular file follows the member that ends at byte ``end`` (an append after
    indexing writes its members over the end-of-archive blocks there)."""
    tar.seek(-(-end // BLOCK) * BLOCK)
    try:
        with tarfile.open(fileobj=tar, mode="r:") as rest:  # starts at the file's position
            # a hidden file (.DS_Store, ._x.jpg) is no sample: wds2idx leaves it out too
            return any(m.isreg() and not m.name.rsplit("/", 1)[-1].startswith(".") for m in rest)
    except tarfile.TarError:  # zero blocks, or trailing bytes that are no tar: nothing DALI would read
        return False


def start_fault(tar: Path, idx: Path, first: str, last: str) -> str | None:
    """The one line naming why ``idx`` cannot be trusted for ``tar``, from its first and last
    sample lines; None when both ends fit. A rewrite that keeps both ends in place (a
    middle image swapped for one of the same padded size) is left to :func:`index_matches`."""
    try:
        head, tail = _members(first), _members(last)
    except (ValueError, IndexError):
        return None  # the reader names a malformed index itself
    if not head or not tail:
        return None
    end = max(o + s for o, s, _ in tail)
    have = tar.stat().st_size
    if end > have:
        return (f"{tar}: {have} bytes, but its index {idx.name} places data up to byte {end}: the shard is cut "
                "short (an interrupted copy?); copy it again, or rerun `mscn data pack`")
    with open(tar, "rb") as f:
        if not all(_header_fits(f, *m) for m in (head[0], tail[-1])):
            return stale_message(tar, idx)
        if _appended(f, end):
            return (f"{tar}: holds samples after the last one its index {idx.name} lists (appended after the index "
                    f"was made?): DALI would leave them out; make the index again: `mscn data index {tar.parent}`")
    return None


def sample_members(idx: str | Path, line: int) -> tuple[str, list[str]]:
    """The key and member extensions of the sample on line ``line`` of ``idx`` (DALI's count:
    the ``v1.2`` line is line 0, so the first sample is line 1)."""
    fields = Path(idx).read_text().splitlines()[line].split()
    names = fields[3::4]
    return names[0].rsplit("/", 1)[-1].partition(".")[0], fields[0::4]


def read_ends(idx: Path) -> tuple[str, str, str]:
    """The ``v1.2 <samples>`` line and the first and last sample lines of ``idx``, reading
    only its head and its last 64 KiB (ImageNet's 1,282 indexes are read at every start)."""
    def text(raw: bytes) -> str:  # member names are UTF-8 (wds2idx, tarfile); never fail on bytes
        return raw.decode("utf-8", "surrogateescape")

    with open(idx, "rb") as f:
        head = text(f.readline())
        first = text(f.readline())
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 65536))
        lines = text(f.read()).split("\n")
    last = next((ln for ln in reversed(lines) if ln.strip()), "")
    return head, first, last
