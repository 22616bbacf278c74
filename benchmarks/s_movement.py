"""Does the released recipe's deepest S train at all? How far the singular values of each stage move in N steps.

    python benchmarks/s_movement.py --json s_movement.json             # paper size: batch 8, 473x473, 200 steps
    python benchmarks/s_movement.py --steps 3 --size 65 --batch 2 --backbone resnet18_deep   # a tiny CPU run

The model is the pipeline's (``model.build_model`` of ``config/pascal_split0.yaml``: baseline + SVF, ResNet-50
with the deep stem, BatchNorm folded), randomly initialised (no weights file is needed), trained with the
pipeline's optimizer (``model.param_groups`` + ``engine.optim.build_sgd``): the released recipe, S at
base_lr 0.015 x svf_lr_mult 0.1 = 0.0015, momentum 0.9, weight decay 1e-4 on S, constant LR. Inputs: a few fixed
batches of synthetic 1-shot episodes (``dataset.synthetic`` images through the training transform), cycled.

Four runs from the same initial weights (one model, its initial state loaded before each run):
- ``float32`` / ``float32+keep``: float32, plain SGD (what the released code ran) / with ``svf.keep_small_updates``
  (what train.py runs);
- ``amp`` / ``amp+keep``: the same under autocast as train.py's ``amp=true`` (float16 + GradScaler on CUDA). On a
  CPU train.py has no AMP; here ``amp`` there means bfloat16 autocast without a GradScaler (stated in the JSON).
On CUDA, float32 convolutions use cuDNN's default TF32 (as training does).

Per stage (layer2/3/4) after the last step:
- ``rel_change``: ‖S − S₀‖/‖S₀‖ (``svf.singular_value_change``);
- ``unchanged``: the fraction of S entries bit-for-bit equal to their start;
- ``rel_change_beyond_decay``: ‖S − f·S₀‖/‖S₀‖, where f is what weight decay alone (no gradient) makes of S in
  the steps that were applied (``decay_factor``): the part of the movement the gradient made;
- ``grad_ulps_median``: the median over entries of |lr·∂L/∂S| / spacing(S) at the last step, the gradient's part
  of one step in units of float32's spacing at S (below 0.5, the gradient alone rounds away);
and ``rounding_error``, per precision: ‖S_plain − S_keep‖ / ‖S₀‖, how far the plain run ended from the exactly
accumulated one (compare it with ``rel_change_beyond_decay`` of the ``+keep`` run: equal or larger means float32
rounding lost the gradient's movement). ``trajectory`` holds ``rel_change`` at a few steps. What this answers,
and its figures: docs/reproducing.md, "GPU questions".
"""
import argparse
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import svf  # noqa: E402
from common.config import load_config  # noqa: E402
from dataset.files import atomic_write_text  # noqa: E402
from dataset.build import _train_transform  # noqa: E402
from dataset.episodes import binarize  # noqa: E402
from dataset.synthetic import make_sample  # noqa: E402
from engine.loop import autocast  # noqa: E402
from engine.optim import build_sgd, scheduled_lr, set_lr  # noqa: E402
from model import build_model, param_groups  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config", "pascal_split0.yaml")
RUNS = ("float32", "float32+keep", "amp", "amp+keep")


def recipe_config(args):
    """The shipped PASCAL config (the released recipe) with random init and this run's sizes."""
    return load_config(CONFIG, [f"backbone={args.backbone}", "pretrained=null", "base_learner=null",
                                f"train_size={args.size}", f"batch_size={args.batch}", "shot=1"])


def synthetic_batches(cfg, num_batches, batch, seed=0):
    """``num_batches`` fixed 1-shot batches (query, support, support mask, query mask) of synthetic images (largest
    side ``cfg.train_size``) through the pipeline's training transform; query and support share the episode's
    class."""
    transform = _train_transform(cfg)
    pool = [make_sample(np.random.default_rng([seed, k]), max(int(cfg.train_size), 32))
            for k in range(2 * num_batches * batch + 20)]
    holders = {}
    for k, (_, label) in enumerate(pool):
        for c in np.unique(label):
            if 0 < c < 255:
                holders.setdefault(int(c), []).append(k)
    rng = np.random.default_rng([seed, 1])
    batches = []
    for b in range(num_batches):
        items = []
        for j in range(batch):
            query = b * batch + j
            classes = [c for c in np.unique(pool[query][1]) if 0 < c < 255 and len(holders[int(c)]) > 1]
            if not classes:
                raise RuntimeError("synthetic_batches: a query image has no class shared with another image")
            c = int(classes[int(rng.integers(len(classes)))])
            support = int(rng.choice([k for k in holders[c] if k != query]))
            pair = [transform(pool[i][0].astype(np.float32), binarize(pool[i][1], c), rng) for i in (query, support)]
            items.append(pair)
        q = torch.stack([p[0][0] for p in items])
        qm = torch.stack([p[0][1] for p in items])
        s = torch.stack([p[1][0] for p in items])[:, None]
        sm = torch.stack([p[1][1] for p in items])[:, None]
        batches.append((q, s, sm, qm))
    return batches


def decay_factor(lr, weight_decay, momentum, steps):
    """What ``steps`` SGD steps with weight decay alone (zero gradient) make of S = 1, in float64: torch's SGD
    takes buf = g + wd·S at the first step, buf = m·buf + g + wd·S after, then S -= lr·buf (dampening 0)."""
    s, buf = 1.0, None
    for _ in range(steps):
        d = weight_decay * s
        buf = d if buf is None else momentum * buf + d
        s -= lr * buf
    return s


def spacing(t):
    """float32 spacing at each entry of ``t`` (the distance to the next float32 away from zero)."""
    t = t.detach().float()
    return (torch.nextafter(t, torch.where(t >= 0, math.inf, -math.inf) * torch.ones_like(t)) - t).abs()


def _stage(name):
    return name.split(".")[0]


def stage_stats(backbone, start, factor):
    """Per stage: rel_change, unchanged fraction, rel_change_beyond_decay (see the module doc)."""
    acc = {}
    for name, p in svf.singular_value_parameters(backbone).items():
        if not p.requires_grad:
            continue
        s, s0 = p.detach().cpu().double(), start[name].double()
        a = acc.setdefault(_stage(name), {"d": 0.0, "n": 0.0, "beyond": 0.0, "same": 0, "count": 0})
        a["d"] += float((s - s0).square().sum())
        a["beyond"] += float((s - factor * s0).square().sum())
        a["n"] += float(s0.square().sum())
        a["same"] += int((p.detach().cpu() == start[name]).sum())
        a["count"] += s.numel()
    return {k: {"rel_change": math.sqrt(a["d"] / a["n"]), "unchanged": a["same"] / a["count"],
                "rel_change_beyond_decay": math.sqrt(a["beyond"] / a["n"]), "entries": a["count"]}
            for k, a in acc.items()}


def grad_ulps(backbone, lr):
    """Per stage: median over entries of |lr·grad| / spacing(S) (the gradient as left after unscaling)."""
    ratios = {}
    for name, p in svf.singular_value_parameters(backbone).items():
        if p.requires_grad and p.grad is not None:
            r = (lr * p.grad.detach().float().abs() / spacing(p)).cpu()
            ratios.setdefault(_stage(name), []).append(r.flatten())
    return {k: float(torch.cat(v).median()) for k, v in ratios.items()}


def s_values(backbone):
    return {n: p.detach().cpu().clone() for n, p in svf.singular_value_parameters(backbone).items()}


def build(cfg, args, device):
    """The pipeline's model, randomly initialised from ``args.seed``, and a copy of its initial state."""
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # randomly initialised: expected here
        model = build_model(cfg).to(device)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def train_run(name, cfg, model, initial, batches, args, device):
    """One run from the initial state (loaded into ``model``; the folded-weight and merged-weight caches follow the
    loaded tensors) with a new optimizer, N steps; returns its figures, its starting S and its final S."""
    amp, keep = name.startswith("amp"), name.endswith("+keep")
    model.load_state_dict(initial)
    model.train()
    torch.manual_seed(args.seed + 1)  # the same dropout draws in every run
    optimizer = build_sgd(param_groups(model, cfg), cfg.base_lr, cfg.momentum, cfg.weight_decay)
    s_group = next(g for g in optimizer.param_groups if g["name"] == "singular_values")
    if keep:
        svf.keep_small_updates(optimizer, model)
    start = s_values(model.backbone)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp and cuda)
    if amp and not cuda:
        precision = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    else:
        precision = lambda: autocast(device, amp)  # noqa: E731  train.py's: float16 on CUDA
    batches = [[t.to(device) for t in b] for b in batches]
    checkpoints = sorted({c for c in (1, 10, 50, 100) if c < args.steps} | {args.steps})
    applied, losses, trajectory, ulps = 0, [], {}, {}
    total_steps = args.steps
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for step in range(args.steps):
        set_lr(optimizer, scheduled_lr(cfg.lr_schedule, cfg.base_lr, step, total_steps, cfg.power))
        q, s, sm, qm = batches[step % len(batches)]
        with precision():
            _, loss = model(q, s, sm, qm)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scale = scaler.get_scale() if scaler.is_enabled() else None
        if scaler.is_enabled():
            scaler.unscale_(optimizer)  # the true gradients, for grad_ulps
        if step == args.steps - 1:
            ulps = grad_ulps(model.backbone, s_group["lr"])
        scaler.step(optimizer)
        scaler.update()
        applied += 0 if scale is not None and scaler.get_scale() < scale else 1  # a lowered scale: step skipped
        losses.append(float(loss.detach()))
        if step + 1 in checkpoints:
            change = svf.singular_value_change(model.backbone, start)
            trajectory[step + 1] = {k: change[k] for k in sorted(change)}
    sync()
    seconds = time.perf_counter() - t0
    factor = decay_factor(s_group["lr"], s_group["weight_decay"], cfg.momentum, applied)
    stats = stage_stats(model.backbone, start, factor)
    for k in stats:
        stats[k]["grad_ulps_median"] = ulps.get(k, float("nan"))
    result = {"precision": ("float16 autocast + GradScaler" if cuda else "bfloat16 autocast (CPU)") if amp
              else "float32" + (" (TF32 convolutions)" if cuda and torch.backends.cudnn.allow_tf32 else ""),
              "keep_small_updates": keep, "steps": args.steps, "applied_steps": applied,
              "decay_factor": factor, "stages": dict(sorted(stats.items())), "trajectory": trajectory,
              "loss_first": losses[0], "loss_last": losses[-1], "finite": all(math.isfinite(v) for v in losses),
              "seconds_per_step": seconds / args.steps}
    return result, start, s_values(model.backbone)


def rounding_error(start, plain, kept):
    """Per stage: ‖S_plain − S_keep‖ / ‖S₀‖ over the singular values that moved in either run."""
    acc = {}
    for name in kept:
        if torch.equal(kept[name], start[name]) and torch.equal(plain[name], start[name]):
            continue  # a frozen stage
        a = acc.setdefault(_stage(name), [0.0, 0.0])
        a[0] += float((plain[name].double() - kept[name].double()).square().sum())
        a[1] += float(start[name].double().square().sum())
    return {k: math.sqrt(d / n) for k, (d, n) in sorted(acc.items())}


def report(out):
    runs = out["runs"]
    stages = sorted({s for r in runs.values() for s in r["stages"]})
    print(f"\n{'run':<14} {'stage':<7} {'‖S−S₀‖/‖S₀‖':>12} {'beyond decay':>13} {'unchanged':>10} "
          f"{'grad/ulp':>9} {'rounding err.':>13}")
    for name, r in runs.items():
        err = out["rounding_error"].get(name.split("+")[0], {}) if not name.endswith("+keep") else {}
        for s in stages:
            st = r["stages"][s]
            print(f"{name:<14} {s:<7} {st['rel_change']:>12.3e} {st['rel_change_beyond_decay']:>13.3e} "
                  f"{st['unchanged']:>10.3f} {st['grad_ulps_median']:>9.2e} "
                  f"{err[s] if s in err else float('nan'):>13.3e}")
    for name, r in runs.items():
        print(f"{name}: {r['precision']}, {r['applied_steps']}/{r['steps']} steps applied, loss "
              f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}, {r['seconds_per_step']:.3f} s/step")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--size", type=int, default=473, help="training crop side (train_size)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4, help="distinct fixed batches, cycled")
    ap.add_argument("--backbone", default="resnet50", help="resnet50 (deep stem, the paper's) or resnet18_deep (tests)")
    ap.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.batches < 1:
        ap.error("--steps, --batch and --batches must be positive")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # speed only: S's updates are rounded in the optimizer, not the convs
    cfg = recipe_config(args)
    batches = synthetic_batches(cfg, args.batches, args.batch, args.seed)
    out = {"args": vars(args), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__,
           "recipe": {"config": os.path.relpath(CONFIG, ROOT), "arch": cfg.arch, "backbone": cfg.backbone,
                      "lr_S": cfg.base_lr * cfg.svf_lr_mult, "lr_heads": cfg.base_lr * cfg.head_lr_mult,
                      "momentum": cfg.momentum, "weight_decay_S": cfg.weight_decay if cfg.svf_weight_decay else 0.0,
                      "lr_schedule": cfg.lr_schedule, "fold_batchnorm": cfg.fold_batchnorm},
           "runs": {}, "rounding_error": {}}
    print(f"S movement: {cfg.arch} + SVF, {cfg.backbone}, batch {args.batch} at {args.size}x{args.size}, "
          f"{args.steps} steps on {out['device']}; S lr {out['recipe']['lr_S']:g}, momentum {cfg.momentum}, "
          f"weight decay {out['recipe']['weight_decay_S']:g}", flush=True)
    model, initial = build(cfg, args, device)
    finals, start = {}, None
    for name in args.runs:
        out["runs"][name], s0, finals[name] = train_run(name, cfg, model, initial, batches, args, device)
        if start is not None and any(not torch.equal(start[k], s0[k]) for k in start):
            raise RuntimeError(f"{name}: the runs did not start from the same singular values")
        start = s0
        print(f"{name}: done ({out['runs'][name]['seconds_per_step']:.3f} s/step)", flush=True)
        for plain in ("float32", "amp"):
            if plain in finals and plain + "+keep" in finals:
                out["rounding_error"][plain] = rounding_error(start, finals[plain], finals[plain + "+keep"])
        write(out, args.json)  # after every run: a run stopped by a time limit keeps what it measured
    report(out)
    return out


def write(out, path):
    if path:
        atomic_write_text(path, json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
