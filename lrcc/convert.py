"""The converted layer, the decomposition and its cache, the conversion and the merge.

Every selected ``nn.Conv2d`` becomes a ``LowRankConv2d`` (and, with ``include_linear=True``, every ``nn.Linear`` a
``LowRankLinear``: the same factors, its weight read as one (out, in) matrix). Per group g of the conv, its weight is read
"kernel-number first" as a matrix W_g of shape (out/groups, in/groups*kh*kw), and

* decomposition modes (DnA):  W_eff = U·V + S⊙mask (+ E)
  ``lora_B`` = U (out, r), ``lora_A`` = V (groups*r, in/groups*kh*kw), ``sparse_weight`` = S,
  ``sparse_mask`` = the support of S (True where S is kept; NOTE the seed stored the complement),
  ``residual`` = E = W - U·V - S⊙mask, a frozen buffer, so the converted model equals the pretrained
  one at init (``keep_residual=False`` drops it, as the seed did).
* ``lora_mode``:  W_eff = W + scaling·U·V with V kaiming-uniform and U zero, scaling = lora_alpha/r
  (``lora_alpha=None``, the default, gives scaling 1 as in the seed).

The forward pass is one convolution with W_eff (LoRA with dropout in training runs the low-rank branch
as two convolutions on the dropped-out input instead). What trains inside a converted layer is
``TRAINABLE_BY_MODE``; everything outside converted layers keeps its ``requires_grad`` (the seed's
default: BatchNorm, classifier and conv biases train); ``mark_only_lrcc_as_trainable`` trains the
adapter alone.
"""
import copy
import math
import os
import warnings

import torch
import torch.nn as nn

from .common import FINGERPRINT_SCHEME, atomic_save, print_trainable_parameters, weight_fingerprint

__all__ = ["MODES", "TRAINABLE_BY_MODE", "LowRankConv2d", "LowRankLinear", "LOW_RANK_LAYERS", "model_convert_conv", "decompose_low_rank_sparse",
           "layer_rank", "mark_only_lrcc_as_trainable", "merge"]

# What trains inside a converted layer (U = lora_B, V = lora_A, S = sparse_weight), per mode.
TRAINABLE_BY_MODE = {
    "fix_low_rank": ("sparse_weight",),
    "fix_sparse": ("lora_A", "lora_B"),
    "tune_U": ("lora_B",),
    "tune_V": ("lora_A",),
    "tune_U_S": ("lora_B", "sparse_weight"),
    "tune_V_S": ("lora_A", "sparse_weight"),
    "tune_all": ("lora_A", "lora_B", "sparse_weight"),
    "lora_mode": ("lora_A", "lora_B"),
}
MODES = tuple(TRAINABLE_BY_MODE)
DECOMPOSITION_ALGORITHM = "godec-full-rank-subspace-best-v2"  # part of the cache key: bump when it changes
CACHE_FORMAT = "lrcc-decomposition"
_EXTRAS = {"lora_alpha": None, "lora_dropout": 0.0, "keep_residual": True, "include_linear": False,
           "verbose": True}


def _init_factors(layer, mode, rank, lora_alpha, lora_dropout, keep_residual):
    """The lrcc state of a converted layer (conv or linear): mode, rank, scaling, factors, sparse part."""
    if mode not in MODES:
        raise ValueError(f"unknown lrcc mode {mode!r}; choose one of {list(MODES)}")
    rows, cols = layer.group_matrix_shape
    if not 1 <= rank <= min(rows, cols):
        raise ValueError(f"rank {rank} is outside [1, {min(rows, cols)}] for a layer with weight "
                         f"{tuple(layer.weight.shape)} and groups={layer.groups}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    layer.mode, layer.rank = mode, int(rank)
    layer.lora_alpha, layer.lora_dropout_p = lora_alpha, float(lora_dropout)
    layer.scaling = 1.0 if lora_alpha is None else float(lora_alpha) / layer.rank
    layer.keep_residual = bool(keep_residual) and mode != "lora_mode"
    layer.weight.requires_grad_(False)
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    layer.lora_A = nn.Parameter(torch.zeros(layer.groups * layer.rank, cols, **factory))
    layer.lora_B = nn.Parameter(torch.zeros(layer.weight.shape[0], layer.rank, **factory))
    layer.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
    if mode == "lora_mode":
        # B = 0 keeps the model unchanged at init; fan_in of A is one group's in*kh*kw (the seed's init)
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
    else:
        layer.sparse_weight = nn.Parameter(torch.zeros_like(layer.weight))
        layer.register_buffer("sparse_mask", torch.zeros(layer.weight.shape, dtype=torch.bool,
                                                         device=layer.weight.device))
        if layer.keep_residual:
            layer.register_buffer("residual", torch.zeros_like(layer.weight))
    for name in ("lora_A", "lora_B", "sparse_weight"):
        if hasattr(layer, name):
            getattr(layer, name).requires_grad_(name in TRAINABLE_BY_MODE[mode])


class LowRankConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose weight is rebuilt from low-rank (+ sparse) factors; see the module doc.

    ``weight`` holds the pretrained weight (always frozen; used by ``lora_mode`` and by the fingerprint
    that save/load checks), ``bias`` is the original bias parameter (its ``requires_grad`` untouched).
    ``convert_options``: the ``model_convert_conv`` options that made the layer (None if built by hand).
    """
    convert_options = None

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, mode, rank,
                 lora_alpha=None, lora_dropout=0.0, keep_residual=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        _init_factors(self, mode, rank, lora_alpha, lora_dropout, keep_residual)

    @classmethod
    def from_conv(cls, conv, **lrcc_options):
        """A LowRankConv2d sharing ``conv``'s weight and bias parameters (factors still to be set)."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype, **lrcc_options)
        layer.weight = conv.weight
        layer.weight.requires_grad_(False)
        layer.bias = conv.bias
        return layer.train(conv.training)  # a new module starts in train mode; keep the conv's

    @property
    def group_matrix_shape(self):
        """(rows, cols) of one group's weight matrix: (out/groups, in/groups*kh*kw)."""
        out_c, in_per_group, kh, kw = self.weight.shape
        return out_c // self.groups, in_per_group * kh * kw

    def options(self):
        """The constructor settings that a saved adapter must match (geometry + lrcc options)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "padding_mode": self.padding_mode, "mode": self.mode, "rank": self.rank,
                "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout_p,
                "keep_residual": self.keep_residual}

    def low_rank_weight(self):
        """U·V per group, shaped like ``weight``."""
        rows, cols = self.group_matrix_shape
        u = self.lora_B.view(self.groups, rows, self.rank)
        v = self.lora_A.view(self.groups, self.rank, cols)
        return torch.bmm(u, v).view(self.weight.shape)

    def effective_weight(self):
        """The weight that the forward pass applies (differentiable in the factors)."""
        if self.mode == "lora_mode":
            return self.weight + self.scaling * self.low_rank_weight()
        w = self.low_rank_weight() + self.sparse_weight * self.sparse_mask
        if self.keep_residual:
            w = w + self.residual
        return w

    @torch.no_grad()
    def set_decomposition(self, u, v, s, mask):
        """Load factors (groups, rows, r), (groups, r, cols), S and its support (groups, rows, cols);
        the residual E is recomputed from the frozen weight so that W_eff == W at init."""
        self.lora_B.copy_(u.reshape(self.lora_B.shape))
        self.lora_A.copy_(v.reshape(self.lora_A.shape))
        mask = mask.reshape(self.weight.shape).to(torch.bool)
        self.sparse_mask.copy_(mask)
        self.sparse_weight.copy_(s.reshape(self.weight.shape) * mask)
        if self.keep_residual:
            # computed with the forward's own formula, so W_eff differs from W by rounding only
            self.residual.copy_(self.weight - (self.low_rank_weight() + self.sparse_weight * self.sparse_mask))

    def forward(self, x):
        if self.mode == "lora_mode" and self.lora_dropout_p > 0 and self.training:
            # dropout acts on the low-rank branch's input: conv(x, W) + s * conv_B(conv_A(dropout(x)))
            a = self.lora_A.view(self.groups * self.rank, *self.weight.shape[1:])
            b = self.lora_B.view(self.out_channels, self.rank, 1, 1)
            hidden = self._conv_forward(self.lora_dropout(x), a, None)
            low_rank = nn.functional.conv2d(hidden, b, groups=self.groups)
            return self._conv_forward(x, self.weight, self.bias) + self.scaling * low_rank
        return self._conv_forward(x, self.effective_weight(), self.bias)

    def extra_repr(self):
        return super().extra_repr() + f", mode={self.mode}, rank={self.rank}"


class LowRankLinear(nn.Linear):
    """An ``nn.Linear`` with the same lrcc factors as ``LowRankConv2d`` (a Linear is a 1x1 conv with one group):
    ``lora_A`` (r, in), ``lora_B`` (out, r), ``sparse_weight`` / ``sparse_mask`` / ``residual`` shaped like
    ``weight``; W_eff = W + scaling·B·A (lora_mode) or B·A + S⊙mask (+ E). The forward is one ``F.linear`` with
    W_eff, except LoRA while its factors train: x·Wᵀ + scaling·(x·Aᵀ)·Bᵀ, which needs no gradient of a full-size
    weight (and applies the dropout to the low-rank branch's input)."""
    convert_options = None
    groups = 1

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, mode, rank,
                 lora_alpha=None, lora_dropout=0.0, keep_residual=True):
        super().__init__(in_features, out_features, bias, device, dtype)
        _init_factors(self, mode, rank, lora_alpha, lora_dropout, keep_residual)

    @classmethod
    def from_linear(cls, linear, **lrcc_options):
        """A LowRankLinear sharing ``linear``'s weight and bias parameters (factors still to be set)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
                    dtype=linear.weight.dtype, **lrcc_options)
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        layer.bias = linear.bias
        return layer.train(linear.training)

    @property
    def group_matrix_shape(self):
        return tuple(self.weight.shape)

    def options(self):
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "mode": self.mode, "rank": self.rank, "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout_p, "keep_residual": self.keep_residual}

    low_rank_weight = LowRankConv2d.low_rank_weight
    effective_weight = LowRankConv2d.effective_weight
    set_decomposition = LowRankConv2d.set_decomposition

    def forward(self, x):
        factors_train = torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad)
        if self.mode == "lora_mode" and (factors_train or (self.lora_dropout_p > 0 and self.training)):
            # the factored form: x·Wᵀ + s·(x·Aᵀ)·Bᵀ needs no gradient of a full-size weight (LoRA's usual form);
            # dropout, when set, acts on the low-rank branch's input
            hidden = self.lora_dropout(x) if self.training else x
            low_rank = nn.functional.linear(nn.functional.linear(hidden, self.lora_A), self.lora_B)
            return nn.functional.linear(x, self.weight, self.bias) + self.scaling * low_rank
        return nn.functional.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self):
        return super().extra_repr() + f", mode={self.mode}, rank={self.rank}"


LOW_RANK_LAYERS = (LowRankConv2d, LowRankLinear)


def low_rank_layer(module, **lrcc_options):
    """The lrcc layer of a plain ``nn.Conv2d`` or ``nn.Linear`` (sharing its weight and bias)."""
    if isinstance(module, nn.Conv2d):
        return LowRankConv2d.from_conv(module, **lrcc_options)
    return LowRankLinear.from_linear(module, **lrcc_options)


# ----------------------------------------------------------------------------------------------------
# decomposition

def layer_rank(conv, r=0, r_ratio=0.25):
    """Rank per group of a conv (or of a Linear: in_features for in_channels): ``r`` if > 0, else
    int(in_channels/groups * r_ratio) (the seed's documented rule, input channels x r_ratio), at least 1, capped
    at the group matrix's full rank."""
    out_c, in_per_group = conv.weight.shape[:2]  # a Linear's (out, in) is a 1x1 conv with one group
    kernel = conv.weight[0, 0].numel()
    groups = getattr(conv, "groups", 1)
    full = min(out_c // groups, in_per_group * kernel)
    if r < 0 or (r == 0 and r_ratio <= 0):
        raise ValueError(f"need r > 0 or r_ratio > 0, got r={r}, r_ratio={r_ratio}")
    rank = int(r) if r > 0 else int(in_per_group * r_ratio)
    return max(1, min(rank, full))


@torch.no_grad()
def decompose_low_rank_sparse(w, rank, compress_step=50, lambda_s=0.01):
    """GoDec-style W ≈ U·V + S for a batch of matrices w (batch, m, n), with the full rank at once.

    Start from the truncated SVD (eigh of the smaller Gram matrix), then ``compress_step`` times:
    low-rank step = one block power iteration on W - S with QR (U orthonormal, V = Uᵀ(W - S)), sparse
    step = hard-threshold W - U·V at |x| >= lambda_s. The iteration is not monotone, so each matrix
    keeps its iterate with the smallest ‖W - U·V - S‖. Returns U (b, m, r), V (b, r, n), S (b, m, n)
    and S's support (bool). Computed in float32 (float64 for float64 input) on w's device.
    """
    work_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    w = w.to(work_dtype)
    m, n = w.shape[-2:]
    # top-r singular subspace from the smaller Gram matrix: O(m·n·min(m, n)), far cheaper than an SVD
    if m <= n:
        u = torch.linalg.eigh(w @ w.mT)[1][..., -rank:]
    else:
        v = torch.linalg.eigh(w.mT @ w)[1][..., -rank:].mT
        u = torch.linalg.qr(w @ v.mT).Q
    v = u.mT @ w
    residual = w - u @ v
    mask = residual.abs() >= lambda_s
    s = residual * mask
    best_u, best_v = u, v
    best_error = residual.square().masked_fill(mask, 0).sum((-2, -1))
    for _ in range(compress_step):
        target = w - s
        u = torch.linalg.qr(target @ v.mT).Q
        v = u.mT @ target
        residual = w - u @ v
        mask = residual.abs() >= lambda_s
        s = residual * mask
        error = residual.square().masked_fill(mask, 0).sum((-2, -1))
        better = error < best_error  # only the small factors are kept; S follows from them
        best_error = torch.where(better, error, best_error)
        best_u = torch.where(better[:, None, None], u, best_u)
        best_v = torch.where(better[:, None, None], v, best_v)
    residual = w - best_u @ best_v
    mask = residual.abs() >= lambda_s
    return best_u, best_v, residual * mask, mask


def _group_matrices(weight, groups):
    out_c = weight.shape[0]
    return weight.detach().reshape(groups, out_c // groups, -1)


def _cache_key(layers, r, r_ratio, compress_step, lambda_s):
    """Everything the decomposition depends on: settings, and each layer's geometry, rank and weights.
    (``mode`` and ``keep_residual`` do not change the decomposition, so modes share a cache.)"""
    return {"algorithm": DECOMPOSITION_ALGORITHM, "fingerprint_scheme": FINGERPRINT_SCHEME,
            "r": int(r), "r_ratio": float(r_ratio),
            "compress_step": int(compress_step), "lambda_s": float(lambda_s),
            "layers": [[name, list(layer.weight.shape), layer.groups, layer.rank, weight_fingerprint(layer.weight)]
                       for name, layer in layers]}


def _describe_key_change(old, new):
    changed = [k for k in new if k != "layers" and old.get(k) != new[k]]
    text = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
    if old.get("layers") != new["layers"]:
        text += (", " if text else "") + "converted layers, their ranks or their pretrained weights"
    return text or "format"


def _decompose_layers(layers, r, r_ratio, compress_step, lambda_s, path, log):
    """Set the factors of every (name, LowRankConv2d), from the cache file ``path`` when its key matches."""
    key = _cache_key(layers, r, r_ratio, compress_step, lambda_s)
    if path is not None and os.path.exists(path):
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # empty, truncated, not a torch.save file, pickled objects
            cached = None
        if not isinstance(cached, dict) or cached.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path} exists but is not an lrcc decomposition cache (not written by this "
                             "version of lrcc); give another cache_path or delete the file")
        if cached["key"] == key:
            for name, layer in layers:
                entry = cached["layers"][name]
                layer.set_decomposition(*(entry[k].to(layer.weight.device)
                                          for k in ("lora_B", "lora_A", "sparse_weight", "sparse_mask")))
            log(f"lrcc: reused the decomposition cached at {path}")
            return
        log(f"lrcc: cache at {path} was made with different settings "
            f"({_describe_key_change(cached['key'], key)}); recomputing")
    entries = {}
    for name, layer in layers:
        u, v, s, mask = decompose_low_rank_sparse(_group_matrices(layer.weight, layer.groups), layer.rank,
                                                  compress_step, lambda_s)
        layer.set_decomposition(u, v, s, mask)
        entries[name] = {k: getattr(layer, k).detach().to("cpu").clone()
                         for k in ("lora_B", "lora_A", "sparse_weight", "sparse_mask")}
    if path is not None:
        atomic_save({"format": CACHE_FORMAT, "key": key, "layers": entries}, path)
        log(f"lrcc: decomposition of {len(layers)} layers cached at {path}")


# ----------------------------------------------------------------------------------------------------
# conversion

def _matches(name, patterns):
    return any(p in name for p in patterns)


def _replace_module(model, name, new):
    """Put ``new`` at dotted ``name`` and return the (possibly new) root: name "" is the model itself."""
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def _has_plain_conv_forward(module):
    # subclasses that change forward (weight standardisation, ...) are not convertible exactly
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    return (type(module).forward is nn.Conv2d.forward
            and type(module)._conv_forward is nn.Conv2d._conv_forward)


def _candidates(model, include_linear):
    """(name, layer) of the plain nn.Conv2d (and with ``include_linear`` nn.Linear) layers of ``model``. A Linear
    held by an nn.MultiheadAttention is left out: that module reads its ``out_proj.weight`` directly, so a
    converted layer there would be ignored."""
    attention_children = {f"{n}.{c}" if n else c for n, m in model.named_modules()
                          if isinstance(m, nn.MultiheadAttention) for c, _ in m.named_children()}
    kinds = (nn.Conv2d, nn.Linear) if include_linear else (nn.Conv2d,)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)
            and not isinstance(m, LOW_RANK_LAYERS) and n not in attention_children]


def model_convert_conv(model, mode, cache_path=None, convert_op_name=(), ignore_op_name=(), fix_op_name=(),
                       r=0, r_ratio=0.25, compress_step=50, lambda_s=0.01, merge_parameter=False, **extras):
    """Return a converted deep copy of ``model`` (the caller's model is not modified).

    Selection by substring of the dotted module name, over ``nn.Conv2d`` layers: ``convert_op_name``
    (convert only matching layers) or ``ignore_op_name`` (convert all but matching ones), not both;
    ``fix_op_name``: matching convs are not converted and their weight and bias are frozen (this wins
    over ``convert_op_name``). Every name given must match at least one conv (typos are errors).
    ``r`` > 0 sets the rank per group, else ``r_ratio`` x in_channels/groups; capped at full rank.
    ``cache_path``: file caching the decomposition, reused when settings and weights match (None: not
    cached); ``lora_mode`` does not use it. ``path=`` is its deprecated old name.
    ``merge_parameter=True`` returns ``merge(converted)``: plain convs with the effective weights.
    Extras: ``lora_alpha`` (None -> scaling 1, as the seed), ``lora_dropout`` (0.0), ``include_linear`` (False:
    Conv2d only, as the seed; True: nn.Linear layers too, e.g. a transformer's attention and MLP; the selection
    lists then match Linear names as well),
    ``keep_residual`` (True: W_eff == W at init; False: the seed's W ≈ U·V + S), ``verbose`` (True).
    Outside converted layers ``requires_grad`` is untouched (BatchNorm, classifier, biases train);
    call ``mark_only_lrcc_as_trainable`` to train the adapter alone.
    """
    if "path" in extras:  # the seed's name for the cache file
        warnings.warn("model_convert_conv(path=...) is deprecated: the file is a decomposition cache, "
                      "write cache_path=...", DeprecationWarning, stacklevel=2)
        if cache_path is not None:
            raise TypeError("model_convert_conv got both cache_path and its deprecated alias path; give cache_path")
        cache_path = extras.pop("path")
    unknown = sorted(set(extras) - set(_EXTRAS))
    if unknown:
        raise TypeError(f"model_convert_conv got unknown options {unknown}; known extras: {sorted(_EXTRAS)}")
    opts = {**_EXTRAS, **extras}
    if mode not in MODES:
        raise ValueError(f"unknown lrcc mode {mode!r}; choose one of {list(MODES)}")
    if isinstance(convert_op_name, str) or isinstance(ignore_op_name, str) or isinstance(fix_op_name, str):
        raise TypeError("convert_op_name, ignore_op_name and fix_op_name are lists of substrings, "
                        "not strings (write ['downsample'], not 'downsample')")
    if convert_op_name and ignore_op_name:
        raise ValueError("give either convert_op_name or ignore_op_name, not both "
                         f"(got convert_op_name={list(convert_op_name)}, ignore_op_name={list(ignore_op_name)})")
    for name, value in (("r", r), ("compress_step", compress_step)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    for name, value in (("r_ratio", r_ratio), ("lambda_s", lambda_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if r == 0 and r_ratio <= 0:
        raise ValueError(f"need r > 0 or r_ratio > 0, got r={r}, r_ratio={r_ratio}")
    log = print if opts["verbose"] else (lambda *a, **k: None)

    model = copy.deepcopy(model)
    convs = _candidates(model, opts["include_linear"])
    conv_names = [n for n, _ in convs]
    for arg, patterns in (("convert_op_name", convert_op_name), ("ignore_op_name", ignore_op_name),
                          ("fix_op_name", fix_op_name)):
        for p in patterns:
            if not any(p in n for n in conv_names):
                kinds = "nn.Conv2d/nn.Linear" if opts["include_linear"] else "nn.Conv2d"
                raise ValueError(f"{arg} entry {p!r} matches no {kinds} layer; such layers are: {conv_names}")

    converted, ignored, fixed = [], [], []
    for name, conv in convs:
        if _matches(name, fix_op_name):
            conv.weight.requires_grad_(False)
            if conv.bias is not None:
                conv.bias.requires_grad_(False)
            fixed.append(name)
        elif (convert_op_name and not _matches(name, convert_op_name)) or _matches(name, ignore_op_name):
            ignored.append(name)
        elif not _has_plain_conv_forward(conv):
            raise ValueError(f"conv layer {name!r} is a {type(conv).__name__} with its own forward, which lrcc "
                             "cannot convert exactly; add it to ignore_op_name or fix_op_name")
        else:
            layer = low_rank_layer(conv, mode=mode, rank=layer_rank(conv, r, r_ratio),
                                            lora_alpha=opts["lora_alpha"], lora_dropout=opts["lora_dropout"],
                                            keep_residual=opts["keep_residual"])
            model = _replace_module(model, name, layer)
            converted.append((name, layer))

    # what this call was, saved with an adapter (peft's adapter config); the layers hold what rebuilds them
    call_options = {"mode": mode, "r": r, "r_ratio": r_ratio, "compress_step": compress_step, "lambda_s": lambda_s,
                    "convert_op_name": list(convert_op_name), "ignore_op_name": list(ignore_op_name),
                    "fix_op_name": list(fix_op_name), **{k: opts[k] for k in _EXTRAS if k != "verbose"}}
    for _, layer in converted:
        layer.convert_options = call_options
    if not converted:
        raise ValueError(f"lrcc.model_convert_conv found nothing to convert in {type(model).__name__}: it has no "
                         f"{'nn.Conv2d/nn.Linear' if opts['include_linear'] else 'nn.Conv2d'} layer outside ignore_op_name/"
                         f"fix_op_name (such layers: {conv_names})")
    if mode != "lora_mode" and converted:
        _decompose_layers(converted, r, r_ratio, compress_step, lambda_s, cache_path, log)
    log(f"lrcc: mode={mode}: converted {len(converted)} conv layers "
        f"(ranks {sorted({layer.rank for _, layer in converted})}), left {len(ignored)} as they are "
        f"{ignored}, froze {len(fixed)} {fixed}")
    if mode != "lora_mode" and converted:
        support = sum(int(layer.sparse_mask.sum()) for _, layer in converted)
        total = sum(layer.sparse_mask.numel() for _, layer in converted)
        # sparse_weight is stored dense; only its support (fixed while training) can change the output
        log(f"lrcc: sparse support: {support:,d} of {total:,d} conv weights ({100.0 * support / max(total, 1):.2f}%)")
    if merge_parameter:
        model = merge(model)
    if opts["verbose"]:
        print_trainable_parameters(model)
    return model


def mark_only_lrcc_as_trainable(model):
    """Freeze everything except the adapter tensors that each converted layer's mode trains
    (BatchNorm, classifier, biases frozen too; BatchNorm running statistics still update in train mode:
    use ``svf.freeze_batchnorm`` for that). Returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.modules():
        if isinstance(layer, LOW_RANK_LAYERS):
            for name in TRAINABLE_BY_MODE[layer.mode]:
                getattr(layer, name).requires_grad_(True)
    return model


@torch.no_grad()
def _merged_conv(layer):
    if isinstance(layer, LowRankLinear):
        conv = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device=layer.weight.device,
                         dtype=layer.weight.dtype)
    else:
        conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
                         device=layer.weight.device, dtype=layer.weight.dtype)
    conv.weight.copy_(layer.effective_weight())
    if layer.bias is not None:
        conv.bias.copy_(layer.bias)
        conv.bias.requires_grad_(layer.bias.requires_grad)
    conv.train(layer.training)
    return conv


def merge(model):
    """A deep copy with every LowRankConv2d (LowRankLinear) replaced by a plain nn.Conv2d (nn.Linear) holding its
    effective weight (trainable, as a fresh layer is); ``model`` is not modified."""
    model = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LOW_RANK_LAYERS)]:
        model = _replace_module(model, name, _merged_conv(layer))
    return model
