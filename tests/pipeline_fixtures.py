"""Tiny on-disk datasets and configs for the pipeline tests (tests/test_pipeline_*.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mscn.config import load_config

# 32 px views, σ=1 high-pass (window 7), mask grid inside the view, one DALI thread
TINY = ["data.image_size=32", "data.val_resize=36", "data.num_threads=1", "data.prefetch=1",
        "highpass.sigma=1.0", "data.shuffle_buffer=64", *(f"views.{i}.mask.grid=8" for i in range(4))]


def make_image(rng: np.random.Generator, size=(64, 48)) -> Image.Image:
    """Noise on a random colour with a few ellipses: real edges, real JPEG content."""
    w, h = size
    base = rng.integers(0, 256, 3)
    arr = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(4, max(5, w // 2)))
        draw.ellipse([x0, y0, x0 + r, y0 + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def make_folder(root: Path, classes: int = 3, per_class: int = 10, size=(64, 48), seed: int = 0,
                ext: str = "jpg") -> Path:
    """``root/c<k>/<i>.<ext>``, ``classes * per_class`` images (JPEG quality 90, or lossless PNG)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = Path(root) / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = make_image(rng, size)
            if ext == "png":
                img.save(d / f"{i:03d}.png")
            else:
                img.save(d / f"{i:03d}.{ext}", quality=90)
    return Path(root)


def tiny_cfg(root, *overrides: str):
    return load_config(None, [f"data.root={root}", *TINY, *overrides])


def jpeg_segments(jpeg: bytes) -> list[tuple[int, int]]:
    """``(position, marker)`` of each header segment of ``jpeg`` up to its start of scan."""
    out, i = [], 2
    while jpeg[i + 1] != 0xDA:
        out.append((i, jpeg[i + 1]))
        i += 2 + int.from_bytes(jpeg[i + 2:i + 4], "big")
    return out + [(i, 0xDA)]


def bad_huffman_jpeg(jpeg: bytes) -> bytes:
    """``jpeg`` with its first Huffman table's bytes all 0xFF, the segment's length kept: its
    header walks to its scan and it ends with its end marker (mscn.data.headers passes it),
    but DALI cannot decode it ("Failed to decode sample", measured on the CPU path) and PIL
    cannot either. The file for the paths that meet damage only in DALI."""
    i = next(pos for pos, marker in jpeg_segments(jpeg) if marker == 0xC4)
    n = int.from_bytes(jpeg[i + 2:i + 4], "big")
    return jpeg[:i + 4] + b"\xff" * (n - 2) + jpeg[i + 2 + n:]
