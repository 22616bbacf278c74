"""An lrcc adapter: everything that is not the base weights, with what rebuilds it and a base fingerprint.

``state_dict(model)`` holds each converted layer's factors (and bias, sparse support, residual), every
trainable parameter elsewhere (BatchNorm, classifier, biases), every buffer (BatchNorm running statistics),
each converted layer's options (geometry, mode, rank, lora_alpha, ...), the ``model_convert_conv`` options
that made them, and the fingerprint of each converted layer's pretrained weight (``common.weight_fingerprint``,
the same scheme as svf's). ``load_state_dict`` loads it into a converted model, or into the plain pretrained
model (merged into its convs, or rebuilt as converted layers with ``merge=False``): no option to repeat.
``save_adapter``/``load_adapter`` do the same through a file (``save_lora_state_dict``/``load_lora_state_dict``
are the seed's names for them).
"""
import copy
import ctypes
import hashlib

import torch
import torch.nn as nn

from .common import FINGERPRINT_SCHEME, atomic_save, check_fingerprints, read_adapter_file, weight_fingerprint
from .convert import LOW_RANK_LAYERS, low_rank_layer, _replace_module

__all__ = ["state_dict", "load_state_dict", "save_adapter", "load_adapter", "save_lora_state_dict",
           "load_lora_state_dict"]

FORMAT, VERSION = "lrcc-adapter", 2  # version 1: no options, base_sha256 of the raw bytes


def state_dict(model):
    """The adapter of ``model`` as a dict (see the module doc); the base weights are left out."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LOW_RANK_LAYERS)}
    if not layers:
        raise ValueError("lrcc: the model has no lrcc layers; convert it with model_convert_conv first "
                         "(or save model.state_dict() for a plain model)")
    state = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers:
            if leaf == "weight":
                continue  # the base weight: identified by its fingerprint instead
        elif key in params and not params[key].requires_grad:
            continue  # a frozen parameter outside converted layers is part of the base weights
        state[key] = tensor.detach().to("cpu").clone()
    calls = [m.convert_options for m in layers.values()]
    return {"format": FORMAT, "version": VERSION, "fingerprint_scheme": FINGERPRINT_SCHEME,
            "options": calls[0] if all(c == calls[0] for c in calls) else None,  # None: several calls
            "layers": {n: {**m.options(), "base_fingerprint": weight_fingerprint(m.weight)} for n, m in layers.items()},
            "state": state}


def _raw_sha256(tensor):
    """Version 1 files' fingerprint (sha256 of dtype, shape and raw bytes), read for compatibility only."""
    t = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        digest.update(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))
    return digest.hexdigest()


def _option_differences(saved, layer_options):
    return [f"{k}: saved {saved.get(k)!r}, model {v!r}" for k, v in layer_options.items() if saved.get(k) != v]


@torch.no_grad()
def load_state_dict(model, saved, merge=True, check_fingerprint=True, source="lrcc.load_state_dict"):
    """Load an adapter from ``state_dict`` into ``model`` and return the model.

    Converted layers must have the saved options. A plain ``nn.Conv2d`` (``nn.Linear``) at a saved layer's name
    receives the merged effective weight (``merge=True``) or is replaced by the saved lrcc layer (``merge=False``,
    to train on). Each layer's pretrained weight must be the one the adapter was trained on (unless
    ``check_fingerprint=False``) and every saved tensor must find a home; otherwise a ValueError/KeyError
    names the layer or key."""
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or saved.get("version") not in (1, VERSION):
        raise ValueError(f"{source} is not an lrcc adapter (written by lrcc.save_adapter / state_dict)")
    if saved["version"] == VERSION and saved.get("fingerprint_scheme") != FINGERPRINT_SCHEME:
        raise ValueError(f"{source}: fingerprint scheme {saved.get('fingerprint_scheme')!r} is not this lrcc's "
                         f"{FINGERPRINT_SCHEME!r}; load it with the lrcc version that wrote it")
    modules = dict(model.named_modules())
    lrcc_in_model = {n for n, m in modules.items() if isinstance(m, LOW_RANK_LAYERS)}
    missing = sorted(lrcc_in_model - set(saved["layers"]))
    if missing:
        raise KeyError(f"{source} has no adapter for the model's lrcc layers {missing}")
    hint = "; convert the pretrained model, or pass it unconverted" + \
        (f" (the adapter was made by model_convert_conv(model, **{saved['options']}))" if saved.get("options") else "")
    for name, options in saved["layers"].items():
        module = modules.get(name)
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise KeyError(f"{source} holds an adapter for layer {name!r}, but the model has "
                           f"{type(module).__name__ if module is not None else 'no module'} there")
    if check_fingerprint:
        if saved["version"] == 1:
            current = {n: _raw_sha256(modules[n].weight) for n in saved["layers"]}
            fingerprints = {n: o["base_sha256"] for n, o in saved["layers"].items()}
        else:
            current = {n: weight_fingerprint(modules[n].weight) for n in saved["layers"]}
            fingerprints = {n: o["base_fingerprint"] for n, o in saved["layers"].items()}
        check_fingerprints(fingerprints, current, source, "Load the same base "
                           "weights first, or pass check_fingerprint=False if you know better.")
    state = dict(saved["state"])
    for name, options in saved["layers"].items():
        module = modules[name]
        target = module
        if not isinstance(module, LOW_RANK_LAYERS):  # a plain layer: rebuild the lrcc layer, then merge into it
            lrcc_keys = {"mode", "rank", "lora_alpha", "lora_dropout", "keep_residual"}
            with torch.random.fork_rng(devices=[]):  # LoRA's init must not move the caller's RNG
                target = low_rank_layer(copy.deepcopy(module), **{k: options[k] for k in lrcc_keys})
            target.convert_options = saved.get("options")
        diffs = _option_differences(options, target.options())
        if diffs:
            raise ValueError(f"layer {name!r} does not match the adapter in {source}: {'; '.join(diffs)}{hint}")
        for key, tensor in target.state_dict().items():
            if key == "weight":
                continue
            full_key = f"{name}.{key}"
            if full_key not in state:
                raise KeyError(f"{source} lacks {full_key!r}")
            tensor.copy_(state.pop(full_key))
        if target is not module:
            if merge:
                module.weight.copy_(target.effective_weight())
                if module.bias is not None:
                    module.bias.copy_(target.bias)
            else:
                target.weight = module.weight  # share the caller's pretrained weight, as model_convert_conv does
                target.weight.requires_grad_(False)
                model = _replace_module(model, name, target)
    model_state = model.state_dict()
    for key, tensor in state.items():  # BatchNorm, classifier, biases outside converted layers
        if key not in model_state:
            raise KeyError(f"{source} holds {key!r}, which the model does not have")
        if model_state[key].shape != tensor.shape:
            raise ValueError(f"{key!r}: shape {tuple(tensor.shape)} in {source}, "
                             f"{tuple(model_state[key].shape)} in the model")
        model_state[key].copy_(tensor)
    return model


def save_adapter(model, path):
    """Atomically write ``state_dict(model)`` to ``path``."""
    atomic_save(state_dict(model), path)


def load_adapter(model, path, merge=True, check_fingerprint=True):
    """``load_state_dict`` from a file written by ``save_adapter``; returns the model."""
    return load_state_dict(model, read_adapter_file(path, (FORMAT,), "lrcc.save_adapter"), merge, check_fingerprint,
                           source=path)


save_lora_state_dict = save_adapter  # the seed's names
load_lora_state_dict = load_adapter
