"""Plain-torch reference of the MSCN mask fill (paper §5.2): the CPU path.

Same semantics as the Triton kernel in ``mask_triton.py`` for the same
:class:`~mscn.maskspec.MaskTable`: the masked pixels are the table's cells expanded
to pixels; they become 0, or N(0, noise_std^2) for samples whose noise flag is set;
every other element is left bit-identical. Only the noise values differ between the
two (torch's generator here, Philox inside the kernel).
"""
from __future__ import annotations

import torch

from mscn.maskspec import MaskTable


def apply_table_reference(x: torch.Tensor, table: MaskTable, *, out: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask ``x`` (B, C, H, W) into ``out`` (``x`` itself for in place; a new tensor if None).

    Noise is drawn with ``generator`` (on its own device, then moved), only for the
    masked pixels of noisy samples. Counting them (from the table's cell areas) is a
    host sync, which is fine for the CPU path; the GPU path is the kernel.
    """
    table.check_view(x)
    if out is None:
        out = x.clone()
    elif out is not x:
        out.copy_(x)
    pix = table.pixel_mask()
    # masked_fill writes +0.0 and leaves the other elements untouched (no arithmetic on them)
    out.masked_fill_(pix, 0)
    if table.noise_std > 0:
        n = int(table.masked_pixels()[table.noise].sum())  # host sync
        if n:
            noisy = pix & table.noise[:, None, None, None]
            rng_dev = generator.device if generator is not None else out.device
            z = torch.randn(n, generator=generator, device=rng_dev, dtype=torch.float32)
            out.masked_scatter_(noisy, (z * table.noise_std).to(device=out.device, dtype=out.dtype))
    return out
