"""Checkpoint loading for evaluation: round trip, wrong architecture, high-pass mismatch."""
import warnings

import pytest
import torch

from eval_testdata import make_checkpoint
from mscn.errors import ConfigError, MscnError
from mscn.train.eval.common import accuracy, unique_by_index
from mscn.train.eval.pretrained import HighPassMismatchWarning, load_pretrained


def test_checkpoint_round_trip(tmp_path):
    path = make_checkpoint(tmp_path / "ck.pt", seed=3)
    saved = torch.load(path, weights_only=True)["backbone"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no override: no high-pass warning
        backbone, arch, cfg = load_pretrained(str(path))
    assert arch == "resnet18" and cfg.data.image_size == 32 and cfg.highpass.sigma == 1.0
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 512)


def test_other_architecture_is_a_clear_error(tmp_path):
    path = make_checkpoint(tmp_path / "ck.pt", arch="resnet18")
    with pytest.raises(MscnError, match="holds a resnet18 backbone but resnet50 was requested"):
        load_pretrained(str(path), arch="resnet50")
    with pytest.raises(MscnError, match="resnet34 was requested"):
        load_pretrained(str(path), overrides=["model.arch=resnet34"])


def test_weights_of_another_arch_under_a_wrong_label(tmp_path):
    path = make_checkpoint(tmp_path / "ck.pt", arch="resnet34")
    ck = torch.load(path, weights_only=True)
    ck["arch"] = "resnet18"
    ck["config"]["model"]["arch"] = "resnet18"
    torch.save(ck, path)
    with pytest.raises(MscnError, match="do not fit a torchvision resnet18"):
        load_pretrained(str(path))


def test_highpass_mismatch_warns_or_fails_with_strict(tmp_path):
    path = make_checkpoint(tmp_path / "ck.pt")
    with pytest.warns(HighPassMismatchWarning, match="sigma=1.0.*sigma=5.0"):
        _, _, cfg = load_pretrained(str(path), overrides=["highpass.sigma=5.0"])
    assert cfg.highpass.sigma == 5.0
    with pytest.raises(ConfigError, match="high-pass"):
        load_pretrained(str(path), overrides=["highpass.enabled=false"], strict=True)


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(MscnError, match="not found"):
        load_pretrained(str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(MscnError, match="not a readable checkpoint"):
        load_pretrained(str(junk))
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(MscnError, match="missing backbone, arch, config"):
        load_pretrained(str(tmp_path / "other.pt"))


def test_random_baseline_takes_arch_and_overrides():
    backbone, arch, cfg = load_pretrained("random", arch="resnet34", overrides=["data.image_size=32", "data.val_resize=40"])
    assert arch == "resnet34" and cfg.model.arch == "resnet34" and cfg.data.val_resize == 40
    assert sum(p.numel() for p in backbone.parameters()) > 20e6


def test_accuracy_and_dedup():
    logits = torch.tensor([[3.0, 2, 1, 0, -1, -2], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    labels = torch.tensor([0, 0, 5])
    acc = accuracy(logits, labels)
    assert acc["top1"] == pytest.approx(100 / 3) and acc["top5"] == pytest.approx(100 / 3) and acc["n"] == 3
    # DALI pads a shard by repeating samples: index 7 twice counts once, the first copy kept
    idx, vals = unique_by_index(torch.tensor([7, 2, 7, 5]), torch.tensor([10, 20, 30, 40]))
    assert idx.tolist() == [2, 5, 7] and vals.tolist() == [20, 40, 10]


def test_run_directory_means_its_newest_checkpoint(tmp_path):
    from mscn.train.checkpoint import ckpt_path

    for step, seed in ((100, 1), (200, 2)):
        path = make_checkpoint(ckpt_path(tmp_path, step), seed=seed)
        ck = torch.load(path, weights_only=True)  # the trainer's files carry more keys
        ck.update(model={}, optimizer={}, step=step, method="simclr")
        torch.save(ck, path)
    backbone, _, _ = load_pretrained(str(tmp_path))
    newest = torch.load(ckpt_path(tmp_path, 200), weights_only=True)["backbone"]
    assert torch.equal(backbone.conv1.weight, newest["conv1.weight"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(MscnError, match="no readable checkpoints/ckpt"):
        load_pretrained(str(tmp_path / "empty"))


def test_run_directory_layout_of_the_trainer(tmp_path):
    """<run>/final.pt wins; without it, the newest valid <run>/checkpoints/ckpt_*.pt."""
    from mscn.train.checkpoint import ckpt_path

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step, seed in ((100, 1), (200, 2)):
        path = make_checkpoint(ckpt_path(run / "checkpoints", step), seed=seed)
        ck = torch.load(path, weights_only=True)  # the trainer's files carry more keys
        ck.update(model={}, optimizer={}, step=step, method="simclr")
        torch.save(ck, path)
    newest = torch.load(ckpt_path(run / "checkpoints", 200), weights_only=True)["backbone"]
    backbone, _, _ = load_pretrained(str(run))
    assert torch.equal(backbone.conv1.weight, newest["conv1.weight"])
    from mscn.train.checkpoint import pick_pretrained

    note = pick_pretrained(run)[2]  # a run still training (or stopped early) is scored where it is, and says so
    assert "no final.pt (a run still training, or stopped before its end): evaluating its newest checkpoint " \
           "ckpt_00000200.pt (step 200)" in note
    final = make_checkpoint(run / "final.pt", seed=3)
    backbone, _, _ = load_pretrained(str(run))
    assert torch.equal(backbone.conv1.weight, torch.load(final, weights_only=True)["backbone"]["conv1.weight"])
    assert not torch.equal(backbone.conv1.weight, newest["conv1.weight"])


def _trainer_file(path, step, seed):
    """make_checkpoint plus the keys the trainer writes (step among them)."""
    make_checkpoint(path, seed=seed)
    ck = torch.load(path, weights_only=True)
    ck.update(model={}, optimizer={}, step=step, method="simclr")
    torch.save(ck, path)
    return torch.load(path, weights_only=True)["backbone"]


def test_run_directory_resumed_past_its_final_pt_means_its_newest_checkpoint(tmp_path, capsys):
    """A run that ended (final.pt at step 45), was resumed for more and stopped at step 54:
    the folder's newest weights are ckpt_54, which evaluation takes, saying so."""
    from mscn.train.checkpoint import ckpt_path, pick_pretrained

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    final = _trainer_file(run / "final.pt", 45, seed=1)
    newest = _trainer_file(ckpt_path(run / "checkpoints", 54), 54, seed=2)
    path, step, note, state = pick_pretrained(run)
    assert path == ckpt_path(run / "checkpoints", 54) and step == 54 and state["step"] == 54
    assert "ckpt_00000054.pt (step 54) is newer than final.pt (step 45)" in note
    backbone, _, _ = load_pretrained(str(run))
    assert torch.equal(backbone.conv1.weight, newest["conv1.weight"])

    # a checkpoint past final.pt that does not load is skipped: the newest that loads, and
    # final.pt (no note) once no checkpoint past it loads
    ckpt_path(run / "checkpoints", 60).write_bytes(b"cut short")
    path, step, note, _ = pick_pretrained(run)
    assert (path, step) == (ckpt_path(run / "checkpoints", 54), 54)
    ckpt_path(run / "checkpoints", 54).unlink()
    path, step, note, state = pick_pretrained(run)
    assert (path, step, note, state["step"]) == (run / "final.pt", 45, None, 45)
    assert "skipping" in capsys.readouterr().out
    backbone, _, _ = load_pretrained(str(run))
    assert torch.equal(backbone.conv1.weight, final["conv1.weight"])


def test_a_damaged_final_pt_falls_back_to_the_checkpoint_of_the_same_weights(tmp_path):
    """final.pt copied (not linked) and cut short, ckpt_10 intact at the same step: pretraining's
    resume would skip the damaged file; evaluation used to stop on it."""
    from mscn.train.checkpoint import ckpt_path, pick_pretrained

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    good = _trainer_file(ckpt_path(run / "checkpoints", 10), 10, seed=3)
    (run / "final.pt").write_bytes(ckpt_path(run / "checkpoints", 10).read_bytes()[:5000])
    path, step, note, state = pick_pretrained(run)
    assert (path, step) == (ckpt_path(run / "checkpoints", 10), 10)
    assert "final.pt: not a readable checkpoint" in note and "evaluating" in note
    assert torch.equal(state["backbone"]["conv1.weight"], good["conv1.weight"])
    # no checkpoint to fall back on: the damaged final.pt is the error, as before
    ckpt_path(run / "checkpoints", 10).unlink()
    with pytest.raises(MscnError, match=r"final.pt: not a readable checkpoint"):
        pick_pretrained(run)
