"""``mscn data index FOLDER``: (re)write the DALI index of every ``.tar`` shard in a folder.

DALI's webdataset reader needs a ``.idx`` beside each shard (:mod:`mscn.data.shardindex`
has the format and the start check that refuses an index which no longer fits its shard).
DALI ships ``wds2idx`` to make them, but it places the data of members with names over
100 bytes (GNU tar's long-name headers) 1,024 bytes early, so the reader would hand the
decoder header bytes. This command indexes with Python's ``tarfile``, which reads every
header format (ustar, GNU, pax), and is what mscn's messages advise for shards it did not
pack itself: webdataset shards of another project, or shards appended to or rewritten.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

from tqdm import tqdm

from mscn.data.imagefolder import TAR_IMAGE_EXTS
from mscn.data.shardindex import dali_index_members, dali_index_text, index_entries
from mscn.data.source import PACKING

Members = list[list[tuple[str, int, int, str]]]  # per sample: (ext, data offset, size, name)
from mscn.errors import DataError
from mscn.paths import write_atomic


def checked_members(tar: Path) -> Members:
    """The members of ``tar`` as DALI's index lists them; one DataError line for a shard that
    cannot be indexed, or that the reader would stop on."""
    try:
        members = dali_index_members(tar)
    except (tarfile.TarError, EOFError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{tar}: not a readable plain tar ({why}; DALI reads uncompressed .tar only); copy it "
                        "again, or repack its source with `mscn data pack`") from None
    if not members:
        raise DataError(f"{tar}: holds no sample (no regular file), so DALI would fail on it; remove it")
    spaced = next((name for sample in members for *_, name in sample if any(c.isspace() for c in name)), None)
    if spaced is not None:  # the index separates its fields by whitespace: such a name cannot be written
        raise DataError(f"{tar}: member {spaced!r} has whitespace in its name, which DALI's index cannot hold; "
                        "rename it, or repack the source with `mscn data pack` (it names members by number)")
    _check_members(tar, members)
    end = max(offset + size for sample in members for _, offset, size, _ in sample)
    if end > tar.stat().st_size:  # tarfile lists a last member whose data was cut off
        raise DataError(f"{tar}: cut short ({tar.stat().st_size} bytes; its members run to byte {end}); copy it "
                        "again, or repack its source with `mscn data pack`")
    return members


def _check_members(tar: Path, samples: Members) -> None:
    """Every sample holds what mscn's reader will ask every sample for: an image, and the
    ``.cls`` and ``.idx`` when the first sample has them (the reader decides from the first
    sample, pipelines/readers.py). One without them (a member appended away from its sample,
    a lost ``.cls``) would stop the reader mid-epoch with DALI's "Underful sample"; other
    members (``.json``, ...) are optional."""
    def kinds(sample) -> set[str]:
        return {"an image" if ext.lower() in TAR_IMAGE_EXTS else f".{ext.lower()}" for ext, *_ in sample}

    want = {"an image"} | (kinds(samples[0]) & {".cls", ".idx"})
    for sample in samples:
        lack = want - kinds(sample)
        if lack:
            name = sample[0][3]
            key = name.rsplit("/", 1)[-1].partition(".")[0]
            raise DataError(f"{tar}: sample '{key}' ({name}) lacks {' and '.join(sorted(lack))}, unlike the shard's "
                            "first sample; a sample's members must stand together in the tar, as webdataset writes "
                            "them: repack the source with `mscn data pack`")


def several_images(samples: Members) -> list[str]:
    """The keys of the samples that hold more than one image member (``x.jpg`` and ``x.png``):
    DALI decodes one of them, printing "Multiple components matching output 0"."""
    return [sample[0][3].rsplit("/", 1)[-1].partition(".")[0] for sample in samples
            if sum(ext.lower() in TAR_IMAGE_EXTS for ext, *_ in sample) > 1]


def index_folder(folder: str | Path, check: bool = False, progress: bool = True) -> dict[str, list[str]]:
    """Index every ``*.tar`` of ``folder`` (or the one ``.tar`` given). Returns the shards by what
    was found: ``ok`` (the index fits), ``written`` (made or remade), and with ``check`` (write
    nothing) ``stale`` and ``missing``; ``several_images``: {shard: keys of samples with more than
    one image}. Every shard is read before any index is written, so a
    bad shard leaves every index as it was."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".tar":
        tars = [folder]
    elif folder.is_dir():
        if (folder / PACKING).exists() or any(folder.glob("*.tar.tmp")):
            raise DataError(f"{folder}: an `mscn data pack` that did not finish is writing here; rerun the pack "
                            "rather than index its part-written shards")
        tars = sorted(folder.glob("*.tar"))
        if not tars:
            raise DataError(f"{folder}: no .tar shards to index")
    else:
        raise DataError(f"{folder}: no such folder of .tar shards" if not folder.exists()
                        else f"{folder}: neither a folder of .tar shards nor a .tar file")
    shards = {}
    for tar in tqdm(tars, desc=f"index {folder}", unit="shard", disable=not progress or len(tars) < 2):
        shards[tar] = checked_members(tar)
    found: dict = {"ok": [], "written": [], "stale": [], "missing": [], "several_images": {}}
    for tar, members in shards.items():
        text = dali_index_text(index_entries(members))
        several = several_images(members)
        if several:
            found["several_images"][str(tar)] = several
        idx = tar.with_suffix(".idx")
        try:
            old = idx.read_text(encoding="utf-8", errors="surrogateescape") if idx.is_file() else None
        except OSError:
            old = None
        if old is not None and old.split() == text.split():
            found["ok"].append(str(tar))
        elif check:
            found["missing" if old is None else "stale"].append(str(tar))
        else:
            try:  # a stop mid-write leaves the old index, not half of a new one
                write_atomic(idx, text, errors="surrogateescape")
            except OSError as e:
                raise DataError(f"{idx}: cannot write the index ({e.strerror})") from None
            found["written"].append(str(tar))
    return found


def index_command(args) -> int:
    """CLI body of ``mscn data index FOLDER [--check]``; exit status 1 when ``--check`` finds a
    shard whose index is missing or does not fit."""
    found = index_folder(args.folder, check=args.check)
    for tar, keys in found["several_images"].items():
        print(f"index: note: {tar}: {len(keys)} sample(s) hold more than one image ({keys[0]}"
              f"{', ...' if len(keys) > 1 else ''}); DALI decodes one of each and logs 'Multiple components "
              "matching output 0': keep one image per sample to choose which")
    for what in ("stale", "missing"):
        for tar in found[what]:
            fix = "its index does not fit it" if what == "stale" else "it has no index"
            print(f"index: {tar}: {fix}")
    shards = sum(len(found[k]) for k in ("ok", "written", "stale", "missing"))
    if args.check:
        bad = len(found["stale"]) + len(found["missing"])
        print(f"index: {shards - bad} of {shards} shard(s) have an index that fits"
              + (f"; write the others with `mscn data index {args.folder}`" if bad else ""))
        return 1 if bad else 0
    print(f"index: wrote {len(found['written'])} of {shards} shard index(es) in {args.folder}; "
          f"{len(found['ok'])} already fit")
    return 0
