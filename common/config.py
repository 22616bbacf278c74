"""The config contract: flat YAML files of plain values, overridable from the command line.

This module is the bottom of the project's dependency graph (it imports nothing of the project) and the one
place of every config key: one schema (`FIELDS`) lists every key the project reads, its type and its default.
A config file may set any subset of the keys; the command line overrides them with `key=value` or
`--set key=value` (values parsed as YAML, so `svf=false`, `test_seeds=[321,123]`, `pretrained=null`).
An unknown key, a wrong type, a value outside the allowed choices or outside the key's valid range
(`valid`, e.g. "[1, inf)" for epochs), or values that contradict each other (`RELATIONS`, e.g.
scale_min > scale_max) is an error that names the key, where it came from, and (for unknown keys)
the closest valid key. Everything is checked before anything runs.

String values may refer to other keys with `{key}`: `exp_dir: exp/{benchmark}/split{fold}/...`
is filled in after the overrides, so `shot=5` or `svf=false` on the command line writes to its own
folder. `{svf_tag}` names how the backbone trains (`finetune_tag`): `svf` or `nosvf` for what `svf: true`
/ `svf: false` run (as always), the method's own name for the other `finetune` methods;
`{backbone_weights}` the backbone's usual ImageNet weights file
(resnet50_v2.pth for resnet50, resnet101_v2.pth for resnet101, <backbone>.pth otherwise), so the shipped
`pretrained: initmodel/{backbone_weights}` follows `backbone=...` unless `pretrained=` is given too;
`{data_name}` the last folder name of data_root (a folder benchmark's runs go to their own exp_dir).
A config file that is empty, or that gives a key twice, is an error naming the file (and the line).

How the backbone trains is `finetune` (the methods of model/finetune.py); `finetune: null` (the default)
derives it from `svf` (`finetune_method`): svf true -> `svf`, false -> `freeze` (few-shot models) or `full`
(the stage-1 PSPNet). `svf` and `finetune` set in the same place (the file with its bases, or the command
line) must agree; a later place overrides an earlier one (`finetune=full` on the command line over a
file's `svf: true`), and the resolved `svf` is always true exactly when the method is `svf`.

`nosvf` is a mapping of keys that replace the file's values when the run has `svf: false` (every method but
`svf`): the released SVF code trains with SVF on at a constant LR, while its baselines (BAM's own recipe)
use poly decay with a ×10 on the heads, so one config file states both recipes. Order of precedence:
defaults <- file (over its `_base_` chain) <- the `nosvf` block (only with svf false) <- command line.

A file may start from another: `_base_: pascal.yaml` (a path relative to the file) reads that file first and
lets this one replace what it sets; bases may have bases (a cycle is an error). The shipped
config/{pascal,coco,demo}_split{0..3}.yaml are `_base_` + `fold`.

    cfg = load_config("config/pascal_split0.yaml", ["shot=5"])
    cfg.fold, cfg.exp_dir
    cfg = defaults(arch="pspnet", backbone="resnet18_deep")   # a complete config without a file (tests, tools)

The code reads `cfg.key` only and never supplies a default of its own: a config missing a key is an error
that names it. `python -m engine.config CONFIG [key=value ...] [--get KEY]` prints the resolved config
(or one key).
"""
from __future__ import annotations

import copy
import fnmatch
import difflib
import math
import os
import re
import types
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import yaml

__all__ = ["FIELDS", "Field", "BENCHMARKS", "FINETUNE_METHODS",
           "SVF_FACTORS", "BACKBONE_STAGES", "DNA_MODES", "finetune_method",
           "finetune_tag", "Config", "ConfigKeyError", "RELATIONS", "SEED_RANGE", "BASE_KEY", "load_config",
           "defaults", "read_config_file", "check_value", "check_pair", "check_relations", "parse_override",
           "split_overrides", "dump_config", "closest_key", "parse_interval", "in_interval", "yaml_error_location"]


@dataclass(frozen=True)
class Field:
    type: str                 # int | float | bool | str | int_list | float_list | str_list | mapping | kwargs
    default: Any
    help: str
    choices: Optional[tuple] = None  # str_list: of each item; an entry with '*' is a pattern (fnmatch)
    optional: bool = False    # None (YAML null) allowed
    valid: Optional[str] = None  # numbers (each item of a list): an interval like "[0, 1)" or "(0, inf)"
    min_items: int = 0        # lists: fewest items


def _f(type_, default, help_, choices=None, optional=False, valid=None, min_items=0):
    if valid is not None:
        parse_interval(valid)  # a malformed range is a schema error, found at import
    return Field(type_, default, help_, tuple(choices) if choices else None, optional, valid, min_items)


def parse_interval(text: str) -> tuple[float, float, bool, bool]:
    """"[1, inf)" -> (1.0, inf, low_closed=True, high_closed=False)."""
    match = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*", text)
    if not match:
        raise ValueError(f"malformed range {text!r}; write it like '[0, 1)' or '(0, inf)'")
    return float(match.group(2)), float(match.group(3)), match.group(1) == "[", match.group(4) == "]"


def in_interval(value: float, text: str) -> bool:
    low, high, low_closed, high_closed = parse_interval(text)
    if not math.isfinite(value) and not (math.isinf(value) and high_closed and value == high == math.inf):
        return False  # NaN compares false to everything; inf only where "inf]" admits it
    return (low <= value if low_closed else low < value) and (value <= high if high_closed else value < high)


SEED_RANGE = "[0, 4294967295]"  # what NumPy's and torch's seeding accept

# Dataset families: the entries of dataset/registry.py (a test checks the two agree).
BENCHMARKS = ("pascal", "coco", "folder", "fss1000", "deepglobe", "isic", "lung")
# How the backbone trains: the methods of model/finetune.py's registry (a test checks the two agree).
FINETUNE_METHODS = ("freeze", "svf", "full", "bias", "bn", "lora", "dna")
SVF_FACTORS = ("S", "US", "SV", "USV")  # svf.tuning.FACTORS (this module imports nothing of the project)
BACKBONE_STAGES = ("layer0", "layer1", "layer2", "layer3", "layer4")  # model.backbones.STAGES
DNA_MODES = ("tune_U_S", "tune_V_S", "tune_all", "tune_U", "tune_V", "fix_low_rank", "fix_sparse")  # lrcc's


FIELDS: dict[str, Field] = {
    # --- data
    "benchmark": _f("str", "pascal", "dataset family (dataset/registry.py): pascal | coco | folder (your own images "
                    "and masks: docs/own_data.md) | fss1000 | deepglobe | isic | lung (docs/data_and_protocol.md)",
                    BENCHMARKS),
    "data_root": _f("str", "data/VOCdevkit/VOC2012", "root of the images and label maps"),
    "list_dir": _f("str", "lists/{benchmark}", "folder of train.txt / val.txt and per-class lists"),
    "fold": _f("int", 0, "fold i of the benchmark (0..3 for PASCAL-5i / COCO-20i; 0..num_folds-1 for a folder)",
               valid="[0, inf)"),
    "classes_file": _f("str", None, "benchmark folder: the class names, one per line (line i = class i); null = "
                       "<data_root>/classes.txt (or the class folders' names); fss1000: the folder of HSNet's "
                       "class lists (trn.txt, val.txt, test.txt); isic: class_id.csv for the flat image folder",
                       optional=True),
    "num_folds": _f("int", None, "benchmark folder: k folds of consecutive classes, as PASCAL-5i (null = min(4, "
                    "classes)); PASCAL/COCO: fixed at 4", optional=True, valid="[1, inf)"),
    "novel_classes": _f("str_list", None, "benchmark folder: the novel (test) classes by name, one fold (the others "
                        "are base classes); null = num_folds folds", optional=True, min_items=1),
    "train_benchmark": _f("str", None, "the benchmark the tested model was trained on when it is not `benchmark` "
                          "(cross-domain: the PASCAL model tested on deepglobe); test.py then names its results "
                          "test_<benchmark>_<K>shot.json", BENCHMARKS, optional=True),
    "train_classes": _f("str", "base", "classes of the training episodes: base (the fold's base classes) | all "
                        "(every class: a model for other datasets, PATNet's fold 4; or a one-class dataset tuned on "
                        "its labelled images)", ("base", "all")),
    "shot": _f("int", 1, "support images per episode (K)", valid="[1, inf)"),
    "coco_split": _f("str", "interleaved", "COCO-20i fold convention", ("interleaved", "consecutive")),
    "filter_novel": _f("bool", True, "the † filter: drop training images containing a novel class"),
    "min_class_pixels": _f("int", 2048, "a class counts as present with at least this many pixels", valid="[1, inf)"),
    "train_size": _f("int", 473, "training crop side", valid="[8, inf)"),
    "test_size": _f("int", 473, "test images: long side resized to this, padded to a square", valid="[8, inf)"),
    "scale_min": _f("float", 0.9, "random scale range, low", valid="(0, inf)"),
    "scale_max": _f("float", 1.1, "random scale range, high", valid="(0, inf)"),
    "rotate_max": _f("float", 10.0, "random rotation range, degrees", valid="[0, 180]"),
    "workers": _f("int", 4, "data-loader workers per process", valid="[0, inf)"),
    "seed": _f("int", 321, "seed of everything random (training order, augmentation, validation episodes)",
               valid=SEED_RANGE),
    # --- model
    "arch": _f("str", "baseline", "model", ("baseline", "pfenet", "bam", "pspnet")),
    "backbone": _f("str", "resnet50", "backbone (timm:<name>: any timm model, e.g. timm:vit_small_patch14_dinov2)",
                   ("resnet50", "resnet101", "resnet18_deep", "resnet18_deep_half", "vgg16_bn", "resnet50_tv", "swin_t",
                    "swin_s", "swin_b", "timm:*")),
    "backbone_kwargs": _f("kwargs", {}, "timm:<name> backbones: options of timm.create_model (e.g. {depth: 4, "
                          "embed_dim: 64, num_heads: 2, img_size: 64} for a small model); {} = the model as published"),
    "dilation_rule": _f("str", "auto", "which ResNet 3x3 convs layer3/4 dilate: every_block (BAM, PFENet's own "
                        "code) | torchvision (the SVF code's baseline and PFENet: first block of layer3 1, of layer4 2) "
                        "| auto = every_block for bam/pspnet, torchvision for baseline/pfenet",
                        ("auto", "every_block", "torchvision")),
    "pretrained": _f("str", None, "ImageNet (or stage-1) backbone weights file; null = random init; hub = timm "
                     "downloads the weights of a timm:<name> backbone", optional=True),
    "svf": _f("bool", True, "singular value fine-tuning of backbone layer2-4; the same as finetune: svf (true) "
              "or the finetune that svf false derives (freeze, or full for the stage-1 PSPNet)"),
    "finetune": _f("str", None, "how the backbone trains (docs/training.md): freeze | svf | full | bias (BitFit) | "
                   "bn (BatchNorm gamma/beta) | lora | dna (lrcc's DnA modes, dna_mode); null = from svf: true -> "
                   "svf, false -> freeze (few-shot models) or full (the stage-1 PSPNet, every stage)",
                   FINETUNE_METHODS, optional=True),
    "finetune_stages": _f("str_list", ["layer2", "layer3", "layer4"], "backbone stages that finetune trains; the "
                          "other stages are frozen; timm backbones also take module paths of the model, e.g. "
                          "blocks.6-11 (blocks 6 to 11) or stages.2", BACKBONE_STAGES + ("*.*",), min_items=1),
    "svf_factors": _f("str", "S", "finetune svf: which SVD factors train: S (the paper's SVF) | US | SV | USV "
                      "(the paper's ablation)", SVF_FACTORS),
    "fold_batchnorm": _f("bool", True, "fold each frozen BatchNorm into the conv before it at run time (svf.fold_batchnorm: "
                         "exact, same state dict, faster); false runs the BatchNorm passes"),
    "svf_lr_mult": _f("float", 0.1, "LR multiplier of the singular values relative to base_lr", valid="[0, inf)"),
    "svf_weight_decay": _f("bool", True, "apply weight decay to the singular values (the released SVF code does)"),
    "backbone_lr_mult": _f("float", 0.1, "LR multiplier of a fully trained backbone (finetune full; the stage-1 "
                           "PSPNet; BAM: heads x10)", valid="[0, inf)"),
    "bias_lr_mult": _f("float", 0.1, "LR multiplier of the backbone biases (finetune bias)", valid="[0, inf)"),
    "bn_lr_mult": _f("float", 0.1, "LR multiplier of the backbone BatchNorm gamma/beta (finetune bn)",
                     valid="[0, inf)"),
    "lora_lr_mult": _f("float", 0.1, "LR multiplier of the LoRA factors (finetune lora)", valid="[0, inf)"),
    "dna_lr_mult": _f("float", 0.1, "LR multiplier of the DnA factors (finetune dna)", valid="[0, inf)"),
    "lrcc_rank": _f("int", 0, "finetune lora/dna: rank of every converted conv (per group); 0 = from lrcc_rank_ratio",
                    valid="[0, inf)"),
    "lrcc_rank_ratio": _f("float", 0.25, "finetune lora/dna with lrcc_rank 0: rank = int(in_channels/groups x this), "
                          "at least 1, at most full rank", valid="(0, inf)"),
    "lora_alpha": _f("float", None, "finetune lora: scale lora_alpha / rank of the low-rank update; null = scale 1 "
                     "(lrcc's default)", optional=True, valid="(0, inf)"),
    "dna_mode": _f("str", "tune_U_S", "finetune dna: which factors of W = U.V + S (+ residual) train (lrcc's modes)",
                   DNA_MODES),
    "dna_lambda_s": _f("float", 0.01, "finetune dna: threshold of the sparse part S", valid="[0, inf)"),
    "dna_compress_step": _f("int", 50, "finetune dna: iterations of the low-rank + sparse decomposition",
                            valid="[0, inf)"),
    "dna_cache": _f("str", None, "finetune dna: file caching the decomposition (reused when the weights and settings "
                    "match); null = decompose at every build", optional=True),
    "aux_loss_weight": _f("float", 1.0, "weight of the auxiliary losses (PFENet aux_weight, BAM aux_weight1)",
                            valid="[0, inf)"),
    "base_learner_dropout": _f("bool", True, "BAM: the frozen base learner's Dropout2d(0.1) is active in training, "
                               "as in the released code (model.train() then only BatchNorm frozen); false keeps the "
                               "whole base learner in eval mode"),
    "reduce_dim": _f("int", 256, "channels of the meta-learner features", valid="[1, inf)"),
    "ppm_bins": _f("int_list", [1, 2, 3, 6], "PSPNet pyramid pooling bins",
                     valid="[1, inf)", min_items=1),
    "pyramid_bins": _f("int_list", [60, 30, 15, 8], "PFENet feature enrichment scales",
                     valid="[1, inf)", min_items=1),
    "base_learner": _f("str", None, "stage-1 PSPNet checkpoint (arch=bam)", optional=True),
    "num_base_classes": _f("int", 16, "stage-1 classes incl. background (16 PASCAL, 61 COCO)", valid="[2, inf)"),
    # --- optimisation
    "epochs": _f("int", 200, "training epochs", valid="[1, inf)"),
    "batch_size": _f("int", 8, "episodes per step, total over all processes", valid="[1, inf)"),
    "lr_schedule": _f("str", "constant", "LR over the run: constant (the released SVF code, whose cosine scheduler "
                      "is rebuilt every step) | poly (1-t/T)^power (BAM, PFENet) | cosine (the SVF paper's text)",
                      ("constant", "poly", "cosine")),
    "base_lr": _f("float", 0.015, "learning rate of lr_mult=1 groups at step 0 (see lr_schedule)", valid="(0, inf)"),
    "head_lr_mult": _f("float", 1.0, "LR multiplier of the heads (meta-learner); BAM's recipe: 10", valid="[0, inf)"),
    "nosvf": _f("mapping", {}, "keys that replace the file's values when svf is false, e.g. BAM's own recipe "
                "{lr_schedule: poly, base_lr: 0.005, head_lr_mult: 10.0} in config/pascal.yaml and coco.yaml; {} = none"),
    "momentum": _f("float", 0.9, "SGD momentum", valid="[0, 1]"),
    "weight_decay": _f("float", 1e-4, "SGD weight decay (groups may override)", valid="[0, inf)"),
    "power": _f("float", 0.9, "poly LR decay power (lr_schedule: poly)", valid="[0, inf)"),
    "amp": _f("bool", False, "mixed precision (GPU only)"),
    "deterministic": _f("bool", False, "torch.use_deterministic_algorithms (bit-exact resume on CPU)"),
    "sync_bn": _f("bool", True, "SyncBatchNorm for the BatchNorm layers that train (stage 1), with more than one "
                  "process on GPUs"),
    "early_stop_epochs": _f("int", 75, "stop after this many epochs without a better validation mIoU; "
                            "null = never", optional=True, valid="[1, inf)"),
    # --- stage 1 (PSPNet base learner, `train.py --stage1`; BAM's *_base.yaml settings)
    "stage1_epochs": _f("int", 100, "stage-1 training epochs", valid="[1, inf)"),
    "stage1_batch_size": _f("int", 12, "stage-1 images per step, total", valid="[1, inf)"),
    "stage1_base_lr": _f("float", 2.5e-3, "stage-1 learning rate (lr_mult=1)", valid="(0, inf)"),
    "stage1_pretrained": _f("str", None, "backbone weights stage 1 starts from (ImageNet); null = random init",
                            optional=True),
    "stage1_train_size": _f("int", 417, "stage-1 crop side", valid="[8, inf)"),
    "stage1_scale_min": _f("float", 0.5, "stage-1 random scale, low", valid="(0, inf)"),
    "stage1_scale_max": _f("float", 2.0, "stage-1 random scale, high", valid="(0, inf)"),
    # --- evaluation
    "test_episodes": _f("int", 1000, "test episodes per seed", valid="[1, inf)"),
    "test_seeds": _f("int_list", [510, 365, 382, 322, 988], "one precomputed episode list per seed (BAM's "
                     "test.py: numpy.random.seed(123); numpy.random.randint(0, 1000, 5))", valid=SEED_RANGE,
                     min_items=1),
    "test_resize_smaller": _f("bool", True, "test images whose long side is below test_size are resized up too "
                              "(BAM's Resize, resized_val: True); false = kept at their size (BAM's test_Resize)"),
    "episode_sampler": _f("str", "ours", "how test and validation episodes are drawn: ours = NumPy from the seed, "
                          "independent of workers | released = exactly the released code's (BAM's test.py / SemData: "
                          "Python random, reseeded per DataLoader worker, see episode_workers; fss1000 / deepglobe / "
                          "isic / lung: HSNet's / PATNet's test loop, NumPy's global state seeded with the seed)",
                          ("ours", "released")),
    "episode_workers": _f("int", 8, "episode_sampler released: the data-loader worker count whose episodes are "
                          "reproduced (the released configs: 8; 0 = the main process); our own loader is unaffected",
                          valid="[0, inf)"),
    "val_episodes": _f("int", 1000, "validation episodes after each epoch (seed = `seed`)", valid="[1, inf)"),
    "val_every": _f("int", 1, "validate every N epochs (and always after the last)", valid="[1, inf)"),
    "val_mid_epoch": _f("bool", False, "also validate halfway through every epoch but the first (the released "
                        "code does when epochs <= 100: COCO)"),
    "checkpoint_select": _f("str", "best", "weights test.py evaluates: best = highest validation mIoU "
                            "(validation runs on the test fold, as in the papers) | last = final epoch",
                            ("best", "last")),
    # --- output
    "exp_dir": _f("str", "exp/{benchmark}/{arch}_{svf_tag}/{backbone}/split{fold}/{shot}shot",
                  "output folder of the run"),
}


class ConfigKeyError(KeyError):
    """Unknown config key (a KeyError whose message prints readably)."""

    def __str__(self):
        return str(self.args[0])


def closest_key(key: str) -> str:
    """' (did you mean X?)' for the closest valid key, or a list of valid keys."""
    match = difflib.get_close_matches(key, FIELDS.keys(), n=1, cutoff=0.5)
    if match:
        return f"did you mean '{match[0]}'?"
    return "valid keys: " + ", ".join(sorted(FIELDS))


class Config(types.SimpleNamespace):
    """Attribute access to the resolved values; a misspelt attribute names the closest key."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"config has no key '{name}'; {closest_key(name)}")

    def to_dict(self) -> dict:
        return dict(vars(self))

    def replace(self, **changes) -> "Config":
        new = Config(**self.to_dict())
        for key, value in changes.items():
            setattr(new, *check_pair(key, value, "code"))
        check_relations(new.to_dict(), "code")
        return new


def _chosen(value, choices) -> bool:
    """`value` is one of `choices`, or matches one of its patterns (entries with '*', fnmatch rules)."""
    return value in choices or any(isinstance(c, str) and "*" in c and fnmatch.fnmatchcase(str(value), c)
                                   for c in choices)


def check_value(key: str, value: Any, source: str) -> Any:
    """Return `value` converted to the type of `key`, or raise a ValueError naming both."""
    field = FIELDS[key]
    where = f"config key '{key}' (from {source})"
    if value is None:
        if field.optional:
            return None
        raise ValueError(f"{where} may not be null; expected {field.type} ({field.help})")

    def bad(expected):
        return ValueError(f"{where} expects {expected}, got {value!r} ({type(value).__name__})")

    t = field.type
    if t == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif t == "float":
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif t == "str":
        if not isinstance(value, str):
            raise bad("a string")
    elif t == "str_list":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad("a list of names like [layer2, layer3]")
        value = list(value)
        if field.choices is not None:
            wrong = [v for v in value if not _chosen(v, field.choices)]
            if wrong:
                raise ValueError(f"{where}: {wrong[0]!r} is not one of {list(field.choices)}")
        if len(set(value)) != len(value):
            raise ValueError(f"{where} names an item twice: {value!r}")
    elif t in ("int_list", "float_list"):
        if not isinstance(value, (list, tuple)):
            raise bad("a list like [1, 2, 3]")
        item_ok = (lambda v: isinstance(v, int) and not isinstance(v, bool)) if t == "int_list" else \
            (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
        if not all(item_ok(v) for v in value):
            raise bad("a list of " + ("integers" if t == "int_list" else "numbers"))
        value = [int(v) if t == "int_list" else float(v) for v in value]
    elif t == "kwargs":
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad("a mapping of keyword arguments like {depth: 4, embed_dim: 64}")
        value = dict(value)
    elif t == "mapping":
        if not isinstance(value, dict):
            raise bad("a mapping like {base_lr: 0.005}")
        inner = {}
        for k, v in value.items():
            if k not in FIELDS:
                raise ConfigKeyError(f"{where}: unknown config key '{k}'; {closest_key(str(k))}")
            if k in ("svf", "finetune") or FIELDS[k].type == "mapping":
                raise ValueError(f"{where}: '{k}' cannot be set inside it")
            inner[k] = check_value(k, v, f"{source}, {key}")
        value = inner
    else:  # pragma: no cover - schema error
        raise TypeError(f"schema type {t} of {key}")
    if field.choices is not None and t != "str_list" and not _chosen(value, field.choices):
        raise ValueError(f"{where} must be one of {list(field.choices)}, got {value!r}")
    if t.endswith("_list") and len(value) < field.min_items:
        raise ValueError(f"{where} needs at least {field.min_items} item(s), got {value!r}")
    if field.valid is not None:
        items = value if t in ("int_list", "float_list") else [value]
        bad_items = [v for v in items if not in_interval(v, field.valid)]
        if bad_items:
            what = f"every item of {where}" if len(items) != 1 or t.endswith("_list") else where
            raise ValueError(f"{what} must be in {field.valid}, got {bad_items[0]!r} ({field.help})")
    return value


# Relations between keys, checked after the file and the overrides are merged:
# (keys involved, holds(values) -> bool, what must hold).
RELATIONS = [
    (("scale_min", "scale_max"), lambda v: v["scale_min"] <= v["scale_max"], "scale_min <= scale_max"),
    (("stage1_scale_min", "stage1_scale_max"), lambda v: v["stage1_scale_min"] <= v["stage1_scale_max"],
     "stage1_scale_min <= stage1_scale_max"),
    (("benchmark", "fold"), lambda v: v["benchmark"] not in ("pascal", "coco") or v["fold"] <= 3,
     "fold in 0..3 for pascal and coco (PASCAL-5i / COCO-20i have 4 folds)"),
    (("test_seeds",), lambda v: len(set(v["test_seeds"])) == len(v["test_seeds"]),
     "test_seeds are distinct (a repeated seed repeats the same episodes)"),
    (("svf", "finetune"), lambda v: v["finetune"] is None or v["svf"] == (v["finetune"] == "svf"),
     "svf is true exactly when finetune is svf (or finetune is null: derived from svf)"),
]


def check_relations(values: dict, source: str):
    """Raise a ValueError naming the keys of the first relation of RELATIONS that `values` break."""
    for keys, holds, rule in RELATIONS:
        if all(k in values for k in keys) and not holds(values):
            got = ", ".join(f"{k}={values[k]!r}" for k in keys)
            raise ValueError(f"config keys {', '.join(keys)} (from {source}) must satisfy {rule}; got {got}")


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, value parsed as YAML; strings stay strings)."""
    if "=" not in text:
        raise ValueError(f"command-line override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in FIELDS:
        raise ConfigKeyError(f"unknown config key '{key}' on the command line; {closest_key(key)}")
    field = FIELDS[key]
    if field.type == "str" and raw not in ("null", "None", "~"):
        return key, raw  # paths like 2024 or 1e3 stay strings
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ValueError(f"command-line override '{text}': value is not valid YAML ({exc})") from None
    return key, value


def finetune_method(values) -> str:
    """The finetune method a config runs: `finetune`, or when null the one `svf` derives (svf true -> svf;
    false -> freeze for the few-shot models, full for the stage-1 PSPNet). `values`: a dict or a Config."""
    get = values.get if isinstance(values, dict) else (lambda k: getattr(values, k))
    if get("finetune") is not None:
        return get("finetune")
    if get("svf"):
        return "svf"
    return "full" if get("arch") == "pspnet" else "freeze"


def finetune_tag(values) -> str:
    """The `{svf_tag}` of exp_dir: `svf` / `nosvf` for what svf true / false run (folders as always), else the
    method's name (dna: `dna_<dna_mode>`), with the SVD factors when not S (`svf_US`) and the tuned stages when
    not the default (`full_l34`), so that runs of different methods never share a folder."""
    get = values.get if isinstance(values, dict) else (lambda k: getattr(values, k))
    method = finetune_method(values)
    derived_without_svf = "full" if get("arch") == "pspnet" else "freeze"
    if method == "svf":
        tag = "svf" if get("svf_factors") == "S" else f"svf_{get('svf_factors')}"
    elif method == derived_without_svf:
        tag = "nosvf"
    else:
        tag = f"dna_{get('dna_mode')}" if method == "dna" else method
    stages = list(get("finetune_stages"))
    if method != "freeze" and stages != FIELDS["finetune_stages"].default:
        tag += "_l" + "".join(s[len("layer"):] if s in BACKBONE_STAGES else "_" + s.replace(".", "") for s in stages)
    return tag


def data_name(data_root) -> str:
    """A dataset's name: the last folder name of its data_root (the `{data_name}` template; a folder benchmark's
    datasets are told apart by it)."""
    return os.path.basename(os.path.normpath(str(data_root or "")))


def _format_templates(values: dict) -> dict:
    """Fill `{key}` references in string values (e.g. exp_dir) from the other values."""
    context = dict(values)
    context["svf_tag"] = finetune_tag(values)
    context["backbone_weights"] = backbone_weights_file(values.get("backbone", ""))
    context["data_name"] = data_name(values.get("data_root"))
    out = dict(values)
    for key, value in values.items():
        if isinstance(value, str) and "{" in value:
            try:
                out[key] = value.format(**context)
            except KeyError as exc:
                raise ConfigKeyError(f"config key '{key}' = {value!r} refers to unknown key {exc}; "
                                     f"{closest_key(exc.args[0])}") from None
    return out


def backbone_weights_file(backbone: str) -> str:
    """`{backbone_weights}`: the usual ImageNet weights file name of a backbone, so that `pretrained:
    initmodel/{backbone_weights}` follows the backbone word: PSPNet/PFENet's deep-stem ResNets are
    resnet50_v2.pth / resnet101_v2.pth, a timm:<name> backbone <name>.safetensors (timm's hub file, renamed), every
    other backbone <backbone>.pth (vgg16_bn.pth, swin_t.pth, ...)."""
    if backbone.startswith("timm:"):
        return f"{backbone[len('timm:'):]}.safetensors"
    return f"{backbone}_v2.pth" if backbone in ("resnet50", "resnet101") else f"{backbone}.pth"


BASE_KEY = "_base_"  # `_base_: pascal.yaml`: the file named (relative to this one) is read first


def read_config_file(path: str, chain: Sequence[str] = ()) -> dict:
    """The checked values a config file sets, over those of its `_base_` chain (the file wins; a key it
    sets replaces the base's value, `nosvf` included). `chain`: the files that named this one as base."""
    if os.path.abspath(path) in chain:
        raise ValueError(f"config file '{path}': _base_ cycle: "
                         + " -> ".join([os.path.relpath(p) for p in chain] + [path]))
    named_by = f" (the {BASE_KEY} of '{os.path.relpath(chain[-1])}')" if chain else ""
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        known = sorted(f for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []
        raise FileNotFoundError(f"config file '{path}' not found{named_by}"
                                + (f"; configs in {folder}/: {', '.join(known)}" if known else ""))
    with open(path) as fh:
        try:
            data = yaml.load(fh, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {yaml_error_location(path, exc)}") from None
    if data is None:  # nothing but blanks and comments: not "the defaults", which are the full PASCAL recipe
        raise ValueError(f"config file '{path}' is empty (no key: value line); start from a shipped config "
                         f"(_base_: pascal.yaml) or write the keys you mean")
    if not isinstance(data, dict):
        raise ValueError(f"config file '{path}' must be a mapping of key: value lines")
    values = {}
    if BASE_KEY in data:
        base = data.pop(BASE_KEY)
        if not isinstance(base, str) or not base.strip():
            raise ValueError(f"config file '{path}': {BASE_KEY} must name a config file relative to it, "
                             f"like 'pascal.yaml'; got {base!r}")
        values = read_config_file(os.path.join(os.path.dirname(path), base), (*chain, os.path.abspath(path)))
    own = {}
    for key, value in data.items():
        if key not in FIELDS:
            raise ConfigKeyError(f"unknown config key '{key}' in {path}; {closest_key(str(key))}")
        own[key] = check_value(key, value, path)
    values.update({k: v for k, v in own.items() if k not in ("svf", "finetune")})
    return _choose_method(values, own, path)


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file (over its `_base_` chain) <- command-line overrides, all checked; templates
    filled last."""
    file_values = read_config_file(path) if path is not None else {}
    command_line = [check_pair(*parse_override(text), "command line") for text in overrides]
    sources = ([path] if path else []) + (["command line"] if overrides else [])
    return _resolve(file_values, command_line, " + ".join(sources) or "defaults")


def defaults(**overrides) -> Config:
    """The schema's defaults with `overrides` in place of a file's values (checked the same way, templates
    filled after): a complete config for the code that builds models or datasets without a config file."""
    return _resolve(dict(check_pair(key, value, "defaults()") for key, value in overrides.items()), [],
                    "defaults()")


def check_pair(key: str, value: Any, source: str) -> tuple[str, Any]:
    if key not in FIELDS:
        raise ConfigKeyError(f"unknown config key '{key}' (from {source}); {closest_key(str(key))}")
    return key, check_value(key, value, source)


def _choose_method(values: dict, level: dict, where: str) -> dict:
    """Put the svf / finetune choice of one place (a file over its base, or the command line over the files)
    into ``values``: in one place they must agree; a later place's choice overrides an earlier one's, and svf
    follows an explicit finetune. Returns ``values``."""
    has_svf, finetune = "svf" in level, level.get("finetune")
    if has_svf and finetune is not None and level["svf"] != (finetune == "svf"):
        raise ValueError(f"config keys svf={level['svf']!r} and finetune={finetune!r} (both from {where}) "
                         "contradict each other: svf true is finetune svf; set only finetune")
    if finetune is not None:
        values["finetune"], values["svf"] = finetune, finetune == "svf"
        return values
    if "finetune" in level:  # an explicit null: derived from svf
        values["finetune"] = None
    if has_svf:
        values["svf"] = level["svf"]
        earlier = values.get("finetune")
        if earlier is not None and level["svf"] != (earlier == "svf"):
            values["finetune"] = None  # svf here overrides an earlier place's finetune: derived from svf
    return values


def _resolve(file_values: dict, command_line: Sequence[tuple[str, Any]], source: str) -> Config:
    values = {key: copy.deepcopy(field.default) for key, field in FIELDS.items()}
    values.update(file_values)
    choice = _choose_method(dict(values), dict(command_line), "the command line")
    final = dict(values, **dict(command_line))
    if not choice["svf"]:
        values.update(final["nosvf"])  # svf false: the file's nosvf block, then the command line again
    values.update(command_line)
    values["svf"], values["finetune"] = choice["svf"], choice["finetune"]
    check_relations(values, source)
    return Config(**_format_templates(values))


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, but a key given twice in one mapping is an error at the line of its second
    occurrence (PyYAML would keep the last value without a word)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: let PyYAML report it
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key}' is given twice (first on line {first.line + 1}); keep one",
                        key_node.start_mark)
        return super().construct_mapping(node, deep)


def yaml_error_location(path: str, exc: "yaml.YAMLError") -> str:
    """'PATH line L, column C: PROBLEM' for a YAML syntax error, on one line."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path} line {mark.line + 1}, column {mark.column + 1}" if mark is not None else path
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    kind = "YAML error" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error"
    return f"{where}: {kind}: {problem}" + (f" ({context})" if context else "")


def split_overrides(argv: Iterable[str]) -> list[str]:
    """Collect `key=value` words and `--set key=value` pairs from an argument list remainder."""
    out, argv = [], list(argv)
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--set":
            if i + 1 >= len(argv):
                raise ValueError("--set needs a key=value after it")
            out.append(argv[i + 1])
            i += 2
            continue
        if word.startswith("--set="):
            out.append(word[len("--set="):])
        elif "=" in word and not word.startswith("-"):
            out.append(word)
        else:
            raise ValueError(f"unexpected argument '{word}'; overrides are key=value or --set key=value")
        i += 1
    return out


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (written next to each run's checkpoints)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
