"""``build_model(cfg)``: the one way to build a model, and ``param_groups(model, cfg)``: what trains and how fast.

How the config chooses the model:
- ``arch``: ``pspnet`` (BAM's stage 1) | ``baseline`` | ``pfenet`` | ``bam``;
- ``backbone``: ``resnet50`` | ``resnet101`` | ``resnet18_deep`` | ``vgg16_bn`` | ``resnet50_tv``, dilated by
  ``dilation_rule`` (``auto``: BAM's rule for bam/pspnet, torchvision's for baseline/pfenet, as the released code);
  ``swin_t/s/b``; ``timm:<name>`` (any timm model, ``backbone_kwargs`` its ``timm.create_model`` options); each
  name belongs to one family of ``model.backbones.FAMILIES``, which says which outputs play layer0-4;
- ``pretrained``: backbone weights file (or null: random init, with a warning; ``hub``: timm downloads the weights
  of a ``timm:`` backbone); for ``bam`` the backbone and
  the base learner come from ``base_learner`` (the stage-1 PSPNet checkpoint) instead;
- ``finetune`` (or, when null, ``svf``): how the backbone trains, one entry of the registry in model/finetune.py.
  ``svf`` (svf: true): the backbone goes through ``svf.resolver`` (exact SVD of every conv) and
  ``svf.apply_paper_freezing`` (layer0/1 frozen, layer2-4 train only ``vector_S``, BatchNorm frozen in eval
  mode); ``freeze`` (svf: false, few-shot models): no grads, BatchNorm in eval, as in PFENet/BAM; ``full``
  (svf: false, PSPNet): the whole backbone trains (BAM's stage 1); and ``bias``, ``bn``, ``lora``, ``dna``.
  For ``bam`` the base learner reads a frozen plain copy of the stage-1 backbone (``base_backbone``) whenever
  the method changes the backbone, as the released BAM+SVF.

``cfg`` is a complete config (``common.config.load_config`` from a file, or ``common.config.defaults(**keys)``
without one); this module reads ``cfg.key`` and has no defaults of its own.
"""
import os
import warnings

import svf
from engine.checkpoint import check_weights

from . import finetune
from .backbones import build_backbone, family_of
from .fewshot import BAM, PFENet, Baseline
from .pspnet import PSPNet
from .released import convert_released, detect_format
from .timm_backbone import HUB
from .weights import load_backbone_weights, load_state_dict_strict, read_state_dict

__all__ = ["build_model", "param_groups", "ARCHS", "dilation_rule", "load_base_learner",
           "RandomInitWarning"]


class RandomInitWarning(UserWarning):
    """A part of the model is randomly initialised because its weights file is not set (tests, demos)."""

ARCHS = ("pspnet", "baseline", "pfenet", "bam")


BASE_LEARNER_HELP = ("The stage-1 PSPNet checkpoint is what training arch=pspnet on the same benchmark and fold "
                     "writes (e.g. exp/<run>/best.pth); train it first, then point `base_learner` at it.")


def _base_class_ids(cfg):
    """Global ids of the classes the base learner knows, in its label order (1..n): the training classes."""
    from dataset import train_classes_of  # the dataset registry: the one place of a benchmark's classes
    return train_classes_of(cfg)


def _num_base_classes(cfg):
    ids = _base_class_ids(cfg)
    if cfg.num_base_classes != len(ids) + 1:
        raise ValueError(f"num_base_classes={cfg.num_base_classes} but {cfg.benchmark} fold {cfg.fold} "
                         f"has {len(ids)} {'training' if cfg.train_classes == 'all' else 'base'} classes "
                         f"(+1 background = {len(ids) + 1}): set num_base_classes={len(ids) + 1}")
    return cfg.num_base_classes


def dilation_rule(cfg):
    """The ResNet dilation rule of the model ``cfg`` describes: ``auto`` is the one the released code used for
    that arch (BAM's PSPNet: every block; the SVF code's baseline and PFENet: torchvision's)."""
    rule = cfg.dilation_rule
    if rule == "auto":
        return "every_block" if cfg.arch in ("bam", "pspnet") else "torchvision"
    return rule


def _plain_backbone(cfg, hub=False):
    """The backbone ``cfg`` names, randomly initialised (``hub``: a timm model with timm's downloaded weights)."""
    return build_backbone(cfg.backbone, dilation_rule(cfg), hub=hub, timm_kwargs=cfg.backbone_kwargs or None)


def _backbone_from(cfg):
    path = cfg.pretrained
    hub = path == HUB
    backbone = _plain_backbone(cfg, hub=hub)
    if hub:  # timm downloaded them: the weight rule still applies
        check_weights(backbone.state_dict(), f"{HUB}:{cfg.backbone}", "backbone weights")
    elif path:
        load_backbone_weights(backbone, path)
    else:
        warnings.warn(f"pretrained is not set: the {backbone.name} backbone is randomly initialised "
                      "(fine for tests and demos, meaningless for results)", RandomInitWarning, stacklevel=3)
    return backbone


def _pspnet(cfg, backbone):
    return PSPNet(backbone, _num_base_classes(cfg), tuple(cfg.ppm_bins))


def _set_backbone_training(model, cfg):
    """What the backbone trains: the ``finetune`` method's registry entry (model/finetune.py)."""
    finetune.apply(model, cfg)
    if cfg.fold_batchnorm and not isinstance(model, PSPNet):  # exact, and only while a BatchNorm stays frozen
        svf.fold_batchnorm(model)
    model.train()
    return model


def load_base_learner(pspnet, path):
    """Load the stage-1 PSPNet checkpoint ``path`` into ``pspnet``, strictly: this project's own or BAM's
    released one (``{'state_dict': ...}`` with ``layer0..4``, ``encoder``, ``ppm``, ``cls``), recognised by its keys."""
    what = "base learner (stage-1 PSPNet)"
    state = read_state_dict(path, what, BASE_LEARNER_HELP)
    if detect_format(state) == "pspnet":
        state, _, report = convert_released(state, pspnet, path)
        if os.environ.get("RANK", "0") == "0":
            print("base_learner: " + "; ".join(report), flush=True)
    return load_state_dict_strict(pspnet, state, path, what=what)


def build_model(cfg):
    """The model for ``cfg.arch`` (see the module docstring), with its trainable set already chosen."""
    arch = cfg.arch
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: expected one of {ARCHS}")
    family = family_of(cfg.backbone)
    if arch not in family.archs:
        raise ValueError(f"backbone={cfg.backbone} is wired for {' and '.join('arch=' + a for a in family.archs)} only "
                         f"(got arch={arch}): BAM's base learner and the PSPNet head expect a ResNet/VGG layout")
    reduce_dim, aux = int(cfg.reduce_dim), float(cfg.aux_loss_weight)
    if arch == "bam":
        path = cfg.base_learner
        if path:
            pspnet = _pspnet(cfg, _plain_backbone(cfg))
            load_base_learner(pspnet, path)
        else:
            warnings.warn("base_learner is not set: BAM's base learner (PSPNet head) is randomly initialised "
                          "(fine for tests and demos, meaningless for results)", RandomInitWarning, stacklevel=2)
            pspnet = _pspnet(cfg, _backbone_from(cfg))
        model = BAM(pspnet.backbone, pspnet.head, shot=int(cfg.shot), reduce_dim=reduce_dim,
                    aux_loss_weight=aux, base_class_ids=_base_class_ids(cfg),
                    base_learner_dropout=bool(cfg.base_learner_dropout))
    elif arch == "pspnet":
        model = _pspnet(cfg, _backbone_from(cfg))
    elif arch == "baseline":
        model = Baseline(_backbone_from(cfg), reduce_dim=reduce_dim, aux_loss_weight=aux)
    else:
        model = PFENet(_backbone_from(cfg), reduce_dim=reduce_dim, aux_loss_weight=aux,
                       pyramid_bins=tuple(cfg.pyramid_bins))
    return _set_backbone_training(model, cfg)


def param_groups(model, cfg):
    """Optimizer parameter groups, each with ``name``, explicit ``lr_mult`` and ``weight_decay`` (the engine
    sets lr = base_lr * lr_mult; nothing else scales the LR):
    - ``heads``: every trainable parameter outside the backbone, lr_mult cfg.head_lr_mult (BAM's recipe: 10),
      weight decay cfg.weight_decay;
    - the backbone's trainable tensors, in the group the ``finetune`` method names, at its LR key
      (model/finetune.py: ``singular_values`` at svf_lr_mult, weight decay only if svf_weight_decay;
      ``backbone`` at backbone_lr_mult for full, the stage-1 PSPNet's; ``biases``, ``batchnorm``, ``lora``,
      ``dna`` at bias/bn/lora/dna_lr_mult), weight decay cfg.weight_decay.
    Empty groups are left out."""
    model = getattr(model, "module", model)  # a DistributedDataParallel wrapper
    in_backbone = {id(p) for p in model.backbone.parameters()}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in in_backbone]
    groups = [{"name": "heads", "params": heads, "lr_mult": float(cfg.head_lr_mult),
               "weight_decay": float(cfg.weight_decay)}, finetune.backbone_group(model, cfg)]
    return [g for g in groups if g and g["params"]]
