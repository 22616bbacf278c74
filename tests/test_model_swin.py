"""A Swin Transformer backbone in the few-shot models: torchvision's features split into layer0-4 (same
outputs as torchvision's, channels first), its state-dict file loaded strictly, and SVF on it: only the
singular values of layer2-4 train, one step changes the output, and merging gives the trained model."""
import io
import contextlib

import pytest
import torch
import torchvision

import svf
from model import build_backbone, build_model
from model.summary import summarize
from model.weights import load_backbone_weights
from conftest import random_episode, tiny_cfg

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    torch.manual_seed(0)
    net = torchvision.models.swin_t(weights=None).eval()
    path = tmp_path_factory.mktemp("swin") / "swin_t.pth"
    torch.save(net.state_dict(), path)  # the format of torchvision's Swin_T_Weights file
    return net, path


def test_stages_equal_torchvision_features_and_the_file_loads_strictly(torchvision_file):
    net, path = torchvision_file
    backbone = load_backbone_weights(build_backbone("swin_t"), path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone(x)
        expected, h = [], x
        for a, b in zip((0, 1, 2, 4, 6), (1, 2, 4, 6, 8)):
            h = net.features[a:b](h)
            expected.append(h.permute(0, 3, 1, 2))
    assert [tuple(f.shape) for f in feats] == [(2, 96, 16, 16), (2, 96, 16, 16), (2, 192, 8, 8), (2, 384, 4, 4),
                                               (2, 768, 2, 2)]
    assert all(torch.equal(f, e) for f, e in zip(feats, expected))
    assert backbone.channels == {"layer0": 96, "layer1": 96, "layer2": 192, "layer3": 384, "layer4": 768}
    state = torch.load(path, weights_only=True)
    state["features.8.x"] = torch.zeros(1)  # a key outside the stages is an error, not dropped
    torch.save(state, path.parent / "bad.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \['features.8.x'\]"):
        load_backbone_weights(build_backbone("swin_t"), path.parent / "bad.pth")


@pytest.mark.parametrize("arch", ["baseline", "pfenet"])
def test_svf_on_swin_trains_only_late_singular_values(arch, torchvision_file):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(arch=arch, backbone="swin_t", svf=True, pretrained=str(torchvision_file[1])))
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("vector_S" in n and n.split(".")[0] in ("layer2", "layer3", "layer4")
                             for n in trainable)
    assert any(".attn.qkv.vector_S" in n for n in trainable) and any(".attn.proj.vector_S" in n for n in trainable)
    q, s, sm, qm = random_episode(batch=2, size=64)
    model.eval()
    with torch.no_grad():
        before = model(q, s, sm)
    assert before.shape == (2, 2, 64, 64)
    model.train()
    _, loss = model(q, s, sm, qm)
    loss.backward()
    assert {n for n, p in model.backbone.named_parameters() if p.grad is not None} == set(trainable)
    singular = [p for p in model.backbone.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in singular:  # a step of 2% of each singular value, against its gradient
            p.sub_(0.02 * p.abs() * p.grad.sign())
    model.eval()
    with torch.no_grad():
        after = model(q, s, sm)
        assert (after - before).norm() / before.norm() > 1e-4
        model.backbone = svf.merge(model.backbone)
        assert (model(q, s, sm) - after).norm() / after.norm() < 1e-5


@pytest.mark.parametrize("arch", ["bam", "pspnet"])
def test_swin_with_a_resnet_only_head_is_refused(arch):
    with pytest.raises(ValueError, match=f"backbone=swin_t is wired for arch=baseline and arch=pfenet only .*arch={arch}"):
        build_model(tiny_cfg(arch=arch, backbone="swin_t"))


def test_summary_counts_per_stage():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model = summarize(tiny_cfg(arch="baseline", backbone="swin_t", svf=True), file=out)
    text = out.getvalue()
    counts = {stage: sum(p.numel() for p in getattr(model.backbone, stage).parameters() if p.requires_grad)
              for stage in ("layer0", "layer1", "layer2", "layer3", "layer4")}
    assert counts["layer0"] == counts["layer1"] == 0 and min(counts["layer2"], counts["layer3"], counts["layer4"]) > 0
    for stage, n in counts.items():
        assert f"{stage:<14s} trainable {n:>12,d}" in text
