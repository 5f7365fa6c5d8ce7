"""The MSCN masking strategy as a small per-sample decision table (paper §5.2, Fig. 3).

Everything random about a view's mask except the per-pixel noise values is decided
here, in torch, vectorised over the batch: the grid offset, which cells are masked
(random grid mask or one focal rectangle, shared by all channels or drawn per channel)
and whether the masked area is filled with noise. The Triton kernel and the plain-torch
reference in ``mscn.cuda_kernels`` both consume the same :class:`MaskTable`, so for one
table they mask exactly the same pixels (docs/MASKS.md states the semantics in full).

Cell geometry: with grid ``g`` and offset ``(dy, dx)``, pixel ``(h, w)`` lies in cell
``((h + dy) // g, (w + dx) // g)``. A sample's grid has ``ceil((H + dy) / g)`` rows of
cells; partial cells at the border count as cells. ``offset`` is zero without
``random_offset``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mscn.config import MaskCfg, validate_mask
from mscn.errors import ConfigError, MscnError


@dataclass
class MaskTable:
    """Decisions for one view of a batch: tens of KB at most, whatever the image size."""

    cells: torch.Tensor  # bool (B, C, nH, nW): True = the cell is masked in that channel
    offset: torch.Tensor  # int32 (B, 2): grid offset (dy, dx), each in [0, grid)
    noise: torch.Tensor  # bool (B,): fill with N(0, noise_std^2) instead of 0
    seed: torch.Tensor  # int64 (B,): Philox key of the sample's in-kernel noise
    focal: torch.Tensor  # bool (B, C): the channel's mask is one rectangle (for tests/plots)
    independent: torch.Tensor  # bool (B,): each channel drew its own mask (for tests/plots)
    grid: int
    noise_std: float
    height: int
    width: int

    @property
    def batch(self) -> int:
        return self.cells.shape[0]

    @property
    def channels(self) -> int:
        return self.cells.shape[1]

    def cell_counts(self) -> torch.Tensor:
        """int64 (B, 2): rows and columns of cells that touch the image, per sample."""
        return _cell_counts(self.offset, self.height, self.width, self.grid)

    def masked_pixels(self) -> torch.Tensor:
        """int64 (B, C): masked pixels per channel, from the cell areas (no pixel-size tensor)."""
        g = self.grid
        off = self.offset.long()

        def sides(n: int, size: int, o: torch.Tensor) -> torch.Tensor:  # (B, n) cell extents
            start = torch.arange(n, device=o.device) * g - o[:, None]
            return (torch.clamp(start + g, max=size) - torch.clamp(start, min=0)).clamp(min=0)

        _, _, nH, nW = self.cells.shape
        rows, cols = sides(nH, self.height, off[:, 0]), sides(nW, self.width, off[:, 1])
        # elementwise, not einsum: integer matmul does not exist on CUDA
        return (self.cells * rows[:, None, :, None] * cols[:, None, None, :]).sum((2, 3))

    def check_view(self, x: torch.Tensor) -> None:
        """Raise MscnError unless ``x`` is the (B, C, H, W) view this table was drawn for."""
        shape = (self.batch, self.channels, self.height, self.width)
        if tuple(x.shape) != shape or x.device != self.cells.device:
            raise MscnError(f"mask table is for {shape} on {self.cells.device}, "
                            f"the view is {tuple(x.shape)} on {x.device}")

    def pixel_mask(self) -> torch.Tensor:
        """bool (B, C, H, W): True where a pixel is masked (the cells expanded to pixels)."""
        B, C, nH, nW = self.cells.shape
        g, H, W = self.grid, self.height, self.width
        dev = self.cells.device
        off = self.offset.long()
        cy = (torch.arange(H, device=dev) + off[:, :1]) // g  # (B, H)
        cx = (torch.arange(W, device=dev) + off[:, 1:]) // g  # (B, W)
        rows = self.cells.gather(2, cy[:, None, :, None].expand(B, C, H, nW))
        return rows.gather(3, cx[:, None, None, :].expand(B, C, H, W))


def _cell_counts(offset: torch.Tensor, height: int, width: int, grid: int) -> torch.Tensor:
    # python ints, not torch.tensor([h, w], device=...): that copy would sync with the GPU
    off = offset.long()
    return torch.stack([(off[:, 0] + height + grid - 1) // grid, (off[:, 1] + width + grid - 1) // grid], 1)


def expected_fraction(cfg: MaskCfg, size: int) -> float:
    """The expected share of a ``size`` x ``size`` view's cells that the mask covers, over the
    grid offsets: ``round(ratio * n) / n`` for a grid of ``n`` cells (the draw's own rule).
    Cells partition the view, so a random mask covers that share of its pixels on average.
    Close to ``ratio`` when the grid is fine; a coarse grid rounds far from it (paper §5.2
    uses 32 px on 224 px views: 7 or 8 cells a side)."""
    g = cfg.grid
    offsets = range(g) if cfg.random_offset else range(1)
    sides = [-(-(o + size) // g) for o in offsets]  # cells per side, each offset alike
    total = 0.0
    for rows in sides:
        for cols in sides:
            n = rows * cols
            total += math.floor(cfg.ratio * n + 0.5) / n
    return total / len(sides) ** 2


class MaskCoverageWarning(UserWarning):
    """A loader's view is masked far from its ``ratio`` (one of :func:`coverage_notes`)."""


def coverage_notes(masks: Sequence[MaskCfg], size: int, key: str = "views") -> list[str]:
    """A line for each masked view whose grid makes it mask far from its ``ratio`` (more than
    a quarter off, or never): the masked share the paper's ablations vary (§6.3, Fig. 5)."""
    notes = []
    for i, m in enumerate(masks):
        if m.ratio <= 0:
            continue
        got = expected_fraction(m, size)
        where = f"{key}[{i}].mask: a {m.grid} px grid on {size} px views"
        if got == 0:
            notes.append(f"{where} has too few cells for ratio {m.ratio:g} to mask one: this view is never masked; "
                         "lower mask.grid")
        elif got >= 1.0:
            notes.append(f"{where}: ratio {m.ratio:g} rounds to every cell, so this view is all mask (zeros or "
                         "noise); lower mask.ratio or mask.grid")
        elif abs(got - m.ratio) > 0.25 * m.ratio:
            notes.append(f"{where} masks {100 * got:.0f} % of it on average, not {100 * m.ratio:g} % (ratio "
                         f"{m.ratio:g} of a few cells rounds far); lower mask.grid for a share close to the ratio")
    return notes


def check_mask_cfg(cfg: MaskCfg, key: str = "mask") -> None:
    """The types and ranges of ``mscn.config.validate`` for a MaskCfg built in code, not from
    a file. The types are checked only when a range check trips on one (``ratio="0.2"``): a
    rebuild per call would be host time on every masked batch."""
    try:
        validate_mask(cfg, "<code>", key)
    except TypeError:  # a value of the wrong type: the schema's one line names it
        from mscn.config import typed

        validate_mask(typed(cfg, MaskCfg, "<code>", key), "<code>", key)
        raise


def _uniform(shape, generator, device) -> torch.Tensor:
    """U[0, 1) drawn on the generator's device (a generator only feeds its own device)."""
    rng_dev = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=rng_dev)
    # non_blocking only towards a GPU: a non-blocking GPU -> CPU copy lands in pinned
    # memory that the CPU ops below would read before the copy has finished
    return u.to(device, non_blocking=torch.device(device).type == "cuda")


def _random_cells(u: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Exactly k[b] valid cells per (b, c), uniformly without replacement.

    Ranking uniform scores (invalid cells pushed last) gives a uniform k-subset;
    the double argsort makes the count exact even if two scores tie.
    """
    B, C, nH, nW = u.shape
    scores = u.masked_fill(~valid[:, None], 2.0).flatten(2)
    rank = scores.argsort(dim=-1).argsort(dim=-1)
    return (rank < k[:, None, None]).view(B, C, nH, nW)


def _focal_cells(u: torch.Tensor, counts: torch.Tensor, k: torch.Tensor, aspect: tuple[float, float],
                 nH: int, nW: int) -> torch.Tensor:
    """One rectangle of about k cells per (b, c) (the focal mask of MSN, Assran et al. 2022).

    Aspect (height/width) is log-uniform in ``aspect``; the sides are rounded, clipped
    to the sample's grid and the rectangle is placed uniformly among the positions
    where it fits. ``u`` holds 3 uniforms per (b, c): aspect, top, left.
    """
    lo, hi = math.log(aspect[0]), math.log(aspect[1])
    ratio = torch.exp(lo + u[..., 0] * (hi - lo))  # (B, C)
    kf = k[:, None].float()
    nh, nw = counts[:, :1], counts[:, 1:]  # (B, 1) each
    fh = torch.minimum(torch.floor(torch.sqrt(kf * ratio) + 0.5).long().clamp(min=1), nh)
    fw = torch.minimum(torch.floor(kf / fh + 0.5).long().clamp(min=1), nw)
    fh = torch.where(k[:, None] > 0, fh, 0)  # ratio 0 (or round to 0): no rectangle
    top = torch.floor(u[..., 1] * (nh - fh + 1)).long()
    left = torch.floor(u[..., 2] * (nw - fw + 1)).long()
    iy = torch.arange(nH, device=u.device)[None, None, :, None]
    ix = torch.arange(nW, device=u.device)[None, None, None, :]
    inside_y = (iy >= top[..., None, None]) & (iy < (top + fh)[..., None, None])
    inside_x = (ix >= left[..., None, None]) & (ix < (left + fw)[..., None, None])
    return inside_y & inside_x


def sample_mask_table(batch: int, channels: int, height: int, width: int, cfg: MaskCfg,
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> MaskTable:
    """Draw the masks of one view for a whole batch, vectorised, without host syncs.

    Every random number comes from ``generator`` (on its own device, then moved to
    ``device``), in a fixed order, so a seeded generator reproduces the table.
    """
    check_mask_cfg(cfg)
    if min(batch, channels, height, width) < 1:
        raise MscnError(f"cannot mask an empty view of shape {(batch, channels, height, width)}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    B, C, g = batch, channels, cfg.grid
    # room for the largest grid any offset produces; cells past a sample's grid stay False
    span = g - 1 if cfg.random_offset else 0
    nH, nW = -(-(height + span) // g), -(-(width + span) // g)

    if cfg.random_offset:
        offset = torch.floor(_uniform((B, 2), generator, device) * g).to(torch.int32)
    else:
        offset = torch.zeros(B, 2, dtype=torch.int32, device=device)
    counts = _cell_counts(offset, height, width, g)  # (B, 2) cells per side
    k = torch.floor(cfg.ratio * counts.prod(1).double() + 0.5).long()  # round half up

    valid = ((torch.arange(nH, device=device)[None, :, None] < counts[:, :1, None])
             & (torch.arange(nW, device=device)[None, None, :] < counts[:, 1:, None]))
    random_cells = _random_cells(_uniform((B, C, nH, nW), generator, device), valid, k)
    focal_cells = _focal_cells(_uniform((B, C, 3), generator, device), counts, k,
                               cfg.focal_aspect, nH, nW)
    focal = _uniform((B, C), generator, device) < cfg.p_focal
    cells = torch.where(focal[..., None, None], focal_cells, random_cells)

    # shared masks: every channel takes channel 0's draw
    independent = _uniform((B,), generator, device) < cfg.p_ind
    cells = torch.where(independent[:, None, None, None], cells, cells[:, :1])
    focal = torch.where(independent[:, None], focal, focal[:, :1])

    noise = _uniform((B,), generator, device) < cfg.p_noise
    rng_dev = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (B,), generator=generator, device=rng_dev, dtype=torch.int64)
    return MaskTable(cells=cells, offset=offset, noise=noise, seed=seed.to(device), focal=focal,
                     independent=independent, grid=g, noise_std=float(cfg.noise_std),
                     height=height, width=width)


def sample_tables(views: Sequence[torch.Tensor], cfgs: Sequence[MaskCfg],
                  generator: torch.Generator | None = None) -> list[MaskTable]:
    """The torch sampler of paper §5.2's masks: returns one :class:`MaskTable` per view
    (each on its view's device), in view order, each drawn with its view's own MaskCfg
    (asymmetric masking). The CPU path, and the law the table kernel is tested against."""
    check_views(views, cfgs)
    return [sample_mask_table(*v.shape, cfg, generator, v.device) for v, cfg in zip(views, cfgs)]


def check_views(views: Sequence[torch.Tensor], cfgs: Sequence[MaskCfg]) -> None:
    """One config per view, every view a floating (B, C, H, W) tensor, every MaskCfg in range
    (the checks of both table samplers: this one and the Triton table kernel's)."""
    if isinstance(views, torch.Tensor):  # a stack of the views: its truth value would be asked below
        raise MscnError(f"views: expected a list of (B, C, H, W) tensors, one per view, got one tensor of shape "
                        f"{tuple(views.shape)}" + (" (list(t.unbind(0)) splits a stack)" if views.dim() == 5 else ""))
    if isinstance(cfgs, MaskCfg):
        raise MscnError("cfgs: expected one MaskCfg per view (a list), got a single MaskCfg")
    if len(views) != len(cfgs):
        raise ConfigError(f"views: the config has {len(cfgs)} views but {len(views)} tensors were given")
    for i, (v, cfg) in enumerate(zip(views, cfgs)):
        if not isinstance(v, torch.Tensor) or v.dim() != 4 or not v.is_floating_point():
            got = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise MscnError(f"view {i}: expected a floating (B, C, H, W) tensor, got {got}")
        if not isinstance(cfg, MaskCfg):  # a ViewCfg has a `ratio` too (its crop's aspect ratio)
            hint = " (a ViewCfg: pass its .mask)" if hasattr(cfg, "mask") else ""
            raise MscnError(f"cfgs[{i}]: expected a MaskCfg, got {type(cfg).__name__}{hint}")
        check_mask_cfg(cfg, key=f"views[{i}].mask")


def check_generator(generator, views: Sequence[torch.Tensor], inplace: bool) -> None:
    """The generator is a torch.Generator (or None), and an in-place fill may write the views
    (a leaf that requires grad may not be written in place)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise MscnError(f"generator: expected a torch.Generator or None, got {type(generator).__name__} "
                        "(torch.Generator(device).manual_seed(seed) makes one from a seed)")
    if inplace and torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad and v.is_leaf
                                                   for v in views):  # other kinds: check_views names them
        raise MscnError("views: a leaf tensor that requires grad cannot be masked in place; pass inplace=False")
