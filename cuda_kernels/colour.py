"""The loader's colour step on a batch of views (paper App. A.1; ``data.colour_where=loader``):
the Triton kernel on CUDA tensors, the plain-torch reference elsewhere. The arithmetic, and
why the step may move out of DALI, are in ``mscn.colour``."""
from __future__ import annotations

import torch

from mscn.colour import DRAWS, ColourLaw, colour_reference, params_from_draws
from mscn.errors import MscnError
from mscn.h2d import to_device


def colour_per_sample(x: torch.Tensor, draws: torch.Tensor, law: ColourLaw, mean, std,
                      dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip, colour-jitter and gray each sample as its draws and the view's law say, then
    normalize (``mscn.colour``): uint8 (B, H, W, 3) RGB crops -> ((B, 3, H, W) views in
    ``dtype``, (B,) float32 σ of the loader's blur, 0 where it does not blur).

    ``draws``: (B, 10) uniforms (``mscn.colour.DRAWS``), on the host or ``x``'s device. On
    CUDA the Triton kernel (one launch, σ included), elsewhere the reference.
    """
    if x.dim() != 4 or x.shape[3] != 3 or x.dtype != torch.uint8:
        raise MscnError(f"colour_per_sample expects uint8 (B, H, W, 3) crops, got {tuple(x.shape)} {x.dtype}")
    draws = draws.reshape(x.shape[0], -1) if draws.numel() == x.shape[0] * len(DRAWS) else draws
    if draws.shape != (x.shape[0], len(DRAWS)):
        raise MscnError(f"colour draws of shape {tuple(draws.shape)} for {x.shape[0]} views: "
                        f"need ({x.shape[0]}, {len(DRAWS)})")
    if not x.is_cuda:
        params, sigma = params_from_draws(draws.to(x.device), law)
        return colour_reference(x, params, mean, std, dtype), sigma
    from mscn.cuda_kernels.colour_triton import colour_triton  # Triton only where a GPU runs it

    # DALI may hand the draws over on the host: through pinned memory (mscn.h2d)
    return colour_triton(x.contiguous(), to_device(draws.float(), x.device).contiguous(), law, mean, std, dtype)
