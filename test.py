"""Evaluate a trained few-shot segmentation model with the standard episodic protocol.

    python test.py --config config/pascal_split0.yaml            # the run that config produced
    python test.py --config config/pascal_split0.yaml --shot 5   # same model, 5-shot episodes
    python test.py --config ... --weights FILE                   # any checkpoint / state dict, or a
                                                                 # released SVF/BAM/PFENet checkpoint
    python test.py --config ... --untrained                      # the model as built, no training
    python -m torch.distributed.run --nproc_per_node 2 test.py --config ...

Weights: `exp_dir/best.pth` or `exp_dir/last.pth` per `checkpoint_select`, unless --weights.
For every seed in `test_seeds`, `test_episodes` episodes are precomputed from the seed (same list
for any number of processes or loader workers), sharded across ranks, and the intersection/union
buffers are all-reduced: the numbers do not depend on the number of processes or workers. Prints the
per-class IoU, mIoU and FB-IoU (mean ± sample std over seeds) and writes them to
`exp_dir/test_{K}shot.json` (`test_{K}shot_untrained.json` with --untrained; with --weights FILE,
`test_{K}shot_weights-<name>-<hash of FILE's path>.json`, so another checkpoint never overwrites the run's results;
a model tested on another benchmark than it trained on (`train_benchmark`, the cross-domain configs
config/cdfss_*.yaml) writes `test_<benchmark>_{K}shot.json`;
figures likewise go to `vis_{K}shot_untrained/` and `vis_{K}shot_weights-.../`). `--vis N` writes N PNG
figures of the first seed's episodes to `exp_dir/vis_{K}shot/`: supports with their mask (blue) | query with
the ground truth (green) | query with the prediction (magenta), titled with the class name and the episode's IoU
(engine/vis.py).

Before any episode `--out` is checked: a file path (not a folder) whose folder takes a write (a full disk fails
here), replacing an existing file only when it holds earlier results of test.py or with `--overwrite`. If writing
the results still fails after the run, they are printed as JSON and saved in the run's folder (or the temporary
folder), and the error says where.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import statistics
import sys
import time
import warnings

from dataset.files import atomic_write_text
from engine.checkpoint import evaluation_checkpoint, load_weights
from engine.config import Config, finetune_method, load_config, split_overrides
from engine.distributed import DistInfo, cleanup_distributed, init_distributed, print0, seed_everything
from engine.loop import evaluate_episodes
from engine.preflight import check_base_learner, check_data, check_pretrained, check_writable, value_origin
from engine.vis import make_visualiser


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="Overrides: key=value or --set key=value (any config key).")
    parser.add_argument("--config", required=True)
    parser.add_argument("--weights", help="checkpoint to evaluate instead of the run's best/last.pth")
    parser.add_argument("--untrained", action="store_true",
                        help="evaluate the freshly built model (pretrained backbone, untrained heads)")
    parser.add_argument("--shot", type=int, help="support images per episode (default: the config's shot)")
    parser.add_argument("--vis", type=int, default=0, metavar="N", help="write N PNG figures")
    parser.add_argument("--out", help="results JSON (default exp_dir/test_{K}shot.json); an existing file is replaced "
                                      "only when it holds earlier results of test.py (or with --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --out replace an existing file that is not a results file of test.py")
    args, rest = parser.parse_known_args(argv)
    if args.weights and args.untrained:
        parser.error("--weights and --untrained exclude each other")
    if args.shot is not None and args.shot < 1:
        parser.error(f"--shot must be at least 1 (support images per episode), got {args.shot}")
    if args.vis < 0:
        parser.error(f"--vis must be >= 0, got {args.vis}")
    return args, split_overrides(rest)


def finite_or_none(value):
    """A figure for the results JSON: None (null) where there was nothing to measure (NaN)."""
    return value if value is not None and math.isfinite(value) else None


def mean_std(values):
    """Mean and sample std over seeds of the figures that exist (None: that seed had nothing to measure);
    (None, None) when none does."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def report_temporaries(folder: str):
    """Name the temporary files a save killed mid-write (kill -9) left in the run's folder. test.py never deletes
    in a run's folder: when a training holds it (engine/runlock.py), such a file may be a write in progress,
    so nothing is said; otherwise the next training started there removes them."""
    from dataset.files import stale_temporaries
    from engine.checkpoint import BEST, LAST
    from engine.runlock import exp_dir_holder

    if not os.path.isdir(folder) or exp_dir_holder(folder) is not None:
        return
    for path in stale_temporaries(folder, [LAST, BEST, "config.yaml"]):
        print0(f"note: {path} was left by an interrupted save (the checkpoints themselves are whole); the next "
               f"training in this folder removes it, or delete it")


def main(argv=None) -> dict:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    origin = " ".join([args.config] + overrides)
    shot = cfg.shot if args.shot is None else args.shot
    check_data(cfg, origin)
    out = args.out or os.path.join(cfg.exp_dir, f"test_{results_tag(shot, args.untrained, args.weights, cfg)}.json")
    check_output(out, args, "the command line (--out)" if args.out else value_origin("exp_dir", args.config, overrides))
    if args.untrained:  # built as in training; otherwise every weight comes from the checkpoint
        check_base_learner(cfg, origin)
        check_pretrained(cfg, origin)
    dist_info = init_distributed()
    try:
        return evaluate(cfg, args, shot, dist_info, origin, out)
    finally:
        cleanup_distributed()


# what makes a JSON file a results file of test.py (one that --out may replace without --overwrite)
RESULT_KEYS = ("benchmark", "fold", "shot", "miou", "per_seed")


def is_results_file(path: str) -> bool:
    """Whether `path` holds a results JSON written by test.py (RESULT_KEYS)."""
    try:
        with open(path) as fh:
            result = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and all(k in result for k in RESULT_KEYS)


def check_output(out: str, args, origin: str):
    """Before any episode: the results file must be a file path (not a folder), must not replace a file that is not
    earlier results of test.py (unless --overwrite), and its folder must take a write (check_writable: permissions
    and a full disk)."""
    name = "--out" if args.out else "the results file"
    if os.path.isdir(out):
        raise IsADirectoryError(f"{name} '{out}' (from {origin}) is a folder; --out names the results file, e.g. "
                                f"--out {os.path.join(out, 'test_results.json')}")
    if os.path.exists(out) and not args.overwrite and not is_results_file(out):
        raise FileExistsError(f"{name} '{out}' (from {origin}) exists and is not a results file of test.py; choose "
                              "another --out, or pass --overwrite to replace it")
    check_writable(os.path.dirname(out) or ".", "--out folder" if args.out else "exp_dir", origin)


def write_results(out: str, text: str, args, cfg: Config):
    """Write the results JSON to `out`. When that fails after the run (the disk filled up meanwhile, the folder
    went away), the results are not lost: printed to stdout and saved in the first writable of the run's folder
    and the temporary folder, and the error names --out, the reason and where they are."""
    import tempfile

    from engine.checkpoint import write_error_reason
    try:
        atomic_write_text(out, text)
        return
    except OSError as exc:
        error = exc
    print(text, flush=True)
    saved = None
    name = f"test_results_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}.json"
    for folder in dict.fromkeys([os.path.abspath(cfg.exp_dir), tempfile.gettempdir()]):
        if folder == os.path.dirname(os.path.abspath(out)):
            continue
        try:
            atomic_write_text(os.path.join(folder, name), text)
            saved = os.path.join(folder, name)
            break
        except OSError:
            continue
    where = f"saved to '{saved}'" if saved else "not saved elsewhere either (no writable folder)"
    raise OSError(f"cannot write the results to {'--out ' if args.out else ''}'{out}': "
                  f"{write_error_reason(os.path.dirname(os.path.abspath(out)), error)}. The results were printed "
                  f"above (JSON) and {where}: copy them to where you want them") from None


def evaluate(cfg: Config, args, shot: int, dist_info: DistInfo, origin: str, out: str) -> dict:
    import dataset
    import model as models

    seed_everything(cfg.seed)
    if args.untrained:
        net = models.build_model(cfg.replace(shot=shot))
    else:
        # the checkpoint holds every weight (backbone and base learner included), so the model is built
        # without reading `pretrained` / `base_learner`, and their "random init" warnings do not apply
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", models.RandomInitWarning)
            net = models.build_model(cfg.replace(shot=shot, pretrained=None, base_learner=None))
    net = net.to(dist_info.device)
    if args.untrained:
        weights = None
        print0("evaluating the untrained model (as built from the config)")
    else:
        weights = args.weights or evaluation_checkpoint(cfg.exp_dir, cfg.checkpoint_select)
        report_temporaries(os.path.dirname(weights))
        ckpt = load_weights(net, weights, hint=f"train it first: sh train.sh ... or python train.py --config {origin}",
                            config=cfg.replace(shot=shot).to_dict())
        epoch = f" (epoch {ckpt['epoch']})" if isinstance(ckpt.get("epoch"), int) else ""
        print0(f"weights: {weights}{epoch}; checkpoint rule: "
               f"{'--weights' if args.weights else cfg.checkpoint_select}")
    net.eval()
    class_ids = dataset.novel_classes_of(cfg)
    amp = cfg.amp and dist_info.device.type == "cuda"

    per_seed = []
    for i, seed in enumerate(cfg.test_seeds):
        episodes = dataset.build_test_dataset(cfg, seed, cfg.test_episodes, shot=shot)
        on_episode = None
        if i == 0 and args.vis > 0:
            tag = results_tag(shot, args.untrained, args.weights, cfg)
            vis_dir = os.path.join(os.path.dirname(args.out) if args.out else cfg.exp_dir, f"vis_{tag}")
            on_episode = make_visualiser(vis_dir, args.vis, dataset.benchmark_of(cfg), cfg.test_resize_smaller)
        t0 = time.time()
        metric = evaluate_episodes(net, episodes, class_ids, dist_info, cfg.workers, amp,
                                   progress=True, on_episode=on_episode)
        missing = metric.missing_classes()
        if missing:
            print0(f"warning: seed {seed}: no episode of classes {missing}; mIoU averages the others")
        per_seed.append({"seed": seed, "miou": finite_or_none(metric.miou()), "fbiou": finite_or_none(metric.fbiou()),
                         "class_iou": {str(c): finite_or_none(v) for c, v in metric.class_iou().items()},
                         "classes_without_episodes": missing, "episodes": int(metric.episodes.sum())})
        print0(f"seed {seed}: mIoU {100 * metric.miou():.2f}  FB-IoU {100 * metric.fbiou():.2f}  "
               f"({len(episodes)} episodes, {time.time() - t0:.0f}s)")

    miou_mean, miou_std = mean_std([r["miou"] for r in per_seed])
    fbiou_mean, fbiou_std = mean_std([r["fbiou"] for r in per_seed])
    class_iou = {str(c): mean_std([r["class_iou"][str(c)] for r in per_seed])[0] for c in class_ids}
    bench = dataset.benchmark_of(cfg)
    result = {"benchmark": cfg.benchmark, "train_benchmark": cfg.train_benchmark or cfg.benchmark,
              "episode_sampler": cfg.episode_sampler, "data_root": cfg.data_root, "num_folds": bench.num_folds,
              "class_names": {str(c): bench.class_name(c) for c in class_ids},
              "fold": cfg.fold, "shot": shot, "trained_shot": cfg.shot,
              "arch": cfg.arch, "backbone": cfg.backbone, "svf": cfg.svf, "finetune": finetune_method(cfg),
              "coco_split": cfg.coco_split,
              "filter_novel": cfg.filter_novel, "weights": weights, "untrained": bool(args.untrained),
              "checkpoint_select": "--weights" if other_weights(args.weights, cfg) else cfg.checkpoint_select,
              "episodes_per_seed": cfg.test_episodes, "seeds": list(cfg.test_seeds),
              "miou": miou_mean, "miou_std": miou_std, "fbiou": fbiou_mean, "fbiou_std": fbiou_std,
              "class_iou": class_iou, "per_seed": per_seed, "world_size": dist_info.world_size,
              "device": dist_info.device.type}

    print0(f"\n{cfg.benchmark} fold {cfg.fold} {shot}-shot, {len(cfg.test_seeds)} seed(s) x {cfg.test_episodes} episodes")
    print0("class  IoU %   name")
    for c in class_ids:
        print0(f"{c:>5}  {percent(class_iou[str(c)]):>6}   {bench.class_name(c)}")
    print0(f"mIoU   {percent(miou_mean)} ± {percent(miou_std)}")
    print0(f"FB-IoU {percent(fbiou_mean)} ± {percent(fbiou_std)}")
    if dist_info.is_main:
        # strict JSON: a figure with nothing to average is null (named in classes_without_episodes), never NaN
        write_results(out, json.dumps(result, indent=1, allow_nan=False) + "\n", args, cfg)
        print0(f"results: {out}")
    return result


def other_weights(weights, cfg: Config) -> bool:
    """--weights names a file other than the checkpoint the run's config selects."""
    own = evaluation_checkpoint(cfg.exp_dir, cfg.checkpoint_select)
    return bool(weights) and os.path.abspath(weights) != os.path.abspath(own)


def results_tag(shot: int, untrained: bool, weights, cfg: Config) -> str:
    """What names the results (test_{tag}.json) and figures (vis_{tag}/): {K}shot for the run's own checkpoint,
    a tag of their own for --untrained and --weights, so neither overwrites the run's; a model trained on another
    benchmark (``train_benchmark``: cross-domain testing) gets the tested benchmark first, {benchmark}_{K}shot."""
    if cfg.train_benchmark and cfg.train_benchmark != cfg.benchmark:
        shot = f"{cfg.benchmark}_{shot}"
    if not other_weights(weights, cfg):
        return f"{shot}shot{'_untrained' if untrained else ''}"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(os.path.basename(weights))[0])
    digest = hashlib.sha1(os.path.abspath(weights).encode()).hexdigest()[:8]
    return f"{shot}shot_weights-{stem}-{digest}"


if __name__ == "__main__":
    try:
        main()
    except (ValueError, KeyError, OSError) as exc:  # also a folder that is not writable, a full disk
        sys.exit(f"error: {exc}")
