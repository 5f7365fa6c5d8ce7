"""The two ways the views are cut (paper App. A.1's random-resized crop) draw the same windows.

``crop="rrc"`` is DALI's fused ``fn.random_resized_crop``, the training default;
``crop="window"`` draws the window with ``fn.random_crop_generator`` and cuts it with
an ROI resize, which exposes the window (the debug outputs use it, and
test_pipeline_views.py checks its area against the configured scale). The fused op
hides its window, so it is read back from the pixels: the image is a coordinate map
(red = column, green = row, lossless PNG), and a view's red and green ranges are the
columns and rows its window covers.
"""
import numpy as np
import pytest
from PIL import Image

from mscn.config import ViewCfg
from mscn.pipelines import resolve_source, views_pipeline

W, H, SIZE = 200, 150, 64  # columns and rows < 256: every one has its own red / green value
BATCH, RUNS = 64, 16  # 1,024 windows per crop op


def plain_view(ratio=(3 / 4, 4 / 3)) -> ViewCfg:
    return ViewCfg(flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0,
                   scale=(0.08, 1.0), ratio=ratio)


VIEW = plain_view()


@pytest.fixture(scope="module")
def coord_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("coords")
    x, y = np.meshgrid(np.arange(W), np.arange(H))
    img = np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)
    for c in range(2):  # two classes of the same image: an ImageFolder needs a class
        (root / f"c{c}").mkdir()
        for i in range(4):
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.png")
    return resolve_source(str(root))


def windows(source, crop: str, debug: bool = False, view: ViewCfg = VIEW, gpu: bool = False):
    """(width, height) in source pixels of every view's window, read from its pixels;
    with ``debug`` also the areas the pipeline reports."""
    where = dict(device="gpu", device_id=0) if gpu else dict(device_id=None)
    pipe = views_pipeline(source, [view], image_size=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                          highpass=None, crop=crop, debug_outputs=debug, batch_size=BATCH, num_threads=1,
                          seed=3, **where)
    pipe.build()
    spans, areas = [], []
    for _ in range(RUNS):
        out = pipe.run()
        v = out[0].as_cpu().as_array() if gpu else out[0].as_array()  # (B, 3, SIZE, SIZE): red = column, green = row
        # output pixel centres span (SIZE - 1) / SIZE of the window: scale the value range back
        w = (v[:, 0].max((1, 2)) - v[:, 0].min((1, 2))) * SIZE / (SIZE - 1)
        h = (v[:, 1].max((1, 2)) - v[:, 1].min((1, 2))) * SIZE / (SIZE - 1)
        spans.append(np.stack([w, h], 1))
        if debug:
            areas.append(out[2].as_array().reshape(-1))
    spans = np.concatenate(spans)
    return spans, (np.concatenate(areas) if debug else None)


def test_pixels_recover_the_window_the_pipeline_reports(coord_source):
    """The read-back is accurate: on the window crop, area from pixels = reported area."""
    spans, areas = windows(coord_source, "window", debug=True)
    est = spans[:, 0] * spans[:, 1] / (W * H)
    assert np.abs(est - areas).mean() < 0.02 and np.abs(est - areas).max() < 0.08


@pytest.mark.parametrize("ratio", [(3 / 4, 4 / 3), (1.0, 2.0)])  # the second: wide windows only
def test_fused_crop_draws_the_same_windows_as_the_window_crop(coord_source, ratio):
    compare_crops(windows(coord_source, "rrc", view=plain_view(ratio))[0],
                  windows(coord_source, "window", view=plain_view(ratio))[0], ratio)


@pytest.mark.gpu
def test_fused_crop_on_the_gpu_draws_the_windows_of_the_cpu_window_crop(coord_source):
    """The training default on the GPU path (mixed decode, GPU fn.random_resized_crop)."""
    ratio = (1.0, 2.0)
    compare_crops(windows(coord_source, "rrc", view=plain_view(ratio), gpu=True)[0],
                  windows(coord_source, "window", view=plain_view(ratio))[0], ratio)


def compare_crops(fused, window, ratio):
    n = len(fused)
    for name, f in (("area", lambda s: s[:, 0] * s[:, 1] / (W * H)),
                    ("log aspect", lambda s: np.log(s[:, 0] / s[:, 1]))):
        a, b = f(fused), f(window)
        se = np.sqrt(a.var() / n + b.var() / n)
        assert abs(a.mean() - b.mean()) < 5 * se + 0.01, f"{name}: {a.mean():.3f} vs {b.mean():.3f}"
        for q in (0.1, 0.5, 0.9):
            qa, qb = np.quantile(a, q), np.quantile(b, q)
            assert abs(qa - qb) < 0.06, f"{name} q{q}: {qa:.3f} vs {qb:.3f}"
    area = fused[:, 0] * fused[:, 1] / (W * H)
    assert area.min() > 0.08 - 0.03 and area.max() <= 1.0 + 1e-6  # the configured scale, read back
    assert 0.2 < area.mean() < 0.7  # not stuck on the full-image fallback or the smallest window
    # width / height in the configured range (a swapped axis would put it in 1/ratio), but
    # for the fallback windows that did not fit: those are at most the whole image (4:3)
    aspect = fused[:, 0] / fused[:, 1]
    inside = (aspect > ratio[0] * 0.9) & (aspect < ratio[1] * 1.1)
    assert inside.mean() > 0.9, f"{inside.mean():.2f} of the windows in the ratio range"


def test_debug_outputs_refuse_the_fused_crop(coord_source):
    with pytest.raises(ValueError, match="crop window"):
        views_pipeline(coord_source, [VIEW], image_size=SIZE, highpass=None, crop="rrc", debug_outputs=True,
                       batch_size=2, num_threads=1, device_id=None)
