"""One training step as the released code takes it, against ours, from the same weights and batch.

The released loop, re-stated from reading the SVF code's train_BAM.py / train_aspp.py / train_pfenet.py and the
models' get_optim /
svf_modules (never copied): ``model.train()`` then ``model.apply(fix_bn)`` (every module whose class name contains
"BatchNorm" back to eval mode, everything else, Dropout included, in training mode); SGD(momentum, weight_decay on
every group) over the groups of ``get_optim``: layer2, layer3, layer4 of the backbone at LR/10 (only their singular
values have gradients), then one group per head module at LR (BAM: down_query, down_supp, init_merge, ASPP_meta,
res1_meta, res2_meta, cls_meta, gram_merge, cls_merge; the baseline the same without down_query, never trained
there: a documented bug we fix, so down_query is left out of the comparison; PFENet: down_query, down_supp,
init_merge, alpha_conv, beta_conv, inner_cls, res1, res2, cls); the loss
``main + aux_weight1 * aux1 + aux_weight2 * aux2``, aux2 being the frozen base learner's cross-entropy against the
query's base-class labels (no gradient). PFENet's loss (its model/pfenet.py and train_pfenet.py) is
``main + aux_weight1 * aux1`` with aux1 the mean over the pyramid scales of the cross-entropy of each inner
classifier's output upsampled to the input size; here it is recomputed from the classifiers' outputs (forward hooks)
rather than taken from the model, and that recomputed loss is what the released step backpropagates. With SVF
the released PFENet creates a fresh CosineAnnealingLR before every step, which leaves the first step's LR at the
base LR: a constant LR here. The forward itself is checked against a re-statement of the released
forward in tests/test_model_released.py; here the same forward runs under the released module modes and optimizer.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import svf
from conftest import random_episode, tiny_cfg
from engine.optim import build_sgd, scheduled_lr, set_lr
from model import build_model, param_groups

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")

BASE_LR, MOMENTUM, WEIGHT_DECAY = 0.015, 0.9, 1e-4


def fix_bn(m):
    if m.__class__.__name__.find("BatchNorm") != -1:
        m.eval()


def released_optimizer(model, arch):
    if arch == "pfenet":
        heads = ["down_query", "down_supp", "init_merge", "alpha_conv", "beta_conv", "inner_cls", "res1", "res2",
                 "cls"]
    else:
        heads = (["down_query"] if arch == "bam" else []) + ["down_supp", "meta.init_merge", "meta.aspp",
                                                             "meta.res1", "meta.res2", "meta.cls"]
    if arch == "bam":
        heads += ["gram_merge", "cls_merge"]
    groups = [{"params": list(model.backbone.get_submodule(s).parameters()), "lr": BASE_LR / 10}
              for s in ("layer2", "layer3", "layer4")]
    groups += [{"params": list(model.get_submodule(h).parameters())} for h in heads]
    return torch.optim.SGD(groups, lr=BASE_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def batch(arch):
    q, s, sm, qm = random_episode(batch=2, shot=1, size=33, seed=3)
    extra = {}
    if arch == "bam":
        g = torch.Generator().manual_seed(4)
        base_label = torch.randint(0, 16, (2, 33, 33), generator=g)
        base_label[:, :2] = 255
        extra = {"class_id": torch.tensor([6, 11]), "base_label": base_label}
    return (q, s, sm, qm), extra


def pfenet_released_loss(captured, target, aux_weight1=1.0):
    """PFENet's training loss as its released code computes it, from the final and the inner classifiers'
    outputs: (main + aux_weight1 * aux1, main, aux1), aux1 the mean over scales."""
    size = target.shape[-2:]
    ce = lambda out: F.cross_entropy(F.interpolate(out, size=size, mode="bilinear", align_corners=True), target,
                                     ignore_index=255)
    main = ce(captured["cls"])
    aux1 = sum(ce(out) for out in captured["inner"]) / len(captured["inner"])
    return main + aux_weight1 * aux1, main, aux1


def released_step(model, arch, inputs, extra, seed):
    """(logged loss, the recomputed terms) of one released step on ``model`` (changed in place)."""
    torch.nn.Module.train(model, True)
    model.apply(fix_bn)
    optimizer = released_optimizer(model, arch)
    captured = {"inner": []}
    if arch == "bam":
        model.base_learner.register_forward_hook(lambda m, i, o: captured.setdefault("base_out", o.detach()))
    if arch == "pfenet":
        model.cls.register_forward_hook(lambda m, i, o: captured.setdefault("cls", o))
        for inner in model.inner_cls:
            inner.register_forward_hook(lambda m, i, o: captured["inner"].append(o))
    torch.manual_seed(seed)
    _, loss = model(*inputs, **extra)  # main + aux_weight1 * aux1 (the terms with a gradient)
    if arch == "pfenet":  # the released loss, recomputed from the classifiers' outputs
        loss, main, aux1 = pfenet_released_loss(captured, inputs[3])
        logged = float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return logged, {"main": float(main.detach()), "aux1": float(aux1.detach())}
    aux2 = None
    if arch == "bam":  # aux_weight2 * CE(base learner output at the input size, base-class labels), no gradient
        out = F.interpolate(captured["base_out"], size=inputs[0].shape[-2:], mode="bilinear", align_corners=True)
        aux2 = F.cross_entropy(out, extra["base_label"], ignore_index=255)
    logged = loss.detach() + (aux2 if aux2 is not None else 0.0)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(logged), aux2


def our_step(model, cfg, inputs, extra, seed):
    """One step as train.py takes it (its optimizer, LR schedule, S's small-update keeping)."""
    model.train()
    optimizer = build_sgd(param_groups(model, cfg), cfg.base_lr, cfg.momentum, cfg.weight_decay)
    svf.keep_small_updates(optimizer, model)
    set_lr(optimizer, scheduled_lr(cfg.lr_schedule, cfg.base_lr, 0, 100, cfg.power))
    torch.manual_seed(seed)
    _, loss = model(*inputs, **extra)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach()), {k: float(v) for k, v in model.loss_terms.items()}


@pytest.mark.parametrize("arch", ["bam", "baseline", "pfenet"])
def test_one_training_step_equals_the_released_step(arch):
    # PFENet: pooled sizes below the 5x5 features of a 33x33 input, so each scale pools (60..8 would all cap to 5)
    cfg = tiny_cfg(arch=arch, svf=True, base_lr=BASE_LR, svf_lr_mult=0.1, svf_weight_decay=True, head_lr_mult=1.0,
                   weight_decay=WEIGHT_DECAY, momentum=MOMENTUM, lr_schedule="constant", aux_loss_weight=1.0,
                   pyramid_bins=[4, 3, 2])
    torch.manual_seed(0)
    ours = build_model(cfg)
    released = copy.deepcopy(ours)
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    inputs, extra = batch(arch)
    logged, recomputed = released_step(released, arch, inputs, extra, seed=11)
    loss, terms = our_step(ours, cfg, inputs, extra, seed=11)
    # the module modes that change what a step computes: every Dropout and BatchNorm as the released loop sets it
    kinds = (torch.nn.Dropout, torch.nn.Dropout2d, torch.nn.BatchNorm2d)
    modes = [{n: m.training for n, m in model.named_modules() if isinstance(m, kinds)} for model in (ours, released)]
    assert modes[0] == modes[1] and any(modes[0].values()) and not all(modes[0].values())
    if arch == "pfenet":  # the released log's MainLoss, AuxLoss1 and Loss
        assert set(terms) == {"main", "aux1"} and abs(loss - logged) < 1e-4
        assert all(abs(terms[k] - recomputed[k]) < 1e-5 for k in terms)
    elif arch == "bam":
        assert set(terms) == {"main", "aux1", "aux2"} and abs(terms["aux2"] - float(recomputed)) < 1e-5
        assert abs(loss + terms["aux2"] - logged) < 1e-4  # the released log's loss = ours + aux2
        assert abs(terms["main"] + terms["aux1"] - loss) < 1e-5
    else:
        assert set(terms) == {"main"} and abs(loss - logged) < 1e-4
    moved = 0
    for name, value in ours.state_dict().items():
        if arch == "baseline" and name.startswith("down_query."):
            continue  # never trained by the released baseline (a fixed bug)
        assert (value - released.state_dict()[name]).abs().max() < 1e-4, name
        moved += int(not torch.equal(value, start[name]))
    assert moved > 10  # heads and singular values did move
    if arch == "pfenet":  # every released group moved: each scale's merge, enrichment and inner classifier
        for head in ("init_merge", "alpha_conv", "beta_conv", "inner_cls", "res1", "res2", "cls", "down_supp"):
            after = {k: v for k, v in ours.state_dict().items() if k.startswith(head + ".")}
            assert any(not torch.equal(v, start[k]) for k, v in after.items()), head
    # the base learner (BAM) never changes: weights and BatchNorm statistics; no BatchNorm statistic anywhere
    for name, value in ours.state_dict().items():
        if name.startswith(("base_learner.", "base_backbone.")) or name.endswith(("running_mean", "running_var")):
            assert torch.equal(value, start[name]), name


def test_bam_base_learner_dropout_in_training_only():
    """base_learner_dropout (default): the base learner's Dropout trains, its BatchNorm does not; eval turns the
    dropout off; false keeps the whole base learner in eval mode as before."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(arch="bam", svf=True))
    model.train()
    assert not model.base_backbone.training
    dropouts = [m for m in model.base_learner.modules() if isinstance(m, torch.nn.Dropout2d)]
    bns = [m for m in model.base_learner.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert dropouts and bns and all(m.training for m in dropouts) and not any(m.training for m in bns)
    assert not model.backbone.training
    feat = torch.randn(2, model.backbone.channels["layer4"], 5, 5)
    torch.manual_seed(1)
    a = model.base_learner(feat)
    b = model.base_learner(feat)
    assert (a - b).abs().max() > 1e-3  # noised in training
    model.eval()
    assert torch.equal(model.base_learner(feat), model.base_learner(feat))
    frozen = build_model(tiny_cfg(arch="bam", base_learner_dropout=False)).train()
    assert not any(m.training for m in frozen.base_learner.modules())


@pytest.mark.parametrize("arch", ["bam"])
def test_folded_base_learner_batchnorm_stays_exact_in_training_mode(arch):
    """svf.fold_batchnorm folds the base learner's frozen BatchNorm also while the base learner is in training
    mode (its BatchNorm in eval): same loss and same logits as the unfolded model, same dropout draws."""
    torch.manual_seed(0)
    folded = build_model(tiny_cfg(arch=arch, fold_batchnorm=True))
    torch.manual_seed(0)
    plain = build_model(tiny_cfg(arch=arch, fold_batchnorm=False))
    plain.load_state_dict(folded.state_dict())
    from svf.fold import has_folds
    assert has_folds(folded) and not has_folds(plain)
    inputs, extra = batch(arch)
    out = []
    for model in (folded, plain):
        model.train()
        torch.manual_seed(5)
        logits, loss = model(*inputs, **extra)
        out.append((logits, loss, model.loss_terms["aux2"]))
    assert (out[0][0] - out[1][0]).abs().max() < 1e-4
    assert abs(float((out[0][1] - out[1][1]).detach())) < 1e-5 and abs(float((out[0][2] - out[1][2]).detach())) < 1e-5
