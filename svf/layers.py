"""SVD layers: a conv or linear layer rebuilt as ``U · diag(S) · Vᵀ`` (kernel-number-first SVD).

``SVD_Conv2d`` keeps the paper's names (``conv_V``, ``vector_S``, ``conv_U``) so the seed's freezing
code (``'vector_S' in name``) works unchanged. Grouped and depthwise convs are factored per group:
``conv_V`` and ``conv_U`` are grouped with the same number of groups, so the factorisation is exact.

Speed: when no factor needs a gradient (frozen stages, ``torch.no_grad()``, inference) the layer runs
ONE convolution with the merged weight, cached until a factor changes. When only S (and the bias)
trains, it runs the factored form ``conv_U(conv_V(x) * S)`` -- the cheapest exact way to get dL/dS, which
needs ``Vᵀx`` and ``Uᵀg`` per pixel anyway -- through a small autograd function that keeps only ``Vᵀx``
for the backward pass. When U or V train too, plain autograd runs the same factored form.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fold import active_bn, folded, mark

__all__ = ["SVDLayer", "SVD_Conv1d", "SVD_Conv2d", "SVD_Conv3d", "SVD_Linear"]


class _TrainSingularValues(torch.autograd.Function):
    """``y = U((V ⋆ x) * S) + b`` with U and V frozen: the factored form, saving only ``h = V ⋆ x``.

    Plain autograd would also keep ``x`` (for conv_V) and ``h * S`` (for conv_U), because a convolution saves
    its input even when its weight is frozen. The backward pass needs only ``h`` (for dL/dS) and the frozen
    weights: ``g_hS = Uᵀ g``, ``dS = Σ h ⊙ g_hS``, ``dx = (S·V)ᵀ ⋆ g_hS``. S never scales an activation: it
    scales U's columns in the forward pass and V's rows in the backward pass (tiny weight-sized products).
    ``conv`` = (stride, padding, dilation, groups) with numeric padding, or None for a Linear layer.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, v, s, u, b, conv):
        if conv is None:
            h = F.linear(x, v)
            y = F.linear(h, u * s, b)
        else:
            stride, padding, dilation, groups = conv
            h = _CONV[v.dim()](x, v, None, stride, padding, dilation, groups)
            y = _CONV[v.dim()](h, _scale_in(u, s, groups), b, 1, 0, 1, groups)
        ctx.save_for_backward(h, v, s, u)
        ctx.conv, ctx.x_shape, ctx.x_dtype = conv, x.shape, x.dtype
        ctx.b_dtype = None if b is None else b.dtype
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g):
        h, v, s, u = ctx.saved_tensors
        dt = h.dtype  # the compute dtype of the forward pass (half under autocast)
        g, v, u = g.to(dt), v.to(dt), u.to(dt)
        if ctx.conv is None:
            g_hs = g.matmul(u)
            reduce = tuple(range(g.dim() - 1))
            g_x = g_hs.matmul(v * s.reshape(-1, 1).to(dt)) if ctx.needs_input_grad[0] else None
        else:
            stride, padding, dilation, groups = ctx.conv
            nd = v.dim() - 2
            g_hs = _input_grad(g, u, h.shape, (1,) * nd, (0,) * nd, (1,) * nd, groups)
            reduce = (0,) + tuple(range(2, g.dim()))
            g_x = None
            if ctx.needs_input_grad[0]:
                vs = v * s.reshape((-1,) + (1,) * (v.dim() - 1)).to(dt)  # S scales V's rows: no pass over g_hS
                g_x = _input_grad(g_hs, vs, ctx.x_shape, stride, padding, dilation, groups)
        acc = torch.promote_types(dt, torch.float32)  # reductions at least in float32
        g_s = (g_hs.to(acc) * h.to(acc)).sum(reduce).reshape(s.shape).to(s.dtype) if ctx.needs_input_grad[2] else None
        g_b = g.to(acc).sum(reduce).to(ctx.b_dtype) if ctx.b_dtype is not None and ctx.needs_input_grad[4] else None
        return (None if g_x is None else g_x.to(ctx.x_dtype)), None, g_s, None, g_b, None


def _scale_in(u, s, groups):
    """U with its columns scaled by S, per group (a tiny out x r product)."""
    out_c, r = u.shape[0], u.shape[1] * groups
    return (u.reshape(groups, out_c // groups, r // groups) * s.reshape(groups, 1, r // groups)).reshape(u.shape)


def _input_grad(g, w, x_shape, stride, padding, dilation, groups):
    """dL/dx of ``y = conv(x, w)`` (numeric padding) from ``g = dL/dy``; needs only x's shape, not x."""
    nd = w.dim() - 2
    x_shape_only = g.new_empty(1).expand(x_shape)
    return torch.ops.aten.convolution_backward(g, x_shape_only, w, None, stride, padding, dilation, False,
                                               (0,) * nd, groups, (True, False, False))[0]


_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


class SVDLayer(nn.Module):
    """What every SVD layer shares: the merged-weight cache and the fast/factored dispatch."""

    # Filled by svf.resolver: a weightless (meta-device) copy of the original layer when its class is
    # a subclass that ``merge`` must rebuild, a fingerprint of the weights it was resolved from (the
    # ``common.weight_fingerprint`` of the plain layer's weight and bias) and the low-rank ratio it was given.
    _svf_template = None
    base_fingerprint = None
    low_rank_ratio = None

    def _factors(self):  # (V, U) modules
        raise NotImplementedError

    def _needs_factored(self):
        if not torch.is_grad_enabled():
            return False
        V, U = self._factors()
        return V.weight.requires_grad or U.weight.requires_grad or self.vector_S.requires_grad

    def _plain_forward(self, x, weight, bias):  # one conv/linear with the given weight
        raise NotImplementedError

    def _trainable_input(self, x):  # (input, conv geometry or None) for _TrainSingularValues
        raise NotImplementedError

    def forward(self, x):
        V, U = self._factors()
        bn = active_bn(self)  # a frozen BatchNorm folded into this layer (svf.fold_batchnorm), or None
        if not self._needs_factored():
            if bn is None:
                return self._plain_forward(x, self._cached_merged_weight(), U.bias)
            w, b = folded(self, bn, self._cached_merged_weight(), U.bias,
                          sources=(U.weight, self.vector_S, V.weight, U.bias))
            return mark(bn, self._plain_forward(x, w, b))
        if V.weight.requires_grad or U.weight.requires_grad:  # the factors train too: plain autograd, no fold
            return U(V(x) * self.vector_S)
        x_in, conv = self._trainable_input(x)
        u, b = (U.weight, U.bias) if bn is None else folded(self, bn, U.weight, U.bias, "_svf_fold_cache_u")
        y = _TrainSingularValues.apply(x_in, V.weight, self.vector_S, u, b, conv)
        if bn is not None:
            return mark(bn, y)
        # a Linear runs on 2-D input and is reshaped here, outside the Function: a view returned by a custom
        # Function cannot be modified in place (e.g. by a following ReLU(inplace=True))
        return y if conv is not None else y.reshape(x.shape[:-1] + y.shape[-1:])

    def _cache_key(self):
        V, U = self._factors()
        return tuple((t.data_ptr(), t._version, t.device, t.dtype)
                     for t in (V.weight, U.weight, self.vector_S))

    def _product(self, u, s, v):
        """``U · diag(S) · Vᵀ`` per group, shaped as the plain layer's weight (differentiable)."""
        V, _ = self._factors()
        g = getattr(V, "groups", 1)
        out_f, r = u.shape[0], v.shape[0]
        w = torch.bmm(u.reshape(g, out_f // g, r // g) * s.reshape(g, 1, r // g), v.reshape(g, r // g, -1))
        return w.reshape((out_f,) + tuple(v.shape[1:]))

    def merged_weight(self):
        """The weight of the equivalent plain layer, ``U · diag(S) · Vᵀ`` (computed in float64 on CPU/CUDA)."""
        V, U = self._factors()
        work = torch.float64 if V.weight.device.type in ("cpu", "cuda") else torch.float32
        factors = (t.detach().to(work) for t in (U.weight, self.vector_S, V.weight))
        return self._product(*factors).to(V.weight.dtype)

    # For code that reads a layer's weight instead of calling it (Swin's attention, nn.MultiheadAttention's
    # out_proj, a fused kernel): the plain layer's weight and bias, so the same function is computed. When a
    # factor needs a gradient the product is built from the factors, so gradients reach S (and U, V if they
    # train); otherwise it is the cached merged weight (treat it as read-only).
    @property
    def weight(self):
        if not self._needs_factored():
            return self._cached_merged_weight()
        V, U = self._factors()
        return self._product(U.weight, self.vector_S, V.weight)

    @property
    def bias(self):
        return self._factors()[1].bias

    def _cached_merged_weight(self):
        key = self._cache_key()
        cache = self.__dict__.get("_svf_cache")
        if cache is None or cache[0] != key:
            cache = (key, self.merged_weight())
            self.__dict__["_svf_cache"] = cache
        return cache[1]

    def clear_cache(self):
        """Forget the merged weight (needed only after editing a factor through ``.data``)."""
        for key in [k for k in self.__dict__ if k == "_svf_cache" or k.startswith("_svf_fold_cache")]:
            del self.__dict__[key]

    def __getstate__(self):  # never pickle or deep-copy the caches
        return {k: v for k, v in self.__dict__.items() if k != "_svf_cache" and not k.startswith("_svf_fold_cache")}

    def _new_plain(self):  # the plain layer built from this layer's own arguments
        raise NotImplementedError

    def to_plain(self):
        """The plain layer this one stands for, with the merged weight (its original class when
        it was resolved from a subclass of nn.Conv*/nn.Linear)."""
        V, U = self._factors()
        if self._svf_template is not None:
            plain = copy.deepcopy(self._svf_template[0]).to_empty(device=V.weight.device)
        else:
            plain = self._new_plain()
        with torch.no_grad():
            plain.weight.copy_(self.merged_weight())
            if U.bias is not None:
                plain.bias.copy_(U.bias)
        plain.weight.requires_grad_(any(p.requires_grad for p in (V.weight, U.weight, self.vector_S)))
        if U.bias is not None:
            plain.bias.requires_grad_(U.bias.requires_grad)
        plain.train(self.training)
        return plain

    @property
    def rank(self):
        return self.vector_S.shape[1]


class _SVDConvNd(SVDLayer):
    _conv_cls = None
    _nd = None

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, rank=1):
        super().__init__()
        if rank < 1 or rank % groups:
            raise ValueError(f"rank must be a positive multiple of groups={groups}, got {rank}")
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.conv_V = self._conv_cls(in_channels, rank, kernel_size, stride, padding, dilation, groups,
                                     False, padding_mode, **factory)
        self.vector_S = nn.Parameter(torch.ones((1, rank) + (1,) * self._nd, **factory))
        self.conv_U = self._conv_cls(rank, out_channels, 1, 1, 0, 1, groups, bias, **factory)

    def _factors(self):
        return self.conv_V, self.conv_U

    def _plain_forward(self, x, weight, bias):
        # conv_V carries stride, padding (incl. 'same' and padding_mode), dilation and groups.
        return self.conv_V._conv_forward(x, weight, bias)

    def _trainable_input(self, x):
        V = self.conv_V
        padding = V.padding
        if V.padding_mode != "zeros" or isinstance(padding, str):  # pad here, so the conv's padding is numeric
            mode = "constant" if V.padding_mode == "zeros" else V.padding_mode
            x = F.pad(x, V._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * len(V.kernel_size)
        return x, (V.stride, padding, V.dilation, V.groups)

    def _new_plain(self):
        V, U = self.conv_V, self.conv_U
        return self._conv_cls(self.in_channels, self.out_channels, V.kernel_size, V.stride, V.padding,
                              V.dilation, self.groups, U.bias is not None, V.padding_mode,
                              device=V.weight.device, dtype=V.weight.dtype)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, rank={self.rank}"


class SVD_Conv1d(_SVDConvNd):
    _conv_cls, _nd = nn.Conv1d, 1


class SVD_Conv2d(_SVDConvNd):
    """Kernel-number-first SVD of a Conv2d: ``conv_U(conv_V(x) * vector_S)``; the paper's signature."""
    _conv_cls, _nd = nn.Conv2d, 2


class SVD_Conv3d(_SVDConvNd):
    _conv_cls, _nd = nn.Conv3d, 3


class SVD_Linear(SVDLayer):
    """``fc_U(fc_V(x) * vector_S)``; ``vector_S`` has shape (1, rank)."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, rank=1):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.fc_V = nn.Linear(in_features, rank, False, **factory)
        self.vector_S = nn.Parameter(torch.ones((1, rank), **factory))
        self.fc_U = nn.Linear(rank, out_features, bias, **factory)

    def _factors(self):
        return self.fc_V, self.fc_U

    def _plain_forward(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _trainable_input(self, x):
        return x.reshape(-1, x.shape[-1]), None

    def _new_plain(self):
        V, U = self.fc_V, self.fc_U
        return nn.Linear(self.in_features, self.out_features, U.bias is not None,
                         device=V.weight.device, dtype=V.weight.dtype)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, rank={self.rank}"

