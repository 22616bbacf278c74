"""Configuration: flat YAML files of plain values, overridable from the command line.

One schema (`FIELDS`) lists every key the project reads, its type and its default. A config file
may set any subset of the keys; the command line overrides them with `key=value` or
`--set key=value` (values parsed as YAML, so `svf=false`, `test_seeds=[321,123]`, `pretrained=null`).
An unknown key, a wrong type or a value outside the allowed choices is an error that names the key,
where it came from, and (for unknown keys) the closest valid key.

String values may refer to other keys with `{key}`: `exp_dir: exp/{benchmark}/split{fold}/...`
is filled in after the overrides, so `shot=5` or `svf=false` on the command line writes to its own
folder. `{svf_tag}` is `svf` or `nosvf`.

`nosvf` is a mapping of keys that replace the file's values when the run has `svf: false`: the
released SVF code trains with SVF on at a constant LR, while its baselines (BAM's own recipe) use
poly decay with a ×10 on the heads, so one config file states both recipes. Order of precedence:
defaults <- file <- the file's `nosvf` block (only with svf false) <- command line.

    cfg = load_config("config/pascal_split0.yaml", ["shot=5"])
    cfg.fold, cfg.exp_dir

`python -m engine.config CONFIG [key=value ...] [--get KEY]` prints the resolved config (or one key).
"""
from __future__ import annotations

import argparse
import copy
import difflib
import os
import sys
import types
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import yaml


@dataclass(frozen=True)
class Field:
    type: str                 # int | float | bool | str | int_list | float_list | mapping
    default: Any
    help: str
    choices: Optional[tuple] = None
    optional: bool = False    # None (YAML null) allowed


def _f(type_, default, help_, choices=None, optional=False):
    return Field(type_, default, help_, tuple(choices) if choices else None, optional)


FIELDS: dict[str, Field] = {
    # --- data
    "benchmark": _f("str", "pascal", "dataset family", ("pascal", "coco")),
    "data_root": _f("str", "data/VOCdevkit/VOC2012", "root of the images and label maps"),
    "list_dir": _f("str", "lists/{benchmark}", "folder of train.txt / val.txt and per-class lists"),
    "fold": _f("int", 0, "fold i of PASCAL-5i / COCO-20i", (0, 1, 2, 3)),
    "shot": _f("int", 1, "support images per episode (K)"),
    "coco_split": _f("str", "interleaved", "COCO-20i fold convention", ("interleaved", "consecutive")),
    "filter_novel": _f("bool", True, "the † filter: drop training images containing a novel class"),
    "min_class_pixels": _f("int", 2048, "a class counts as present with at least this many pixels"),
    "train_size": _f("int", 473, "training crop side"),
    "test_size": _f("int", 473, "test images: long side resized to this, padded to a square"),
    "scale_min": _f("float", 0.9, "random scale range, low"),
    "scale_max": _f("float", 1.1, "random scale range, high"),
    "rotate_max": _f("float", 10.0, "random rotation range, degrees"),
    "workers": _f("int", 4, "data-loader workers per process"),
    "seed": _f("int", 321, "seed of everything random (training order, augmentation, validation episodes)"),
    # --- model
    "arch": _f("str", "baseline", "model", ("baseline", "pfenet", "bam", "pspnet")),
    "backbone": _f("str", "resnet50", "backbone",
                   ("resnet50", "resnet101", "resnet18_deep", "vgg16_bn", "resnet50_tv", "swin_t", "swin_s", "swin_b")),
    "dilation_rule": _f("str", "auto", "which ResNet 3x3 convs layer3/4 dilate: every_block (BAM, PFENet's own "
                        "code) | torchvision (the SVF code's baseline and PFENet: first block of layer3 1, of layer4 2) "
                        "| auto = every_block for bam/pspnet, torchvision for baseline/pfenet",
                        ("auto", "every_block", "torchvision")),
    "pretrained": _f("str", None, "ImageNet (or stage-1) backbone weights file; null = random init",
                     optional=True),
    "svf": _f("bool", True, "singular value fine-tuning of backbone layer2-4"),
    "svf_lr_mult": _f("float", 0.1, "LR multiplier of the singular values relative to base_lr"),
    "svf_weight_decay": _f("bool", True, "apply weight decay to the singular values (the released SVF code does)"),
    "backbone_lr_mult": _f("float", 0.1, "LR multiplier of a fully trained backbone (stage-1 PSPNet; BAM: heads x10)"),
    "aux_loss_weight": _f("float", 1.0, "weight of the auxiliary losses (PFENet aux_weight, BAM aux_weight1)"),
    "reduce_dim": _f("int", 256, "channels of the meta-learner features"),
    "ppm_bins": _f("int_list", [1, 2, 3, 6], "PSPNet pyramid pooling bins"),
    "pyramid_bins": _f("int_list", [60, 30, 15, 8], "PFENet feature enrichment scales"),
    "base_learner": _f("str", None, "stage-1 PSPNet checkpoint (arch=bam)", optional=True),
    "num_base_classes": _f("int", 16, "stage-1 classes incl. background (16 PASCAL, 61 COCO)"),
    # --- optimisation
    "epochs": _f("int", 200, "training epochs"),
    "batch_size": _f("int", 8, "episodes per step, total over all processes"),
    "lr_schedule": _f("str", "constant", "LR over the run: constant (the released SVF code, whose cosine scheduler "
                      "is rebuilt every step) | poly (1-t/T)^power (BAM, PFENet) | cosine (the SVF paper's text)",
                      ("constant", "poly", "cosine")),
    "base_lr": _f("float", 0.015, "learning rate of lr_mult=1 groups at step 0 (see lr_schedule)"),
    "head_lr_mult": _f("float", 1.0, "LR multiplier of the heads (meta-learner); BAM's recipe: 10"),
    "nosvf": _f("mapping", {}, "keys that replace the file's values when svf is false, e.g. BAM's own recipe "
                "{lr_schedule: poly, base_lr: 0.005, head_lr_mult: 10.0} in config/pascal_* and coco_*; {} = none"),
    "momentum": _f("float", 0.9, "SGD momentum"),
    "weight_decay": _f("float", 1e-4, "SGD weight decay (groups may override)"),
    "power": _f("float", 0.9, "poly LR decay power (lr_schedule: poly)"),
    "amp": _f("bool", False, "mixed precision (GPU only)"),
    "deterministic": _f("bool", False, "torch.use_deterministic_algorithms (bit-exact resume on CPU)"),
    "sync_bn": _f("bool", True, "SyncBatchNorm for the BatchNorm layers that train (stage 1), with more than one "
                  "process on GPUs"),
    "early_stop_epochs": _f("int", 75, "stop after this many epochs without a better validation mIoU; "
                            "null = never", optional=True),
    # --- stage 1 (PSPNet base learner, `train.py --stage1`; BAM's *_base.yaml settings)
    "stage1_epochs": _f("int", 100, "stage-1 training epochs"),
    "stage1_batch_size": _f("int", 12, "stage-1 images per step, total"),
    "stage1_base_lr": _f("float", 2.5e-3, "stage-1 learning rate (lr_mult=1)"),
    "stage1_pretrained": _f("str", None, "backbone weights stage 1 starts from (ImageNet); null = random init",
                            optional=True),
    "stage1_train_size": _f("int", 417, "stage-1 crop side"),
    "stage1_scale_min": _f("float", 0.5, "stage-1 random scale, low"),
    "stage1_scale_max": _f("float", 2.0, "stage-1 random scale, high"),
    # --- evaluation
    "test_episodes": _f("int", 1000, "test episodes per seed"),
    "test_seeds": _f("int_list", [510, 365, 382, 322, 988], "one precomputed episode list per seed (BAM's "
                     "test.py: numpy.random.seed(123); numpy.random.randint(0, 1000, 5))"),
    "test_resize_smaller": _f("bool", True, "test images whose long side is below test_size are resized up too "
                              "(BAM's Resize, resized_val: True); false = kept at their size (BAM's test_Resize)"),
    "val_episodes": _f("int", 1000, "validation episodes after each epoch (seed = `seed`)"),
    "val_every": _f("int", 1, "validate every N epochs (and always after the last)"),
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
            if key not in FIELDS:
                raise ConfigKeyError(f"unknown config key '{key}'; {closest_key(key)}")
            setattr(new, key, check_value(key, value, "code"))
        return new


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
    elif t in ("int_list", "float_list"):
        if not isinstance(value, (list, tuple)):
            raise bad("a list like [1, 2, 3]")
        item_ok = (lambda v: isinstance(v, int) and not isinstance(v, bool)) if t == "int_list" else \
            (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
        if not all(item_ok(v) for v in value):
            raise bad("a list of " + ("integers" if t == "int_list" else "numbers"))
        value = [int(v) if t == "int_list" else float(v) for v in value]
    elif t == "mapping":
        if not isinstance(value, dict):
            raise bad("a mapping like {base_lr: 0.005}")
        inner = {}
        for k, v in value.items():
            if k not in FIELDS:
                raise ConfigKeyError(f"{where}: unknown config key '{k}'; {closest_key(str(k))}")
            if k == "svf" or FIELDS[k].type == "mapping":
                raise ValueError(f"{where}: '{k}' cannot be set inside it")
            inner[k] = check_value(k, v, f"{source}, {key}")
        value = inner
    else:  # pragma: no cover - schema error
        raise TypeError(f"schema type {t} of {key}")
    if field.choices is not None and value not in field.choices:
        raise ValueError(f"{where} must be one of {list(field.choices)}, got {value!r}")
    return value


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


def _format_templates(values: dict) -> dict:
    """Fill `{key}` references in string values (e.g. exp_dir) from the other values."""
    context = dict(values)
    context["svf_tag"] = "svf" if values.get("svf") else "nosvf"
    out = dict(values)
    for key, value in values.items():
        if isinstance(value, str) and "{" in value:
            try:
                out[key] = value.format(**context)
            except KeyError as exc:
                raise ConfigKeyError(f"config key '{key}' = {value!r} refers to unknown key {exc}; "
                                     f"{closest_key(exc.args[0])}") from None
    return out


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- command-line overrides, all checked; templates filled last."""
    values = {key: copy.deepcopy(field.default) for key, field in FIELDS.items()}
    if path is not None:
        if not os.path.isfile(path):
            folder = os.path.dirname(path) or "."
            known = sorted(f for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []
            raise FileNotFoundError(f"config file '{path}' not found"
                                    + (f"; configs in {folder}/: {', '.join(known)}" if known else ""))
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file '{path}' must be a mapping of key: value lines")
        for key, value in data.items():
            if key not in FIELDS:
                raise ConfigKeyError(f"unknown config key '{key}' in {path}; {closest_key(str(key))}")
            values[key] = check_value(key, value, path)
    command_line = []
    for text in overrides:
        key, value = parse_override(text)
        command_line.append((key, check_value(key, value, "command line")))
    final = dict(values, **dict(command_line))
    if not final["svf"]:
        values.update(final["nosvf"])  # svf false: the file's nosvf block, then the command line again
    values.update(command_line)
    return Config(**_format_templates(values))


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


def stage1_checkpoint_missing(cfg: Config) -> Optional[str]:
    """The stage-1 PSPNet checkpoint path when the run needs it (bam, or a backbone pretrained by stage 1,
    as in the demo) and it does not exist yet; else None."""
    path = cfg.base_learner
    if not path or os.path.isfile(path):
        return None
    needed = cfg.arch == "bam" or (cfg.pretrained and os.path.abspath(cfg.pretrained) == os.path.abspath(path))
    return path if needed else None


def main(argv=None):
    parser = argparse.ArgumentParser(description="Print a resolved config, or one key of it.")
    parser.add_argument("config")
    parser.add_argument("--get", help="print only this key ('' for null)")
    parser.add_argument("--missing-stage1", action="store_true",
                        help="print the stage-1 checkpoint path if this run needs it and it is missing (train.sh)")
    parser.add_argument("--check-data", action="store_true",
                        help="fail with the command that builds them if the data root or lists are missing (train.sh)")
    args, rest = parser.parse_known_args(argv)
    cfg = load_config(args.config, split_overrides(rest))
    if args.check_data:
        from engine.preflight import check_data
        check_data(cfg, args.config)
    elif args.missing_stage1:
        print(stage1_checkpoint_missing(cfg) or "")
    elif args.get:
        value = getattr(cfg, args.get)
        print("" if value is None else value)
    else:
        print(dump_config(cfg), end="")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, KeyError, FileNotFoundError, AttributeError) as exc:
        sys.exit(f"error: {exc}")
