"""``python -m model.summary --config config/pascal_split0.yaml [key=value ...]``

Builds the model the config describes and prints what trains: the finetune method (model/finetune.py), the
trainable-parameter line (``svf.print_trainable_parameters``), the backbone's trainable count and the counts per
stage (``layer0`` .. ``layer4``, and each module path of ``finetune_stages`` for a timm backbone) and per head, after
the backbone's family rule (which outputs play layer0-4, widths, strides). Overrides are the same ``key=value`` words as train.py and test.py
take (``--set key=value`` works too), e.g. ``finetune=lora lrcc_rank=8``.
Works without the weights files: a ``pretrained`` / ``base_learner`` path that does not exist is replaced by
random initialisation, with a note saying so.
"""
import argparse
import os
import sys
import warnings

import svf

from . import finetune
from .backbones import STAGES
from .build import build_model

__all__ = ["summarize", "main"]


def _count_line(name, module):
    trainable, total = svf.count_parameters(module)
    return f"  {name:<14s} trainable {trainable:>12,d} / {total:>12,d}"


def _stage_line(backbone, stage):
    """The count line of one backbone stage (or a timm backbone's module path), by its parameter names."""
    inside = finetune._in_stages(backbone, [stage])
    params = [p for n, p in backbone.named_parameters() if inside(n)]
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return f"  {stage:<14s} trainable {trainable:>12,d} / {sum(p.numel() for p in params):>12,d}"


def summarize(cfg, file=None):
    """Build the model for ``cfg`` and print its trainable line and per-stage counts; returns the model."""
    file = file or sys.stdout
    keys = ("base_learner", "pretrained") if cfg.arch == "bam" else ("pretrained",)
    for key in keys:
        path = getattr(cfg, key)
        if path == "hub" and key == "pretrained":
            print("note: pretrained=hub (timm's download) not used for this summary: random initialisation", file=file)
            setattr(cfg, key, None)
        elif path and not os.path.isfile(path):
            print(f"note: {key} file {path!r} not found: using random initialisation for this summary", file=file)
            setattr(cfg, key, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-init notes were printed above
        model = build_model(cfg)
    print(f"arch={cfg.arch} backbone={cfg.backbone} svf={bool(cfg.svf)} finetune={finetune.method_of(cfg).name}",
          file=file)
    print(finetune.describe(cfg), file=file)
    svf.print_trainable_parameters(model, file=file)
    print(f"layout: {model.backbone.describe()}", file=file)
    print(_count_line("backbone", model.backbone), file=file)
    named = [s for s in finetune.tuned_stages(cfg) if s not in STAGES]  # a timm backbone's module paths
    for stage in STAGES + tuple(named):
        print(_stage_line(model.backbone, stage), file=file)
    backbones = ("backbone", "base_backbone")  # base_backbone: BAM+SVF's frozen copy read by its base learner
    heads = [c for n, c in model.named_children() if n not in backbones]
    trainable = sum(svf.count_parameters(c)[0] for c in heads)
    total = sum(svf.count_parameters(c)[1] for c in heads)
    print(f"  {'heads (all)':<14s} trainable {trainable:>12,d} / {total:>12,d}", file=file)
    for name, child in model.named_children():
        if name != "backbone" and any(True for _ in child.parameters()):  # base_backbone listed, not in heads
            print(_count_line(name, child), file=file)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="flat YAML config, e.g. config/pascal_split0.yaml")
    parser.epilog = "Overrides: key=value or --set key=value (any config key), as train.py and test.py."
    args, rest = parser.parse_known_args(argv)
    # the project's one config loader (defaults, checks, templates) and override parser
    from common.config import load_config, split_overrides
    try:
        overrides = split_overrides(rest)
    except ValueError as exc:
        parser.error(str(exc))
    summarize(load_config(args.config, overrides))


if __name__ == "__main__":
    main()
