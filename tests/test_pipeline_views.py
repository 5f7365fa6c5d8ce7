"""Per-view augmentations (paper App. A.1, §5.2): random-apply frequencies and effects.

The views pipeline is built with ``debug_outputs=True``, which adds each view's drawn
flags (flip, jitter, gray, blur, solarize) and crop area fraction to the outputs. Every
check runs on both colour graphs: two conditional twists (the default) and the folded
one (``ops.COLOUR_FOLD``).
"""
import contextlib
import math

import numpy as np
import pytest
from pipeline_fixtures import make_folder

from mscn.config import IMAGENET_MEAN, IMAGENET_STD, ViewCfg
from mscn.pipelines import FLAG_NAMES, ops, output_names, resolve_source, views_pipeline

BATCH, RUNS = 40, 16  # 640 samples per view
VIEWS = [
    ViewCfg(flip_prob=0.5, jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5, solarize_prob=0.0),
    ViewCfg(flip_prob=0.3, jitter_prob=0.0, grayscale_prob=0.5, blur_prob=0.1, solarize_prob=0.2,
            scale=(0.3, 0.6), ratio=(0.8, 1.25)),
    ViewCfg(flip_prob=1.0, jitter_prob=1.0, grayscale_prob=0.0, blur_prob=1.0, solarize_prob=1.0),
]


@contextlib.contextmanager
def colour_graph(fold: bool):
    """Trace the views with the folded colour twist (True) or the two-pass one."""
    before = ops.COLOUR_FOLD
    ops.COLOUR_FOLD = fold
    try:
        yield
    finally:
        ops.COLOUR_FOLD = before


def draw(source, views, runs: int, seed: int = 7, fold: bool = False) -> dict:
    with colour_graph(fold):
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


@pytest.fixture(scope="module", params=[False, True], ids=["two-twists", "folded"])
def drawn(source, request):
    """{view: {"flags": (n, 5), "area": (n,), "pixels": (n, 3, 32, 32) on the 0-255 scale}}."""
    return draw(source, VIEWS, RUNS, fold=request.param)


def _twist_stats(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per sample, what a colour twist did to crop ``x`` to give ``y`` (both (n, 3, H, W),
    0-255): luma mean ratio (brightness/contrast), chroma ratio (saturation) and the
    chroma-weighted mean rotation of the YIQ chroma plane in degrees (hue)."""
    yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    a, b = (np.einsum("kc,nchw->nkhw", yiq, v).reshape(len(v), 3, -1) for v in (x, y))
    luma = b[:, 0].mean(1) / a[:, 0].mean(1)
    ca, cb = a[:, 1] + 1j * a[:, 2], b[:, 1] + 1j * b[:, 2]
    chroma = np.abs(cb).mean(1) / np.abs(ca).mean(1)
    hue = np.degrees(np.angle((cb * np.conj(ca)).sum(1)))
    return np.stack([luma, chroma, hue], 1)


def _ks(u: np.ndarray, v: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([u, v]))
    return float(np.abs(np.searchsorted(np.sort(u), grid, "right") / len(u)
                        - np.searchsorted(np.sort(v), grid, "right") / len(v)).max())


def test_folded_twist_draws_and_applies_the_same_jitter(source):
    """The folded graph draws its random ops in another order (DALI seeds them in graph
    order), so its twists are not the two-pass graph's sample for sample. Checked instead:
    neutral factors give the crop itself (and grayscale alone is exact), and with the
    recipe's factors each view's brightness, saturation and hue changes, measured against
    the same crop drawn without jitter, follow the two-pass graph's distributions."""
    plain = dict(flip_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
    neutral = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    crop = draw(source, [ViewCfg(jitter_prob=0.0, grayscale_prob=0.0, **plain)], 8)[0]
    for gray in (0.0, 1.0):
        views = [ViewCfg(jitter_prob=1.0, grayscale_prob=gray, **plain, **neutral)]
        one, two = draw(source, views, 8, fold=True)[0], draw(source, views, 8)[0]
        np.testing.assert_array_equal(one["area"], crop["area"])  # the crops are the same draws
        assert np.abs(one["pixels"] - two["pixels"]).max() < 1e-3
        if gray == 0.0:
            assert np.abs(one["pixels"] - crop["pixels"]).max() < 1e-3
    # flags drawn per sample (the conditional): a sample with neither flag is its crop, a gray
    # one that was not jittered is its crop's luma (neutral brightness, contrast and hue)
    mixed = draw(source, [ViewCfg(jitter_prob=0.5, grayscale_prob=0.5, **plain)], 8, fold=True)[0]
    np.testing.assert_array_equal(mixed["area"], crop["area"])
    jit, gray = (mixed["flags"][:, FLAG_NAMES.index(f)] == 1 for f in ("jitter", "gray"))
    assert (~jit & ~gray).any() and (gray & ~jit).any() and jit.any()
    x, y = crop["pixels"], mixed["pixels"]
    assert np.abs(y[~jit & ~gray] - x[~jit & ~gray]).max() < 1e-3
    luma = np.round(np.einsum("c,nchw->nhw", [0.299, 0.587, 0.114], x[gray & ~jit]))[:, None]
    assert np.abs(y[gray & ~jit] - luma).max() <= 1.0 + 1e-3
    assert np.abs(y[jit] - x[jit]).max() > 10  # and the jittered ones were changed
    views = [ViewCfg(jitter_prob=1.0, grayscale_prob=0.0, **plain)]
    one, two = draw(source, views, 8, fold=True)[0], draw(source, views, 8)[0]
    np.testing.assert_array_equal(one["area"], crop["area"])
    s1, s2 = _twist_stats(crop["pixels"], one["pixels"]), _twist_stats(crop["pixels"], two["pixels"])
    assert np.abs(s2[:, 2]).max() > 20  # the statistic sees the hue: U[-36, 36] degrees
    for k, what in enumerate(("luma ratio", "chroma ratio", "hue rotation")):
        d = _ks(s1[:, k], s2[:, k])
        assert d < 0.2, f"{what}: KS {d:.3f} between the folded and the two-pass twist"  # alpha ~ 3e-5 at n=320


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
