"""What one timed step is: a batch of a DALI stage, of the torchvision reference, of a
hand-written plain DALI pipeline, or of decode alone (profiling.py traces a few of them)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

def loader_step(loader) -> Callable[[], int]:
    """One :class:`~mscn.pipelines.loader.MscnBatch` of ``loader`` per step."""
    from mscn.pipelines.loader import endless  # DALI is imported on first use only

    batches = endless(loader)
    return lambda: next(batches).views[0].shape[0]


@dataclass(frozen=True)
class Placement:
    """Where and how a benchmark pipeline runs: the fields every DALI pipeline takes."""

    kind: str  # "gpu" or "cpu" (DALI's CPU-only mode)
    device_id: int | None
    threads: int
    hw_decoder_load: float
    batch: int
    shard_id: int = 0
    num_shards: int = 1
    seed: int = 0
    prefetch: int = 2
    executor: dict = field(default_factory=dict)  # data.op_concurrency / stream_policy / thread_affinity (tuning.executor)

    def pipeline_kwargs(self) -> dict:
        return dict(batch_size=self.batch, num_threads=self.threads, device_id=self.device_id, seed=self.seed,
                    prefetch_queue_depth=self.prefetch, **self.executor)


def placement(cfg, device: torch.device, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> Placement:
    """The :class:`Placement` that ``build_train_loader`` would use for ``cfg`` on ``device``."""
    from mscn.pipelines.loader import plan, rank_seed

    p = plan(cfg, device if device.type == "cuda" else None, local_rank)
    return Placement(p.kind, p.device_id, p.threads, p.hw_decoder_load, cfg.train.global_batch // world_size, rank,
                     world_size, rank_seed(cfg.train.seed, rank), cfg.data.prefetch, p.executor)


def decode_pipeline(source, where: Placement, shuffle_buffer: int = 4096):
    """Read + decode only, with the training pipeline's reader and decoder ops (the
    ceiling every other stage is compared with); the images stay inside DALI."""
    from nvidia.dali import pipeline_def

    from mscn.pipelines.ops import decode
    from mscn.pipelines.readers import read

    @pipeline_def
    def decode_only():
        encoded, _, _ = read(source, shard_id=where.shard_id, num_shards=where.num_shards, shuffle=True,
                             shuffle_buffer=shuffle_buffer, stick_to_shard=False, seed=where.seed)
        return decode(encoded, where.kind, where.hw_decoder_load)

    return decode_only(**where.pipeline_kwargs())


def plain_pipeline(source, where: Placement, num_views: int, size: int, highpass: tuple[float, int] | None,
                   shuffle_buffer: int = 4096):
    """The baseline a user would write by hand with DALI's own ops (no mscn code after the
    reader): per view ``fn.random_resized_crop``, then ``if coin:`` colour twist,
    grayscale and a fixed 23-tap blur (SimCLR's p = 0.8 / 0.2 / 0.5), one
    ``crop_mirror_normalize``, and the high-pass as blur-and-subtract on the float view.
    No masks. Its outputs stay inside DALI."""
    from nvidia.dali import fn, pipeline_def, types

    from mscn.config import IMAGENET_MEAN, IMAGENET_STD
    from mscn.pipelines.readers import read

    def coin(p):
        return fn.random.coin_flip(probability=p, dtype=types.BOOL)

    @pipeline_def(enable_conditionals=True)
    def plain():
        encoded, _, _ = read(source, shard_id=where.shard_id, num_shards=where.num_shards, shuffle=True,
                             shuffle_buffer=shuffle_buffer, stick_to_shard=False, seed=where.seed)
        gpu = where.kind == "gpu"
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                   **({"hw_decoder_load": where.hw_decoder_load} if gpu else {}))
        outs = []
        for _ in range(num_views):
            x = fn.random_resized_crop(images, size=[size, size], random_area=[0.08, 1.0])
            if coin(0.8):
                x = fn.color_twist(x, brightness=fn.random.uniform(range=[0.2, 1.8]),
                                   contrast=fn.random.uniform(range=[0.2, 1.8]),
                                   saturation=fn.random.uniform(range=[0.2, 1.8]),
                                   hue=fn.random.uniform(range=[-72.0, 72.0]))
            if coin(0.2):
                x = fn.color_twist(x, saturation=0.0)
            if coin(0.5):
                x = fn.gaussian_blur(x, sigma=fn.random.uniform(range=[0.1, 2.0]), window_size=23)
            y = fn.crop_mirror_normalize(x, mirror=fn.random.coin_flip(probability=0.5), mean=list(IMAGENET_MEAN),
                                         std=list(IMAGENET_STD), output_layout="CHW", dtype=types.FLOAT)
            if highpass is not None:
                y = y - fn.gaussian_blur(y, sigma=highpass[0], window_size=highpass[1])
            outs.append(y)
        return tuple(outs)

    return plain(**where.pipeline_kwargs())


def pipeline_step(pipe, source, where: Placement, shuffle_buffer: int) -> Callable[[], int]:
    """One ``pipe.run()`` per step; the outputs stay in DALI (no copy to torch). A file DALI
    cannot read or decode stops the bench with one line naming it, as the loader's rows do
    (pipelines/diagnose.py replays the reader, which these pipelines build with the
    loader's arguments)."""
    from mscn.pipelines.diagnose import explain
    from mscn.pipelines.loader import Replay

    replay = Replay(shard_id=where.shard_id, num_shards=where.num_shards, shuffle=True,
                    shuffle_buffer=shuffle_buffer, stick_to_shard=False, reader_seed=where.seed,
                    batch_size=where.batch, prefetch=where.prefetch)
    runs = 0
    try:
        pipe.build()
    except RuntimeError as e:
        raise explain(e, source, None, 0) from None

    def step() -> int:
        nonlocal runs
        try:
            out = pipe.run()  # the readers loop over epochs by themselves
        except RuntimeError as e:
            raise explain(e, source, replay, runs) from None
        runs += 1
        return len(out[0])

    return step


def decode_step(cfg, where: Placement) -> tuple[Callable[[], int], object]:
    from mscn.pipelines.readers import resolve_source

    source = resolve_source(cfg.data.root, cfg.data.format)
    pipe = decode_pipeline(source, where, cfg.data.shuffle_buffer)
    return pipeline_step(pipe, source, where, cfg.data.shuffle_buffer), pipe


def plain_step(cfg, where: Placement, num_views: int) -> tuple[Callable[[], int], object]:
    from mscn.highpass import highpass_params
    from mscn.pipelines.readers import resolve_source

    source = resolve_source(cfg.data.root, cfg.data.format)
    pipe = plain_pipeline(source, where, num_views, cfg.data.image_size, highpass_params(cfg.highpass),
                          cfg.data.shuffle_buffer)
    return pipeline_step(pipe, source, where, cfg.data.shuffle_buffer), pipe


def torchvision_step(cfg, where: Placement, workers: int, device: torch.device) -> tuple[Callable[[], int], object]:
    """The PIL/torchvision DataLoader doing the same views and high-pass (pipelines/reference.py),
    its batches moved to ``device`` and masked there, as a user's loop would.

    An endless sampler instead of epochs: with few batches per epoch every epoch
    boundary would idle the workers, a cost the DALI reader (which loops) doesn't pay.
    """
    from torch.utils.data import DataLoader, RandomSampler

    from mscn.highpass import highpass_params
    from mscn.pipelines.loader import mask_fn_from_cfgs
    from mscn.pipelines.reference import ReferenceViews, worker_errors
    from mscn.pipelines.readers import resolve_source

    d = cfg.data
    hp = highpass_params(cfg.highpass)
    dataset = ReferenceViews(resolve_source(d.root, d.format), cfg.views, d.image_size, d.mean, d.std, hp)
    seed = where.seed
    sampler = RandomSampler(dataset, num_samples=1 << 40, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, batch_size=where.batch, sampler=sampler, num_workers=workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    mask_fn = mask_fn_from_cfgs([v.mask for v in cfg.views], seed)
    batches = worker_errors(loader)  # a bad image: one line naming it, not the worker's traceback

    def step() -> int:
        *views, _, _ = next(batches)
        views = mask_fn([v.to(device, non_blocking=True) for v in views])
        return views[0].shape[0]

    return step, (loader, batches)
