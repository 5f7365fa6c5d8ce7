"""`mscn data pack ROOT OUT`: an ImageFolder (or file list) -> WebDataset tar shards.

Large clusters read a few big files faster than millions of small ones. Each shard
``OUT/shard-000000.tar`` holds ``shard_size`` samples, each made of

- ``{key}.{ext}``: the original image bytes, under the image's own extension;
- ``{key}.cls``: the label, ASCII decimal (sorted class order, like ImageFolder);
- ``{key}.idx``: the sample's canonical index (its position in the ImageFolder
  listing or file list), ASCII decimal, so tar and file readers name samples alike.

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

import io
import tarfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mscn.data.scan import check_outside
from mscn.data.source import resolve_source  # the one definition of the canonical order
from mscn.errors import DataError

SHARD_PATTERN = "shard-{:06d}.tar"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: same input, same bytes
    tar.addfile(info, io.BytesIO(data))


def write_dali_index(tar_path: Path, idx_path: Path) -> int:
    """Write DALI's v1.2 index of ``tar_path``; returns the number of samples."""
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")  # DALI: the extension starts at the first dot
            if key != last_key:
                samples.append([])
                last_key = key
            samples[-1].append(f"{ext} {m.offset_data} {m.size} {m.name}")
    tmp = idx_path.with_name(idx_path.name + ".tmp")
    tmp.write_text(f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples))
    tmp.replace(idx_path)
    return len(samples)


def pack(root, out, shard_size: int = 1000, shuffle_seed: int | None = 0, file_root: str | None = None,
         progress: bool = True) -> dict:
    """Pack ``root`` (ImageFolder root or ``relpath label`` list) into tar shards in ``out``.

    Returns a summary: number of samples and shards, output folder and seconds.
    """
    if shard_size < 1:
        raise DataError(f"--shard-size {shard_size}: must be >= 1")
    source = resolve_source(str(root), "auto", file_root=file_root)
    if source.kind == "wds":
        raise DataError(f"{root}: already a folder of .tar shards; pack an ImageFolder root or a file list")
    out = Path(out)
    check_outside(out, Path(source.root))  # shards inside an ImageFolder would become a class
    if out.exists() and any(out.glob("*.tar")):
        raise DataError(f"{out}: already holds .tar shards; remove them or pack into another folder")
    out.mkdir(parents=True, exist_ok=True)
    order = np.arange(source.num_samples)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(source.num_samples)
    t0, num_shards = time.time(), 0
    bar = tqdm(total=source.num_samples, desc=f"pack {root}", unit="img", disable=not progress)
    for start in range(0, source.num_samples, shard_size):
        tar_path = out / SHARD_PATTERN.format(num_shards)
        tmp = tar_path.with_name(tar_path.name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for pos in range(start, min(start + shard_size, source.num_samples)):
                index = int(order[pos])
                rel = source.files[index]
                ext = Path(rel).suffix.lstrip(".") or "jpg"
                key = f"{pos:09d}"
                _add(tar, f"{key}.{ext}", (Path(source.root) / rel).read_bytes())
                _add(tar, f"{key}.cls", str(source.labels[index]).encode())
                _add(tar, f"{key}.idx", str(index).encode())
                bar.update()
        tmp.replace(tar_path)  # a crash never leaves a half shard under the final name
        write_dali_index(tar_path, tar_path.with_suffix(".idx"))
        num_shards += 1
    bar.close()
    return {"root": str(root), "out": str(out), "num_samples": source.num_samples,
            "num_shards": num_shards, "seconds": round(time.time() - t0, 2)}


def pack_command(args) -> None:
    """CLI body of ``mscn data pack ROOT OUT --shard-size N``."""
    s = pack(args.root, args.out, args.shard_size)
    print(f"pack: {s['num_samples']} images -> {s['num_shards']} shards of <= {args.shard_size} "
          f"in {s['out']} ({s['seconds']} s)")
