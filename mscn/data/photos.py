"""`mscn data photos`: an ImageFolder of crops of real photographs, built offline.

A second dataset beside `mscn data synth` (issue 12: run the ablations on one built
from real photos). The only real photos this project can reach offline are the few
that ship inside pip wheels, so the task is "which photo does this crop come from":
each class is one photo (:data:`PHOTOS`), and each sample is a random crop of it
resized to ``--size`` and saved as JPEG.

The split rule keeps validation from being a near-copy of training. Each photo is
cut into a 4 x 4 grid of tiles (:data:`GRID`). ``round(16 * val_fraction)`` tiles,
picked per photo from the seed, are validation tiles; the others are training tiles.
Every crop lies inside one tile, and the tile is cut out before resizing, so the
resampling filter never reads a pixel of another tile. No training crop shares a
pixel with a validation crop. Validation shows parts of each photo that training
never saw, at the same scale: crops are drawn from the tiles round-robin, and each
covers 35-100 % of its tile's area (the demo's view scale) at an aspect ratio
within 3/4..4/3 of ``--size``'s, clamped to the tile. Validation gets as many crops
per tile as training. A crop with almost no contrast (luma std < 4, e.g. the black
corner of the retina photo) is redrawn.

Every crop is seeded from ``(seed, class, split, index)``, and the tile split from
``(seed, class)``. The output is byte-identical for a given seed and the same photo
pixels (recorded as a hash), numpy, Pillow and libjpeg-turbo. ``OUT/photos.json``
records the parameters, each photo's source and licence, the tile split and every
crop's box, so the rule can be checked.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mscn.data.made import previous_build
from mscn.errors import DataError

GRID = 4  # tiles per side of every photo
CROP_AREA = (0.35, 1.0)  # share of the tile's area, as the demo's views take of an image
CROP_ASPECT = (3 / 4, 4 / 3)  # relative to the output's aspect, log-uniform
MIN_LUMA_STD = 4.0  # below it a crop is redrawn (up to REDRAWS times)
REDRAWS = 20
JPEG_QUALITY = 90
GENERATOR_VERSION = 1  # bump when the cropping changes, so stale folders are not reused
META_NAME = "photos.json"
INSTALL_HINT = "pip install 'mscn[photos]' (from a clone: pip install -e '.[photos]')"


@dataclass(frozen=True)
class Photo:
    """One class: a colour photo that ships inside a pip package (no download)."""
    name: str
    package: str  # the pip distribution that ships it
    loader: str  # skimage.data.<loader>() or sklearn.datasets.load_sample_image(<loader>)
    source: str  # credit and licence, as the package documents them


# Colour photos only: the greyscale ones in scikit-image (camera, coins, moon, ...)
# would be told apart from these by their lack of colour alone.
PHOTOS = (
    Photo("astronaut", "scikit-image", "astronaut",
          "Eileen Collins, NASA Great Images database; public domain (no known copyright restrictions)"),
    Photo("chelsea", "scikit-image", "chelsea", "Chelsea the cat, Stefan van der Walt; CC0"),
    Photo("coffee", "scikit-image", "coffee", "coffee cup, Rachel Michetti, courtesy of Pikolo Espresso Bar; CC0"),
    Photo("rocket", "scikit-image", "rocket", "DSCOVR launch on Falcon 9, SpaceX; released into the public domain"),
    Photo("hubble", "scikit-image", "hubble_deep_field", "Hubble eXtreme Deep Field, NASA; public domain"),
    Photo("retina", "scikit-image", "retina", "fundus photograph, Mikael Haggstrom, Wikimedia Commons; CC0"),
    Photo("ihc", "scikit-image", "immunohistochemistry",
          "IHC-stained colonic glands, Center for Microscopy And Molecular Imaging; no known copyright restrictions"),
    Photo("motorcycle", "scikit-image", "stereo_motorcycle",
          "left view of the Middlebury 2014 stereo pair (Scharstein et al.); scikit-image states no licence"),
    Photo("china", "scikit-learn", "china.jpg", "Summer Palace, danielbuechele on Flickr; CC BY 2.0"),
    Photo("flower", "scikit-learn", "flower.jpg", "dahlia, vultilion on Flickr; CC BY 2.0"),
)


def class_names() -> list[str]:
    return [f"{c:02d}_{p.name}" for c, p in enumerate(PHOTOS)]  # sorted order == class index


def load_photos() -> list[np.ndarray]:
    """The photos of :data:`PHOTOS` as HxWx3 uint8 arrays, from files inside the wheels."""
    try:
        from skimage import data as skdata
        from sklearn.datasets import load_sample_image
    except ImportError as e:
        raise DataError(f"photos: the photos ship inside scikit-image and scikit-learn, which are not "
                        f"installed ({e}); {INSTALL_HINT}") from None
    arrays = []
    for p in PHOTOS:
        a = getattr(skdata, p.loader)() if p.package == "scikit-image" else load_sample_image(p.loader)
        if isinstance(a, tuple):  # stereo_motorcycle: (left, right, disparity)
            a = a[0]
        arrays.append(np.ascontiguousarray(a[..., :3], dtype=np.uint8))
    return arrays


def tile_edges(length: int) -> np.ndarray:
    return np.round(np.linspace(0, length, GRID + 1)).astype(int)


def tile_box(h: int, w: int, t: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of tile ``t`` (row-major in the GRID x GRID grid) of an h x w photo."""
    xs, ys = tile_edges(w), tile_edges(h)
    r, c = divmod(t, GRID)
    return int(xs[c]), int(ys[r]), int(xs[c + 1]), int(ys[r + 1])


def split_tiles(seed: int, c: int, val_tiles: int) -> tuple[list[int], list[int]]:
    """(train tiles, val tiles) of class ``c``: ``val_tiles`` of the grid, at random."""
    # [seed, c, 2, 0]: crops use [seed, c, split in {0, 1}, i]. A shorter key would not do:
    # numpy's SeedSequence pads with zeros, so [seed, c, 2] is the same as [seed, c, 2, 0].
    order = np.random.default_rng([seed, c, 2, 0]).permutation(GRID * GRID)
    return sorted(int(t) for t in order[val_tiles:]), sorted(int(t) for t in order[:val_tiles])


def draw_crop(tile: Image.Image, size: tuple[int, int], rng) -> tuple[Image.Image, tuple[float, ...]]:
    """One crop of ``tile`` resized to ``size``, and its box in tile coordinates."""
    tw, th = tile.size
    for _ in range(REDRAWS):
        area = tw * th * rng.uniform(*CROP_AREA)
        aspect = size[0] / size[1] * np.exp(rng.uniform(*np.log(CROP_ASPECT)))
        w, h = min(tw, np.sqrt(area * aspect)), min(th, np.sqrt(area / aspect))
        x, y = rng.uniform(0, tw - w), rng.uniform(0, th - h)
        box = (x, y, x + w, y + h)
        img = tile.resize(size, Image.LANCZOS, box=box)
        if np.asarray(img.convert("L"), np.float32).std() >= MIN_LUMA_STD:
            break
    return img, box


def pixels_sha256(photos: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in photos:
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def check_args(per_class: int, size: tuple[int, int], seed: int, val_fraction: float) -> int:
    """Validate the arguments; returns the number of validation tiles per photo."""
    if per_class < 1:
        raise DataError(f"photos: --per-class must be >= 1, got {per_class}")
    if seed < 0:
        raise DataError(f"photos: --seed must be >= 0, got {seed}")
    if min(size) < 16:
        raise DataError(f"photos: --size must be at least 16x16, got {size[0]}x{size[1]}")
    val_tiles = round(val_fraction * GRID * GRID) if 0 < val_fraction < 1 else 0
    if not 1 <= val_tiles < GRID * GRID:
        raise DataError(f"photos: --val-fraction F holds out round(F * {GRID * GRID}) of each photo's "
                        f"{GRID * GRID} tiles and must leave 1..{GRID * GRID - 1} of them: F in 0.04..0.96, "
                        f"got {val_fraction}")
    return val_tiles


def make_photos(out, per_class: int = 200, size=(96, 96), seed: int = 0, val_fraction: float = 0.25,
                photos: list[np.ndarray] | None = None, progress: bool = True) -> dict:
    """Write ``out/train/<class>/<idx>.jpg``, ``out/val/...`` and ``out/photos.json``.

    ``photos``: the source images (default :func:`load_photos`; tests pass small
    arrays), one class each. Idempotent like ``synthesize``: returns at once if
    ``out`` already holds this exact dataset. Returns a summary dict.
    """
    out = Path(out)
    size = (int(size[0]), int(size[1]))
    val_tiles = check_args(per_class, size, seed, val_fraction)
    real = photos is None
    photos = load_photos() if real else photos
    names = class_names() if real else [f"{c:02d}_photo{c}" for c in range(len(photos))]
    if any(min(a.shape[:2]) < GRID for a in photos):
        raise DataError(f"photos: every photo must be at least {GRID}x{GRID} px")
    val_per_class = max(1, round(per_class * val_tiles / (GRID * GRID - val_tiles)))
    params = {"generator": GENERATOR_VERSION, "per_class": per_class, "val_per_class": val_per_class,
              "size": list(size), "seed": seed, "grid": GRID, "val_tiles": val_tiles,
              "pixels_sha256": pixels_sha256(photos)}
    summary = {"out": str(out), "train": str(out / "train"), "val": str(out / "val"), "classes": names,
               "val_tiles": val_tiles, "tiles": GRID * GRID}
    done = previous_build(out, params, META_NAME, "photos")
    if done is not None:
        return {**summary, **done["stats"], "skipped": True}

    out.mkdir(parents=True, exist_ok=True)
    (out / META_NAME).write_text(json.dumps({"params": params, "complete": False}, indent=1))
    counts = {"train": per_class, "val": val_per_class}
    split_meta, crops, sizes = {}, {}, []
    start = time.perf_counter()
    with tqdm(total=len(photos) * (per_class + val_per_class), desc=f"photos {out}", unit="file",
              disable=not progress) as bar:
        for c, (name, arr) in enumerate(zip(names, photos)):
            h, w = arr.shape[:2]
            photo = Image.fromarray(arr)
            tiles = dict(zip(("train", "val"), split_tiles(seed, c, val_tiles)))
            split_meta[name] = tiles
            for split_id, split in enumerate(("train", "val")):
                (out / split / name).mkdir(parents=True, exist_ok=True)
                for i in range(counts[split]):
                    t = tiles[split][i % len(tiles[split])]  # round-robin: every tile gets its share
                    x0, y0, x1, y1 = tile_box(h, w, t)
                    img, (bx0, by0, bx1, by1) = draw_crop(photo.crop((x0, y0, x1, y1)), size,
                                                          np.random.default_rng([seed, c, split_id, i]))
                    rel = f"{split}/{name}/{i:05d}.jpg"
                    img.save(out / rel, "JPEG", quality=JPEG_QUALITY)
                    sizes.append(os.path.getsize(out / rel))
                    crops[rel] = {"tile": t, "box": [round(v, 2) for v in (x0 + bx0, y0 + by0, x0 + bx1, y0 + by1)]}
                    bar.update()
    seconds = time.perf_counter() - start
    kb = np.asarray(sizes) / 1024
    stats = {"num_train": len(photos) * per_class, "num_val": len(photos) * val_per_class,
             "bytes": int(sum(sizes)), "kb_min": round(float(kb.min()), 1),
             "kb_median": round(float(np.median(kb)), 1), "kb_max": round(float(kb.max()), 1),
             "seconds": round(seconds, 2), "images_per_s": round(len(sizes) / seconds, 1)}
    sources = ({n: {"package": p.package, "loader": p.loader, "source": p.source, "shape": list(a.shape)}
                for n, p, a in zip(names, PHOTOS, photos)} if real else {})
    meta = {"params": params, "complete": True, "stats": stats, "classes": names, "sources": sources,
            "tiles": split_meta, "crops": crops}
    (out / META_NAME).write_text(json.dumps(meta, indent=1))
    return {**summary, **stats, "skipped": False}
