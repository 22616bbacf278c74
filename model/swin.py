"""Swin Transformer backbones (torchvision's ``swin_t`` / ``swin_s`` / ``swin_b``) for the few-shot models.

A first step beyond the paper's ResNets: the heads read the same five stages. torchvision's ``features`` is
split as ``layer0`` = patch embedding (stride 4), ``layer1`` = stage 1 (stride 4), ``layer2`` = patch merging +
stage 2 (stride 8), ``layer3`` = merging + stage 3 (stride 16), ``layer4`` = merging + stage 4 (stride 32).
The stages work channels-last (N, H, W, C), as torchvision's; the backbone hands the heads (N, C, H, W).
Under SVF every Linear of the blocks (attention ``qkv``/``proj`` included: they are read as weights, which SVD
layers provide) is factored, and ``svf.apply_paper_freezing`` trains only the singular values of layer2-4, as
for ResNet. Weights: torchvision's state-dict files (``features.N.*``; the classifier ``norm``/``head`` is
dropped), moved to the stages by ``SWIN_SPLIT``, loaded strictly from a local path.
"""
import torch.nn as nn
import torchvision.models as tvm

from .backbones import Backbone

__all__ = ["SWIN_SPLIT", "swin_backbone"]

SWIN_SPLIT = (0, 1, 2, 4, 6, 8)  # features[0:1], [1:2], [2:4], [4:6], [6:8] -> layer0 .. layer4


def swin_backbone(name):
    """``name`` in swin_t / swin_s / swin_b, randomly initialised (stochastic depth is off: the few-shot models
    keep the backbone in eval mode)."""
    net = getattr(tvm, name)(weights=None)
    stages = [nn.Sequential(*net.features[a:b]) for a, b in zip(SWIN_SPLIT[:-1], SWIN_SPLIT[1:])]
    c = net.features[0][0].out_channels  # embedding width: 96 (t, s) or 128 (b)
    backbone = Backbone(name, stages, (c, c, 2 * c, 4 * c, 8 * c), output_stride=32)
    backbone.channels_last = True
    backbone.features_split = SWIN_SPLIT
    backbone.classifier_prefixes = ("norm.", "head.")
    return backbone
