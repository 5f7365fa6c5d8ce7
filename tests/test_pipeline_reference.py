"""The torchvision/PIL reference vs the DALI CPU path: same work, comparable values."""
import pytest
import torch
from pipeline_fixtures import make_folder, tiny_cfg
from torchvision import transforms as T

from mscn.pipelines import build_reference_loader, build_train_loader
from mscn.pipelines.reference import PILGaussianBlur, view_transform


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("ref"), classes=4, per_class=16, size=(96, 72))
    # the paper's σ=5 high-pass (window 31) on 64 px views
    return tiny_cfg(root, "train.global_batch=16", "data.image_size=64", "data.val_resize=72",
                    "highpass.sigma=5.0")


def view_stats(loader, epochs: int = 3) -> list[tuple[float, float]]:
    per_view = [[] for _ in range(4)]
    for _ in range(epochs):
        for b in loader:
            for i, v in enumerate(b.views):
                per_view[i].append(v.float())
    return [(torch.cat(v).mean().item(), torch.cat(v).std().item()) for v in per_view]


def test_high_passed_value_distributions_agree(cfg):
    """Tolerance: |mean| < 0.01 (a high-pass removes the mean) and each view's std within
    15% of the reference's (192 random views each; the colour jitter and blur of the two
    libraries differ in detail: DALI's fixed jitter order, PIL's box-approximated blur)."""
    dali = view_stats(build_train_loader(cfg, apply_mask=False))
    ref = view_stats(build_reference_loader(cfg, 16, workers=0, apply_mask=False))
    for (m_d, s_d), (m_r, s_r) in zip(dali, ref):
        assert abs(m_d) < 0.01 and abs(m_r) < 0.01
        assert 0.85 < s_d / s_r < 1.15, (dali, ref)


def test_reference_blurs_with_pil_and_masks_batches(cfg):
    tf = view_transform(cfg.views[0], 64, cfg.data.mean, cfg.data.std)
    blurs = [t for a in tf.transforms if isinstance(a, T.RandomApply) for t in a.transforms]
    assert any(isinstance(t, PILGaussianBlur) for t in blurs)
    assert not any(isinstance(t, T.GaussianBlur) for t in blurs)
    batch = next(iter(build_reference_loader(cfg, 16, workers=0)))
    assert len(batch.views) == 4 and batch.views[0].shape == (16, 3, 64, 64)
    assert (batch.views[0] == 0).float().mean() > 0.02  # masked (15% of the cells)


def test_reference_ranks_read_disjoint_slices_that_change_every_epoch(cfg):
    """Two ranks of the reference loader read one shuffle in two slices: every image once
    per epoch, in a new order each epoch (a seed per rank made the slices overlap and left
    images out; without set_epoch every epoch repeated the first)."""
    import dataclasses

    small = dataclasses.replace(cfg, views=cfg.views[:1])
    loaders = [build_reference_loader(small, 4, workers=0, rank=r, world_size=2, apply_mask=False) for r in (0, 1)]
    epochs = []
    for _ in range(2):
        per_rank = [[i for b in loader for i in b.index.tolist()] for loader in loaders]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(64))
        epochs.append(per_rank)
    assert epochs[0] != epochs[1]


def test_reference_loader_checks_its_config_and_keeps_the_output_dtype(cfg):
    """The checks and the ``data.output_dtype`` of ``build_train_loader``: a typo'd key or an
    out-of-range value is one line, a batch larger than the data is said (not an empty
    loader), and bfloat16 views come out as bfloat16."""
    import dataclasses

    from mscn.errors import ConfigError, DataError

    bad = dataclasses.replace(cfg, views=[dataclasses.replace(cfg.views[0], flip_prob=3.0)])
    with pytest.raises(ConfigError, match=r"views\[0\].flip_prob = 3.0: must be a probability"):
        build_reference_loader(bad, 4, workers=0)
    with pytest.raises(DataError, match="64 images, fewer than one global batch of 80"):
        build_reference_loader(cfg, 40, workers=0, rank=0, world_size=2)
    bf16 = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, output_dtype="bfloat16"))
    batch = next(iter(build_reference_loader(bf16, 4, workers=0)))
    assert {v.dtype for v in batch.views} == {torch.bfloat16}
