"""`svf/` copied into other few-shot segmentation code (docs/porting.md): each recipe, on a small stand-in written
here that reproduces the pattern that matters in that codebase (backbone under no_grad, features detached, a
BatchNorm's forward called directly, explicit optimizer parameter groups, attention maps cached on a module,
torchvision / Swin stage names, the released SVF code's own lines and checkpoints). Also the library findings
behind them: resolver/merge after a training forward, the first-step check that S trains, frozen BatchNorm however
it is called, released checkpoints with rounded-down ranks."""
import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import svf

NOT_TRAINING = svf.SingularValuesNotTrainingWarning


# --------------------------------------------------------------------------- stand-ins (torchvision ResNet names)
class Block(nn.Module):
    """A bottleneck with torchvision's names: conv1 bn1 conv2 bn2 conv3 bn3 relu downsample."""

    def __init__(self, cin, width, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + self.downsample(x))


class TinyResNet(nn.Module):
    """torchvision's layout (conv1 bn1 relu maxpool layer1..4 avgpool fc), a few channels."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32)  # 27 -> rank 27
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(Block(32, 4, 16))
        self.layer2 = nn.Sequential(Block(16, 8, 24, 2), Block(24, 8, 24))
        self.layer3 = nn.Sequential(Block(24, 8, 32, 2))
        self.layer4 = nn.Sequential(Block(32, 8, 40, 2))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(40, 10)
        _randomise_batchnorm(self)


def _randomise_batchnorm(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net


def extract_feats_directly(backbone, img):
    """HSNet's and DCAMA's feature extraction: every part's ``forward`` called directly (no module hooks run)."""
    feat = backbone.maxpool.forward(backbone.relu.forward(backbone.bn1.forward(backbone.conv1.forward(img))))
    feats = []
    for lid in (1, 2, 3, 4):
        for block in getattr(backbone, f"layer{lid}"):
            res = feat
            feat = block.relu.forward(block.bn1.forward(block.conv1.forward(feat)))
            feat = block.relu.forward(block.bn2.forward(block.conv2.forward(feat)))
            feat = block.bn3.forward(block.conv3.forward(feat))
            feat = block.relu.forward(feat + block.downsample.forward(res))
            feats.append(feat.clone())
    return feats


class Hypercorr(nn.Module):
    """HSNet (juhongm999/hsnet) / DCAMA-ResNet (pawn-sxy/DCAMA): ``self.backbone`` a torchvision ResNet run under
    ``torch.no_grad()`` through direct ``forward`` calls; ``train_mode()`` = train() + backbone.eval()."""

    def __init__(self, no_grad=True):
        super().__init__()
        self.no_grad = no_grad
        self.backbone = TinyResNet().eval()
        self.head = nn.Conv2d(40 + 32 + 24, 2, 1)

    def forward(self, q, s):
        with torch.no_grad() if self.no_grad else _nothing():
            qf, sf = extract_feats_directly(self.backbone, q), extract_feats_directly(self.backbone, s)
        size = qf[-1].shape[-2:]
        corr = [F.interpolate(a * b, size) for a, b in zip(qf[-3:], sf[-3:])]
        return self.head(torch.cat(corr, 1))

    def train_mode(self):
        self.train()
        self.backbone.eval()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class FewShotLayers(nn.Module):
    """PFENet (dvlab-research/PFENet) / BAM (chunbolang/BAM): ``layer0..layer4`` on the model itself (layer0 = the
    stem as a Sequential), run under ``torch.no_grad()``; the optimizer takes explicit groups of the heads."""

    def __init__(self, no_grad=True):
        super().__init__()
        r = TinyResNet()
        self.no_grad = no_grad
        self.layer0 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4
        self.down_query = nn.Sequential(nn.Conv2d(40 + 32, 16, 1), nn.ReLU())
        self.cls = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        with torch.no_grad() if self.no_grad else _nothing():
            f2 = self.layer2(self.layer1(self.layer0(x)))
            f3 = self.layer3(f2)
            f4 = self.layer4(f3)
        q = torch.cat([f4, F.interpolate(f3, f4.shape[-2:])], 1)
        return self.cls(self.down_query(q))

    def param_groups(self, lr):  # PFENet/BAM build their SGD from the heads' modules by name
        return [{"params": self.down_query.parameters()}, {"params": self.cls.parameters(), "lr": 10 * lr}]


class SwinBlock(nn.Module):
    """A Swin block stand-in: pre-norm attention of ``qkv``/``proj`` Linears, an MLP (``fc1``/``fc2``)."""

    def __init__(self, c):
        super().__init__()
        self.norm1, self.qkv, self.proj = nn.LayerNorm(c), nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, -1)
        x = x + self.proj((q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1) @ v)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class BasicLayer(nn.Module):
    """Swin's stage (microsoft's layout: ``blocks`` then ``downsample``, the patch merging of the NEXT stage),
    returning its blocks' outputs ``.clone().detach()``ed as DCAMA's copy does."""

    def __init__(self, c, merge, detach=True):
        super().__init__()
        self.detach = detach
        self.blocks = nn.ModuleList([SwinBlock(c), SwinBlock(c)])
        self.downsample = nn.Linear(c, 2 * c, bias=False) if merge else None

    def forward(self, x):
        feats = []
        for blk in self.blocks:
            x = blk(x)
            feats.append(x.clone().detach() if self.detach else x.clone())
        if self.downsample is not None:
            x = self.downsample(x)
        return feats, x


class TinySwin(nn.Module):
    """DCAMA's Swin backbone: ``patch_embed``, ``layers.0..3``, ``norm``, ``head``; ``forward_features`` keeps the
    feature maps on the module (``self.feat_maps``)."""

    def __init__(self, detach=True):
        super().__init__()
        self.patch_embed = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Flatten(2))
        self.layers = nn.ModuleList([BasicLayer(8 * 2 ** i, i < 3, detach) for i in range(4)])
        self.norm, self.head = nn.LayerNorm(64), nn.Linear(64, 10)

    def forward_features(self, x):
        x = self.patch_embed(x).transpose(1, 2)
        self.feat_maps = []
        for layer in self.layers:
            feats, x = layer(x)
            self.feat_maps += feats
        return self.norm(x)


class CachedAttention(nn.Module):
    """DCAMA's attention: keeps ``self.attn``, the attention map of its last forward (a non-leaf tensor)."""

    def __init__(self, c):
        super().__init__()
        self.q, self.k = nn.Linear(c, c), nn.Linear(c, c)
        self.attn = None

    def forward(self, query, support):
        self.attn = (self.q(query) @ self.k(support).transpose(1, 2)).softmax(-1)
        return self.attn @ support


class DcamaSwin(nn.Module):
    """DCAMA with its Swin backbone: ``feature_extractor`` under ``torch.no_grad()``, its features detached,
    attention blocks that cache their maps."""

    def __init__(self, no_grad=True, detach=True):
        super().__init__()
        self.no_grad = no_grad
        self.feature_extractor = TinySwin(detach).eval()
        self.blocks = nn.ModuleList([CachedAttention(32), CachedAttention(64)])
        self.cls = nn.Linear(32 + 64, 2)

    def forward(self, q, s):
        with torch.no_grad() if self.no_grad else _nothing():
            self.feature_extractor.forward_features(q)
            qf = list(self.feature_extractor.feat_maps)
            self.feature_extractor.forward_features(s)
            sf = list(self.feature_extractor.feat_maps)
        a = self.blocks[0](qf[5], sf[5]).mean(1)
        b = self.blocks[1](qf[7], sf[7]).mean(1)
        return self.cls(torch.cat([a, b], 1))


# --------------------------------------------------------------------------- helpers
def _episode(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, size, size, generator=g), torch.randn(2, 3, size, size, generator=g)


def _no_warning_step(model, optimizer, loss):
    """One step, failing on a SingularValuesNotTrainingWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", NOT_TRAINING)
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()


def _bn_stats(module):
    return {n: b.clone() for n, b in module.named_buffers() if "running" in n}


def _grads(model):
    return {n for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _check_merge(trained, fresh_original, run):
    """``svf.merge`` gives the original keys, loads strictly into the original class, computes the same."""
    merged = svf.merge(trained)
    assert set(merged.state_dict()) == set(fresh_original.state_dict())
    fresh_original.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert _rel(run(fresh_original.eval()), run(trained.eval())) < 1e-5


# --------------------------------------------------------------------------- 1. resolver/merge after a training forward
def test_resolver_merge_and_adapters_work_after_a_training_step_that_cached_non_leaf_tensors(tmp_path):
    torch.manual_seed(0)
    net = DcamaSwin(no_grad=False, detach=False)
    q, s = _episode()
    net(q, s).square().mean().backward()  # self.attn and feat_maps now hold tensors with autograd history
    assert net.blocks[0].attn.grad_fn is not None and net.feature_extractor.feat_maps[0].grad_fn is not None
    resolved = svf.resolver(net)  # the old copy.deepcopy raised "Only Tensors created explicitly by the user ..."
    copied = resolved.blocks[0].attn
    assert copied.grad_fn is None and torch.equal(copied, net.blocks[0].attn.detach())  # copied detached
    opt = torch.optim.SGD([p for n, p in resolved.named_parameters() if "vector_S" in n], lr=0.1)
    resolved(q, s).square().mean().backward()
    opt.step()
    resolved(q, s).square().mean().backward()  # cached maps with history again, then merge and the adapter files
    merged = svf.merge(resolved)
    assert set(merged.state_dict()) == set(net.state_dict())
    with torch.no_grad():
        assert _rel(merged(q, s), resolved(q, s)) < 1e-5
    svf.save_adapter(resolved, tmp_path / "s.pt")
    loaded = svf.load_adapter(net, tmp_path / "s.pt")  # net still holds its cached tensors: resolved inside
    with torch.no_grad():
        assert _rel(loaded(q, s), resolved(q, s)) < 1e-5


# --------------------------------------------------------------------------- 2. S that does not train is reported
def _resnet_with_head():
    torch.manual_seed(0)
    net = FewShotLayers(no_grad=True)
    return net


def test_first_step_warns_once_when_the_backbone_runs_under_no_grad():
    net = _resnet_with_head()
    for stage in ("layer0", "layer1", "layer2", "layer3", "layer4"):
        setattr(net, stage, svf.resolver(getattr(net, stage)))
    svf.apply_paper_freezing(net)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    x, _ = _episode()
    with pytest.warns(NOT_TRAINING, match=r"S does not train: 16 of 16 SVD layers .* got no gradient.*layer2 8.*"
                                          r"torch\.no_grad\(\)") as record:
        net(x).square().mean().backward()
        opt.step()
    assert len([w for w in record if w.category is NOT_TRAINING]) == 1
    with warnings.catch_warnings():  # once: later steps are not checked again
        warnings.simplefilter("error", NOT_TRAINING)
        opt.step()
    with pytest.raises(RuntimeError, match="16 of 16 SVD layers"):
        svf.check_singular_values_train(net, opt)


def test_first_step_warns_when_explicit_param_groups_leave_s_out_and_the_verb_says_so():
    net = _resnet_with_head()
    net.no_grad = False
    svf.prepare(net, ("layer2", "layer3", "layer4"), frozen_stages=("layer0", "layer1"), verbose=False)
    opt = torch.optim.SGD(net.param_groups(0.1), lr=0.1)  # the heads only: S is in no group
    x, _ = _episode()
    with pytest.warns(NOT_TRAINING, match="in none of the optimizer's parameter groups"):
        net(x).square().mean().backward()
        opt.step()
    with pytest.raises(RuntimeError, match="16 of 16 SVD layers have their trainable singular values in none"):
        svf.check_singular_values_train(net, opt)
    opt.add_param_group({"params": [p for n, p in net.named_parameters() if "vector_S" in n and p.requires_grad]})
    assert "16 SVD layers" in svf.check_singular_values_train(net, opt)


def test_first_step_warns_when_a_freezing_loop_of_the_codebase_froze_s_again():
    net = _resnet_with_head()
    net.no_grad = False
    svf.prepare(net, ("layer2", "layer3", "layer4"), frozen_stages=("layer0", "layer1"), verbose=False)
    for stage in (net.layer2, net.layer3, net.layer4):  # BAM/PFENet's freeze_modules, left in train.py
        for p in stage.parameters():
            p.requires_grad = False
    opt = torch.optim.SGD(net.param_groups(0.1), lr=0.1)
    x, _ = _episode()
    with pytest.warns(NOT_TRAINING, match="none of the singular values of FewShotLayers trains any more"):
        net(x).square().mean().backward()
        opt.step()


def test_no_warning_when_s_trains_with_keep_small_updates_and_for_unrelated_optimizers():
    net = _resnet_with_head()
    net.no_grad = False
    svf.prepare(net, ("layer2", "layer3", "layer4"), frozen_stages=("layer0", "layer1"), verbose=False)
    other = nn.Linear(3, 3)  # another model's optimizer steps first: it does not concern this one
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    _no_warning_step(other, other_opt, lambda: other(torch.randn(2, 3)).sum())
    opt = torch.optim.SGD(net.param_groups(0.1) + [{"params": [p for n, p in net.named_parameters()
                                                               if "vector_S" in n and p.requires_grad]}], lr=0.1)
    svf.keep_small_updates(opt, net)
    x, _ = _episode()
    start = {n: p.clone() for n, p in svf.singular_value_parameters(net).items()}
    _no_warning_step(net, opt, lambda: net(x).square().mean())
    moved = [n for n, p in svf.singular_value_parameters(net).items() if not torch.equal(p, start[n])]
    assert len(moved) == 16 and all(n.startswith(("layer2", "layer3", "layer4")) for n in moved)


# --------------------------------------------------------------------------- 3. frozen BatchNorm however it is called
def test_frozen_batchnorm_stays_frozen_through_module_call_direct_forward_and_train_toggles():
    torch.manual_seed(0)
    net = TinyResNet()
    keys = set(net.state_dict())
    svf.freeze_batchnorm(net)
    before = _bn_stats(net)
    x = torch.randn(2, 3, 32, 32) + 2
    net.train()
    extract_feats_directly(net, x)           # direct .forward (skips hooks): HSNet, DCAMA
    net.layer2[0].bn1(torch.randn(2, 8, 4, 4) + 5)  # module call
    net.eval().train()                        # train() toggled
    net.bn1.training = True                   # even set by hand
    net.bn1.forward(torch.randn(2, 32, 4, 4) + 5)
    after = _bn_stats(net)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert set(net.state_dict()) == keys and isinstance(net.bn1, svf.FrozenBatchNorm2d)


def test_frozen_batchnorm_composes_with_fold_pickles_and_copies():
    torch.manual_seed(0)
    ref = svf.resolver(TinyResNet()).eval()
    net = svf.freeze_batchnorm(copy.deepcopy(ref))
    pairs = svf.fold_batchnorm(net)
    assert ("layer2.0.conv1", "layer2.0.bn1") in pairs and isinstance(net.layer2[0].bn1, svf.FrozenBatchNorm2d)
    assert set(net.state_dict()) == set(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = extract_feats_directly(ref, x)[-1]
        net.train()
        got = extract_feats_directly(net, x)[-1]  # folded and frozen, called directly, in train mode
        assert _rel(got, want) < 1e-5
        buffer = io.BytesIO()
        torch.save(net, buffer)
        buffer.seek(0)
        for other in (copy.deepcopy(net), torch.load(buffer, weights_only=False), svf.merge(net)):
            other.train()
            assert _rel(extract_feats_directly(other, x)[-1], want) < 1e-5
    svf.unfold_batchnorm(net)
    assert type(net.layer2[0].bn1) is svf.FrozenBatchNorm2d


# --------------------------------------------------------------------------- 4. released checkpoints
def _released_layer(sd, prefix, w, g):
    """The released code's SVD of ``w``: ranks rounded down to a multiple of 4, S then trained a little."""
    out_c = w.shape[0]
    r = (min(out_c, w[0].numel()) // 4) * 4
    u, s, vh = torch.linalg.svd(w.reshape(out_c, -1), full_matrices=False)
    sd[prefix + "conv_U.weight"] = u[:, :r].reshape(out_c, r, 1, 1).contiguous()
    sd[prefix + "conv_V.weight"] = vh[:r].reshape((r,) + tuple(w.shape[1:])).contiguous()
    sd[prefix + "vector_S"] = (s[:r] * (1 + 0.1 * torch.randn(r, generator=g))).reshape(1, r, 1, 1)


def _released_checkpoint(model, g):
    """A released-format state dict for ``model`` (FewShotLayers, layer0..4 resolved): SVD layers truncated."""
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, svf.SVDLayer):
            _released_layer(sd, name + ".", torch.randn(m.to_plain().weight.shape, generator=g), g)
    for k, v in model.state_dict().items():
        if not any(p in k for p in ("conv_U", "conv_V", "vector_S")):
            sd[k] = v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
    return sd


def _released_forward(sd, model, x):
    """What the released model computes: every SVD layer as conv_U(conv_V(x) * S), from the file's tensors."""
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, svf.SVDLayer):
            V = m.conv_V
            seq = nn.Sequential(nn.Conv2d(V.in_channels, sd[name + ".vector_S"].shape[1], V.kernel_size, V.stride,
                                          V.padding, bias=False), _Scale(sd[name + ".vector_S"]),
                                nn.Conv2d(sd[name + ".vector_S"].shape[1], m.out_channels, 1, bias=False))
            seq[0].weight.data.copy_(sd[name + ".conv_V.weight"])
            seq[2].weight.data.copy_(sd[name + ".conv_U.weight"])
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, seq)
    ref.load_state_dict({k: v for k, v in sd.items() if not any(p in k for p in ("conv_U", "conv_V", "vector_S"))},
                        strict=False)
    with torch.no_grad():
        return ref.eval()(x)


class _Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s


def test_load_released_state_dict_folds_the_truncated_layers_exactly():
    torch.manual_seed(0)
    model = FewShotLayers(no_grad=False)
    for stage in ("layer0", "layer1", "layer2", "layer3", "layer4"):  # the released code's own lines
        setattr(model, stage, svf.resolver(getattr(model, stage), global_low_rank_ratio=1.0, skip_1x1=False,
                                           skip_3x3=False))
    g = torch.Generator().manual_seed(1)
    sd = _released_checkpoint(model, g)
    assert sd["layer0.0.vector_S"].shape == (1, 24, 1, 1) and model.layer0[0].rank == 27  # the stem: 24 of 27
    with pytest.raises(RuntimeError, match="size mismatch"):
        copy.deepcopy(model).load_state_dict(sd)  # what the plain load does
    state, truncated = svf.convert_released_state_dict(model, sd)
    assert truncated["layer0.0"] == (24, 27) and set(state) == set(model.state_dict())
    svf.load_released_state_dict(model, sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _rel(model.eval()(x), _released_forward(sd, model, x)) < 1e-5
    plain = svf.merge(model)  # a merged (plain) model takes the folded weights too
    fresh = copy.deepcopy(plain)
    svf.load_released_state_dict(fresh, sd)
    with torch.no_grad():
        assert _rel(fresh.eval()(x), plain(x)) < 1e-5
    with pytest.raises(ValueError, match="'module.' prefix"):
        svf.load_released_state_dict(model, {"module." + k: v for k, v in sd.items()})


# --------------------------------------------------------------------------- 5. the recipes of docs/porting.md
def _s_names(model, prefix, stages):
    return {f"{prefix}{n}" for n, p in model.named_parameters() if "vector_S" in n and n.startswith(stages)}


def test_recipe_hsnet_and_dcama_resnet():
    torch.manual_seed(0)
    original = Hypercorr()  # as published: the backbone under torch.no_grad(), its BatchNorms called directly
    q, s = _episode()
    tuned = ("layer2", "layer3", "layer4")
    net = copy.deepcopy(original)  # the svf line alone: the first step says that S does not train
    svf.prepare(net.backbone, tuned, verbose=False)
    opt = torch.optim.Adam([{"params": net.parameters(), "lr": 1e-3}])
    with pytest.warns(NOT_TRAINING, match="16 of 16 SVD layers .* got no gradient"):
        net(q, s).square().mean().backward()
        opt.step()
    net = copy.deepcopy(original)  # the recipe: svf.prepare + the no_grad removed
    net.no_grad = False
    svf.prepare(net.backbone, tuned, verbose=False)
    opt = torch.optim.Adam([{"params": net.parameters(), "lr": 1e-3}])  # their optimizer, unchanged
    stats = _bn_stats(net.backbone)
    net.train()  # not even train_mode(): the BatchNorms stay frozen
    _no_warning_step(net, opt, lambda: net(q, s).square().mean())
    assert _grads(net) == {n for n, p in net.named_parameters() if "vector_S" in n and p.requires_grad} | {
        "head.weight", "head.bias"}
    assert _grads(net) >= {"backbone.layer2.0.conv1.vector_S", "backbone.layer4.0.downsample.0.vector_S"}
    assert all(torch.equal(v, _bn_stats(net.backbone)[k]) for k, v in stats.items())
    _check_merge(net, copy.deepcopy(original), lambda m: m(q, s))


def test_recipe_pfenet_and_bam():
    torch.manual_seed(0)
    original = FewShotLayers()  # layer0..4 on the model, under torch.no_grad(); SGD over the heads' groups
    x, _ = _episode()
    net = copy.deepcopy(original)
    svf.prepare(net, ("layer2", "layer3", "layer4"), frozen_stages=("layer0", "layer1"), verbose=False)
    opt = torch.optim.SGD(net.param_groups(0.01), lr=0.01, momentum=0.9)
    with pytest.warns(NOT_TRAINING, match="got no gradient.*in none of the optimizer's parameter groups"):
        net(x).square().mean().backward()
        opt.step()
    net = copy.deepcopy(original)  # the recipe: no_grad removed, S added as a group of its own
    net.no_grad = False
    svf.prepare(net, ("layer2", "layer3", "layer4"), frozen_stages=("layer0", "layer1"), verbose=False)
    s_group = {"params": [p for n, p in net.named_parameters() if "vector_S" in n and p.requires_grad]}
    opt = torch.optim.SGD(net.param_groups(0.01) + [s_group], lr=0.01, momentum=0.9)
    stats = _bn_stats(net)
    net.train()
    _no_warning_step(net, opt, lambda: net(x).square().mean())
    heads = {n for n, _ in net.named_parameters() if n.startswith(("down_query", "cls"))}
    assert _grads(net) == _s_names(net, "", tuned_prefixes()) | heads
    assert all(torch.equal(v, _bn_stats(net)[k]) for k, v in stats.items())
    _check_merge(net, copy.deepcopy(original), lambda m: m(x))


def tuned_prefixes():
    return ("layer2", "layer3", "layer4")


@pytest.mark.parametrize("layout", ["dcama", "torchvision"])
def test_recipe_swin_stages_and_cached_attention(layout):
    torch.manual_seed(0)
    q, s = _episode(size=32)
    if layout == "dcama":  # DCAMA's Swin: under no_grad, features .detach()ed, attention maps cached
        original = DcamaSwin()
        net = copy.deepcopy(original)
        tuned = ("layers.0.downsample", "layers.1", "layers.2", "layers.3")  # the paper's layer2-4
        svf.prepare(net.feature_extractor, tuned, verbose=False)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        with pytest.warns(NOT_TRAINING, match="got no gradient"):
            net(q, s).square().mean().backward()
            opt.step()
        net = copy.deepcopy(original)
        net.no_grad = False
        for layer in net.feature_extractor.layers:
            layer.detach = False
        backbone, prefix, run = net.feature_extractor, "feature_extractor.", lambda m: m(q, s)
    else:  # torchvision's swin_t naming: features.0 patch embedding, .1 stage 1, .2/.4/.6 merging, .3/.5/.7 stages
        def stage(c):
            return nn.Sequential(SwinBlock(c))
        original = nn.Sequential()
        original.features = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Flatten(2)), stage(8),
                                          nn.Linear(8, 16), stage(16), nn.Linear(16, 32), stage(32),
                                          nn.Linear(32, 64), stage(64))
        original.head = nn.Linear(64, 2)
        net = copy.deepcopy(original)
        tuned = ("features.2", "features.3", "features.4", "features.5", "features.6", "features.7")
        backbone, prefix = net.features, "features."
        tuned = tuple(t[len("features."):] for t in tuned)

        def run(m):
            f = m.features[0](q).transpose(1, 2)
            for layer in list(m.features)[1:]:
                f = layer(f)
            return m.head(f.mean(1))
    svf.prepare(backbone, tuned, verbose=False)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01)
    _no_warning_step(net, opt, lambda: run(net).square().mean())
    s_names = {prefix + n for n, p in backbone.named_parameters() if "vector_S" in n}
    assert s_names and all(n.startswith(tuple(prefix + t for t in tuned)) for n in s_names)
    heads = {n for n, _ in net.named_parameters() if not n.startswith(prefix)}
    assert _grads(net) == s_names | heads
    if layout == "dcama":  # right after the step the attention maps hold autograd history: merge copies them
        run(net).square().mean().backward()
        assert net.blocks[0].attn.grad_fn is not None
    _check_merge(net, copy.deepcopy(original), run)


class ReleasedSVFModel(FewShotLayers):
    """The released SVF code (zechao-li/SVF-few-shot-segmentation): resolves layer0..4 with its own call, freezes
    by ``'vector_S' in name``, its optimizer groups S with the heads; the backbone runs with gradients."""

    def __init__(self):
        super().__init__(no_grad=False)
        self.layer0 = svf.resolver(self.layer0, global_low_rank_ratio=1.0, skip_1x1=False, skip_3x3=False)
        self.layer1 = svf.resolver(self.layer1, global_low_rank_ratio=1.0, skip_1x1=False, skip_3x3=False)
        self.layer2 = svf.resolver(self.layer2, global_low_rank_ratio=1.0, skip_1x1=False, skip_3x3=False)
        self.layer3 = svf.resolver(self.layer3, global_low_rank_ratio=1.0, skip_1x1=False, skip_3x3=False)
        self.layer4 = svf.resolver(self.layer4, global_low_rank_ratio=1.0, skip_1x1=False, skip_3x3=False)

    def svf_modules(self):
        for stage in (self.layer0, self.layer1):
            for p in stage.parameters():
                p.requires_grad = False
        for stage in (self.layer2, self.layer3, self.layer4):
            for name, p in stage.named_parameters():
                p.requires_grad = "vector_S" in name


def test_recipe_released_svf_code_with_our_folder():
    torch.manual_seed(0)
    net = ReleasedSVFModel()
    net.svf_modules()
    for m in (net.layer0, net.layer1, net.layer2, net.layer3, net.layer4):  # their BN handling; here ours
        svf.freeze_batchnorm(m)
    groups = net.param_groups(0.01) + [{"params": [p for n, p in net.named_parameters() if "vector_S" in n
                                                   and p.requires_grad], "lr": 0.01}]
    opt = torch.optim.SGD(groups, lr=0.01)
    x, _ = _episode()
    opt.zero_grad()
    net.train()(x).square().mean().backward()
    assert "16 SVD layers" in svf.check_singular_values_train(net, opt)  # the explicit check, once
    opt.step()
    heads = {n for n, _ in net.named_parameters() if n.startswith(("down_query", "cls"))}
    assert _grads(net) == _s_names(net, "", tuned_prefixes()) | heads
    merged = svf.merge(net)
    assert set(merged.state_dict()) == set(FewShotLayers().state_dict())
    sd = _released_checkpoint(net, torch.Generator().manual_seed(3))  # the authors' checkpoint, test.py's load
    fresh = ReleasedSVFModel()
    svf.load_released_state_dict(fresh, sd)
    with torch.no_grad():
        assert _rel(fresh.eval()(x), _released_forward(sd, fresh, x)) < 1e-5


def test_svf_folder_works_as_a_subpackage_of_their_model_folder(tmp_path):
    """The released code keeps its svf next to its models: our folder copied to model/svf/ imports as model.svf."""
    import os
    import shutil
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "__init__.py").write_text("")
    shutil.copytree(os.path.join(repo, "svf"), tmp_path / "model" / "svf",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("from model import svf; import torch; m = svf.resolver(torch.nn.Conv2d(3, 8, 3)); "
            "svf.prepare(torch.nn.Sequential(m), ['0'], verbose=False); print(type(m).__module__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "model.svf.layers"


@pytest.mark.parametrize("arch", ["baseline"])
def test_this_projects_training_path_passes_the_check_silently(arch):
    """train.py's path: build_model (apply_paper_freezing, layer0/1's S frozen, BatchNorm folded), its SGD groups,
    keep_small_updates, one step: no SingularValuesNotTrainingWarning."""
    import model as models
    from engine.optim import build_sgd

    from conftest import random_episode, tiny_cfg
    cfg = tiny_cfg(arch=arch, svf=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-init warnings of the tiny config
        net = models.build_model(cfg)
    opt = build_sgd(models.param_groups(net, cfg), 0.01, 0.9, 1e-4)
    svf.keep_small_updates(opt, net)
    q, s, sm, qm = random_episode()
    extra = {"class_id": torch.full((2,), 6)} if arch == "bam" else {}
    _no_warning_step(net, opt, lambda: net(q, s, sm, qm, **extra)[1])
    assert "SVD layers" in svf.check_singular_values_train(net.backbone, opt)
