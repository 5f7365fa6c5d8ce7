"""Detection export (paper A.4): torchvision ResNet-50 + detection backbone, detectron2 pickle."""
import pickle

import pytest
import torch
import torchvision
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from eval_testdata import make_checkpoint
from mscn.errors import MscnError
from mscn.train.eval.pretrained import load_pretrained
from mscn.train.eval.export import detectron2_name, export_backbone


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    backbone, arch, _ = load_pretrained(str(make_checkpoint(d / "ck.pt", arch="resnet50", seed=1)))
    with torch.no_grad():  # non-trivial BN statistics, so that a mix-up would show
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return backbone.eval(), export_backbone(backbone, d / "out", "r50", arch)


def test_loads_into_torchvision_resnet50(exported):
    backbone, paths = exported
    sd = torch.load(paths["torchvision"], weights_only=True)
    net = torchvision.models.resnet50()
    res = net.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and res.unexpected_keys == []
    net.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), backbone(x))


def test_loads_into_torchvision_detection_backbone(exported):
    backbone, paths = exported
    sd = torch.load(paths["torchvision"], weights_only=True)
    det = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5)
    det.body.load_state_dict(sd, strict=True)  # FrozenBatchNorm2d drops num_batches_tracked itself
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = det.body(x)
        h = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
        for i, layer in enumerate((backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)):
            h = layer(h)
            # FrozenBatchNorm2d folds BN into a scale and shift: equal up to float rounding
            torch.testing.assert_close(got[str(i)], h, rtol=1e-3, atol=1e-4 * float(h.abs().max()))


def test_detectron2_pickle_names_and_tensors(exported):
    backbone, paths = exported
    with open(paths["detectron2"], "rb") as f:
        obj = pickle.load(f)
    assert obj["__author__"] == "mscn" and obj["matching_heuristics"] is True
    model = obj["model"]
    sd = {k: v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(model) == len(sd) == 265  # 318 entries less 53 BN counters
    for name in ("stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.conv1.norm.weight",
                 "res2.0.shortcut.weight", "res2.0.shortcut.norm.bias", "res3.3.conv2.norm.running_mean",
                 "res5.2.conv3.weight"):
        assert name in model, name
    assert not any(k.startswith(("layer", "conv1", "bn1", "fc")) or ".bn" in k or "downsample" in k for k in model)
    for k, v in sd.items():
        assert torch.equal(torch.from_numpy(model[detectron2_name(k)]), v), k


def test_name_mapping_examples():
    assert detectron2_name("conv1.weight") == "stem.conv1.weight"
    assert detectron2_name("bn1.bias") == "stem.conv1.norm.bias"
    assert detectron2_name("layer4.2.bn3.running_mean") == "res5.2.conv3.norm.running_mean"
    assert detectron2_name("layer1.0.downsample.0.weight") == "res2.0.shortcut.weight"
    assert detectron2_name("layer3.0.downsample.1.running_var") == "res4.0.shortcut.norm.running_var"


def test_export_applies_the_overrides_and_keeps_to_its_folder(tmp_path, capsys, monkeypatch):
    """``mscn eval export`` builds the backbone the overrides describe (a random-init export
    of the recipe's arch with model.arch=resnet50 is a ResNet-50); a typo in them is an error,
    and --name cannot point outside --out."""
    from mscn.cli import main as mscn_main

    monkeypatch.delenv("MSCN_DEBUG", raising=False)
    out = tmp_path / "ex"
    assert mscn_main(["eval", "export", "--ckpt", "random", "--config", "demo", "--out", str(out),
                      "model.arch=resnet50"]) == 0
    assert "exported resnet50" in capsys.readouterr().out
    assert torch.load(out / "backbone.pth")["layer4.2.conv3.weight"].shape[0] == 2048  # a bottleneck ResNet-50
    # (into a new folder: an earlier export in --out is refused first, before anything loads)
    assert mscn_main(["eval", "export", "--ckpt", "random", "--config", "demo", "--out", str(tmp_path / "ex2"),
                      "model.archh=resnet50"]) == 2
    assert "model.archh" in capsys.readouterr().err and not (tmp_path / "ex2").exists()
    assert mscn_main(["eval", "export", "--ckpt", "random", "--config", "demo", "--out", str(out),
                      "--name", "../escape"]) == 2
    assert "--name" in capsys.readouterr().err and not (tmp_path / "escape.pth").exists()


def test_export_keeps_an_earlier_export_unless_forced(tmp_path, capsys, monkeypatch):
    """A second export of the same --name is refused in one line and leaves the first
    intact; --force replaces it; no temporary file is left behind."""
    from mscn.cli import main as mscn_main

    monkeypatch.delenv("MSCN_DEBUG", raising=False)
    out = tmp_path / "ex"
    first = ["eval", "export", "--ckpt", "random", "--config", "demo", "--out", str(out)]
    assert mscn_main(first) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"backbone.pth", "backbone.pkl"}
    capsys.readouterr()
    assert mscn_main([*first, "model.arch=resnet50"]) == 2
    err = capsys.readouterr().err
    assert "backbone.pth and backbone.pkl already exist" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # refused before the checkpoint is read (a ResNet-50 file takes seconds to load): a
    # file that is no checkpoint at all gets the same line
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert mscn_main(["eval", "export", "--ckpt", str(tmp_path / "junk.pt"), "--out", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err
    (out / "backbone.pkl").unlink()  # half of an export is still kept
    assert mscn_main([*first, "model.arch=resnet50"]) == 2 and "backbone.pth already exists" in capsys.readouterr().err
    assert mscn_main([*first, "model.arch=resnet50", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["backbone.pkl", "backbone.pth"]
    assert torch.load(out / "backbone.pth")["layer4.2.conv3.weight"].shape[0] == 2048  # replaced by the ResNet-50


def test_a_failed_export_leaves_the_earlier_pair_and_no_temporary_file(tmp_path, monkeypatch):
    """The second file failing (here: a full disk while pickling) leaves the earlier
    export as it was and no temporary file of the first."""
    import errno

    import mscn.train.eval.export as export

    backbone = torchvision.models.resnet18()
    out = tmp_path / "ex"
    export_backbone(backbone, out, "r18", "resnet18")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export.pickle, "dump", full_disk)
    with pytest.raises(MscnError, match=r"r18.pkl: cannot write the export \(No space left on device\)"):
        export_backbone(torchvision.models.resnet18(), out, "r18", "resnet18", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Ctrl-C while the first file is written into a folder the export made: no empty folder left
    monkeypatch.setattr(export.torch, "save", lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        export_backbone(backbone, tmp_path / "new" / "ex", "r18", "resnet18")
    assert not (tmp_path / "new").exists()
    with pytest.raises(KeyboardInterrupt):  # a folder that was there stays, with what it held
        export_backbone(backbone, out, "r18", "resnet18", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
