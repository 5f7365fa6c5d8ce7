"""mscn.cuda_kernels: the MSCN masks (paper §5.2) applied to a batch of views.

``apply_masks`` draws one decision table per view and fills the masks: on CUDA tensors
both steps are Triton kernels (mask_tables_triton.py, mask_triton.py); elsewhere the
torch sampler (``mscn.maskspec``) and the plain-torch reference do the same.
A CUDA tensor that the kernel cannot take falls back to the reference with a one-time
warning (the nanoGPT flash-attention pattern). Semantics and defaults: docs/MASKS.md.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from mscn.config import MaskCfg
from mscn.cuda_kernels.mask_reference import apply_table_reference
from mscn.errors import MscnError
from mscn.maskspec import MaskTable, check_generator, check_views, sample_mask_table, sample_tables

try:  # Triton is absent on some platforms (macOS, Windows): the reference still works
    from mscn.cuda_kernels.mask_tables_triton import group_key, kernel_supports, sample_mask_tables_triton
    from mscn.cuda_kernels.mask_triton import apply_table_triton, kernel_unsupported
except ImportError as e:  # pragma: no cover - depends on the install
    _TRITON_IMPORT_ERROR: str | None = f"triton is not importable ({e})"
else:
    _TRITON_IMPORT_ERROR = None

__all__ = ["MaskTable", "apply_masks", "apply_tables", "draw_tables", "sample_mask_table", "sample_tables"]

BACKENDS = ("auto", "triton", "torch")
_warned = False


def _why_not_triton(x: torch.Tensor) -> str | None:
    return _TRITON_IMPORT_ERROR or kernel_unsupported(x)


def _pick_backend(x: torch.Tensor, backend: str) -> str:
    if backend not in BACKENDS:
        raise MscnError(f"mask backend {backend!r}: must be one of {', '.join(BACKENDS)}")
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return "torch"  # the CPU path by design: no warning
    why = _why_not_triton(x)
    if why is None:
        return "triton"
    if backend == "triton":
        raise MscnError(f"backend='triton': the mask kernel cannot run on {why}")
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"mscn masks: Triton kernel unavailable for {why}; "
                      "using the slower plain-torch reference", RuntimeWarning, stacklevel=3)
    return "torch"


def draw_tables(views: Sequence[torch.Tensor], cfgs: Sequence[MaskCfg],
                generator: torch.Generator | None = None, *, backend: str = "auto") -> list[MaskTable]:
    """Draw paper §5.2's masks for a batch: returns one :class:`MaskTable` per view, in
    view order, on the device where the fill will run.

    Triton backend: one launch of the table kernel draws every view that shares a size,
    grid and offset rule (mask_tables_triton.py), each view keyed by one Philox key drawn
    from ``generator`` in a single draw: the default views cost 2 launches (keys, tables)
    and no host sync. Torch backend: the vectorised
    torch sampler (``mscn.maskspec``), the CPU path. Same semantics and distribution;
    the random streams differ, so a seed reproduces tables within one backend.
    """
    check_views(views, cfgs)  # before the shape is read below
    if not views or _pick_backend(views[0], backend) != "triton" or any(
            not kernel_supports(v.shape[2], v.shape[3], c) for v, c in zip(views, cfgs)):
        return sample_tables(views, cfgs, generator)
    return _tables_from_keys(views, cfgs, _draw_keys(views, generator))


def _draw_keys(views: Sequence[torch.Tensor], generator: torch.Generator | None) -> torch.Tensor:
    """One Philox key per view, in one draw from ``generator``, on the views' device."""
    dev = views[0].device
    if any(v.device != dev for v in views):
        raise MscnError(f"views on several devices ({sorted({str(v.device) for v in views})}): "
                        "the table kernel draws a batch's tables on one")
    rng_dev = generator.device if generator is not None else dev
    keys = torch.randint(0, 2**62, (len(views),), generator=generator, device=rng_dev, dtype=torch.int64)
    # non_blocking only towards a GPU (see maskspec._uniform)
    return keys.to(dev, non_blocking=dev.type == "cuda")


def _tables_from_keys(views: Sequence[torch.Tensor], cfgs: Sequence[MaskCfg], keys: torch.Tensor) -> list[MaskTable]:
    """The table kernel's tables for ``keys`` (one per view)."""
    # one launch per run of views that share a size, grid and offset rule: the default
    # views (same size, asymmetric ratios) are one run, so the batch costs 2 launches
    # (runs of neighbouring views, so that their keys are a slice: indexing with a list
    # would copy the index to the device, a host sync)
    runs: list[list[int]] = []
    for i, (v, cfg) in enumerate(zip(views, cfgs)):
        sig = (tuple(v.shape), group_key(v.shape[2], v.shape[3], cfg))
        if runs and runs[-1][0] == sig:
            runs[-1][1].append(i)
        else:
            runs.append([sig, [i]])
    tables: list[MaskTable] = []
    for (shape, _), idx in runs:
        tables += sample_mask_tables_triton(*shape, [cfgs[i] for i in idx], keys[idx[0]:idx[-1] + 1])
    return tables


def apply_tables(views: Sequence[torch.Tensor], tables: Sequence[MaskTable],
                 generator: torch.Generator | None = None, *, inplace: bool = True,
                 backend: str = "auto") -> list[torch.Tensor]:
    """Fill the masks of already-drawn tables (paper §5.2: zero, or noise where the table
    says so): returns the masked views, in view order (the inputs themselves when
    ``inplace``). Kernel and reference read the same tables.

    ``generator`` only feeds the reference's noise; the kernel's noise is keyed by the
    per-sample Philox seeds in the tables.
    """
    outs = []
    for x, table in zip(views, tables, strict=True):
        out = x if inplace else None
        if _pick_backend(x, backend) == "triton":
            outs.append(apply_table_triton(x, table, out=out))
        else:
            outs.append(apply_table_reference(x, table, out=out, generator=generator))
    return outs


def apply_masks(views: list[torch.Tensor], cfgs: list[MaskCfg], generator: torch.Generator | None = None,
                *, inplace: bool = True, return_masks: bool = False, backend: str = "auto"):
    """Mask every view of a batch with its own config (paper §5.2; defaults in docs/MASKS.md).

    views: list of (B, C, H, W) float tensors, one per view (the pipeline's output).
    cfgs: one MaskCfg per view (``[v.mask for v in cfg.views]``).
    generator: seeds the tables (and the reference's noise); None uses torch's global RNG.
    backend: auto (Triton on CUDA tensors, reference elsewhere) | triton | torch.
    On an H200 this took 0.402 ms for 4 x 256 x 3 x 224² float32 views (tables 0.164 ms,
    fill 0.340 ms; docs/PERFORMANCE.md, round 4); drawing the decisions inside the fill
    instead measured 1.09 ms and was removed (docs/perf/HISTORY.md, round 3).
    Returns the masked views, or ``(views, masks)`` with ``masks`` a list of bool
    (B, C, H, W) pixel masks when ``return_masks`` (built from the tables, so they
    cost a few bool tensors; meant for tests and figures, not the training loop).
    """
    if backend not in BACKENDS:
        raise MscnError(f"mask backend {backend!r}: must be one of {', '.join(BACKENDS)}")
    check_generator(generator, views, inplace)
    tables = draw_tables(views, cfgs, generator, backend=backend)
    # ratio 0 masks nothing: skip the pass over memory (the table is still drawn, so the
    # generator advances the same way whatever the ratios)
    todo = [i for i, c in enumerate(cfgs) if c.ratio > 0]
    done = apply_tables([views[i] for i in todo], [tables[i] for i in todo], generator,
                        inplace=inplace, backend=backend)
    outs = dict(zip(todo, done))
    outs = [outs[i] if i in outs else (v if inplace else v.clone()) for i, v in enumerate(views)]
    if return_masks:
        return outs, [t.pixel_mask() for t in tables]
    return outs
