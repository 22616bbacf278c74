"""`svf` on small members of every torchvision model family (random weights, eval mode): resolved and merged
outputs equal the original's, a backward pass reaches only `vector_S`, one SGD step on S changes the output and
`svf.merge` then equals the trained model, `svf.state_dict` carries S to a fresh copy, and nothing is left
unconverted. The full-size zoo is `python tools/svf_zoo.py` (same check, `tools.svf_zoo.check`).
AlexNet and VGG are conv + Linear stacks like the others but their classifiers alone hold 50-120 M weights
whatever the width of their features, so they run in the tool only."""
from functools import partial

import pytest
import torch
from torchvision import models as tvm
from torchvision.models import convnext, efficientnet, maxvit, regnet, resnet, swin_transformer, vision_transformer

from tools.svf_zoo import check, random_head

SMALL = {  # family: (builder, input side)
    "resnet": (partial(resnet.ResNet, resnet.BasicBlock, [1, 1, 1, 1], num_classes=10), 32),
    "resnext/wide": (partial(resnet.ResNet, resnet.Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4,
                             num_classes=10), 32),
    "regnet": (lambda: regnet.RegNet(regnet.BlockParams.from_init_params(4, 8, 8.0, 2.0, 4, se_ratio=0.25),
                                     num_classes=10, stem_width=8), 32),
    "efficientnet": (lambda: efficientnet.EfficientNet(
        [efficientnet.MBConvConfig(1, 3, 1, 8, 8, 1), efficientnet.MBConvConfig(4, 5, 2, 8, 16, 1)], 0.0,
        num_classes=10, last_channel=32), 32),
    "efficientnet_v2": (lambda: efficientnet.EfficientNet(
        [efficientnet.FusedMBConvConfig(1, 3, 1, 8, 8, 1), efficientnet.MBConvConfig(4, 3, 2, 8, 16, 1)], 0.0,
        num_classes=10, last_channel=32), 32),
    "mobilenet_v2": (lambda: tvm.MobileNetV2(num_classes=10, width_mult=0.25), 32),
    "mobilenet_v3": (lambda: tvm.mobilenet_v3_small(num_classes=10), 32),
    "mnasnet": (lambda: tvm.MNASNet(0.25, num_classes=10), 32),
    "shufflenet_v2": (lambda: tvm.ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 128], num_classes=10), 32),
    "squeezenet": (lambda: tvm.squeezenet1_1(num_classes=10), 48),
    "densenet": (lambda: tvm.DenseNet(8, (1, 1), 16, num_classes=10), 32),
    "googlenet": (lambda: tvm.GoogLeNet(num_classes=10, aux_logits=False, init_weights=False), 32),
    "convnext": (lambda: convnext.ConvNeXt([convnext.CNBlockConfig(8, 16, 1), convnext.CNBlockConfig(16, None, 1)],
                                           num_classes=10), 32),
    "maxvit": (lambda: maxvit.MaxVit((32, 32), 8, 2, [16], [1], 8, 0.0, num_classes=10), 32),
    "vit": (lambda: random_head(vision_transformer.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=10)), 32),
    "swin": (lambda: swin_transformer.SwinTransformer([4, 4], 8, [1, 1], [2, 2], [2, 2], num_classes=10), 32),
    "swin_v2": (lambda: swin_transformer.SwinTransformer(
        [4, 4], 8, [1, 1], [2, 2], [2, 2], num_classes=10, block=swin_transformer.SwinTransformerBlockV2,
        downsample_layer=swin_transformer.PatchMergingV2), 32),
}


@pytest.mark.parametrize("family", list(SMALL))
def test_zoo_family(family):
    build, side = SMALL[family]
    torch.manual_seed(0)
    model = build()
    r = check(model, torch.randn(2, 3, side, side))
    assert r["left_unconverted"] == []
    assert r["err_resolved"] <= 1e-5 and r["err_merged"] <= 1e-5, r
    assert r["grads_only_on_S"] and r["S_reached"] == r["S_tensors"] and r["S_nonzero_grad"] > 0, r
    assert r["step_changes_output"] > max(1e-5, 10 * r["err_resolved"]), r  # well above float32 noise
    assert r["err_merged_after_step"] <= 1e-5 and r["err_state_dict_roundtrip"] <= 1e-6, r
