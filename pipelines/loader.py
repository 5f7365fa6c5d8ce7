"""The one adapter from DALI to the trainer: ``DaliLoader`` yields typed ``MscnBatch``es.

Everything DALI-shaped stops here (the ``DALIWrapper`` pattern of DALI's examples):
the trainer never indexes ``data[0]["view0"]``. Per batch the adapter

1. takes the views (NCHW, on the pipeline's device); with ``data.colour_where=loader``
   DALI hands some over as uint8 HWC crops, which it flips, colour-jitters, grays,
   normalizes and transposes to NCHW (App. A.1, ``mscn.colour``); with
   ``data.blur_where=loader`` blurs the views DALI left unblurred, each sample with its
   own σ (App. A.1, ``mscn.blur``); on the CPU path (or with ``highpass.where=loader``)
   applies the high-pass (paper §5.1) as matrix products (``highpass_matmul``;
   docs/PIPELINE.md says why);
2. casts to the output dtype (bfloat16 only here: DALI has no bfloat16);
3. maps sample index -> label for file readers (their one integer is the index);
4. applies the masks (paper §5.3: masking comes after every other augmentation)
   through a pluggable ``mask_fn`` (``build_train_loader`` passes :class:`MaskGenerator`,
   ``mscn.cuda_kernels.apply_masks`` with a seeded generator; None masks nothing).

A DALI failure while iterating (a corrupt JPEG, say) becomes one DataError naming
the file when it can be found (pipelines/diagnose.py).

DALI's buffers on a GPU: DALI allocates and frees its outputs in the order of its own CUDA
stream, which knows nothing of the trainer's. Once the last reference to a batch's outputs
is gone, DALI may write the next batches into that memory while kernels queued on the
trainer's stream have yet to read it. So the adapter does every read of DALI's GPU memory
itself (a view it would hand over untouched is copied first), records an event after those
reads, and keeps the outputs until the event has passed (``_retire``).

The handover (``data.handover``): DALI's iterator imports the outputs through DLPack on the
current stream. DALI's ``share_outputs`` has already waited on the host until the batch was
done, and then DLPack makes that stream wait for every kernel DALI has queued since, the
next batches' decode included. ``private`` imports them on a stream of the loader's own, so
the trainer's stream waits for nothing DALI does (docs/PERFORMANCE.md).

Exact resume: a training loader built with ``enable_checkpointing`` hands out its
state with :meth:`DaliLoader.state_dict` (DALI's own pipeline checkpoint: reader
position and every augmentation RNG, for the batches *consumed*, whatever the prefetch
queue holds; plus the mask generator) and a new loader built with that state
(``build_train_loader(..., state=...)``) yields exactly the batches the old one would
have yielded next.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from mscn.blur import blur_per_sample, blur_radius
from mscn.colour import HANDOVER, ColourLaw, solarize_flags, solarize_normalize
from mscn.config_schema import HANDOVERS
from mscn.data.source import layout_digest
from mscn.errors import DataError
from mscn.h2d import to_device
from mscn.highpass import highpass_matmul
from mscn.maskspec import MaskCoverageWarning, coverage_notes
from mscn.pipelines.args import check_highpass, check_placement, check_source
from mscn.pipelines.readers import READER_NAME, ShardDriftWarning, Source, drift_note
from mscn.pipelines.train_pipeline import output_names

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# batches whose outputs may wait for their event before the host waits for the oldest: the
# GPU is then this many batches behind, so the wait costs the trainer nothing, and DALI's
# memory stays bounded
MAX_PENDING = 4
MaskFn = Callable[[list[torch.Tensor]], list[torch.Tensor]]
# what DALI says when a checkpoint does not fit the pipeline it is restored into
_CHECKPOINT_MISFIT = re.compile(r"[^.\n]*(checkpoint might come from another pipeline|no checkpoint for operator)[^.\n]*")


@dataclass
class MscnBatch:
    """One batch: ``views[i]`` is (B, 3, H, W) on the loader's device; ``labels`` and
    ``index`` are (B,) int64 (``index`` is the canonical sample index, -1 if unknown)."""

    views: list[torch.Tensor]
    labels: torch.Tensor
    index: torch.Tensor


class ColourWhereWarning(UserWarning):
    """``data.colour_where=loader`` moves no view's colour on this path
    (``Config.colour_where_note``): said by the loader a reusing project builds."""


class LoaderStateMismatch(DataError):
    """A loader state saved over other data than the source given now. DALI restores it all
    the same (a checkpoint of a 20-file reader, restored over 10 files, gave batches such as
    ``[7, 9, 9, 9]``), so the loader refuses it."""


def other_data(state: dict, source: Source) -> str:
    """Why a :meth:`DaliLoader.state_dict` cannot continue over ``source``: it was saved over
    other data (files added, removed or relabelled; the mount point does not count), or ""
    (also for a state saved before the key)."""
    how = _how_data_differs(state, source)
    return f"its loader read other data ({how})" if how else ""


def _how_data_differs(state: dict, source: Source) -> str:
    """What :func:`other_data` says in its brackets, or ""."""
    saved = state.get("data_digest")
    if saved is None:
        return ""
    if saved == source.digest():
        layout = state.get("data_layout")  # absent in states saved before it
        if layout is None or layout == layout_digest(source):
            return ""
        return f"the same shards and samples, but in another order or at other offsets in {source.root}: a pack " \
               "with another shuffle"
    then = state.get("data_samples")
    if then == source.num_samples:  # files renamed, moved to another class or relabelled
        return f"as many samples, {then}, but other file names, labels or classes in {source.root}"
    return (f"{then if then is not None else '?'} samples then, {source.num_samples} now in {source.root}: another "
            "number of steps per epoch, another schedule")


def graph_misfit(state: dict, crop: str, blur_where: str, colour_where: str, now: str = "this loader") -> str:
    """Why a :meth:`DaliLoader.state_dict` cannot be restored into a pipeline graph that cuts
    with ``crop`` and blurs and colours in ``blur_where`` / ``colour_where`` ("" if it can).
    A DALI checkpoint names the graph's operators, so one of another graph does not load
    (states from before each key: the window crop, DALI blurred and coloured)."""
    saved = state.get("crop") or "window"
    if saved != crop:
        return f"its loader cut the views with data.crop={saved}, {now} with {crop}"
    saved = state.get("blur_where") or "pipeline"
    if saved != blur_where:
        return f"its loader blurred the views with data.blur_where={saved}, {now} with {blur_where}"
    saved = state.get("colour_where") or "pipeline"
    if saved != colour_where:
        return f"its loader coloured the views with data.colour_where={saved}, {now} with {colour_where}"
    if colour_where == "loader" and state.get("colour_handover") != HANDOVER:
        return "its loader took the colour's draws from DALI in another form (an earlier mscn)"
    return ""


def _state_misfit(state, rank: int, world_size: int, num_views: int, graph: tuple[str, str, str]) -> str:
    """Why ``state`` cannot continue as this rank's loader (""): not a loader state, another
    rank or number of ranks (DALI's reader state restores its own shard: 1 rank's state on 2
    read the whole set on each, 2 ranks' on 1 read half of it), other views, another graph.
    States saved before a key are not checked for it."""
    if not (isinstance(state, dict) and "dali" in state):
        raise TypeError("state: expected a DaliLoader.state_dict() (a dict with 'dali'), got "
                        f"{type(state).__name__}{' with keys ' + ', '.join(map(str, state)) if isinstance(state, dict) else ''}"
                        "; a checkpoint of mscn pretrain holds one per rank, under ['ranks'][rank]['loader']")
    saved = state.get("shard")
    if saved is not None and tuple(saved) != (rank, world_size):
        return (f"it was saved by rank {saved[0]} of {saved[1]}, this loader is rank {rank} of "
                f"{world_size}: a reader's state holds its own rank's share of the data; restore each "
                "rank's own state on as many ranks, or start without a state (a fresh data order)")
    saved = state.get("views")
    if saved is not None and saved != num_views:
        return f"its loader made {saved} views, this loader {num_views}"
    return graph_misfit(state, *graph)


@dataclass(kw_only=True)
class Replay:
    """What :mod:`mscn.pipelines.diagnose` needs to re-read the reader's order."""

    shard_id: int
    num_shards: int
    shuffle: bool
    shuffle_buffer: int
    stick_to_shard: bool
    reader_seed: int
    batch_size: int
    prefetch: int
    even_shards: bool = True  # readers.read's: the file list the reader was given


class DaliLoader:
    """Iterable of :class:`MscnBatch`; ``len()`` is the number of batches per epoch.

    pipeline: a built-or-unbuilt DALI pipeline whose outputs are
    ``output_names(num_views, source)``. policy: DROP for training, PARTIAL for
    evaluation. highpass: (σ, window) to apply here (CPU path), None if the pipeline
    did it or it is disabled. mask_fn: views -> masked views, None for no masks.
    device: where the batch should live (the pipeline's device if None). blur: view index
    -> (radius, window) for the views whose blur this adapter applies (their σ comes as
    ``view{i}_sigma``; ``data.blur_where=loader``), before the high-pass. colour: view index ->
    ``mscn.colour.ColourLaw`` for the views DALI hands over as uint8 HWC crops with one
    draw of uniforms each (``view{i}_colour``; ``data.colour_where=loader``): flipped,
    coloured and normalized with ``mean``/``std`` here first, into ``colour_dtype`` (what
    DALI emits for the others), or for a view that solarizes, left on the uint8 scale in
    float32 and solarized and normalized after its blur; their blur's σ (for ``blur``)
    comes from the same draw. handover: ``data.handover``, the stream DALI's outputs are
    imported on (module docstring). state: the :meth:`state_dict` a pipeline built with
    ``enable_checkpointing=True, checkpoint=bytes(state["dali"].numpy())`` continues from: it
    is checked to fit (this reader's rank of how many, the views, the graph, the data:
    :class:`LoaderStateMismatch`), and the mask generator's draws and the batch count
    continue from it. A pipeline built from a checkpoint needs it.
    """

    def __init__(self, pipeline, source: Source, num_views: int, *, policy: LastBatchPolicy,
                 output_dtype: str = "float32", highpass: tuple[float, int] | None = None,
                 mask_fn: MaskFn | None = None, device: torch.device | None = None,
                 replay: Replay | None = None, runs: int = 0, crop: str | None = None,
                 blur: dict[int, tuple[int, int]] | None = None, colour: dict[int, ColourLaw] | None = None,
                 mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), colour_dtype: str = "float32",
                 handover: str = "trainer", state: dict | None = None):
        if handover not in HANDOVERS:
            raise ValueError(f"handover must be one of {', '.join(HANDOVERS)}, got {handover!r}")
        if handover == "private" and pipeline.device_id is not None and not getattr(pipeline, "exec_dynamic", False):
            # safe only because share_outputs waits for the batch on the host, which the
            # default executor does; the other one copies on the current stream instead
            raise ValueError("data.handover=private needs DALI's default executor (exec_dynamic)")
        check_source(source)  # a path where the Source belongs failed at the first batch
        policy = _last_batch_policy(policy)
        check_highpass(highpass)
        if device is not None:  # a CUDA device on a machine without one: here, not torch's error at the first batch
            check_placement(0, 1, 0, device)
        if output_dtype not in TORCH_DTYPES or colour_dtype not in TORCH_DTYPES:
            bad = output_dtype if output_dtype not in TORCH_DTYPES else colour_dtype
            raise ValueError(f"output dtype {bad!r}: expected one of {', '.join(TORCH_DTYPES)}")
        self.source, self.num_views, self.crop = source, num_views, crop
        self.dtype = TORCH_DTYPES[output_dtype]
        self.highpass, self.mask_fn, self.device, self.replay = highpass, mask_fn, device, replay
        self.blur = dict(blur or {})
        self.laws = dict(colour or {})
        self.colour, self.mean, self.std = tuple(sorted(self.laws)), tuple(mean), tuple(std)
        self.colour_dtype = TORCH_DTYPES[colour_dtype]
        self._names = output_names(num_views, source, deferred=tuple(sorted(self.blur)), coloured=self.colour)
        self._labels = None if source.label_in_stream else torch.tensor(source.labels, dtype=torch.int64)
        self._runs = runs  # batches taken from the pipeline so far, for diagnose.py (kept across a resume)
        # a DALI failure raises UnexplainedDataError, whose file is looked for only when asked:
        # under torchrun the trainer first has every rank checkpoint, since the search may take
        # longer than the other ranks may wait in a collective (train.pretrain)
        self.explain_later = False
        # (DALI's outputs, the event after the adapter's reads of them) per batch, oldest first
        self._held: deque = deque()
        self._hold = 0  # hold(): the last batches' outputs kept whatever their event says
        self.handover, self._pipeline, self._private = handover, pipeline, None
        try:  # prepare_first_batch=False: nothing runs until the first batch is asked for
            self._iter = DALIGenericIterator(pipeline, self._names, reader_name=READER_NAME,
                                             last_batch_policy=policy, auto_reset=True,
                                             prepare_first_batch=False)
        except RuntimeError as e:
            raise self._data_error(e) from None
        if pipeline.num_outputs != len(self._names):  # else DALI's iterator fails on the first batch
            extras = [n for n in self._names if not re.fullmatch(r"view\d+", n)]
            views = pipeline.num_outputs - len(extras)
            guess = (f"; it looks built with {views} view(s), so pass num_views={views}"
                     if 0 < views != num_views and not (self.blur or self.laws) else
                     "; pass the num_views the pipeline was built with")
            raise ValueError(f"the pipeline has {pipeline.num_outputs} outputs, but this loader expects "
                             f"{len(self._names)}: {', '.join(self._names)} (num_views={num_views}, plus what the "
                             f"source, blur and colour arguments add){guess} (debug outputs are for tests, not "
                             "the loader)")
        if policy == LastBatchPolicy.DROP and len(self._iter) == 0:  # else the loop ends at once, without a word
            raise DataError(f"{source.root}: this shard holds fewer images than one batch of "
                            f"{pipeline.max_batch_size}, so a loader that drops the last partial batch has none; "
                            "lower the batch size or add images")
        self._views_checked = False
        self._since_end = 0  # batches handed out since DALI last ended an epoch (reset()'s warning)
        self._restore(state, pipeline)

    def _restore(self, state: dict | None, pipeline) -> None:
        """Continue from ``state`` (see the class docstring); a pipeline restored from a DALI
        checkpoint without it would go on unchecked: another rank's state (the probe of a
        hand-built loader: one rank's state on rank 1 of 2 read the whole set there, and its
        ranks ran different numbers of steps) or another loader's mask draws."""
        built_from = getattr(pipeline, "_checkpoint", None)  # DALI keeps what it was given
        if not state:  # {} is no state, as None
            if built_from is not None:
                raise ValueError("the pipeline was built from a checkpoint: pass the DaliLoader.state_dict() it "
                                 "came from as DaliLoader(..., state=state) too, which checks that it fits this "
                                 "rank, views and data and continues its mask draws")
            return
        if built_from is None:
            raise ValueError("state: the pipeline was built without it; build it with enable_checkpointing=True, "
                             "checkpoint=bytes(state['dali'].numpy())")
        rank, world_size = self._shard()
        check_state(state, self.source, rank, world_size, self.num_views,  # first: a TypeError for a non-state
                    (self.crop or state.get("crop") or "window", "loader" if self.blur else "pipeline",
                     "loader" if self.colour else "pipeline"))
        if bytes(built_from) != bytes(state["dali"].numpy()):
            raise ValueError("state: the pipeline was built from another checkpoint than state['dali']")
        self._runs = int(state.get("runs", self._runs))
        if state.get("mask") is not None and isinstance(self.mask_fn, MaskGenerator):
            self.mask_fn.load_state_dict(state["mask"])

    def _shard(self) -> tuple[int, int]:
        """This reader's shard and number of shards (DALI's reader metadata for a pipeline
        built by hand)."""
        if self.replay is not None:
            return self.replay.shard_id, self.replay.num_shards
        meta = self._pipeline.reader_meta(READER_NAME)
        return int(meta["shard_id"]), int(meta["number_of_shards"])

    @property
    def batch_size(self) -> int:
        """Images per batch (the pipeline's); the last batch of an evaluation may hold fewer."""
        return self._pipeline.max_batch_size

    def __len__(self) -> int:
        return len(self._iter)

    def hold(self, batches: int) -> None:
        """Keep DALI's outputs of the last ``batches`` batches alive whatever their event
        says (default 0: each batch's go back to DALI once the GPU has done the adapter's
        reads of them). Dropping them hands the buffers back to DALI; ``scripts/probe_syncs.py``
        measures whether that waits for the GPU, and the bench's ``masks-hold`` feed whether
        holding them longer feeds the trainer faster. A bench knob until a GPU run decides."""
        if batches < 0:
            raise ValueError(f"hold: batches must be >= 0, got {batches}")
        self._hold = batches

    def _end_pending(self) -> bool:
        """Whether every batch of the epoch was handed out but DALI has not ended it yet: a
        loop that took exactly ``len(self)`` batches and stopped (``islice``, a cap on steps).
        Read from DALI's iterator itself (its count against the epoch's size, and under DROP
        whether only a partial batch is left to drop), so a restored state and FILL's epochs
        of varying length read right; an iterator without that state (another DALI) is
        taken as not pending, the old behaviour."""
        it = self._iter
        try:
            if it._size > 0 and it._counter >= it._size:
                return True
            if it._last_batch_policy == LastBatchPolicy.DROP:
                return bool(it._advance_and_check_drop_last(dry_run=True, end_iteration=False))
        except AttributeError:
            pass
        return False

    def reset(self) -> None:
        """For code written for DALI's iterators: DALI's own ``reset()`` (this loader rearms
        itself, as ``auto_reset`` does, so a loop after an epoch's last batch starts the next
        epoch with or without it); in the middle of an epoch it changes nothing (the next loop
        continues the epoch), with a warning, as DALI's."""
        if self._end_pending():
            self._iter.reset()  # DALI drops a partial batch left under DROP, and rearms
            self._retire(None, None)
            self._since_end = 0
        elif self._since_end:
            warnings.warn("DaliLoader.reset() in the middle of an epoch changes nothing (as DALI's iterators): "
                          "the next loop continues this epoch", stacklevel=2)

    def _next(self):
        """DALI's outputs of the next batch, or None at an epoch's end (auto_reset rearms it)."""
        try:
            with self._handover_stream():
                return next(self._iter)
        except StopIteration:
            self._retire(None, None)
            self._since_end = 0
            return None
        except RuntimeError as e:
            raise self._data_error(e) from None

    def __iter__(self) -> Iterator[MscnBatch]:
        # an epoch whose batches a loop before this one took them all: its end is met here
        # first, or this loop would yield nothing (DALI's iterator ends an epoch only when
        # asked for one batch more)
        pending = self._end_pending()
        while True:
            data = self._next()
            if data is None:
                if pending:
                    pending = False
                    continue
                return
            pending = False
            self._runs += 1
            self._since_end += 1
            batch = self._convert(data[0])
            self._retire(data, _fence(batch.views[0]))
            del data
            yield batch

    def _handover_stream(self):
        """The stream DALI's iterator imports the batch on (``data.handover``)."""
        if self.handover == "trainer" or self._pipeline.device_id is None:
            return contextlib.nullcontext()
        if self._private is None:  # the executor was checked in __init__
            self._private = torch.cuda.Stream(device=self._pipeline.device_id)
        return torch.cuda.stream(self._private)

    def _retire(self, data, event) -> None:
        """Keep ``data`` (this batch's DALI outputs) until ``event`` (:func:`_fence`) has
        passed, then hand it back to DALI with those of earlier batches whose event has
        passed, oldest first; ``data=None`` (an epoch's end) waits for them all."""
        if data is not None:
            self._held.append((data, event))
        keep = 0 if data is None else self._hold
        while len(self._held) > keep:
            pending = self._held[0][1]
            if pending is not None and not pending.query():
                if data is not None and len(self._held) - keep <= MAX_PENDING:
                    break  # not done yet: look again at the next batch
                pending.synchronize()
            self._held.popleft()

    def __del__(self):
        # a loader dropped mid-epoch (a run that reached its last step) hands its outputs
        # back to DALI's pool, which outlives it (an evaluation loader may draw from it next):
        # not before the reads queued on them are done
        if hasattr(self, "_held"):  # not when __init__ stopped before it
            try:
                self._retire(None, None)  # as at an epoch's end
            except Exception:  # at interpreter exit CUDA (or this module's globals) may be gone
                pass

    def state_dict(self) -> dict:
        """What a resumed loader needs to continue exactly here (tensors and ints only, so
        that it fits a ``weights_only`` checkpoint). Needs a pipeline built with
        ``enable_checkpointing=True``."""
        (dali,) = self._iter.checkpoints()  # one pipeline; counts only the batches consumed, not the prefetched ones
        mask = self.mask_fn.state_dict() if isinstance(self.mask_fn, MaskGenerator) else None
        # "crop": DALI's checkpoint only fits a pipeline of the same operators (train/resume.py)
        return {"dali": torch.frombuffer(bytearray(dali), dtype=torch.uint8), "mask": mask, "runs": self._runs,
                "crop": self.crop, "blur_where": "loader" if self.blur else "pipeline",
                "colour_where": "loader" if self.colour else "pipeline",
                "colour_handover": HANDOVER if self.colour else None,
                # the reader's file list (readers.even_order): a state fits only a reader of the same list
                "even_shards": self.replay.even_shards if self.replay is not None else True,
                # and of the same data (LoaderStateMismatch)
                "data_digest": self.source.digest(), "data_samples": self.source.num_samples,
                "data_layout": layout_digest(self.source),
                # the rank of how many (a reader's state is its shard's) and the views: states
                # that cannot continue here are refused (_state_misfit)
                "shard": list(self._shard()),
                "views": self.num_views}

    def _convert(self, out: dict) -> MscnBatch:
        views = [out[f"view{i}"] for i in range(self.num_views)]
        if not self._views_checked:  # DALI's outputs have no static shape: the first batch is where a mix-up shows
            self._check_views(views)
            self._views_checked = True
        if self.device is not None:
            dev = torch.device(self.device)
            # non_blocking only towards a GPU: a non-blocking GPU -> CPU copy would let the
            # CPU read the views (high-pass, masks) before the copy has finished
            views = [v.to(dev, non_blocking=dev.type == "cuda") for v in views]
        sigma = {i: out[f"view{i}_sigma"] for i in self.blur if i not in self.colour}
        if self.colour:  # imported here, as the masks are: mscn.cuda_kernels loads Triton
            from mscn.cuda_kernels.colour import colour_per_sample
        # views that solarize (BYOL) stay on the uint8 scale until after their blur
        late = [i for i in self.colour if self.laws[i].p_solarize > 0]
        for i in self.colour:  # uint8 HWC -> CHW, coloured and normalized, in the dtype DALI gives the others
            # a view that solarizes stays float32 through its blur: in float16 the levels
            # 128-255 are 0.125 apart, and the rounding before the solarize would move ~4 %
            # of them a level (a review's simulation)
            mean, std, dtype = (((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), torch.float32) if i in late
                                else (self.mean, self.std, self.colour_dtype))
            views[i], sigma[i] = colour_per_sample(views[i], out[f"view{i}_colour"], self.laws[i], mean, std, dtype)
        # float16 stays float16 on a GPU (see dali_dtype); the blur comes first (App. A.1
        # blurs the image, §5.1 high-passes the result)
        views = [v if v.is_cuda and v.dtype == torch.float16 else v.float() for v in views] \
            if (self.highpass is not None or self.blur) else views
        for i, (radius, window) in self.blur.items():
            views[i] = blur_per_sample(views[i], sigma[i], radius, window)
        for i in late:  # solarize after the blur, then normalize (App. A.1's order)
            views[i] = solarize_normalize(views[i], solarize_flags(out[f"view{i}_colour"], self.laws[i]),
                                          self.mean, self.std)
        if self.highpass is not None:
            views = [highpass_matmul(v, *self.highpass) for v in views]
        views = [v if v.dtype == self.dtype else v.to(self.dtype) for v in views]
        batch = views[0].shape[0]
        if "index" in out:
            index = out["index"].view(-1).long()
        else:
            index = torch.full((batch,), -1, dtype=torch.int64)
        if self._labels is not None:
            labels = self._labels.to(index.device)[index]
        else:
            # clone: DALI may reuse this (possibly pinned) buffer before a non-blocking copy lands
            labels = out["label"].view(-1).long().clone()
        views = _own(views, out)
        if self.mask_fn is not None and batch:  # a rank's empty last batch (PARTIAL) has nothing to mask
            views = self.mask_fn(views)
        dev = views[0].device
        # through pinned memory: from pageable memory a "non-blocking" copy may wait for the
        # trainer's stream, a host sync per batch (mscn.h2d)
        return MscnBatch(views, to_device(labels, dev), to_device(index, dev))

    def _check_views(self, views: list[torch.Tensor]) -> None:
        """Each ``view{i}`` a batch of images: a pipeline built with ``debug_outputs=True``
        and the ``num_views`` its output count suggests handed its flags and areas out as
        views, without an error anywhere (a reuse probe)."""
        for i, v in enumerate(views):
            image = v.dim() == 4 and (v.shape[-1] == 3 if i in self.colour else v.shape[1] == 3)
            if not image:
                raise ValueError(f"output {i} of the pipeline, taken as view{i}, is no batch of images (shape "
                                 f"{tuple(v.shape)}): pass the num_views the pipeline was built with; a pipeline "
                                 "built with debug_outputs=True is for tests, not the loader")

    def _data_error(self, err: RuntimeError) -> DataError:
        from mscn.pipelines.diagnose import explain

        said = _CHECKPOINT_MISFIT.search(str(err))
        if said:  # a state of another graph (a hand-built pipeline, a setting no key records): not the data
            return LoaderStateMismatch(f"{self.source.root}: the loader state was saved by another pipeline (other "
                                       f"views, operators or settings; DALI: {said.group(0)}); build the pipeline "
                                       "as it was when the state was saved, or start without a state")
        if self.explain_later:  # the search re-reads the reader's order: minutes on a large set
            runs = self._runs
            return UnexplainedDataError(err, self.source, lambda: explain(err, self.source, self.replay, runs))
        return explain(err, self.source, self.replay, self._runs)


class UnexplainedDataError(DataError):
    """A DALI failure whose file is not looked for yet (:attr:`DaliLoader.explain_later`):
    :meth:`explained` runs the search and returns the one-line error it finds."""

    def __init__(self, err: Exception, source: Source, search: Callable[[], Exception]):
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        super().__init__(f"{source.root}: DALI failed while reading the dataset ({first}); the file is not looked "
                         "for yet")
        self._search = search

    def explained(self) -> Exception:
        return self._search()


def _fence(view: torch.Tensor):
    """An event after the work queued so far on ``view``'s current stream (the adapter's
    reads of DALI's buffers), or None on the CPU, where every read is done by now."""
    if not view.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(view.device))
    return event


def _own(views: list[torch.Tensor], out: dict) -> list[torch.Tensor]:
    """``views`` with those that are still DALI's GPU memory copied (masks then write into the
    copy): every read of DALI's buffers then happens in the adapter, before its event
    (``DaliLoader._retire``), and none in the trainer's step. On the GPU path only evaluation
    views and views without a high-pass in the loader come through untouched."""
    dali = {t.untyped_storage().data_ptr() for t in out.values() if isinstance(t, torch.Tensor) and t.is_cuda}
    if not dali:
        return views
    return [v.clone() if v.is_cuda and v.untyped_storage().data_ptr() in dali else v for v in views]


def endless(loader):
    """Batches across epochs from any re-iterable loader: DaliLoader (DALI resets itself
    after StopIteration) or a torch DataLoader (a new epoch per ``iter``)."""
    while True:
        yield from loader


class MaskGenerator:
    """``mscn.cuda_kernels.apply_masks`` with a generator seeded for this rank, created
    lazily on the views' device (so the mask tables are drawn without host syncs).

    :meth:`state_dict` / :meth:`load_state_dict` carry the generator across a resume; a
    state loaded before the first batch is applied when the generator is created.
    """

    def __init__(self, mask_cfgs: list, seed: int):
        self.mask_cfgs, self.seed = _checked_masks(mask_cfgs), seed
        self.gen: torch.Generator | None = None
        self._pending: torch.Tensor | None = None

    def __call__(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        from mscn.cuda_kernels import apply_masks  # imported when the first batch is masked

        dev = views[0].device
        if self.gen is None or self.gen.device != dev:
            self.gen = torch.Generator(device=dev)
            self.gen.manual_seed(self.seed)
            if self._pending is not None:
                self.gen.set_state(self._pending)
                self._pending = None
        return apply_masks(views, self.mask_cfgs, self.gen)

    def state_dict(self) -> dict:
        state = self.gen.get_state() if self.gen is not None else self._pending
        return {"seed": self.seed, "gen": state}  # gen None: no batch masked yet

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.gen, self._pending = int(state["seed"]), None, state["gen"]


def _checked_masks(cfgs) -> list:
    """``cfgs`` as a list of checked MaskCfgs (a dict of MaskCfg keys is taken, as the config
    builders take one): a bad one is named where the generator is made, not at the first
    batch, inside the loader's loop."""
    from mscn.config import MaskCfg, typed
    from mscn.errors import MscnError
    from mscn.maskspec import check_mask_cfg

    if not isinstance(cfgs, (list, tuple)) or not cfgs:
        raise MscnError(f"mask_cfgs: expected a list of MaskCfg, one per view, got {cfgs!r}")
    out = []
    for i, cfg in enumerate(cfgs):
        if isinstance(cfg, Mapping):  # a dict, an OmegaConf DictConfig
            cfg = typed(dict(cfg), MaskCfg, "<code>", f"views[{i}].mask")  # an unknown key is named
        if not isinstance(cfg, MaskCfg):  # a ViewCfg has a `ratio` too (its crop's aspect ratio)
            hint = " (a ViewCfg: pass its .mask)" if hasattr(cfg, "mask") else ""
            raise MscnError(f"mask_cfgs[{i}]: expected a MaskCfg, got {type(cfg).__name__}{hint}")
        check_mask_cfg(cfg, key=f"views[{i}].mask")
        out.append(cfg)
    return out


def mask_fn_from_cfgs(mask_cfgs: list, seed: int) -> MaskGenerator:
    """The default ``mask_fn`` of the training loader: a :class:`MaskGenerator`."""
    return MaskGenerator(mask_cfgs, seed)


def rank_seed(seed: int, rank: int) -> int:
    """A distinct, reproducible seed per (run seed, global rank)."""
    return (seed * 65_537 + rank) % (2**31 - 1)


def check_size(source: Source, global_batch: int, what: str) -> None:
    if source.num_samples < global_batch:
        raise DataError(f"{source.root}: {source.num_samples} images, fewer than one global batch of "
                        f"{global_batch} for {what}; lower the batch size or add images")


# ----------------------------------------------------------------------------------
# Builders: config -> pipeline -> DaliLoader
# ----------------------------------------------------------------------------------

def pipeline_device(device: torch.device | str | None, local_rank: int) -> tuple[str, int | None]:
    """("gpu", device id) for a CUDA device, else ("cpu", None): DALI's CPU-only mode."""
    if device is None:
        return "cpu", None
    device = torch.device(device)
    if device.type == "cuda":
        return "gpu", device.index if device.index is not None else local_rank
    return "cpu", None


@dataclass(frozen=True)
class Plan:
    """How this process builds its pipelines: the config's "auto" settings resolved for
    this machine (pipelines/tuning.py) and where the high-pass runs."""

    kind: str  # "gpu" or "cpu"
    device_id: int | None
    threads: int  # data.num_threads
    hw_decoder_load: float  # data.hw_decoder_load
    output_dtype: str  # data.output_dtype: what the loader hands the trainer
    highpass_in_pipeline: tuple[float, int] | None  # (σ, window) for DALI (GPU path)
    highpass_in_adapter: tuple[float, int] | None  # (σ, window) for BLAS in the adapter (CPU path)
    dali_dtype: str  # what DALI emits (DALI has no bfloat16)
    blur_in_adapter: bool = False  # data.blur_where=loader: views without solarize (or coloured here) blurred here
    colour_in_adapter: bool = False  # data.colour_where=loader: the adapter colours the views that may move
    executor: dict = field(default_factory=dict)  # data.op_concurrency / stream_policy / thread_affinity as pipeline kwargs


def dali_dtype(out: str, gpu: bool, filters_in_loader: bool) -> str:
    """What DALI emits for views the loader hands over as ``out``.

    DALI has no bfloat16 (float32, cast by the loader). A high-pass (or blur) in the loader
    runs on float32 views on the CPU path (BLAS), but on float16 views on a GPU: half the
    bytes out of DALI and tensor-core GEMMs, at 2e-4 relative error against float64
    (tests/test_pipeline_highpass.py), the error float16 views have anyway.
    """
    if out == "bfloat16" or (filters_in_loader and not (gpu and out == "float16")):
        return "float32"
    return out


def plan(cfg, device: torch.device | str | None, local_rank: int = 0, views: list | None = None) -> Plan:
    """The :class:`Plan` for ``cfg`` on ``device`` (None or CPU: DALI's CPU path), for a
    loader of ``views`` (default ``cfg.views``; the evaluation loaders pass none).

    ``highpass.where=auto``: the GPU path blurs in DALI; the CPU path leaves the blur to
    BLAS in the adapter (docs/PIPELINE.md), so DALI emits float32 there. ``loader`` on a
    GPU filters the views as two batched GEMMs on the current (the trainer's) stream
    instead of competing with it through DALI's blur kernels. ``auto`` is ``loader`` too
    for a loader that moves a view's blur there (``data.blur_where``, whose ``auto`` does
    so on a GPU: :meth:`~mscn.config_schema.Config.blur_where_on`): the high-pass must
    see the blurred view.
    """
    from mscn.highpass import highpass_params
    from mscn.pipelines.tuning import dali_threads, decoder_load, executor, view_dtype

    kind, device_id = pipeline_device(device, local_rank)
    gpu = kind == "gpu"
    out = view_dtype(cfg.data.output_dtype, gpu)
    hp = highpass_params(cfg.highpass)
    blur_in_loader = cfg.blur_in_loader(gpu, views)
    colour_in_loader = cfg.colour_in_loader(gpu, views)
    # auto: DALI on a GPU, unless a blur or colour step moved to the loader (the high-pass comes after them)
    auto = "loader" if blur_in_loader or colour_in_loader or not gpu else "pipeline"
    where = cfg.highpass.where if cfg.highpass.where != "auto" else auto
    in_loader = hp is not None and where == "loader"
    dali = dali_dtype(out, gpu, in_loader or blur_in_loader or colour_in_loader)
    return Plan(kind, device_id, dali_threads(cfg.data.num_threads, gpu),
                decoder_load(cfg.data.hw_decoder_load, device_id if gpu else None), out,
                None if in_loader else hp, hp if in_loader else None, dali, blur_in_loader,
                colour_in_loader, executor(cfg.data.op_concurrency, cfg.data.stream_policy, cfg.data.thread_affinity))


def check_state(state: dict, source: Source, rank: int, world_size: int, num_views: int,
                graph: tuple[str, str, str]) -> None:
    """:class:`LoaderStateMismatch` when ``state`` cannot continue as this rank's loader over
    ``source`` (:func:`_state_misfit`, :func:`_how_data_differs`)."""
    why = _state_misfit(state, rank, world_size, num_views, graph)
    if why:
        raise LoaderStateMismatch(f"{source.root}: the loader state cannot continue here: {why}")
    how = _how_data_differs(state, source)
    if how:
        raise LoaderStateMismatch(f"{source.root}: holds {source.num_samples} samples, other data than the "
                                  f"{state.get('data_samples', '?')} samples the loader state was saved over "
                                  f"({how})")


@dataclass(frozen=True)
class Shard:
    """This rank's part of the data: DALI shard (global rank) of ``world_size``, its batch and seed."""

    rank: int
    world_size: int
    batch: int
    seed: int


def _views_loader(cfg, source: Source, views: list, shard: Shard, p: Plan, mask_fn: MaskFn | None,
                  state: dict | None = None, checkpointing: bool = False) -> DaliLoader:
    from mscn.pipelines.train_pipeline import coloured_views, loader_blurred, views_pipeline

    d = cfg.data
    blur = {i: (blur_radius(views[i].blur_sigma[1], views[i].blur_window), views[i].blur_window)
            for i in loader_blurred(views, p.blur_in_adapter, p.colour_in_adapter)}
    coloured = coloured_views(views, p.blur_in_adapter, p.colour_in_adapter)
    if state:  # {} is no state, as None
        check_state(state, source, shard.rank, shard.world_size, len(views),
                    (d.crop, "loader" if blur else "pipeline", "loader" if coloured else "pipeline"))
    # a state saved before even shards existed continues with the reader's list as it was then
    even = bool(state.get("even_shards", False)) if state else True
    replay = Replay(shard_id=shard.rank, num_shards=shard.world_size, shuffle=True, shuffle_buffer=d.shuffle_buffer,
                    stick_to_shard=False, reader_seed=shard.seed, batch_size=shard.batch, prefetch=d.prefetch,
                    even_shards=even)
    pipe = views_pipeline(source, views, image_size=d.image_size, mean=d.mean, std=d.std, crop=d.crop,
                          highpass=p.highpass_in_pipeline, device=p.kind, hw_decoder_load=p.hw_decoder_load,
                          shard_id=shard.rank, num_shards=shard.world_size, reader_seed=shard.seed, shuffle=True,
                          shuffle_buffer=d.shuffle_buffer, even_shards=even, view_dtype=p.dali_dtype,
                          batch_size=shard.batch,
                          blur_in_loader=p.blur_in_adapter, colour_in_loader=p.colour_in_adapter,
                          num_threads=p.threads, device_id=p.device_id, seed=shard.seed,
                          prefetch_queue_depth=d.prefetch, enable_checkpointing=checkpointing or state is not None,
                          checkpoint=bytes(state["dali"].numpy()) if state else None, **p.executor)
    return DaliLoader(pipe, source, len(views), policy=LastBatchPolicy.DROP, output_dtype=p.output_dtype,
                      highpass=p.highpass_in_adapter, mask_fn=mask_fn, replay=replay, crop=d.crop, blur=blur,
                      colour={i: ColourLaw.of(views[i], blur=i in blur) for i in coloured},
                      mean=d.mean, std=d.std, colour_dtype=p.dali_dtype, handover=d.handover, state=state or None)


def _last_batch_policy(policy) -> LastBatchPolicy:
    """DALI's LastBatchPolicy, or its name ("drop", "partial", "fill") as another project
    might write it; anything else in one line (DALI's iterator fails on it with a bare
    TypeError from deep inside)."""
    if isinstance(policy, LastBatchPolicy):
        return policy
    if isinstance(policy, str) and policy.upper() in LastBatchPolicy.__members__:
        return LastBatchPolicy[policy.upper()]
    raise ValueError(f"policy: expected a nvidia.dali.plugin.pytorch.LastBatchPolicy or one of "
                     f"{', '.join(m.lower() for m in LastBatchPolicy.__members__)}, got {policy!r}")


def build_train_loader(cfg, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                       device: torch.device | str | None = None, apply_mask: bool = True,
                       state: dict | None = None, source: Source | None = None) -> DaliLoader:
    """The pretraining loader of paper §5.3: ``len(cfg.views)`` views per image, each
    augmented (App. A.1), high-passed (§5.1) and masked (§5.2) with its own ViewCfg.

    Returns a :class:`DaliLoader` that yields :class:`MscnBatch`es of
    ``global_batch / world_size`` images (views: one (B, 3, H, W) tensor per view, on
    ``device``); DROP policy, so every batch is full.

    rank/world_size: global rank and world size (DALI shard id / number of shards);
    local_rank: the GPU of this process when ``device`` is CUDA without an index.
    device: a CUDA device selects the GPU pipeline; None or CPU the CPU pipeline.
    state: a :meth:`DaliLoader.state_dict` of this rank's loader to continue from.
    DALI checkpointing is on (no measurable cost, DALI's docs say), so the loader's
    :meth:`~DaliLoader.state_dict` is always available; one saved over other data than
    ``cfg.data.root`` holds now is refused (:class:`LoaderStateMismatch`). source: the
    resolved ``cfg.data.root``, when the caller has it already (resolving lists every file).
    With ``data.check_files`` (default) this rank first reads the first and last bytes of its
    share of the images (files, or tar shards' members), and names the first that DALI cannot
    decode (:func:`~mscn.data.filecheck.check_training_files`).
    """
    from mscn.config import Config, typed, validate
    from mscn.data.filecheck import check_training_files
    from mscn.pipelines.readers import resolve_source

    check_placement(rank, world_size, local_rank, device)
    # types, ranges, a global batch the ranks cannot split; not the siamese trainer's own needs (2 views,
    # a batch of 2): another project's trainer may take one view or debug with one image
    cfg = typed(cfg, Config)
    # apply_mask=False: the views' masks are never drawn, so their grids need not fit the views
    validate(cfg if apply_mask else dataclasses.replace(cfg, views=[
        dataclasses.replace(v, mask=dataclasses.replace(v.mask, ratio=0.0)) for v in cfg.views]),
        "<config>", world_size=world_size, siamese=False)
    source = source or resolve_source(cfg.data.root, cfg.data.format)
    check_size(source, cfg.train.global_batch, "train.global_batch")
    if cfg.data.check_files:  # this rank's share; two damaged files in one batch crash DALI (mscn.data.filecheck)
        check_training_files(source, rank, world_size)
    seed = rank_seed(cfg.train.seed, rank)
    if apply_mask:
        # a reused loader (another project's trainer) is told what `mscn pretrain` prints: a
        # 32 px grid on 32 px views masks 23 % of a view on average, not 15 %
        for note in coverage_notes([v.mask for v in cfg.views], cfg.data.image_size):
            warnings.warn(note, MaskCoverageWarning, stacklevel=2)
    mask_fn = mask_fn_from_cfgs([v.mask for v in cfg.views], seed) if apply_mask else None
    shard = Shard(rank, world_size, cfg.train.global_batch // world_size, seed)
    p = plan(cfg, device, local_rank)
    note = cfg.colour_where_note(gpu=p.kind == "gpu") if rank == 0 else None
    if note:  # what `mscn pretrain` says at its start: the setting does not look applied
        warnings.warn(note, ColourWhereWarning, stacklevel=2)
    loader = _views_loader(cfg, source, cfg.views, shard, p, mask_fn, state=state, checkpointing=True)
    drift = drift_note(source, world_size, loader.replay.even_shards) if rank == 0 else None
    if drift:  # tar shards of a count the ranks do not divide: what `mscn pretrain` says at its start
        warnings.warn(drift, ShardDriftWarning, stacklevel=2)
    return loader


def linear_probe_view():
    """Returns the ViewCfg of paper App. A.2's training view: random-resized-crop + flip
    (+ high-pass), nothing else."""
    from mscn.config import MaskCfg, ViewCfg

    return ViewCfg(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0, mask=MaskCfg(ratio=0.0))


def build_eval_loader(cfg, root: str, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                      device: torch.device | str | None = None, batch_size: int | None = None,
                      train_views: bool = False, file_list: str | None = None,
                      classes: tuple[str, ...] | None = None) -> DaliLoader:
    """Evaluation loader over ``root`` (any format; ``file_list`` = a list relative to it),
    for the protocols of paper §6.1–6.2 (App. A.2–A.3). Returns a :class:`DaliLoader`
    that yields :class:`MscnBatch`es with one view (and the labels).

    train_views=False: resize shorter side + center crop + high-pass, PARTIAL (every
    sample exactly once across ranks). train_views=True: the linear-probe/fine-tune
    training view (random-resized-crop + flip + high-pass, no colour, blur or mask),
    shuffled, DROP. batch_size is per rank (default ``eval.linear_batch / world_size``).
    classes: the label set (the train root's classes) that ``root``'s labels map into by name.
    """
    from mscn.config import Config, is_integer, typed, validate
    from mscn.data.filecheck import check_headers
    from mscn.data.source import eval_root_setting
    from mscn.pipelines.eval_pipeline import eval_pipeline
    from mscn.pipelines.readers import resolve_source

    check_placement(rank, world_size, local_rank, device)
    if batch_size is not None and (not is_integer(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size: expected an integer >= 1 (images per rank) or None, got {batch_size!r}")
    if classes is not None and (isinstance(classes, str) or not all(isinstance(c, str) for c in classes)):
        # a string would be read as its characters, each a class name that is not among them
        raise TypeError(f"classes: expected a tuple of class names (the training set's, in label order), got "
                        f"{classes!r}")
    # checked with the one view it reads: the recipe's training views (their mask grids, say)
    # do not apply to evaluation views, which may be smaller
    cfg = dataclasses.replace(typed(cfg, Config), views=[linear_probe_view()])
    validate(cfg, siamese=False)
    if file_list:
        source = resolve_source(file_list, "filelist", file_root=root, classes=classes, what="file_list")
    else:
        fmt, what = eval_root_setting(cfg.data, root)
        source = resolve_source(root, fmt, classes=classes, what=what)
    check_headers(source)  # DALI can segfault on a file no decoder takes (mscn.data.filecheck)
    batch = batch_size or max(1, cfg.eval.linear_batch // world_size)
    shard = Shard(rank, world_size, batch, rank_seed(cfg.train.seed, rank))
    p = plan(cfg, device, local_rank, views=[])  # no blur in the evaluation views
    if train_views:
        check_size(source, batch * world_size, "one training batch of the evaluation")
        return _views_loader(cfg, source, [linear_probe_view()], shard, p, None)
    if source.num_samples < world_size:
        raise DataError(f"{source.root}: {source.num_samples} images for {world_size} ranks; need one per rank")
    d = cfg.data
    pipe = eval_pipeline(source, image_size=d.image_size, resize=d.val_resize, mean=d.mean, std=d.std,
                         highpass=p.highpass_in_pipeline, device=p.kind, hw_decoder_load=p.hw_decoder_load,
                         shard_id=rank, num_shards=world_size, reader_seed=shard.seed, view_dtype=p.dali_dtype,
                         batch_size=batch, num_threads=p.threads, device_id=p.device_id, seed=shard.seed,
                         prefetch_queue_depth=d.prefetch, **p.executor)
    replay = Replay(shard_id=rank, num_shards=world_size, shuffle=False, shuffle_buffer=1, stick_to_shard=True,
                    reader_seed=shard.seed, batch_size=batch, prefetch=d.prefetch)
    return DaliLoader(pipe, source, 1, policy=LastBatchPolicy.PARTIAL, output_dtype=p.output_dtype,
                      highpass=p.highpass_in_adapter, replay=replay, handover=d.handover)
