"""Per-view augmentations (paper App. A.1, §5.2): random-apply frequencies and effects.

The views pipeline is built with ``debug_outputs=True``, which adds each view's drawn
flags (flip, jitter, gray, blur, solarize) and crop area fraction to the outputs.
"""
import math

import numpy as np
import pytest
from pipeline_fixtures import make_folder

from mscn.config import IMAGENET_MEAN, IMAGENET_STD, ViewCfg
from mscn.pipelines import FLAG_NAMES, output_names, resolve_source, views_pipeline

BATCH, RUNS = 40, 16  # 640 samples per view
VIEWS = [
    ViewCfg(flip_prob=0.5, jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5, solarize_prob=0.0),
    ViewCfg(flip_prob=0.3, jitter_prob=0.0, grayscale_prob=0.5, blur_prob=0.1, solarize_prob=0.2,
            scale=(0.3, 0.6), ratio=(0.8, 1.25)),
    ViewCfg(flip_prob=1.0, jitter_prob=1.0, grayscale_prob=0.0, blur_prob=1.0, solarize_prob=1.0),
]


def draw(source, views, runs: int, seed: int = 7) -> dict:
    pipe = views_pipeline(source, views, image_size=32, highpass=None, debug_outputs=True, shuffle=False,
                          batch_size=BATCH, num_threads=1, device_id=None, seed=seed)
    pipe.build()
    names = output_names(len(views), source, debug_outputs=True)
    got = {n: [] for n in names}
    for _ in range(runs):
        for name, out in zip(names, pipe.run()):
            got[name].append(out.as_array())
    mean, std = np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1), np.array(IMAGENET_STD).reshape(1, 3, 1, 1)
    return {i: {"flags": np.concatenate(got[f"view{i}_flags"]), "area": np.concatenate(got[f"view{i}_area"]),
                "pixels": np.concatenate(got[f"view{i}"]) * std + mean} for i in range(len(views))}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return resolve_source(str(make_folder(tmp_path_factory.mktemp("views"), classes=4, per_class=10)))


@pytest.fixture(scope="module")
def drawn(source):
    """{view: {"flags": (n, 5), "area": (n,), "pixels": (n, 3, 32, 32) on the 0-255 scale}}."""
    return draw(source, VIEWS, RUNS)


@pytest.mark.parametrize("i", range(len(VIEWS)))
def test_flag_frequencies_match_probabilities(drawn, i):
    flags = drawn[i]["flags"]
    n = len(flags)
    assert flags.shape == (BATCH * RUNS, len(FLAG_NAMES))
    for j, name in enumerate(FLAG_NAMES):
        p = getattr(VIEWS[i], {"flip": "flip_prob", "jitter": "jitter_prob", "gray": "grayscale_prob",
                               "blur": "blur_prob", "solarize": "solarize_prob"}[name])
        frac = flags[:, j].mean()
        tol = 4.5 * math.sqrt(p * (1 - p) / n)  # binomial: a false failure once in ~1e5 runs
        assert abs(frac - p) <= tol, f"view {i} {name}: {frac:.3f} drawn, p={p}"


def test_grayscale_views_have_equal_channels(drawn):
    """Gray samples: R = G = B after de-normalizing (grayscale comes after the jitter),
    to one uint8 level (DALI's colour matrix rounds each channel on its own)."""
    for i in (0, 1):
        px, gray = drawn[i]["pixels"], drawn[i]["flags"][:, FLAG_NAMES.index("gray")] == 1
        spread = np.abs(px - px.mean(axis=1, keepdims=True)).max(axis=(1, 2, 3))
        assert gray.any() and (spread[gray] <= 1.0 + 1e-3).all()
        assert (spread[~gray] > 3.0).mean() > 0.9  # colour images stay colour


def test_solarized_views_have_no_bright_values(drawn):
    """Solarize (last uint8 op) maps every value v >= 128 to 255 - v <= 127."""
    for i in (1, 2):
        px, sol = drawn[i]["pixels"], drawn[i]["flags"][:, FLAG_NAMES.index("solarize")] == 1
        peak = px.max(axis=(1, 2, 3))
        assert sol.any() and (peak[sol] <= 127.01).all()
        if (~sol).any():
            assert (peak[~sol] > 128).mean() > 0.9


def test_crop_area_within_configured_range(drawn):
    for i in range(len(VIEWS)):
        lo, hi = VIEWS[i].scale
        area = drawn[i]["area"].ravel()
        inside = (area >= lo - 0.02) & (area <= hi + 0.02)  # crops are whole pixels
        assert inside.mean() > 0.97, f"view {i}: {1 - inside.mean():.1%} of crops outside {lo}..{hi}"
        assert lo < area.mean() < hi
