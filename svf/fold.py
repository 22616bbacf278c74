"""Frozen BatchNorm folded into the convolution before it, at run time (exact; the state dict is unchanged).

A BatchNorm in eval mode with frozen affine parameters is a fixed per-channel map ``y = a * x + c``
(``a = gamma / sqrt(running_var + eps)``, ``c = beta - running_mean * a``). After a convolution it can be
folded into that convolution's output channels: ``conv(x, W) * a + c == conv(x, W * a, b * a + c)``. That saves
one elementwise pass over the activation in the forward pass, one in the backward pass, and the activation the
BatchNorm keeps for its backward. For an SVD layer the fold scales the rows of U and the bias, so the S-gradient
stays exact: ``dS = sum(Vᵀx * (a*U)ᵀ g)`` is what the chain rule through the BatchNorm gives.

    pairs = svf.fold_batchnorm(model)     # [(conv name, BatchNorm name), ...]; call after svf.resolver
    svf.unfold_batchnorm(model)           # back to the plain classes

Nothing is copied or changed: the parameters, buffers, state-dict keys and module tree stay as they are (the
paired modules get a subclass of their own class and a reference to each other). The fold is decided at every
call: it applies only while the BatchNorm uses its running statistics (eval mode, or frozen by
``svf.freeze_batchnorm``), its affine parameters do not train and no hook could see or replace the tensor between
the two; the conv marks the tensor it returns, and the BatchNorm passes on exactly that tensor (a folded tensor
marked for another BatchNorm is an error, e.g. under nn.DataParallel's replicas). In any other case both run as
before. The BatchNorm's statistics are never touched. Pairs are found by tracing with ``torch.fx`` (a module whose
forward cannot be traced is searched through its children): a conv (nn.Conv1d/2d/3d or an SVD conv) whose ONLY
consumer is a nn.BatchNorm1d/2d/3d of as many channels, each called once. The folded weights are cached while
nothing trains and rebuilt when a weight or a statistic changes (statistics rewritten with the same values, as
DistributedDataParallel's ``broadcast_buffers`` does at every step, are recognised on the CPU).
"""
import collections
import warnings
import weakref

import torch
import torch.fx
import torch.nn as nn
from torch.nn.modules import module as _module

from .batchnorm import FROZEN, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, is_frozen_batchnorm

__all__ = ["fold_batchnorm", "unfold_batchnorm", "folded_pairs"]

_BN = "_svf_folded_bn"            # on a conv: the BatchNorm folded into it
_MARK = "_svf_folded_for"         # on the tensor a folded conv returns: the BatchNorm that must pass it on
_CACHE = "_svf_fold_cache"        # on a conv: the folded frozen weights and what they were computed from


def _keep_eval(bn, args):  # forward pre-hook: how svf.freeze_batchnorm kept a BatchNorm of another class in eval mode
    bn.training = False


def _frozen_statistics(bn):
    """The BatchNorm computes ``a * x + c`` with constants: running statistics used, affine parameters frozen."""
    return ((not bn.training or is_frozen_batchnorm(bn))
            and bn.running_mean is not None and bn.running_var is not None
            and not any(p.requires_grad for p in bn.parameters(recurse=False)))


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _no_foreign_hooks(conv, bn):
    """A hook that could see the folded output, or replace the tensor between conv and BatchNorm (a full
    backward hook does), disables the fold; svf.freeze_batchnorm's own pre-hook does not."""
    if any(getattr(_module, name, None) for name in _GLOBAL_HOOKS):
        return False
    if conv._forward_hooks or conv._backward_hooks or conv._backward_pre_hooks:
        return False
    if bn._backward_hooks or bn._backward_pre_hooks:
        return False
    return all(hook is _keep_eval for hook in bn._forward_pre_hooks.values())


def active_bn(conv):
    """The BatchNorm to fold into ``conv`` for this call, or None."""
    bn = conv.__dict__.get(_BN)
    if bn is None or not _frozen_statistics(bn) or not _no_foreign_hooks(conv, bn):
        return None
    return bn


def bn_affine(bn, dtype, device):
    """(a, c) of the BatchNorm's fixed map ``a * x + c``, computed in float64 and returned in ``dtype``."""
    work = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
    a = torch.rsqrt(bn.running_var.detach().to(device, work) + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.detach().to(device, work)
    c = -bn.running_mean.detach().to(device, work) * a
    if bn.bias is not None:
        c = c + bn.bias.detach().to(device, work)
    return a.to(dtype), c.to(dtype)


def _meta(tensors):
    return tuple(None if t is None else (t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)


def _key(tensors):
    """What identifies the values of ``tensors``: the same tensor objects (held weakly), unmodified since."""
    return tuple(None if t is None else weakref.ref(t) for t in tensors), _meta(tensors)


def _unchanged(key, tensors):
    refs, meta = key
    return (len(refs) == len(tensors)
            and all((r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, tensors))
            and meta == _meta(tensors))


def _statistics(bn):
    return bn.running_mean, bn.running_var, bn.weight, bn.bias


def _on_cpu(stats):
    return all(t is None or t.device.type == "cpu" for t in stats)


def _copies(stats):
    """Copies of the BatchNorm's tensors to compare values with, on the CPU only (on a GPU a comparison would
    wait for the device; rebuilding the folded weights there is a few small kernels)."""
    return tuple(None if t is None else t.detach().clone() for t in stats) if _on_cpu(stats) else None


def _same_statistics(cache, stats):
    """The statistics are those the cached weights were folded with: untouched, or rewritten with the same values
    (as DistributedDataParallel's ``broadcast_buffers`` does at every step)."""
    if _unchanged(cache["stats"], stats):
        return True
    copies = cache["copies"]
    if copies is None or not _on_cpu(stats) or not all(
            (c is None and t is None) or (c is not None and t is not None and torch.equal(c, t))
            for c, t in zip(copies, stats)):
        return False
    cache["stats"] = _key(stats)
    return True


def folded(owner, bn, weight, bias, cache_name=_CACHE, sources=None):
    """(weight * a, bias * a + c) for output channels on dim 0 of ``weight``; cached on ``owner`` (under
    ``cache_name``, valid while ``sources``, default weight and bias, and the statistics are unchanged) while nothing
    needs a gradient; through autograd (a and c constant) when the weight or bias trains."""
    scale_shape = (-1,) + (1,) * (weight.dim() - 1)
    trains = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
    if not trains:
        sources, stats = (weight, bias) if sources is None else tuple(sources), _statistics(bn)
        cache = owner.__dict__.get(cache_name)
        if (cache is not None and cache["eps"] == bn.eps and _unchanged(cache["sources"], sources)
                and _same_statistics(cache, stats)):
            return cache["weight"], cache["bias"]
        with torch.no_grad():
            work = torch.float64 if weight.device.type in ("cpu", "cuda") else weight.dtype
            a, c = bn_affine(bn, work, weight.device)
            w = (weight.to(work) * a.reshape(scale_shape)).to(weight.dtype)
            b = (c if bias is None else bias.to(work) * a + c).to(weight.dtype)
        owner.__dict__[cache_name] = {"sources": _key(sources), "stats": _key(stats), "copies": _copies(stats),
                                      "eps": bn.eps, "weight": w, "bias": b}
        return w, b
    a, c = bn_affine(bn, weight.dtype, weight.device)
    w = weight * a.reshape(scale_shape)
    return w, (c if bias is None else bias * a + c)


def mark(bn, y):
    """Mark ``y`` as already folded for ``bn`` (which passes exactly this tensor on unchanged)."""
    setattr(y, _MARK, bn)
    return y


class _FoldedConv:
    """A conv whose following frozen BatchNorm is folded into its weight and bias while it stays frozen."""

    def forward(self, x):
        bn = active_bn(self)
        if bn is None:
            return super().forward(x)
        w, b = folded(self, bn, self.weight, self.bias)
        return mark(bn, self._conv_forward(x, w, b))

    def __getstate__(self):  # never pickle or deep-copy the cache
        return {k: v for k, v in self.__dict__.items() if not k.startswith(_CACHE)}


class _FoldedBatchNorm:
    """A BatchNorm that passes on, unchanged, the tensor its folded conv has just returned."""

    def forward(self, x):
        owner = getattr(x, _MARK, None)
        if owner is None:
            return super().forward(x)
        delattr(x, _MARK)
        if owner is not self:
            raise RuntimeError(f"svf.fold_batchnorm: this {type(self).__name__} received a tensor folded for another "
                               "BatchNorm (a copy of the model made by nn.DataParallel, or a module called out of "
                               "order?); call svf.unfold_batchnorm(model) before wrapping or copying it that way")
        return x


class FoldedConv1d(_FoldedConv, nn.Conv1d):
    pass


class FoldedConv2d(_FoldedConv, nn.Conv2d):
    pass


class FoldedConv3d(_FoldedConv, nn.Conv3d):
    pass


class FoldedBatchNorm1d(_FoldedBatchNorm, nn.BatchNorm1d):
    pass


class FoldedBatchNorm2d(_FoldedBatchNorm, nn.BatchNorm2d):
    pass


class FoldedBatchNorm3d(_FoldedBatchNorm, nn.BatchNorm3d):
    pass


class FoldedFrozenBatchNorm1d(_FoldedBatchNorm, FrozenBatchNorm1d):
    pass


class FoldedFrozenBatchNorm2d(_FoldedBatchNorm, FrozenBatchNorm2d):
    pass


class FoldedFrozenBatchNorm3d(_FoldedBatchNorm, FrozenBatchNorm3d):
    pass


_FOLDED = {nn.Conv1d: FoldedConv1d, nn.Conv2d: FoldedConv2d, nn.Conv3d: FoldedConv3d,
           nn.BatchNorm1d: FoldedBatchNorm1d, nn.BatchNorm2d: FoldedBatchNorm2d, nn.BatchNorm3d: FoldedBatchNorm3d,
           FrozenBatchNorm1d: FoldedFrozenBatchNorm1d, FrozenBatchNorm2d: FoldedFrozenBatchNorm2d,
           FrozenBatchNorm3d: FoldedFrozenBatchNorm3d}
_PLAIN = {v: k for k, v in _FOLDED.items()}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, FoldedConv1d, FoldedConv2d, FoldedConv3d)
_BATCHNORMS = tuple(c for c in list(_FOLDED) + list(_PLAIN) if issubclass(c, nn.modules.batchnorm._BatchNorm))
# svf.freeze_batchnorm: each BatchNorm class -> its frozen subclass (a folded BatchNorm stays folded)
FREEZE = {**FROZEN, **{_FOLDED[plain]: _FOLDED[frozen] for plain, frozen in FROZEN.items()}}


def _conv_channels(m):
    """Output channels of a conv that can take a fold (plain Conv1d/2d/3d or SVD conv), else None."""
    from .layers import _SVDConvNd
    if type(m) in _CONVS or isinstance(m, _SVDConvNd):
        return m.out_channels
    return None


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        from .layers import SVDLayer
        return (isinstance(m, (SVDLayer, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm))
                or super().is_leaf_module(m, qualname))


def _pairs(module, prefix, out):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _Tracer().trace(module)
    except Exception:  # noqa: BLE001 -- untraceable forward (data-dependent control flow ...): look inside
        for name, child in module.named_children():
            _pairs(child, f"{prefix}{name}.", out)
        return
    mods = dict(module.named_modules())
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    for node in graph.nodes:
        if node.op != "call_module" or type(mods[node.target]) not in _BATCHNORMS or node.kwargs or len(node.args) != 1:
            continue
        bn = mods[node.target]
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        conv = mods[src.target]
        if (_conv_channels(conv) != bn.num_features or len(src.users) != 1
                or calls[src.target] != 1 or calls[node.target] != 1):
            continue
        out.append((prefix + src.target, prefix + node.target))


def folded_pairs(model):
    """The (conv name, BatchNorm name) pairs of ``model`` that ``fold_batchnorm`` folds (found by tracing)."""
    out = []
    _pairs(model, "", out)
    return out


def fold_batchnorm(model):
    """Fold every BatchNorm that directly and only follows a conv into it, at run time (see the module
    docstring). Returns the list of (conv name, BatchNorm name) pairs; idempotent."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"svf.fold_batchnorm expects a torch.nn.Module, got {type(model).__name__}")
    pairs = folded_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if type(conv) in _FOLDED:  # an SVD layer folds by itself
            conv.__class__ = _FOLDED[type(conv)]
        if type(bn) in _FOLDED:
            bn.__class__ = _FOLDED[type(bn)]
        _drop_caches(conv)
        conv.__dict__[_BN] = bn  # a plain reference, not a submodule: the module tree and state dict stay as they are
    return pairs


def _drop_caches(m):
    for key in [k for k in m.__dict__ if k.startswith(_CACHE)]:
        del m.__dict__[key]


def has_folds(model):
    """Whether ``fold_batchnorm`` folded anything in ``model``."""
    return any(_BN in m.__dict__ or type(m) in _PLAIN for m in model.modules())


def unfold_batchnorm(model):
    """Undo ``fold_batchnorm``: the plain classes again, every fold reference and cache dropped. Returns the model."""
    for m in model.modules():
        m.__dict__.pop(_BN, None)
        _drop_caches(m)
        if type(m) in _PLAIN:
            m.__class__ = _PLAIN[type(m)]
    return model
