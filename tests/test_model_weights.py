"""Backbones (stages, output stride, dilation) and strict weight loading from the formats users bring:
PSPNet's resnet50_v2.pth, torchvision ResNet / VGG16-bn state dicts, this project's checkpoints."""
import warnings

import pytest
import torch
import torchvision

from model import build_backbone, build_model, load_backbone_weights
from model.weights import read_state_dict
from conftest import tiny_cfg


def _randomize(module, seed=0):
    """Random values in every tensor (BN statistics included) so that a wrong mapping cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return module


def _pspnet_v2_state(backbone):
    """A resnet50_v2.pth-format dict: stem keys at the top level, fc classifier, no num_batches_tracked."""
    out = {}
    for k, v in backbone.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        out[k[len("layer0."):] if k.startswith("layer0.") else k] = v.clone()
    out["fc.weight"] = torch.randn(1000, 2048)
    out["fc.bias"] = torch.randn(1000)
    return out


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name,stride,channels", [
    ("resnet50", 8, (128, 256, 512, 1024, 2048)),
    ("resnet101", 8, (128, 256, 512, 1024, 2048)),
    ("resnet18_deep", 8, (128, 64, 128, 256, 512)),
    ("resnet18_deep_half", 8, (64, 32, 64, 128, 256)),
    ("resnet50_tv", 8, (64, 256, 512, 1024, 2048)),
    ("vgg16_bn", 16, (64, 128, 256, 512, 512)),
])
def test_backbone_stages_channels_and_output_stride(name, stride, channels):
    backbone = build_backbone(name).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 65, 65))
    assert [f.shape[1] for f in feats] == list(channels)
    side = (65 - 1) // stride + 1  # 9 for stride 8 (PSPNet's (H-1)/8+1), 5 for 16
    assert feats[4].shape[-2:] == (side, side) and backbone.output_stride == stride
    if name.startswith("resnet"):
        assert feats[2].shape[-2:] == feats[4].shape[-2:]  # layer3/4 dilated instead of strided


def test_resnet50_deep_stem_and_dilation():
    b = build_backbone("resnet50")
    convs = [m for m in b.layer0 if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 64, (3, 3)), (64, 64, (3, 3)), (64, 128, (3, 3))]
    assert isinstance(b.layer0[-1], torch.nn.MaxPool2d)
    for stage, d in (("layer3", 2), ("layer4", 4)):
        for block in getattr(b, stage):  # every block, the first included (PSPNet's conversion)
            assert block.conv2.dilation == (d, d) and block.conv2.padding == (d, d) and block.conv2.stride == (1, 1)
        assert getattr(b, stage)[0].downsample[0].stride == (1, 1)
    assert b.layer2[0].conv2.stride == (2, 2) and b.layer2[0].conv1.stride == (1, 1)  # stride on the 3x3


def test_half_width_resnet18_is_resnet18_deep_with_half_the_channels():
    """The demo's backbone: the same layers, names, strides and dilations as resnet18_deep, every conv and
    BatchNorm with half the channels (the RGB input aside), so a quarter of the parameters of every 3x3 conv."""
    full, half = build_backbone("resnet18_deep"), build_backbone("resnet18_deep_half")
    modules = dict(half.named_modules())
    assert list(modules) == [n for n, _ in full.named_modules()]
    for name, a in full.named_modules():
        b = modules[name]
        assert type(a) is type(b), name
        if isinstance(a, torch.nn.Conv2d):
            assert (b.in_channels, b.out_channels) == (3 if a.in_channels == 3 else a.in_channels // 2,
                                                       a.out_channels // 2), name
            assert (b.kernel_size, b.stride, b.dilation, b.padding) == \
                (a.kernel_size, a.stride, a.dilation, a.padding), name
        elif isinstance(a, torch.nn.BatchNorm2d):
            assert b.num_features == a.num_features // 2, name
    assert sum(p.numel() for p in half.parameters()) == 2_834_208


def test_layer4_mask_and_frozen_stage_without_autograd():
    b = build_backbone("resnet18_deep").eval()
    b.requires_grad_(False)
    x = torch.randn(2, 3, 33, 33)
    feats = b(x, layer4_mask=torch.zeros(2, 1, 33, 33))
    assert torch.allclose(feats[4], b.layer4(torch.zeros_like(feats[3])))
    assert not feats[4].requires_grad
    b.layer4.requires_grad_(True)
    assert b(x)[4].requires_grad and not b(x)[3].requires_grad


def test_load_pspnet_resnet50_v2_format(tmp_path):
    src = _randomize(build_backbone("resnet50"))
    state = _pspnet_v2_state(src)
    # the released file's layout: deep stem at the top level, torchvision-style blocks, an fc classifier
    assert state["conv3.weight"].shape == (128, 64, 3, 3) and "bn3.running_var" in state
    assert state["layer1.0.conv1.weight"].shape == (64, 128, 1, 1)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 128, 1, 1)
    path = tmp_path / "resnet50_v2.pth"
    torch.save(state, path)
    dst = load_backbone_weights(build_backbone("resnet50"), path)
    _assert_same_state(src, dst)


def test_load_torchvision_resnet50_into_resnet50_tv(tmp_path):
    tv = _randomize(torchvision.models.resnet50(weights=None), seed=1)
    path = tmp_path / "resnet50-tv.pth"
    torch.save(tv.state_dict(), path)
    dst = load_backbone_weights(build_backbone("resnet50_tv"), path).eval()
    assert torch.equal(dst.layer0.conv1.weight, tv.conv1.weight)
    assert torch.equal(dst.layer4[2].bn3.running_mean, tv.layer4[2].bn3.running_mean)
    tv.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # stage by stage, torchvision's own forward up to layer2 (not dilated there)
        ref = tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))
        assert torch.allclose(dst(x)[2], ref, rtol=1e-5, atol=1e-5)


def test_load_torchvision_vgg16_bn(tmp_path):
    features = _randomize(torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=True))
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state.update({"classifier.0.weight": torch.randn(8, 8), "classifier.6.bias": torch.randn(1000)})
    path = tmp_path / "vgg16_bn.pth"
    torch.save(state, path)
    dst = load_backbone_weights(build_backbone("vgg16_bn"), path)
    assert torch.equal(dst.layer0[0].weight, features[0].weight)          # features.0
    assert torch.equal(dst.layer2[0].weight, features[14].weight)         # features.14 starts layer2
    assert torch.equal(dst.layer4[7].running_var, features[41].running_var)  # features.41 = layer4.7


def test_renamed_key_is_an_error_listing_keys_and_file(tmp_path):
    state = _pspnet_v2_state(build_backbone("resnet50"))
    state["layer1.0.convX.weight"] = state.pop("layer1.0.conv1.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_backbone_weights(build_backbone("resnet50"), path)
    msg = str(err.value)
    assert "layer1.0.conv1.weight" in msg and "layer1.0.convX.weight" in msg and "renamed.pth" in msg


def test_wrong_shape_and_missing_file_errors(tmp_path):
    state = build_backbone("resnet18_deep").state_dict()
    state["layer4.1.conv2.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="layer4.1.conv2.weight"):
        load_backbone_weights(build_backbone("resnet18_deep"), path)
    with pytest.raises(FileNotFoundError) as err:
        load_backbone_weights(build_backbone("resnet18_deep"), tmp_path / "nope.pth")
    assert "resnet50_v2.pth" in str(err.value) and "torchvision" in str(err.value)
    torch.save({"epoch": torch.tensor(3), "note": {"a": 1}}, tmp_path / "not_weights.pth")
    with pytest.raises(ValueError, match="not_weights.pth"):
        load_backbone_weights(build_backbone("resnet18_deep"), tmp_path / "not_weights.pth")


def test_backbone_from_project_checkpoint_and_pspnet_into_bam(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        pspnet = _randomize(build_model(tiny_cfg(arch="pspnet")), seed=2)
    # what the engine saves, from a DistributedDataParallel wrapper (module. prefix)
    path = tmp_path / "best.pth"
    torch.save({"model": {"module." + k: v for k, v in pspnet.state_dict().items()}, "epoch": 5}, path)
    assert set(read_state_dict(path)) == set(pspnet.state_dict())

    backbone = load_backbone_weights(build_backbone("resnet18_deep"), path)
    _assert_same_state(pspnet.backbone, backbone)

    bam = build_model(tiny_cfg(arch="bam", base_learner=str(path)))
    _assert_same_state(pspnet.backbone, bam.backbone)
    _assert_same_state(pspnet.head, bam.base_learner)
    assert not any(p.requires_grad for p in bam.base_learner.parameters())
    assert not any(p.requires_grad for p in bam.backbone.parameters())

    with pytest.raises(ValueError, match="best.pth"):  # a COCO base learner has 61 classes, not 16
        build_model(tiny_cfg(arch="bam", base_learner=str(path), benchmark="coco", num_base_classes=61))
