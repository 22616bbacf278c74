"""How the backbone trains: ONE registry of fine-tuning methods (config key ``finetune``).

Each ``Method`` declares, in one entry of ``METHODS``:
- ``trains``: what trains, in words (docs, ``python -m model.summary``);
- ``prepare(backbone, stages, cfg)``: converts / marks the backbone's ``finetune_stages`` (every other parameter
  of the backbone is frozen first) and returns the backbone (a converted copy or the same object);
- ``in_place``: whether ``prepare`` changes the backbone it is given (BAM then hands it a copy, so that its
  base learner keeps reading the untouched stage-1 backbone);
- ``group`` / ``lr_key``: the optimizer group of the backbone tensors that train and the config key of its LR
  multiplier (``lr = base_lr * cfg.<lr_key>``); ``weight_decay_key``: a bool key that switches the group's weight
  decay (svf: ``svf_weight_decay``), else the group has ``weight_decay``;
- ``merge``: how the trained backbone becomes plain layers (svf: ``svf.merge``; lora/dna: ``lrcc.merge``;
  exact up to float rounding), or None when the backbone already is plain;
- ``trains_bn_statistics``: BatchNorm running statistics of the tuned stages update in training. Only ``full``
  says so, and only the stage-1 PSPNet uses it (BAM's stage 1); the few-shot models always run their backbone
  in eval mode (PFENet/BAM), and every other method keeps the statistics frozen;
- ``refuses(backbone, stages, cfg)``: a one-line reason when the method cannot work on this backbone, or None.

A stage of ``finetune_stages`` is whatever the backbone says it is made of (``stage_prefixes`` / ``stage_modules``:
``layer0 .. layer4``, or for a timm backbone also its module paths such as ``blocks.6-11``), so every method works
on every backbone family (model/backbones.py ``FAMILIES``) without a branch per backbone.

``apply(model, cfg)`` is what ``model.build.build_model`` calls; ``param_groups`` reads the group and LR key
from here; ``trainable_names(backbone, cfg)`` is the exact set a method trains (tests, the checks below).
``finetune: null`` derives the method from ``svf`` (``common.config.finetune_method``): the derived full
training of the stage-1 PSPNet trains every stage (BAM's stage 1), whatever ``finetune_stages`` says by default.
"""
import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

import svf
from common.config import FIELDS, FINETUNE_METHODS, finetune_method

from .backbones import STAGES

__all__ = ["Method", "METHODS", "method_of", "tuned_stages", "apply", "trainable_names", "backbone_group",
           "merged", "describe", "describe_ranks", "state_config_keys"]

_BN = nn.modules.batchnorm._BatchNorm
_LAYER_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)  # timm's LayerNorm/LayerNorm2d subclass nn.LayerNorm


def _modules_of(backbone, stage):
    """(name, module) of the modules that make ``stage``: what the backbone says (model.backbones.Backbone and the
    timm backbones), or, for any other module with stages as attributes (layer2 ...), that attribute."""
    if hasattr(backbone, "stage_modules"):
        return backbone.stage_modules(stage)
    return [(stage, getattr(backbone, stage))]


def _prefixes_of(backbone, stage):
    """Parameter-name prefixes of ``stage`` (see _modules_of)."""
    return backbone.stage_prefixes(stage) if hasattr(backbone, "stage_prefixes") else (f"{stage}.",)


def _stage_modules(backbone, stages):
    """(name in the backbone, module) of every module of ``stages`` (layer0..4, or a timm backbone's module paths)."""
    return [(n, m) for s in stages for n, m in _modules_of(backbone, s)]


def _in_stages(backbone, stages):
    """A predicate on backbone parameter names: does the name belong to one of ``stages``?"""
    prefixes = tuple(p for s in stages for p in _prefixes_of(backbone, s))
    exact = {p for p in prefixes if not p.endswith(".")}
    starts = tuple(p for p in prefixes if p.endswith("."))
    return lambda name: name in exact or name.startswith(starts)


def _mark(backbone, stages, wanted):
    """requires_grad on the parameters of ``stages`` for which ``wanted(owner module, param_name)`` holds."""
    inside = _in_stages(backbone, stages)
    for name, p in backbone.named_parameters():
        if inside(name):
            owner, _, leaf = name.rpartition(".")
            if wanted(backbone.get_submodule(owner) if owner else backbone, leaf):
                p.requires_grad_(True)
    return backbone


def _norm_kinds(backbone, stages):
    """The norm layers ``bn`` trains: BatchNorm where the tuned stages have any, else LayerNorm/GroupNorm/RMSNorm."""
    modules = [x for _, m in _stage_modules(backbone, stages) for x in m.modules()]
    return _BN if any(isinstance(x, _BN) for x in modules) else _LAYER_NORMS


# ---- prepare: per method ---------------------------------------------------------------------------------

def _prepare_freeze(backbone, stages, cfg):
    return backbone


def _prepare_svf(backbone, stages, cfg):
    # a converted copy, exact at ratio 1.0 (a timm backbone leaves the modules outside the tuned stages plain)
    resolved = svf.resolver(backbone, excluded_layers=backbone.svf_excluded(stages))
    tuned = [n for n, m in _stage_modules(resolved, stages) if any(isinstance(x, svf.SVDLayer) for x in m.modules())]
    # the paper's freezing: everything frozen (BatchNorm in eval) but the singular values of the tuned stages
    svf.prepare(resolved, tuned, frozen_stages="rest", factors=cfg.svf_factors, verbose=False)
    return resolved


def _prepare_full(backbone, stages, cfg):
    return _mark(backbone, stages, lambda m, n: True)


def _prepare_bias(backbone, stages, cfg):
    return _mark(backbone, stages, lambda m, n: n == "bias")


def _prepare_bn(backbone, stages, cfg):
    kinds = _norm_kinds(backbone, stages)
    return _mark(backbone, stages, lambda m, n: isinstance(m, kinds))


def _lrcc_convert(backbone, stages, mode, cfg):
    import lrcc  # the sibling package: needed by lora/dna only

    options = dict(r=int(cfg.lrcc_rank), r_ratio=float(cfg.lrcc_rank_ratio), verbose=False)
    if mode == "lora_mode":
        options["lora_alpha"] = cfg.lora_alpha
    else:
        options.update(compress_step=int(cfg.dna_compress_step), lambda_s=float(cfg.dna_lambda_s))
    _check_layers_run(backbone, stages, cfg)
    for name, module in _stage_modules(backbone, stages):
        if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules()):
            continue  # a norm layer or an embedding: nothing to convert
        cache = None
        if mode != "lora_mode" and cfg.dna_cache:  # one file per stage module: the cache key is per call
            root, ext = (cfg.dna_cache.rsplit(".", 1) + [""])[:2] if "." in cfg.dna_cache else (cfg.dna_cache, "")
            cache = f"{root}.{name}" + (f".{ext}" if ext else "")
        converted = lrcc.model_convert_conv(module, mode, cache_path=cache, include_linear=True, **options)
        backbone.set_submodule(name, converted)  # the converted layers' own factors train (lrcc.TRAINABLE_BY_MODE)
    return backbone


def _check_layers_run(backbone, stages, cfg):
    """Every layer lrcc converts must be called by the forward pass: a module that reads a layer's ``weight``
    instead (torchvision's Swin attention; timm's attention with separate q/v biases, the *_qkvb models) would
    silently ignore the adapter. One look at a small image tells, before anything is converted."""
    attention = {id(c) for m in backbone.modules() if isinstance(m, nn.MultiheadAttention) for c in m.children()}
    layers = {f"{n}.{sub}" if sub else n: m for n, module in _stage_modules(backbone, stages)
              for sub, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in attention}
    called = set()
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: called.add(n)) for n, m in layers.items()]
    training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(torch.zeros(1, 3, 64, 64, device=next(backbone.parameters()).device))
    finally:
        backbone.train(training)
        for h in hooks:
            h.remove()
    unused = [n for n in layers if n not in called]
    if unused:
        raise ValueError(f"finetune={cfg.finetune}: the {backbone.name} backbone reads the weight of {unused[0]} "
                         f"directly instead of calling the layer ({len(unused)} such layers), so a LoRA/DnA layer "
                         "there would be ignored; use finetune=svf (its layers give the merged weight when read), "
                         "bias, bn or full")


def _prepare_lora(backbone, stages, cfg):
    return _lrcc_convert(backbone, stages, "lora_mode", cfg)


def _prepare_dna(backbone, stages, cfg):
    return _lrcc_convert(backbone, stages, cfg.dna_mode, cfg)


# ---- refusals ----------------------------------------------------------------------------------------------

def _stages_without(backbone, stages, kind):
    return [s for s in stages
            if not any(isinstance(x, kind) for _, m in _modules_of(backbone, s) for x in m.modules())]


def _refuses_bn(backbone, stages, cfg):
    missing = _stages_without(backbone, stages, _norm_kinds(backbone, stages))
    if missing:
        return (f"finetune=bn trains norm layers (BatchNorm, or LayerNorm where there is no BatchNorm), but the "
                f"{backbone.name} backbone's {missing[0]} has none; use finetune=bias or full for it")
    return None


def _refuses_bias(backbone, stages, cfg):
    missing = [s for s in stages if not any(n.endswith("bias") for n, _ in backbone.named_parameters()
                                            if _in_stages(backbone, [s])(n))]
    if missing:
        return f"finetune=bias: the {backbone.name} backbone's {missing[0]} has no bias parameter to train"
    return None


def _refuses_lrcc(backbone, stages, cfg):
    missing = _stages_without(backbone, stages, (nn.Conv2d, nn.Linear))
    if missing:
        return (f"finetune={cfg.finetune} converts nn.Conv2d and nn.Linear layers (lrcc), but the {backbone.name} "
                f"backbone's {missing[0]} has none; use finetune=bias or full for it")
    return None


# ---- trainable sets (independent of prepare: the tests and param_groups check one against the other) -------

def _names_in(backbone, stages, wanted):
    inside = _in_stages(backbone, stages)
    return {n for n, p in backbone.named_parameters() if inside(n) and wanted(n)}


def _svf_factor_names(name, factors):
    leaf = name.rsplit(".", 2)
    owner = leaf[-2] if len(leaf) >= 2 else ""
    if name.endswith("vector_S"):
        return True
    if leaf[-1] != "weight":
        return False  # U's bias (the layer's original bias) never trains
    return (("U" in factors and owner in ("conv_U", "fc_U")) or ("V" in factors and owner in ("conv_V", "fc_V")))


@dataclass(frozen=True)
class Method:
    name: str
    trains: str
    prepare: Callable
    in_place: bool
    group: Optional[str]
    lr_key: Optional[str]
    trainable: Callable                      # (backbone, stages, cfg) -> set of parameter names
    merge: Optional[Callable] = None
    weight_decay_key: Optional[str] = None
    trains_bn_statistics: bool = False
    refuses: Callable = lambda backbone, stages, cfg: None


def _lrcc_trainable(backbone, stages, cfg):
    import lrcc
    out = set()
    for stage_name, module in _stage_modules(backbone, stages):
        for name, m in module.named_modules():
            if isinstance(m, lrcc.LOW_RANK_LAYERS):
                out.update(f"{stage_name}.{name}.{t}" if name else f"{stage_name}.{t}" for t in lrcc.TRAINABLE_BY_MODE[m.mode])
    return out


def _norm_trainable(backbone, stages, cfg):
    kinds = _norm_kinds(backbone, stages)
    return _names_in(backbone, stages, lambda n: isinstance(backbone.get_submodule(n.rpartition(".")[0]), kinds))


def _lrcc_merge(backbone):
    import lrcc
    return lrcc.merge(backbone)


METHODS = {m.name: m for m in (
    Method("freeze", "nothing in the backbone", _prepare_freeze, in_place=False, group=None, lr_key=None,
           trainable=lambda b, s, c: set()),
    Method("svf", "the singular values S of every conv/linear (svf_factors: also U and/or V)", _prepare_svf,
           in_place=False, group="singular_values", lr_key="svf_lr_mult",
           trainable=lambda b, s, c: _names_in(b, s, lambda n: _svf_factor_names(n, c.svf_factors)),
           merge=svf.merge, weight_decay_key="svf_weight_decay"),
    Method("full", "every parameter (BatchNorm gamma/beta included)", _prepare_full, in_place=True,
           group="backbone", lr_key="backbone_lr_mult", trainable=lambda b, s, c: _names_in(b, s, lambda n: True),
           trains_bn_statistics=True),
    Method("bias", "every bias: conv/linear biases and BatchNorm/LayerNorm beta (BitFit)", _prepare_bias,
           in_place=True, group="biases", lr_key="bias_lr_mult",
           trainable=lambda b, s, c: _names_in(b, s, lambda n: n.rsplit(".", 1)[-1] == "bias"),
           refuses=_refuses_bias),
    Method("bn", "norm-layer gamma and beta: BatchNorm (statistics stay frozen), or LayerNorm/GroupNorm on a backbone "
           "without BatchNorm (ViTs, ConvNeXt)", _prepare_bn, in_place=True, group="batchnorm", lr_key="bn_lr_mult",
           trainable=_norm_trainable, refuses=_refuses_bn),
    Method("lora", "LoRA factors A, B of every conv and linear layer (lrcc lora_mode; rank lrcc_rank / lrcc_rank_ratio)",
           _prepare_lora, in_place=True, group="lora", lr_key="lora_lr_mult", trainable=_lrcc_trainable,
           merge=_lrcc_merge, refuses=_refuses_lrcc),
    Method("dna", "DnA factors of every conv and linear layer, W = U.V + S (lrcc dna_mode; rank lrcc_rank / "
           "lrcc_rank_ratio)",
           _prepare_dna, in_place=True, group="dna", lr_key="dna_lr_mult", trainable=_lrcc_trainable,
           merge=_lrcc_merge, refuses=_refuses_lrcc),
)}
assert tuple(METHODS) == FINETUNE_METHODS, "common.config.FINETUNE_METHODS lists the registry's methods"


def method_of(cfg) -> Method:
    """The registry entry ``cfg`` runs (``finetune``, or the one ``svf`` derives)."""
    return METHODS[finetune_method(cfg)]


def _derived_stage1(cfg):
    return cfg.finetune is None and not cfg.svf and cfg.arch == "pspnet"


def tuned_stages(cfg) -> tuple:
    """The backbone stages the method trains: ``finetune_stages``; every stage for the stage-1 PSPNet's derived
    full training (BAM's stage 1), which refuses a finetune_stages other than the default."""
    if _derived_stage1(cfg):
        if list(cfg.finetune_stages) != FIELDS["finetune_stages"].default:
            raise ValueError(f"finetune_stages={list(cfg.finetune_stages)} needs an explicit finetune: the stage-1 "
                             "PSPNet with svf false (finetune null) trains every stage as BAM's stage 1; set "
                             "finetune=full to train only some stages")
        return STAGES
    named = tuple(s for s in cfg.finetune_stages if s not in STAGES)  # a timm backbone's module paths
    return tuple(s for s in STAGES if s in cfg.finetune_stages) + named


def trainable_names(backbone, cfg) -> set:
    """The names of the backbone parameters that ``cfg``'s method trains (after ``apply``)."""
    return method_of(cfg).trainable(backbone, tuned_stages(cfg), cfg)


def apply(model, cfg):
    """Make ``model.backbone`` train as ``cfg`` says (see the module doc); returns the model. BAM: whenever the
    method changes the backbone, its base learner keeps reading a frozen untouched copy (``set_base_backbone``)."""
    from .fewshot import BAM
    from .pspnet import PSPNet

    method, stages = method_of(cfg), tuned_stages(cfg)
    plain = model.backbone
    reason = method.refuses(plain, stages, cfg)
    if reason:
        raise ValueError(f"arch={cfg.arch} backbone={cfg.backbone}: {reason}")
    plain.requires_grad_(False)
    changes = method.name != "freeze"
    work = copy.deepcopy(plain) if changes and method.in_place and isinstance(model, BAM) else plain
    model.backbone = method.prepare(work, stages, cfg)
    if changes and isinstance(model, BAM):  # the base learner reads the original stage-1 backbone
        # the stages before the first tuned one are untouched (a backbone whose features are not the next stage's
        # input, e.g. a ViT, runs again from the image)
        chained = plain.chains_stages and all(s in STAGES for s in stages)
        model.set_base_backbone(plain, shared_stages=min(STAGES.index(s) for s in stages) if chained else 0)
    keeps_statistics = isinstance(model, PSPNet) and method.trains_bn_statistics
    if keeps_statistics:  # stage 1: the tuned stages update their statistics; the frozen ones do not
        inside = _in_stages(model.backbone, stages)
        for name, m in model.backbone.named_modules():
            if isinstance(m, _BN) and not any(inside(f"{name}.{p}") for p, _ in m.named_parameters(recurse=False)):
                svf.freeze_batchnorm(m)
    else:  # BatchNorm statistics (and Dropout) frozen: the backbone stays in eval mode (FrozenInEval)
        model.eval_modules = tuple(dict.fromkeys(model.eval_modules + ("backbone",)))
    expected = method.trainable(model.backbone, stages, cfg)
    actual = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    if expected != actual:  # the registry's two descriptions of a method disagree: a bug here, not a user error
        raise AssertionError(f"finetune={method.name}: trainable {sorted(actual ^ expected)[:5]} differ from the "
                             "method's declared set")
    return model


def backbone_group(model, cfg) -> Optional[dict]:
    """The optimizer group of the backbone's trainable tensors (None when nothing trains), checked against the
    method's trainable set."""
    method = method_of(cfg)
    named = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
    extra = sorted({n for n, _ in named} - trainable_names(model.backbone, cfg))
    if extra:
        raise ValueError(f"finetune={method.name} but these backbone tensors are trainable too: {extra[:5]} "
                         f"({len(extra)} in all); build the model with build_model")
    if not named:
        return None
    weight_decay = float(cfg.weight_decay)
    if method.weight_decay_key and not getattr(cfg, method.weight_decay_key):
        weight_decay = 0.0
    return {"name": method.group, "params": [p for _, p in named], "lr_mult": float(getattr(cfg, method.lr_key)),
            "weight_decay": weight_decay}


def merged(model, cfg):
    """A copy of ``model`` whose backbone is plain layers holding the trained weights (svf: ``svf.merge``;
    lora/dna: ``lrcc.merge``); the same outputs up to float rounding. For a method that does not convert
    layers, a plain copy. BatchNorm folding is dropped (``svf.unfold_batchnorm``) before merging."""
    method = method_of(cfg)
    out = copy.deepcopy(model)
    if method.merge is not None:
        svf.unfold_batchnorm(out.backbone)
        out.backbone = method.merge(out.backbone)
        out.backbone.requires_grad_(False)
    return out


def state_config_keys(values) -> list:
    """The config keys whose values shape the state dict of the model that ``values`` (a config dict, e.g. the one a
    checkpoint saved) describes: its tensors' names and shapes. A checkpoint loads into a model built with the same
    values of these (``finetune`` is compared as the method it runs: common.config.finetune_method);
    engine.checkpoint names the ones that differ when a checkpoint does not fit."""
    arch = values.get("arch")
    method = finetune_method(values)
    keys = ["arch", "backbone", "finetune"]
    if method != "freeze":
        keys.append("finetune_stages")
    if arch != "pspnet":
        keys.append("reduce_dim")
    if arch in ("bam", "pspnet"):
        keys += ["ppm_bins", "num_base_classes"]
    if arch == "pfenet":
        keys.append("pyramid_bins")
    if arch == "bam":
        keys.append("shot")  # BAM's K-shot reweighting (kshot_rw) exists for shot > 1
    if method in ("lora", "dna"):
        keys += ["lrcc_rank", "lrcc_rank_ratio"]
    if method == "dna":
        keys.append("dna_mode")
    return keys


def describe_ranks(backbone, cfg) -> str:
    """finetune lora / dna: the ranks the converted convs got, and where the asked rank (lrcc_rank, or
    lrcc_rank_ratio x input channels) is above a conv's full rank and was capped there; '' for other methods."""
    if method_of(cfg).name not in ("lora", "dna"):
        return ""
    import lrcc

    layers = [(n, m) for n, m in backbone.named_modules() if isinstance(m, lrcc.LowRankConv2d)]
    if not layers:
        return ""
    asked_by = f"lrcc_rank={cfg.lrcc_rank}" if cfg.lrcc_rank else f"lrcc_rank_ratio={cfg.lrcc_rank_ratio:g}"

    def asked(conv):
        return int(cfg.lrcc_rank) if cfg.lrcc_rank else int(conv.weight.shape[1] * cfg.lrcc_rank_ratio)
    ranks = sorted({m.rank for _, m in layers})
    text = (f"lrcc ranks used ({asked_by}): {ranks[0]}" + (f"..{ranks[-1]}" if len(ranks) > 1 else "")
            + f" over {len(layers)} convs")
    capped = [(n, m) for n, m in layers if m.rank < asked(m)]
    if capped:
        name, conv = capped[0]
        text += (f"; {len(capped)} of them have a full rank below the {asked(conv)} asked and use it "
                 f"(e.g. {name} at rank {conv.rank})")
    return text


def describe(cfg) -> str:
    """One line: the method, its stages, what trains, its group and LR key."""
    method, stages = method_of(cfg), tuned_stages(cfg)
    if method.name == "freeze":
        return "finetune freeze: the backbone is frozen"
    extra = f", factors {cfg.svf_factors}" if method.name == "svf" else (
        f", mode {cfg.dna_mode}" if method.name == "dna" else "")
    return (f"finetune {method.name}{extra}: {method.trains} in {', '.join(stages)}; group {method.group} at "
            f"{method.lr_key}={getattr(cfg, method.lr_key):g}; BatchNorm statistics "
            f"{'update' if method.trains_bn_statistics and cfg.arch == 'pspnet' else 'frozen'}")
