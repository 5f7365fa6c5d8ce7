"""The views' blur applied by the loader (``data.blur_where=loader``, mscn/blur.py) against
scipy in float64 and against DALI's own ``fn.gaussian_blur``, on the CPU path."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types
from pipeline_fixtures import make_folder, tiny_cfg

from mscn.blur import _blur_all, blur_per_sample, blur_radius, blur_weights
from mscn.config import ConfigError
from mscn.pipelines import build_train_loader, output_names, resolve_source, views_pipeline
from mscn.pipelines.loader import plan
from mscn.pipelines.ops import normalize
from mscn.pipelines.readers import read
from mscn.pipelines.train_pipeline import deferred_views


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("blur"), classes=2, per_class=12)  # 24 images


def _scipy_blur(img: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    from scipy.ndimage import gaussian_filter
    return gaussian_filter(img.astype(np.float64), sigma=[0, sigma, sigma], mode="mirror", truncate=radius / sigma)


@pytest.mark.parametrize("window", [0, 9])
def test_per_sample_blur_matches_scipy_in_float64(window):
    """Each sample with its own σ (0 = untouched), a non-square image, DALI's window rule
    (2*ceil(3σ)+1) or a fixed window; reflect-101 borders."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 20, 27)
    sigma = torch.tensor([0.0, 0.1, 0.6, 1.0, 1.37, 2.0])
    radius = blur_radius(2.0, window)
    y = blur_per_sample(x, sigma, radius, window)
    for b, s in enumerate(sigma.tolist()):
        if s == 0:
            assert torch.equal(y[b], x[b])
            continue
        r = (window - 1) // 2 if window else math.ceil(3 * s)
        ref = _scipy_blur(x[b].double().numpy(), s, r)
        assert np.abs(y[b].double().numpy() - ref).max() < 1e-5, (b, s)
    # the GPU's way, every sample through the GEMMs (σ = 0 as an identity matrix): the same
    assert torch.allclose(_blur_all(x, sigma, radius, window), y, atol=1e-5)


def test_blur_weights_sum_to_one_and_follow_the_window():
    w = blur_weights(torch.tensor([0.0, 0.3, 1.0, 2.0]), radius=6)
    assert torch.allclose(w.sum(1), torch.ones(4))
    assert w[0].tolist() == [0.0] * 6 + [1.0] + [0.0] * 6  # σ = 0: the identity
    assert (w[1][:5] == 0).all() and (w[1][5:8] > 0).all() and (w[1][8:] == 0).all()  # σ = 0.3: r = ceil(0.9) = 1
    assert (w[2][:3] == 0).all() and (w[2][3:10] > 0).all() and (w[2][10:] == 0).all()  # σ = 1: r = 3
    assert (w[3] > 0).all()  # σ = 2: r = 6, the whole radius
    with pytest.raises(ValueError, match="must be odd"):
        blur_radius(2.0, window=8)
    with pytest.raises(ValueError, match="sigmas for a batch"):
        blur_per_sample(torch.zeros(2, 3, 8, 8), torch.ones(3), 6)
    assert torch.isfinite(blur_weights(torch.tensor([1e-30]), radius=6)).all()  # σ² underflows: still the identity


def test_images_smaller_than_the_blur_window():
    """Reflect-101 folds more than once when the image is narrower than the window (DALI
    does the same); checked against scipy on a 3 x 5 image at σ = 2 (13 taps)."""
    x = torch.randn(1, 2, 3, 5)
    y = blur_per_sample(x, torch.tensor([2.0]), blur_radius(2.0))
    ref = _scipy_blur(x[0].double().numpy(), 2.0, 6)
    assert np.abs(y[0].double().numpy() - ref).max() < 1e-5


def test_the_adapter_blurs_each_view_with_its_own_sigmas():
    """DaliLoader._convert on a hand-made DALI output: view i is blurred with view{i}_sigma
    (views without a σ output are left alone), then high-passed."""
    from mscn.highpass import highpass_matmul
    from mscn.pipelines.loader import DaliLoader

    torch.manual_seed(0)
    loader = object.__new__(DaliLoader)  # the adapter alone: no pipeline behind it
    loader.num_views, loader.device, loader.mask_fn, loader._labels = 3, None, None, None
    loader.dtype, loader.highpass, loader.blur = torch.float32, (1.0, 7), {0: (6, 0), 2: (6, 0)}
    loader.colour = ()  # no view coloured here (data.colour_where=pipeline)
    loader._views_checked = False
    views = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    sig = {0: torch.tensor([0.5, 0.0, 1.0, 2.0]), 2: torch.tensor([2.0, 1.5, 0.0, 0.3])}
    out = {"view0": views[0].clone(), "view0_sigma": sig[0], "view1": views[1].clone(),
           "view2": views[2].clone(), "view2_sigma": sig[2], "label": torch.arange(4)}
    batch = loader._convert(out)
    for i in range(3):
        want = blur_per_sample(views[i], sig[i], 6) if i in sig else views[i]
        assert torch.allclose(batch.views[i], highpass_matmul(want, 1.0, 7), atol=1e-5), i
    assert batch.labels.tolist() == [0, 1, 2, 3]


@pipeline_def(batch_size=8, num_threads=1, device_id=None, seed=5)
def _dali_blur_pipe(source, std):
    encoded, _, _ = read(source, shard_id=0, num_shards=1, shuffle=False, shuffle_buffer=1, stick_to_shard=True, seed=1)
    img = fn.resize(fn.decoders.image(encoded, output_type=types.RGB), size=[40, 40])
    sigma = fn.random.uniform(range=[0.1, 2.0])
    blurred = fn.gaussian_blur(img, sigma=sigma)  # DALI's own: window 2*ceil(3σ)+1, uint8 out
    mean = (120.0, 110.0, 100.0)
    return normalize(blurred, mean, std), normalize(img, mean, std), sigma


def test_loader_blur_equals_dalis_gaussian_blur_per_sample(folder):
    """The same image and σ through DALI's fn.gaussian_blur (on uint8, then normalized) and
    through the loader's blur (on the normalized image): equal up to DALI's rounding of the
    blurred image to whole levels (half a level / std)."""
    std = (50.0, 60.0, 70.0)
    pipe = _dali_blur_pipe(resolve_source(str(folder)), std)
    pipe.build()
    dali, plain, sigma = (torch.from_numpy(np.array(o.as_array())) for o in pipe.run())
    ours = blur_per_sample(plain.float(), sigma, blur_radius(2.0))
    bound = 0.5 / min(std) * (1 + 1e-3) + 1e-5
    err = (ours - dali).abs().amax(dim=(1, 2, 3))
    assert (err <= bound).all(), (err, bound)
    assert (plain - dali).abs().mean() > 20 * (ours - dali).abs().mean()  # the blur did something


def _run(pipe, names):
    pipe.build()
    return {k: torch.from_numpy(np.array(v.as_array())) for k, v in zip(names, pipe.run())}


def test_a_deferred_blur_gives_the_views_dali_would_give(folder):
    """A whole view through views_pipeline: blurred by DALI, or left to the loader (then the
    loader's blur and high-pass). With a constant σ both draw the same crops (the seeds
    line up), so the views agree to DALI's rounding of its blurred image, through the high-pass."""
    cfg = tiny_cfg(folder)
    view = dataclasses.replace(cfg.views[0], blur_prob=1.0, blur_sigma=(1.3, 1.3), flip_prob=0.0)
    source = resolve_source(str(folder))
    hp = (1.0, 7)
    out = {}
    for deferred in (False, True):
        pipe = views_pipeline(source, [view], image_size=32, highpass=None, shuffle=False, batch_size=8,
                              num_threads=1, device_id=None, seed=11, blur_in_loader=deferred)
        got = _run(pipe, output_names(1, source, deferred=deferred_views([view], deferred)))
        v = got["view0"].float()
        if deferred:
            assert torch.allclose(got["view0_sigma"].reshape(-1), torch.full((8,), 1.3))
            v = blur_per_sample(v, got["view0_sigma"], blur_radius(1.3))
        out[deferred] = _hp(v, hp)
    bound = 2 * 0.5 / min(cfg.data.std) + 1e-4  # the high-pass x - blur(x) at most doubles an error
    assert (out[True] - out[False]).abs().max() <= bound
    assert (out[True] - out[False]).abs().mean() < bound / 4


def _hp(v, hp):
    from mscn.highpass import highpass_matmul
    return highpass_matmul(v, *hp)


def test_deferred_sigma_is_zero_exactly_where_the_view_is_not_blurred(folder):
    """The σ output against the drawn blur flag (debug outputs): 0 where the flag is off,
    inside blur_sigma where it is on; the flag's frequency is blur_prob's. A view with
    solarize keeps DALI's blur (it does not commute with solarize) and has no σ output."""
    cfg = tiny_cfg(folder)
    views = [dataclasses.replace(cfg.views[0], blur_prob=0.5, blur_sigma=(0.4, 1.6)),
             dataclasses.replace(cfg.views[1], blur_prob=0.5, solarize_prob=0.2)]
    assert deferred_views(views, True) == (0,) and deferred_views(views, False) == ()
    source = resolve_source(str(folder))
    names = output_names(2, source, debug_outputs=True, deferred=(0,))
    pipe = views_pipeline(source, views, image_size=32, highpass=None, shuffle=True, batch_size=24, num_threads=1,
                          device_id=None, seed=3, debug_outputs=True, blur_in_loader=True, prefetch_queue_depth=1)
    pipe.build()
    flags, sigmas = [], []
    for _ in range(10):
        got = dict(zip(names, pipe.run()))
        flags.append(np.array(got["view0_flags"].as_array())[:, 3])
        sigmas.append(np.array(got["view0_sigma"].as_array()).reshape(-1))
    flag, sigma = np.concatenate(flags), np.concatenate(sigmas)
    assert (sigma[flag == 0] == 0).all()
    assert ((sigma[flag == 1] >= 0.4) & (sigma[flag == 1] <= 1.6)).all()
    assert abs(flag.mean() - 0.5) < 4 * math.sqrt(0.25 / flag.size)  # 240 draws: within 4 standard errors


def test_the_high_pass_follows_the_blur_into_the_loader(folder):
    """The config rule and the builders: with the blur in the loader the high-pass runs
    there too (auto), an explicit highpass.where=pipeline is refused, and views_pipeline
    refuses a high-pass of its own beside a deferred blur."""
    cfg = tiny_cfg(folder, "data.blur_where=loader")
    p = plan(cfg, "cpu")
    assert p.blur_in_adapter and p.highpass_in_pipeline is None and p.highpass_in_adapter == (1.0, 7)
    with pytest.raises(ConfigError, match="high-pass must run there too"):
        tiny_cfg(folder, "data.blur_where=loader", "highpass.where=pipeline")
    with pytest.raises(ConfigError, match="data.blur_where"):
        tiny_cfg(folder, "data.blur_where=dali")
    tiny_cfg(folder, "data.blur_where=loader", "highpass.where=pipeline", "highpass.enabled=false")  # nothing to order
    # no view's blur can move (none blurs, or solarize follows): DALI's graph, nothing refused
    still = tiny_cfg(folder, "data.blur_where=loader", "highpass.where=pipeline",
                     *(f"views.{i}.solarize_prob=0.2" for i in range(4)))
    assert not plan(still, "cpu").blur_in_adapter and plan(still, "cpu").highpass_in_pipeline == (1.0, 7)
    assert not plan(cfg, "cpu", views=[]).blur_in_adapter  # the evaluation loaders move nothing
    with pytest.raises(ValueError, match="high-pass must run there"):
        views_pipeline(resolve_source(str(folder)), cfg.views, image_size=32, highpass=(1.0, 7), batch_size=8,
                       num_threads=1, device_id=None, blur_in_loader=True)


def test_blur_where_auto_moves_the_blur_on_a_gpu_only(folder):
    """data.blur_where=auto (the default): the loader blurs on the GPU path when the
    high-pass may follow it there, DALI blurs on the CPU path; explicit values stand, and
    resolved_for makes the choice concrete for config.yaml."""
    cfg = tiny_cfg(folder)
    assert cfg.data.blur_where == "auto"
    assert cfg.blur_where_on(gpu=True) == "loader" and cfg.blur_in_loader(gpu=True)
    assert cfg.blur_where_on(gpu=False) == "pipeline" and not cfg.blur_in_loader(gpu=False)
    assert not plan(cfg, "cpu").blur_in_adapter  # the CPU path keeps DALI's blur
    pinned = tiny_cfg(folder, "highpass.where=pipeline")  # the high-pass pinned to DALI keeps the blur there
    assert pinned.blur_where_on(gpu=True) == "pipeline"
    assert tiny_cfg(folder, "highpass.enabled=false").blur_where_on(gpu=True) == "pipeline"
    assert tiny_cfg(folder, "data.blur_where=pipeline").blur_where_on(gpu=True) == "pipeline"
    assert tiny_cfg(folder, "data.blur_where=loader").blur_where_on(gpu=False) == "loader"
    assert cfg.resolved_for(gpu=True).data.blur_where == "loader"
    assert cfg.resolved_for(gpu=False).data.blur_where == "pipeline"
    assert pinned.resolved_for(gpu=True).data.blur_where == "pipeline"
    # no view's blur can move (solarize follows it): DALI's graph even on a GPU
    solar = tiny_cfg(folder, *(f"views.{i}.solarize_prob=0.2" for i in range(4)))
    assert solar.blur_where_on(gpu=True) == "loader" and not solar.blur_in_loader(gpu=True)


def test_train_loader_with_the_blur_in_the_loader(folder):
    """build_train_loader end to end: four high-passed, masked views; the loader's state
    names the blur's place (a resume with the other place is refused, train/resume.py)."""
    cfg = tiny_cfg(folder, "train.global_batch=8", "data.blur_where=loader")
    loader = build_train_loader(cfg)
    assert sorted(loader.blur) == [0, 1, 2, 3]  # the default views blur (p 0.5) and never solarize
    batch = next(iter(loader))
    assert len(batch.views) == 4 and all(v.shape == (8, 3, 32, 32) and v.dtype == torch.float32 for v in batch.views)
    assert all(abs(v.mean().item()) < 0.1 for v in batch.views)  # high-passed: centred on 0
    assert batch.views[0].abs().mean() > 0.01  # not wiped out (per-view σ: the adapter test above)
    assert loader.state_dict()["blur_where"] == "loader"
    assert build_train_loader(tiny_cfg(folder, "train.global_batch=8")).state_dict()["blur_where"] == "pipeline"


def test_the_loader_gives_the_first_view_dali_would_give(folder):
    """End to end through build_train_loader (the adapter's blur, then its high-pass): with
    every view blurred at a constant σ, view 0 draws the same crop in both modes (the later
    views' random operators are seeded differently once the graph differs) and agrees with
    DALI's blur to its rounding, through the high-pass."""
    ov = ["train.global_batch=8", *(f"views.{i}.blur_prob=1.0" for i in range(4)),
          *(f"views.{i}.blur_sigma=[1.3,1.3]" for i in range(4))]
    dali = next(iter(build_train_loader(tiny_cfg(folder, *ov), apply_mask=False)))
    ours = next(iter(build_train_loader(tiny_cfg(folder, *ov, "data.blur_where=loader"), apply_mask=False)))
    assert torch.equal(dali.index, ours.index)
    bound = 2 * 0.5 / min(tiny_cfg(folder).data.std) + 1e-4
    diff = (ours.views[0] - dali.views[0]).abs()
    assert diff.max() <= bound and diff.mean() < bound / 4, (diff.max(), diff.mean())


@pytest.mark.gpu
def test_the_gpu_loader_gives_the_first_view_dali_would_give(folder):
    """The same on the GPU path: DALI's blur on the GPU against the loader's float16 GEMMs
    (the views are float16 there: their rounding, ~1e-3 of values up to ~3, is allowed on
    top of DALI's rounding of its blurred image)."""
    ov = ["train.global_batch=8", "data.output_dtype=float16", *(f"views.{i}.blur_prob=1.0" for i in range(4)),
          *(f"views.{i}.blur_sigma=[1.3,1.3]" for i in range(4))]
    dev = torch.device("cuda", 0)
    dali = next(iter(build_train_loader(tiny_cfg(folder, *ov), device=dev, apply_mask=False)))
    ours = next(iter(build_train_loader(tiny_cfg(folder, *ov, "data.blur_where=loader"), device=dev, apply_mask=False)))
    assert ours.views[0].is_cuda and ours.views[0].dtype == torch.float16
    assert torch.equal(dali.index, ours.index)
    bound = 2 * 0.5 / min(tiny_cfg(folder).data.std) + 8e-3
    diff = (ours.views[0].float() - dali.views[0].float()).abs()
    assert diff.max() <= bound and diff.mean() < bound / 4, (diff.max(), diff.mean())
