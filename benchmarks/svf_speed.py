"""How much does SVF training cost, compared with its arithmetic floor? And merged inference?

    python benchmarks/svf_speed.py                 # CPU-sized: batch 2 at 241x241 (a few minutes)
    python benchmarks/svf_speed.py --paper-size    # batch 8 at 473x473 (for a GPU)
    python benchmarks/svf_speed.py --json out.json
    python benchmarks/svf_speed.py --arch bam --variants floor svf_released svf_ours   # BAM+SVF

Training step = forward + backward + optimizer step of the ResNet-50 `baseline` FSS model (dilated, output
stride 8, 1-shot), median over timed iterations after warm-up, for:
- floor: plain convs, every backbone weight frozen, gradients still flowing back through layer2-4 (a
  trainable scalar at layer2's input): what any method that tunes something inside layer2 must pay;
- frozen: the backbone frozen with no backward through it (PFENet/BAM without SVF);
- full: full fine-tuning of the backbone (BatchNorm statistics still frozen);
- svf_paper: SVF as the released code computes it: every conv factored into three, layer0/1 included;
- svf_ours: this project's SVF (`svf.resolver` + `svf.apply_paper_freezing`, nothing else).
With `--arch bam` (BAM, its base learner reading the original stage-1 backbone when SVF is on):
- floor: as above, plus the base learner's second pass of layer2-4 with the original plain weights under
  no_grad (the features it reads differ from the tuned ones, so any exact method computes them);
- svf_released: the released BAM+SVF: every conv factored into three (layer0/1 included), plain autograd, and a
  whole second backbone (layer0p-layer4p) for the base learner;
- svf_ours: this project's BAM+SVF: layer0/1 output shared, layer2-4 run again with the original plain weights.
Memory: bytes autograd saves for the backward pass (measured with saved-tensor hooks, on any device), and
on CUDA the peak allocated memory of the step. Inference: plain, resolved (SVD layers in eval) and merged
models, with the relative difference of their outputs. And the time of `svf.resolver` on ResNet-50/101.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import svf  # noqa: E402
from common.config import defaults  # noqa: E402
from model import build_backbone, build_model  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter  # --clock cpu: time.thread_time (one intra-op thread; robust on a shared machine)


class InputScale(nn.Module):
    """A trainable scalar on a stage's input: makes autograd go back through everything after it."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.alpha


def build_variant(name, shot, arch="baseline"):
    cfg = defaults(arch=arch, backbone="resnet50", svf=name.startswith("svf"), shot=shot, pretrained=None,
                   base_learner=None, benchmark="pascal", fold=0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = build_model(cfg)
    if name == "floor":
        if arch == "bam":  # the base learner's second pass over layer2-4 with the original weights
            m.set_base_backbone(copy.deepcopy(m.backbone))
        m.backbone.layer2 = nn.Sequential(InputScale(), m.backbone.layer2)
    elif name == "full":
        m.backbone.requires_grad_(True)
        svf.freeze_batchnorm(m.backbone)
    elif name in ("svf_paper", "svf_released"):  # the released code: three convs in every layer, plain autograd
        for mod in m.backbone.modules():
            if isinstance(mod, svf.SVD_Conv2d):
                mod.forward = lambda x, mod=mod: mod.conv_U(mod.conv_V(x) * mod.vector_S)
    if name == "svf_released" and arch == "bam":  # ... and a whole second backbone for the base learner
        m.base_shared_stages.fill_(0)
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


def episode(batch, size, shot, device):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 3, size, size, generator=g)
    s = torch.randn(batch, shot, 3, size, size, generator=g)
    sm = (torch.rand(batch, shot, size, size, generator=g) > 0.5).long()
    qm = (torch.rand(batch, size, size, generator=g) > 0.5).long()
    return [t.to(device) for t in (q, s, sm, qm)]


def time_training(variants, args, device):
    """Round-robin over the variants (one step of each per round), so that they all see the same
    machine conditions; the first round (with the saved-tensor counter on) is a warm-up."""
    runs = {}
    for name in variants:
        model = build_variant(name, args.shot, args.arch).to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        runs[name] = {"model": model, "params": params, "times": [], "saved": SavedBytes(),
                      "opt": torch.optim.SGD(params, lr=1e-3, momentum=0.9)}
    q, s, sm, qm = episode(args.batch, args.size, args.shot, device)
    extra = {"class_id": torch.full((args.batch,), 6, device=device)} if args.arch == "bam" else {}  # a base class
    peaks = {}
    for it in range(args.warmup + args.iters):
        for name, r in runs.items():
            if device.type == "cuda" and it == args.warmup:
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t0 = CLOCK()
            if it == 0:
                with torch.autograd.graph.saved_tensors_hooks(r["saved"].pack, lambda t: t):
                    _, loss = r["model"](q, s, sm, qm, **extra)
            else:
                _, loss = r["model"](q, s, sm, qm, **extra)
            r["opt"].zero_grad(set_to_none=True)
            loss.backward()
            r["opt"].step()
            sync(device)
            if it >= args.warmup:
                r["times"].append(CLOCK() - t0)
            if device.type == "cuda" and it == args.warmup:
                peaks[name] = torch.cuda.max_memory_allocated() / 2**20
    return {name: {"median_s": statistics.median(r["times"]), "saved_mib": r["saved"].mib,
                   "peak_mib": peaks.get(name), "trainable": sum(p.numel() for p in r["params"])}
            for name, r in runs.items()}


@torch.no_grad()
def time_inference(args, device):
    plain = build_variant("frozen", args.shot).to(device).eval()
    resolved = build_variant("svf_ours", args.shot).to(device)
    resolved.load_state_dict(_as_svf_state(plain, resolved))
    resolved.eval()
    merged = svf.merge(resolved)
    q, s, sm, _ = episode(args.batch, args.size, args.shot, device)
    out, res = {}, {}
    for name, m in (("plain", plain), ("resolved", resolved), ("merged", merged)):
        ts = []
        for it in range(args.warmup + args.iters):
            sync(device)
            t0 = CLOCK()
            y = m(q, s, sm)
            sync(device)
            if it >= args.warmup:
                ts.append(CLOCK() - t0)
        out[name] = y
        res[name] = {"median_s": statistics.median(ts), "params": sum(p.numel() for p in m.parameters())}
    for name in ("resolved", "merged"):
        res[name]["rel_diff_to_plain"] = ((out[name] - out["plain"]).norm() / out["plain"].norm()).item()
    return res


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
        t0 = CLOCK()
        svf.resolver(bb)
        sync(device)
        res[name] = CLOCK() - t0
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
                    help="default: floor frozen full svf_paper svf_ours (baseline), floor svf_released svf_ours (bam)")
    ap.add_argument("--json", help="also write the numbers to this file")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: CPU time of the main thread with torch.set_num_threads(1), which other processes "
                         "on a shared machine do not disturb (CPU only)")
    args = ap.parse_args()
    global CLOCK
    if args.clock == "cpu":
        torch.set_num_threads(1)
        CLOCK = time.thread_time
    if args.paper_size:
        args.batch, args.size = 8, 473
    if args.variants is None:
        args.variants = (["floor", "svf_released", "svf_ours"] if args.arch == "bam"
                         else ["floor", "frozen", "full", "svf_paper", "svf_ours"])
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    print(f"{args.arch}: device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{args.clock} clock, batch {args.batch} at {args.size}x{args.size}, {args.shot}-shot, median of {args.iters} after {args.warmup} warm-up")

    train = time_training(args.variants, args, device)
    floor = train.get("floor")
    print(f"\ntraining step          {'time (s)':>9} {'x floor':>8} {'saved (MiB)':>12} {'x floor':>8} "
          f"{'peak (MiB)':>11} {'trainable':>12}")
    for v, r in train.items():
        tr = r["median_s"] / floor["median_s"] if floor else float("nan")
        mr = r["saved_mib"] / floor["saved_mib"] if floor and floor["saved_mib"] else float("nan")
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(f"{v:<22} {r['median_s']:>9.3f} {tr:>8.2f} {r['saved_mib']:>12.0f} {mr:>8.2f} {peak:>11} {r['trainable']:>12,d}")

    if args.arch == "bam":  # the inference and resolver comparisons are the baseline's
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "device": str(device), "training": train}, f, indent=2)
        return
    infer = time_inference(args, device)
    print(f"\ninference              {'time (s)':>9} {'x plain':>8} {'params':>12} {'rel. diff':>10}")
    for v, r in infer.items():
        print(f"{v:<22} {r['median_s']:>9.3f} {r['median_s'] / infer['plain']['median_s']:>8.2f} "
              f"{r['params']:>12,d} {r.get('rel_diff_to_plain', 0.0):>10.1e}")

    resolve = time_resolver(device)
    print("\nsvf.resolver: " + ", ".join(f"{k} {v:.2f} s" for k, v in resolve.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": str(device), "training": train, "inference": infer,
                       "resolver_s": resolve}, f, indent=2)


if __name__ == "__main__":
    main()
