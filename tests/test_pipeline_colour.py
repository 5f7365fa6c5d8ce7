"""The views' colour jitter and grayscale applied by the loader (``data.colour_where=loader``,
mscn/colour.py): the torch reference against DALI's own ``fn.color_twist``, the Triton
kernel (interpreted on the CPU) against the reference, the DALI graph's hand-over, the
config rules and the loader end to end."""
import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def
from pipeline_fixtures import make_folder, tiny_cfg

from mscn.colour import DRAWS, PARAMS, ColourLaw, colour_reference, params_from_draws, solarize_flags
from mscn.cuda_kernels.colour import colour_per_sample
from mscn.config import ConfigError, ViewCfg
from mscn.errors import MscnError
from mscn.pipelines import build_train_loader, output_names, resolve_source, views_pipeline
from mscn.pipelines.loader import plan
from mscn.pipelines.train_pipeline import coloured_views

IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean, std: the output stays on the uint8 scale
# the kernel runs interpreted on the CPU and compiled on a GPU (tests/conftest.py sets
# TRITON_INTERPRET only without one)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# twice SimCLR's strengths, every flag drawn half the time (more clamping, every combination)
STRONG = ColourLaw(p_jitter=0.5, brightness=(0.2, 1.8), contrast=(0.2, 1.8), saturation=(0.2, 1.8), hue=(-72.0, 72.0),
                   p_gray=0.5, p_flip=0.5, p_blur=0.5, sigma=(0.1, 2.0))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("colour"), classes=2, per_class=12)  # 24 images


def _dali_twist(images: list[np.ndarray], params: np.ndarray, gpu: bool = False) -> np.ndarray:
    """DALI's ``fn.color_twist`` (its CPU operator, or with ``gpu`` its GPU one) with each
    sample's factors where its jitter flag is set, then ``saturation=0`` where its gray flag
    is: the two passes of ops.colour, by DALI."""
    n = len(images)

    @pipeline_def(batch_size=n, num_threads=1, device_id=0 if gpu else None)
    def twist():
        x = fn.external_source(source=lambda: images, layout="HWC")
        x = x.gpu() if gpu else x
        p = fn.external_source(source=lambda: [np.ascontiguousarray(r) for r in params])
        y = fn.color_twist(x, brightness=p[1], contrast=p[2], saturation=p[3], hue=p[4])
        return y, fn.color_twist(x, saturation=0.0), fn.color_twist(y, saturation=0.0)

    pipe = twist()
    pipe.build()
    jit, gray, both = (np.stack([np.array(t) for t in (out.as_cpu() if gpu else out)]) for out in pipe.run())
    plain = np.stack(images)
    out = []
    for b in range(n):
        pick = {(0, 0): plain, (1, 0): jit, (0, 1): gray, (1, 1): both}[(int(params[b, 0]), int(params[b, 5]))]
        out.append(pick[b])
    return np.stack(out)


def _draws(n: int, gen: torch.Generator, strength=(0.4, 0.4, 0.2, 0.1)) -> torch.Tensor:
    """(n, 7) numbers drawn as ops._jitter_factors draws them, random flags (flip included)."""
    b, c, s, h = strength
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)  # noqa: E731
    flag = lambda: torch.randint(0, 2, (n,), generator=gen).float()  # noqa: E731
    return torch.stack([flag(), u(1 - b, 1 + b), u(1 - c, 1 + c), u(1 - s, 1 + s), u(-360 * h, 360 * h), flag(),
                        flag()], 1)


def _hwc(x: torch.Tensor) -> list[np.ndarray]:
    return [np.ascontiguousarray(v.numpy()) for v in x]


def _unflip(got: torch.Tensor, params: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) views -> HWC, mirrored back where the flip flag is set."""
    hwc = got.permute(0, 2, 3, 1)
    return torch.where(params[:, 6, None, None, None] > 0.5, hwc.flip(2), hwc).numpy()


@pytest.mark.parametrize("strength", [(0.4, 0.4, 0.2, 0.1), (0.8, 0.8, 0.8, 0.2)])
def test_reference_equals_dalis_color_twist(strength):
    """Random HWC crops with saturated corners, SimCLR's strengths and twice as strong ones
    (more clamping), every combination of the two flags, flipped or not: equal to DALI's
    uint8 output (mirrored where flipped) but for one level on values within float rounding
    of a half level, a handful of pixels."""
    gen = torch.Generator().manual_seed(0)
    n = 16
    x = torch.randint(0, 256, (n, 29, 35, 3), dtype=torch.uint8, generator=gen)
    x[:, :4, :4] = 255
    x[:, -4:, -4:] = 0
    params = _draws(n, gen, strength)
    # rows 0-1: no colour flag, not flipped and flipped; rows 2-5: every flag combination
    params[:6, 0], params[:6, 5] = torch.tensor([0.0, 0, 0, 1, 0, 1]), torch.tensor([0.0, 0, 0, 0, 1, 1])
    params[:2, 6] = torch.tensor([0.0, 1.0])
    want = _dali_twist(_hwc(x), params.numpy())
    got = colour_reference(x, params, *IDENTITY)
    assert got.shape == (n, 3, 29, 35) and got.is_contiguous()
    got = _unflip(got, params)
    diff = np.abs(got - want.astype(np.float32))
    assert diff.max() <= 1.0
    assert (diff > 0).mean() < 1e-3, (diff > 0).mean()
    assert np.array_equal(got[0], x[0].numpy().astype(np.float32))  # no flag: the crop itself, transposed
    assert np.array_equal(got[1], x[1].numpy().astype(np.float32))  # only the flip, undone above


def test_reference_normalizes_after_the_colour_step():
    """mean/std: (x - mean) / std per channel, applied after the colour step (DALI's
    normalization itself is compared end to end, in the first-view tests below)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (3, 8, 9, 3), dtype=torch.uint8, generator=gen)
    params = _draws(3, gen)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    raw = colour_reference(x, params, *IDENTITY)
    norm = colour_reference(x, params, mean, std)
    want = (raw - torch.tensor(mean)[None, :, None, None]) / torch.tensor(std)[None, :, None, None]
    assert torch.allclose(norm, want, atol=1e-6)


def test_draws_map_to_flags_factors_and_sigma():
    """ColourLaw: a flag is u < p, a factor lo + (hi - lo) u, σ 0 where the blur flag is off."""
    u = torch.tensor([[0.1, 0.0, 0.5, 1.0 - 2**-24, 0.25, 0.7, 0.49, 0.2, 0.5, 0.3],
                      [0.9, 1.0 - 2**-24, 0.0, 0.5, 0.75, 0.3, 0.51, 0.8, 0.5, 0.7]])
    assert u.shape[1] == len(DRAWS)
    params, sigma = params_from_draws(u, STRONG)
    assert params[:, 0].tolist() == [1.0, 0.0] and params[:, 5].tolist() == [0.0, 1.0]  # jitter, gray
    assert params[:, 6].tolist() == [1.0, 0.0]  # flip
    assert torch.allclose(params[:, 1], torch.tensor([0.2, 1.8]), atol=1e-6)
    assert torch.allclose(params[:, 2], torch.tensor([1.0, 0.2]), atol=1e-6)
    assert torch.allclose(params[:, 4], torch.tensor([-36.0, 36.0]), atol=1e-5)
    assert torch.allclose(sigma, torch.tensor([1.05, 0.0]), atol=1e-6)
    assert solarize_flags(u, dataclasses.replace(STRONG, p_solarize=0.5)).tolist() == [True, False]
    law = ColourLaw.of(ViewCfg(), blur=False)  # the loader does not blur it: σ always 0
    assert law.p_blur == 0.0 and torch.equal(params_from_draws(u, law)[1], torch.zeros(2))
    assert law.brightness == (0.6, 1.4) and law.hue == (-36.0, 36.0) and law.saturation == (0.8, 1.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_kernel_equals_the_reference(dtype):
    """The kernel (interpreted here, compiled on a GPU): the draws' mapping (σ included) and
    the step, on a size that is not a multiple of its block, every flag combination,
    flips; float32 to float rounding, the half types to one unit of their last place (the
    interpreter truncates to bfloat16 where a GPU rounds to nearest), but for one level on
    under 0.1 % of the values."""
    from mscn.cuda_kernels.colour_triton import colour_triton

    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (16, 37, 53, 3), dtype=torch.uint8, generator=gen)
    draws = torch.rand(16, len(DRAWS), generator=gen)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    got, sigma = colour_triton(x.to(DEV), draws.to(DEV), STRONG, mean, std, dtype)  # compiled where a GPU is
    got, sigma = got.cpu(), sigma.cpu()
    params, want_sigma = params_from_draws(draws, STRONG)
    for k in (0, 5, 6):
        assert 0 < params[:, k].sum() < 16, PARAMS[k]  # each flag both ways
    assert torch.allclose(sigma, want_sigma, atol=1e-6) and (sigma == 0).any() and (sigma > 0).any()
    want = colour_reference(x, params, mean, std, torch.float32)
    assert got.dtype == dtype and got.shape == (16, 3, 37, 53)
    # the kernel multiplies the matrices out in another order than torch: a value within
    # float rounding of a half level may round one level away, on very few pixels
    level = 1.0 / min(std)
    tol = 1e-5 if dtype == torch.float32 else want.abs() * torch.finfo(dtype).eps + 1e-6
    off = (got.float() - want).abs() > tol
    assert off.float().mean() < 1e-3 and ((got.float() - want).abs() <= level + 2 * tol)[off].all()


def test_colour_per_sample_refuses_what_it_cannot_colour():
    x = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    u = torch.full((2, len(DRAWS)), 0.99)  # no flag set
    with pytest.raises(MscnError, match="expects uint8"):
        colour_per_sample(x.float(), u, STRONG, *IDENTITY)
    with pytest.raises(MscnError, match="expects uint8"):
        colour_per_sample(x.permute(0, 3, 1, 2), u, STRONG, *IDENTITY)  # CHW is not what DALI hands over
    with pytest.raises(MscnError, match=r"colour draws of shape \(2, 8\)"):
        colour_per_sample(x, u[:, :8], STRONG, *IDENTITY)
    views, sigma = colour_per_sample(x, u.reshape(-1), STRONG, *IDENTITY)  # flat per sample
    assert torch.equal(views, torch.zeros(2, 3, 4, 4)) and torch.equal(sigma, torch.zeros(2))


def test_the_compiled_kernel_refuses_a_cpu_tensor_in_one_line():
    """Without TRITON_INTERPRET the kernel is compiled for a GPU: CPU tensors are refused
    with one line saying how to interpret it, not with Triton's pointer error."""
    import os
    import subprocess
    import sys

    code = ("import torch\n"
            "from mscn.colour import DRAWS, ColourLaw\n"
            "from mscn.config import ViewCfg\n"
            "from mscn.cuda_kernels.colour_triton import colour_triton\n"
            "from mscn.errors import MscnError\n"
            "try:\n"
            "    colour_triton(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.zeros(2, len(DRAWS)),\n"
            "                  ColourLaw.of(ViewCfg(), True), (0, 0, 0), (1, 1, 1))\n"
            "except MscnError as e:\n"
            "    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == ("colour kernel: cannot take a CPU tensor (set TRITON_INTERPRET=1 before importing "
                                "mscn.cuda_kernels to interpret the kernel)")


def _run(pipe, names):
    pipe.build()
    return {k: torch.from_numpy(np.array(v.as_array())) for k, v in zip(names, pipe.run())}


def _debug_batches(folder, view, seed: int, batches: int = 10) -> list[dict]:
    """``batches`` batches of 24 of a one-view graph with its colour left to the loader and
    debug outputs (the drawn flags): each a dict of numpy arrays by output name."""
    source = resolve_source(str(folder))
    names = output_names(1, source, debug_outputs=True, coloured=(0,))
    pipe = views_pipeline(source, [view], image_size=32, highpass=None, shuffle=True, batch_size=24, num_threads=1,
                          device_id=None, seed=seed, debug_outputs=True, colour_in_loader=True, prefetch_queue_depth=1)
    pipe.build()
    return [{k: np.array(v.as_array()) for k, v in zip(names, pipe.run())} for _ in range(batches)]


def test_one_draw_per_view_and_the_flags_dali_reports(folder):
    """The DALI graph with the colour left to the loader: the views leave DALI as the uint8
    HWC crops, each with ten uniforms per sample, in [0, 1) and independent of each
    other; the flags DALI reports (debug outputs) are those the law gives, and their
    frequencies are the probabilities."""
    cfg = tiny_cfg(folder)
    view = dataclasses.replace(cfg.views[0], blur_prob=0.0, jitter_prob=0.8, grayscale_prob=0.2, flip_prob=0.5)
    assert coloured_views([view], False, True) == (0,)
    assert output_names(1, resolve_source(str(folder)), debug_outputs=True, coloured=(0,))[:2] == ["view0",
                                                                                                "view0_colour"]
    batches = _debug_batches(folder, view, seed=5)
    for got in batches:
        assert got["view0"].dtype == np.uint8 and got["view0"].shape == (24, 32, 32, 3)
    u = np.concatenate([got["view0_colour"] for got in batches])
    f = np.concatenate([got["view0_flags"] for got in batches])
    assert u.shape == (240, len(DRAWS)) and u.dtype == np.float32 and (u >= 0).all() and (u < 1).all()
    assert np.abs(np.corrcoef(u.T) - np.eye(len(DRAWS))).max() < 0.3  # not one number repeated
    params, sigma = params_from_draws(torch.from_numpy(u), ColourLaw.of(view, blur=False))
    p = params.numpy()
    assert np.array_equal(p[:, 6], f[:, 0]) and np.array_equal(p[:, 0], f[:, 1]) and np.array_equal(p[:, 5], f[:, 2])
    assert (f[:, 3] == 0).all() and (f[:, 4] == 0).all() and (sigma == 0).all()  # no blur, no solarize
    for k, (lo, hi) in zip(range(1, 5), [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-36.0, 36.0)]):
        assert (p[:, k] >= lo).all() and (p[:, k] <= hi).all() and p[:, k].std() > (hi - lo) / 8, PARAMS[k]
    for k, prob in ((0, 0.8), (5, 0.2), (6, 0.5)):
        assert abs(p[:, k].mean() - prob) < 4 * math.sqrt(prob * (1 - prob) / 240), PARAMS[k]


def test_the_loaders_colour_is_dalis_color_twist_on_the_handed_over_views(folder):
    """The loader's step on what DALI hands over (a crop and its draws) equals DALI's own
    colour passes with the factors those draws give, mirrored where flipped, but for one
    level on a handful of pixels: the whole step is checked on real draws, not only on
    chosen factors."""
    cfg = tiny_cfg(folder)
    view = dataclasses.replace(cfg.views[0], blur_prob=0.0, jitter_prob=0.8, grayscale_prob=0.5, flip_prob=0.5)
    law = ColourLaw.of(view, blur=False)
    source = resolve_source(str(folder))
    pipe = views_pipeline(source, [view], image_size=32, highpass=None, shuffle=True, batch_size=24, num_threads=1,
                          device_id=None, seed=9, colour_in_loader=True)
    got = _run(pipe, output_names(1, source, coloured=(0,)))
    crops, draws = got["view0"], got["view0_colour"]
    params, _ = params_from_draws(draws, law)
    for k in (0, 5, 6):
        assert 0 < params[:, k].sum() < 24, PARAMS[k]  # each flag both ways
    want = _dali_twist(_hwc(crops), params.numpy())
    ours = _unflip(colour_per_sample(crops, draws, law, *IDENTITY)[0], params)
    diff = np.abs(ours - want.astype(np.float32))
    assert diff.max() <= 1.0 and (diff > 0).mean() < 1e-3


def test_every_coloured_view_gets_its_own_numbers(folder, monkeypatch):
    """Through build_train_loader, four views: each view the loader hands out is the
    reference step on *its own* crop and numbers, as DALI handed them over (no blur, no
    high-pass, no masks, so nothing else touches them)."""
    from mscn.pipelines.loader import DaliLoader

    seen = []
    convert = DaliLoader._convert

    def spy(self, out):
        seen.append({k: v.clone() for k, v in out.items()})
        return convert(self, out)

    monkeypatch.setattr(DaliLoader, "_convert", spy)
    cfg = tiny_cfg(folder, "train.global_batch=8", "data.colour_where=loader", "highpass.enabled=false",
                   *(f"views.{i}.blur_prob=0" for i in range(4)))
    loader = build_train_loader(cfg, apply_mask=False)
    assert loader.colour == (0, 1, 2, 3)
    batch = next(iter(loader))
    (out,) = seen
    draws = [out[f"view{i}_colour"] for i in range(4)]
    assert not any(torch.equal(draws[0], d) for d in draws[1:])  # the views' draws differ
    for i in range(4):
        params, _ = params_from_draws(draws[i], ColourLaw.of(cfg.views[i], blur=False))
        want = colour_reference(out[f"view{i}"], params, cfg.data.mean, cfg.data.std)
        assert torch.allclose(batch.views[i], want, atol=1e-5), i


def test_a_coloured_views_blur_takes_its_sigma_from_its_draws(folder, monkeypatch):
    """With the blur in the loader too, a coloured view has no σ output: its blur gets the
    σ its own draws give (0 where the flag is off, in blur_sigma where it is on)."""
    import mscn.pipelines.loader as loader_mod
    from mscn.pipelines.loader import DaliLoader

    seen, blurred = [], []
    convert, blur = DaliLoader._convert, loader_mod.blur_per_sample
    monkeypatch.setattr(DaliLoader, "_convert", lambda self, out: (seen.append(dict(out)), convert(self, out))[1])
    monkeypatch.setattr(loader_mod, "blur_per_sample",
                        lambda x, sigma, *a: (blurred.append(sigma.clone()), blur(x, sigma, *a))[1])
    cfg = tiny_cfg(folder, "train.global_batch=8", "data.colour_where=loader", "data.blur_where=loader")
    loader = build_train_loader(cfg, apply_mask=False)
    assert not any(n.endswith("_sigma") for n in loader._names)
    next(iter(loader))
    (out,) = seen
    assert len(blurred) == 4
    for i in range(4):
        want = params_from_draws(out[f"view{i}_colour"], ColourLaw.of(cfg.views[i], blur=True))[1]
        assert torch.equal(blurred[i], want), i
        lo, hi = cfg.views[i].blur_sigma
        on = want > 0
        assert ((want[on] >= lo) & (want[on] <= hi)).all()


def test_colour_where_rules(folder):
    """Which views move (colour, and nothing DALI applies after it), the high-pass follows
    them into the loader, an explicit highpass.where=pipeline and a typo are refused, and
    the evaluation loaders move nothing."""
    cfg = tiny_cfg(folder, "data.colour_where=loader", "data.blur_where=loader")
    assert cfg.colour_in_loader(gpu=False) and cfg.colour_in_loader(gpu=True)
    p = plan(cfg, "cpu")
    assert p.colour_in_adapter and p.highpass_in_pipeline is None and p.highpass_in_adapter == (1.0, 7)
    assert not plan(cfg, "cpu", views=[]).colour_in_adapter
    assert not tiny_cfg(folder).colour_in_loader(gpu=True)  # pipeline is the default
    # the default views blur (p 0.5): on the CPU path auto keeps the blur, and so the colour, in DALI
    cpu_auto = tiny_cfg(folder, "data.colour_where=loader")
    assert not cpu_auto.colour_in_loader(gpu=False) and cpu_auto.colour_in_loader(gpu=True)
    # ... and a run says so in one line, with what moves it (pretrain prints it at the start)
    assert cpu_auto.colour_where_note(gpu=False) == (
        "data.colour_where=loader moves no view's colour on the CPU path: the views blur in DALI here "
        "(data.blur_where resolves to pipeline): add data.blur_where=loader")
    assert cpu_auto.colour_where_note(gpu=True) is None and cfg.colour_where_note(gpu=False) is None
    # BYOL's solarize moves with the colour and the blur: every view moves, even where each solarizes
    solar = tiny_cfg(folder, "data.colour_where=loader", "data.blur_where=loader",
                     *(f"views.{i}.solarize_prob=0.2" for i in range(4)))
    assert solar.blur_in_loader(gpu=True) and solar.colour_in_loader(gpu=True)
    assert solar.colour_where_note(gpu=True) is None
    assert not tiny_cfg(folder, "data.blur_where=loader", *(f"views.{i}.solarize_prob=0.2" for i in range(4))
                        ).blur_in_loader(gpu=True)  # without the colour's move, solarize keeps the blur in DALI
    grey = tiny_cfg(folder, "data.colour_where=loader", *(f"views.{i}.{k}=0" for i in range(4)
                                                          for k in ("jitter_prob", "grayscale_prob")))
    assert "no view has a colour jitter or grayscale" in grey.colour_where_note(gpu=True)
    assert tiny_cfg(folder).colour_where_note(gpu=False) is None  # pipeline: nothing to say
    # a reusing project's loader says it too (it said nothing, its batches those of the default)
    from mscn.pipelines.loader import ColourWhereWarning

    with pytest.warns(ColourWhereWarning, match="data.colour_where=loader moves no view's colour on the CPU path"):
        build_train_loader(tiny_cfg(folder, "data.colour_where=loader", "train.global_batch=8"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ColourWhereWarning)
        build_train_loader(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch=8)))
    v = cfg.views[0]
    assert v.colour_movable(True) and not v.colour_movable(False)
    assert dataclasses.replace(v, blur_prob=0.0).colour_movable(False)
    assert dataclasses.replace(v, solarize_prob=0.2).colour_movable(True)  # BYOL's solarize moves with it
    assert not dataclasses.replace(v, solarize_prob=0.2).colour_movable(False)
    assert not dataclasses.replace(v, jitter_prob=0.0, grayscale_prob=0.0).colour_movable(True)  # nothing to move
    assert coloured_views([v, dataclasses.replace(v, solarize_prob=0.2)], True, True) == (0, 1)
    assert coloured_views([v, dataclasses.replace(v, jitter_prob=0.0, grayscale_prob=0.0)], True, True) == (0,)
    with pytest.raises(ConfigError, match="colours the views after DALI"):
        tiny_cfg(folder, "data.colour_where=loader", *(f"views.{i}.blur_prob=0" for i in range(4)),
                 "highpass.where=pipeline")
    with pytest.raises(ConfigError, match="data.colour_where.*must be pipeline or loader"):
        tiny_cfg(folder, "data.colour_where=gpu")
    with pytest.raises(ValueError, match="high-pass must run there"):
        views_pipeline(resolve_source(str(folder)), cfg.views, image_size=32, highpass=(1.0, 7), batch_size=8,
                       num_threads=1, device_id=None, blur_in_loader=True, colour_in_loader=True)


def test_train_loader_with_the_colour_in_the_loader(folder):
    """build_train_loader end to end: four coloured, blurred, high-passed, masked views; the
    loader's state names the colour's place (a resume with the other place is refused)."""
    cfg = tiny_cfg(folder, "train.global_batch=8", "data.colour_where=loader", "data.blur_where=loader")
    loader = build_train_loader(cfg)
    assert loader.colour == (0, 1, 2, 3) and sorted(loader.blur) == [0, 1, 2, 3]
    batch = next(iter(loader))
    assert len(batch.views) == 4 and all(v.shape == (8, 3, 32, 32) and v.dtype == torch.float32 for v in batch.views)
    assert all(abs(v.mean().item()) < 0.1 for v in batch.views)  # high-passed: centred on 0
    assert all(v.abs().mean() > 0.01 for v in batch.views)
    assert loader.state_dict()["colour_where"] == "loader"
    assert build_train_loader(tiny_cfg(folder, "train.global_batch=8")).state_dict()["colour_where"] == "pipeline"


def _same_first_view(folder, device=None, extra=(), blur: bool = False):
    """View 0 through build_train_loader with DALI's colour and with the loader's, every
    random choice but the crop pinned (jitter and gray always, neutral jitter factors, a
    flip always, no blur unless ``blur`` (then ``extra`` pins it); the high-pass in the
    loader in both), so both draw the same crop: the index, and the views' difference."""
    pinned = ("jitter_prob=1.0", "grayscale_prob=1.0", "brightness=0", "contrast=0", "saturation=0", "hue=0",
              "flip_prob=1.0", *(() if blur else ("blur_prob=0",)))
    ov = ["train.global_batch=8", "highpass.where=loader", *(f"views.{i}.{k}" for i in range(4) for k in pinned),
          *extra]
    dali = next(iter(build_train_loader(tiny_cfg(folder, *ov), device=device, apply_mask=False)))
    ours = next(iter(build_train_loader(tiny_cfg(folder, *ov, "data.colour_where=loader"), device=device,
                                        apply_mask=False)))
    assert torch.equal(dali.index.cpu(), ours.index.cpu())
    return (ours.views[0].float() - dali.views[0].float()).abs(), ours


def test_the_loader_gives_the_first_view_dali_would_give(folder):
    """End to end on the CPU path (the loader's flip, colour, normalization and high-pass
    against DALI's twist, crop_mirror_normalize and the same high-pass): equal to float
    rounding, or one level on a few pixels, through the high-pass."""
    diff, _ = _same_first_view(folder)
    bound = 2 * 1.0 / min(tiny_cfg(folder).data.std) + 1e-4  # one level, doubled by x - blur(x)
    assert diff.max() <= bound and diff.mean() < 1e-3, (diff.max(), diff.mean())


def test_solarize_normalize_is_dalis_lookup_table_on_rounded_levels():
    """BYOL's solarize in the loader: whole levels (what DALI's blur hands its solarize),
    DALI's own lookup table (ops.solarize) where the flag is set, then the normalization."""
    from mscn.colour import solarize_normalize
    from mscn.pipelines.ops import solarize

    gen = torch.Generator().manual_seed(4)
    levels = torch.randint(0, 256, (6, 3, 9, 11), generator=gen).float()
    blurred = (levels + torch.rand(levels.shape, generator=gen) * 0.8 - 0.4).clamp(-0.4, 255.4)  # within 0.4 of a level
    flag = torch.tensor([True, False, True, True, False, True])

    @pipeline_def(batch_size=6, num_threads=1, device_id=None)
    def lut():
        x = fn.external_source(source=lambda: [np.ascontiguousarray(v.permute(1, 2, 0).numpy().astype(np.uint8))
                                               for v in levels], layout="HWC")
        return solarize(x)

    pipe = lut()
    pipe.build()
    (out,) = pipe.run()
    dali = torch.from_numpy(np.stack([np.array(t) for t in out])).permute(0, 3, 1, 2).float()
    want = torch.where(flag[:, None, None, None], dali, levels)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    got = solarize_normalize(blurred, flag, mean, std)
    norm = (want - torch.tensor(mean)[None, :, None, None]) / torch.tensor(std)[None, :, None, None]
    assert torch.allclose(got, norm, atol=1e-6)
    assert (want[flag] != levels[flag]).any()  # the table did invert something


def test_the_solarize_flags_are_dalis_and_reach_the_loaders_solarize(folder, monkeypatch):
    """A BYOL view (solarize at p 0.5): the flag the loader applies is the one DALI reports
    for the same draw (debug outputs), at its probability; and through build_train_loader
    each solarizing view's solarize gets its own draws' flags."""
    import mscn.pipelines.loader as loader_mod
    from mscn.pipelines.loader import DaliLoader

    cfg = tiny_cfg(folder)
    view = dataclasses.replace(cfg.views[0], blur_prob=0.0, solarize_prob=0.5)
    batches = _debug_batches(folder, view, seed=7)
    u = torch.from_numpy(np.concatenate([got["view0_colour"] for got in batches]))
    flag = solarize_flags(u, ColourLaw.of(view, blur=False)).numpy()
    want = np.concatenate([got["view0_flags"][:, 4] for got in batches])
    assert np.array_equal(flag.astype(np.int32), want)
    assert abs(flag.mean() - 0.5) < 4 * math.sqrt(0.25 / flag.size)

    seen, applied = [], []
    convert, solarize = DaliLoader._convert, loader_mod.solarize_normalize
    monkeypatch.setattr(DaliLoader, "_convert", lambda self, out: (seen.append(dict(out)), convert(self, out))[1])
    monkeypatch.setattr(loader_mod, "solarize_normalize",
                        lambda x, f, *a: (applied.append(f.clone()), solarize(x, f, *a))[1])
    byol = tiny_cfg(folder, "train.global_batch=8", "data.colour_where=loader", "data.blur_where=loader",
                    "views.1.solarize_prob=0.5", "views.3.solarize_prob=0.5")
    next(iter(build_train_loader(byol, apply_mask=False)))
    (out,) = seen
    assert len(applied) == 2  # views 1 and 3 solarize; 0 and 2 are normalized in the kernel
    for f, i in zip(applied, (1, 3)):
        assert torch.equal(f, solarize_flags(out[f"view{i}_colour"], ColourLaw.of(byol.views[i], blur=True))), i


def test_the_loader_gives_a_solarized_first_view_dali_would_give(folder):
    """BYOL's views: colour, gray and solarize always, no blur, through both graphs (the
    draws pinned): equal to float rounding, or one level on a few pixels, through the same
    high-pass."""
    diff, ours = _same_first_view(folder, extra=[f"views.{i}.solarize_prob=1.0" for i in range(4)])
    bound = 2 * 1.0 / min(tiny_cfg(folder).data.std) + 1e-4
    assert diff.max() <= bound and diff.mean() < 1e-3, (diff.max(), diff.mean())


def test_the_loader_gives_a_blurred_and_solarized_first_view_dali_would_give(folder):
    """The same with a blur at a constant σ before the solarize: DALI blurs and solarizes
    (a view that solarizes keeps DALI's blur unless its colour moves), the loader colours,
    blurs, rounds, solarizes and normalizes; one level apart where the two blurs round a
    value near a half level differently, through the high-pass."""
    extra = ["data.blur_where=loader", *(f"views.{i}.{k}" for i in range(4) for k in (
        "solarize_prob=1.0", "blur_prob=1.0", "blur_sigma=[1.3,1.3]"))]
    diff, ours = _same_first_view(folder, extra=extra, blur=True)
    bound = 2 * 1.0 / min(tiny_cfg(folder).data.std) + 1e-4
    assert diff.max() <= bound and diff.mean() < 1e-3, (diff.max(), diff.mean())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_gpu_kernel_equals_the_reference(dtype):
    from mscn.cuda_kernels.colour_triton import colour_triton

    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (8, 224, 224, 3), dtype=torch.uint8, generator=gen)
    draws = torch.rand(8, len(DRAWS), generator=gen)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    params, want_sigma = params_from_draws(draws, STRONG)
    want = colour_reference(x, params, mean, std)
    got, sigma = colour_triton(x.cuda(), draws.cuda(), STRONG, mean, std, dtype)
    got = got.cpu()
    assert torch.allclose(sigma.cpu(), want_sigma, atol=1e-5)
    assert got.dtype == dtype and got.shape == (8, 3, 224, 224)
    # the GPU's fused multiply-adds may move a value near a half level by one level, rarely;
    # the half types round to nearest on a GPU: half a unit of their last place
    tol = 1e-4 if dtype == torch.float32 else want.abs() * torch.finfo(dtype).eps / 2 + 1e-6
    diff = (got.float() - want).abs()
    off = diff > tol
    assert off.float().mean() < 1e-4 and (diff <= 1.0 / min(std) + 2 * tol)[off].all()


@pytest.mark.gpu
def test_the_gpu_kernel_is_dalis_gpu_color_twist_on_the_gpu_pipelines_draws(folder):
    """The GPU pipeline's own crops and draws: the kernel against DALI's GPU color_twist
    with the factors they give (which rounds half to even where the kernel rounds half away from
    zero): one level apart on under 0.1 % of the pixels at most."""
    cfg = tiny_cfg(folder)
    view = dataclasses.replace(cfg.views[0], blur_prob=0.0, jitter_prob=0.8, grayscale_prob=0.5, flip_prob=0.5)
    source = resolve_source(str(folder))
    pipe = views_pipeline(source, [view], image_size=64, highpass=None, shuffle=True, batch_size=24, num_threads=2,
                          device="gpu", device_id=0, seed=9, colour_in_loader=True)
    pipe.build()
    names = output_names(1, source, coloured=(0,))
    got = {k: np.stack([np.array(t) for t in v.as_cpu()]) for k, v in zip(names, pipe.run())}
    crops, draws = torch.from_numpy(got["view0"]), torch.from_numpy(got["view0_colour"])
    assert crops.shape == (24, 64, 64, 3) and draws.shape == (24, len(DRAWS))
    law = ColourLaw.of(view, blur=False)
    params, _ = params_from_draws(draws, law)
    want = _dali_twist(_hwc(crops), params.numpy(), gpu=True)
    ours = _unflip(colour_per_sample(crops.cuda(), draws.cuda(), law, *IDENTITY)[0].cpu(), params)
    diff = np.abs(ours - want.astype(np.float32))
    assert diff.max() <= 1.0 and (diff > 0).mean() < 1e-3


@pytest.mark.gpu
def test_the_gpu_loader_gives_a_blurred_and_solarized_first_view_dali_would_give(folder):
    """BYOL's chain on the GPU path: DALI's GPU blur and solarize against the loader's float32
    blur, rounding and solarize, float16 views out (their rounding allowed on top)."""
    extra = ["data.blur_where=loader", "data.output_dtype=float16", *(f"views.{i}.{k}" for i in range(4) for k in (
        "solarize_prob=1.0", "blur_prob=1.0", "blur_sigma=[1.3,1.3]"))]
    diff, ours = _same_first_view(folder, torch.device("cuda", 0), extra=extra, blur=True)
    assert ours.views[0].is_cuda and ours.views[0].dtype == torch.float16
    bound = 2 * 1.0 / min(tiny_cfg(folder).data.std) + 8e-3
    assert diff.max() <= bound and diff.mean() < 8e-3, (diff.max(), diff.mean())


@pytest.mark.gpu
def test_the_gpu_loader_gives_the_first_view_dali_would_give(folder):
    """The same on the GPU path: DALI's GPU twist and crop_mirror_normalize against the
    kernel, float16 views, the same high-pass (GEMMs in the loader) after both."""
    diff, ours = _same_first_view(folder, torch.device("cuda", 0), ["data.output_dtype=float16"])
    assert ours.views[0].is_cuda and ours.views[0].dtype == torch.float16
    bound = 2 * 1.0 / min(tiny_cfg(folder).data.std) + 8e-3
    assert diff.max() <= bound and diff.mean() < 8e-3, (diff.max(), diff.mean())
