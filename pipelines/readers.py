"""The DALI reader of a :class:`~mscn.data.source.Source`, sharded and shuffled.

``read(source, ...)`` adds the reader to a pipeline. The Source itself (ImageFolder,
file list or WebDataset shards, each sample with its canonical index) is resolved in
pure Python by :func:`mscn.data.source.resolve_source`; both names are re-exported
here and from ``mscn.pipelines``.

Sharding (DALI "Sharding and Shuffling"): ``shard_id`` is the *global* rank,
``num_shards`` the world size; ``pad_last_batch=True`` pads every shard to the same
number of batches (the iterator drops the padding under PARTIAL and the last batch
under DROP), so all ranks run the same number of steps and every listed sample is
read at most once per epoch across ranks (exactly once under PARTIAL; a training list
may name a few files twice, below). Training leaves
``stick_to_shard=False``: shard k reads the (k+epoch)-th slice, and each rank sees all
the data over the epochs. Evaluation sticks to its shard.

Even shards (training, file sources): DALI's rotation keeps each epoch a partition of
the dataset only when the shards are of one size (NVIDIA/DALI#1762). With 240 files on
7 ranks, epoch 11 read 174 distinct files and 56 of them twice. So ``even_shards``
(the default) lists ``-n mod num_shards`` files a second time, spread over the list
(:func:`even_order`): at most ``num_shards - 1`` files read twice per epoch, against a
drift that grows with every epoch. Tar shards are read as they are and keep DALI's
behaviour; PIPELINE.md gives the figures.

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


def even_order(n: int, num_shards: int) -> list[int]:
    """The sample indices a file reader lists for equal shards: ``0..n-1``, then the
    ``-n mod num_shards`` extra ones, evenly spaced over the list (not the first few,
    which in an ImageFolder are all of the first class)."""
    extra = -n % num_shards
    return list(range(n)) + [j * n // extra for j in range(extra)]


class ShardDriftWarning(UserWarning):
    """A training loader whose ranks' slices drift apart over the epochs (:func:`drift_note`),
    warned by ``build_train_loader`` on rank 0 as ``mscn pretrain`` says it at its start."""


def drift_note(source: Source, num_shards: int, even_shards: bool = True) -> str | None:
    """Why a training reader of ``source`` on ``num_shards`` ranks keeps DALI's drift, or None."""
    n = source.num_samples
    if num_shards < 2 or not n % num_shards or (even_shards and source.kind != "wds"):
        return None
    why = ("tar shards are read as they are" if source.kind == "wds"
           else "this run continues a loader state saved before mscn evened the shards")
    return (f"{n} samples do not split evenly over {num_shards} ranks and {why}, so the ranks' slices drift "
            "apart over the epochs (in some epochs many samples are read twice and others not at all: "
            "docs/PIPELINE.md, 'Unequal slices drift')")


def read(source: Source, *, shard_id: int, num_shards: int, shuffle: bool, shuffle_buffer: int,
         stick_to_shard: bool, seed: int = -1, name: str = READER_NAME, even_shards: bool = True):
    """Add the reader: returns ``(encoded, label, index)``; ``label`` is None for file
    kinds and unlabelled shards (the loader maps index -> label: DALI's file reader carries
    one integer per file and it carries the index), ``index`` is None for tars without ``.idx``.
    ``seed`` fixes the shuffle (-1: DALI's own fixed seed; ``views_pipeline`` and
    ``eval_pipeline`` pass their pipeline's ``seed`` instead of -1); diagnose.py
    replays the reader with it. ``even_shards``: with ``stick_to_shard=False``, list
    files twice where needed for shards of one size (module docstring; False: a run
    resumed from a loader state saved before this existed)."""
    common = dict(shard_id=shard_id, num_shards=num_shards, random_shuffle=shuffle, initial_fill=shuffle_buffer,
                  pad_last_batch=True, stick_to_shard=stick_to_shard, seed=seed, name=name)
    if source.kind != "wds":
        n = source.num_samples
        order = even_order(n, num_shards) if even_shards and not stick_to_shard else list(range(n))
        # the label DALI carries is the sample's index, so a file listed twice keeps its own
        encoded, index = fn.readers.file(file_root=source.root, files=[source.files[i] for i in order],
                                         labels=order, **common)
        return encoded, None, index
    # shards without .cls are unlabelled: no label output, the loader maps the index to -1
    exts = [WDS_IMAGE_EXTS] + (["cls"] if source.labelled else []) + (["idx"] if source.has_index else [])
    members = fn.readers.webdataset(paths=list(source.tars), index_paths=list(source.indexes), ext=exts,
                                    missing_component_behavior="error", case_sensitive_extensions=False, **common)
    members = list(members) if isinstance(members, (list, tuple)) else [members]  # one ext: one DataNode
    label = parse_ascii_int(members[exts.index("cls")]) if source.labelled else None
    index = parse_ascii_int(members[exts.index("idx")]) if source.has_index else None
    return members[0], label, index
