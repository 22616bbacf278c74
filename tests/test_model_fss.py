"""Few-shot models and PSPNet: shapes (1- and 5-shot), SVF on/off trainable sets, SVF exactness, parameter
groups, BAM's training-time inputs, and a short CPU training run that lowers each model's loss."""
import copy

import pytest
import torch
import torch.nn.functional as F

import svf
from model import build_model, param_groups
from model.pspnet import PSPNet
from model.layers import capped_bin, masked_average_pooling, prior_mask
from conftest import random_episode, tiny_cfg

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")


def _build(seed=0, **cfg):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**cfg))


def test_random_episode_shapes_and_values():
    """The shared helper (tests/conftest.py) that the model tests feed their models with."""
    q, s, sm, qm = random_episode(batch=3, shot=2, size=17)
    assert q.shape == (3, 3, 17, 17) and s.shape == (3, 2, 3, 17, 17)
    assert sm.shape == (3, 2, 17, 17) and qm.shape == (3, 17, 17)
    assert set(qm.unique().tolist()) == {0, 1, 255} and set(sm.unique().tolist()) == {0, 1, 255}


@pytest.mark.parametrize("arch", ["baseline", "pfenet", "bam"])
@pytest.mark.parametrize("shot", [1, 5])
def test_fss_output_shapes(arch, shot):
    model = _build(arch=arch, shot=shot)
    q, s, sm, qm = random_episode(batch=2, shot=shot, size=33)
    model.eval()
    with torch.no_grad():
        logits = model(q, s, sm)
    assert logits.shape == (2, 2, 33, 33)
    model.train()
    kwargs = {"class_id": torch.tensor([6, 7])} if arch == "bam" else {}
    logits, loss = model(q, s, sm, qm, **kwargs)
    assert logits.shape == (2, 2, 33, 33) and loss.dim() == 0 and torch.isfinite(loss)


def test_vgg_backbone_and_pspnet_shapes():
    model = _build(arch="baseline", backbone="vgg16_bn").eval()
    q, s, sm, _ = random_episode(batch=1, shot=1, size=49)
    with torch.no_grad():
        assert model(q, s, sm).shape == (1, 2, 49, 49)
    psp = _build(arch="pspnet").eval()
    with torch.no_grad():
        assert psp(q).shape == (1, 16, 49, 49)
    psp.train()  # batch >= 2: PPM's 1x1 bin has BatchNorm over the batch, as in PSPNet
    logits, loss = psp(q.expand(2, -1, -1, -1), torch.randint(0, 16, (2, 49, 49)))
    assert logits.shape == (2, 16, 49, 49) and torch.isfinite(loss)


def test_svf_off_backbone_frozen_without_grads_and_bn_in_eval():
    model = _build(arch="pfenet", svf=False)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model.train()
    assert not any(m.training for m in model.backbone.modules()) and model.down_query.training
    running = model.backbone.layer3[0].bn1.running_mean.clone()
    q, s, sm, qm = random_episode()
    _, loss = model(q, s, sm, qm)
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert torch.equal(running, model.backbone.layer3[0].bn1.running_mean)  # statistics untouched
    assert model.down_query[0].weight.grad is not None and model.cls[-1].weight.grad.abs().sum() > 0
    groups = param_groups(model, tiny_cfg(svf=False))
    assert [g["name"] for g in groups] == ["heads"]
    assert sum(p.numel() for p in groups[0]["params"]) == svf.count_parameters(model)[0]


@pytest.fixture(scope="module")
def svf_pair(tmp_path_factory):
    """(plain, svf) baseline models with the same backbone weights (realistic BN statistics) and heads."""
    torch.manual_seed(1)
    weights = build_model(tiny_cfg(arch="pspnet")).backbone
    with torch.no_grad():  # not the identity statistics of a fresh init
        for m in weights.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("svf") / "backbone.pth"
    torch.save(weights.state_dict(), path)
    plain = _build(seed=3, arch="baseline", shot=2, pretrained=str(path), svf=False)
    tuned = _build(seed=3, arch="baseline", shot=2, pretrained=str(path), svf=True)
    return plain, tuned


def test_svf_model_equals_plain_model_with_same_weights(svf_pair):
    plain, tuned = (copy.deepcopy(m).eval() for m in svf_pair)
    assert any(isinstance(m, svf.SVD_Conv2d) for m in tuned.backbone.modules())
    q, s, sm, _ = random_episode(batch=2, shot=2)
    with torch.no_grad():
        a, b = plain(q, s, sm), tuned(q, s, sm)
        fa, fb = plain.backbone(q), tuned.backbone(q)
    for x, y in zip(fa, fb):  # every stage, before the heads
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-4 * x.abs().max().item())
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item()), (a - b).abs().max()


def test_svf_on_trainable_set_grads_and_param_groups(svf_pair):
    cfg = tiny_cfg(arch="baseline", svf=True, svf_lr_mult=0.1, weight_decay=1e-4)
    model = copy.deepcopy(svf_pair[1])
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("vector_S") and n.split(".")[0] in ("layer2", "layer3", "layer4")
                             for n in trainable)
    model.train()
    assert not any(m.training for m in model.backbone.modules())
    q, s, sm, qm = random_episode(shot=2)
    _, loss = model(q, s, sm, qm)
    loss.backward()
    with_grad = {n for n, p in model.backbone.named_parameters() if p.grad is not None}
    assert with_grad == trainable and all(model.backbone.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert groups["singular_values"]["lr_mult"] == 0.1 and groups["singular_values"]["weight_decay"] == 0.0
    assert groups["heads"]["lr_mult"] == 1.0 and groups["heads"]["weight_decay"] == 1e-4
    assert sum(p.numel() for p in groups["singular_values"]["params"]) == sum(
        model.backbone.get_parameter(n).numel() for n in trainable)
    cfg.svf_weight_decay = True
    assert {g["name"]: g for g in param_groups(model, cfg)}["singular_values"]["weight_decay"] == 1e-4


def test_pspnet_trains_its_backbone_unless_svf():
    cfg = tiny_cfg(arch="pspnet", svf=False, backbone_lr_mult=0.1)
    model = _build(arch="pspnet", svf=False).train()
    assert all(p.requires_grad for p in model.backbone.parameters()) and model.backbone.layer1[0].bn1.training
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert groups["backbone"]["lr_mult"] == 0.1 and groups["heads"]["lr_mult"] == 1.0


def test_pyramid_bins_capped_by_feature_size():
    assert capped_bin(60, (60, 60)) == (60, 60) and capped_bin(8, (60, 60)) == (8, 8)
    assert capped_bin(60, (5, 7)) == (5, 7) and capped_bin(15, (5, 20)) == (5, 15)


def test_bam_training_needs_the_episode_class_and_removes_it_from_the_base_map():
    model = _build(arch="bam").train()
    q, s, sm, qm = random_episode()
    with pytest.raises(ValueError, match="class_id"):
        model(q, s, sm, qm)
    with pytest.raises(ValueError, match="not trained on"):
        model(q, s, sm, qm, class_id=[1, 6])  # class 1 is novel in PASCAL fold 0
    with torch.no_grad():
        model.cls_merge.weight.copy_(torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1))  # background = base map
        model.base_learner.cls[-1].weight.zero_()
        model.base_learner.cls[-1].bias.copy_(torch.tensor([-50.0] + [-50.0] * 14 + [50.0]))  # all "class 20"
    torch.manual_seed(0)
    logits, _ = model(q, s, sm, qm, class_id=[20, 6])  # label 15 of the base learner = global class 20
    # episode class 20: its probability is removed, background ~ 0; episode class 6: background ~ 1
    assert logits[0, 0].abs().max() < 1e-3 and (logits[1, 0] - 1).abs().max() < 1e-3


def test_bam_svf_base_learner_reads_the_original_backbone_without_gradients():
    """With SVF on, BAM's base learner reads the stage-1 backbone's layer4 (layer2-4 run again with the original
    weights, layer0/1 output shared): a large step on the singular values leaves its output unchanged, and no
    gradient reaches S through it, while the meta-learner's path does move."""
    model = _build(arch="bam", svf=True).train()
    groups = param_groups(model, tiny_cfg(svf=True))
    s_params = next(g["params"] for g in groups if g["name"] == "singular_values")
    q, s, sm, qm = random_episode(seed=3)
    captured = []
    model.base_learner.register_forward_hook(lambda m, i, o: captured.append((i[0], o)))

    def eval_outputs():
        model.eval()
        with torch.no_grad():
            meta = model.backbone(q)[4]
            model(q, s, sm)
        model.train()
        return meta, captured[-1][1]

    meta_before, base_before = eval_outputs()
    _, loss = model(q, s, sm, qm, class_id=[6, 7])
    feat, base_out = captured[-1]
    assert not feat.requires_grad and not base_out.requires_grad  # nothing flows back into S this way
    loss.backward()
    assert all(p.grad is not None for p in s_params) and sum(p.grad.abs().sum() for p in s_params) > 0
    torch.optim.SGD(s_params, lr=100.0).step()
    meta_after, base_after = eval_outputs()
    assert (meta_after - meta_before).abs().max() > 1e-2 * meta_before.abs().max()  # S moved the SVF backbone
    assert torch.allclose(base_after, base_before, rtol=1e-6, atol=1e-6)


def _short_run(model, batch_fn, steps, base_lr):
    arch = "pspnet" if isinstance(model, PSPNet) else "baseline"  # the group rules follow the model's method
    groups = param_groups(model, tiny_cfg(arch=arch, svf=getattr(model, "_svf", False)))
    opt = torch.optim.SGD([{"params": g["params"], "lr": base_lr * g["lr_mult"], "weight_decay": g["weight_decay"]}
                           for g in groups], momentum=0.9)
    inputs, target = batch_fn()

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(*inputs), target, ignore_index=255).item()

    before = eval_loss()
    model.train()
    for _ in range(steps):
        _, loss = batch_fn(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, eval_loss()


@pytest.mark.parametrize("arch", ["baseline", "pfenet", "bam", "baseline+svf"])
def test_short_training_run_lowers_the_loss(arch, svf_pair):
    # eval-mode loss on a fixed batch before/after 15 SGD steps with the model's own parameter groups
    model = copy.deepcopy(svf_pair[1]) if arch == "baseline+svf" else _build(arch=arch, svf=False)
    model._svf = arch == "baseline+svf"
    shot = 2 if arch == "baseline+svf" else 1
    q, s, sm, qm = random_episode(batch=2, shot=shot, size=33, seed=4)
    extra = {"class_id": torch.tensor([6, 9])} if arch == "bam" else {}

    def batch_fn(m=None):
        return ((q, s, sm), qm) if m is None else m(q, s, sm, qm, **extra)
    before, after = _short_run(model, batch_fn, steps=15, base_lr=0.05)
    assert after < 0.85 * before, (before, after)


def test_short_training_run_lowers_the_pspnet_loss():
    model = _build(arch="pspnet", svf=False)
    img = torch.randn(2, 3, 33, 33)
    label = torch.zeros(2, 33, 33, dtype=torch.long)
    label[:, 8:24, 8:24] = 3
    label[1, :, :10] = 7
    img[:, 0] += label.float() / 4  # the classes are visible in the image
    label[:, 0] = 255

    def batch_fn(m=None):
        return ((img,), label) if m is None else m(img, label)
    before, after = _short_run(model, batch_fn, steps=15, base_lr=0.01)
    assert after < 0.85 * before, (before, after)


def test_prototype_and_prior_mask_on_hand_cases():
    feat = torch.arange(8.0).reshape(1, 2, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    proto = masked_average_pooling(feat, mask)  # channel 0: (0 + 3) / (2 + 5e-4), channel 1: (4 + 7) / ...
    assert torch.allclose(proto.flatten(), torch.tensor([3.0, 11.0]) / 2.0005)
    support = torch.zeros(1, 2, 2, 2)
    support[0, :, 0, 0] = torch.tensor([1.0, 0.0])    # the only foreground support vector
    support[0, :, 1, 1] = torch.tensor([0.0, 1.0])    # background: masked out, must not count
    query = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, -1.0]]).reshape(1, 2, 2, 2)
    fg = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    prior = prior_mask(query, support, fg).flatten()
    # cosines with (1, 0): 1, 0, 1/sqrt(2), 0 -> min-max normalised
    assert torch.allclose(prior, torch.tensor([1.0, 0.0, 2 ** -0.5, 0.0]), atol=1e-5)
