"""What svf and lrcc share: parameter counts and the adapter-file convention (torch and stdlib only).

This file is identical in ``svf/`` and ``lrcc/`` so that each folder works when copied alone (neither
package imports the other); a test checks that the two copies stay byte-identical.

An adapter file is ``torch.save`` of a dict with ``format``, ``version``, ``fingerprint_scheme``, the options
that rebuild the adapted layers, the adapter tensors, and a fingerprint of the base weights of every
adapted layer. The fingerprint is the sha256 of each tensor's shape and of its values converted to float64:
the same pretrained weights give the same fingerprint on any device (CPU, CUDA) and in any dtype that holds
their values exactly (a float32 copy of bfloat16 weights), and any changed value changes it.
"""
import ctypes
import hashlib
import os
import tempfile

import torch
import torch.nn as nn

FINGERPRINT_SCHEME = "sha256-float64/1"


def count_parameters(module: nn.Module):
    """Return (trainable, total) parameter counts; shared tensors are counted once."""
    trainable = total = 0
    for p in module.parameters():  # .parameters() already de-duplicates shared tensors
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(module: nn.Module, file=None):
    """Print ``trainable params: N || all params: M || trainable%: P`` (peft's line) and return it."""
    trainable, total = count_parameters(module)
    pct = 100.0 * trainable / total if total else 0.0
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"
    print(line, file=file)
    return line


@torch.no_grad()
def weight_fingerprint(*tensors):
    """sha256 (hex) of the shapes and float64 values of ``tensors`` (``None`` entries allowed, e.g. no bias)."""
    digest = hashlib.sha256(FINGERPRINT_SCHEME.encode())
    for t in tensors:
        if t is None:
            digest.update(b"none;")
            continue
        t = t.detach()
        t = t.to("cpu", torch.float64 if t.is_floating_point() else t.dtype).contiguous()
        digest.update(f"{tuple(t.shape)};".encode())
        if t.numel():
            digest.update((ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr()))
    return digest.hexdigest()


def check_fingerprints(saved, current, source, hint):
    """Raise a ValueError naming the layers whose base weights differ: ``saved``/``current`` map layer
    names to fingerprints (``current`` only the layers to check); ``source`` names the adapter."""
    differ = [n for n, fp in current.items() if fp is None or saved.get(n) != fp]
    if differ:
        raise ValueError(f"{source}: layer {differ[0]!r}: the pretrained weight differs from the one the adapter "
                         f"was trained on ({len(differ)} of {len(current)} layers have different base weights: "
                         f"{differ[:5]}). {hint}")


def atomic_save(state, path):
    """torch.save ``state`` to a temp file in the same folder, then os.replace (no half-written files)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600: give the file the permissions open() would
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_adapter_file(path, formats, writer):
    """The dict saved at ``path`` (weights_only), checked to carry a ``format`` in ``formats``; ``writer``
    names the function that writes such files, for the error message."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated, not a torch.save file, pickled objects
        raise ValueError(f"{path} is not a readable adapter file ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") not in formats:
        raise ValueError(f"{path} is not a {formats[0]} file (written by {writer})")
    return state
