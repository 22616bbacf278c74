"""``resolver``: replace conv/linear layers by their exact SVD; ``merge``: fold them back.

Both return a new model and leave the caller's model untouched (same device, same dtype). The copy never copies
autograd state: a tensor kept on a module that is not a parameter or buffer (an attention map cached by the last
training forward, a non-leaf tensor) is copied detached (``_copy``), so both work on any model at any time.
"""
import copy
import difflib
import math
import warnings

import torch
import torch.nn as nn

from .attention import SVD_MultiheadAttention
from .common import weight_fingerprint
from .fold import fold_batchnorm, has_folds, unfold_batchnorm
from .layers import SVD_Conv1d, SVD_Conv2d, SVD_Conv3d, SVD_Linear, SVDLayer

__all__ = ["resolver", "merge"]

_SVD_CLASS = {nn.Conv1d: SVD_Conv1d, nn.Conv2d: SVD_Conv2d, nn.Conv3d: SVD_Conv3d}


def _base_class(module):
    """nn.Conv1d/2d/3d or nn.Linear if ``module`` is one (or a subclass that keeps its forward), else None."""
    for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear):
        if isinstance(module, base):
            same_forward = type(module).forward is base.forward
            if base is not nn.Linear:
                same_forward = same_forward and type(module)._conv_forward is base._conv_forward
            return base if same_forward else None
    return None


def _unsupported_reason(module):
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "transposed convolution"
    if isinstance(module, (nn.modules.lazy.LazyModuleMixin,)):
        return "lazy module (run a forward pass first)"
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and _base_class(module) is None:
        return f"{type(module).__name__} overrides forward"
    if isinstance(module, nn.MultiheadAttention) and type(module) is not nn.MultiheadAttention:
        return f"{type(module).__name__} subclasses nn.MultiheadAttention (its projection is not converted)"
    return None


def _detached_copies(model):
    """``{id: detached copy}`` of every tensor with autograd history that ``model``'s modules keep outside their
    parameters (plain attributes, also inside lists, tuples, sets and dicts; buffers too): the deepcopy memo that
    lets ``copy.deepcopy`` copy a model after a training forward (it refuses a non-leaf tensor)."""
    memo, seen = {}, set()

    def visit(obj):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.grad_fn is not None:
                memo[id(obj)] = obj.detach().clone()
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for item in obj:
                visit(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                visit(item)

    for m in model.modules():
        for key, value in vars(m).items():
            if key not in ("_parameters", "_modules"):
                visit(value)
    return memo


def _copy(model):
    """``copy.deepcopy(model)`` with cached non-leaf tensors copied detached (see ``_detached_copies``)."""
    return copy.deepcopy(model, _detached_copies(model))


def _thin_svd(w):
    """Thin SVD of a (batch of) float64 matrices via QR first: U (.., m, k), S (.., k), Vh (.., k, n).
    LAPACK's SVD of a wide or tall matrix is several times slower than a QR followed by the SVD of the
    small square factor (measured on 2 cores: 0.8 s instead of 5-16 s for a 512x4608 layer), same accuracy.
    The SVD of the square factor is the floor: 30 s for 4096x4096 on one core, ~80% of a VGG16 classifier."""
    if w.shape[-2] < w.shape[-1]:
        u, s, vh = _thin_svd(w.transpose(-2, -1))
        return vh.transpose(-2, -1), s, u.transpose(-2, -1)
    if w.shape[-2] < 1.5 * w.shape[-1]:  # (nearly) square: the QR would not shrink anything (15% slower)
        return torch.linalg.svd(w, full_matrices=False)
    q, r = torch.linalg.qr(w)
    u, s, vh = torch.linalg.svd(r)
    return q @ u, s, vh


def _rank(full, ratio):
    return max(1, min(full, math.ceil(ratio * full - 1e-9)))


@torch.no_grad()
def _decompose(module, base, ratio):
    w = module.weight.detach()
    work_device = w.device if w.device.type in ("cpu", "cuda") else torch.device("cpu")
    w64 = w.to(work_device, torch.float64)
    bias = module.bias is not None
    factory = {"device": w.device, "dtype": w.dtype}
    if base is nn.Linear:
        full = min(w.shape)
        r = _rank(full, ratio)
        u, s, vh = _thin_svd(w64)
        layer = SVD_Linear(module.in_features, module.out_features, bias, rank=r, **factory)
        layer.fc_V.weight.copy_(vh[:r])
        layer.fc_U.weight.copy_(u[:, :r])
        layer.vector_S.copy_(s[:r].reshape(1, r))
        if bias:
            layer.fc_U.bias.copy_(module.bias)
        return layer
    g, out_c, in_c = module.groups, module.out_channels, module.in_channels
    per_group = w64.reshape(g, out_c // g, -1)           # kernel-number first, one matrix per group
    full = min(per_group.shape[1:])
    r = _rank(full, ratio)
    u, s, vh = _thin_svd(per_group)
    layer = _SVD_CLASS[base](in_c, out_c, module.kernel_size, module.stride, module.padding,
                             module.dilation, g, bias, module.padding_mode, rank=g * r, **factory)
    layer.conv_V.weight.copy_(vh[:, :r].reshape(layer.conv_V.weight.shape))
    layer.conv_U.weight.copy_(u[:, :, :r].reshape(layer.conv_U.weight.shape))
    layer.vector_S.copy_(s[:, :r].reshape(layer.vector_S.shape))
    if bias:
        layer.conv_U.bias.copy_(module.bias)
    return layer


class _Projection:
    """A bare projection weight (nn.MultiheadAttention's) seen as a bias-free nn.Linear by ``_decompose``."""

    def __init__(self, weight, training):
        self.weight, self.bias, self.training = weight, None, training
        self.out_features, self.in_features = weight.shape


def _resolved(module, base, ratio):
    """The SVD layer of ``module`` (an instance of ``base`` or of a subclass keeping its forward)."""
    layer = _decompose(module, base, ratio)
    if type(module) is not base and isinstance(module, nn.Module):  # remember the subclass so merge() rebuilds it
        layer._svf_template = (_copy(module).to("meta"),)
    layer.base_fingerprint = weight_fingerprint(module.weight, module.bias)  # checked when S is loaded
    layer.low_rank_ratio = ratio  # saved with S, so loading rebuilds the same ranks
    layer.train(module.training)
    return layer


def _check_ratio(ratio, what):
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"{what} must be a number in (0, 1], got {ratio!r}")


def _unknown_names(names, known, what):
    bad = [n for n in names if n not in known]
    if bad:
        hints = "; ".join(f"{n!r} (did you mean {difflib.get_close_matches(n, known, 1)})" for n in bad)
        raise ValueError(f"{what}: no submodule named {hints}. Names are dotted module names as in "
                         "model.named_modules(), e.g. 'layer2.0.conv1'.")


def _set_submodule(root, name, new):
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def resolver(model, global_low_rank_ratio=1.0, excluded_layers=(), customized_layers_low_rank_ratio=None,
             skip_1x1=False, skip_3x3=False):
    """Return a copy of ``model`` whose conv/linear layers are replaced by their SVD (``SVD_Conv2d``...).

    - ``global_low_rank_ratio``: fraction of each layer's full rank kept (1.0 = exact); the largest
      singular values are kept.
    - ``excluded_layers``: dotted module names left as they are (a name excludes its whole subtree).
    - ``customized_layers_low_rank_ratio``: ``{name: ratio}`` overriding the global ratio per layer.
    - ``skip_1x1`` / ``skip_3x3``: leave convs whose kernel is all 1s / all 3s as they are (Linear
      layers are not affected).
    Handled exactly: nn.Conv1d/2d/3d (any kernel, stride, dilation, padding incl. 'same', padding_mode,
    bias, groups: grouped/depthwise convs are factored per group) and nn.Linear, and subclasses that
    keep their forward; nn.MultiheadAttention's q/k/v projection (see ``SVD_MultiheadAttention``). Code
    that reads a converted layer's ``weight``/``bias`` instead of calling it gets the merged ones. Anything
    else that looks like one (transposed convs, subclasses with their own forward, subclasses of
    nn.MultiheadAttention) is left untouched and listed in a warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"svf.resolver expects a torch.nn.Module, got {type(model).__name__}")
    _check_ratio(global_low_rank_ratio, "global_low_rank_ratio")
    on_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise ValueError(f"svf.resolver: {len(on_meta)} parameters of the model (e.g. {on_meta[0]!r}) are on the "
                         "meta device and hold no values to decompose; materialise the model first "
                         "(model.to_empty(device='cpu') and load its weights), then call svf.resolver")
    if isinstance(excluded_layers, str):
        excluded_layers = (excluded_layers,)
    custom = dict(customized_layers_low_rank_ratio or {})
    for name, ratio in custom.items():
        _check_ratio(ratio, f"customized_layers_low_rank_ratio[{name!r}]")
    known = [n for n, _ in model.named_modules()]
    _unknown_names(list(excluded_layers), known, "excluded_layers")
    _unknown_names(list(custom), known, "customized_layers_low_rank_ratio")

    new = _copy(model)
    refold = _unfold_all(new)  # a folded model is resolved plain and folded again
    converted, left = [], []
    for name, module in list(new.named_modules()):
        if any(name == e or name.startswith(e + ".") for e in excluded_layers) or isinstance(module, SVDLayer):
            continue
        reason = _unsupported_reason(module)
        if reason is not None:
            left.append(f"{name or '<root>'} ({reason})")
            continue
        ratio = custom.get(name, global_low_rank_ratio)
        if type(module) is nn.MultiheadAttention:  # its q/k/v projection is a bare Parameter
            SVD_MultiheadAttention.convert(module, lambda w: _resolved(_Projection(w, module.training), nn.Linear, ratio))
            converted.append(name)
            continue
        base = _base_class(module)
        if base is None:
            continue
        if base is not nn.Linear:
            if skip_1x1 and all(k == 1 for k in module.kernel_size):
                continue
            if skip_3x3 and all(k == 3 for k in module.kernel_size):
                continue
        layer = _resolved(module, base, ratio)
        if name == "":
            return _refolded(layer, refold)
        _set_submodule(new, name, layer)
        converted.append(name)
    if left:
        warnings.warn("svf.resolver left these layers unconverted (no exact SVD form): " + ", ".join(left),
                      stacklevel=2)
    if not converted:
        raise ValueError(f"svf.resolver found nothing to convert in {type(model).__name__}: it has no "
                         "nn.Conv1d/2d/3d or nn.Linear layer outside excluded_layers/skip_1x1/skip_3x3")
    return _refolded(new, refold)


def _unfold_all(model):
    """Unfold a copy's folded BatchNorms (svf.fold_batchnorm) before converting it; returns whether any was."""
    had = has_folds(model)
    if had:
        unfold_batchnorm(model)
    return had


def _refolded(model, refold):
    if refold:
        fold_batchnorm(model)
    return model


def merge(model):
    """Return a copy of ``model`` with every SVD layer folded back into a plain layer
    (W = U·diag(S)·Vᵀ): the original architecture and state-dict keys, loadable into the original class."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"svf.merge expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, SVDLayer):
        return model.to_plain()
    new = _copy(model)
    refold = _unfold_all(new)
    for module in list(new.modules()):  # first the projections held inside attention modules
        if isinstance(module, SVD_MultiheadAttention):
            module.to_plain()
    for name, module in list(new.named_modules()):
        if isinstance(module, SVDLayer):
            if name == "":
                return module.to_plain()
            _set_submodule(new, name, module.to_plain())
    return _refolded(new, refold)
