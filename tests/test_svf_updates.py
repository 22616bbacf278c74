"""svf.keep_small_updates: updates of S below float32's resolution accumulate instead of rounding away
(SGD, SGD with momentum and weight decay, Adam), resume bit for bit through the optimizer's state_dict,
leave the model's state dict, fast path and autograd hooks as they were; svf.singular_value_change by hand; and a few
steps of the demo model's SVF training move layer4's singular values."""
import io

import pytest
import torch
import torch.nn as nn

import svf
from conftest import random_episode, tiny_cfg

N = 100


def _layer(seed=0):
    torch.manual_seed(seed)
    layer = svf.resolver(nn.Conv2d(8, 8, 3))  # 8 singular values, float32
    return layer, layer.vector_S.detach().clone()


def _steps(layer, optimizer, grad, n):
    for _ in range(n):
        layer.vector_S.grad = grad.clone()
        optimizer.step()


def _exact(layer, optimizer):
    """S as the optimizer holds it: the float32 Parameter plus the residual kept in its state."""
    residual = optimizer.state[layer.vector_S].get(svf.tuning.RESIDUAL, torch.zeros(()))
    return layer.vector_S.detach().double() + residual.double()


def test_updates_below_float32_resolution_accumulate():
    """grad = 1e-8 x S, lr 1: each step is ~1/12 of S's float32 spacing. Plain SGD (the code before this
    helper) leaves S exactly where it was; with the helper N steps move S by N x lr x grad."""
    lr = 1.0
    layer, s0 = _layer()
    grad = 1e-8 * s0
    plain = torch.optim.SGD([layer.vector_S], lr=lr)
    _steps(layer, plain, grad, N)
    assert torch.equal(layer.vector_S.detach(), s0)  # every update rounded away

    layer, s0 = _layer()
    opt = svf.keep_small_updates(torch.optim.SGD([layer.vector_S], lr=lr), layer)
    assert svf.keep_small_updates(opt, layer) is opt  # calling it twice changes nothing below
    _steps(layer, opt, grad, N)
    expected = s0.double() - N * lr * grad.double()
    torch.testing.assert_close(_exact(layer, opt) - s0.double(), expected - s0.double(), rtol=1e-6, atol=0)
    # the float32 Parameter is S rounded to nearest: within half a float32 spacing of the exact value
    spacing = torch.finfo(torch.float32).eps * s0.abs().double()
    assert ((layer.vector_S.detach().double() - expected).abs() <= 0.5 * spacing).all()
    assert (layer.vector_S.detach() != s0).all()
    assert layer.vector_S.dtype == opt.state[layer.vector_S][svf.tuning.RESIDUAL].dtype == torch.float32


def test_weight_decay_acts_on_s_itself():
    """The optimizer sees S (not an offset from S0): with no gradient, weight decay wd shrinks S by
    (1 - lr * wd) per step, here 1e-8 per step, which plain float32 SGD would round away."""
    layer, s0 = _layer()
    opt = svf.keep_small_updates(torch.optim.SGD([layer.vector_S], lr=1.0, weight_decay=1e-8), layer)
    _steps(layer, opt, torch.zeros_like(s0), N)
    torch.testing.assert_close(_exact(layer, opt), s0.double() * (1 - 1e-8) ** N, rtol=1e-12, atol=0)


def test_momentum_and_adam_state_stay_float32_and_adam_accumulates():
    layer, s0 = _layer()
    opt = svf.keep_small_updates(torch.optim.SGD([layer.vector_S], lr=1.0, momentum=0.9), layer)
    _steps(layer, opt, 1e-8 * s0, 2)
    state = opt.state[layer.vector_S]
    assert {k: v.dtype for k, v in state.items()} == {"momentum_buffer": torch.float32,
                                                      svf.tuning.RESIDUAL: torch.float32}
    torch.testing.assert_close(_exact(layer, opt) - s0.double(), -(1 + 1.9) * 1e-8 * s0.double(), rtol=1e-6, atol=0)
    # Adam with a constant gradient steps by ~lr per step; lr 1e-8 is below float32's spacing at |S| ~ 1
    layer, s0 = _layer()
    opt = svf.keep_small_updates(torch.optim.Adam([layer.vector_S], lr=1e-8), layer)
    _steps(layer, opt, torch.ones_like(s0), N)
    torch.testing.assert_close(_exact(layer, opt) - s0.double(), torch.full_like(s0, -N * 1e-8, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    assert all(v.dtype == torch.float32 for v in opt.state[layer.vector_S].values())


def test_resume_through_the_optimizer_state_dict_is_bit_for_bit():
    def fresh():
        layer, s0 = _layer()
        opt = svf.keep_small_updates(torch.optim.SGD([layer.vector_S], lr=1.0, momentum=0.9), layer)
        return layer, opt, 3e-9 * s0

    layer, opt, grad = fresh()
    _steps(layer, opt, grad, 20)
    whole = _exact(layer, opt)

    layer, opt, grad = fresh()
    _steps(layer, opt, grad, 8)
    buf = io.BytesIO()
    torch.save({"model": layer.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["model"]["vector_S"].dtype == torch.float32 and saved["model"]["vector_S"].shape == (1, 8, 1, 1)
    layer, opt, grad = fresh()
    layer.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    _steps(layer, opt, grad, 12)
    assert torch.equal(_exact(layer, opt), whole)


def test_model_state_dict_names_and_fast_path_unchanged():
    layer, _ = _layer()
    opt = svf.keep_small_updates(torch.optim.SGD([layer.vector_S], lr=0.5), layer)
    assert [n for n, _ in layer.named_parameters() if "vector_S" in n] == ["vector_S"]
    assert set(layer.state_dict()) == {"conv_V.weight", "vector_S", "conv_U.weight", "conv_U.bias"}
    x = torch.randn(2, 8, 7, 7)
    accumulated = []  # S's gradient accumulator stays the same across steps: DDP's reduction hooks in there
    acc = layer.vector_S.expand_as(layer.vector_S).grad_fn.next_functions[0][0]
    acc.register_hook(lambda *grads: accumulated.append(1))
    for _ in range(2):  # the merged-weight cache follows the compensated steps
        with torch.no_grad():
            fast = layer(x)
        factored = layer(x)
        torch.testing.assert_close(fast, factored.detach(), rtol=1e-5, atol=1e-6)
        factored.square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert len(accumulated) == 2 and layer.vector_S.dtype == torch.float32
    assert opt.param_groups[0]["params"][0] is layer.vector_S


def test_keep_small_updates_rejects_an_optimizer_without_singular_values():
    layer, _ = _layer()
    with pytest.raises(ValueError, match="holds none of the model's trainable singular values"):
        svf.keep_small_updates(torch.optim.SGD([layer.conv_U.bias], lr=0.1), layer)


def test_singular_value_change_by_hand():
    net = svf.resolver(nn.Sequential(nn.Conv2d(2, 2, 1), nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1))))
    with torch.no_grad():
        for m in (net[0], net[1][0], net[1][1]):
            m.vector_S.copy_(torch.tensor([3.0, 4.0]).reshape(1, 2, 1, 1))
    start = svf.state_dict(net)["singular_values"]
    with torch.no_grad():
        net[1][0].vector_S.add_(torch.tensor([0.3, 0.0]).reshape(1, 2, 1, 1))   # |dS| 0.3
        net[1][1].vector_S.add_(torch.tensor([0.0, -0.4]).reshape(1, 2, 1, 1))  # |dS| 0.4
    change = svf.singular_value_change(net, start)
    assert change.keys() == {"0", "1"} and change["0"] == 0.0
    assert change["1"] == pytest.approx(0.5 / (2 * 25) ** 0.5)  # sqrt(0.09 + 0.16) / sqrt(25 + 25)
    net[0].vector_S.requires_grad_(False)  # only trainable singular values are reported
    assert svf.singular_value_change(net, start).keys() == {"1"}


@pytest.mark.filterwarnings("ignore:.*randomly initialised")
def test_a_few_svf_steps_move_layer4_of_the_demo_model():
    """The demo's model (its backbone, baseline + SVF, the demo config's LRs), trained as train.py does:
    three SGD steps change the singular values of layer2, layer3 and layer4 (non-zero, finite)."""
    from engine.config import load_config
    from engine.optim import build_sgd
    from model import build_model, param_groups
    demo = load_config("config/demo_split0.yaml", ["pretrained=null", "base_learner=null"])
    cfg = tiny_cfg(svf=True, backbone=demo.backbone, svf_lr_mult=demo.svf_lr_mult, svf_weight_decay=demo.svf_weight_decay,
                   weight_decay=demo.weight_decay)
    torch.manual_seed(0)
    net = build_model(cfg).train()
    opt = build_sgd(param_groups(net, cfg), demo.base_lr, demo.momentum, demo.weight_decay)
    svf.keep_small_updates(opt, net)
    start = svf.state_dict(net.backbone)["singular_values"]
    q, s, sm, qm = random_episode(batch=2, size=49)
    for _ in range(3):
        _, loss = net(q, s, sm, qm)
        opt.zero_grad()
        loss.backward()
        opt.step()
    change = svf.singular_value_change(net.backbone, start)
    assert set(change) == {"layer2", "layer3", "layer4"}
    assert all(0 < v < float("inf") for v in change.values()), change
