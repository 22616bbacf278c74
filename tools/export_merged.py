"""Export a trained model with its backbone merged back into plain layers.

    python tools/export_merged.py --config config/pascal_split0.yaml [key=value ...] [--weights FILE] --out merged.pth

Builds the model the config describes (its ``finetune`` method), loads the run's checkpoint (``--weights``, else
the run's best.pth / last.pth per ``checkpoint_select``), merges the backbone (model/finetune.py ``merged``:
svf -> ``svf.merge``, lora / dna -> ``lrcc.merge``), checks on a random episode that the merged model gives the
trained model's output, and writes ``{"model": merged state dict, "config": ..., "merged_from": method}``. The
file loads into the same arch built with ``finetune=freeze`` (a plain backbone):
``python test.py --config ... finetune=freeze --weights merged.pth``. Methods that do not convert layers
(freeze, full, bias, bn) already train plain layers: their checkpoint is written unchanged in the same form.
BAM is refused: its base learner reads a separate frozen copy of the stage-1 backbone, which a freeze build
does not have.
"""
import argparse
import os
import sys
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from engine.checkpoint import atomic_save, evaluation_checkpoint, load_model_weights  # noqa: E402
from engine.config import finetune_method, load_config, split_overrides  # noqa: E402

__all__ = ["export_merged", "main"]


def _episode(cfg, size=65):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 3, size, size, generator=g)
    s = torch.randn(1, cfg.shot, 3, size, size, generator=g)
    m = (torch.rand(1, cfg.shot, size, size, generator=g) > 0.5).float()
    return q, s, m


def export_merged(cfg, weights, out):
    """Merge the checkpoint ``weights`` of the run ``cfg`` into plain layers and write it to ``out``; returns the
    largest absolute difference between the merged and the trained model's logits on a random episode."""
    import model as models
    from model import finetune

    if cfg.arch == "bam":
        raise ValueError("export_merged: arch=bam is not exported: its base learner reads a separate frozen copy of "
                         "the stage-1 backbone that a finetune=freeze build does not have; keep its checkpoint")
    method = finetune.method_of(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every weight comes from the checkpoint
        net = models.build_model(cfg.replace(pretrained=None, base_learner=None))
    load_model_weights(net, weights, config=cfg.to_dict())
    merged = finetune.merged(net, cfg).eval()
    net.eval()
    with torch.no_grad():
        x = (torch.randn(1, 3, 65, 65),) if cfg.arch == "pspnet" else _episode(cfg)
        difference = float((merged(*x) - net(*x)).abs().max())
    plain_cfg = cfg.replace(svf=False, finetune="freeze").to_dict()
    atomic_save({"model": merged.state_dict(), "config": plain_cfg, "merged_from": method.name}, out)
    return difference


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Overrides: key=value or --set key=value (any config key).")
    parser.add_argument("--config", required=True)
    parser.add_argument("--weights", help="checkpoint to merge (default: the run's best.pth / last.pth)")
    parser.add_argument("--out", required=True, help="file to write")
    args, rest = parser.parse_known_args(argv)
    cfg = load_config(args.config, split_overrides(rest))
    weights = args.weights or evaluation_checkpoint(cfg.exp_dir, cfg.checkpoint_select)
    difference = export_merged(cfg, weights, args.out)
    print(f"merged {weights} (finetune {finetune_method(cfg)}) -> {args.out}; "
          f"largest |merged - trained| logit difference on a random episode: {difference:.2e}")
    return difference


if __name__ == "__main__":
    try:
        main()
    except (ValueError, KeyError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
