"""What does fine-tuning a ViT backbone cost? SVF against the frozen floor, LoRA and full fine-tuning, per step.

    python benchmarks/vit_speed.py                                   # CPU: ViT-S/16 (DINOv3), batch 2 at 224, 1 thread
    python benchmarks/vit_speed.py --device cuda --batch 8 --size 448 --iters 20 --json vit_speed_gpu.json
    python benchmarks/vit_speed.py --model vit_small_patch14_dinov2 --size 224

The backbone is ``backbone: timm:<model>`` as the few-shot models build it (model/timm_backbone.py; randomly
initialised, the published size), with a 1x1 two-class head on layer4 and cross-entropy at the patch resolution
(the few-shot heads add the same cost to every variant). What trains is layer2-4 (blocks 3-11 of 12), each variant
built by the fine-tuning registry (model/finetune.py) as train.py builds it:
- frozen: the backbone frozen with no backward through it (PFENet/BAM without SVF);
- floor: every backbone weight frozen, gradients still flowing back through layer2-4 (one LayerNorm bias of the
  first layer2 block trains): what any method that tunes something inside layer2 must pay;
- svf: ``finetune=svf`` (``svf.resolver`` + the paper's freezing): the singular values of every Linear of layer2-4;
- lora_rN: ``finetune=lora lrcc_rank=N`` (every Linear of layer2-4; LoRA cannot go below rank 1, which already
  trains 3.75x SVF's count on a ViT block: the nearest it comes to SVF's budget);
- full: ``finetune=full``: every parameter of layer2-4.
A step is forward + backward + SGD step on one fixed batch; the least (and the median) of ``--iters`` steps after
``--warmup``, the variants timed round-robin so that they see the same machine. Clock: on the CPU the main
thread's CPU time (``time.thread_time``: with one thread it is the step's computation, which other jobs on a shared
machine barely disturb; ``--clock wall`` for the wall clock), on CUDA the synchronised wall clock. Memory: the bytes autograd saves
for the backward pass (saved-tensor hooks, any device), the trainable state (parameters + gradients + momentum)
and, on CUDA, the peak memory a step allocates above what the models hold. Multiply-adds: every Linear and conv
of the step, forward and backward (input gradients where needed, weight gradients where the weight trains;
dS costs the Uᵀg product it needs anyway). Not asserted by any test: numbers for docs/training.md.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import lrcc  # noqa: E402
import svf  # noqa: E402
from common.config import defaults  # noqa: E402
from model import build_backbone, finetune  # noqa: E402
from svf_speed import BackboneOnly, SavedBytes, sync  # noqa: E402  (head on layer4, cross-entropy)

STAGES = ("layer2", "layer3", "layer4")


def build_variant(name, args):
    torch.manual_seed(0)
    backbone = build_backbone(f"timm:{args.model}").eval()
    backbone.requires_grad_(False)
    base, _, rank = name.partition("_r")
    if base == "floor":
        first = backbone.stage_modules("layer2")[0][1]
        first.norm1.bias.requires_grad_(True)  # a few numbers: the backward runs through layer2-4 anyway
    elif base != "frozen":
        cfg = defaults(finetune=base, svf=base == "svf", backbone=f"timm:{args.model}", lrcc_rank=int(rank or 0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backbone = finetune.METHODS[base].prepare(backbone, STAGES, cfg)
        expected = finetune.METHODS[base].trainable(backbone, STAGES, cfg)
        assert {n for n, p in backbone.named_parameters() if p.requires_grad} == expected
    return BackboneOnly(backbone).eval()  # eval: no dropout, as the few-shot models keep their backbone


def count_macs(model, batch):
    """Multiply-adds of the Linear and conv layers of one training step (see the module doc)."""
    total = [0]

    def linear(m, x, out, w_trains, in_f, out_f):
        fwd = out.numel() // out_f * in_f * out_f
        total[0] += fwd * (1 + int(x.requires_grad) + int(w_trains))

    def hook(m, inputs, out):
        x = inputs[0]
        if isinstance(m, svf.SVD_Linear):
            if not m._needs_factored():
                return linear(m, x, out, False, m.in_features, m.out_features)
            tokens = out.numel() // m.out_features
            v, u = tokens * m.in_features * m.rank, tokens * m.rank * m.out_features
            total[0] += v + u + u + v * int(x.requires_grad)  # forward; Uᵀg (for dS), then dx
        elif isinstance(m, lrcc.LowRankLinear):  # LoRA training: W, then the factored branch x·Aᵀ·Bᵀ
            linear(m, x, out, False, m.in_features, m.out_features)
            tokens = out.numel() // m.out_features
            total[0] += 3 * tokens * m.rank * (m.in_features + m.out_features)  # forward, dx, dA/dB
        elif isinstance(m, nn.Linear):
            linear(m, x, out, m.weight.requires_grad, m.in_features, m.out_features)
        elif isinstance(m, nn.Conv2d):
            fwd = out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
            total[0] += fwd * (1 + int(x.requires_grad) + int(m.weight.requires_grad))

    inner = {id(c) for m in model.modules() if isinstance(m, svf.SVDLayer) for c in m.children()}
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d, svf.SVD_Linear)) and id(m) not in inner]
    try:
        model(*batch)
    finally:
        for h in handles:
            h.remove()
    return total[0] / 1e9


def run(args):
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    variants = args.variants
    models = {n: build_variant(n, args).to(device) for n in variants}
    g = torch.Generator().manual_seed(0)
    img = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    side = int(args.size / models[variants[0]].backbone.patch + 0.5)
    target = (torch.rand(args.batch, side, side, generator=g) > 0.5).long()
    batch = [img.to(device), target.to(device)]
    opts = {n: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
            for n, m in models.items()}
    times, saved, peaks = {n: [] for n in variants}, {n: SavedBytes() for n in variants}, {}
    for it in range(args.warmup + args.iters):
        for name in variants:
            model, opt = models[name], opts[name]
            if device.type == "cuda" and it == args.warmup:
                sync(device)
                held = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t0 = clock()
            if it == 0:
                with torch.autograd.graph.saved_tensors_hooks(saved[name].pack, lambda t: t):
                    _, loss = model(*batch)
            else:
                _, loss = model(*batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync(device)
            if it >= args.warmup:
                times[name].append(clock() - t0)
            if device.type == "cuda" and it == args.warmup:
                peaks[name] = (torch.cuda.max_memory_allocated() - held) / 2**20
    results = {}
    for name in variants:
        params = [p for p in models[name].backbone.parameters() if p.requires_grad]
        state = 3 * sum(p.numel() * p.element_size() for p in params) / 2**20  # weight, gradient, momentum
        results[name] = {"min_s": min(times[name]), "median_s": statistics.median(times[name]),
                         "saved_mib": saved[name].mib, "trainable_state_mib": state, "step_peak_mib": peaks.get(name),
                         "trainable_backbone": sum(p.numel() for p in params),
                         "gmacs": count_macs(models[name], batch)}
    return results


def report(results, args):
    floor = results.get("floor")
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"timm:{args.model}, batch {args.batch} at {args.size}x{args.size}, {device}, {args.clock} clock; least (median) of "
          f"{args.iters} steps after {args.warmup}; layer2-4 tuned; x floor = ratio to the floor variant")
    print(f"{'variant':<9} | {'step s':>7} {'(median)':>9} {'x floor':>7} | {'GMAC':>6} {'x floor':>7} | "
          f"{'saved MiB':>9} {'state MiB':>9} {'peak MiB':>8} | {'trainable':>10}")
    for name, r in results.items():
        x = r["min_s"] / floor["min_s"] if floor else float("nan")
        xm = r["gmacs"] / floor["gmacs"] if floor else float("nan")
        peak = f"{r['step_peak_mib']:.0f}" if r["step_peak_mib"] is not None else "-"
        print(f"{name:<9} | {r['min_s']:>7.3f} {r['median_s']:>9.3f} {x:>7.2f} | {r['gmacs']:>6.1f} {xm:>7.2f} | "
              f"{r['saved_mib']:>9.0f} {r['trainable_state_mib']:>9.1f} {peak:>8} | {r['trainable_backbone']:>10,d}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_dinov3", help="a timm ViT (timm-vit family)")
    parser.add_argument("--variants", nargs="+", default=["frozen", "floor", "svf", "lora_r1", "lora_r8", "full"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=("cpu", "wall"), help="cpu: the main thread's CPU time (with 1 thread, "
                        "what other jobs on a shared machine barely disturb; the CPU default); wall: wall clock "
                        "(the CUDA default, synchronised)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    args.clock = args.clock or ("wall" if args.device.startswith("cuda") else "cpu")
    results = run(args)
    report(results, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
