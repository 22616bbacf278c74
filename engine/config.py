"""The config on the command line: `python -m engine.config CONFIG [key=value ...] [--get KEY]` prints the
resolved config (or one key); train.sh and demo.sh call it.

The schema and the loader live in `common.config` (the bottom of the dependency graph: model/ and dataset/
read `cfg.key` and import no config code); this module re-exports them so `from engine.config import
load_config` keeps working, and adds what only the entry points need (the stage-1 checkpoint check).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from common.config import *  # noqa: F401,F403  (the one schema and loader, re-exported)
from common.config import __all__ as _schema_names
from common.config import Config, dump_config, load_config, split_overrides

__all__ = [*_schema_names, "stage1_checkpoint_missing", "main"]


def stage1_checkpoint_missing(cfg: Config) -> Optional[str]:
    """The stage-1 PSPNet checkpoint path when the run needs it (bam, or a backbone pretrained by stage 1,
    as in the demo) and it does not exist yet; else None."""
    from engine.preflight import pretrained_is_stage1_checkpoint
    path = cfg.base_learner
    if not path or os.path.isfile(path):
        return None
    needed = cfg.arch == "bam" or pretrained_is_stage1_checkpoint(cfg)
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
