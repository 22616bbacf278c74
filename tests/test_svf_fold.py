"""svf.fold_batchnorm: a frozen BatchNorm folded into the conv before it computes the same function (outputs,
input and S-gradients), leaves the state dict and the BatchNorm statistics alone, and switches itself off
whenever folding would not be exact."""
import copy
import io

import pytest
import torch
import torch.nn as nn

import svf
from model import build_backbone, build_model

from conftest import random_episode, tiny_cfg


def _randomise_batchnorm(net, seed=0):
    """Statistics and affine parameters far from the identity, so that a fold that is wrong shows."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=g) * 0.3 + 1)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
    return net


def _svf_backbone(dtype):
    torch.manual_seed(0)
    net = svf.resolver(_randomise_batchnorm(build_backbone("resnet18_deep", "torchvision"))).to(dtype)
    return svf.apply_paper_freezing(net).train()


def _count_batchnorm_calls(monkeypatch):
    calls = []
    original = torch.nn.functional.batch_norm

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "batch_norm", counting)
    return calls


def _step_outputs(net, x):
    """Output, dL/dx and the gradients of every trainable parameter for L = sum(out * fixed weights)."""
    net.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = net(x)[-1]
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * w).sum().backward()
    return out.detach(), x.grad, [p.grad for p in net.parameters() if p.requires_grad]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_folded_svf_backbone_equals_unfolded_forward_and_gradients(dtype, tol, monkeypatch):
    ref = _svf_backbone(dtype)
    net = copy.deepcopy(ref)
    pairs = svf.fold_batchnorm(net)
    assert len(pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules()) == 23  # every BatchNorm
    x = torch.randn(2, 3, 41, 41, dtype=dtype)
    calls = _count_batchnorm_calls(monkeypatch)
    out, gx, grads = _step_outputs(net, x)
    assert calls == []  # no BatchNorm pass ran: all were folded
    ref_out, ref_gx, ref_grads = _step_outputs(ref, x)
    assert len(calls) == 23
    assert _rel(out, ref_out) < tol and _rel(gx, ref_gx) < tol
    assert len(grads) == len(ref_grads) == 15  # one vector_S per SVD layer of layer2-4
    assert max(_rel(a, b) for a, b in zip(grads, ref_grads)) < tol
    with torch.no_grad():  # the frozen (merged-weight) path
        assert _rel(net.eval()(x)[-1], ref.eval()(x)[-1]) < tol


def test_state_dict_and_batchnorm_statistics_never_change():
    ref = _svf_backbone(torch.float32)
    before = copy.deepcopy(ref.state_dict())
    net = copy.deepcopy(ref)
    svf.fold_batchnorm(net)
    state = net.state_dict()
    assert list(state) == list(before) and all(torch.equal(state[k], before[k]) for k in before)
    assert [n for n, _ in net.named_modules()] == [n for n, _ in ref.named_modules()]
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    for seed in range(3):  # training steps in train() mode: the frozen BatchNorms stay frozen
        _step_outputs(net.train(), torch.randn(2, 3, 33, 33, generator=torch.Generator().manual_seed(seed)))
        opt.step()
    after = net.state_dict()
    buffers = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(buffers) == 3 * 23 and all(torch.equal(after[k], before[k]) for k in buffers)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.endswith("vector_S"))  # S did train
    loaded = copy.deepcopy(ref)
    loaded.load_state_dict(after)  # a folded model's state dict loads into the unfolded model
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        assert _rel(net.eval()(x)[-1], loaded.eval()(x)[-1]) < 2e-5


@pytest.mark.parametrize("mode", ["frozen_weights_grad_through", "weights_train"])
def test_plain_convs_fold_exactly(mode, monkeypatch):
    torch.manual_seed(0)
    ref = _randomise_batchnorm(build_backbone("resnet18_deep", "torchvision")).double()
    ref.requires_grad_(mode == "weights_train")
    svf.freeze_batchnorm(ref)
    net = copy.deepcopy(ref)
    assert len(svf.fold_batchnorm(net)) == 23
    assert type(net.layer1[0].conv1) is not nn.Conv2d and isinstance(net.layer1[0].conv1, nn.Conv2d)
    x = torch.randn(2, 3, 33, 33, dtype=torch.float64)
    calls = _count_batchnorm_calls(monkeypatch)
    out, gx, grads = _step_outputs(net.train(), x)
    assert calls == []  # all folded
    ref_out, ref_gx, ref_grads = _step_outputs(ref.train(), x)
    assert _rel(out, ref_out) < 1e-12 and _rel(gx, ref_gx) < 1e-12
    assert len(grads) == len(ref_grads) == (23 if mode == "weights_train" else 0)  # every conv weight
    assert all(_rel(a, b) < 1e-12 for a, b in zip(grads, ref_grads))


class _TwoConsumers(nn.Module):
    """conv1's output goes to bn1 and to the sum: folding bn1 into conv1 would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv1(x)
        z = self.bn1(y) + y
        return self.bn2(self.conv2(z))


def test_only_a_conv_whose_only_consumer_is_the_batchnorm_is_paired():
    net = _randomise_batchnorm(_TwoConsumers()).eval().requires_grad_(False)
    ref = copy.deepcopy(net)
    assert svf.fold_batchnorm(net) == [("conv2", "bn2")]
    assert svf.fold.active_bn(net.conv2) is net.bn2 and svf.fold.active_bn(net.conv1) is None
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert _rel(net(x), ref(x)) < 1e-6
    chain = _randomise_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4))).eval()
    assert svf.fold_batchnorm(copy.deepcopy(chain)) == [("0", "1")]  # a BatchNorm after a BatchNorm stays


def test_fold_switches_off_where_it_would_not_be_exact(monkeypatch):
    torch.manual_seed(0)
    ref = _randomise_batchnorm(build_backbone("resnet18_deep", "torchvision")).requires_grad_(False)
    net = copy.deepcopy(ref)
    svf.fold_batchnorm(net)
    x = torch.randn(2, 3, 33, 33)
    calls = _count_batchnorm_calls(monkeypatch)
    # 1. BatchNorm in training mode (batch statistics, running statistics updated): no fold, same result
    out, want = net.train()(x)[-1], ref.train()(x)[-1]
    assert len(calls) == 2 * 23 and _rel(out, want) < 5e-6
    assert torch.equal(net.layer1[0].bn1.running_mean, ref.layer1[0].bn1.running_mean)  # both updated alike
    net.eval(), ref.eval()
    # 2. a BatchNorm whose affine parameters train is not folded (its gradient needs the BatchNorm pass)
    net.layer2[0].bn1.weight.requires_grad_(True)
    del calls[:]
    with torch.no_grad():
        out = net(x)[-1]
        assert len(calls) == 1
        assert _rel(out, ref(x)[-1]) < 5e-6
    net.layer2[0].bn1.weight.requires_grad_(False)
    # 3. a forward hook on the conv sees what the plain conv returns (the fold is off for that conv)
    seen = []
    handle = net.layer3[0].conv1.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    ref_seen = []
    ref_handle = ref.layer3[0].conv1.register_forward_hook(lambda m, i, o: ref_seen.append(o.clone()))
    with torch.no_grad():
        assert _rel(net(x)[-1], ref(x)[-1]) < 5e-6
    assert torch.allclose(seen[0], ref_seen[0], atol=1e-5)
    handle.remove(), ref_handle.remove()
    # 4. a full backward hook on a BatchNorm (it replaces the BatchNorm's input tensor): no fold there
    x.requires_grad_(True)
    handle = net.layer2[0].bn2.register_full_backward_hook(lambda m, gi, go: None)
    ref_handle = ref.layer2[0].bn2.register_full_backward_hook(lambda m, gi, go: None)
    assert _rel(net(x)[-1], ref(x)[-1]) < 5e-6
    handle.remove(), ref_handle.remove()
    x.requires_grad_(False)
    # 5. the BatchNorm called on its own (not on the conv's output) normalises as before
    t = torch.randn(2, 64, 5, 5)
    assert torch.equal(net.layer1[0].bn1(t), ref.layer1[0].bn1(t))
    # 6. a tensor folded for one BatchNorm given to another is an error, not a wrong result
    with torch.no_grad():
        folded = net.layer1[0].conv1(torch.randn(2, 128, 5, 5))
        with pytest.raises(RuntimeError, match="folded for another BatchNorm"):
            net.layer1[1].bn1(folded)


def test_copies_pickles_resolver_merge_and_unfold():
    torch.manual_seed(0)
    plain = _randomise_batchnorm(build_backbone("resnet18_deep", "torchvision")).eval().requires_grad_(False)
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        want = plain(x)[-1]
    folded = copy.deepcopy(plain)
    svf.fold_batchnorm(folded)
    buffer = io.BytesIO()
    torch.save(folded, buffer)
    buffer.seek(0)
    for copy_ in (copy.deepcopy(folded), torch.load(buffer, weights_only=False)):  # our own in-memory file
        assert svf.fold.active_bn(copy_.layer2[0].conv1) is copy_.layer2[0].bn1  # the copy's own BatchNorm
        with torch.no_grad():
            assert _rel(copy_(x)[-1], want) < 1e-5
    resolved = svf.resolver(folded).requires_grad_(False)  # resolved plain, folded again
    assert svf.fold.active_bn(resolved.layer2[0].conv1) is resolved.layer2[0].bn1
    merged = svf.merge(resolved.eval())
    assert type(merged.layer2[0].conv1).__name__ == "FoldedConv2d"
    assert svf.fold.active_bn(merged.layer2[0].conv1) is merged.layer2[0].bn1
    with torch.no_grad():
        assert _rel(resolved(x)[-1], want) < 1e-5 and _rel(merged(x)[-1], want) < 1e-5
    svf.unfold_batchnorm(merged)
    assert type(merged.layer2[0].conv1) is nn.Conv2d and type(merged.layer2[0].bn1) is nn.BatchNorm2d
    assert not any("_svf_folded_bn" in m.__dict__ for m in merged.modules())
    with torch.no_grad():
        assert _rel(merged(x)[-1], want) < 1e-5


@pytest.mark.filterwarnings("ignore::model.RandomInitWarning")
@pytest.mark.parametrize("arch", ["baseline", "bam"])
def test_models_fold_by_default_and_train_the_same(arch, monkeypatch):
    """build_model folds (fold_batchnorm: true); a training step gives the same loss and S-gradients as
    the unfolded model."""
    losses, grads, calls = [], [], _count_batchnorm_calls(monkeypatch)
    counts = []
    for fold in (True, False):
        torch.manual_seed(0)
        net = build_model(tiny_cfg(arch=arch, svf=True, fold_batchnorm=fold))
        folded = sum("_svf_folded_bn" in m.__dict__ for m in net.modules())
        assert (folded > 0) == fold
        q, s, sm, qm = random_episode()
        extra = {"class_id": torch.tensor([6, 7])} if arch == "bam" else {}  # base classes of fold 0
        del calls[:]
        _, loss = net.train()(q, s, sm, qm, **extra)
        counts.append(len(calls))
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([m.vector_S.grad.flatten() for m in net.modules()
                                if isinstance(m, svf.SVDLayer) and m.vector_S.grad is not None]))
    assert counts[0] == 0 < counts[1]  # every BatchNorm folded (with them: 2 x 23 in the backbone passes)
    assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[1])
    assert grads[0].numel() == grads[1].numel() > 0 and _rel(grads[0], grads[1]) < 1e-4


def test_the_folded_weights_follow_every_change_of_their_sources():
    """The cached folded weights are rebuilt when a weight, a statistic or a parameter object changes."""
    torch.manual_seed(0)
    ref = _randomise_batchnorm(build_backbone("resnet18_deep", "torchvision")).eval().requires_grad_(False)
    net = copy.deepcopy(ref)
    svf.fold_batchnorm(net)
    x = torch.randn(1, 3, 33, 33)
    assert svf.fold.active_bn(net.layer2[0].conv1) is net.layer2[0].bn1  # the fold applies

    def agree():
        with torch.no_grad():
            return _rel(net(x)[-1], ref(x)[-1]) < 1e-5
    assert agree() and agree()  # the second call reads the cache
    for model in (net, ref):  # a new parameter object in place of the old one
        conv = model.layer2[0].conv1
        conv.weight = nn.Parameter(conv.weight.detach() * 1.5, requires_grad=False)
    assert agree()
    conv = net.layer2[0].conv1
    cached = conv.__dict__["_svf_fold_cache"]["weight"]
    for m in net.modules():  # statistics rewritten with the same values (DistributedDataParallel's broadcast)
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.copy_(m.running_var.clone())
    assert agree() and conv.__dict__["_svf_fold_cache"]["weight"] is cached  # kept, not rebuilt
    for model in (net, ref):  # statistics changed in place
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.mul_(0.5).add_(0.1)
    assert agree() and conv.__dict__["_svf_fold_cache"]["weight"] is not cached
    for model in (net, ref):  # ... and replaced by new tensors
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean = m.running_mean + 0.2
    assert agree()
