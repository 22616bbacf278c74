"""Tests of the low-rank conv converter (the lrcc package)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrcc
import lrcc.convert as impl



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread avoids multi-threaded LAPACK overhead on the shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyNet(nn.Module):
    """Every conv flavour the converter must handle exactly."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.wide = nn.Conv2d(8, 12, (1, 3), padding=(0, 1))
        self.reflect = nn.Conv2d(12, 8, 3, padding=1, padding_mode="reflect")
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2, stride=2, bias=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.reflect(self.wide(self.depthwise(self.grouped(x))))
        return self.head(self.dilated(x).mean((2, 3)))


CONV_NAMES = ["stem", "grouped", "depthwise", "wide", "reflect", "dilated"]


def make_net(seed=0):
    torch.manual_seed(seed)
    return TinyNet().eval()


def convert(net, mode, **kw):
    kw.setdefault("compress_step", 5)
    return lrcc.model_convert_conv(net, mode, verbose=False, **kw)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def perturb_trainable(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("mode", lrcc.MODES)
def test_trainable_sets_follow_the_mode_table(mode):
    model = convert(make_net(), mode)
    expected = set(lrcc.TRAINABLE_BY_MODE[mode])
    for name in CONV_NAMES:
        layer = getattr(model, name)
        assert isinstance(layer, lrcc.LowRankConv2d)
        trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
        assert trainable - {"bias"} == expected, name
        assert not layer.weight.requires_grad
    # outside converted layers (and conv biases) the seed's default: everything still trains
    assert all(p.requires_grad for p in model.bn.parameters()) and all(p.requires_grad for p in model.head.parameters())
    assert model.stem.bias.requires_grad
    lrcc.mark_only_lrcc_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{c}.{t}" for c in CONV_NAMES for t in expected}


def test_each_mode_trains_what_its_name_says():
    """Behaviour, not the table: in each mode, which of U (lora_B), V (lora_A) and S (sparse_weight) receive
    a gradient and move in two SGD steps (nothing else in the state dict moves), and where the applied
    weight moves: on S's support only when U and V are fixed, in V's row space when only U trains (ΔU·V),
    in U's column space when only V trains (U·ΔV)."""
    promised = {"fix_low_rank": "S", "fix_sparse": "UV", "tune_U": "U", "tune_V": "V", "tune_U_S": "US",
                "tune_V_S": "VS", "tune_all": "UVS", "lora_mode": "UV"}  # what each mode's name says
    assert set(promised) == set(lrcc.MODES)
    letter = {"lora_B": "U", "lora_A": "V", "sparse_weight": "S"}
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for mode, factors in promised.items():
        model = lrcc.mark_only_lrcc_as_trainable(convert(make_net(), mode, r=1, lambda_s=0.05))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        w0 = {n: getattr(model, n).effective_weight().detach().clone() for n in CONV_NAMES}
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        got_grad = set()
        for _ in range(2):  # two steps: lora_mode starts at U = 0, so V's first gradient is exactly 0
            opt.zero_grad()
            model(x).square().sum().backward()
            got_grad |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
            opt.step()
        moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        # S acts on its support only: the depthwise conv's 1 x 9 matrix is full rank at r=1, its support is empty
        has_s = {n: mode != "lora_mode" and bool(getattr(model, n).sparse_mask.any()) for n in CONV_NAMES}
        assert sum(has_s.values()) == (0 if mode == "lora_mode" else len(CONV_NAMES) - 1)
        expected = {f"{c}.{t}" for c in CONV_NAMES for t, f in letter.items()
                    if f in factors and (f != "S" or has_s[c])}
        assert got_grad == expected and moved == expected, mode
        for name in CONV_NAMES:
            layer = getattr(model, name)
            rows, cols = layer.group_matrix_shape
            dw = (layer.effective_weight().detach() - w0[name]).view(layer.groups, rows, cols)
            assert (dw.abs().max() > 1e-6) == (factors != "S" or has_s[name]), (mode, name)
            u = layer.lora_B.detach().view(layer.groups, rows, layer.rank)
            v = layer.lora_A.detach().view(layer.groups, layer.rank, cols)
            if factors == "S":
                assert not layer.sparse_mask.all(), name
                assert torch.all(dw[~layer.sparse_mask.view_as(dw)] == 0), name
            elif factors == "U":
                assert float((dw - dw @ torch.linalg.pinv(v) @ v).norm()) <= 1e-4 * float(dw.norm()), name
            elif factors == "V":
                assert float((dw - u @ torch.linalg.pinv(u) @ dw).norm()) <= 1e-4 * float(dw.norm()), name


@pytest.mark.parametrize("mode", lrcc.MODES)
def test_converted_model_equals_pretrained_at_init(mode):
    net = make_net()
    x = torch.randn(2, 3, 16, 16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = convert(net, mode)
    with torch.no_grad():
        assert rel(model(x), net(x)) <= 1e-5
        for name in CONV_NAMES:  # layer by layer, on the layer's own input size
            conv, layer = getattr(net, name), getattr(model, name)
            xi = torch.randn(2, conv.in_channels, 9, 7)
            assert rel(layer(xi), conv(xi)) <= 1e-5, name
    # the caller's model is left as it was
    assert all(isinstance(getattr(net, n), nn.Conv2d) and not isinstance(getattr(net, n), lrcc.LowRankConv2d)
               for n in CONV_NAMES)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_dropping_the_residual_reproduces_the_seed_approximation():
    net = make_net()
    model = convert(net, "tune_all", keep_residual=False, r=1, lambda_s=0.05)
    layer = model.reflect
    assert not hasattr(layer, "residual")
    w = net.reflect.weight
    approx = layer.low_rank_weight() + layer.sparse_weight * layer.sparse_mask
    assert torch.allclose(layer.effective_weight(), approx)
    error = w - approx  # what is thrown away: the entries below lambda_s
    assert 0 < error.abs().max() < 0.05 + 1e-6
    assert layer.sparse_mask.any() and not layer.sparse_mask.all()


def test_decomposition_recovers_low_rank_plus_sparse():
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(3, 40, 4, generator=gen) @ torch.randn(3, 4, 60, generator=gen)
    sparse = torch.zeros(3, 40, 60)
    support = torch.rand(3, 40, 60, generator=gen) < 0.03
    sparse[support] = 20 * torch.randn(int(support.sum()), generator=gen).sign()
    w = low + sparse
    u, v, s, mask = lrcc.decompose_low_rank_sparse(w, 4, compress_step=50, lambda_s=5.0)
    assert u.shape == (3, 40, 4) and v.shape == (3, 4, 60)
    assert torch.allclose(u.mT @ u, torch.eye(4).expand(3, 4, 4), atol=1e-4)  # U orthonormal, as the seed
    assert torch.equal(mask, support)
    assert rel(u @ v + s, w) < 1e-4


def test_rank_rule():
    conv = nn.Conv2d(512, 512, 3)
    assert lrcc.layer_rank(conv, r_ratio=0.25) == 128  # input channels x r_ratio
    assert lrcc.layer_rank(conv, r=600) == 512  # capped at full rank
    assert lrcc.layer_rank(nn.Conv2d(3, 64, 7), r_ratio=0.25) == 1  # at least one
    assert lrcc.layer_rank(nn.Conv2d(256, 64, 1), r=100) == 64
    assert lrcc.layer_rank(nn.Conv2d(8, 8, 3, groups=8), r_ratio=0.5) == 1  # per group
    assert lrcc.layer_rank(nn.Conv2d(16, 16, 3, groups=2), r_ratio=0.25) == 2
    with pytest.raises(ValueError):
        lrcc.layer_rank(conv, r=0, r_ratio=0)
    model = convert(make_net(), "tune_U", r=3)
    assert model.grouped.lora_A.shape == (2 * 3, 4 * 9) and model.grouped.lora_B.shape == (8, 3)
    assert model.depthwise.rank == 1


@pytest.mark.parametrize("mode", lrcc.MODES)
def test_merge_is_exact_after_training_changes(mode):
    model = convert(make_net(), mode, lora_dropout=0.1 if mode == "lora_mode" else 0.0)
    perturb_trainable(model)
    x = torch.randn(2, 3, 16, 16)
    merged = lrcc.merge(model)
    assert not any(isinstance(m, lrcc.LowRankConv2d) for m in merged.modules())
    assert isinstance(model.stem, lrcc.LowRankConv2d)  # merge copies
    assert type(merged.reflect) is nn.Conv2d and merged.reflect.padding_mode == "reflect"
    with torch.no_grad():
        assert rel(merged(x), model(x)) <= 1e-5
    direct = lrcc.model_convert_conv(make_net(), mode, compress_step=5, merge_parameter=True, verbose=False)
    assert all(type(getattr(direct, n)) is nn.Conv2d for n in CONV_NAMES)
    with torch.no_grad():
        assert rel(direct(x), make_net()(x)) <= 1e-5


@pytest.mark.parametrize("mode", lrcc.MODES)
def test_adapter_save_load_round_trip(mode, tmp_path):
    model = convert(make_net(), mode)
    perturb_trainable(model)
    model.train()
    model(torch.randn(4, 3, 16, 16))  # BatchNorm running statistics move too
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "adapter.pt"
    lrcc.save_lora_state_dict(model, str(path))
    saved = torch.load(path, weights_only=True)
    assert not any(k.endswith(".weight") and k.split(".")[0] in CONV_NAMES for k in saved["state"])
    assert "bn.running_mean" in saved["state"] and "head.weight" in saved["state"]

    fresh = convert(make_net(), mode)
    lrcc.load_lora_state_dict(fresh, str(path))
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    plain = make_net()  # loading into the unconverted model merges
    lrcc.load_lora_state_dict(plain, str(path))
    assert type(plain.stem) is nn.Conv2d
    with torch.no_grad():
        assert rel(plain(x), expected) <= 1e-5


def test_adapter_mismatches_are_clear_errors(tmp_path):
    path = str(tmp_path / "a.pt")
    model = convert(make_net(), "tune_U_S")
    lrcc.save_lora_state_dict(model, path)
    with pytest.raises(ValueError, match="mode"):
        lrcc.load_lora_state_dict(convert(make_net(), "tune_all"), path)
    with pytest.raises(ValueError, match="rank"):
        lrcc.load_lora_state_dict(convert(make_net(), "tune_U_S", r=2), path)
    with pytest.raises(ValueError, match="pretrained weight differs"):
        lrcc.load_lora_state_dict(convert(make_net(seed=5), "tune_U_S"), path)
    with pytest.raises(KeyError, match="no adapter"):
        lrcc.load_lora_state_dict(_with_extra_conv(), path)
    with pytest.raises(FileNotFoundError):
        lrcc.load_lora_state_dict(model, str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="no lrcc layers"):
        lrcc.save_lora_state_dict(make_net(), path)


def _with_extra_conv():
    """A converted TinyNet with one more converted conv than the saved adapter knows."""
    net = make_net()
    net.extra = nn.Conv2d(3, 3, 1)
    return convert(net, "tune_U_S")


def test_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    calls = []
    real = impl.decompose_low_rank_sparse
    monkeypatch.setattr(impl, "decompose_low_rank_sparse", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = str(tmp_path / "cache" / "dna.pt")
    first = convert(make_net(), "tune_U_S", cache_path=path, lambda_s=0.05)
    n_layers = len(calls)
    assert n_layers == len(CONV_NAMES)
    second = convert(make_net(), "tune_all", cache_path=path, lambda_s=0.05)  # same decomposition: reused
    assert len(calls) == n_layers
    assert torch.equal(first.reflect.sparse_mask, second.reflect.sparse_mask)
    assert torch.equal(first.reflect.lora_B, second.reflect.lora_B)
    third = convert(make_net(), "tune_U_S", cache_path=path, lambda_s=0.1)  # lambda_s changed: recomputed
    assert len(calls) == 2 * n_layers
    assert third.reflect.sparse_mask.sum() < first.reflect.sparse_mask.sum()
    convert(make_net(seed=3), "tune_U_S", cache_path=path, lambda_s=0.1)  # other pretrained weights: recomputed
    assert len(calls) == 3 * n_layers
    convert(make_net(seed=3), "tune_U_S", cache_path=path, lambda_s=0.1, compress_step=6)
    assert len(calls) == 4 * n_layers
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name != "dna.pt"]  # no temp files left
    foreign = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not an lrcc decomposition cache"):
        convert(make_net(), "tune_U", cache_path=str(foreign))


def test_selection_rules():
    net = make_net()
    with pytest.raises(ValueError, match="not both"):
        convert(net, "lora_mode", convert_op_name=["stem"], ignore_op_name=["wide"])
    with pytest.raises(ValueError, match="matches no nn.Conv2d"):
        convert(net, "lora_mode", ignore_op_name=["downsample"])
    with pytest.raises(ValueError, match="unknown lrcc mode"):
        convert(net, "tune_everything")
    with pytest.raises(TypeError, match="unknown options"):
        convert(net, "lora_mode", lora_alpah=2)
    class ScaledConv(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)
    custom = make_net()
    custom.wide = ScaledConv(8, 12, (1, 3), padding=(0, 1))
    with pytest.raises(ValueError, match="'wide' is a ScaledConv with its own forward"):
        convert(custom, "lora_mode")
    assert isinstance(convert(custom, "lora_mode", ignore_op_name=["wide"]).wide, ScaledConv)
    only = convert(net, "lora_mode", convert_op_name=["re", "wide"])  # substring match
    assert {n for n, m in only.named_modules() if isinstance(m, lrcc.LowRankConv2d)} == {"reflect", "wide"}
    but = convert(net, "lora_mode", ignore_op_name=["re", "wide"])
    assert {n for n, m in but.named_modules() if isinstance(m, lrcc.LowRankConv2d)} == {
        "stem", "grouped", "depthwise", "dilated"}
    fixed = convert(net, "tune_U_S", fix_op_name=["stem", "dilated"])  # both have a bias
    for name in ("stem", "dilated"):
        layer = getattr(fixed, name)
        assert type(layer) is nn.Conv2d
        assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert isinstance(fixed.grouped, lrcc.LowRankConv2d)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert rel(fixed(x), net(x)) <= 1e-5


def test_lora_scaling_and_dropout_is_applied_in_training():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=True)
    layer = lrcc.LowRankConv2d.from_conv(conv, mode="lora_mode", rank=2, lora_alpha=8, lora_dropout=0.5)
    assert layer.scaling == 4.0
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 4, 7, 7)
    delta = (layer.lora_B @ layer.lora_A).view_as(conv.weight)
    layer.train()
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, 0.5, training=True)
    expected = conv(x) + 4.0 * F.conv2d(F.pad(dropped, (1, 1, 1, 1), mode="reflect"), delta)
    assert torch.allclose(y, expected, atol=1e-5)
    assert not torch.allclose(y, layer(x))  # a new dropout mask each call
    layer.eval()
    plain = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), conv.weight + 4.0 * delta, conv.bias)
    assert torch.allclose(layer(x), plain, atol=1e-5)
    y.sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and layer.weight.grad is None
