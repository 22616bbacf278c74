"""Backbones for few-shot segmentation, each exposing the stages ``layer0 .. layer4``.

- ``resnet50`` / ``resnet101``: PSPNet's deep-stem ResNet (``resnet50_v2``): ``layer0`` = three 3x3 convs
  3->64->64->128 (BN+ReLU each) + 3x3/2 max-pool; torchvision-style Bottleneck with the stride on the
  3x3 conv; ``layer3``/``layer4`` use stride 1 and dilation 2/4, so the output stride is 8. Two rules
  for which 3x3 convs are dilated (``DILATION_RULES``), both used by the released code:
  ``every_block`` (BAM's PSPNet, PFENet's own code: every block of the stage, the first included) and
  ``torchvision`` (``replace_stride_with_dilation``, the SVF code's baseline and PFENet: the first block
  of layer3 keeps dilation 1 and the first block of layer4 has dilation 2). Same shapes, different
  function: a released checkpoint reproduces its outputs only under its own rule.
- ``resnet18_deep``: the same deep stem and dilation with BasicBlocks [2, 2, 2, 2]; small, for the tests.
- ``resnet18_deep_half``: ``resnet18_deep`` with half the channels in every conv (stem 32-32-64, stages 32, 64,
  128, 256; a quarter of the compute, 2.8 M parameters): the demo's backbone, small enough to pretrain and to
  fine-tune a dozen times on a 2-core CPU in a quarter of an hour.
- ``resnet50_tv``: torchvision's ResNet-50 (7x7 stem: ``layer0`` = conv1, bn1, relu, maxpool), dilated the same way.
- ``swin_t`` / ``swin_s`` / ``swin_b``: torchvision's Swin Transformers, stages as in ``model/swin.py``; output stride 32.
- ``timm:<name>``: any timm model (model/timm_backbone.py): DINOv2/DINOv3 ViTs, ConvNeXt, timm's ResNets ...
- ``vgg16_bn``: torchvision's VGG16-bn ``features`` split into stages as PFENet/BAM do (indices 0-6, 7-13,
  14-23, 24-33, 34-42; the last max-pool dropped) with ceil-mode max-pools as in their vgg.py; output stride 16.

Each name belongs to one family of ``FAMILIES`` (resnet-deep, torchvision, vgg, swin, timm-vit, timm-hierarchical,
timm-cnn): the entry says which outputs play layer0-4, their strides, the archs it is wired for, and ``build_backbone``
builds through it. Every backbone answers ``stage_prefixes(stage)`` / ``stage_modules(stage)`` (what a stage of
``finetune_stages`` is made of), which is all model/finetune.py needs.

Parameter names inside the stages are those of the released weight files (``layer0.conv1``, ``layer1.0.conv2``,
``layer2.3.downsample.0`` ...) so that ``model.weights`` only has to move the stem keys under ``layer0``.
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Backbone", "build_backbone", "BACKBONES", "STAGES", "DILATION_RULES", "FAMILIES", "Family",
           "family_of", "ALL_ARCHS"]

STAGES = ("layer0", "layer1", "layer2", "layer3", "layer4")
DILATION_RULES = ("every_block", "torchvision")


def _conv3x3(in_c, out_c, stride=1, dilation=1):
    return nn.Conv2d(in_c, out_c, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; both dilated in a dilated stage."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 x4, as torchvision and PSPNet's resnet50_v2."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class Backbone(nn.Module):
    """Stages ``layer0..layer4`` run in sequence; ``channels[stage]`` and ``output_stride`` describe them.
    ``channels_last``: the stages work on (N, H, W, C) (Swin); the outputs are (N, C, H, W) all the same."""

    channels_last = False
    chains_stages = True  # each stage reads the previous stage's output (BAM's base learner may restart there)
    family = None

    def __init__(self, name, stages, channels, output_stride):
        super().__init__()
        self.name = name
        for stage, module in zip(STAGES, stages):
            setattr(self, stage, module)
        self.channels = dict(zip(STAGES, channels))
        self.output_stride = output_stride
        self.dilation_rule = None  # set for the dilated ResNets

    def _check_stage(self, stage):
        if stage not in STAGES:
            raise ValueError(f"finetune_stages entry {stage!r}: the {self.name} backbone has the stages "
                             f"{', '.join(STAGES)} only (module paths like blocks.6-11 are for timm backbones)")

    def stage_prefixes(self, stage):
        """Parameter-name prefixes of ``stage`` (``finetune_stages``' names; timm backbones take module paths too)."""
        self._check_stage(stage)
        return (f"{stage}.",)

    def stage_modules(self, stage):
        """(name, module) of the modules that make ``stage``."""
        self._check_stage(stage)
        return [(stage, getattr(self, stage))]

    def svf_excluded(self, stages):
        """Modules svf.resolver leaves plain: none (the frozen stages are resolved too, as always: their
        checkpoints keep the SVD names)."""
        return []

    def describe(self):
        return (f"{self.name} ({self.family}): stages {', '.join(STAGES)}; widths "
                + "/".join(str(self.channels[s]) for s in STAGES) + f"; output stride {self.output_stride}")

    def forward(self, x, layer4_mask=None):
        """All five stage outputs, as a list [layer0 .. layer4]. With ``layer4_mask`` (N, 1, H, W) in [0, 1],
        layer4 sees layer3's output times the mask (PFENet/BAM's masked support features). A stage with
        nothing to train, and no gradient to pass back, runs without autograd."""
        feats = []
        for stage in STAGES:
            module = getattr(self, stage)
            if stage == "layer4" and layer4_mask is not None:
                if self.channels_last:
                    mask = F.interpolate(layer4_mask, size=x.shape[1:3], mode="bilinear", align_corners=True)
                    x = x * mask.permute(0, 2, 3, 1)
                else:
                    x = x * F.interpolate(layer4_mask, size=x.shape[-2:], mode="bilinear", align_corners=True)
            # a stage with nothing to train after nothing that trains needs no autograd; a frozen stage after a
            # trained one must still pass gradients back
            if x.requires_grad or any(p.requires_grad for p in module.parameters()):
                x = module(x)
            else:
                with torch.no_grad():
                    x = module(x)
            feats.append(x.permute(0, 3, 1, 2) if self.channels_last else x)
        return feats


def _resnet_stage(block, inplanes, planes, blocks, stride, dilation, first_dilation):
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(planes * block.expansion))
    layers = [block(inplanes, planes, stride, first_dilation, downsample)]
    layers += [block(planes * block.expansion, planes, 1, dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def _init_resnet(module):
    for m in module.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _resnet(name, block, layers, deep_stem, dilation_rule, width=64):
    """A dilated ResNet; ``width`` is the first stage's channel count (64 as published; every other width scales
    with it)."""
    if deep_stem:
        half, full = width, 2 * width
        layer0 = nn.Sequential(OrderedDict([
            ("conv1", _conv3x3(3, half, stride=2)), ("bn1", nn.BatchNorm2d(half)), ("relu1", nn.ReLU(inplace=True)),
            ("conv2", _conv3x3(half, half)), ("bn2", nn.BatchNorm2d(half)), ("relu2", nn.ReLU(inplace=True)),
            ("conv3", _conv3x3(half, full)), ("bn3", nn.BatchNorm2d(full)), ("relu3", nn.ReLU(inplace=True)),
            ("maxpool", nn.MaxPool2d(3, stride=2, padding=1))]))
        inplanes = full
    else:
        layer0 = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)), ("bn1", nn.BatchNorm2d(64)),
            ("relu", nn.ReLU(inplace=True)), ("maxpool", nn.MaxPool2d(3, stride=2, padding=1))]))
        inplanes = 64
    stages, channels = [layer0], [inplanes]
    # (planes, stride, dilation) per stage: layer3/4 dilated instead of strided -> output stride 8; under the
    # torchvision rule a stage's first block keeps the previous stage's dilation
    dilations = (1, 1, 2, 4)
    planes_per_stage = (width, 2 * width, 4 * width, 8 * width)
    for i, (planes, blocks, stride) in enumerate(zip(planes_per_stage, layers, (1, 2, 1, 1))):
        first = dilations[i] if dilation_rule == "every_block" else dilations[max(i - 1, 0)]
        stages.append(_resnet_stage(block, inplanes, planes, blocks, stride, dilations[i], first))
        inplanes = planes * block.expansion
        channels.append(inplanes)
    backbone = Backbone(name, stages, channels, output_stride=8)
    backbone.dilation_rule = dilation_rule
    _init_resnet(backbone)
    return backbone


# torchvision vgg16_bn.features, as (out_channels | "M") entries; each conv entry is conv, bn, relu.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG_SPLIT = (0, 7, 14, 24, 34, 43)  # PFENet's get_vgg16_layer: features[0:7], [7:14], [14:24], [24:34], [34:43]


def _vgg16_bn(name):
    features, in_c = [], 3
    for v in _VGG16:
        if v == "M":
            features.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
        else:
            features += [nn.Conv2d(in_c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            in_c = v
    stages = [nn.Sequential(*features[a:b]) for a, b in zip(_VGG_SPLIT[:-1], _VGG_SPLIT[1:])]
    for m in features:  # torchvision's VGG initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return Backbone(name, stages, (64, 128, 256, 512, 512), output_stride=16)


BACKBONES = {
    "resnet50": lambda rule: _resnet("resnet50", Bottleneck, (3, 4, 6, 3), True, rule),
    "resnet101": lambda rule: _resnet("resnet101", Bottleneck, (3, 4, 23, 3), True, rule),
    "resnet18_deep": lambda rule: _resnet("resnet18_deep", BasicBlock, (2, 2, 2, 2), True, rule),
    "resnet18_deep_half": lambda rule: _resnet("resnet18_deep_half", BasicBlock, (2, 2, 2, 2), True, rule, width=32),
    "resnet50_tv": lambda rule: _resnet("resnet50_tv", Bottleneck, (3, 4, 6, 3), False, rule),
    "vgg16_bn": lambda rule: _vgg16_bn("vgg16_bn"),  # not dilated: the rule does not apply
    "swin_t": lambda rule: _swin("swin_t"), "swin_s": lambda rule: _swin("swin_s"),  # nor here
    "swin_b": lambda rule: _swin("swin_b"),
}


def _swin(name):
    from .swin import swin_backbone  # imports torchvision, which the ResNet/VGG backbones do not need
    return swin_backbone(name)


ALL_ARCHS = ("pspnet", "baseline", "pfenet", "bam")


@dataclass(frozen=True)
class Family:
    """One family of backbones: which of its outputs play layer0 .. layer4 (``layers``, ``strides``: the rule, in
    words, for the docs and ``python -m model.summary``), how to build one, and the few-shot archs it is wired for.
    ``names``: the fixed backbone names it builds; ``timm_modules``: for ``timm:<name>``, the timm modules whose
    models it takes (``()``: every other timm model)."""
    name: str
    layers: str
    strides: str
    names: tuple = ()
    timm_modules: Optional[tuple] = None
    archs: tuple = ALL_ARCHS
    create_kwargs: tuple = ()  # timm.create_model options ((key, value) pairs), passed where the model takes them


FAMILIES = (
    Family("resnet-deep", "layer0 = deep stem (3x3 convs 3-64-64-128 + max-pool), layer1-4 = the four residual stages",
           "4, 4, 8, 8, 8 (layer3/4 dilated 2/4)", names=("resnet50", "resnet101", "resnet18_deep", "resnet18_deep_half")),
    Family("torchvision", "layer0 = conv1, bn1, relu, maxpool; layer1-4 = torchvision's layer1-4",
           "4, 4, 8, 8, 8 (layer3/4 dilated 2/4)", names=("resnet50_tv",)),
    Family("vgg", "features split as PFENet/BAM: [0:7], [7:14], [14:24], [24:34], [34:43]", "2, 4, 8, 16, 16",
           names=("vgg16_bn",)),
    Family("swin", "layer0 = patch embedding, layer1-4 = the four stages (torchvision's features 1, 2-3, 4-5, 6-7)",
           "4, 4, 8, 16, 32", names=("swin_t", "swin_s", "swin_b"), archs=("baseline", "pfenet")),
    Family("timm-vit", "layer0 = patch embedding + tokens + position embedding; layer1-4 = the blocks in four equal "
           "runs ([0, d/4), [d/4, d/2), [d/2, 3d/4), [3d/4, d) + final norm); feature = the last block's patch tokens "
           "through the final norm", "the patch size (14 or 16) for every layer; the image resized to the nearest "
           "multiple of it", timm_modules=("vision_transformer", "eva", "deit"),
           create_kwargs=(("dynamic_img_size", True),)),
    Family("timm-hierarchical", "layer0 = stem / patch embedding, layer1-4 = the four stages (timm's feature_info)",
           "4, 4, 8, 16, 32", timm_modules=("convnext", "swin_transformer", "swin_transformer_v2"),
           create_kwargs=(("strict_img_size", False),)),  # Swin: any input size (windows padded)
    Family("timm-cnn", "layer0 = every trunk module before the last four feature_info levels (ResNet: conv1, bn1, "
           "act1, maxpool), layer1-4 = the trunk up to each of those levels", "feature_info's; output_stride=8 where the "
           "model takes it (ResNets: 2, 4, 8, 8, 8)", timm_modules=(), create_kwargs=(("output_stride", 8),)),
)


def family_of(name):
    """The ``Family`` of backbone ``name`` (``timm:<name>`` goes by the timm module that defines the model)."""
    if name.startswith("timm:"):
        from .timm_backbone import timm_module, timm_name
        module = timm_module(timm_name(name))
        timm_families = [f for f in FAMILIES if f.timm_modules is not None]
        return next((f for f in timm_families if module in f.timm_modules),
                    next(f for f in timm_families if f.timm_modules == ()))
    for family in FAMILIES:
        if name in family.names:
            return family
    raise ValueError(f"unknown backbone {name!r}: expected one of {sorted(BACKBONES)} or timm:<timm model name>")


def _build_timm(name, family, hub=False, timm_kwargs=None):
    from .timm_backbone import FeatureBackbone, ViTBackbone, create, timm_module, timm_name
    short = timm_name(name)
    kwargs = dict(family.create_kwargs)
    kwargs.update(timm_kwargs or {})
    try:
        net = create(short, hub=hub, **kwargs)
    except ValueError:  # the family's options apply where the model takes them (a CNN that does not dilate
        optional = [k for k in dict(family.create_kwargs) if k not in (timm_kwargs or {})]  # keeps its stride)
        if not optional:
            raise
        net = create(short, hub=hub, **{k: v for k, v in kwargs.items() if k not in optional})
    cls = ViTBackbone if family.name == "timm-vit" else FeatureBackbone
    return cls(name, net, family.name, timm_module(short))


def build_backbone(name, dilation_rule="every_block", hub=False, timm_kwargs=None):
    """A randomly initialised backbone by name (one of ``BACKBONES``, or ``timm:<name>``) with the ResNet dilation
    rule ``dilation_rule`` (one of ``DILATION_RULES``); load weights with ``model.weights``. ``hub``: a timm model
    with timm's own pretrained weights (downloaded); ``timm_kwargs``: options of ``timm.create_model``."""
    if dilation_rule not in DILATION_RULES:
        raise ValueError(f"unknown dilation_rule {dilation_rule!r}: expected one of {DILATION_RULES}")
    family = family_of(name)
    if family.timm_modules is not None:
        return _build_timm(name, family, hub, timm_kwargs)
    if hub or timm_kwargs:
        raise ValueError(f"backbone={name} is not a timm model: pretrained=hub and backbone_kwargs apply to "
                         "backbone=timm:<name> only; give a weights file")
    backbone = BACKBONES[name](dilation_rule)
    backbone.family = family.name
    return backbone
