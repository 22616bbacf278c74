"""The singular values as an adapter (kilobytes) that carries what rebuilds it.

``state_dict(model)`` holds the singular values, the ``svf.resolver`` options that give the same SVD layers
with the same ranks (derived from the model, so a model resolved in pieces is described too), and the
fingerprint of the base weights of every SVD layer (``common.weight_fingerprint``: the pretrained weights,
taken when ``svf.resolver`` ran, equal on any device and dtype that holds the same values).
``load_state_dict`` loads it into a model resolved from the same weights, or resolves a plain model itself
with the saved options; ``save_adapter``/``load_adapter`` do the same through a file.
"""
import collections

import torch
import torch.nn as nn

from .attention import _PROJECTIONS, SVD_MultiheadAttention
from .common import FINGERPRINT_SCHEME, atomic_save, check_fingerprints, read_adapter_file, weight_fingerprint
from .layers import SVDLayer
from .resolver import _base_class, _unsupported_reason, resolver
from .tuning import singular_value_parameters

__all__ = ["state_dict", "load_state_dict", "save_adapter", "load_adapter"]

FORMAT, VERSION = "svf-adapter", 1
OLD_FORMAT = "svf.singular_values/1"  # before the options and the sha256 fingerprint were saved


def _svd_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, SVDLayer)}


def _site(model, name):
    """Where the resolver converted SVD layer ``name``: the attention module for its q/k/v projections."""
    parent, _, child = name.rpartition(".")
    if child in _PROJECTIONS.values() and isinstance(model.get_submodule(parent), SVD_MultiheadAttention):
        return parent
    return name


def _under(name, prefix):
    """``name`` is ``prefix`` or inside it (dotted module names; "" is the root)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _all_kernel(module, k):  # what skip_1x1 / skip_3x3 test
    return isinstance(module, nn.modules.conv._ConvNd) and all(x == k for x in module.kernel_size)


def resolver_options(model):
    """The ``svf.resolver`` keyword arguments that turn the plain model into ``model``'s SVD layers with the
    same ranks: the most common ratio as ``global_low_rank_ratio``, the others per layer, and the layers
    left plain as ``skip_1x1``/``skip_3x3`` where that describes them, else as ``excluded_layers``.
    None when an SVD layer was not made by ``svf.resolver``."""
    layers = _svd_layers(model)
    if any(m.low_rank_ratio is None for m in layers.values()):
        return None  # SVD layers built by hand, not by svf.resolver: nothing to rebuild them from
    sites = {_site(model, n): m.low_rank_ratio for n, m in layers.items()}
    plain = {n: m for n, m in model.named_modules()
             if not any(_under(n, s) for s in layers) and _unsupported_reason(m) is None
             and (type(m) is nn.MultiheadAttention or _base_class(m) is not None)}
    options = {"global_low_rank_ratio": collections.Counter(sites.values()).most_common(1)[0][0]}
    kernels = {_kernel_of(layers.get(s)) for s in sites}  # None for linear and attention sites
    for flag, k in (("skip_1x1", 1), ("skip_3x3", 3)):
        left = [n for n, m in plain.items() if _all_kernel(m, k)]
        options[flag] = bool(left) and k not in kernels
        if options[flag]:
            plain = {n: m for n, m in plain.items() if n not in left}
    excluded = set()
    for name in plain:  # the widest subtree that holds no SVD layer, so the list stays short
        parts = name.split(".")
        excluded.add(next(prefix for prefix in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                          if not any(_under(s, prefix) for s in sites)))
    options["excluded_layers"] = sorted(excluded)
    options["customized_layers_low_rank_ratio"] = {s: r for s, r in sites.items()
                                                   if r != options["global_low_rank_ratio"]}
    return options


def _kernel_of(layer):
    """k if ``layer`` is an SVD conv layer made from a conv whose kernel is all k, else None."""
    kernel = getattr(getattr(layer, "conv_V", None), "kernel_size", ())
    return kernel[0] if kernel and len(set(kernel)) == 1 else None


def _plain_fingerprint(model, name):
    """The fingerprint that ``svf.resolver`` will give SVD layer ``name`` of the plain ``model`` (None when
    ``model`` has no such layer: the layer check after resolving reports it)."""
    parent, _, child = name.rpartition(".")
    try:
        owner = model.get_submodule(parent)
        if type(owner) is nn.MultiheadAttention and child in _PROJECTIONS.values():
            weight = {v: k for k, v in _PROJECTIONS.items()}[child]
            return weight_fingerprint(owner._parameters[weight], None)
        layer = model.get_submodule(name)
    except (AttributeError, KeyError):
        return None
    return weight_fingerprint(layer.weight, layer.bias) if _base_class(layer) is not None else None


def state_dict(model):
    """The singular values of ``model`` with the resolver options and base-weight fingerprints (kilobytes)."""
    layers = _svd_layers(model)
    if not layers:
        raise ValueError("svf.state_dict: the model has no SVD layer (was it passed through svf.resolver?)")
    return {"format": FORMAT, "version": VERSION, "fingerprint_scheme": FINGERPRINT_SCHEME,
            "resolver_options": resolver_options(model),
            "singular_values": {k: v.detach().to("cpu").clone() for k, v in singular_value_parameters(model).items()},
            "fingerprints": {name: m.base_fingerprint for name, m in layers.items()}}


@torch.no_grad()
def load_state_dict(model, state, check_fingerprint=True, source="svf.load_state_dict"):
    """Load singular values saved by ``svf.state_dict`` and return the model that holds them.

    ``model`` resolved from the same pretrained weights: loaded in place. A plain model (no SVD layer):
    resolved first with the saved ``resolver_options``; the new model is returned. Missing/extra layers,
    other ranks and (unless ``check_fingerprint=False``) other base weights are errors that name the layer."""
    if isinstance(state, dict) and state.get("format") == OLD_FORMAT:
        if check_fingerprint or not _svd_layers(model):
            raise ValueError(f"{source}: this file was written by an older svf ({OLD_FORMAT}) that saved neither "
                             "the resolver options nor a checkable fingerprint; resolve the model as you did then, "
                             "load it with check_fingerprint=False and save it again with svf.state_dict")
    elif not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{source}: not a singular-value adapter written by svf.state_dict (expected format "
                         f"{FORMAT!r})")
    elif state.get("fingerprint_scheme") != FINGERPRINT_SCHEME:
        raise ValueError(f"{source}: fingerprint scheme {state.get('fingerprint_scheme')!r} is not this svf's "
                         f"{FINGERPRINT_SCHEME!r}; load it with the svf version that wrote it")
    options = state.get("resolver_options")
    if not _svd_layers(model):
        if options is None:
            raise ValueError(f"{source}: the file carries no resolver options (its SVD layers were not made by "
                             "svf.resolver); resolve the model yourself and load into the resolved model")
        if check_fingerprint:  # before the SVDs: a wrong base fails fast, naming its layer
            plain = {n: _plain_fingerprint(model, n) for n in state["fingerprints"]}
            check_fingerprints(state["fingerprints"], {n: fp for n, fp in plain.items() if fp is not None}, source,
                               "Load the same pretrained weights, or pass check_fingerprint=False if you know better.")
        model = resolver(model, **options)
    hint = (f"Resolve the model with the saved options, svf.resolver(model, **{options}), or pass the plain "
            "model, which svf.load_state_dict resolves itself" if options else
            "Resolve the model with the same resolver options as when the file was saved.")
    params = singular_value_parameters(model)
    saved = state["singular_values"]
    missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or extra:
        raise KeyError(f"{source}: layers do not match; missing from the file: {missing}; "
                       f"in the file but not in the model: {extra}. {hint}")
    bad_shape = [k for k in params if params[k].shape != saved[k].shape]
    if bad_shape:
        raise ValueError(f"{source}: rank differs for {bad_shape}. {hint}")
    if check_fingerprint:
        current = {name: m.base_fingerprint for name, m in _svd_layers(model).items()}
        not_resolved = [n for n, fp in current.items() if fp is None]
        if not_resolved:
            raise ValueError(f"{source}: SVD layer {not_resolved[0]!r} was not made by svf.resolver, so its base "
                             "weights are unknown; resolve the pretrained model with svf.resolver, or pass "
                             "check_fingerprint=False if you know they are the same")
        check_fingerprints(state["fingerprints"], current, source,
                           "Resolve the model from the same pretrained weights, or pass check_fingerprint=False "
                           "if you know better.")
    for k, p in params.items():
        p.copy_(saved[k])
    return model


def save_adapter(model, path):
    """Atomically write ``svf.state_dict(model)`` to ``path``."""
    atomic_save(state_dict(model), path)


def load_adapter(model, path, check_fingerprint=True):
    """``svf.load_state_dict`` from a file written by ``svf.save_adapter`` (or ``torch.save(svf.state_dict)``);
    returns the model holding the singular values (a new, resolved one when ``model`` is plain)."""
    state = read_adapter_file(path, (FORMAT, OLD_FORMAT), "svf.save_adapter")
    return load_state_dict(model, state, check_fingerprint, source=path)
