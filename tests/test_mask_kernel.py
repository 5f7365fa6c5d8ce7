"""The Triton mask kernel against the plain-torch reference (paper §5.2).

On CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest.py before import);
the interpreter is slow, so the tensors are tiny. With a GPU the same tests run the
compiled kernel on CUDA tensors.
"""
import math
import warnings

import pytest
import torch

from mscn.config import MaskCfg
from mscn.cuda_kernels import apply_masks, apply_tables, sample_mask_table, sample_tables
from mscn.cuda_kernels.mask_triton import _tile
from mscn.errors import MscnError

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CFGS = [MaskCfg(ratio=0.3, grid=8, p_noise=0.5, noise_std=0.25),
        MaskCfg(ratio=0.15, grid=16, p_noise=0.5, noise_std=1.0, p_focal=1.0)]


def _views(dtype, shape=(3, 3, 40, 56), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(DEV, dtype) for _ in range(2)]


def _bits(x):
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int16)


def _no_noise(cfgs):
    return [MaskCfg(**{**c.__dict__, "p_noise": 0.0}) for c in cfgs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inplace", [True, False])
def test_same_table_gives_bit_identical_output_without_noise(dtype, inplace):
    views = _views(dtype)
    tables = sample_tables(views, _no_noise(CFGS), torch.Generator().manual_seed(1))
    ref = apply_tables([v.clone() for v in views], tables, inplace=False, backend="torch")
    work = [v.clone() for v in views]
    out = apply_tables(work, tables, inplace=inplace, backend="triton")
    for w, o, r, v, t in zip(work, out, ref, views, tables):
        assert (o is w) == inplace
        assert torch.equal(_bits(o), _bits(r))
        assert t.cells.any() and (_bits(o[t.pixel_mask()]) == 0).all()
        if not inplace:
            assert torch.equal(_bits(w), _bits(v))  # input untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_fills_exactly_the_masked_pixels_of_noisy_samples(dtype):
    views = _views(dtype, shape=(6, 3, 24, 40))
    cfgs = [MaskCfg(ratio=0.4, grid=8, p_noise=0.5, noise_std=0.25)] * 2
    tables = sample_tables(views, cfgs, torch.Generator().manual_seed(2))
    out = apply_tables([v.clone() for v in views], tables, inplace=False, backend="triton")
    for o, v, t in zip(out, views, tables):
        m = t.pixel_mask()
        noisy = m & t.noise[:, None, None, None]
        assert t.noise.any() and (~t.noise).any()
        assert torch.equal(_bits(o[~m]), _bits(v[~m]))
        assert (_bits(o[m & ~noisy]) == 0).all()
        z = o[noisy].float()
        assert (z != 0).all() and abs(z.std().item() / 0.25 - 1) < 0.1


def test_kernel_noise_statistics_unique_draws_and_channel_independence():
    x = torch.ones(2, 3, 80, 96, device=DEV)  # 2 x 3 tiles of 64 x 32 per plane
    cfg = MaskCfg(ratio=0.5, grid=4, p_noise=1.0, noise_std=0.25, p_ind=0.0)
    table = sample_mask_table(*x.shape, cfg, torch.Generator().manual_seed(3), device=DEV)
    (y,) = apply_tables([x], [table], backend="triton")
    m = table.pixel_mask()
    z = y[m]
    assert abs(z.mean().item()) < 5 * 0.25 / math.sqrt(z.numel())
    assert abs(z.std().item() / 0.25 - 1) < 0.03
    # distinct Philox counters/keys: no element repeats another's draw (a reused counter
    # would repeat thousands; ~3 chance fp32 collisions are expected among 23k normals)
    assert z.numel() - z.unique().numel() <= 10
    both = m.all(1)
    r = torch.corrcoef(y.permute(1, 0, 2, 3)[:, both].float())
    assert (r - torch.eye(3, device=DEV)).abs().max() < 0.05
    # Philox is deterministic: the same table gives the same noise
    (y2,) = apply_tables([torch.ones_like(x)], [table], backend="triton")
    assert torch.equal(y, y2)


@pytest.mark.parametrize("shape", [(1, 3, 17, 20), (2, 1, 9, 64), (1, 2, 5, 130), (2, 3, 70, 33)])
def test_sizes_not_divisible_by_grid_and_every_tile_width(shape):
    x = torch.randn(shape, device=DEV)
    cfg = MaskCfg(ratio=0.4, grid=7, p_noise=0.0)
    table = sample_mask_table(*shape, cfg, torch.Generator().manual_seed(4), device=DEV)
    ref = apply_tables([x.clone()], [table], backend="torch")[0]
    out = apply_tables([x.clone()], [table], backend="triton")[0]
    assert torch.equal(out, ref) and table.cells.any()


def test_tile_rows_are_whole_cache_lines_with_little_waste():
    assert _tile(224) == (16, 32)  # 7 tiles of 32 columns, no idle lanes
    assert _tile(64) == (8, 64)
    assert _tile(512) == (4, 128)
    assert _tile(56)[1] == 64


def test_channels_last_strides():
    x = torch.randn(2, 3, 24, 32, device=DEV).to(memory_format=torch.channels_last)
    table = sample_mask_table(*x.shape, MaskCfg(ratio=0.3, grid=8, p_noise=0.0),
                              torch.Generator().manual_seed(5), device=DEV)
    ref = apply_tables([x.clone()], [table], backend="torch")[0]
    out = apply_tables([x.clone()], [table], inplace=False, backend="triton")[0]
    assert torch.equal(out, ref)


def test_apply_masks_triton_end_to_end_ratio_zero_and_reproducible():
    cfgs = [MaskCfg(ratio=0.0, p_noise=1.0), MaskCfg(ratio=0.3, grid=8, p_noise=1.0)]

    def run(seed):
        views = _views(torch.float32, shape=(2, 3, 16, 24))
        orig = [v.clone() for v in views]
        outs, masks = apply_masks(views, cfgs, torch.Generator().manual_seed(seed),
                                  return_masks=True, backend="triton")
        return orig, outs, masks

    orig, a, ma = run(7)
    _, b, _ = run(7)
    assert torch.equal(a[0], orig[0]) and not ma[0].any()
    assert torch.equal(a[1][~ma[1]], orig[1][~ma[1]]) and ma[1].any()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_triton_backend_refuses_what_it_cannot_run():
    with pytest.raises(MscnError, match="float64"):
        apply_masks([torch.zeros(1, 3, 8, 8, dtype=torch.float64, device=DEV)], [MaskCfg()], backend="triton")
    table = sample_mask_table(1, 3, 8, 8, MaskCfg(), device=DEV)
    with pytest.raises(MscnError, match="mask table is for"):
        apply_tables([torch.zeros(2, 3, 8, 8, device=DEV)], [table], backend="triton")


@pytest.mark.gpu
def test_auto_falls_back_to_reference_once_with_a_warning():
    import mscn.cuda_kernels as ck

    ck._warned = False
    x = [torch.randn(2, 3, 16, 16, device="cuda", dtype=torch.float64)]
    with pytest.warns(RuntimeWarning, match="reference"):
        apply_masks(x, [MaskCfg()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call must stay silent
        apply_masks(x, [MaskCfg()])


def test_auto_uses_the_reference_silently_on_cpu():
    x = [torch.randn(2, 3, 16, 16)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_masks(x, [MaskCfg()])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_matches_reference_at_training_size(dtype):
    views = [torch.randn(64, 3, 224, 224, device=DEV, dtype=dtype) for _ in range(4)]
    cfgs = [MaskCfg(ratio=0.15, grid=32, p_noise=0.5), MaskCfg(ratio=0.05, grid=32, p_noise=0.2)] * 2
    tables = sample_tables(views, cfgs, torch.Generator(DEV).manual_seed(0))
    ref = apply_tables(views, tables, inplace=False, backend="torch")
    for inplace in (False, True):
        work = [v.clone() for v in views]
        out = apply_tables(work, tables, inplace=inplace, backend="triton")
        for o, r, v, t in zip(out, ref, views, tables):
            m = t.pixel_mask()
            noisy = m & t.noise[:, None, None, None]
            assert torch.equal(_bits(o[~noisy]), _bits(r[~noisy]))  # same positions, zeros, untouched rest
            assert abs(o[noisy].float().std().item() / 0.25 - 1) < 0.02


@pytest.mark.gpu
def test_gpu_mask_step_has_no_host_sync():
    views = [torch.randn(8, 3, 64, 64, device="cuda") for _ in range(2)]
    cfgs = [MaskCfg(grid=16), MaskCfg(grid=16, ratio=0.05)]
    gen = torch.Generator("cuda").manual_seed(0)
    apply_masks(views, cfgs, gen, backend="triton")  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        apply_masks(views, cfgs, gen, backend="triton")
        apply_masks(views, cfgs, gen, inplace=False, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _fields(t):
    return {f: getattr(t, f).cpu() for f in ("cells", "offset", "noise", "seed", "focal", "independent")}


def test_one_launch_draws_every_view_as_its_own_launch_would():
    """The fused table launch (views on the kernel's second axis) gives view i exactly the
    table a one-view launch draws with key i, under each view's own config."""
    from mscn.cuda_kernels.mask_tables_triton import sample_mask_table_triton, sample_mask_tables_triton

    cfgs = [MaskCfg(ratio=0.05, grid=8, p_focal=0.0, p_ind=1.0, p_noise=0.0),
            MaskCfg(ratio=0.5, grid=8, p_focal=1.0, p_ind=0.0, p_noise=1.0, focal_aspect=(1.0, 1.0)),
            MaskCfg(ratio=0.15, grid=8)]
    keys = torch.tensor([11, 2**40 + 3, 12345], dtype=torch.int64, device=DEV)
    fused = sample_mask_tables_triton(16, 3, 40, 56, cfgs, keys)
    for i, cfg in enumerate(cfgs):
        alone = sample_mask_table_triton(16, 3, 40, 56, cfg, keys[i:i + 1])
        a, b = _fields(fused[i]), _fields(alone)
        assert all(torch.equal(a[f], b[f]) for f in a), f"view {i}"
    # each view followed its own config, not its neighbour's
    k = [torch.floor(c.ratio * t.cell_counts().prod(1).double() + 0.5).long() for c, t in zip(cfgs, fused)]
    assert torch.equal(fused[0].cells.cpu().flatten(2).sum(-1), k[0].cpu()[:, None].expand(-1, 3))
    assert fused[0].independent.all() and not fused[0].noise.any() and not fused[0].focal.any()
    assert not fused[1].independent.any() and fused[1].noise.all() and fused[1].focal.all()
    with pytest.raises(ValueError, match="one launch"):
        sample_mask_tables_triton(2, 3, 40, 56, [MaskCfg(grid=8), MaskCfg(grid=16)], keys[:2])


@pytest.mark.parametrize("size,grid", [(40, 8), (224, 32)])
def test_tables_do_not_depend_on_the_rows_per_program(monkeypatch, size, grid):
    """The GPU launch packs 2,048 elements per program, the interpreter 65,536: the Philox
    counters are per (sample, purpose, channel, cell), so the tables must be the same."""
    import mscn.cuda_kernels.mask_tables_triton as mtt

    cfgs = [MaskCfg(ratio=0.15, grid=grid), MaskCfg(ratio=0.5, grid=grid, p_focal=0.0, p_ind=1.0)]
    keys = torch.tensor([7, 2**33 + 1], dtype=torch.int64, device=DEV)
    wide = mtt.sample_mask_tables_triton(24, 3, size, size, cfgs, keys)
    monkeypatch.setattr(mtt, "_ELEMS_PER_PROGRAM", 2048)  # the GPU's setting: several programs here
    launch, _ = mtt.table_launch(24, 3, size, size, cfgs, keys)
    assert launch.grid[0] > 1
    narrow = mtt.sample_mask_tables_triton(24, 3, size, size, cfgs, keys)
    for i in range(len(cfgs)):
        a, b = _fields(wide[i]), _fields(narrow[i])
        assert all(torch.equal(a[f], b[f]) for f in a), f"view {i}"


def test_draw_tables_launches_once_per_run_of_alike_views(monkeypatch):
    """Views of one size and grid share a launch; a view with another grid gets its own,
    and every table still matches its view's config."""
    import mscn.cuda_kernels as ck

    launches = []
    real = ck.sample_mask_tables_triton
    monkeypatch.setattr(ck, "sample_mask_tables_triton",
                        lambda *a, **kw: launches.append(len(a[4])) or real(*a, **kw))
    views = [torch.zeros(4, 3, 32, 48, device=DEV) for _ in range(4)]
    cfgs = [MaskCfg(grid=8, ratio=0.1), MaskCfg(grid=8, ratio=0.4), MaskCfg(grid=16, ratio=0.3),
            MaskCfg(grid=8, ratio=0.2)]
    tables = ck.draw_tables(views, cfgs, torch.Generator().manual_seed(0), backend="triton")
    assert launches == [2, 1, 1]
    for t, c in zip(tables, cfgs):
        assert t.grid == c.grid
        k = torch.floor(c.ratio * t.cell_counts().prod(1).double() + 0.5).long()
        assert torch.equal(t.cells.cpu().flatten(2).sum(-1)[t.focal.cpu().logical_not().all(1)],
                           k.cpu()[t.focal.cpu().logical_not().all(1)][:, None].expand(-1, 3))
