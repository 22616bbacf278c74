"""`svf` on torchvision's classification zoo: every model resolved, trained one step on S, merged, reloaded.

    python tools/svf_zoo.py                          # every model below (random weights; ~20 min on 2 cores)
    python tools/svf_zoo.py --models resnet50 swin_t vit_b_16 --json zoo.json

For each model (random initialisation, eval mode, one input): the relative error of the resolved and of the
merged model against the original, the resolver's time, the parameters and singular values, what a backward
pass reaches after `svf.mark_only_singular_values_as_trainable` (only `vector_S`; how many get a non-zero
gradient: torchvision initialises some classifiers to zero, e.g. ViT's head, which blocks every gradient below it), that one
SGD step on S changes the output and that `svf.merge` then equals the trained model, and that `svf.state_dict` /
`svf.load_state_dict` carry the trained singular values to a freshly resolved copy. Layers the resolver leaves
as they are come with its reason (a warning), listed in the last column.
"""
import argparse
import copy
import json
import os
import sys
import time
import warnings

import torch
import torchvision.models as tvm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import svf  # noqa: E402

# name: (builder keyword arguments, input side); every builder is called with weights=None
ZOO = {
    "resnet18": ({}, 64), "resnet50": ({}, 64), "resnet101": ({}, 64), "resnext50_32x4d": ({}, 64),
    "wide_resnet50_2": ({}, 64), "regnet_x_400mf": ({}, 64), "regnet_y_400mf": ({}, 64),
    "efficientnet_b0": ({}, 64), "efficientnet_v2_s": ({}, 64), "mobilenet_v2": ({}, 64),
    "mobilenet_v3_small": ({}, 64), "mnasnet0_5": ({}, 64), "shufflenet_v2_x0_5": ({}, 64),
    "squeezenet1_1": ({}, 64), "densenet121": ({}, 64), "googlenet": ({"aux_logits": False, "init_weights": False}, 64),
    "inception_v3": ({"aux_logits": False, "init_weights": True}, 160), "convnext_tiny": ({}, 64),
    "maxvit_t": ({}, 224), "alexnet": ({}, 64), "vgg16_bn": ({}, 64), "swin_t": ({}, 64), "swin_v2_t": ({}, 64),
    "vit_b_16": ({}, 224),
}


def random_head(model):
    """torchvision zero-initialises ViT's classifier, which makes a random model's output constant (no gradient
    reaches anything below it): give it random values, as trained weights would."""
    head = getattr(getattr(model, "heads", None), "head", None)
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.normal_(head.weight, std=0.02)
    return model


def rel(a, b):
    return ((a - b).double().norm() / b.double().norm()).item()


def check(model, x):
    """Resolve, compare, train one SGD step on S, merge, round-trip; returns the figures (see the module doc)."""
    model = model.eval()
    with torch.no_grad():
        ref = model(x)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolved = svf.resolver(model)
    resolve_s = time.perf_counter() - t0
    left = [str(w.message).split(": ", 1)[-1] for w in caught if "left these layers" in str(w.message)]
    resolved.eval()
    untrained = copy.deepcopy(resolved)
    with torch.no_grad():
        err_resolved = rel(resolved(x), ref)
        err_merged = rel(svf.merge(resolved)(x), ref)
    svf.mark_only_singular_values_as_trainable(resolved)
    singular = {n: p for n, p in resolved.named_parameters() if "vector_S" in n}
    resolved(x).square().mean().backward()
    reached = {n for n, p in resolved.named_parameters() if p.grad is not None}
    nonzero = {n for n in reached if resolved.get_parameter(n).grad.abs().sum() > 0}
    # one SGD step whose largest update is 5% of the largest singular value, whatever the gradients' scale
    top_grad = max(p.grad.abs().max() for p in singular.values() if p.grad is not None)
    lr = 0.05 * max(p.detach().abs().max() for p in singular.values()).item() / max(top_grad.item(), 1e-30)
    torch.optim.SGD(singular.values(), lr=lr).step()
    with torch.no_grad():
        trained = resolved(x)
        err_merged_trained = rel(svf.merge(resolved)(x), trained)
        svf.load_state_dict(untrained, svf.state_dict(resolved))
        err_roundtrip = rel(untrained(x), trained)
        change = rel(trained, ref)
    return {"params": sum(p.numel() for p in model.parameters()),
            "singular_values": sum(p.numel() for p in singular.values()),
            "svd_layers": sum(isinstance(m, svf.SVDLayer) for m in resolved.modules()),
            "resolve_s": resolve_s, "err_resolved": err_resolved, "err_merged": err_merged,
            "grads_only_on_S": reached <= set(singular), "S_reached": len(reached), "S_nonzero_grad": len(nonzero),
            "S_tensors": len(singular),
            "step_changes_output": change, "err_merged_after_step": err_merged_trained,
            "err_state_dict_roundtrip": err_roundtrip, "left_unconverted": left}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO), metavar="NAME")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, random weights, float32, eval mode")
    print(f"{'model':<20} {'params':>12} {'sing. values':>12} {'resolve s':>9} {'err resolved':>12} "
          f"{'err merged':>10} {'S grads':>9} {'step Δ':>8} {'merged Δ':>8} {'reload Δ':>8}  unconverted")
    results = {}
    for name in args.models:
        kwargs, side = ZOO[name]
        torch.manual_seed(0)
        model = random_head(getattr(tvm, name)(weights=None, **kwargs))
        r = check(model, torch.randn(1, 3, side, side))
        results[name] = r
        grads = f"{r['S_nonzero_grad']}/{r['S_tensors']}" + ("" if r["grads_only_on_S"] else " !")
        print(f"{name:<20} {r['params']:>12,d} {r['singular_values']:>12,d} {r['resolve_s']:>9.1f} "
              f"{r['err_resolved']:>12.1e} {r['err_merged']:>10.1e} {grads:>9} {r['step_changes_output']:>8.1e} "
              f"{r['err_merged_after_step']:>8.1e} {r['err_state_dict_roundtrip']:>8.1e}  "
              f"{'; '.join(r['left_unconverted']) or '-'}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
