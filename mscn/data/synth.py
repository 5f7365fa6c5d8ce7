"""`mscn data synth`: an ImageNet-shaped synthetic ImageFolder with learnable classes.

The demo and the tests need a dataset that exercises the real input pipeline
(JPEG decode, random resized crops, the high-pass filter of paper §5.1 and the masks of §5.2) at
ImageNet resolution and file size, and on which self-supervised pretraining
visibly learns something. Each class is a (shape, texture, texture-orientation)
family: the object is drawn at a random colour, position, scale and rotation over
a random background, among smaller distractors of *other* shapes and textures,
with pixel noise. Shape and texture survive crops and colour jitter, so they are
what a SimCLR/BYOL encoder has to pick up (like object identity in ImageNet).

Every image is seeded from ``(seed, split, class, index)``, so the output is
byte-identical for a given seed whatever the number of workers (given the same
numpy, Pillow and libjpeg-turbo).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFilter
from scipy.ndimage import map_coordinates

from mscn.data.imagefolder import parallel_imap
from mscn.data.made import previous_build
from mscn.errors import DataError

SHAPES = ("disk", "square", "triangle", "ring", "cross", "star", "hexagon", "crescent", "ellipse", "chevron")
TEXTURES = ("solid", "stripes", "checker", "dots", "waves", "rings", "grid", "spokes", "zigzag", "speckle")
VARIANTS = 10  # texture angles 18 degrees apart (anisotropic past variant 0): 1000 classes
MAX_CLASSES = len(SHAPES) * len(TEXTURES) * VARIANTS
JPEG_QUALITY = 95  # with the pixel noise below: ~45-125 KB (median ~90) at 500x375, like ImageNet
GENERATOR_VERSION = 1  # bump when the drawing changes, so stale folders are not reused
META_NAME = "synth.json"


def class_spec(c: int) -> tuple[int, int, int]:
    """(shape, texture, variant) of class ``c``; all distinct for c < MAX_CLASSES.

    The texture is offset by the shape so the first 10 classes differ in both shape
    and texture; with ``q = c // S``, ``(c % S, (c % S + q) % T, q // T)`` is
    injective for c < S*T*V.
    """
    s, q = c % len(SHAPES), c // len(SHAPES)
    return s, (s + q) % len(TEXTURES), q // len(TEXTURES)


def class_names(num_classes: int) -> list[str]:
    width = max(2, len(str(num_classes - 1)))  # zero-padded so sorted order == class index
    names = []
    for c in range(num_classes):
        s, t, v = class_spec(c)
        names.append(f"{c:0{width}d}_{SHAPES[s]}_{TEXTURES[t]}" + (f"_v{v}" if v else ""))
    return names


# ----------------------------------------------------------------------------------
# Drawing: unit shapes -> polygons, textures as functions of rotated coordinates
# ----------------------------------------------------------------------------------

def _ngon(n: int, phase: float = 0.0, radii=(1.0,)) -> np.ndarray:
    a = phase + np.arange(n * len(radii)) * 2 * np.pi / (n * len(radii))
    r = np.resize(np.asarray(radii), a.shape)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


_CIRCLE = _ngon(72)
_BAR = np.array([[-1, -0.28], [1, -0.28], [1, 0.28], [-1, 0.28]])
# Each shape is a list of (unit polygon, fill): fill 0 cuts a hole (ring, crescent).
_UNIT_SHAPES = {
    "disk": [(_CIRCLE, 255)],
    "square": [(_ngon(4, np.pi / 4) * 1.15, 255)],
    "triangle": [(_ngon(3, -np.pi / 2) * 1.1, 255)],
    "ring": [(_CIRCLE, 255), (_CIRCLE * 0.6, 0)],
    "cross": [(_BAR, 255), (_BAR[:, ::-1], 255)],
    "star": [(_ngon(5, -np.pi / 2, (1.1, 0.45)), 255)],
    "hexagon": [(_ngon(6), 255)],
    "crescent": [(_CIRCLE, 255), (_CIRCLE * 0.85 + [0.45, -0.1], 0)],
    "ellipse": [(_CIRCLE * [1.1, 0.45], 255)],
    "chevron": [(np.array([[-1, 0.1], [0, -0.8], [1, 0.1], [1, 0.65], [0, -0.25], [-1, 0.65]]), 255)],
}


def _texture(name: str, u, v, period: float, aniso: bool, rng) -> np.ndarray:
    """Pattern in [0, 1] on coordinates ``u, v`` (pixels, rotated to the texture angle).

    ``aniso`` stretches the pattern along ``v``: it gives the isotropic textures
    (rings, speckle, solid) an orientation, so classes past the first 100, which
    differ only in texture angle, stay distinguishable.
    """
    w = 2 * np.pi / period
    if aniso:
        v = v / 2.5
    if name == "solid":  # faint shading, plus a band across when anisotropic
        return np.clip(0.5 + u / (6 * period), 0, 1) * 0.25 + aniso * (np.abs(u) < 0.4 * period)
    if name == "stripes":
        return (np.sin(w * u) > 0).astype(np.float32)
    if name == "checker":
        return (np.sin(w * u) * np.sin(w * v) > 0).astype(np.float32)
    if name == "dots":
        du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
        return (du * du + dv * dv < (0.3 * period) ** 2).astype(np.float32)
    if name == "waves":
        return 0.5 + 0.5 * np.sin(w * (u + 0.35 * period * np.sin(w * v / 2)))
    if name == "rings":
        return 0.5 + 0.5 * np.sin(w * np.sqrt(u * u + v * v))
    if name == "grid":
        return ((np.mod(u, period) < 0.25 * period) | (np.mod(v, period) < 0.25 * period)).astype(np.float32)
    if name == "spokes":
        return (np.sin(7 * np.arctan2(v, u)) > 0).astype(np.float32)
    if name == "zigzag":
        tri = np.abs(np.mod(v / period, 1.0) - 0.5)
        return (np.sin(w * (u + period * tri)) > 0).astype(np.float32)
    if name == "speckle":  # random blobs (two cells per period), thresholded
        cells = rng.random((16, 16))
        blobs = map_coordinates(cells, [2 * u / period, 2 * v / period], order=1, mode="grid-wrap")
        return (blobs > 0.5).astype(np.float32)
    raise ValueError(name)


def _colour_pair(rng) -> np.ndarray:
    """Two contrasting colours (light and dark, random hue) in random order."""
    h = rng.integers(360)
    hue2 = (h + rng.integers(-60, 61)) % 360
    light = ImageColor.getrgb(f"hsv({h},{rng.integers(30, 100)}%,{rng.integers(70, 100)}%)")
    dark = ImageColor.getrgb(f"hsv({hue2},{rng.integers(30, 100)}%,{rng.integers(8, 45)}%)")
    pair = np.array([light, dark], np.float32)
    return pair[::-1] if rng.random() < 0.5 else pair


def _draw_object(img, shape: int, texture: int, angle: float, aniso: bool, r: float, rng) -> None:
    """Composite one textured, rotated shape of radius ``r`` onto ``img`` in place."""
    H, W, _ = img.shape
    cx, cy = rng.uniform(0.6 * r, W - 0.6 * r), rng.uniform(0.6 * r, H - 0.6 * r)
    reach = 1.4 * r  # the farthest a unit shape (<= 1.1) reaches after the 1.15 stretch
    x0, y0 = int(max(0, cx - reach)), int(max(0, cy - reach))
    x1, y1 = int(min(W, cx + reach + 1)), int(min(H, cy + reach + 1))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    # The shape turns at random; the texture keeps its class angle (plus jitter)
    # in image coordinates, so orientation stays a class cue.
    rot = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(rot), np.sin(rot)
    stretch = rng.uniform(0.85, 1.15)  # mild aspect change, like viewpoint
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(mask)
    for poly, fill in _UNIT_SHAPES[SHAPES[shape]]:
        p = poly * [r * stretch, r / stretch]
        pts = np.stack([p[:, 0] * c - p[:, 1] * s + cx - x0, p[:, 0] * s + p[:, 1] * c + cy - y0], 1)
        draw.polygon([tuple(q) for q in pts], fill=fill)
    alpha = np.asarray(mask.filter(ImageFilter.GaussianBlur(0.8)), np.float32)[..., None] / 255
    # Integer ranges, then the float offset: a float-bounded mgrid can gain a row.
    y = (np.arange(y1 - y0, dtype=np.float32) + np.float32(y0 - cy))[:, None]
    x = (np.arange(x1 - x0, dtype=np.float32) + np.float32(x0 - cx))[None, :]
    t = np.deg2rad(angle + rng.uniform(-6, 6))
    u, v = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
    period = r * rng.uniform(0.22, 0.32)
    pattern = _texture(TEXTURES[texture], u, v, period, aniso, rng)[..., None]
    a, b = _colour_pair(rng)
    obj = a * (1 - pattern) + b * pattern
    region = img[y0:y1, x0:x1]
    region *= 1 - alpha
    region += alpha * obj


def _background(W: int, H: int, rng) -> np.ndarray:
    """A random four-corner colour gradient blended with coarse and fine colour blobs.

    Built from tiny random grids upsampled by PIL (C code): a 500x375 float
    background drawn in numpy costs more than the rest of the image.
    """
    def upsampled(rows, cols, method):
        grid = (rng.random((max(2, rows), max(2, cols), 3)) * 255).astype(np.uint8)
        return Image.fromarray(grid).resize((W, H), method)

    img = upsampled(2, 2, Image.BILINEAR)
    # Coarse blobs, then finer ones: natural photos have detail at every scale, and
    # that detail is what gives the JPEGs ImageNet-like sizes.
    cells = rng.integers(3, 7)
    img = Image.blend(img, upsampled(cells * H // W, cells, Image.BICUBIC), rng.uniform(0.2, 0.6))
    cells = rng.integers(20, 40)
    img = Image.blend(img, upsampled(cells * H // W, cells, Image.BICUBIC), rng.uniform(0.1, 0.3))
    return np.array(img, np.float32)


def render(c: int, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One image of class ``c``: background, 2-5 distractors, the class object, noise."""
    W, H = size
    shape, texture, variant = class_spec(c)
    img = _background(W, H, rng)
    side = min(W, H)
    for _ in range(rng.integers(2, 6)):
        # Distractors never share the class's shape or texture, so within an image
        # the class cue sits on the class object only.
        ds = (shape + rng.integers(1, len(SHAPES))) % len(SHAPES)
        dt = (texture + rng.integers(1, len(TEXTURES))) % len(TEXTURES)
        aniso = rng.random() < 0.5
        _draw_object(img, ds, dt, rng.uniform(0, 180), aniso, side * rng.uniform(0.05, 0.14), rng)
    angle = variant * 180 / VARIANTS + shape * 13  # the class's texture orientation
    _draw_object(img, shape, texture, angle, variant > 0, side * rng.uniform(0.2, 0.4), rng)
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(2, 12)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------
# Writing the folder
# ----------------------------------------------------------------------------------

def _write_one(task) -> int:
    path, seed, split, c, i, size = task
    rng = np.random.default_rng([seed, split, c, i])
    render(c, size, rng).save(path, "JPEG", quality=JPEG_QUALITY)
    return os.path.getsize(path)


def synthesize(out, classes: int, per_class: int, size=(500, 375), seed: int = 0,
               workers: int | None = None, val_per_class: int = 0, progress: bool = True) -> dict:
    """Write ``out/train/<class>/<idx>.jpg`` (and ``out/val/...``) plus ``out/synth.json``.

    Idempotent: returns at once if ``out`` already holds a complete dataset made
    with the same parameters. Returns a summary dict (paths, class names, counts,
    bytes, seconds, images/s, ``skipped``).
    """
    out = Path(out)
    size = (int(size[0]), int(size[1]))
    if not 1 <= classes <= MAX_CLASSES:
        raise DataError(f"synth: --classes must be in 1..{MAX_CLASSES}, got {classes}")
    if per_class < 1 or val_per_class < 0:
        raise DataError(f"synth: need --per-class >= 1 and --val-per-class >= 0, got {per_class}, {val_per_class}")
    if seed < 0:
        raise DataError(f"synth: --seed must be >= 0, got {seed}")
    if min(size) < 16:
        raise DataError(f"synth: --size must be at least 16x16, got {size[0]}x{size[1]}")
    params = {"generator": GENERATOR_VERSION, "classes": classes, "per_class": per_class,
              "val_per_class": val_per_class, "size": list(size), "seed": seed}
    names = class_names(classes)
    summary = {"out": str(out), "train": str(out / "train"),
               "val": str(out / "val") if val_per_class else None, "classes": names}
    done = previous_build(out, params, META_NAME, "synthetic")
    if done is not None:
        return {**summary, **done["stats"], "skipped": True}

    out.mkdir(parents=True, exist_ok=True)
    (out / META_NAME).write_text(json.dumps({"params": params, "complete": False}, indent=1))
    tasks = []
    for split, (name, n) in enumerate((("train", per_class), ("val", val_per_class))):
        width = max(5, len(str(n - 1)))
        for c, cls in enumerate(names):
            if n:
                (out / name / cls).mkdir(parents=True, exist_ok=True)
            tasks += [(str(out / name / cls / f"{i:0{width}d}.jpg"), seed, split, c, i, size) for i in range(n)]

    start = time.perf_counter()
    sizes = list(parallel_imap(_write_one, tasks, workers, f"synth {out}", progress))
    seconds = time.perf_counter() - start
    kb = np.asarray(sizes) / 1024
    stats = {"num_train": classes * per_class, "num_val": classes * val_per_class,
             "bytes": int(sum(sizes)), "kb_min": round(float(kb.min()), 1),
             "kb_median": round(float(np.median(kb)), 1), "kb_max": round(float(kb.max()), 1),
             "seconds": round(seconds, 2), "images_per_s": round(len(sizes) / seconds, 1)}
    meta = {"params": params, "complete": True, "stats": stats, "classes": names}
    (out / META_NAME).write_text(json.dumps(meta, indent=1))
    return {**summary, **stats, "skipped": False}
