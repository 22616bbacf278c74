"""``python -m model.summary --config config/pascal_split0.yaml [--set key=value ...]``

Builds the model the config describes and prints what trains: the trainable-parameter line
(``svf.print_trainable_parameters``) and the counts per stage (``layer0`` .. ``layer4``) and per head.
Works without the weights files: a ``pretrained`` / ``base_learner`` path that does not exist is replaced by
random initialisation, with a note saying so.
"""
import argparse
import os
import sys
import warnings

import svf

from .backbones import STAGES
from .build import build_model

__all__ = ["summarize", "main"]


def _count_line(name, module):
    trainable, total = svf.count_parameters(module)
    return f"  {name:<14s} trainable {trainable:>12,d} / {total:>12,d}"


def summarize(cfg, file=None):
    """Build the model for ``cfg`` and print its trainable line and per-stage counts; returns the model."""
    file = file or sys.stdout
    keys = ("base_learner", "pretrained") if cfg.arch == "bam" else ("pretrained",)
    for key in keys:
        path = getattr(cfg, key)
        if path and not os.path.isfile(path):
            print(f"note: {key} file {path!r} not found: using random initialisation for this summary", file=file)
            setattr(cfg, key, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-init notes were printed above
        model = build_model(cfg)
    print(f"arch={cfg.arch} backbone={cfg.backbone} svf={bool(cfg.svf)}", file=file)
    svf.print_trainable_parameters(model, file=file)
    for stage in STAGES:
        print(_count_line(stage, getattr(model.backbone, stage)), file=file)
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
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set svf=true")
    args = parser.parse_args(argv)
    from common.config import load_config  # the project's one config loader (defaults, checks, templates)
    summarize(load_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
