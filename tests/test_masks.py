"""The mask decision table (mscn.maskspec) and the plain-torch reference (paper §5.2).

Statistical tests draw thousands of views with the vectorised sampler; tolerances are
about 5 standard errors, so a wrong probability or a biased draw fails them.
"""
import math

import pytest
import torch

from mscn.config import MaskCfg, load_config
from mscn.cuda_kernels import apply_masks
from mscn.cuda_kernels.mask_reference import apply_table_reference
from mscn.errors import ConfigError, MscnError
from mscn.maskspec import MaskTable, sample_mask_table

N = 4000  # views per statistical test
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel runs interpreted on the CPU
# every statistical test runs on both table samplers: the torch one (the CPU path) and
# the Triton table kernel (the GPU path); both must draw the same distribution
SAMPLERS = pytest.mark.parametrize("sampler", ["torch", "triton"])


def _table(cfg, b=N, c=3, h=224, w=224, seed=0, sampler="torch"):
    g = torch.Generator().manual_seed(seed)
    if sampler == "torch":
        return sample_mask_table(b, c, h, w, cfg, g)
    from mscn.cuda_kernels.mask_tables_triton import sample_mask_table_triton

    key = torch.randint(0, 2**62, (1,), generator=g, dtype=torch.int64).to(DEV)
    t = sample_mask_table_triton(b, c, h, w, cfg, key)
    fields = {f: getattr(t, f).cpu() for f in ("cells", "offset", "noise", "seed", "focal", "independent")}
    return MaskTable(**fields, grid=t.grid, noise_std=t.noise_std, height=t.height, width=t.width)


def _expected_k(t, ratio):
    return torch.floor(ratio * t.cell_counts().prod(1).double() + 0.5).long()


def _is_rectangle(cells):
    """(B, C, nH, nW) bool -> (B, C): the True cells are exactly their bounding box."""
    rows, cols = cells.any(3), cells.any(2)
    return (cells == (rows[..., :, None] & cols[..., None, :])).flatten(2).all(-1)


def _close(value, target, n, p=None):
    """|value - target| within 5 binomial standard errors."""
    p = target if p is None else p
    return abs(value - target) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9


@SAMPLERS
def test_random_masks_pick_exactly_round_ratio_cells_inside_the_grid(sampler):
    t = _table(MaskCfg(p_focal=0.0), sampler=sampler)
    k = _expected_k(t, 0.15)
    assert torch.equal(t.cells.flatten(2).sum(-1), k[:, None].expand(-1, 3))
    counts = t.cell_counts()
    iy = torch.arange(t.cells.shape[2])[None, None, :, None]
    ix = torch.arange(t.cells.shape[3])[None, None, None, :]
    outside = (iy >= counts[:, 0, None, None, None]) | (ix >= counts[:, 1, None, None, None])
    assert not (t.cells & outside).any()
    # every valid cell gets picked about equally often (uniform without replacement)
    per_cell = t.cells[counts[:, 0] == 8].float().mean((0, 1))
    assert per_cell.min() > 0.12 and per_cell.max() < 0.18


@SAMPLERS
def test_masked_pixel_fraction_matches_ratio(sampler):
    t = _table(MaskCfg(grid=16), b=1000, h=96, w=96, sampler=sampler)
    frac = t.pixel_mask().float().mean().item()
    assert abs(frac - 0.15) < 0.01
    t = _table(MaskCfg(grid=16, p_focal=0.0), b=1000, h=96, w=96, sampler=sampler)
    # cells partition the image, so E[masked pixels] = k/n of it even with partial cells
    expected = (_expected_k(t, 0.15) / t.cell_counts().prod(1)).mean().item()
    assert abs(t.pixel_mask().float().mean().item() - expected) < 0.003


@SAMPLERS
def test_focal_fraction_and_focal_masks_are_one_rectangle_of_about_k_cells(sampler):
    t = _table(MaskCfg(p_ind=0.0), sampler=sampler)
    assert _close(t.focal[:, 0].float().mean().item(), 0.4, N)
    rect = _is_rectangle(t.cells)
    assert rect[t.focal].all()
    assert rect[~t.focal].float().mean() < 0.1  # random masks are scattered cells
    area = t.cells.flatten(2).sum(-1)[t.focal].float()
    k = _expected_k(t, 0.15)[:, None].expand(-1, 3)[t.focal].float()
    assert abs(area.mean().item() / k.mean().item() - 1) < 0.15
    assert ((area / k) > 0.75).all() and ((area / k) < 1.3).all()
    # aspect log-uniform in (0.5, 2): both orientations occur
    rows, cols = t.cells.any(3).sum(-1)[t.focal], t.cells.any(2).sum(-1)[t.focal]
    assert (rows > cols).any() and (rows < cols).any()


@SAMPLERS
def test_channel_independent_fraction_and_shared_masks(sampler):
    t = _table(MaskCfg(p_ind=0.8), sampler=sampler)
    assert _close(t.independent.float().mean().item(), 0.8, N)
    same = (t.cells == t.cells[:, :1]).flatten(1).all(1)
    assert same[~t.independent].all()
    assert (~same[t.independent]).float().mean() > 0.95  # own draws almost never coincide
    assert _close(_table(MaskCfg(p_ind=0.3), sampler=sampler).independent.float().mean().item(), 0.3, N)


@SAMPLERS
def test_noise_flag_and_grid_offsets(sampler):
    t = _table(MaskCfg(p_noise=0.3, grid=32), sampler=sampler)
    assert _close(t.noise.float().mean().item(), 0.3, N)
    off = t.offset.long()
    assert off.min() == 0 and off.max() == 31
    assert abs(off.float().mean().item() - 15.5) < 0.5
    assert len(set(t.seed.tolist())) == N
    assert not _table(MaskCfg(random_offset=False), sampler=sampler).offset.any()


@SAMPLERS
@pytest.mark.parametrize("h,w,g", [(224, 224, 32), (50, 70, 16), (33, 17, 5)])
def test_mask_is_constant_inside_each_grid_cell(h, w, g, sampler):
    t = _table(MaskCfg(grid=g, ratio=0.4), b=300, h=h, w=w, sampler=sampler)
    pix = t.pixel_mask()
    dy, dx = t.offset[:, 0].long(), t.offset[:, 1].long()
    # the mask may only change between pixels h-1 and h where (h + dy) % g == 0
    row_edge = ((torch.arange(1, h) + dy[:, None]) % g == 0)[:, None, :, None]
    col_edge = ((torch.arange(1, w) + dx[:, None]) % g == 0)[:, None, None, :]
    assert not ((pix[:, :, 1:] != pix[:, :, :-1]) & ~row_edge).any()
    assert not ((pix[..., 1:] != pix[..., :-1]) & ~col_edge).any()
    assert torch.equal(t.masked_pixels(), pix.sum((2, 3)))  # cell areas, clipped at the border
    # partial border cells are real cells: they get masked too
    assert pix[:, :, -1].any() and pix[..., 0].any()


def _views(dtype, b=8, c=3, h=40, w=56, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, h, w, generator=g).to(dtype) for _ in range(2)]


def _bits(x):
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inplace", [True, False])
def test_reference_fill_zero_or_noise_and_unmasked_bit_identical(dtype, inplace):
    views = _views(dtype, b=16)
    orig = [v.clone() for v in views]
    cfgs = [MaskCfg(ratio=0.4, grid=8, p_noise=0.5, noise_std=0.25), MaskCfg(ratio=0.2, grid=16, p_noise=0.0)]
    outs, masks = apply_masks(views, cfgs, torch.Generator().manual_seed(3), inplace=inplace,
                              return_masks=True, backend="torch")
    for v, o, x, m in zip(views, orig, outs, masks):
        assert (x is v) == inplace and x.dtype == dtype
        if not inplace:
            assert torch.equal(_bits(v), _bits(o))  # input untouched
        assert torch.equal(_bits(x[~m]), _bits(o[~m]))
        assert m.any()
    # view 1 has no noise: masked values are exactly +0.0
    assert (_bits(outs[1][masks[1]]) == 0).all()


def test_reference_noise_statistics_and_channel_independence():
    x = torch.ones(64, 3, 32, 32)
    cfg = MaskCfg(ratio=0.5, grid=4, p_noise=1.0, noise_std=0.25, p_ind=0.0)
    (y,), (m,) = apply_masks([x], [cfg], torch.Generator().manual_seed(0), return_masks=True, backend="torch")
    z = y[m]
    assert abs(z.mean().item()) < 5 * 0.25 / math.sqrt(z.numel())
    assert abs(z.std().item() / 0.25 - 1) < 0.03
    both = m.all(1)  # shared masks: every channel is masked at the same pixels
    r = torch.corrcoef(y.permute(1, 0, 2, 3)[:, both])
    assert (r - torch.eye(3)).abs().max() < 0.05


def test_ratio_zero_leaves_input_unchanged():
    views = _views(torch.float32)
    orig = [v.clone() for v in views]
    cfgs = [MaskCfg(ratio=0.0, p_noise=1.0)] * 2
    for inplace in (True, False):
        outs, masks = apply_masks(views, cfgs, inplace=inplace, return_masks=True, backend="torch")
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(outs, orig))
        assert not any(mk.any() for mk in masks)
    t = sample_mask_table(8, 3, 40, 56, MaskCfg(ratio=0.0, p_focal=1.0))
    assert not t.cells.any()
    assert torch.equal(apply_table_reference(views[0], t, out=None), orig[0])
    with pytest.raises(MscnError, match="mask table is for"):
        apply_table_reference(views[0][:4], t)


def test_batch_of_one_and_odd_sizes():
    x = torch.randn(1, 3, 37, 23)
    (y,), (m,) = apply_masks([x.clone()], [MaskCfg(grid=8, ratio=0.3)], return_masks=True, backend="torch")
    assert y.shape == x.shape and m.shape == x.shape and m.any()
    assert torch.equal(y[~m], x[~m])


def test_seeded_generator_reproduces_masks_and_noise():
    cfgs = [MaskCfg(ratio=0.3, grid=8, p_noise=1.0)] * 2

    def run(seed):
        outs, masks = apply_masks(_views(torch.float32), cfgs, torch.Generator().manual_seed(seed),
                                  return_masks=True, backend="torch")
        return torch.cat([o.flatten() for o in outs]), torch.cat([m.flatten() for m in masks])

    (a, ma), (b, mb), (_, mc) = run(5), run(5), run(6)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert not torch.equal(ma, mc)


@pytest.mark.parametrize("override", [
    "views.0.mask.ratio=1.0", "views.1.mask.ratio=-0.1", "views.0.mask.grid=0", "views.0.mask.p_ind=1.5",
    "views.2.mask.p_focal=-1", "views.0.mask.noise_std=-0.5", "views.0.mask.focal_aspect=[2.0, 1.0]",
])
def test_bad_mask_parameters_rejected_at_config_time(override):
    with pytest.raises(ConfigError, match="mask"):
        load_config(None, [override])


def test_bad_arguments_raise_one_line_errors():
    x = [torch.zeros(2, 3, 16, 16)]
    with pytest.raises(ConfigError, match="ratio"):
        apply_masks(x, [MaskCfg(ratio=1.0)])
    with pytest.raises(ConfigError, match="views"):
        apply_masks(x, [MaskCfg(), MaskCfg()])
    with pytest.raises(MscnError, match="backend"):
        apply_masks(x, [MaskCfg()], backend="cuda")
    with pytest.raises(MscnError, match="floating"):
        apply_masks([torch.zeros(2, 3, 16, 16, dtype=torch.uint8)], [MaskCfg()])
    with pytest.raises(MscnError, match="floating"):
        apply_masks([torch.zeros(3, 16, 16)], [MaskCfg()])


def test_a_coarse_grid_is_said_to_mask_far_from_its_ratio():
    """ratio 0.15 with a 32 px grid on 40 px views masked 21-25 % of the pixels; a grid as
    large as the view masked nothing, in silence. Pretraining now says so at the start."""
    from mscn.maskspec import coverage_notes, expected_fraction

    assert expected_fraction(MaskCfg(grid=32, ratio=0.15), 224) == pytest.approx(0.15, abs=0.01)  # the paper's
    coarse = MaskCfg(grid=32, ratio=0.15)
    assert expected_fraction(coarse, 40) == pytest.approx(0.215, abs=0.005)
    whole = MaskCfg(grid=40, ratio=0.15, random_offset=False)
    notes = coverage_notes([MaskCfg(grid=8, ratio=0.15), coarse, whole, MaskCfg(ratio=0.0)], 40)
    assert len(notes) == 2
    assert notes[0].startswith("views[1].mask: a 32 px grid on 40 px views masks 21 % of it on average, not 15 %")
    assert "views[2].mask" in notes[1] and "never masked" in notes[1]
    assert coverage_notes([MaskCfg(grid=32, ratio=0.15)] * 4, 224) == []
    assert "all mask" in coverage_notes([MaskCfg(grid=8, ratio=0.99)], 32)[0]  # 0.99 of 16-25 cells: all
    # the mean share of the pixels that drawn tables mask is what expected_fraction says
    table = sample_mask_table(4096, 1, 40, 40, coarse, torch.Generator().manual_seed(0))
    share = (table.masked_pixels()[:, 0].float() / (40 * 40)).mean().item()
    assert share == pytest.approx(expected_fraction(coarse, 40), abs=0.015)
