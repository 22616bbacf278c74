"""Checkpoints of the released SVF code, loaded into a model resolved by this ``svf``.

The released code stores each SVD layer as ``conv_U.weight`` / ``conv_V.weight`` / ``vector_S`` (``conv_U.bias``
when the layer had a bias) under the layer's name, like ours, but with ranks rounded down to multiples of 4: the
3->64 stem conv of a ResNet keeps 24 of its 27 singular values, so ``model.load_state_dict`` fails with a size
mismatch. ``convert_released_state_dict`` folds every released SVD layer into its plain weight ``U·diag(S)·Vᵀ``
(float64) and resolves that weight again with ``svf.resolver`` at the model layer's own ratio: the model computes
exactly the released (truncated) function; a rank-24 stem becomes rank 27 with three singular values ~0. A released
SVD layer whose model layer is plain (a merged model) is folded into that layer's ``weight``. Every other key is
passed on unchanged. ``load_released_state_dict`` then loads the result.
"""
import torch
import torch.nn as nn

from .layers import SVDLayer
from .resolver import _base_class, _resolved

__all__ = ["convert_released_state_dict", "load_released_state_dict"]


def _released_layers(state_dict):
    """``{layer name: {part: tensor}}`` of the SVD layers in a released state dict (found by their ``vector_S``)."""
    layers = {}
    for key in state_dict:
        if key == "vector_S" or key.endswith(".vector_S"):
            name = key[:-len("vector_S")].rstrip(".")
            prefix = name + "." if name else ""
            kind = "fc" if prefix + "fc_U.weight" in state_dict else "conv"
            parts = {}
            for part in (f"{kind}_U.weight", f"{kind}_U.bias", f"{kind}_V.weight", "vector_S"):
                if prefix + part in state_dict:
                    parts[part.replace(kind + "_", "")] = (prefix + part, state_dict[prefix + part])
            if "U.weight" not in parts or "V.weight" not in parts:
                raise ValueError(f"released SVD layer {name or '<root>'!r} is incomplete: it has "
                                 f"{sorted(k for k, _ in parts.values())}, needs {kind}_U.weight, {kind}_V.weight "
                                 "and vector_S")
            layers[name] = parts
    return layers


@torch.no_grad()
def _fold(name, parts, plain):
    """Write the released layer ``parts`` (U·diag(S)·Vᵀ, float64) into the plain layer ``plain``."""
    u, v, s = parts["U.weight"][1], parts["V.weight"][1], parts["vector_S"][1]
    r = s.numel()
    if getattr(plain, "groups", 1) != 1:
        raise ValueError(f"released SVD layer {name!r}: grouped convolutions (groups={plain.groups}) are not "
                         "factorised by the released code (grouped V, dense U); they cannot be folded back")
    if u.numel() != plain.weight.shape[0] * r or v.numel() % r:
        raise ValueError(f"released SVD layer {name!r}: U {tuple(u.shape)}, S {tuple(s.shape)} and V "
                         f"{tuple(v.shape)} do not fit together")
    weight = (u.double().reshape(-1, r) * s.double().reshape(1, r)) @ v.double().reshape(r, -1)
    if weight.numel() != plain.weight.numel() or ("U.bias" in parts) != (plain.bias is not None):
        raise ValueError(f"released SVD layer {name!r} (U {tuple(u.shape)}, V {tuple(v.shape)}, bias: "
                         f"{'U.bias' in parts}) does not fold into this model's layer of weight "
                         f"{tuple(plain.weight.shape)} (bias: {plain.bias is not None})")
    plain.weight.copy_(weight.reshape(plain.weight.shape))
    if plain.bias is not None:
        plain.bias.copy_(parts["U.bias"][1])
    return plain


def _convert(model, state_dict):
    """(converted state dict, {layer: (released rank, rank here)} of the truncated ones, {layer: new SVD layer})."""
    out = dict(state_dict)
    modules = dict(model.named_modules())
    truncated, rebuilt = {}, {}
    for name, parts in _released_layers(state_dict).items():
        layer = modules.get(name)
        prefix = name + "." if name else ""
        for key, _ in parts.values():
            del out[key]
        if isinstance(layer, SVDLayer):
            plain = _fold(name, parts, layer.to_plain())
            base = _base_class(plain)
            new = _resolved(plain, base, layer.low_rank_ratio or 1.0)
            if new.rank != layer.rank:
                raise ValueError(f"released SVD layer {name!r}: resolved again it has rank {new.rank}, this model's "
                                 f"layer {layer.rank}; resolve the model with global_low_rank_ratio=1.0")
            released_rank = parts["vector_S"][1].numel()
            if released_rank < layer.rank:
                truncated[name] = (released_rank, layer.rank)
            out.update({prefix + k: v for k, v in new.state_dict().items()})
            rebuilt[name] = new
        elif layer is not None and _base_class(layer) is not None:  # a plain (merged) layer takes the product
            plain = _fold(name, parts, _base_class(layer)(*_plain_args(layer), dtype=layer.weight.dtype))
            out.update({prefix + k: v for k, v in plain.state_dict().items()})
        else:
            raise ValueError(f"released SVD layer {name or '<root>'!r} ({parts['vector_S'][0]}): this model has "
                             f"{'no such module' if layer is None else 'a ' + type(layer).__name__} there; build the "
                             "model as the released code does and resolve it with svf.resolver (and mind a "
                             "'module.' prefix: DataParallel adds it to the names)")
    return out, truncated, rebuilt


def _plain_args(layer):
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, layer.bias is not None
    return (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
            layer.groups, layer.bias is not None, layer.padding_mode)


def convert_released_state_dict(model, state_dict):
    """A released-SVF-format ``state_dict`` converted for ``model`` (see the module docstring). Returns
    ``(state_dict, truncated)``: the dict to pass to ``model.load_state_dict``, and ``{layer: (released rank,
    rank here)}`` for each layer whose rank the released code had rounded down."""
    out, truncated, _ = _convert(model, state_dict)
    return out, truncated


def _examples(keys, n=3):
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _check_fits(model, out, had_released):
    """One-line ValueError when the converted state dict ``out`` does not fit ``model`` key for key (instead of
    torch's kilobytes of missing / unexpected / size-mismatch lists): a plain model's state dict given to a resolved
    model, or a state dict of another architecture."""
    own = model.state_dict()
    missing = [k for k in own if k not in out and not k.endswith("num_batches_tracked")]  # torch adds those
    unexpected = [k for k in out if k not in own]
    wrong = [f"{k} {tuple(out[k].shape)} vs {tuple(own[k].shape)}" for k in out
             if k in own and hasattr(out[k], "shape") and out[k].shape != own[k].shape]
    if not (missing or unexpected or wrong):
        return
    svd = {name: m for name, m in model.named_modules() if isinstance(m, SVDLayer)}
    if svd and not had_released:
        def plain_shape(layer):  # the weight of the plain layer it stands for: (out, in / groups, *kernel)
            v, u = layer._factors()
            return (u.weight.shape[0],) + tuple(v.weight.shape[1:])
        plain = [n for n, m in svd.items() if (f"{n}.weight" if n else "weight") in out
                 and tuple(out[f"{n}.weight" if n else "weight"].shape) == plain_shape(m)]
        if 2 * len(plain) >= len(svd):
            examples = _examples([f"{n}.weight" for n in plain])
            raise ValueError(f"no released SVD layers in this state dict (no key ends in vector_S), but the model has "
                             f"{len(svd)} SVD layers and the state dict holds their plain weights ({examples}): it "
                             "is a plain model's state dict: load it into the model before svf.resolver / "
                             "svf.prepare (model.load_state_dict), then resolve")
    parts = ((missing, f"of the model's {len(own)} keys missing", 3),
             (unexpected, f"of its {len(out)} keys not in the model", 3),
             (wrong, "of another shape (file vs model)", 2))
    found = [f"{len(keys)} {what} ({_examples(keys, n)})" for keys, what, n in parts if keys]
    raise ValueError(f"a state dict of another architecture: {', '.join(found)}; build the model the checkpoint was "
                     "saved from (same architecture and options), resolve it, then load")


def load_released_state_dict(model, state_dict, strict=True):
    """Load a checkpoint of the released SVF code into ``model`` (resolved by this ``svf``; plain layers take the
    folded weight): each released SVD layer is folded and resolved again exactly, the rest loads as it is. The
    model's SVD layers then remember the loaded weights as their base (``svf.save_adapter`` fingerprints them).
    Returns what ``model.load_state_dict`` returns (missing and unexpected keys when ``strict=False``). With
    ``strict``, a state dict that does not fit is one line saying what it is: a plain (non-SVF) model's, to load
    before resolving, or another architecture's; nothing is loaded then."""
    out, _, rebuilt = _convert(model, state_dict)
    if strict:
        _check_fits(model, out, had_released=bool(_released_layers(state_dict)))
    result = model.load_state_dict(out, strict=strict)
    for name, new in rebuilt.items():
        model.get_submodule(name).base_fingerprint = new.base_fingerprint
    return result
