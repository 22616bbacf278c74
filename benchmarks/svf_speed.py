"""How much does SVF training cost, compared with its arithmetic floor? And merged inference?

    python benchmarks/svf_speed.py                      # CPU-sized: batch 2 at 241x241, both models (many minutes)
    python benchmarks/svf_speed.py --model backbone     # the backbone alone (no few-shot head diluting the ratios)
    python benchmarks/svf_speed.py --paper-size         # batch 8 at 473x473 (for a GPU)
    python benchmarks/svf_speed.py --profile svf_ours+fold --model backbone   # where the time goes, per op type
    python benchmarks/svf_speed.py --arch bam --variants floor svf_released svf_ours   # BAM+SVF

Training step = forward + backward + optimizer step, the least of the timed steps (the least disturbed one)
after warm-up, all variants timed round-robin so that they see the same machine. Two clocks (CPU runs): wall
clock with all intra-op threads (how users run; the headline) and the CPU time of the main thread with one
thread (which other jobs on a shared machine barely disturb). Two models (`--model`):
- fss: the ResNet-50 `baseline` FSS model (dilated, output stride 8, 1-shot);
- backbone: the dilated ResNet-50 alone with a 1x1 two-class head on layer4 (cross-entropy at stride 8): the
  few-shot heads add the same cost to every variant and pull the ratios toward 1.
Variants:
- floor: plain convs, every backbone weight frozen, gradients still flowing back through layer2-4 (a
  trainable scalar at layer2's input): what any method that tunes something inside layer2 must pay;
- frozen: the backbone frozen with no backward through it (PFENet/BAM without SVF);
- full: full fine-tuning of the backbone (BatchNorm statistics still frozen);
- svf_paper: SVF as the released code computes it: every conv factored into three, layer0/1 included;
- svf_ours: this project's SVF (`svf.resolver` + `svf.apply_paper_freezing`, nothing else).
A `+fold` suffix: the same with every frozen BatchNorm folded into the conv before it (`svf.fold_batchnorm`,
on by default in this project's models); `--fold off|on|both` chooses (the released form cannot fold).
A `+check` suffix (`--s-check` adds `svf_ours+check`, and `svf_ours+fold+check` with folding): svf's first-step
check that S trains (svf/checks.py), re-armed before every step so that the whole check runs at EVERY timed step
(an upper bound: in use it runs once, and later steps pay one hook call that returns at once). Every other variant
runs with the global hook removed, so the pair shows what the check costs.
With `--arch bam` (BAM, its base learner reading the original stage-1 backbone when SVF is on):
- floor: as above, plus the base learner's second pass of layer2-4 with the original plain weights under
  no_grad (the features it reads differ from the tuned ones, so any exact method computes them);
- svf_released: the released BAM+SVF: every conv factored into three (layer0/1 included), plain autograd, and a
  whole second backbone (layer0p-layer4p) for the base learner;
- svf_ours: this project's BAM+SVF: layer0/1 output shared, layer2-4 run again with the original plain weights.
Memory: bytes autograd saves for the backward pass (measured with saved-tensor hooks, on any device), and
on CUDA the peak allocated memory of the step. Inference (fss baseline): plain, resolved (SVD layers in eval)
and merged models, with the relative difference of their outputs. And the time of `svf.resolver` on ResNet-50/101.
"""
import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import svf  # noqa: E402
from common.config import defaults  # noqa: E402
from model import build_backbone, build_model  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
FOLDABLE = ("floor", "frozen", "full", "svf_ours")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class InputScale(nn.Module):
    """A trainable scalar on a stage's input: makes autograd go back through everything after it."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.alpha


class BackboneOnly(nn.Module):
    """The dilated backbone and a 1x1 two-class head on layer4; cross-entropy at the feature resolution."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv2d(backbone.channels["layer4"], 2, 1)

    def forward(self, img, target):
        logits = self.head(self.backbone(img)[-1])
        return logits, F.cross_entropy(logits, target)


def _set_variant(holder, name):
    """The variant's trainable set on ``holder.backbone`` (the FSS model or BackboneOnly); BatchNorm frozen."""
    base = name.split("+")[0]
    if base == "floor":
        holder.backbone.requires_grad_(False)
        holder.backbone.layer2 = nn.Sequential(InputScale(), holder.backbone.layer2)
    elif base == "frozen":
        holder.backbone.requires_grad_(False)
    elif base == "full":
        holder.backbone.requires_grad_(True)
    elif base in ("svf_paper", "svf_released"):  # the released code: three convs in every layer, plain autograd
        for mod in holder.backbone.modules():
            if isinstance(mod, svf.SVD_Conv2d):
                mod.forward = lambda x, mod=mod: mod.conv_U(mod.conv_V(x) * mod.vector_S)
    svf.freeze_batchnorm(holder.backbone)


def build_variant(name, args):
    """A fresh model for variant ``name`` (``+fold``: frozen BatchNorm folded)."""
    base, fold = name.split("+")[0], "fold" in name.split("+")[1:]
    uses_svf = base.startswith("svf")
    if args.model == "backbone":
        backbone = build_backbone(args.backbone, "torchvision")
        if uses_svf:
            backbone = svf.apply_paper_freezing(svf.resolver(backbone))
        m = BackboneOnly(backbone)
    else:
        cfg = defaults(arch=args.arch, backbone=args.backbone, svf=uses_svf, shot=args.shot, pretrained=None,
                       base_learner=None, benchmark="pascal", fold=0, fold_batchnorm=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = build_model(cfg)
        if base == "floor" and args.arch == "bam":  # the base learner's second pass over layer2-4, original weights
            m.set_base_backbone(copy.deepcopy(m.backbone))
        if base == "svf_released" and args.arch == "bam":  # ... and a whole second backbone for the base learner
            m.base_shared_stages.fill_(0)
    _set_variant(m, base)
    if fold:
        if base not in FOLDABLE:
            raise SystemExit(f"{name}: the released form computes its own BatchNorm passes; only {FOLDABLE} fold")
        svf.fold_batchnorm(m)
    return m


class SavedBytes:
    """Counts the bytes autograd keeps for backward (each storage once)."""

    def __init__(self):
        self.storages = {}

    def pack(self, t):
        try:
            st = t.untyped_storage()
            self.storages[(st.data_ptr(), t.device)] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    @property
    def mib(self):
        return sum(self.storages.values()) / 2**20


def inputs(args, device):
    """The step's inputs: (query, support, support mask, query mask) or, for the backbone, (image, target)."""
    g = torch.Generator().manual_seed(0)
    b, size, shot = args.batch, args.size, args.shot
    q = torch.randn(b, 3, size, size, generator=g)
    if args.model == "backbone":
        feat = (size - 1) // 8 + 1
        return [t.to(device) for t in (q, (torch.rand(b, feat, feat, generator=g) > 0.5).long())]
    s = torch.randn(b, shot, 3, size, size, generator=g)
    sm = (torch.rand(b, shot, size, size, generator=g) > 0.5).long()
    qm = (torch.rand(b, size, size, generator=g) > 0.5).long()
    return [t.to(device) for t in (q, s, sm, qm)]


def build_runs(variants, args, device):
    runs = {}
    for name in variants:
        model = build_variant(name, args).to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        runs[name] = {"model": model, "params": params, "opt": torch.optim.SGD(params, lr=1e-3, momentum=0.9),
                      "check": "check" in name.split("+")[1:]}
    return runs


def arm_check(run):
    """``+check``: the model watched again, so the first-step check runs at the coming step; else no hook at all."""
    if run["check"]:
        svf.checks.watch(run["model"].backbone)
    else:
        svf.checks.unwatch_all()


def step_extra(args, device):
    """BAM's training forward needs the episode's class: a base class of fold 0."""
    return {"class_id": torch.full((args.batch,), 6, device=device)} if args.arch == "bam" and args.model == "fss" else {}


def step(run, batch, extra):
    _, loss = run["model"](*batch, **extra)
    run["opt"].zero_grad(set_to_none=True)
    loss.backward()
    run["opt"].step()


def count_macs(model, batch, extra):
    """Multiply-accumulates of the convolutions of one training step, forward and backward (input gradients
    where the input needs one, weight gradients where the weight trains): the arithmetic each variant must do.
    Elementwise work (BatchNorm, ReLU, dS's product) is not counted."""
    total = {"forward": 0, "backward": 0}

    def plain(m, x, out, w_trains):
        kernel = m.conv_V.kernel_size if isinstance(m, svf.SVD_Conv2d) else m.kernel_size
        fwd = out.numel() * (m.in_channels // m.groups) * math.prod(kernel)
        total["forward"] += fwd
        total["backward"] += fwd * (int(x.requires_grad) + int(w_trains))

    def conv_hook(m, inputs, out):
        plain(m, inputs[0], out, m.weight.requires_grad)

    def svd_hook(m, inputs, out):
        V, U = m.conv_V, m.conv_U
        if "forward" in m.__dict__:
            return  # the released form: the inner convs ran (and were counted) as modules
        if not m._needs_factored():
            return plain(m, inputs[0], out, False)  # one conv with the merged weight
        if V.weight.requires_grad or U.weight.requires_grad:
            return  # trained factors: plain autograd through the inner convs, counted as modules
        h = out.numel() // m.out_channels * m.rank
        v_macs = h * (m.in_channels // m.groups) * math.prod(V.kernel_size)
        u_macs = out.numel() * (m.rank // m.groups)
        total["forward"] += v_macs + u_macs
        total["backward"] += u_macs + v_macs * int(inputs[0].requires_grad)  # Uᵀg always (for dS), then dx

    handles = []
    for m in model.modules():
        if isinstance(m, svf.SVD_Conv2d):
            handles.append(m.register_forward_hook(svd_hook))
        elif isinstance(m, nn.Conv2d):  # an SVD layer's conv_V/conv_U count only when called as modules
            handles.append(m.register_forward_hook(conv_hook))
    try:
        model(*batch, **extra)
    finally:
        for h in handles:
            h.remove()
    return total


def time_training(runs, args, device, clock):
    """Round-robin over the variants (one step of each per round), so that they all see the same machine
    conditions; the first round (with the saved-tensor counter on) is a warm-up. Returns per-variant stats."""
    batch = inputs(args, device)
    extra = step_extra(args, device)
    now = CLOCKS[clock]
    times, saved, peaks = {n: [] for n in runs}, {n: SavedBytes() for n in runs}, {}
    for it in range(args.warmup + args.iters):
        for name, r in runs.items():
            if device.type == "cuda" and it == args.warmup:
                torch.cuda.reset_peak_memory_stats()
            arm_check(r)
            sync(device)
            t0 = now()
            if it == 0:
                with torch.autograd.graph.saved_tensors_hooks(saved[name].pack, lambda t: t):
                    step(r, batch, extra)
            else:
                step(r, batch, extra)
            sync(device)
            if it >= args.warmup:
                times[name].append(now() - t0)
            if device.type == "cuda" and it == args.warmup:
                peaks[name] = torch.cuda.max_memory_allocated() / 2**20
    return {n: {"min_s": min(times[n]), "median_s": statistics.median(times[n]), "saved_mib": saved[n].mib,
                "peak_mib": peaks.get(n), "trainable": sum(p.numel() for p in runs[n]["params"]),
                "gmacs": sum(count_macs(runs[n]["model"], batch, extra).values()) / 1e9} for n in runs}


def profile(runs, name, args, device, rows=25):
    """torch.profiler over two steps of one variant: self time per op type, the largest first."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    batch = inputs(args, device)
    extra = step_extra(args, device)
    step(runs[name], batch, extra)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(2):
            step(runs[name], batch, extra)
            sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of {name} (2 steps, {args.model}), by op type:")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def ratio(a, b):
    return a / b if a is not None and b else float("nan")


def report_training(results, clocks):
    """One row per variant: each clock's time with its ratio to the floor of the same fold setting and to the
    released form, then the memory."""
    def reference(name, base):
        ref = base + ("+fold" if name.endswith("+fold") and base + "+fold" in results[clocks[0]] else "")
        return ref if ref in results[clocks[0]] else None
    released = next((n for n in ("svf_paper", "svf_released") if n in results[clocks[0]]), None)
    header = f"{'training step':<18}"
    for c in clocks:
        label = "wall, all threads" if c == "wall" else "CPU time, 1 thread"
        header += f" | {label + ' (s)':>23} {'x floor':>7} {'x rel.':>6}"
    print(f"\n{header} | {'GMAC':>6} {'x floor':>7} | {'saved MiB':>9} {'x floor':>7} {'peak MiB':>8} {'trainable':>11}")
    for name, first in results[clocks[0]].items():
        line = f"{name:<18}"
        floor = reference(name, "floor")
        for c in clocks:
            r = results[c][name]
            line += (f" | {r['min_s']:>23.3f} {ratio(r['min_s'], results[c][floor]['min_s'] if floor else None):>7.2f}"
                     f" {ratio(r['min_s'], results[c][released]['min_s'] if released else None):>6.2f}")
        mem_floor = results[clocks[0]][floor]["saved_mib"] if floor else None
        macs_floor = results[clocks[0]][floor]["gmacs"] if floor else None
        peak = f"{first['peak_mib']:.0f}" if first["peak_mib"] is not None else "-"
        print(f"{line} | {first['gmacs']:>6.1f} {ratio(first['gmacs'], macs_floor):>7.2f} | {first['saved_mib']:>9.0f} "
              f"{ratio(first['saved_mib'], mem_floor):>7.2f} {peak:>8} {first['trainable']:>11,d}")


@torch.no_grad()
def time_inference(args, device):
    """Plain, plain with BatchNorm folded, resolved (SVD layers in eval) and merged baseline models, round-robin."""
    now = CLOCKS["wall"]
    fss = argparse.Namespace(**{**vars(args), "model": "fss", "arch": "baseline"})
    plain = build_variant("frozen", fss).to(device).eval()
    folded = copy.deepcopy(plain)
    svf.fold_batchnorm(folded)
    resolved = build_variant("svf_ours", fss).to(device)
    resolved.load_state_dict(_as_svf_state(plain, resolved))
    resolved.eval()
    models = {"plain": plain, "plain+fold": folded, "resolved": resolved, "merged": svf.merge(resolved)}
    q, s, sm, _ = inputs(fss, device)
    out, times = {}, {name: [] for name in models}
    for it in range(args.warmup + args.iters):
        for name, m in models.items():
            sync(device)
            t0 = now()
            out[name] = m(q, s, sm)
            sync(device)
            if it >= args.warmup:
                times[name].append(now() - t0)
    return {name: {"min_s": min(times[name]), "params": sum(p.numel() for p in m.parameters()),
                   "rel_diff_to_plain": ((out[name] - out["plain"]).norm() / out["plain"].norm()).item()}
            for name, m in models.items()}


def _as_svf_state(plain, resolved):
    """The SVF model's state with the plain model's weights (resolve the plain backbone, keep the heads)."""
    state = resolved.state_dict()
    bb = svf.resolver(plain.backbone)
    state.update({f"backbone.{k}": v for k, v in bb.state_dict().items()})
    state.update({k: v for k, v in plain.state_dict().items() if not k.startswith("backbone.")})
    return state


def time_resolver(device):
    res = {}
    for name in ("resnet50", "resnet101"):
        bb = build_backbone(name).to(device)
        sync(device)
        t0 = time.perf_counter()
        svf.resolver(bb)
        sync(device)
        res[name] = time.perf_counter() - t0
    return res


def default_variants(args):
    if args.arch == "bam" and args.model == "fss":
        base = ["floor", "svf_released", "svf_ours"]
    else:
        base = ["floor", "frozen", "full", "svf_paper", "svf_ours"]
    if args.fold == "off":
        return base
    folded = [v + "+fold" for v in base if v in FOLDABLE]
    chosen = folded + [v for v in base if v not in FOLDABLE] if args.fold == "on" else base + folded
    if args.s_check:
        chosen += [v + "+check" for v in chosen if v.startswith("svf_ours")]
    return chosen


def run_model(args, device, threads):
    variants = args.variants or default_variants(args)
    runs = build_runs(variants, args, device)
    if args.profile:
        if args.profile not in runs:
            raise SystemExit(f"--profile {args.profile}: not among the variants {list(runs)}")
        profile(runs, args.profile, args, device)
        return {}
    results = {}
    for clock in args.clocks:
        torch.set_num_threads(1 if clock == "cpu" else threads)
        results[clock] = time_training(runs, args, device, clock)
    torch.set_num_threads(threads)
    what = f"{args.arch} FSS model" if args.model == "fss" else f"{args.backbone} backbone + 1x1 head"
    print(f"\n{what}: batch {args.batch} at {args.size}x{args.size}"
          + (f", {args.shot}-shot" if args.model == "fss" else "") +
          f"; least of {args.iters} steps after {args.warmup} warm-up; x floor: to the floor of the same fold "
          f"setting; x rel.: to the released form")
    report_training(results, args.clocks)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["fss", "backbone", "both"], default="both")
    ap.add_argument("--backbone", default="resnet50", help="resnet50 (PSPNet's deep stem, the default of the configs) "
                    "or resnet50_tv (torchvision's)")
    ap.add_argument("--paper-size", action="store_true", help="batch 8 at 473x473 (GPU)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=241)
    ap.add_argument("--shot", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", choices=["baseline", "bam"], default="baseline",
                    help="bam: BAM+SVF, its base learner reading the original backbone (inference part skipped)")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="default: floor frozen full svf_paper svf_ours and the +fold ones (baseline, backbone), "
                         "floor svf_released svf_ours (bam)")
    ap.add_argument("--fold", choices=["off", "on", "both"], default="both",
                    help="frozen BatchNorm folded (+fold variants), unfolded, or both (default)")
    ap.add_argument("--s-check", action="store_true",
                    help="add svf_ours(+fold)+check: the first-step check that S trains, run at every step")
    ap.add_argument("--clock", choices=["wall", "cpu", "both"], default=None,
                    help="wall: wall clock, all threads; cpu: CPU time of the main thread with one thread (CPU only); "
                         "default: both on a CPU, wall on a GPU")
    ap.add_argument("--profile", metavar="VARIANT", help="print a torch.profiler table of VARIANT instead of timing")
    ap.add_argument("--skip-inference", action="store_true", help="leave out the inference and resolver timings")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    if args.paper_size:
        args.batch, args.size = 8, 473
    device = torch.device(args.device)
    if args.clock is None:
        args.clock = "wall" if device.type == "cuda" else "both"
    if args.clock != "wall" and device.type == "cuda":
        ap.error("--clock cpu measures CPU work; on a GPU use --clock wall")
    args.clocks = ["wall", "cpu"] if args.clock == "both" else [args.clock]
    torch.backends.cudnn.benchmark = True
    threads = torch.get_num_threads()
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{threads} threads'}), "
          f"torch {torch.__version__}, clocks {', '.join(args.clocks)}")

    out = {"args": vars(args), "device": str(device), "threads": threads}
    for model in (["backbone", "fss"] if args.model == "both" else [args.model]):
        out[model] = run_model(argparse.Namespace(**{**vars(args), "model": model}), device, threads)
    if not args.profile and not args.skip_inference and args.model != "backbone" and args.arch == "baseline":
        infer = out["inference"] = time_inference(args, device)
        print(f"\ninference (wall)       {'time (s)':>9} {'x plain':>8} {'params':>12} {'rel. diff':>10}")
        for v, r in infer.items():
            print(f"{v:<22} {r['min_s']:>9.3f} {r['min_s'] / infer['plain']['min_s']:>8.2f} "
                  f"{r['params']:>12,d} {r['rel_diff_to_plain']:>10.1e}")
        out["resolver_s"] = time_resolver(device)
        print("\nsvf.resolver: " + ", ".join(f"{k} {v:.2f} s" for k, v in out["resolver_s"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
