"""Our LARS (You et al., 2017; paper App. A.1) against a hand-written update."""
import numpy as np
import pytest
import torch
from torch import nn

from mscn.config import OptimCfg
from mscn.train.lars import LARS, build_optimizer, param_groups
from mscn.train.models import build_backbone


def _reference(w, grads, lr, wd, eta, momentum, adapt):
    """Two LARS steps in numpy, float64."""
    w = w.astype(np.float64).copy()
    mu = np.zeros_like(w)
    for g in grads:
        d = g + wd * w if adapt else g.copy()
        if adapt:
            wn, dn = np.linalg.norm(w), np.linalg.norm(d)
            d = d * (eta * wn / dn if wn > 0 and dn > 0 else 1.0)
        mu = momentum * mu + d
        w = w - lr * mu
    return w


def test_lars_matches_hand_computed_update_and_excludes_bias_and_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    groups, desc = param_groups(model, weight_decay=0.01)
    assert [len(g["params"]) for g in groups] == [1, 3]  # weight | bias, bn weight, bn bias
    assert "weights: 1 tensors / 12 values" in desc and "bias_and_norm: 3 tensors / 9 values" in desc
    lr, eta, wd, mom = 0.5, 0.02, 0.01, 0.9
    opt = LARS(groups, lr=lr, momentum=mom, weight_decay=wd, trust_coef=eta)
    start = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}
    grads = {n: [np.random.default_rng(i).normal(size=p.shape) for i in range(2)] for n, p in model.named_parameters()}
    for k in range(2):
        for n, p in model.named_parameters():
            p.grad = torch.tensor(grads[n][k], dtype=torch.float32)
        opt.step()
    for n, p in model.named_parameters():
        adapt = n == "0.weight"
        expected = _reference(start[n], grads[n], lr, wd if adapt else 0.0, eta, mom, adapt)
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=n)
    # the excluded group really is plain momentum SGD: its update is lr * grad on step 1
    bias_step1 = start["0.bias"] - lr * grads["0.bias"][0]
    assert not np.allclose(bias_step1, _reference(start["0.bias"], grads["0.bias"][:1], lr, wd, eta, mom, True))


def test_lars_zero_norms_fall_back_to_plain_update():
    w = nn.Parameter(torch.zeros(3, 3))  # zero weights: trust ratio would be 0 -> use 1
    opt = LARS([{"params": [w], "weight_decay": 0.0, "lars": True}], lr=0.1, trust_coef=0.001)
    w.grad = torch.ones(3, 3)
    opt.step()
    assert torch.allclose(w, torch.full((3, 3), -0.1))
    w.grad = torch.zeros(3, 3)  # zero update: no NaN from 0/0
    opt.step()
    assert torch.isfinite(w).all()


def test_param_groups_on_a_resnet_put_every_bias_and_bn_param_in_the_plain_group():
    net, _ = build_backbone("resnet18")
    groups, _ = param_groups(net, 1e-6)
    plain = {id(p) for p in groups[1]["params"]}
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert id(m.weight) in plain and id(m.bias) in plain
        if isinstance(m, nn.Conv2d):
            assert id(m.weight) not in plain
    n_conv = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    assert len(groups[0]["params"]) == n_conv  # resnet18's fc is gone: only conv weights
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lars"] is False


@pytest.mark.parametrize("name,cls", [("lars", LARS), ("sgd", torch.optim.SGD)])
def test_build_optimizer_skips_frozen_params(name, cls):
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].requires_grad_(False)
    opt, desc = build_optimizer(OptimCfg(name=name), model, lr=0.3)
    assert isinstance(opt, cls) and desc.startswith(name)
    assert sum(len(g["params"]) for g in opt.param_groups) == 2


def test_multi_tensor_step_equals_the_per_parameter_loop_bit_for_bit_on_cpu():
    """Same arithmetic per tensor on the CPU, so a run's numbers do not move. The groups
    cover LARS with and without weight decay, the plain group, a tensor with no gradient
    (skipped) and a zero-weight tensor (trust ratio 1)."""
    torch.manual_seed(0)
    nets = [build_backbone("resnet18")[0] for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    start = [p.detach().clone() for p in nets[0].parameters()]
    opts = []
    for net, foreach in zip(nets, (True, False)):
        net.layer4[1].conv2.weight.data.zero_()  # zero norm: trust ratio 1 (the residual keeps gradients flowing)
        net.fc = nn.Identity()
        weights, plain = param_groups(net, 1e-4)[0]
        half = len(weights["params"]) // 2
        groups = [{"params": weights["params"][:half], "weight_decay": 1e-4, "lars": True},
                  {"params": weights["params"][half:], "weight_decay": 0.0, "lars": True},  # LARS, no decay
                  plain]
        opts.append(LARS(groups, lr=0.3, weight_decay=1e-4, trust_coef=0.02, foreach=foreach))
    x = torch.randn(4, 3, 32, 32)
    idle = [next(net.layer4.parameters()) for net in nets]  # in a group, but never given a gradient
    for _ in range(3):
        for net, p in zip(nets, idle):
            net.zero_grad(set_to_none=True)
            net(x).square().mean().backward()
            p.grad = None
        for opt in opts:
            opt.step()
        for (n, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
            assert torch.equal(a, b), n
    moved = [not torch.equal(p, q) for p, q in zip(nets[0].parameters(), start)]
    assert sum(moved) == len(moved) - 1  # every tensor moved but the idle one
    assert torch.equal(idle[0], start[[id(p) for p in nets[0].parameters()].index(id(idle[0]))])


def test_multi_tensor_step_launches_a_fraction_of_the_loops_ops():
    """What the change is for: aten ops dispatched per step, counted by the profiler."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    net = build_backbone("resnet18")[0]
    opt = LARS(param_groups(net, 1e-6)[0], lr=0.1)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # the momentum buffers exist from here on, as in every later step
    counts = []
    for foreach in (True, False):
        opt.foreach = foreach
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step()
        # ops called from Python (not from inside another op; torch.optim wraps step() in a
        # record_function of its own): each is a dispatch, and on a GPU at least a launch
        counts.append(sum(1 for e in prof.events() if e.name.startswith("aten::")
                          and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))))
    multi, loop = counts
    print(f"aten ops per LARS step, ResNet-18 weights: {multi} multi-tensor vs {loop} per-parameter loop")
    assert multi * 5 < loop, counts


def _step_both_on_the_same_gradients(device: str, steps: int = 3):
    """Two ResNet-18 copies, one stepped by the multi-tensor LARS, one by the loop, each
    step given the *same* gradients (net 0's, copied to net 1). Recomputing each net's own
    gradients would compare training runs, not optimizers: a batch of 4 under BatchNorm
    amplifies any rounding (cuDNN's nondeterministic kernels alone, or the loop against
    itself, moved conv1.weight by 0.13 of its largest entry in 3 steps on an H200)."""
    torch.manual_seed(0)
    nets = [build_backbone("resnet18")[0].to(device) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [LARS(param_groups(net, 1e-4)[0], lr=0.3, weight_decay=1e-4, trust_coef=0.02, foreach=foreach)
            for net, foreach in zip(nets, (True, False))]
    x = torch.randn(4, 3, 64, 64, device=device)
    for _ in range(steps):
        for net in nets:
            net.zero_grad(set_to_none=True)
        nets[0](x).square().mean().backward()
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            b.grad = a.grad.clone()
        for opt in opts:
            opt.step()
    return nets


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_multi_tensor_step_matches_the_loop_on_cuda():
    """On a GPU the multi-tensor norms may sum in another order: equal to float rounding."""
    nets = _step_both_on_the_same_gradients("cuda")
    for (n, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_the_same_gradients_helper_steps_alike_on_the_cpu():
    """The CUDA test's setup, where it can run everywhere: on the CPU the two steps agree
    bit for bit, so a broken multi-tensor step fails here too (the CPU's gradients are
    deterministic, so this cannot check that the helper shares them; the GPU test needs it)."""
    nets = _step_both_on_the_same_gradients("cpu")
    torch.manual_seed(0)
    start = build_backbone("resnet18")[0]  # the helper's starting weights
    assert all(not torch.equal(a, b) for a, b in zip(nets[0].parameters(), start.parameters()))
    for (n, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        assert torch.equal(a, b), n


def test_a_group_on_two_devices_takes_the_loop():
    """The stacked norms need one device per group (cpu + meta stands in for two GPUs);
    such a group must still step, as the loop would."""
    def group():
        torch.manual_seed(0)
        return [nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(4, 2, device="meta"))]
    ps, ref = group(), group()
    opts = [LARS([{"params": g, "weight_decay": 1e-3, "lars": True}], lr=0.1, foreach=f)
            for g, f in ((ps, True), (ref, False))]
    for g, opt in zip((ps, ref), opts):
        for p in g:
            p.grad = torch.ones_like(p)
        opt.step()
    assert torch.equal(ps[0], ref[0]) and ps[1].device.type == "meta"
