"""Checkpoints: atomic writes, safe loads, and which file a run's evaluation uses.

A run's folder (`cfg.exp_dir`) holds
- `last.pth`: model, optimizer and AMP scaler state, epoch and iteration reached (written after every
  epoch, and on Ctrl-C / SIGTERM mid-epoch); `--resume` continues from it;
- `best.pth`: the model of the epoch with the highest validation mIoU, with that epoch's metrics.
Every write goes to a temporary file in the same folder that is then `os.replace`d over the target,
so a crash never leaves a half-written checkpoint (the temporaries a kill -9 leaves behind are removed
when the run starts again), and is refused when a weight is NaN, infinite or beyond float32's range: a diverged model never
replaces a good checkpoint. Loads use `torch.load(weights_only=True)`: checkpoints hold only tensors
and plain values; a file that is empty, truncated or not a checkpoint is a one-line error naming it.
"""
from __future__ import annotations

import os
import pickle

import torch
import torch.nn as nn

from dataset.files import atomic_path
from engine.faults import fault_point

LAST = "last.pth"
BEST = "best.pth"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


class NonFiniteWeights(RuntimeError):
    """A diverged model state (NaN/inf, or weights too large for float32 arithmetic) was about to be written."""


FLOAT32_MAX = torch.finfo(torch.float32).max


def diverged_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or an infinity, or whose squared
    norm overflows float32 (|w|^2 > 3.4e38: weight decay and gradient norms of such a tensor are inf; a
    diverged run reaches that with a finite loss, because BatchNorm hides the scale of the weights)."""
    return [k for k, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point()
            and not (bool(torch.isfinite(v).all()) and float(v.double().pow(2).sum()) <= FLOAT32_MAX)]


def atomic_save(obj, path: str):
    """torch.save to `path` through a temporary file in the same folder, then os.replace.
    Refuses (NonFiniteWeights, nothing written) when obj['model'] has diverged (see diverged_tensors)."""
    bad = diverged_tensors(obj["model"]) if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else []
    if bad:
        raise NonFiniteWeights(f"not writing {path}: the model diverged ({len(bad)} tensors hold NaN/inf or "
                               f"values beyond float32's range, e.g. {', '.join(bad[:3])})")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
        fault_point(os.path.basename(path), obj.get("epoch"), obj.get("iteration", 0))


def torch_load(path: str, what: str = "checkpoint"):
    """torch.load(path, weights_only=True) on the CPU; a file that cannot be read is a one-line ValueError
    that names it and says what it is not (empty, truncated, not a torch.save file, pickled objects)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises EOFError, RuntimeError, KeyError, UnpicklingError, ...
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
        if size == 0:
            why = "is empty (0 bytes), not a checkpoint (an interrupted copy or save?)"
        elif isinstance(exc, pickle.UnpicklingError):
            why = ("holds pickled Python objects, not only tensors and plain values (e.g. a whole model saved "
                   "with torch.save(model)); save model.state_dict() instead")
        elif head.startswith(b"PK\x03\x04"):
            why = f"is a truncated or corrupt torch.save archive ({size} bytes); copy it again"
        else:
            why = f"is not a PyTorch checkpoint (torch.load cannot read it; it starts with {head!r})"
        raise ValueError(f"{what} file '{path}' {why}") from None


def load_checkpoint(path: str, hint: str = "", what: str = "checkpoint") -> dict:
    """torch_load with a clear error for a missing file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} '{path}' not found" + (f"; {hint}" if hint else ""))
    return torch_load(path, what)


RESUME_KEYS = ("model", "optimizer", "epoch", "iteration", "best_miou", "best_epoch", "config")


def load_resume_checkpoint(path: str) -> dict:
    """A run's last.pth for --resume; a file without what resuming needs is a one-line error."""
    ckpt = load_checkpoint(path, hint="nothing to resume; start without --resume", what="resume checkpoint")
    missing = [k for k in RESUME_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"resume checkpoint '{path}' is not a training checkpoint of this project "
                         f"(no {', '.join(missing)}); --resume needs the last.pth that train.py writes")
    return ckpt


def config_differences(saved: dict, current: dict) -> dict:
    """{key: (saved value, current value)} of the config keys whose values differ (exp_dir aside)."""
    return {k: (saved.get(k), v) for k, v in current.items() if k != "exp_dir" and saved.get(k) != v}


def describe_differences(changed: dict) -> str:
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())


def state_dict_from(obj, path: str, what: str = "weights") -> dict:
    """The tensor dict stored in a loaded file: a raw state dict, or the ``model``/``state_dict`` entry of a
    checkpoint dict; a DistributedDataParallel ``module.`` prefix on every key is removed."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{what} file {path!r} holds no state dict (expected a dict of tensors, or a "
                         "checkpoint dict with a 'model' or 'state_dict' entry)")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _listed(keys: list, label: str) -> str:
    return f"{len(keys)} {label} {keys[:20]}" + (" ..." if len(keys) > 20 else "")


def load_state_dict_strict(module: nn.Module, state: dict, path: str, what: str = "weights",
                           hint: str = "check that the file is for this architecture/backbone (and was saved "
                                       "without SVF)") -> nn.Module:
    """``module.load_state_dict(state)`` where every key must match in name and shape; BatchNorm's
    ``num_batches_tracked`` may be absent (old files predate it). Checked before loading, so a mismatch leaves
    the module untouched; the error lists the keys, names ``path`` and ends with ``hint``."""
    own = module.state_dict()
    optional = {k for k in own if k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(state) - optional)
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in sorted(state) if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        found = [_listed(keys, label) for keys, label in
                 ((missing, "missing keys"), (unexpected, "unexpected keys"), (wrong_shape, "of another shape"))
                 if keys]
        raise ValueError(f"{what} file {path!r} does not match the model: {'; '.join(found)}; {hint}")
    full = dict(state)
    for k in optional - set(state):
        full[k] = own[k]
    module.load_state_dict(full, strict=True)
    return module


def load_model_weights(model: nn.Module, path: str, hint: str = "", config: dict = None) -> dict:
    """Strictly load a checkpoint's model weights; return the whole checkpoint dict. With `config` (the
    config the model was built from), a mismatch names the keys that differ from the checkpoint's config."""
    return load_model_state(model, load_checkpoint(path, hint), path, config)


def load_model_state(model: nn.Module, obj, path: str, config: dict = None) -> dict:
    """load_model_weights for a checkpoint already read from `path` (the file is not read again)."""
    saved = obj.get("config") if isinstance(obj, dict) else None
    changed = config_differences(saved, config) if config is not None and isinstance(saved, dict) else {}
    if changed:
        why = "the config differs from the one saved in the checkpoint in " + describe_differences(changed)
    else:
        why = "check arch/backbone/svf/reduce_dim/shot against the run that wrote it"
    load_state_dict_strict(unwrap(model), state_dict_from(obj, path, "checkpoint"), path, "checkpoint", why)
    return obj if isinstance(obj, dict) else {}


def evaluation_checkpoint(exp_dir: str, checkpoint_select: str) -> str:
    """The file test.py evaluates for a run: best.pth or last.pth per the selection rule."""
    name = BEST if checkpoint_select == "best" else LAST
    return os.path.join(exp_dir, name)
