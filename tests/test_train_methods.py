"""Backbones, heads, SimCLR/BYOL modules (paper App. A.1) on plain CPU tensors."""
import pytest
import torch
import torchvision
from torch import nn

from mscn.config import load_config
from mscn.errors import ConfigError
from mscn.train.distributed import DistInfo
from mscn.train.heads import byol_mlp, simclr_projector
from mscn.train.lars import build_optimizer
from mscn.train.methods import BYOL, METHODS, SimCLR, build_method
from mscn.train.models import build_backbone
from mscn.train.pretrain import build_model, train_step
from mscn.train.schedule import ema_at

SMALL = ["model.arch=resnet18", "model.proj_hidden=64", "model.proj_out=32", "model.pred_hidden=64"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_cfg(method="simclr", *extra):
    return load_config(None, SMALL + [f"method.name={method}", *extra])


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("resnet50", 2048)])
def test_backbone_keeps_torchvision_key_names(arch, dim):
    net, feat_dim = build_backbone(arch)
    assert feat_dim == dim
    ref = getattr(torchvision.models, arch)(weights=None)
    result = ref.load_state_dict(net.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    net.eval()
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_unknown_arch_is_a_config_error():
    with pytest.raises(ConfigError, match="model.arch"):
        build_backbone("vit_b16")


def test_heads_follow_appendix_a1():
    simclr = simclr_projector(2048, 2048, 256)
    assert [type(m) for m in simclr] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert (simclr[0].in_features, simclr[0].out_features, simclr[3].out_features) == (2048, 2048, 256)
    byol = byol_mlp(256, 4096, 256)
    assert [type(m) for m in byol] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]  # no BN after the last
    assert (byol[0].in_features, byol[0].out_features, byol[3].out_features) == (256, 4096, 256)


def test_methods_registry_and_dims():
    assert set(METHODS) == {"simclr", "byol"}
    m = build_method(small_cfg("byol"))
    assert isinstance(m, BYOL)
    assert m.projector[0].in_features == 512 and m.predictor[0].in_features == 32
    assert isinstance(build_method(small_cfg("simclr")), SimCLR)


def test_byol_target_is_frozen_copy_and_follows_the_ema_schedule():
    torch.manual_seed(0)
    m = build_method(small_cfg("byol"))
    online = dict(m.backbone.named_parameters())
    target = dict(m.target_backbone.named_parameters())
    assert all(not p.requires_grad for p in m.target_backbone.parameters())
    assert all(not p.requires_grad for p in m.target_projector.parameters())
    assert all(torch.equal(online[k], target[k]) for k in online)
    with torch.no_grad():  # move the online network as an optimizer step would
        for p in list(m.backbone.parameters()) + list(m.projector.parameters()):
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in target.items()}
    step, total = 30, 100
    tau = ema_at(step, total, m.ema_base, m.ema_final)
    assert 0.996 < tau < 1.0
    m.after_optimizer_step(step, total)
    for k in online:
        torch.testing.assert_close(target[k], tau * before[k] + (1 - tau) * online[k])
        # the multi-tensor lerp is the per-tensor one, bit for bit (CPU)
        assert torch.equal(target[k], before[k].lerp(online[k], 1 - tau)), k
    proj_t, proj_o = m.target_projector[0].weight, m.projector[0].weight
    assert not torch.equal(proj_t, proj_o)
    m.update_target(0.0)  # momentum 0: the target becomes the online network
    assert torch.equal(m.target_projector[0].weight, proj_o)


def test_byol_target_gets_no_gradient():
    m = build_method(small_cfg("byol"))
    loss = m([torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)])
    loss.backward()
    assert all(p.grad is None for p in m.target_backbone.parameters())
    assert m.backbone.conv1.weight.grad is not None and m.predictor[0].weight.grad is not None


@pytest.mark.parametrize("method,ratio", [("simclr", 0.3), ("byol", 0.6)])
def test_loss_drops_on_a_fixed_batch(method, ratio):
    torch.manual_seed(0)
    cfg = small_cfg(method)
    net, model = build_model(cfg, torch.device("cpu"), DistInfo())
    opt, _ = build_optimizer(cfg.optim, net, lr=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    views = [torch.randn(8, 3, 32, 32) for _ in range(4)]
    losses = []
    for step in range(15):
        losses.append(train_step(model, opt, scaler, views, None).item())
        net.after_optimizer_step(step, 100)
    assert losses[-1] < ratio * losses[0], losses


def test_device_precision_and_oom_message():
    from mscn.train.distributed import pick_device
    from mscn.train.pretrain import _oom_error, amp_dtype

    if not torch.cuda.is_available():
        device, note = pick_device("cuda", 0)
        assert device.type == "cpu" and "train.device=cuda" in note and "CPU" in note
        assert pick_device("auto", 0) == (torch.device("cpu"), None)
    assert amp_dtype("auto", torch.device("cpu")) is None
    assert amp_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert amp_dtype("fp16", torch.device("cpu")) == torch.float16
    cfg = small_cfg("simclr", "train.global_batch=4096")
    msg = str(_oom_error(cfg, DistInfo(rank=0, world_size=8)))
    assert "512 images x 4 views per GPU" in msg and "train.global_batch=2048" in msg and "more GPUs" in msg
