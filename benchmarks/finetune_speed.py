"""Every fine-tuning method at paper size: step time and peak memory per method, in one table.

    python benchmarks/finetune_speed.py --json finetune_speed.json          # GPU: batch 8 at 473x473, float32 + AMP
    python benchmarks/finetune_speed.py --methods svf --shot 5 --json finetune_speed_5shot.json
    python benchmarks/finetune_speed.py --size 33 --batch 1 --backbone resnet18_deep --iters 1 --warmup 1   # tiny

Each method is built the way train.py builds it: ``config/pascal_split0.yaml`` (baseline, ResNet-50 with the deep
stem, BatchNorm folded) with ``finetune=<method>``, through ``model.build_model``, ``model.param_groups`` and
``engine.optim.build_sgd`` (plus ``svf.keep_small_updates`` when singular values train, as train.py), randomly
initialised. One method at a time (the previous one freed), so that its peak memory is its own: model, optimizer
state and the step's activations (``torch.cuda.max_memory_allocated`` over the timed steps; none on a CPU).
A training step is forward + backward + optimizer step on one fixed random batch (``svf_speed.inputs``); the
least and the median of ``--iters`` steps after ``--warmup``, wall clock. ``--precisions float32 amp``: float32
(cuDNN's default TF32 on CUDA) and train.py's ``amp=true`` (float16 autocast + GradScaler; CUDA only, skipped on a
CPU as train.py does).

The methods are those of the fine-tuning registry (``model/finetune.py``, config key ``finetune``): freeze (the
backbone frozen: PFENet/BAM without SVF), svf, full, bias, bn, lora, dna.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import svf  # noqa: E402
from common.config import load_config  # noqa: E402
from dataset.files import atomic_write_text  # noqa: E402
from engine.loop import autocast  # noqa: E402
from engine.optim import build_sgd  # noqa: E402
from model import build_model, param_groups  # noqa: E402
from svf_speed import inputs, sync  # noqa: E402

CONFIG = os.path.join(ROOT, "config", "pascal_split0.yaml")
METHODS = ("freeze", "svf", "full", "bias", "bn", "lora", "dna")


def method_config(method, args):
    """The shipped config with ``finetune=method``, random init and this run's sizes."""
    keys = [f"finetune={method}", f"backbone={args.backbone}", "pretrained=null", "base_learner=null",
            f"shot={args.shot}", f"batch_size={args.batch}", f"train_size={args.size}"]
    try:
        return load_config(CONFIG, keys)
    except KeyError as exc:  # ConfigKeyError: a checkout without the fine-tuning registry
        if "finetune" in str(exc):
            raise SystemExit(f"finetune_speed: this checkout has no `finetune` config key ({exc}); the benchmark "
                             "needs the fine-tuning method registry (model/finetune.py)") from None
        raise


def build(method, args, device):
    cfg = method_config(method, args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # randomly initialised: expected here
        model = build_model(cfg).to(device).train()
    optimizer = build_sgd(param_groups(model, cfg), cfg.base_lr, cfg.momentum, cfg.weight_decay)
    if any(p.requires_grad for p in svf.singular_value_parameters(model).values()):
        svf.keep_small_updates(optimizer, model)
    return cfg, model, optimizer


def time_steps(model, optimizer, batch, args, device, amp):
    """Least and median step time, peak memory (CUDA) and the last loss of ``args.iters`` timed steps."""
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp and cuda)
    times, loss = [], None
    for it in range(args.warmup + args.iters):
        if cuda and it == args.warmup:
            sync(device)
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, amp):
            _, loss = model(*batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sync(device)
        if it >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"min_s": min(times), "median_s": statistics.median(times),
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "loss": float(loss.detach()), "finite": bool(torch.isfinite(loss.detach()))}


def report(out):
    precisions = out["args"]["precisions"]
    head = f"{'method':<8} {'trainable':>12} {'in backbone':>12}"
    for p in precisions:
        head += f" | {p + ' step (s)':>17} {'x svf':>6} {'peak MiB':>9}"
    print("\n" + head)
    ref = out["methods"].get("svf", {})
    for name, r in out["methods"].items():
        line = f"{name:<8} {r['trainable']:>12,d} {r['trainable_backbone']:>12,d}"
        for p in precisions:
            m = r.get(p)
            if m is None:
                line += f" | {'-':>17} {'-':>6} {'-':>9}"
                continue
            x = m["min_s"] / ref[p]["min_s"] if ref.get(p) else float("nan")
            peak = f"{m['peak_mib']:.0f}" if m["peak_mib"] is not None else "-"
            line += f" | {m['min_s']:>17.4f} {x:>6.2f} {peak:>9}"
        print(line)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--precisions", nargs="+", choices=["float32", "amp"], default=["float32", "amp"])
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--size", type=int, default=473)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shot", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and "amp" in args.precisions:
        print("note: amp applies to CUDA only (as in train.py); float32 only on this CPU")
        args.precisions = [p for p in args.precisions if p != "amp"] or ["float32"]
    torch.backends.cudnn.benchmark = True
    batch = inputs(argparse.Namespace(model="fss", batch=args.batch, size=args.size, shot=args.shot), device)
    out = {"args": vars(args), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "methods": {}}
    print(f"fine-tuning methods: baseline, {args.backbone}, batch {args.batch} at {args.size}x{args.size}, "
          f"{args.shot}-shot, on {out['device']}; least of {args.iters} steps after {args.warmup}", flush=True)
    for method in args.methods:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        _, model, optimizer = build(method, args, device)
        r = out["methods"][method] = {
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "trainable_backbone": sum(p.numel() for p in model.backbone.parameters() if p.requires_grad),
            "build_s": time.perf_counter() - t0}
        for precision in args.precisions:
            r[precision] = time_steps(model, optimizer, batch, args, device, precision == "amp")
        print(f"{method}: " + ", ".join(f"{p} {r[p]['min_s']:.4f} s" for p in args.precisions), flush=True)
        write(out, args.json)  # after every method: a run stopped by a time limit keeps what it measured
        del model, optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report(out)
    return out


def write(out, path):
    if path:
        atomic_write_text(path, json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
