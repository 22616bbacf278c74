"""``build_model(cfg)``: the one way to build a model, and ``param_groups(model, cfg)``: what trains and how fast.

How the config chooses the model:
- ``arch``: ``pspnet`` (BAM's stage 1) | ``baseline`` | ``pfenet`` | ``bam``;
- ``backbone``: ``resnet50`` | ``resnet101`` | ``resnet18_deep`` | ``vgg16_bn`` | ``resnet50_tv``, dilated by
  ``dilation_rule`` (``auto``: BAM's rule for bam/pspnet, torchvision's for baseline/pfenet, as the released code);
- ``pretrained``: backbone weights file (or null: random init, with a warning); for ``bam`` the backbone and
  the base learner come from ``base_learner`` (the stage-1 PSPNet checkpoint) instead;
- ``svf``: on, the backbone goes through ``svf.resolver`` (exact SVD of every conv) and
  ``svf.apply_paper_freezing`` (layer0/1 frozen, layer2-4 train only ``vector_S``, BatchNorm frozen in eval
  mode); for ``bam`` the base learner then reads a frozen plain copy of the stage-1 backbone (``base_backbone``),
  as the released BAM+SVF; off, the backbone of the few-shot models is frozen (no grads, BatchNorm in eval) as
  in PFENet/BAM, and the PSPNet backbone is trained fully (BAM's stage 1).

``cfg`` is a complete config (``common.config.load_config`` from a file, or ``common.config.defaults(**keys)``
without one); this module reads ``cfg.key`` and has no defaults of its own.
"""
import os
import warnings

import svf

from .backbones import build_backbone
from .fewshot import BAM, PFENet, Baseline
from .pspnet import PSPNet
from .released import convert_released, detect_format
from .weights import load_backbone_weights, load_state_dict_strict, read_state_dict

__all__ = ["build_model", "param_groups", "ARCHS", "dilation_rule", "load_base_learner",
           "RandomInitWarning"]


class RandomInitWarning(UserWarning):
    """A part of the model is randomly initialised because its weights file is not set (tests, demos)."""

ARCHS = ("pspnet", "baseline", "pfenet", "bam")


BASE_LEARNER_HELP = ("The stage-1 PSPNet checkpoint is what training arch=pspnet on the same benchmark and fold "
                     "writes (e.g. exp/<run>/best.pth); train it first, then point `base_learner` at it.")


def _base_class_ids(cfg):
    """Global ids of the base classes in the base learner's label order (1..n)."""
    from dataset.splits import base_classes  # the one place fold splits live
    return base_classes(cfg.benchmark, cfg.fold, cfg.coco_split)


def _num_base_classes(cfg):
    ids = _base_class_ids(cfg)
    if cfg.num_base_classes != len(ids) + 1:
        raise ValueError(f"num_base_classes={cfg.num_base_classes} but {cfg.benchmark} fold {cfg.fold} "
                         f"has {len(ids)} base classes (+1 background = {len(ids) + 1})")
    return cfg.num_base_classes


def dilation_rule(cfg):
    """The ResNet dilation rule of the model ``cfg`` describes: ``auto`` is the one the released code used for
    that arch (BAM's PSPNet: every block; the SVF code's baseline and PFENet: torchvision's)."""
    rule = cfg.dilation_rule
    if rule == "auto":
        return "every_block" if cfg.arch in ("bam", "pspnet") else "torchvision"
    return rule


def _backbone_from(cfg):
    backbone = build_backbone(cfg.backbone, dilation_rule(cfg))
    path = cfg.pretrained
    if path:
        load_backbone_weights(backbone, path)
    else:
        warnings.warn(f"pretrained is not set: the {backbone.name} backbone is randomly initialised "
                      "(fine for tests and demos, meaningless for results)", RandomInitWarning, stacklevel=3)
    return backbone


def _pspnet(cfg, backbone):
    return PSPNet(backbone, _num_base_classes(cfg), tuple(cfg.ppm_bins))


def _set_backbone_training(model, cfg):
    """SVF on: exact SVD + the paper's freezing. SVF off: frozen few-shot backbone, fully trained PSPNet one."""
    if cfg.svf:
        plain = model.backbone
        model.backbone = svf.resolver(plain)  # a converted copy; exact at ratio 1.0
        if isinstance(model, BAM):  # the base learner keeps reading the original stage-1 backbone
            model.set_base_backbone(plain)  # frozen, and kept in eval mode by train()
        svf.apply_paper_freezing(model.backbone)
        model.eval_modules = tuple(dict.fromkeys(model.eval_modules + ("backbone",)))
    elif isinstance(model, PSPNet):
        model.backbone.requires_grad_(True)
    else:
        model.backbone.requires_grad_(False)  # kept in eval mode by train() (FewShotModel.eval_modules)
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
    if cfg.backbone.startswith("swin") and arch not in ("baseline", "pfenet"):
        raise ValueError(f"backbone={cfg.backbone} is wired for arch=baseline and arch=pfenet only "
                         f"(got arch={arch}): BAM's base learner and the PSPNet head expect a ResNet/VGG layout")
    reduce_dim, aux = int(cfg.reduce_dim), float(cfg.aux_loss_weight)
    if arch == "bam":
        path = cfg.base_learner
        if path:
            pspnet = _pspnet(cfg, build_backbone(cfg.backbone, dilation_rule(cfg)))
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
    - ``singular_values`` (SVF on): the backbone's trainable ``vector_S``, lr_mult cfg.svf_lr_mult,
      weight decay cfg.weight_decay only if cfg.svf_weight_decay;
    - ``backbone`` (pspnet without SVF): lr_mult cfg.backbone_lr_mult, weight decay cfg.weight_decay.
    Empty groups are left out."""
    model = getattr(model, "module", model)  # a DistributedDataParallel wrapper
    weight_decay = float(cfg.weight_decay)
    in_backbone = {id(p) for p in model.backbone.parameters()}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in in_backbone]
    backbone = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
    groups = [{"name": "heads", "params": heads, "lr_mult": float(cfg.head_lr_mult),
               "weight_decay": weight_decay}]
    if cfg.svf:
        other = [n for n, _ in backbone if "vector_S" not in n]
        if other:
            raise ValueError(f"SVF is on but these backbone tensors are trainable too: {other[:5]} "
                             f"({len(other)} in all); build the model with build_model")
        groups.append({"name": "singular_values", "params": [p for _, p in backbone],
                       "lr_mult": float(cfg.svf_lr_mult),
                       "weight_decay": weight_decay if cfg.svf_weight_decay else 0.0})
    else:
        groups.append({"name": "backbone", "params": [p for _, p in backbone],
                       "lr_mult": float(cfg.backbone_lr_mult), "weight_decay": weight_decay})
    return [g for g in groups if g["params"]]
