"""The torchvision/PIL DataLoader a user would otherwise write: same views, high-pass, masks.

It is the baseline of the benchmark and the reference of the equivalence tests, so
it does the same work as the DALI pipeline (paper App. A.1 views, §5.1 high-pass,
§5.2 masks) the way the MoCo/SimCLR/BYOL codebases do it: PIL decode, torchvision
transforms per view, blur with PIL's ``ImageFilter.GaussianBlur`` (MoCo's
``GaussianBlur``; torchvision's ``GaussianBlur`` on a PIL image is a dense 23x23
convolution, ~60 ms per view against ~1.3 ms on one CPU core, which would
make the baseline look slower than what users run), normalize, then the high-pass in
torch on the normalized tensor (same kernel and reflect-101 border as DALI), then the
masks on the collated batch.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T

from mscn.config import ViewCfg, checked, is_integer
from mscn.data.source import Source, resolve_source
from mscn.errors import DataError, MscnError
from mscn.highpass import highpass_matmul, highpass_params
from mscn.pipelines.args import check_placement, check_views
from mscn.pipelines.loader import TORCH_DTYPES, MscnBatch, check_size, mask_fn_from_cfgs, rank_seed
from mscn.pipelines.tuning import view_dtype


class PILGaussianBlur:
    """Gaussian blur with σ ~ U[sigma] (MoCo v2 / SimCLR: https://arxiv.org/abs/2002.05709)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def view_transform(view: ViewCfg, size: int, mean, std) -> T.Compose:
    """One view's torchvision transform, in the DALI pipeline's order (ops.py)."""
    ops = [T.RandomResizedCrop(size, scale=view.scale, ratio=view.ratio),
           T.RandomHorizontalFlip(view.flip_prob)]
    if view.jitter_prob > 0:
        jitter = T.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)
        ops.append(T.RandomApply([jitter], p=view.jitter_prob))
    if view.grayscale_prob > 0:
        ops.append(T.RandomGrayscale(view.grayscale_prob))
    if view.blur_prob > 0:
        ops.append(T.RandomApply([PILGaussianBlur(view.blur_sigma)], p=view.blur_prob))
    if view.solarize_prob > 0:
        ops.append(T.RandomSolarize(128, p=view.solarize_prob))
    # ToTensor scales to [0, 1]: the 0-255 mean/std of the config are divided by 255
    ops += [T.ToTensor(), T.Normalize([m / 255 for m in mean], [s / 255 for s in std])]
    return T.Compose(ops)


class ReferenceViews(Dataset):
    """``(view0, ..., view{N-1}, label, index)`` per image, high-passed when ``highpass``."""

    def __init__(self, source: Source, views: list[ViewCfg], size: int, mean, std,
                 highpass: tuple[float, int] | None):
        if source.kind == "wds":
            raise DataError(f"{source.root}: the torchvision reference reads image files, not tar shards")
        self.source, self.highpass = source, highpass
        self.transforms = [view_transform(v, size, mean, std) for v in views]

    def __len__(self) -> int:
        return self.source.num_samples

    def __getitem__(self, i: int):
        path = Path(self.source.root) / self.source.files[i]
        try:
            with Image.open(path) as f:
                img = ImageOps.exif_transpose(f).convert("RGB")  # upright, as DALI's decoder turns it
        except (OSError, ValueError, SyntaxError) as e:  # PIL's ways of saying "not an image I can decode"
            raise DataError(f"{path}: cannot be decoded ({e}); run `mscn data scan {self.source.root}` and "
                            "use the file list it writes") from None
        views = [t(img) for t in self.transforms]
        if self.highpass is not None:
            views = [highpass_matmul(v.unsqueeze(0), *self.highpass)[0] for v in views]
        return (*views, self.source.labels[i], i)


def worker_errors(batches):
    """``batches`` (a DataLoader or its iterator), with a :class:`~mscn.errors.MscnError` raised in
    a worker process re-raised as the one line it was: torch wraps it in a message that
    carries the worker's traceback ("Caught DataError in DataLoader worker process 0. ...")."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except MscnError as e:
            last = str(e).rstrip().splitlines()[-1] if str(e).strip() else ""
            prefix = f"{type(e).__module__}.{type(e).__qualname__}: "
            raise type(e)(last[len(prefix):] if last.startswith(prefix) else str(e)) from None
        yield batch


class ReferenceLoader:
    """Iterable of :class:`MscnBatch` over a torch DataLoader (masks applied per batch).

    ``dtype``: the views' dtype (``data.output_dtype`` on the CPU path), cast before the
    masks as in :class:`DaliLoader`. Each ``iter()`` is a new epoch: a
    ``DistributedSampler`` is told which (``set_epoch``), else every epoch would repeat
    the first one's order on every rank."""

    def __init__(self, loader: DataLoader, num_views: int, mask_fn=None, dtype: torch.dtype = torch.float32):
        self.loader, self.num_views, self.mask_fn, self.dtype = loader, num_views, mask_fn, dtype
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if isinstance(self.loader.sampler, DistributedSampler):
            self.loader.sampler.set_epoch(self.epoch)
        self.epoch += 1
        for *views, labels, index in worker_errors(self.loader):
            views = [v if v.dtype == self.dtype else v.to(self.dtype) for v in views]
            if self.mask_fn is not None and len(index):
                views = self.mask_fn(views)
            yield MscnBatch(views, labels.long(), index.long())


def build_reference_loader(cfg, batch_size: int, workers: int = 2, rank: int = 0, world_size: int = 1,
                           apply_mask: bool = True, views: list[ViewCfg] | None = None,
                           drop_last: bool = True) -> ReferenceLoader:
    """The reference counterpart of ``build_train_loader`` (paper §5.3's views from
    ``data.root`` and ``cfg.views``, in torchvision + torch): returns a
    :class:`ReferenceLoader` that yields the same kind of batches (the tests compare the
    DALI loader's view statistics with it).

    The config gets the checks ``build_train_loader``'s does. ``batch_size`` is per rank.
    With ``world_size`` > 1 the ranks read disjoint slices of one shuffle (a
    ``DistributedSampler`` seeded with ``train.seed`` on every rank: a seed per rank would
    make the slices overlap and leave images out), reshuffled every epoch; the
    augmentations and masks draw from a seed per rank."""
    cfg = checked(cfg, siamese=False)
    views = cfg.views if views is None else check_views(views)
    for name, v in (("batch_size", batch_size), ("workers", workers)):
        if not is_integer(v) or v < (1 if name == "batch_size" else 0):
            raise ValueError(f"{name}: expected an integer >= {1 if name == 'batch_size' else 0}, got {v!r}")
    check_placement(rank, world_size, 0, None)
    source = resolve_source(cfg.data.root, cfg.data.format)
    if drop_last:  # else the loader would have no batch, without a word (DaliLoader says so too)
        check_size(source, batch_size * world_size, f"batch_size {batch_size} x world_size {world_size}")
    hp = highpass_params(cfg.highpass)
    dataset = ReferenceViews(source, views, cfg.data.image_size, cfg.data.mean, cfg.data.std, hp)
    seed = rank_seed(cfg.train.seed, rank)
    sampler = (DistributedSampler(dataset, world_size, rank, shuffle=True, seed=cfg.train.seed, drop_last=drop_last)
               if world_size > 1 else None)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=workers, drop_last=drop_last, generator=gen,
                        persistent_workers=workers > 0)
    mask_fn = mask_fn_from_cfgs([v.mask for v in views], seed) if apply_mask else None
    return ReferenceLoader(loader, len(views), mask_fn, TORCH_DTYPES[view_dtype(cfg.data.output_dtype, False)])
