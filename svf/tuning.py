"""What trains: the paper's freezing as one-liners, updates of S that float32 cannot swallow, and how far S
moved."""
import math

import torch
import torch.nn as nn

from .batchnorm import is_frozen_batchnorm
from .checks import watch
from .common import count_parameters
from .fold import FREEZE, _keep_eval
from .layers import SVDLayer
from .resolver import _set_submodule, _unknown_names, resolver

__all__ = ["FACTORS", "mark_only_singular_values_as_trainable", "freeze_batchnorm", "apply_paper_freezing",
           "prepare", "singular_value_parameters", "keep_small_updates", "singular_value_change"]


FACTORS = ("S", "US", "SV", "USV")  # which SVD factors train: the paper's ablation (S alone is SVF)


def mark_only_singular_values_as_trainable(module, factors="S"):
    """requires_grad=False on every parameter of ``module`` except the chosen factors of its SVD layers:
    ``factors="S"`` (default) the singular values ``vector_S`` only; ``"US"`` also U (``conv_U``/``fc_U``
    weight), ``"SV"`` also V (``conv_V``/``fc_V`` weight), ``"USV"`` all three. U's bias (the layer's original
    bias) never trains here. The first optimizer step then checks that they train (``svf.checks``)."""
    return watch(_mark(module, factors))


def _mark(module, factors):
    if factors not in FACTORS:
        raise ValueError(f"svf: factors={factors!r} is not one of {FACTORS} (S alone is the paper's SVF)")
    for name, p in module.named_parameters():
        p.requires_grad_("vector_S" in name)
    for m in module.modules():
        if isinstance(m, SVDLayer):
            V, U = m._factors()
            if "U" in factors:
                U.weight.requires_grad_(True)
            if "V" in factors:
                V.weight.requires_grad_(True)
    return module


def freeze_batchnorm(module):
    """Freeze every BatchNorm in ``module``: no grads on its affine parameters, running statistics used and never
    updated, however it is called: as a module, through its ``forward`` directly (which skips module hooks), after
    ``model.train()``. Each nn.BatchNorm1d/2d/3d gets the frozen subclass of its class (``svf.FrozenBatchNorm2d``
    ...; folded ones stay folded): same parameters, buffers and state-dict keys. A BatchNorm of another class
    (SyncBatchNorm, a subclass of your own) is kept in eval mode by a forward pre-hook instead, which a direct
    ``forward`` call skips. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
            m.eval()
            if type(m) in FREEZE:
                m.__class__ = FREEZE[type(m)]
            elif not is_frozen_batchnorm(m):
                m.register_forward_pre_hook(_keep_eval)
                m._svf_frozen = True
    return module


def apply_paper_freezing(model, frozen_stages=("layer0", "layer1"), tuned_stages=("layer2", "layer3", "layer4"),
                         factors="S"):
    """The SVF paper's freezing for a backbone with stages ``layer0..layer4``: ``frozen_stages`` fully
    frozen, ``tuned_stages`` frozen except their singular values (``factors``: see
    ``mark_only_singular_values_as_trainable``), all their BatchNorm frozen in eval mode.
    Other attributes of ``model`` (e.g. segmentation heads) are not touched."""
    for stage in tuple(frozen_stages) + tuple(tuned_stages):
        if not isinstance(getattr(model, stage, None), nn.Module):
            raise AttributeError(f"apply_paper_freezing: {type(model).__name__} has no stage {stage!r}; "
                                 "pass frozen_stages/tuned_stages with the names your model uses")
    for stage in frozen_stages:
        getattr(model, stage).requires_grad_(False)
        freeze_batchnorm(getattr(model, stage))
    for stage in tuned_stages:
        sub = getattr(model, stage)
        if not any(isinstance(m, SVDLayer) for m in sub.modules()):
            raise ValueError(f"apply_paper_freezing: stage {stage!r} has no SVD layer; "
                             f"run model.{stage} = svf.resolver(model.{stage}) first")
        _mark(sub, factors)
        freeze_batchnorm(sub)
    return watch(model)


def prepare(module, tuned_stages=("layer2", "layer3", "layer4"), frozen_stages="rest", factors="S", verbose=True):
    """SVF for a network of any layout, in one call: each of ``tuned_stages`` (dotted submodule names of
    ``module``: ``"layer2"``, ``"backbone.layer3"``, ``"features.5"``) is replaced by its exact SVD
    (``svf.resolver``; a stage that already holds SVD layers is kept) and trains only its singular values
    (``factors``); ``frozen_stages`` are frozen entirely: ``"rest"`` (default) = every other parameter of
    ``module`` (pass the backbone), or a list of names (pass the whole model; parameters outside the named stages,
    e.g. the heads, are left as they are). Every BatchNorm of the stages (all of ``module`` with ``"rest"``) is
    frozen (``svf.freeze_batchnorm``). The first optimizer step checks that the singular values train
    (``svf.checks``). Prints the trainable-parameter line unless ``verbose=False``; returns ``module``."""
    if isinstance(tuned_stages, str) or not tuned_stages:
        raise ValueError(f"svf.prepare: tuned_stages must be a non-empty list of submodule names, got {tuned_stages!r}")
    rest = isinstance(frozen_stages, str) and frozen_stages == "rest"
    if isinstance(frozen_stages, str) and not rest:
        raise ValueError(f"svf.prepare: frozen_stages must be 'rest' or a list of submodule names, "
                         f"got {frozen_stages!r}")
    known = [n for n, _ in module.named_modules() if n]
    _unknown_names(list(tuned_stages) + ([] if rest else list(frozen_stages)), known, "svf.prepare")
    for stage in tuned_stages:
        if not any(isinstance(m, SVDLayer) for m in module.get_submodule(stage).modules()):
            _set_submodule(module, stage, resolver(module.get_submodule(stage)))
    frozen = [module] if rest else [module.get_submodule(s) for s in frozen_stages]
    for sub in frozen:
        sub.requires_grad_(False)
        freeze_batchnorm(sub)
    for stage in tuned_stages:
        sub = module.get_submodule(stage)
        _mark(sub, factors)
        freeze_batchnorm(sub)
    watch(module)
    if verbose:
        trainable, total = count_parameters(module)
        layers = sum(isinstance(m, SVDLayer) for s in tuned_stages for m in module.get_submodule(s).modules())
        print(f"svf.prepare: {', '.join(tuned_stages)} resolved ({layers} SVD layers), singular values ({factors}) "
              f"train; frozen: {'the rest of ' + type(module).__name__ if rest else ', '.join(frozen_stages)}; "
              f"BatchNorm frozen | trainable params: {trainable:,d} || all params: {total:,d}", flush=True)
    return module


def singular_value_parameters(model):
    """``{dotted name: vector_S}`` of every SVD layer in ``model``."""
    return {f"{name}.vector_S" if name else "vector_S": m.vector_S
            for name, m in model.named_modules() if isinstance(m, SVDLayer)}


RESIDUAL = "svf_residual"  # optimizer state: the part of S that its float32 value cannot hold


class _CompensatedStep:
    """Optimizer step hooks. Before the step, each float32 parameter p with a gradient is replaced in its
    param group by a float64 stand-in holding p + residual, with the gradient and the elementwise state
    (momentum, Adam's moments) cast to float64, so the optimizer's own update runs in float64. After the
    step, p = the result rounded to float32, residual = result - p (float32), the state goes back to p in
    float32. p itself never changes dtype or storage (autograd hooks such as DDP's stay attached to it)."""

    def __init__(self):
        self.ids, self.pending = set(), []

    def before(self, optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if id(p) not in self.ids or p.grad is None:
                    continue
                state = optimizer.state.pop(p, {})  # an optimizer that creates state lazily (Adam) must see none
                residual = state.pop(RESIDUAL, None)
                master = p.detach().double() + (0 if residual is None else residual)
                master.requires_grad_(True)
                master.grad = p.grad.detach().double()
                if state:
                    optimizer.state[master] = {k: v.double() if _elementwise(k, v, p) else v
                                               for k, v in state.items()}
                group["params"][i] = master
                self.pending.append((group, i, p, master))

    @torch.no_grad()
    def after(self, optimizer, args, kwargs):
        for group, i, p, master in self.pending:
            group["params"][i] = p
            p.copy_(master)  # rounded to nearest float32; bumps p's version (the merged-weight cache follows)
            state = {k: v.to(p.dtype) if _elementwise(k, v, master) else v
                     for k, v in optimizer.state.pop(master, {}).items()}
            state[RESIDUAL] = (master - p.double()).to(p.dtype)
            optimizer.state[p] = state
        self.pending = []


def _elementwise(key, value, param):  # optimizer state shaped like the parameter (momentum, moments), not "step"
    return key != "step" and torch.is_tensor(value) and value.shape == param.shape and value.dtype == param.dtype


def keep_small_updates(optimizer, model):
    """Let ``optimizer`` update the trainable singular values of ``model`` without float32 rounding.

    Float32 numbers near 1.4 are 1.2e-7 apart: an SGD step lr x grad below half of that (common for S, whose
    gradients are small) rounds away entirely, every step, and S never trains. With this call each step of S
    runs in float64 on S + a float32 residual kept in ``optimizer.state[p]["svf_residual"]`` (saved and
    restored with the optimizer's state_dict, so a resumed run continues bit for bit); ``vector_S`` stays the
    float32 Parameter holding S, rounded to nearest, so the model and its state dict are unchanged. The
    optimizer sees S itself: weight decay in S's group acts on S, as without this call. Works with torch.optim
    optimizers whose state is elementwise (SGD, Adam, AdamW, ...; checked with foreach and fused kernels).
    Returns ``optimizer``."""
    wanted = {id(p) for p in singular_value_parameters(model).values() if p.requires_grad}
    params = [p for g in optimizer.param_groups for p in g["params"] if id(p) in wanted]
    if not params:
        raise ValueError("svf.keep_small_updates: the optimizer holds none of the model's trainable singular "
                         "values (vector_S); build the optimizer after svf.apply_paper_freezing")
    if any(p.dtype != torch.float32 for p in params):
        raise ValueError("svf.keep_small_updates: expects float32 singular values, got "
                         f"{sorted({str(p.dtype) for p in params})}")
    step = getattr(optimizer, "_svf_small_updates", None)
    if step is None:  # one pair of hooks per optimizer; a second call adds its parameters
        step = optimizer._svf_small_updates = _CompensatedStep()
        optimizer.register_step_pre_hook(step.before)
        optimizer.register_step_post_hook(step.after)
    step.ids.update(id(p) for p in params)
    return optimizer


@torch.no_grad()
def singular_value_change(model, start, depth=1):
    """``{stage: ‖S − S_start‖ / ‖S_start‖}`` over the trainable singular values of ``model``, grouped by the
    first ``depth`` parts of their names (``layer2``, ...); ``start`` is ``svf.state_dict(model)
    ["singular_values"]`` taken earlier. Shows at a glance whether S trains at all."""
    sums = {}
    for name, p in singular_value_parameters(model).items():
        if p.requires_grad:
            s0 = start[name].to(p.device, torch.float64)
            key = ".".join(name.split(".")[:depth])
            d, n = sums.get(key, (0.0, 0.0))
            sums[key] = (d + float((p.double() - s0).square().sum()), n + float(s0.square().sum()))
    return {k: math.sqrt(d / max(n, 1e-300)) for k, (d, n) in sums.items()}
