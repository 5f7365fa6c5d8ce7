"""mscn.cuda_kernels: the MSCN masks (paper §5.2) applied to a batch of views.

``apply_masks`` draws one decision table per view (``mscn.maskspec``) and fills the
masks with the Triton kernel on CUDA tensors, or the plain-torch reference elsewhere.
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
from mscn.maskspec import MaskTable, sample_mask_table, sample_tables

try:  # Triton is absent on some platforms (macOS, Windows): the reference still works
    from mscn.cuda_kernels.mask_triton import apply_table_triton, kernel_unsupported
except ImportError as e:  # pragma: no cover - depends on the install
    _TRITON_IMPORT_ERROR: str | None = f"triton is not importable ({e})"
else:
    _TRITON_IMPORT_ERROR = None

__all__ = ["MaskTable", "apply_masks", "apply_tables", "sample_mask_table", "sample_tables"]

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


def apply_tables(views: Sequence[torch.Tensor], tables: Sequence[MaskTable],
                 generator: torch.Generator | None = None, *, inplace: bool = True,
                 backend: str = "auto") -> list[torch.Tensor]:
    """Fill the masks of already-drawn tables (kernel and reference share the tables).

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
    Returns the masked views, or ``(views, masks)`` with ``masks`` a list of bool
    (B, C, H, W) pixel masks when ``return_masks`` (built from the tables, so they
    cost a few bool tensors; meant for tests and figures, not the training loop).
    """
    if backend not in BACKENDS:
        raise MscnError(f"mask backend {backend!r}: must be one of {', '.join(BACKENDS)}")
    tables = sample_tables(views, cfgs, generator)
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
