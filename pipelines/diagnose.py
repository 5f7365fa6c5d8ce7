"""Turn a DALI failure into one DataError line that names the bad file.

DALI's decoder reports a corrupt JPEG as ``nvImageCodec failure: '#3'``, without the
file. The failing batch never leaves the pipeline, but the reader's order is fixed
by its seed: we rebuild the reader alone (no decoding; the file reader memory-maps,
so this reads little), replay it up to the batches that were in flight when DALI
failed, and decode those samples with PIL, as ``mscn data scan`` does. The first file
PIL cannot decode is named; otherwise the message points to ``mscn data scan``.
"""
from __future__ import annotations

import io
import os
import re

import numpy as np
from nvidia.dali import fn, pipeline_def
from PIL import Image, UnidentifiedImageError

from mscn.data.filecheck import WDS_FIX
from mscn.data.imagefolder import DALI_FORMATS
from mscn.errors import DataError, MscnError
from mscn.data.imagefolder import TAR_IMAGE_EXTS
from mscn.pipelines.readers import Source, read

MAX_REPLAY_BATCHES = 20_000  # beyond this the replay costs more than a scan would


@pipeline_def
def _reader_only(source: Source, shard_id, num_shards, shuffle, shuffle_buffer, stick_to_shard, reader_seed,
                 even_shards):
    encoded, _, _ = read(source, shard_id=shard_id, num_shards=num_shards, shuffle=shuffle,
                         shuffle_buffer=shuffle_buffer, stick_to_shard=stick_to_shard, seed=reader_seed,
                         even_shards=even_shards)
    return encoded, fn.get_property(encoded, key="source_info")


def _reason(err: Exception) -> str:
    """The informative line of a DALI error (after 'encountered:'), else its last line."""
    text = str(err)
    m = re.search(r"encountered:\s*\n\s*(.+)", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "no longer valid" not in ln]
    line = m.group(1).strip() if m else (lines[-1] if lines else type(err).__name__)
    return line if len(line) <= 300 else line[:300].rsplit(" ", 1)[0] + " ..."


def _undecodable(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt = img.format
    except UnidentifiedImageError:  # its text names the in-memory buffer, not the file
        return "PIL cannot identify it as an image" if data else "an empty file"
    except Exception as e:  # noqa: BLE001 - any PIL failure means DALI's failure is explained
        return str(e) or type(e).__name__
    if fmt not in DALI_FORMATS:  # PIL reads it, DALI has no decoder for it
        return f"a {fmt} image, which DALI cannot decode (convert it to JPEG or PNG)"
    return None


def _stale_index(path: str) -> str | None:
    """When the shard of an undecodable sample (``... (packed as TAR:offset:member)`` or
    ``TAR:offset:member``) no longer matches its ``.idx`` (rewritten or appended to after
    indexing), the message to give instead of blaming the sample; else None."""
    from mscn.data.shardindex import stale_note

    found = re.search(r"(\S+\.tar):\d+:[^)]*\)?$", path)
    return stale_note(found.group(1)) if found else None


def _underful(reason: str, source: Source) -> str | None:
    """DALI's "Underful sample detected at index file at "X.idx" line N" (a sample without
    a member the reader asks for) -> the sample's key and the members it lacks."""
    from mscn.data.shardindex import sample_members

    m = re.search(r'Underful sample detected at index file at "([^"]+)" line (\d+)', reason)
    if not m:
        return None
    try:
        key, exts = sample_members(m.group(1), int(m.group(2)))
    except (OSError, ValueError, IndexError):
        return None
    images = set(TAR_IMAGE_EXTS)
    lack = ([] if images & {e.lower() for e in exts} else ["image"]) + [
        f".{e}" for e in (["cls"] if source.labelled else []) + (["idx"] if source.has_index else []) if e not in exts]
    tar = os.path.splitext(m.group(1))[0] + ".tar"
    return (f"{tar}: sample '{key}' has no {' or '.join(lack or ['member the reader needs'])} (it has "
            f"{', '.join('.' + e for e in exts)}), unlike the dataset's first sample; every sample needs the same "
            f"members: repack the source with `mscn data pack`, or remove the sample and make the index again "
            f"(`mscn data index {os.path.dirname(tar) or '.'}`)")


def find_bad_sample(source: Source, replay, runs_done: int) -> tuple[str, str] | None:
    """(source_info, PIL's complaint) of the first undecodable sample among the batches
    that were in flight after ``runs_done`` batches, or None."""
    from mscn.data.pack import packed_origin  # tar samples: named by the file they were packed from

    # DALI runs `prefetch` batches ahead, and DROP skips one padded batch per epoch
    per_epoch = max(1, -(-source.num_samples // replay.num_shards) // replay.batch_size)
    last = runs_done + replay.prefetch + 2 + runs_done // per_epoch
    if last > MAX_REPLAY_BATCHES:
        return None
    pipe = _reader_only(source, replay.shard_id, replay.num_shards, replay.shuffle, replay.shuffle_buffer,
                        replay.stick_to_shard, replay.reader_seed, replay.even_shards, batch_size=replay.batch_size,
                        num_threads=1, device_id=None, prefetch_queue_depth=1)
    pipe.build()
    for run in range(last + 1):
        encoded, info = pipe.run()
        if run < runs_done - 1:
            continue
        for i in range(len(encoded)):
            why = _undecodable(np.array(encoded[i]).tobytes())
            if why:
                where = np.array(info[i]).tobytes().decode(errors="replace")
                # file readers report the path relative to file_root; tars "tar:offset:member"
                return (packed_origin(where) if source.kind == "wds" else os.path.join(source.root, where)), why
    return None


# operators that parse the encoded image besides the decoders: a corrupt file fails here first
# when they run before the decoder (peek_image_shape on the CPU ahead of a GPU decode)
READS_IMAGES = ("peek_image_shape", "image_decoder", "image_decoder_crop", "image_decoder_random_crop",
                "image_decoder_slice")


def _not_the_data(err: Exception, reason: str) -> MscnError | None:
    """A DALI failure that no file can cause: an operator other than a reader or a decoder
    refused its arguments (a mean of two values, an even window, an empty crop range), or a
    GPU pipeline was built without CUDA. Advice to scan the data would send the user the
    wrong way."""
    text = str(err)
    if "CUDA is not available" in text:
        return MscnError(f"DALI: a GPU pipeline on a machine without CUDA ({reason}); build it with "
                         "device='cpu' and device_id=None, or pass device=None to the mscn.pipelines loader "
                         "builders, for the CPU path")
    op = re.search(r"operator `nvidia\.dali\.fn\.([\w.]+)`", text)
    if op is None or op.group(1) in READS_IMAGES or op.group(1).split(".")[0] in ("readers", "decoders",
                                                                                  "experimental"):
        return None
    return MscnError(f"DALI's fn.{op.group(1)} refused the pipeline's arguments ({reason}): a setting of the pipeline "
                     "(its view or high-pass parameters), not the data")


def _file_the_reader_names(reason: str) -> tuple[str, str] | None:
    """(path, what is wrong) when DALI's file reader names the file it could not map or
    open: an empty file ("File mapping failed") or one it may not read. None otherwise."""
    m = re.search(r"(?:File mapping failed|Could not open file|Failed to open file):?\s*(.+?)\s*$", reason)
    if not m or not os.path.isfile(m.group(1)):
        return None
    path = m.group(1)
    try:
        if os.path.getsize(path) == 0:
            return path, "an empty file"
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return path, f"cannot be read ({e.strerror or e})"
    return None


def explain(err: Exception, source: Source, replay, runs_done: int) -> MscnError:
    """A one-line error for a DALI runtime failure while reading ``source``: a DataError
    naming the file when the data is at fault."""
    reason = _reason(err)
    setting = _not_the_data(err, reason)
    if setting:
        return setting
    if source.kind == "wds":  # scan reads ImageFolders, not tar shards
        fix = WDS_FIX
    elif source.kind == "filelist":  # a list of its own (a fine-tuning subset): draw it from the scan's
        fix = (f"run `mscn data scan {source.root}` and use the file list it writes (a labelled subset: "
               "`mscn data subset` of that list)")
    else:
        fix = f"run `mscn data scan {source.root}` and use the file list it writes instead of the folder"
    named = _file_the_reader_names(reason)
    if named:  # the reader could not open or map it: an empty or unreadable file, said as such
        return DataError(f"{named[0]}: {named[1]} (DALI: {reason}); {fix}")
    underful = _underful(reason, source) if source.kind == "wds" else None
    if underful:
        return DataError(underful)
    found = None
    try:
        if replay is not None:
            found = find_bad_sample(source, replay, runs_done)
        elif source.kind != "wds":
            # a DaliLoader built by hand has no replay of its reader: the file whose header no
            # decoder takes (a text file named .jpg) can still be found, 16 bytes a file
            # (200k files: 0.7 s); damage inside a JPEG's data cannot
            from mscn.data.filecheck import first_undecodable

            found = first_undecodable(source.root, source.files)
    except Exception:  # noqa: BLE001 - the diagnosis must never hide the original error
        found = None
    if found:
        path, why = found
        stale = _stale_index(path) if source.kind == "wds" else None
        if stale:  # the bytes read were not the sample's: the file named is likely healthy
            return DataError(stale)
        return DataError(f"{path}: cannot be decoded ({why}; DALI: {reason}); {fix}")
    unnamed = "" if replay is not None else (
        " (a DaliLoader built without a replay cannot name the file; build_train_loader's can)")
    return DataError(f"{source.root}: DALI failed while reading the dataset ({reason}){unnamed}; {fix}")
