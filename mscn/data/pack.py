"""`mscn data pack ROOT OUT`: an ImageFolder, flat folder or file list -> WebDataset tar shards.

Large clusters read a few big files faster than millions of small ones. Each shard
``OUT/shard-000000.tar`` holds ``shard_size`` samples, each made of

- ``{key}.{ext}``: the original image bytes, under the image's own extension;
- ``{key}.cls``: the label, ASCII decimal (sorted class order, like ImageFolder);
  left out for unlabelled data (a flat folder or a list without labels);
- ``{key}.idx``: the sample's canonical index (its position among the packed files
  of the ImageFolder listing or file list), ASCII decimal.

Every file is decoded once with PIL first (as ``mscn data scan`` does): files that do
not decode are skipped and listed (``strict=True`` refuses instead), so training
never meets them. From a scan's file list, the files that scan kept and nothing has
touched since are not decoded again (:func:`checked_by_scan`). ``OUT/sources.json`` records the root, the classes and the source
path of every canonical index (``files``), plus the skipped files: a decode error
from a shard names the original file through it (pipelines/diagnose.py).

Beside each shard, ``shard-000000.idx`` is its DALI index (format ``v1.2``, as DALI's
``wds2idx`` writes: a ``v1.2 <samples>`` line, then one line per sample of
``<ext> <data offset> <size> <member name>`` per member), so DALI's webdataset reader
starts without scanning the archives.

Order: DALI's tar reader reads the archives in order and shuffles only within its
buffer (``data.shuffle_buffer`` samples), unlike the file reader, which shuffles its
whole list first. Samples are therefore written in a seeded random permutation of
the canonical order (``shuffle_seed``; None keeps the canonical order, the file
reader's unshuffled order). Keys are the position in the written order.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mscn.data.imagefolder import parallel_imap
from mscn.data.scan import EXCLUDED, check_image, check_outside
from mscn.data.shardindex import write_dali_index
from mscn.data.source import PACKING, SOURCES_JSON, Source, resolve_source  # the one definition of the canonical order
from mscn.errors import DataError
from mscn.paths import write_atomic

SHARD_PATTERN = "shard-{:06d}.tar"
PACK_LOCK = ".pack.lock"  # held by the pack writing a folder (_pack_lock)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: same input, same bytes
    tar.addfile(info, io.BytesIO(data))


def _decode_task(path: str) -> tuple[str, str | None]:
    issues, _ = check_image(path, 0)
    bad = next((f"{reason}: {detail}" for reason, detail in issues if reason in EXCLUDED), None)
    return path, bad


# seconds of slack on the file times: a file system that keeps whole (or even) seconds
# could date a change made just after the scan started before it
TIME_SLACK_S = 2.0


def checked_by_scan(list_path, source: Source) -> set[str]:
    """The files of ``source`` (read from the file list ``list_path``) that the scan which
    wrote that list decoded and kept, untouched since it started (modification and change
    time, with :data:`TIME_SLACK_S` of slack): a pack need not decode them again. Empty
    without the scan's report beside the list, or from a scan before ``scanned_at`` existed.
    A file the scan excluded stays out even when a hand-edited list names it again."""
    from mscn.data.scan import report_path_for
    from mscn.data.source import list_root

    report = report_path_for(list_path)
    try:
        data = json.loads(report.read_text())
        at = float(data["scanned_at"])
        excluded = {i["path"] for i in data.get("issues", []) if i.get("excluded")}
        same_root = Path(list_root(Path(list_path), None)[0]).resolve() == Path(source.root).resolve()
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DataError):
        return set()
    if not same_root:
        return set()
    trusted = set()
    for rel in source.files:
        if rel in excluded:
            continue
        try:
            st = os.stat(Path(source.root) / rel)
        except OSError:
            continue
        if max(st.st_mtime, st.st_ctime) < at - TIME_SLACK_S:
            trusted.add(rel)
    return trusted


def undecodable(source: Source, workers: int | None = None, progress: bool = True,
                trusted: set[str] = frozenset()) -> dict[str, str]:
    """``{relpath: why}`` of the files of ``source`` that PIL cannot decode, over all cores;
    the ``trusted`` ones (:func:`checked_by_scan`) are not decoded again."""
    root = Path(source.root)
    found = dict(parallel_imap(_decode_task, [str(root / rel) for rel in source.files if rel not in trusted],
                               workers, f"check {root}", progress))
    # in the source's order, not the order the workers finished in: sources.json is the same
    # whatever the workers did, and a resumed pack's is an uninterrupted one's
    return {rel: found[str(root / rel)] for rel in source.files if found.get(str(root / rel))}


def pack(root, out, shard_size: int = 1000, shuffle_seed: int | None = 0, file_root: str | None = None,
         progress: bool = True, strict: bool = False, workers: int | None = None) -> dict:
    """Pack ``root`` (ImageFolder root, flat folder of images, or file list) into tar shards in ``out``.

    Files that do not decode are skipped (``strict``: a DataError naming them instead).
    Returns a summary: samples, shards, skipped files ``{relpath: why}``, output folder, seconds.
    """
    if shard_size < 1:
        raise DataError(f"--shard-size {shard_size}: must be >= 1")
    source = resolve_source(str(root), "auto", file_root=file_root, what="the dataset to pack")
    if source.kind == "wds":
        raise DataError(f"{root}: already a folder of .tar shards; pack an ImageFolder root or a file list")
    out = Path(out)
    check_outside(out, Path(source.root))  # shards inside an ImageFolder would become a class
    if out.exists() and not out.is_dir():  # before the decode check, not after it
        raise DataError(f"{out}: a file; pack takes a folder for the shards")
    plan = {"root": str(Path(source.root).resolve()), "source": source.digest(), "shard_size": shard_size,
            "shuffle_seed": shuffle_seed, "strict": strict}
    with _pack_lock(out):
        return _pack(source, root, out, plan, progress, workers)


@contextlib.contextmanager
def _pack_lock(out: Path):
    """Hold ``out/.pack.lock`` while packing: a second pack into the same folder, started
    while the first runs, would take its .packing as a stopped pack to go on from, and both
    would write the same shards. The kernel drops the lock when the process ends."""
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / PACK_LOCK, "a+")
    except OSError as e:
        raise DataError(f"{out}: cannot write the pack there ({e.strerror})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise DataError(f"{out}: another mscn data pack is writing there now ({holder}); wait for it to end, or "
                        "pack into another folder") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    try:
        yield
    finally:
        # the lock file stays (deleting it while locked lets two later packs lock two files),
        # but a folder this pack made and left otherwise empty (refused before a shard) goes
        if made and [p.name for p in out.iterdir()] == [PACK_LOCK]:
            (out / PACK_LOCK).unlink()
            f.close()
            out.rmdir()
        else:
            f.close()


def _pack(source: Source, root, out: Path, plan: dict, progress: bool, workers: int | None) -> dict:
    shard_size, shuffle_seed, strict = plan["shard_size"], plan["shuffle_seed"], plan["strict"]
    resumed = _unfinished(out, plan)
    if resumed is None and out.exists() and any(out.glob("*.tar")):
        raise DataError(f"{out}: already holds .tar shards; remove them or pack into another folder")
    t0 = time.time()
    if resumed is None:
        trusted = checked_by_scan(root, source) if source.kind == "filelist" else set()
        if trusted and progress:
            print(f"pack: {len(trusted)} of {source.num_samples} files were decoded by the scan that wrote {root} "
                  "and have not changed since: not decoded again", flush=True)
        skipped = undecodable(source, workers, progress, trusted)
        if skipped and strict:
            rel, why = next(iter(skipped.items()))
            raise DataError(f"{Path(source.root) / rel}: does not decode ({why}); {len(skipped)} such file(s) in "
                            f"{root}; drop --strict to skip them, or fix them")
    else:  # the decode check of the run that was stopped: the same files, so the same verdicts
        skipped = resumed["skipped"]
    # canonical order of the packed set: the decodable files, in the source's order
    keep = [i for i, rel in enumerate(source.files) if rel not in skipped]
    files, labels = [source.files[i] for i in keep], [source.labels[i] for i in keep]
    if not files:
        raise DataError(f"{root}: none of its {source.num_samples} files decodes; nothing to pack")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # present until sources.json is written: shards of a pack killed part-way are refused by
        # the readers (mscn.data.source), not trained on as if they were the whole set; it holds
        # what a rerun needs to go on from the shards already written (_unfinished)
        write_atomic(out / PACKING, json.dumps({**plan, "skipped": skipped, "command": f"mscn data pack {root} {out}",
                                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    except OSError as e:
        raise DataError(f"{out}: cannot write the pack there ({e.strerror})") from None
    order = np.arange(len(files))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(files))
    done = resumed["shards"] if resumed else 0
    num_shards = done
    bar = tqdm(total=len(files), initial=min(len(files), done * shard_size), desc=f"pack {root}", unit="img",
               disable=not progress)
    for start in range(done * shard_size, len(files), shard_size):
        tar_path = out / SHARD_PATTERN.format(num_shards)
        tmp = tar_path.with_name(tar_path.name + ".tmp")
        try:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for pos in range(start, min(start + shard_size, len(files))):
                    index = int(order[pos])
                    rel = files[index]
                    ext = Path(rel).suffix.lstrip(".") or "jpg"
                    key = f"{pos:09d}"
                    _add(tar, f"{key}.{ext}", (Path(source.root) / rel).read_bytes())
                    if source.labelled:  # unlabelled data: no .cls, the readers give label -1
                        _add(tar, f"{key}.cls", str(labels[index]).encode())
                    _add(tar, f"{key}.idx", str(index).encode())
                    bar.update()
            tmp.replace(tar_path)  # a crash never leaves a half shard under the final name
            write_dali_index(tar_path, tar_path.with_suffix(".idx"))  # last: a shard with its index is whole
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.filename and Path(e.filename).is_relative_to(Path(source.root)):
                raise
            raise DataError(f"{tar_path}: cannot write the shard ({e.strerror}); {num_shards} of "
                            f"{-(-len(files) // shard_size)} shards are written: free space, then rerun the same "
                            "command to go on from there") from None
        num_shards += 1
    bar.close()
    meta = {"root": str(Path(source.root).resolve()), "classes": list(source.classes), "files": files,
            "skipped": skipped}
    try:
        write_atomic(out / SOURCES_JSON, json.dumps(meta, indent=1) + "\n")
    except OSError as e:
        raise DataError(f"{out / SOURCES_JSON}: cannot write it ({e.strerror}); free space, then rerun the same "
                        "command (the shards are kept)") from None
    (out / PACKING).unlink()
    return {"root": str(root), "source_root": source.root, "out": str(out), "num_samples": len(files),
            "num_shards": num_shards, "resumed_shards": done,
            "skipped": skipped, "seconds": round(time.time() - t0, 2)}


def _unfinished(out: Path, plan: dict) -> dict | None:
    """The state of an earlier pack into ``out`` that was stopped (its ``.packing``), to go on
    from: ``{"shards": whole shards written, "skipped": its decode check's verdicts}``; None
    when there is none. A pack stopped mid-way took hours on ImageNet: a rerun of the same
    command keeps its whole shards (those with their index) and the decode check. One of
    another source or settings is refused; one from an mscn that kept no plan starts over."""
    marker = out / PACKING
    if not marker.is_file():
        return None
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict) or not isinstance(saved.get("skipped"), dict):
        # an older mscn's marker: nothing to go on from; its shards are removed, the pack starts over
        for p in [*out.glob("shard-*.tar"), *out.glob("shard-*.tar.tmp"), *out.glob("shard-*.idx"), marker]:
            p.unlink(missing_ok=True)
        return None
    differ = [k for k in plan if saved.get(k) != plan[k]]
    if differ:
        what = {"root": "another dataset", "source": "the dataset as it was then (files were added, removed or "
                "renamed since)", "shard_size": "another --shard-size", "shuffle_seed": "another shuffle",
                "strict": "another --strict"}
        raise DataError(f"{out}: holds an unfinished pack of {what[differ[0]]} ({saved.get('command', 'mscn data pack')}, "
                        f"started {saved.get('started', '?')}); rerun that command to finish it, or pack into "
                        "another folder")
    shards = 0
    while (out / SHARD_PATTERN.format(shards)).with_suffix(".idx").is_file():
        shards += 1
    for p in out.glob("shard-*.tar*"):  # anything past the whole shards: half written, written again
        number = p.name.split("-", 1)[1].split(".", 1)[0]
        if number.isdigit() and int(number) >= shards:
            p.unlink(missing_ok=True)
    return {"shards": shards, "skipped": saved["skipped"]}


def packed_origin(where: str) -> str:
    """``tar:offset:member`` -> ``<original file> (packed as tar:offset:member)`` through the
    sample's ``.idx`` and ``sources.json``; unchanged when they are missing."""
    tar, _, member = where.rsplit(":", 2)
    original = source_file(tar, member)
    return f"{original} (packed as {where})" if original else where


def source_file(tar_path: str | Path, member: str) -> str | None:
    """The original file of the tar sample holding ``member`` (``000000009.jpg``), from its
    ``.idx`` member and ``sources.json``; None for shards packed without them."""
    meta_path = Path(tar_path).parent / SOURCES_JSON
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    files = meta.get("files") or []
    key = member.rsplit("/", 1)[-1].partition(".")[0]  # DALI: the extension starts at the first dot
    with tarfile.open(tar_path) as tar:
        try:
            index = int(tar.extractfile(f"{key}.idx").read())
        except (KeyError, ValueError, AttributeError):  # no .idx member: no way back to the file
            return None
    return str(Path(meta["root"]) / files[index]) if 0 <= index < len(files) else None


def pack_command(args) -> None:
    """CLI body of ``mscn data pack ROOT OUT --shard-size N [--strict]``."""
    s = pack(args.root, args.out, args.shard_size, strict=args.strict, workers=args.workers)
    if s["resumed_shards"]:
        print(f"pack: went on from an unfinished pack in {s['out']}: kept its {s['resumed_shards']} whole shard(s) "
              "and its decode check")
    for rel, why in s["skipped"].items():
        print(f"pack: skipped {Path(s['source_root']) / rel}: {why}")
    skipped = f", skipped {len(s['skipped'])} that cannot be used (listed with why in sources.json)" if s["skipped"] else ""
    print(f"pack: {s['num_samples']} images -> {s['num_shards']} shards of <= {args.shard_size} "
          f"in {s['out']} ({s['seconds']} s){skipped}")
