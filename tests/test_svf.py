"""svf library: exactness of resolver/merge per layer kind and on ResNet-50, the paper's freezing,
the singular-value adapter file, options and bad input, and the copy-the-folder promise."""
import ast
import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import svf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


LAYERS = {
    "conv1x1": lambda: nn.Conv2d(16, 32, 1),
    "conv3x3_stride_bias": lambda: nn.Conv2d(16, 24, 3, stride=2, padding=1),
    "conv7x7": lambda: nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False),
    "conv1x3_reflect": lambda: nn.Conv2d(16, 32, (1, 3), padding=(0, 1), padding_mode="reflect"),
    "conv_dilated_same": lambda: nn.Conv2d(16, 16, 3, dilation=2, padding="same"),
    "conv_replicate": lambda: nn.Conv2d(8, 12, 3, padding=2, padding_mode="replicate"),
    "grouped": lambda: nn.Conv2d(16, 32, 3, padding=1, groups=4),
    "depthwise_circular": lambda: nn.Conv2d(16, 16, 3, padding=1, groups=16, padding_mode="circular"),
    "one_in_channel": lambda: nn.Conv2d(1, 8, 3),
    "one_out_channel": lambda: nn.Conv2d(8, 1, 3),
    "stem_3_to_64": lambda: nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False),
    "conv1d": lambda: nn.Conv1d(8, 12, 5, padding=2),
    "conv3d": lambda: nn.Conv3d(4, 6, 3, padding=1),
    "linear": lambda: nn.Linear(20, 12),
    "linear_nobias": lambda: nn.Linear(12, 20, bias=False),
}


def _input(layer, dtype):
    if isinstance(layer, nn.Linear):
        return torch.randn(4, layer.in_features, dtype=dtype)
    nd = layer.weight.dim() - 2
    return torch.randn((2, layer.in_channels) + (11,) * nd, dtype=dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_exact_fast_factored_and_merged(kind, dtype, tol):
    torch.manual_seed(0)
    layer = LAYERS[kind]().to(dtype)
    x = _input(layer, dtype)
    ref = layer(x)
    resolved = svf.resolver(layer)
    assert isinstance(resolved, svf.SVDLayer)
    with torch.no_grad():  # one conv with the merged weight
        assert rel_err(resolved(x), ref) <= tol
    out = resolved(x)      # factored form: conv_U(conv_V(x) * S)
    assert rel_err(out, ref) <= tol
    out.sum().backward()
    assert resolved.vector_S.grad is not None
    merged = svf.merge(resolved)
    assert type(merged) is type(layer)
    assert merged.state_dict().keys() == layer.state_dict().keys()
    assert rel_err(merged(x), ref) <= tol


def test_stem_conv_keeps_all_27_singular_values():
    stem = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    resolved = svf.resolver(stem)
    assert resolved.vector_S.numel() == 27  # the released code rounds down to 24
    torch.testing.assert_close(resolved.vector_S.flatten(), torch.linalg.svdvals(stem.weight.reshape(64, -1)))


def _randomise(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _stages(net):
    return [("layer0", nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)), ("layer1", net.layer1),
            ("layer2", net.layer2), ("layer3", net.layer3), ("layer4", net.layer4)]


@pytest.fixture(scope="module")
def resnet50_pair():
    torch.manual_seed(0)
    net = _randomise(torchvision.models.resnet50(weights=None)).eval()
    return net, svf.resolver(net)


def test_resnet50_stage_by_stage(resnet50_pair):
    net, resolved = resnet50_pair
    x = torch.randn(1, 3, 64, 64)
    a = b = x
    for (name, s0), (_, s1) in zip(_stages(net), _stages(resolved)):
        with torch.no_grad():
            ref, fast = s0(a), s1(b)
        factored = s1(b)  # grad enabled: every SVD layer runs its factored form
        assert rel_err(fast, ref) <= 1e-5, name
        assert rel_err(factored.detach(), ref) <= 1e-5, name
        a = b = ref
    with torch.no_grad():
        assert rel_err(resolved(x), net(x)) <= 1e-5


def test_resolver_leaves_caller_model_alone(resnet50_pair):
    net, resolved = resnet50_pair
    assert isinstance(net.conv1, nn.Conv2d) and isinstance(resolved.conv1, svf.SVD_Conv2d)
    assert isinstance(resolved.fc, svf.SVD_Linear)
    net64 = nn.Sequential(nn.Conv2d(3, 4, 3)).double()
    before = {k: v.clone() for k, v in net64.state_dict().items()}
    out = svf.resolver(net64)
    assert out[0].vector_S.dtype == torch.float64 and out[0].conv_V.weight.device.type == "cpu"
    assert all(torch.equal(before[k], v) for k, v in net64.state_dict().items())


class Backbone(nn.Module):
    """torchvision ResNet-50 split into the FSS stages layer0..layer4 (layer2-4 as in PSPNet's)."""

    def __init__(self, net):
        super().__init__()
        for name, stage in _stages(net):
            setattr(self, name, stage)

    def forward(self, x):
        for i in range(5):
            x = getattr(self, f"layer{i}")(x)
        return x


def test_paper_freezing_on_resnet50_leaves_12544_singular_values(resnet50_pair):
    _, resolved = resnet50_pair
    bb = Backbone(copy.deepcopy(resolved))
    svf.apply_paper_freezing(bb)
    bb.train()
    trainable = {n: p.numel() for n, p in bb.named_parameters() if p.requires_grad}
    assert all(n.endswith("vector_S") and n.split(".")[0] in ("layer2", "layer3", "layer4") for n in trainable)
    per_stage = {s: sum(v for n, v in trainable.items() if n.startswith(s + ".")) for s in ("layer2", "layer3", "layer4")}
    assert per_stage == {"layer2": 1792, "layer3": 5120, "layer4": 5632}
    assert sum(trainable.values()) == 12544
    bn_stats = bb.layer2[0].bn1.running_mean.clone()
    bb(torch.randn(2, 3, 64, 64)).mean().backward()
    with_grad = {n for n, p in bb.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable)
    assert torch.equal(bb.layer2[0].bn1.running_mean, bn_stats)  # BatchNorm stayed in eval mode
    assert "trainable params: 12,544 ||" in svf.print_trainable_parameters(bb)


def test_merge_round_trips_into_original_class(resnet50_pair):
    net, resolved = resnet50_pair
    tuned = copy.deepcopy(resolved)
    with torch.no_grad():
        for p in svf.singular_value_parameters(tuned).values():
            p.mul_(1 + 0.05 * torch.randn_like(p))
    merged = svf.merge(tuned)
    fresh = torchvision.models.resnet50(weights=None).eval()
    fresh.load_state_dict(merged.state_dict())  # strict: same keys, same shapes
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(fresh(x), tuned(x)) <= 1e-5
        assert rel_err(merged(x), tuned(x)) <= 1e-5
    assert isinstance(tuned.conv1, svf.SVD_Conv2d)  # merge copies, the SVD model stays usable


def test_singular_value_file_round_trip_and_fingerprint(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.LazyLinear(4))
    base(torch.randn(1, 3, 9, 9))
    tuned = svf.resolver(base)
    with torch.no_grad():
        for p in svf.singular_value_parameters(tuned).values():
            p.add_(torch.randn_like(p))
    path = tmp_path / "s.pt"
    torch.save(svf.state_dict(tuned), path)
    assert path.stat().st_size < 10_000
    restored = svf.load_state_dict(svf.resolver(base), torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert torch.equal(restored(x), tuned(x))

    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.Linear(200, 4))
    with pytest.raises(ValueError, match="different base weights"):
        svf.load_state_dict(svf.resolver(other), torch.load(path, weights_only=True))
    with pytest.raises(KeyError, match="missing from the file"):
        svf.load_state_dict(svf.resolver(nn.Sequential(*base, nn.Linear(4, 2))), torch.load(path, weights_only=True))
    with pytest.raises(ValueError, match="rank differs"):
        svf.load_state_dict(svf.resolver(base, global_low_rank_ratio=0.5), torch.load(path, weights_only=True))


def test_options_ratio_excluded_custom_and_skips():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 1), nn.Sequential(nn.Conv2d(16, 16, 3)),
                        nn.Flatten(), nn.Linear(16, 10))
    low = svf.resolver(net, global_low_rank_ratio=0.5, customized_layers_low_rank_ratio={"1": 0.25})
    assert [low[0].rank, low[1].rank, low[2][0].rank, low[4].rank] == [8, 4, 8, 5]
    torch.testing.assert_close(low[0].vector_S.flatten(), torch.linalg.svdvals(net[0].weight.reshape(16, -1))[:8])
    ex = svf.resolver(net, excluded_layers=["2"])
    assert isinstance(ex[2][0], nn.Conv2d) and isinstance(ex[0], svf.SVD_Conv2d)
    s1 = svf.resolver(net, skip_1x1=True)
    assert isinstance(s1[1], nn.Conv2d) and isinstance(s1[4], svf.SVD_Linear)  # Linear not skipped
    s3 = svf.resolver(net, skip_3x3=True)
    assert isinstance(s3[0], nn.Conv2d) and isinstance(s3[1], svf.SVD_Conv2d)


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


class NamedConv(nn.Conv2d):
    """A subclass that only adds an attribute: converted, and merged back into NamedConv."""
    tag = "named"


def test_unsupported_layers_are_left_and_listed_subclasses_round_trip():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), ScaledConv(4, 4, 3), nn.ConvTranspose2d(4, 4, 2), NamedConv(4, 4, 1))
    with pytest.warns(UserWarning, match=r"1 \(ScaledConv overrides forward\).*2 \(transposed convolution\)"):
        out = svf.resolver(net)
    assert type(out[1]) is ScaledConv and type(out[2]) is nn.ConvTranspose2d
    assert isinstance(out[3], svf.SVD_Conv2d)
    merged = svf.merge(out)
    assert type(merged[3]) is NamedConv
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(merged(x), net(x)) <= 1e-5


@pytest.mark.parametrize("training", [False, True])
def test_transformer_layer_fully_converted_trains_and_merges(training):
    """nn.MultiheadAttention reads its projections' weights directly (and eval mode takes torch's fused
    fast path): every Linear, the packed q/k/v projection included, becomes SVD, exact, and S trains."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), nn.Linear(16, 3))
    net.train(training)
    out = svf.resolver(net)
    attn = out[0].self_attn
    assert type(attn) is svf.SVD_MultiheadAttention and isinstance(attn.in_proj, svf.SVD_Linear)
    assert attn.in_proj.rank == 16 and "in_proj_weight" not in dict(attn.named_parameters(recurse=False))
    assert all(isinstance(m, svf.SVD_Linear) for m in (attn.out_proj, out[0].linear1, out[0].linear2, out[1]))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert rel_err(out(x), net(x)) <= 1e-5
    svf.mark_only_singular_values_as_trainable(out)
    opt = torch.optim.SGD([p for p in out.parameters() if p.requires_grad], lr=0.05)
    out(x).square().sum().backward()
    assert {n for n, p in out.named_parameters() if p.grad is not None} == {
        n for n, p in out.named_parameters() if "vector_S" in n}
    assert attn.in_proj.vector_S.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        trained = out(x)
    assert rel_err(trained, net(x)) > 1e-4
    merged = svf.merge(out)
    assert type(merged[0].self_attn) is nn.MultiheadAttention
    assert merged.state_dict().keys() == net.state_dict().keys()
    with torch.no_grad():
        assert rel_err(merged(x), trained) <= 1e-5
    restored = svf.resolver(net)
    svf.load_state_dict(restored, svf.state_dict(out))
    with torch.no_grad():
        assert rel_err(restored(x), trained) <= 1e-5


def test_attention_with_separate_key_value_sizes_and_subclasses():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, kdim=5, vdim=7, batch_first=True).eval()
    out = svf.resolver(mha)
    assert {n for n, _ in out.named_children()} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    q, k, v = torch.randn(2, 4, 12), torch.randn(2, 6, 5), torch.randn(2, 6, 7)
    with torch.no_grad():
        assert rel_err(out(q, k, v)[0], mha(q, k, v)[0]) <= 1e-5
        merged = svf.merge(out)
        assert type(merged) is nn.MultiheadAttention and merged.state_dict().keys() == mha.state_dict().keys()
        assert rel_err(merged(q, k, v)[0], mha(q, k, v)[0]) <= 1e-5

    class MyAttention(nn.MultiheadAttention):
        pass

    with pytest.warns(UserWarning, match="attn .*MyAttention subclasses nn.MultiheadAttention"):
        out = svf.resolver(nn.ModuleDict({"attn": MyAttention(8, 2), "fc": nn.Linear(8, 2)}))
    assert type(out["attn"]) is MyAttention and isinstance(out["attn"].out_proj, svf.SVD_Linear)


def test_code_reading_weight_and_bias_gets_the_merged_ones_with_gradients():
    """Swin's attention calls F.linear(x, self.qkv.weight, self.qkv.bias) instead of self.qkv(x)."""
    torch.manual_seed(0)
    fc = nn.Linear(6, 4)
    layer = svf.resolver(nn.Sequential(fc))[0]
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert rel_err(F.linear(x, layer.weight, layer.bias), fc(x)) <= 1e-6
    layer.requires_grad_(False)
    layer.vector_S.requires_grad_(True)
    F.linear(x, layer.weight, layer.bias).sum().backward()
    expected = torch.autograd.grad(layer(x).sum(), layer.vector_S)[0]
    assert torch.allclose(layer.vector_S.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad,err,match", [
    ("not a module", TypeError, "torch.nn.Module"),
    (nn.Sequential(nn.ReLU()), ValueError, "nothing to convert"),
])
def test_bad_models(bad, err, match):
    with pytest.raises(err, match=match):
        svf.resolver(bad)


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5, True, "1"])
def test_bad_ratios(ratio):
    with pytest.raises(ValueError, match="global_low_rank_ratio"):
        svf.resolver(nn.Conv2d(3, 3, 1), global_low_rank_ratio=ratio)
    with pytest.raises(ValueError, match="customized_layers_low_rank_ratio"):
        svf.resolver(nn.Sequential(nn.Conv2d(3, 3, 1)), customized_layers_low_rank_ratio={"0": ratio})


def test_unknown_layer_names_suggest_the_closest():
    net = nn.Sequential()
    net.add_module("layer1", nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match=r"'layer_1'.*did you mean \['layer1'\]"):
        svf.resolver(net, excluded_layers=["layer_1"])


def test_fast_path_cache_follows_optimizer_steps():
    torch.manual_seed(0)
    layer = svf.resolver(nn.Conv2d(4, 6, 3))
    opt = torch.optim.SGD([layer.vector_S], lr=0.5)
    x = torch.randn(2, 4, 7, 7)
    for _ in range(2):
        with torch.no_grad():
            fast = layer(x)
        factored = layer(x)
        assert rel_err(fast, factored.detach()) <= 1e-6
        factored.square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_freeze_batchnorm_survives_train():
    net = svf.freeze_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    net.train()
    before = net[1].running_mean.clone()
    net(torch.randn(2, 3, 5, 5) + 3)
    assert torch.equal(net[1].running_mean, before) and not net[1].weight.requires_grad


def test_svf_folder_works_when_copied_alone(tmp_path):
    shutil.copytree(os.path.join(REPO, "svf"), tmp_path / "svf", ignore=shutil.ignore_patterns("__pycache__"))
    stdlib = set(sys.stdlib_module_names)
    for name in os.listdir(tmp_path / "svf"):
        if name.endswith(".py"):
            for node in ast.walk(ast.parse((tmp_path / "svf" / name).read_text())):
                if isinstance(node, ast.Import):
                    roots = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    roots = [node.module.split(".")[0]]
                else:
                    continue
                assert all(r == "torch" or r in stdlib for r in roots), f"svf/{name} imports {roots}"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import svf, torch; "
            "assert svf.__file__.startswith(sys.argv[1]), svf.__file__; "
            "m = svf.resolver(torch.nn.Conv2d(3, 8, 3)); x = torch.randn(1, 3, 6, 6); "
            "print(float((svf.merge(m)(x) - m(x)).abs().max()))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 1e-5


@pytest.mark.parametrize("factors,expected", [("S", {"vector_S"}), ("US", {"vector_S", "conv_U.weight"}),
                                               ("SV", {"vector_S", "conv_V.weight"}),
                                               ("USV", {"vector_S", "conv_U.weight", "conv_V.weight"})])
def test_mark_trainable_factors_choose_the_svd_factors(factors, expected):
    layer = svf.resolver(nn.Sequential(nn.Conv2d(4, 6, 3, bias=True)))
    svf.mark_only_singular_values_as_trainable(layer, factors=factors)
    assert {n.split(".", 1)[1] for n, p in layer.named_parameters() if p.requires_grad} == expected
    x = torch.randn(2, 4, 7, 7)
    layer(x).square().sum().backward()  # gradients reach exactly the chosen factors
    assert {n.split(".", 1)[1] for n, p in layer.named_parameters() if p.grad is not None} == expected
    with pytest.raises(ValueError, match="factors='UV'"):
        svf.mark_only_singular_values_as_trainable(layer, factors="UV")
