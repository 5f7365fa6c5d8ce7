"""DaliLoader.hold: DALI's outputs kept alive some batches longer (the bench's masks-hold
feed, which asks whether handing the buffers back waits for the trainer's kernels)."""
import pytest
import torch
from pipeline_fixtures import make_folder, tiny_cfg

from mscn.pipelines import build_train_loader


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("hold"), classes=2, per_class=8)  # 16 images


def test_holding_outputs_changes_no_batch_and_holds_exactly_that_many(folder):
    cfg = tiny_cfg(folder, "train.global_batch=4")
    plain, held = build_train_loader(cfg), build_train_loader(cfg)
    held.hold(2)
    seen = []
    for n, (a, b) in enumerate(zip(plain, held), 1):  # one epoch: 4 batches
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views)) and torch.equal(a.labels, b.labels)
        seen.append((len(plain._held), len(held._held)))
    assert n == 4 and seen == [(1, 1), (1, 2), (1, 3), (1, 3)]  # this batch's outputs + 2 earlier ones
    assert len(list(held)) == 0 and len(held._held) == 0  # the epoch's end lets go of every held batch
    assert held.state_dict()["runs"] == plain.state_dict()["runs"] == 4  # the checkpoint is DALI's, unchanged
    with pytest.raises(ValueError, match="hold"):
        held.hold(-1)
