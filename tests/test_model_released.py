"""Checkpoints of the released SVF / BAM / PFENet code: each layout, built here from the released key names and
shapes (random values), converts and loads strictly; a truncated SVD factorisation folds exactly; an unmapped
key, a wrong arch and a wrong svf setting are clear errors; and the converted models compute what the released
forward computes, checked against a short functional re-statement of that forward written here from the
released model files (model/BAM.py, model/aspp.py, model/pfenet.py of the SVF code; BAM's PSPNet.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

import svf
from model import build_model
from model.build import load_base_learner
from model.released import _resolve_folded, convert_released, detect_format, load_released
from conftest import as_bam_release, tiny_cfg

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")

RESNET50 = ((1, 64, 3, 1), (2, 128, 4, 2), (3, 256, 6, 2), (4, 512, 3, 2))  # stage, planes, blocks, stride
STEM = ((0, 3, 64, 2), (3, 64, 64, 1), (6, 64, 128, 1))  # released layer0 = Sequential: conv at 0, 3, 6; BN at +1


# --------------------------------------------------------------------------- released layouts, random values
def _conv(sd, prefix, out_c, in_c, k, svf_on, g, bias=False):
    w = torch.randn(out_c, in_c, k, k, generator=g) * math.sqrt(2.0 / (in_c * k * k))
    b = torch.randn(out_c, generator=g) * 0.1 if bias else None
    if svf_on:  # the SVF code: torch.svd, rank rounded down to a multiple of 4, S then trained
        r = (min(out_c, in_c * k * k) // 4) * 4
        u, s, vh = torch.linalg.svd(w.reshape(out_c, -1), full_matrices=False)
        sd[prefix + "conv_U.weight"] = u[:, :r].reshape(out_c, r, 1, 1).contiguous()
        sd[prefix + "conv_V.weight"] = vh[:r].reshape(r, in_c, k, k).contiguous()
        sd[prefix + "vector_S"] = (s[:r] * (1 + 0.2 * torch.randn(r, generator=g))).reshape(1, r, 1, 1)
        if bias:
            sd[prefix + "conv_U.bias"] = b
    else:
        sd[prefix + "weight"] = w
        if bias:
            sd[prefix + "bias"] = b


def _bn(sd, prefix, c, g):
    sd[prefix + "weight"] = 1 + 0.1 * torch.randn(c, generator=g)
    sd[prefix + "bias"] = 0.1 * torch.randn(c, generator=g)
    sd[prefix + "running_mean"] = 0.1 * torch.randn(c, generator=g)
    sd[prefix + "running_var"] = 1 + 0.1 * torch.rand(c, generator=g)
    sd[prefix + "num_batches_tracked"] = torch.tensor(100)


def _resnet50(sd, tag, svf_on, g):
    """Keys of a deep-stem ResNet-50 as the released models hold it: ``layer0.<i>`` (nn.Sequential of the stem),
    ``layer1..4.<block>.conv1/bn1/.../downsample.0/1``; ``tag`` is '' or 'p' (BAM+SVF's copy)."""
    for i, cin, cout, _ in STEM:
        _conv(sd, f"layer0{tag}.{i}.", cout, cin, 3, svf_on, g)
        _bn(sd, f"layer0{tag}.{i + 1}.", cout, g)
    inplanes = 128
    for stage, planes, blocks, _ in RESNET50:
        for b in range(blocks):
            p = f"layer{stage}{tag}.{b}."
            _conv(sd, p + "conv1.", planes, inplanes, 1, svf_on, g)
            _bn(sd, p + "bn1.", planes, g)
            _conv(sd, p + "conv2.", planes, planes, 3, svf_on, g)
            _bn(sd, p + "bn2.", planes, g)
            _conv(sd, p + "conv3.", planes * 4, planes, 1, svf_on, g)
            _bn(sd, p + "bn3.", planes * 4, g)
            if b == 0:
                _conv(sd, p + "downsample.0.", planes * 4, inplanes, 1, svf_on, g)
                _bn(sd, p + "downsample.1.", planes * 4, g)
            inplanes = planes * 4


def _pspnet_head(sd, prefix_ppm, prefix_cls, classes, g):
    for i in range(4):
        _conv(sd, f"{prefix_ppm}features.{i}.1.", 512, 2048, 1, False, g)
        _bn(sd, f"{prefix_ppm}features.{i}.2.", 512, g)
    _conv(sd, prefix_cls + "0.", 512, 4096, 3, False, g)
    _bn(sd, prefix_cls + "1.", 512, g)
    _conv(sd, prefix_cls + "4.", classes, 512, 1, False, g, bias=True)


def _meta_heads(sd, g, shot, aspp_names=True):
    _conv(sd, "down_query.0.", 256, 1536, 1, False, g)
    _conv(sd, "down_supp.0.", 256, 1536, 1, False, g)
    _conv(sd, "init_merge.0.", 256, 513, 1, False, g)
    for i, k in enumerate((1, 1, 3, 3, 3)):
        _conv(sd, f"ASPP_meta.layer6_{i}.0.", 256, 256, k, False, g, bias=True)
    _conv(sd, "res1_meta.0.", 256, 1280, 1, False, g)
    _conv(sd, "res2_meta.0.", 256, 256, 3, False, g)
    _conv(sd, "res2_meta.2.", 256, 256, 3, False, g)
    _conv(sd, "cls_meta.0.", 256, 256, 3, False, g)
    _conv(sd, "cls_meta.3.", 2, 256, 1, False, g, bias=True)
    if shot > 1:  # BAM's kshot_rw with kshot_trans_dim 2 (the aspp baseline builds it too, then never uses it)
        _conv(sd, "kshot_rw.0.", 2, shot, 1, False, g, bias=True)
        _conv(sd, "kshot_rw.2.", shot, 2, 1, False, g, bias=True)


def released_bam(svf_on, shot=1, own=False, seed=0):
    """The SVF code's model/BAM.py state dict (``own``: BAM's own, without layer0p-4p); ``module.`` prefixed."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    _resnet50(sd, "", svf_on, g)
    if not own:
        if svf_on:
            _resnet50(sd, "p", False, g)
        else:  # layer<N>p is the same module as layer<N>
            sd.update({k.replace(".", "p.", 1): v for k, v in list(sd.items()) if k.startswith("layer")})
    _pspnet_head(sd, "learner_base.0.", "learner_base.1.", 16, g)
    _meta_heads(sd, g, shot)
    sd["gram_merge.weight"] = torch.tensor([1.0, 0.3]).reshape(1, 2, 1, 1) + 0.1 * torch.randn(1, 2, 1, 1, generator=g)
    sd["cls_merge.weight"] = torch.tensor([1.0, -0.5]).reshape(1, 2, 1, 1) + 0.1 * torch.randn(1, 2, 1, 1, generator=g)
    return {"epoch": 107, "state_dict": {"module." + k: v for k, v in sd.items()}, "optimizer": {"state": {}}}


def released_baseline(svf_on, shot=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    _resnet50(sd, "", svf_on, g)
    _meta_heads(sd, g, shot)
    return {"epoch": 10, "state_dict": sd, "optimizer": {}}


def released_pfenet(svf_on, seed=2):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    _resnet50(sd, "", svf_on, g)
    _conv(sd, "down_query.0.", 256, 1536, 1, False, g)
    _conv(sd, "down_supp.0.", 256, 1536, 1, False, g)
    for i in range(4):
        _conv(sd, f"init_merge.{i}.0.", 256, 513, 1, False, g)
        _conv(sd, f"beta_conv.{i}.0.", 256, 256, 3, False, g)
        _conv(sd, f"beta_conv.{i}.2.", 256, 256, 3, False, g)
        _conv(sd, f"inner_cls.{i}.0.", 256, 256, 3, False, g)
        _conv(sd, f"inner_cls.{i}.3.", 2, 256, 1, False, g, bias=True)
    for i in range(3):
        _conv(sd, f"alpha_conv.{i}.0.", 256, 512, 1, False, g)
    _conv(sd, "res1.0.", 256, 1024, 1, False, g)
    _conv(sd, "res2.0.", 256, 256, 3, False, g)
    _conv(sd, "res2.2.", 256, 256, 3, False, g)
    _conv(sd, "cls.0.", 256, 256, 3, False, g)
    _conv(sd, "cls.3.", 2, 256, 1, False, g, bias=True)
    return {"epoch": 50, "state_dict": {"module." + k: v for k, v in sd.items()}, "optimizer": {}}


def released_pspnet(seed=3):
    """BAM's stage-1 PSPNet: layer0-4, the same modules again as encoder.0-4, ppm, cls."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    _resnet50(sd, "", False, g)
    sd.update({"encoder." + k[len("layer"):]: v for k, v in list(sd.items())})
    _pspnet_head(sd, "ppm.", "cls.", 16, g)
    return {"state_dict": sd}


# --------------------------------------------------------------------------- the released forward, re-stated
def _r_conv(sd, p, x, stride=1, pad=0, dil=1):
    if p + "conv_V.weight" in sd:  # SVD_Conv2d.forward: conv_V, times vector_S, conv_U
        h = F.conv2d(x, sd[p + "conv_V.weight"], None, stride, pad, dil) * sd[p + "vector_S"]
        return F.conv2d(h, sd[p + "conv_U.weight"], sd.get(p + "conv_U.bias"))
    return F.conv2d(x, sd[p + "weight"], sd.get(p + "bias"), stride, pad, dil)


def _r_bn(sd, p, x):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        False, 0.0, 1e-5)


def _r_resnet(sd, x, tag, rule, mask=None):
    """[f0..f4]; rule 'every': BAM's PSPNet sets dilation 2/4 on every conv2 of layer3/4; 'torchvision':
    replace_stride_with_dilation, the first block of layer3/4 keeps dilation 1/2."""
    for i, _, _, stride in STEM:
        x = F.relu(_r_bn(sd, f"layer0{tag}.{i + 1}.", _r_conv(sd, f"layer0{tag}.{i}.", x, stride, 1)))
    x = F.max_pool2d(x, 3, 2, 1)
    feats = [x]
    for stage, _, blocks, stride in RESNET50:
        if stage == 4 and mask is not None:
            x = x * F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=True)
        for b in range(blocks):
            p = f"layer{stage}{tag}.{b}."
            d = {1: 1, 2: 1, 3: 2, 4: 4}[stage]
            if rule == "torchvision" and b == 0:
                d = {3: 1, 4: 2}.get(stage, 1)
            s = stride if (b == 0 and stage == 2) else 1
            out = F.relu(_r_bn(sd, p + "bn1.", _r_conv(sd, p + "conv1.", x)))
            out = F.relu(_r_bn(sd, p + "bn2.", _r_conv(sd, p + "conv2.", out, s, d, d)))
            out = _r_bn(sd, p + "bn3.", _r_conv(sd, p + "conv3.", out))
            idn = _r_bn(sd, p + "downsample.1.", _r_conv(sd, p + "downsample.0.", x, s)) if b == 0 else x
            x = F.relu(out + idn)
        feats.append(x)
    return feats


def _up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _r_encode(sd, x, s_x, s_y, rule, training=False):
    """Query/support features, prototypes (Weighted_GAP), priors, as the released forward computes them (training:
    the Dropout2d(0.5) of down_query, then of down_supp shot after shot, as the released forward draws them)."""
    q = _r_resnet(sd, x, "", rule)
    query_feat = F.dropout2d(F.relu(_r_conv(sd, "down_query.0.", torch.cat([q[3], q[2]], 1))), 0.5, training)
    pros, priors, lows = [], [], []
    for i in range(s_x.shape[1]):
        mask = (s_y[:, i] == 1).float().unsqueeze(1)
        s = _r_resnet(sd, s_x[:, i], "", rule, mask=mask)
        m3 = _up(mask, s[3].shape[-2:])
        supp = F.dropout2d(F.relu(_r_conv(sd, "down_supp.0.", torch.cat([s[3], s[2]], 1))), 0.5, training)
        h, w = supp.shape[-2:]
        area = F.avg_pool2d(m3, (h, w)) * h * w + 0.0005
        pros.append(F.avg_pool2d(supp * m3, (h, w)) * h * w / area)
        sz = s[4].shape[2]
        sf = s[4] * _up(mask, (sz, sz))
        b, c = q[4].shape[:2]
        tq = q[4].reshape(b, c, -1)
        ts = sf.reshape(b, c, -1).permute(0, 2, 1)
        sim = torch.bmm(ts, tq) / (torch.bmm(ts.norm(2, 2, True), tq.norm(2, 1, True)) + 1e-7)
        sim = sim.max(1)[0]
        sim = (sim - sim.min(1)[0].unsqueeze(1)) / (sim.max(1)[0].unsqueeze(1) - sim.min(1)[0].unsqueeze(1) + 1e-7)
        priors.append(_up(sim.reshape(b, 1, q[4].shape[2], q[4].shape[3]), q[3].shape[-2:]))
        lows.append(s[2])
    return q, query_feat, pros, priors, lows


def _gram(f):
    b, c = f.shape[:2]
    f = f.reshape(b, c, -1)
    n = f.norm(2, 2, True)
    return torch.bmm(f, f.permute(0, 2, 1)) / (torch.bmm(n, n.permute(0, 2, 1)) + 1e-7)


def _r_merge(sd, query_feat, pro, prior):
    return F.relu(_r_conv(sd, "init_merge.0.", torch.cat([query_feat, pro.expand_as(query_feat), prior], 1)))


def _r_meta(sd, query_feat, pro, prior, training=False):
    return _r_meta_head(sd, _r_merge(sd, query_feat, pro, prior), training)


def _r_meta_head(sd, x, training=False):
    """ASPP_meta, res1_meta, res2_meta, cls_meta (its Dropout2d(0.1) in training) on init_merge's output."""
    size = x.shape[-2:]
    gl = F.relu(_r_conv(sd, "ASPP_meta.layer6_0.0.", F.avg_pool2d(x, size))).expand(-1, -1, *size)
    br = [gl, F.relu(_r_conv(sd, "ASPP_meta.layer6_1.0.", x))]
    br += [F.relu(_r_conv(sd, f"ASPP_meta.layer6_{i}.0.", x, 1, d, d)) for i, d in ((2, 6), (3, 12), (4, 18))]
    x = F.relu(_r_conv(sd, "res1_meta.0.", torch.cat(br, 1)))
    y = F.relu(_r_conv(sd, "res2_meta.2.", F.relu(_r_conv(sd, "res2_meta.0.", x, 1, 1)), 1, 1)) + x
    return _r_conv(sd, "cls_meta.3.", F.dropout2d(F.relu(_r_conv(sd, "cls_meta.0.", y, 1, 1)), 0.1, training))


def released_bam_forward(sd, x, s_x, s_y, training=False, cat_idx=None):
    """model/BAM.py (SVF code) forward: final_out at the input size in eval mode; in training (its train() then
    fix_bn: BatchNorm in eval, every Dropout2d active, drawn in the forward's order: down_query, down_supp shot after
    shot, the base learner's after init_merge, then cls_meta's; the episode's base class, cat_idx 0-based in the
    base learner's classes, left out of its map) (final_out, meta_out), both at the input size."""
    shot = s_x.shape[1]
    q, query_feat, pros, priors, lows = _r_encode(sd, x, s_x, s_y, "every", training)
    que_gram = _gram(q[2])
    norm_max = torch.ones_like(que_gram).norm(dim=(1, 2))
    est = torch.cat([((que_gram - _gram(s)).norm(dim=(1, 2)) / norm_max).reshape(-1, 1, 1, 1) for s in lows], 1)
    if shot > 1:
        val1, idx1 = est.sort(1)
        _, idx2 = idx1.sort(1)
        w = F.relu(_r_conv(sd, "kshot_rw.0.", val1))
        weight = torch.softmax(_r_conv(sd, "kshot_rw.2.", w).gather(1, idx2), 1)
    else:
        weight = torch.ones_like(est)
    est_val = (weight * est).sum(1, True)
    prior = (weight * torch.cat(priors, 1)).sum(1, True)
    pro = (weight.permute(0, 2, 1, 3) * torch.cat(pros, 2)).sum(2, True)
    merged = _r_merge(sd, query_feat, pro, prior)
    base_in = _r_resnet(sd, x, "p" if any(k.startswith("layer0p.") for k in sd) else "", "every")[4]
    ppm = [base_in] + [_up(F.relu(_r_bn(sd, f"learner_base.0.features.{i}.2.", _r_conv(
        sd, f"learner_base.0.features.{i}.1.", F.adaptive_avg_pool2d(base_in, b)))), base_in.shape[-2:])
        for i, b in enumerate((1, 2, 3, 6))]
    h = F.relu(_r_bn(sd, "learner_base.1.1.", _r_conv(sd, "learner_base.1.0.", torch.cat(ppm, 1), 1, 1)))
    base_out = _r_conv(sd, "learner_base.1.4.", F.dropout2d(h, 0.1, training))
    meta_out = _r_meta_head(sd, merged, training)
    meta_soft, base_soft = meta_out.softmax(1), base_out.softmax(1)
    base_map = base_soft[:, 1:].sum(1, True)
    if training:  # cls_type 'Base': every base class but the episode's own
        keep = [torch.tensor([c not in (0, int(cat_idx[b]) + 1) for c in range(base_soft.shape[1])])
                for b in range(base_soft.shape[0])]
        base_map = torch.stack([base_soft[b, keep[b]].sum(0, True) for b in range(base_soft.shape[0])])
    est_map = est_val.expand_as(meta_soft[:, 1:])
    bg = F.conv2d(torch.cat([meta_soft[:, :1], est_map], 1), sd["gram_merge.weight"])
    fg = F.conv2d(torch.cat([meta_soft[:, 1:], est_map], 1), sd["gram_merge.weight"])
    final = torch.cat([F.conv2d(torch.cat([bg, base_map], 1), sd["cls_merge.weight"]), fg], 1)
    if training:
        return _up(final, x.shape[-2:]), _up(meta_out, x.shape[-2:])
    return _up(final, x.shape[-2:])


def released_baseline_forward(sd, x, s_x, s_y):
    """model/aspp.py (SVF code) forward in eval mode: weight_soft = ones, so the shots are summed."""
    _, query_feat, pros, priors, _ = _r_encode(sd, x, s_x, s_y, "torchvision")
    meta_out = _r_meta(sd, query_feat, torch.cat(pros, 2).sum(2, True), torch.cat(priors, 1).sum(1, True))
    return _up(meta_out, x.shape[-2:])


def released_pfenet_forward(sd, x, s_x, s_y, rule, bins=(60, 30, 15, 8)):
    """PFENet.py forward in eval mode (bins given as pooled sizes)."""
    _, query_feat, pros, priors, _ = _r_encode(sd, x, s_x, s_y, rule)
    prior = _up(torch.cat(priors, 1).mean(1, True), query_feat.shape[-2:])
    pro = sum(pros) / len(pros)
    size, pyramid = query_feat.shape[-2:], []
    for i, b in enumerate(bins):
        qb = F.adaptive_avg_pool2d(query_feat, b)
        m = F.relu(_r_conv(sd, f"init_merge.{i}.0.", torch.cat([qb, pro.expand(-1, -1, b, b), _up(prior, (b, b))], 1)))
        if i >= 1:
            m = F.relu(_r_conv(sd, f"alpha_conv.{i - 1}.0.", torch.cat([m, _up(pyramid[-1], (b, b))], 1))) + m
        m = F.relu(_r_conv(sd, f"beta_conv.{i}.2.", F.relu(_r_conv(sd, f"beta_conv.{i}.0.", m, 1, 1)), 1, 1)) + m
        pyramid.append(_up(m, size))
    y = F.relu(_r_conv(sd, "res1.0.", torch.cat(pyramid, 1)))
    y = F.relu(_r_conv(sd, "res2.2.", F.relu(_r_conv(sd, "res2.0.", y, 1, 1)), 1, 1)) + y
    return _up(_r_conv(sd, "cls.3.", F.relu(_r_conv(sd, "cls.0.", y, 1, 1))), x.shape[-2:])


# --------------------------------------------------------------------------- helpers
def _cfg(**kw):
    values = dict(backbone="resnet50", reduce_dim=256, svf=False, shot=1)
    values.update(kw)
    return tiny_cfg(**values)


def _episode(shot, size=57, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, size, size, generator=g)
    s_x = torch.randn(1, shot, 3, size, size, generator=g)
    s_y = torch.zeros(1, shot, size, size, dtype=torch.long)
    s_y[..., 10:40, 15:45] = 1
    s_y[..., 0, :] = 255
    return x, s_x, s_y


def _plain(obj):
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj["state_dict"].items()}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- tests
def test_folding_a_truncated_factorisation_is_exact():
    """The 3->64 stem conv of the SVF code keeps 24 of 27 singular values; folding and resolving gives the
    same function (here <= 1e-6 relative), with our rank 27 (three singular values ~0)."""
    g = torch.Generator().manual_seed(0)
    parts = {}
    _conv(parts, "", 64, 3, 3, True, g)
    assert parts["vector_S"].shape == (1, 24, 1, 1)
    target = svf.resolver(torch.nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False))
    layer = svf.resolver(torch.nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False))
    layer.load_state_dict(_resolve_folded(target, parts))
    assert layer.rank == 27 and layer.vector_S[0, 24:].abs().max() < 1e-5 * layer.vector_S.max()
    x = torch.randn(2, 3, 33, 33, generator=g)
    with torch.no_grad():
        ref = F.conv2d(F.conv2d(x, parts["conv_V.weight"], None, 2, 1) * parts["vector_S"], parts["conv_U.weight"])
        ours = layer.eval()(x)
    assert _rel(ours, ref) <= 1e-6


def test_detect_format_of_each_layout():
    assert detect_format(_plain(released_bam(False, own=True))) == "bam"
    assert detect_format(_plain(released_bam(False))) == "svf_bam"
    assert detect_format(released_baseline(False)["state_dict"]) == "svf_baseline"
    assert detect_format(_plain(released_pfenet(False))) == "pfenet"
    assert detect_format(released_pspnet()["state_dict"]) == "pspnet"
    assert detect_format({"backbone.layer0.conv1.weight": torch.zeros(1)}) is None  # ours


def test_bam_svf_converts_loads_strictly_and_matches_the_released_forward():
    obj = released_bam(svf_on=True, shot=2)
    torch.manual_seed(0)
    model = build_model(_cfg(arch="bam", svf=True, shot=2))
    trainable_s = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "vector_S" in n)
    assert trainable_s == 12544  # the base learner's backbone copy adds nothing trainable
    fmt, report = load_released(model, obj, "bam_svf.pth")
    assert fmt == "svf_bam" and int(model.base_shared_stages) == 0  # the released stem is truncated (24 of 27)
    assert any("layer0.conv1 (rank 24 of 27)" in line for line in report)
    x, s_x, s_y = _episode(shot=2)
    sd = _plain(obj)
    with torch.no_grad():
        ours = model.eval()(x, s_x, s_y)
        ref = released_bam_forward(sd, x, s_x, s_y)
        feats = model.backbone(x)  # the SVF path: truncated stem, trained S
        base = model._base_features(x, feats)  # the base learner's input: layer0p-4p
        ref_feats, ref_base = _r_resnet(sd, x, "", "every"), _r_resnet(sd, x, "p", "every")[4]
    assert _rel(ours, ref) < 1e-4
    assert all(_rel(a, b) < 1e-5 for a, b in zip(feats, ref_feats)) and _rel(base, ref_base) < 1e-5
    assert _rel(base, feats[4]) > 0.1  # the two paths differ: the test can tell them apart


def test_bam_without_svf_own_and_svf_code_layouts_match_the_released_forward():
    torch.manual_seed(0)
    model = build_model(_cfg(arch="bam", svf=False, shot=1))
    x, s_x, s_y = _episode(shot=1)
    for own in (True, False):
        obj = released_bam(svf_on=False, own=own, seed=int(own))
        fmt, report = load_released(model, obj)
        assert fmt == ("bam" if own else "svf_bam")
        assert own or any("layerNp" in line and "dropped" in line for line in report)
        with torch.no_grad():
            assert _rel(model.eval()(x, s_x, s_y), released_bam_forward(_plain(obj), x, s_x, s_y)) < 1e-4


@pytest.mark.parametrize("shot", [1, 2])
def test_bam_training_forward_draws_its_dropout_masks_in_the_released_order(shot):
    """In training every Dropout2d is active (base_learner_dropout, the released fix_bn); with the same seed our
    forward draws the masks in the released forward's order (down_query, down_supp shot after shot, the base
    learner's, cls_meta's), so the main and auxiliary losses equal the released ones. Before: the base learner
    ran after the meta-learner and the shots' down_supp masks were drawn at once (main loss ~1e-2 apart)."""
    obj = released_bam(svf_on=True, shot=shot)
    torch.manual_seed(0)
    model = build_model(_cfg(arch="bam", svf=True, shot=shot))
    load_released(model, obj, "bam_svf.pth")
    model.train()
    x, s_x, s_y = _episode(shot=shot)
    y = torch.zeros(1, 57, 57, dtype=torch.long)
    y[:, 20:50, 5:30] = 1
    y[:, :, 0] = 255
    class_id = torch.tensor([8])  # fold 0's base classes are 6..20: the base learner's class 3 (cat_idx 2)
    sd = _plain(obj)
    with torch.no_grad():
        torch.manual_seed(11)
        logits, _ = model(x, s_x, s_y, query_mask=y, class_id=class_id)
        terms = {k: float(v) for k, v in model.loss_terms.items()}
        torch.manual_seed(11)
        final, meta = released_bam_forward(sd, x, s_x, s_y, training=True, cat_idx=[2])
        torch.manual_seed(12)  # another draw: the test can tell draws apart
        other, _ = released_bam_forward(sd, x, s_x, s_y, training=True, cat_idx=[2])
    main, aux1 = F.cross_entropy(final, y, ignore_index=255), F.cross_entropy(meta, y, ignore_index=255)
    assert abs(terms["main"] - float(main)) < 1e-4 and abs(terms["aux1"] - float(aux1)) < 1e-4
    assert _rel(logits, final) < 1e-4 and _rel(other, final) > 1e-3


def test_svf_baseline_5shot_converts_and_sums_the_shots_as_released():
    """The SVF code's baseline: torchvision's dilation rule (dilation_rule auto for baseline), K shots summed;
    its unused kshot_rw is dropped and reported."""
    obj = released_baseline(svf_on=True, shot=2)
    torch.manual_seed(0)
    model = build_model(_cfg(arch="baseline", svf=True, shot=2))
    assert model.backbone.dilation_rule == "torchvision"
    fmt, report = load_released(model, obj)
    assert fmt == "svf_baseline" and any("kshot_rw" in line for line in report)
    x, s_x, s_y = _episode(shot=2)
    with torch.no_grad():
        assert _rel(model.eval()(x, s_x, s_y), released_baseline_forward(obj["state_dict"], x, s_x, s_y)) < 1e-4


@pytest.mark.parametrize("rule", ["every_block", "torchvision"])
def test_pfenet_converts_and_matches_the_released_forward_under_its_dilation_rule(rule):
    """PFENet's own checkpoints (every block dilated) and the SVF code's pfenet.py (torchvision's rule) share
    their keys: the config's dilation_rule says which forward to reproduce."""
    obj = released_pfenet(svf_on=False)
    torch.manual_seed(0)
    bins = (6, 4, 3, 2)  # 8x8 features here (60x60 would be slow): pooled sizes below 8 keep the pyramid real
    model = build_model(_cfg(arch="pfenet", dilation_rule=rule, pyramid_bins=list(bins)))
    fmt, _ = load_released(model, obj)
    x, s_x, s_y = _episode(shot=1)
    with torch.no_grad():
        ours = model.eval()(x, s_x, s_y)
        ref = released_pfenet_forward(_plain(obj), x, s_x, s_y, "every" if rule == "every_block" else rule, bins)
    assert fmt == "pfenet" and _rel(ours, ref) < 1e-4


def test_pspnet_stage1_file_as_base_learner(tmp_path):
    """BAM's initmodel/PSPNet/.../best.pth ({'state_dict'}, encoder.N aliases) loads as base_learner; the base
    learner then computes what BAM's learner_base computes on the same backbone."""
    obj = released_pspnet()
    path = tmp_path / "best.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in obj["state_dict"].items()}}, path)
    torch.manual_seed(0)
    model = build_model(_cfg(arch="bam", base_learner=str(path))).eval()
    sd = obj["state_dict"]
    x = torch.randn(1, 3, 57, 57)
    with torch.no_grad():
        feat = model.backbone(x)[4]
        ref_feat = _r_resnet(sd, x, "", "every")[4]
        assert _rel(feat, ref_feat) < 1e-5
        ppm = [ref_feat] + [_up(F.relu(_r_bn(sd, f"ppm.features.{i}.2.", _r_conv(sd, f"ppm.features.{i}.1.",
                            F.adaptive_avg_pool2d(ref_feat, b)))), ref_feat.shape[-2:]) for i, b in enumerate((1, 2, 3, 6))]
        ref = _r_conv(sd, "cls.4.", F.relu(_r_bn(sd, "cls.1.", _r_conv(sd, "cls.0.", torch.cat(ppm, 1), 1, 1))))
        assert _rel(model.base_learner(feat), ref) < 1e-4
    bad = dict(obj["state_dict"])
    bad["encoder.1.0.conv1.weight"] = bad["encoder.1.0.conv1.weight"] + 1
    torch.save({"state_dict": bad}, path)
    with pytest.raises(ValueError, match="encoder.1.0.conv1.weight should repeat layer1.0.conv1.weight"):
        load_base_learner(build_model(_cfg(arch="pspnet")), str(path))


def test_unmapped_key_wrong_arch_and_wrong_svf_are_clear_errors():
    torch.manual_seed(0)
    bam = build_model(_cfg(arch="bam"))
    obj = released_bam(svf_on=False, own=True)
    obj["state_dict"]["module.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"1 keys map to nothing.*extra_head\.weight"):
        convert_released(obj, bam, "x.pth")
    with pytest.raises(ValueError, match="is a 1-shot BAM .* set shot=1"):
        convert_released(released_bam(svf_on=False, own=True), build_model(_cfg(arch="bam", shot=2)), "x.pth")
    with pytest.raises(ValueError, match="evaluate it with arch=pfenet"):
        convert_released(released_pfenet(False), bam, "x.pth")
    with pytest.raises(ValueError, match="build it with svf=true"):
        convert_released(released_baseline(svf_on=True), build_model(_cfg(arch="baseline")), "x.pth")
    with pytest.raises(ValueError, match="not a checkpoint of the released"):
        convert_released({"state_dict": {"backbone.layer0.conv1.weight": torch.zeros(1)}}, bam, "ours.pth")


# --------------------------------------------------------------------------- test.py and the converter tool


def test_test_py_and_convert_tool_read_a_released_file(tmp_path, capsys):
    """test.py --weights takes a released file (BAM's own layout here) and says what it found; the converter
    tool writes our format, which build_model + load_state_dict(strict=True) accepts and which test.py scores
    identically."""
    import importlib.util
    import json
    import os

    import test as test_script
    from dataset import make_lists, synthetic
    from engine.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data, lists = str(tmp_path / "data"), str(tmp_path / "lists")
    synthetic.main(["--out", data, "--num-train", "24", "--num-val", "40", "--size", "48"])
    make_lists.main(["pascal", "--data-root", data, "--list-dir", lists, "--min-class-pixels", "16", "--workers", "0"])
    overrides = [f"data_root={data}", f"list_dir={lists}", "min_class_pixels=16", "test_size=40", "workers=0",
                 "arch=bam", "svf=false", "reduce_dim=16", "pretrained=null", "base_learner=null",
                 "test_episodes=6", "test_seeds=[1]", f"exp_dir={tmp_path / 'exp'}"]
    config = os.path.join(root, "config", "demo_split0.yaml")
    torch.manual_seed(0)
    model = build_model(load_config(config, overrides))
    released = tmp_path / "train_epoch_3.pth"
    torch.save({"epoch": 3, "state_dict": as_bam_release(model.state_dict()), "optimizer": {}}, released)

    capsys.readouterr()
    first = test_script.main(["--config", config, *overrides, "--weights", str(released),
                              "--out", str(tmp_path / "a.json")])
    assert "BAM's own few-shot checkpoint" in capsys.readouterr().out

    spec = importlib.util.spec_from_file_location("convert_released", os.path.join(root, "tools", "convert_released.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    converted = tmp_path / "converted.pth"
    tool.main([str(released), str(converted), "--config", config, *overrides])
    ckpt = torch.load(converted, map_location="cpu", weights_only=True)
    assert ckpt["format"] == "bam" and ckpt["epoch"] == 3
    build_model(load_config(config, overrides)).load_state_dict(ckpt["model"], strict=True)
    second = test_script.main(["--config", config, *overrides, "--weights", str(converted),
                               "--out", str(tmp_path / "b.json")])
    assert first["episodes_per_seed"] == 6 and json.dumps(first["per_seed"]) == json.dumps(second["per_seed"])


def test_base_path_shares_layer0_and_1_only_when_they_are_the_same_function():
    """A converted BAM+SVF file reuses the SVF backbone's layer0/1 output for its base learner only when those
    stages equal base_backbone's (this project's own: exact SVD); a stem that differs (the released 24-of-27
    truncation, here one changed singular value) makes the base path run its own layer0/1."""
    from model.released import _shared_stages
    torch.manual_seed(0)
    model = build_model(tiny_cfg(arch="bam", svf=True))
    state = model.state_dict()
    assert _shared_stages(model, state) == 2
    state["backbone.layer0.conv1.vector_S"] = state["backbone.layer0.conv1.vector_S"].clone()
    state["backbone.layer0.conv1.vector_S"][0, -1] *= 0.5
    assert _shared_stages(model, state) == 0
