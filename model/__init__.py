"""Models for few-shot segmentation: backbones (stages layer0..layer4), the PSPNet base learner, and the
``baseline`` / ``pfenet`` / ``bam`` few-shot models, with SVF on or off.

    model = build_model(cfg)                 # the one builder (cfg.arch, cfg.backbone, cfg.svf, ...)
    groups = param_groups(model, cfg)        # explicit lr_mult / weight_decay per group
    load_backbone_weights(backbone, path)    # strict loading of resnet50_v2.pth / torchvision / own checkpoints
"""
from .backbones import BACKBONES, STAGES, Backbone, build_backbone
from .build import ARCHS, RandomInitWarning, build_model, param_groups
from .fewshot import BAM, PFENet, Baseline
from .pspnet import PSPNet
from .weights import load_backbone_weights

__all__ = ["build_model", "param_groups", "load_backbone_weights", "build_backbone", "Backbone", "BACKBONES",
           "STAGES", "ARCHS", "PSPNet", "Baseline", "PFENet", "BAM", "RandomInitWarning"]
