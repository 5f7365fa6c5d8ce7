"""The loader's colour step on a batch of views (paper App. A.1; ``data.colour_where=loader``):
the Triton kernel on CUDA tensors, the plain-torch reference elsewhere. The arithmetic, and
why the step may move out of DALI, are in ``mscn.colour``."""
from __future__ import annotations

import torch

from mscn.colour import PARAMS, colour_reference
from mscn.errors import MscnError
from mscn.h2d import to_device


def colour_per_sample(x: torch.Tensor, params: torch.Tensor, mean, std, dtype=torch.float32) -> torch.Tensor:
    """Flip, colour-jitter and gray each sample as its numbers say, then normalize
    (``mscn.colour``): uint8 (B, H, W, 3) RGB crops -> (B, 3, H, W) views in ``dtype``.

    ``params``: (B, 7) float (``mscn.colour.PARAMS``), on the host or ``x``'s device. On
    CUDA the Triton kernel, elsewhere the reference.
    """
    if x.dim() != 4 or x.shape[3] != 3 or x.dtype != torch.uint8:
        raise MscnError(f"colour_per_sample expects uint8 (B, H, W, 3) crops, got {tuple(x.shape)} {x.dtype}")
    params = params.reshape(x.shape[0], -1) if params.numel() == x.shape[0] * len(PARAMS) else params
    if params.shape != (x.shape[0], len(PARAMS)):
        raise MscnError(f"colour parameters of shape {tuple(params.shape)} for {x.shape[0]} views: "
                        f"need ({x.shape[0]}, {len(PARAMS)})")
    if not x.is_cuda:
        return colour_reference(x, params, mean, std, dtype)
    from mscn.cuda_kernels.colour_triton import colour_triton  # Triton only where a GPU runs it

    # DALI may hand the numbers over on the host: through pinned memory (mscn.h2d)
    return colour_triton(x.contiguous(), to_device(params.float(), x.device).contiguous(), mean, std, dtype)
