"""The DALI reader of a :class:`~mscn.data.source.Source`, sharded and shuffled.

``read(source, ...)`` adds the reader to a pipeline. The Source itself (ImageFolder,
file list or WebDataset shards, each sample with its canonical index) is resolved in
pure Python by :func:`mscn.data.source.resolve_source`; both names are re-exported
here and from ``mscn.pipelines``.

Sharding (DALI "Sharding and Shuffling"): ``shard_id`` is the *global* rank,
``num_shards`` the world size; ``pad_last_batch=True`` pads every shard to the same
number of batches (the iterator drops the padding under PARTIAL and the last batch
under DROP), so all ranks run the same number of steps and every sample is read at
most once per epoch across ranks (exactly once under PARTIAL). Training leaves
``stick_to_shard=False``: shard k reads the (k+epoch)-th slice, still a partition of
the dataset in every epoch, and each rank sees all the data over the epochs.
Evaluation sticks to its shard.

Shuffling: ``random_shuffle=True`` makes the file reader shuffle its whole list
once, with a seed fixed inside DALI, so all ranks agree on the partition; then each
rank draws batches at random from a buffer of ``data.shuffle_buffer`` samples
(``initial_fill``) that it refills in read order. The tar reader has no global
shuffle (it reads the archives in order), which is why ``mscn data pack`` writes the
samples in a seeded random order.
"""
from __future__ import annotations

from nvidia.dali import fn

from mscn.data.imagefolder import TAR_IMAGE_EXTS
from mscn.data.source import Source, resolve_source  # noqa: F401  (re-exported: other projects import them here)
from mscn.pipelines.ops import parse_ascii_int

READER_NAME = "Reader"  # the iterators find the reader (epoch size, shards) by this name
# image members of a tar sample; one output, whichever extension the sample has
WDS_IMAGE_EXTS = ";".join(TAR_IMAGE_EXTS)


def read(source: Source, *, shard_id: int, num_shards: int, shuffle: bool, shuffle_buffer: int,
         stick_to_shard: bool, seed: int = -1, name: str = READER_NAME):
    """Add the reader: returns ``(encoded, label, index)``; ``label`` is None for file
    kinds and unlabelled shards (the loader maps index -> label: DALI's file reader carries
    one integer per file and it carries the index), ``index`` is None for tars without ``.idx``.
    ``seed`` fixes the shuffle (-1: drawn from the pipeline's seed); diagnose.py
    replays the reader with it."""
    common = dict(shard_id=shard_id, num_shards=num_shards, random_shuffle=shuffle, initial_fill=shuffle_buffer,
                  pad_last_batch=True, stick_to_shard=stick_to_shard, seed=seed, name=name)
    if source.kind != "wds":
        encoded, index = fn.readers.file(file_root=source.root, files=list(source.files),
                                         labels=list(range(source.num_samples)), **common)
        return encoded, None, index
    # shards without .cls are unlabelled: no label output, the loader maps the index to -1
    exts = [WDS_IMAGE_EXTS] + (["cls"] if source.labelled else []) + (["idx"] if source.has_index else [])
    members = list(fn.readers.webdataset(paths=list(source.tars), index_paths=list(source.indexes), ext=exts,
                                         missing_component_behavior="error",
                                         case_sensitive_extensions=False, **common))
    label = parse_ascii_int(members[exts.index("cls")]) if source.labelled else None
    index = parse_ascii_int(members[exts.index("idx")]) if source.has_index else None
    return members[0], label, index
