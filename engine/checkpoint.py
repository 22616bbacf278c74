"""Checkpoints: atomic writes, safe loads, and which file a run's evaluation uses.

A run's folder (`cfg.exp_dir`) holds
- `last.pth`: model, optimizer and AMP scaler state, epoch and iteration reached (written after every
  epoch, and on Ctrl-C / SIGTERM mid-epoch); `--resume` continues from it;
- `best.pth`: the model of the epoch with the highest validation mIoU, with that epoch's metrics.
Every write goes to a temporary file in the same folder that is then `os.replace`d over the target,
so a crash never leaves a half-written checkpoint (the temporaries a kill -9 leaves behind are removed
when the run starts again), and is refused when a weight breaks the weight rule (NaN, infinite or beyond
WEIGHT_LIMIT): a diverged model never replaces a good checkpoint; a failed write (disk full, read-only folder) is
one line and leaves the previous file as it was. Every load for use checks the same rule. Loads use `torch.load(weights_only=True)`: checkpoints hold only tensors
and plain values; a file that is empty, truncated or not a checkpoint is a one-line error naming it.
"""
from __future__ import annotations

import errno
import json
import math
import os
import pickle
import shutil

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
    """A diverged model state (see bad_weights) was about to be written."""


# The weight rule, one place for every load and every write: a floating-point tensor of a model state is
# refused when it holds a NaN or an infinity, or a value beyond WEIGHT_LIMIT in magnitude (for BatchNorm's
# running_var, a variance, its square root is compared: a variance is a squared scale). Trained few-shot and
# ImageNet models hold weights and BatchNorm statistics of at most ~1e2-1e3 (conv weights < 10, singular values
# < 10, running means and standard deviations of normalised inputs' features < 1e3), so 1e6 leaves three orders
# of margin, while a diverged run passes it within an epoch (base_lr=1e3 reaches 9.3e12).
WEIGHT_LIMIT = 1e6


def bad_weights(state: dict) -> list[tuple[str, str]]:
    """(name, what is wrong) of every floating-point tensor of `state` that breaks the weight rule."""
    bad = []
    for k, v in state.items():
        if not (torch.is_tensor(v) and v.is_floating_point()) or v.numel() == 0:
            continue
        finite = torch.isfinite(v)
        if not bool(finite.all()):
            bad.append((k, f"{int((~finite).sum())} NaN/inf value(s)"))
            continue
        peak = float(v.detach().abs().max().double())
        scale = peak ** 0.5 if k.endswith("running_var") else peak
        if scale > WEIGHT_LIMIT:
            bad.append((k, f"{'running variance' if k.endswith('running_var') else 'magnitude'} {peak:.3g} "
                           f"beyond the limit of {WEIGHT_LIMIT:g}" + ("^2" if k.endswith("running_var") else "")))
    return bad


# The divergence rule on the loss: an epoch whose mean loss exceeds LOSS_DIVERGENCE_FACTOR x the lowest epoch mean
# loss of the run so far (at least LOSS_FLOOR) is diverged; with the weight rule it decides which checkpoints
# are "good": neither last.pth nor best.pth is written from a diverged epoch. A training loss that falls
# noisily moves by far less than 10x between epochs; one that diverged grows by orders of magnitude.
LOSS_DIVERGENCE_FACTOR = 10.0
LOSS_FLOOR = 0.01


def loss_diverged(mean_loss: float, lowest: float) -> bool:
    """Whether an epoch mean loss breaks the divergence rule, given the lowest epoch mean loss so far (inf: none)."""
    if not math.isfinite(mean_loss):
        return True
    return math.isfinite(lowest) and mean_loss > LOSS_DIVERGENCE_FACTOR * max(lowest, LOSS_FLOOR)


def diverged_tensors(state: dict) -> list[str]:
    """Names of the tensors of a state dict that break the weight rule (see WEIGHT_LIMIT)."""
    return [k for k, _ in bad_weights(state)]


def check_weights(state: dict, path: str, what: str = "weights") -> None:
    """One-line ValueError naming `path` and the first tensor that breaks the weight rule (NaN/inf, or beyond
    WEIGHT_LIMIT): such weights are never loaded for use (a NaN classifier scores mIoU 0 without a word)."""
    bad = bad_weights(state)
    if bad:
        (name, why), more = bad[0], len(bad) - 1
        raise ValueError(f"{what} file {path!r} holds unusable weights: tensor '{name}' has {why}"
                         + (f" (and {more} more tensor(s))" if more else "")
                         + "; the run that wrote it diverged or the file is damaged: use an earlier checkpoint")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only or unwritable folder); nothing was replaced."""

    def __str__(self):
        return self.strerror


class _FaultWriter:
    """The file torch.save writes through; each write is a fault point `<name>.write` (engine/faults.py), so the
    tests can make the disk fill up in the middle of a save."""

    def __init__(self, fh, where: str, epoch, iteration):
        self.fh, self.where, self.epoch, self.iteration = fh, where, epoch, iteration

    def write(self, data):
        fault_point(self.where, self.epoch, self.iteration)
        return self.fh.write(data)

    def flush(self):
        self.fh.flush()


def _os_error_behind(exc: BaseException):
    """The OSError that caused `exc` (torch.save turns a failed write into '[enforce fail at
    inline_container.cc] unexpected pos', with the OSError as its context), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def describe_write_error(path: str, err: OSError) -> str:
    """'cannot write PATH: <reason and what to do>' for an OSError of a write (ENOSPC, EDQUOT, EROFS, EACCES)."""
    return f"cannot write {path}: {write_error_reason(os.path.dirname(os.path.abspath(path)), err)}"


def write_error_reason(folder: str, err: OSError) -> str:
    """Why a write into `folder` failed and what to do (the disk is full / read-only / ...)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(folder).free / 2 ** 20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        why = f"the disk is full ({os.strerror(err.errno)}; {free} on {folder}); free some space"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = f"{os.strerror(err.errno)} ({folder} is read-only or not writable); choose another folder"
    else:
        why = f"{os.strerror(err.errno) if err.errno else err}"
    return why


def atomic_save(obj, path: str):
    """torch.save to `path` through a temporary file in the same folder, then os.replace.
    Refuses (NonFiniteWeights, nothing written) when obj['model'] breaks the weight rule (bad_weights); a write
    that fails (disk full, read-only folder) is a one-line CheckpointWriteError, and `path` is left as it was."""
    bad = diverged_tensors(obj["model"]) if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else []
    if bad:
        raise NonFiniteWeights(f"not writing {path}: the model diverged ({len(bad)} tensors hold NaN/inf or "
                               f"values beyond {WEIGHT_LIMIT:g}, e.g. {', '.join(bad[:3])})")
    name = os.path.basename(path)
    epoch, iteration = (obj.get("epoch"), obj.get("iteration", 0)) if isinstance(obj, dict) else (None, 0)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            torch.save(obj, _FaultWriter(fh, name + ".write", epoch, iteration))
            fh.flush()
            os.fsync(fh.fileno())
            fault_point(name, epoch, iteration)
    except Exception as exc:  # noqa: BLE001 - only an OSError behind it is translated
        err = _os_error_behind(exc)
        if err is None:
            raise
        raise CheckpointWriteError(err.errno, describe_write_error(path, err)) from None


def _looks_like_text(head: bytes) -> bool:
    """Whether the first bytes of a file are text (UTF-8 without NUL bytes), not a binary checkpoint."""
    if not head or b"\0" in head:
        return False
    for cut in range(4):  # the read may end inside a multi-byte character
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return False
    return all(ch.isprintable() or ch in "\t\r\n\f" for ch in text)


def torch_load(path: str, what: str = "checkpoint"):
    """torch.load(path, weights_only=True) on the CPU; a file that cannot be read is a one-line ValueError
    that names it and says what it is (empty, text, truncated, not a torch.save file, pickled objects)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises EOFError, RuntimeError, KeyError, UnpicklingError, ...
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(4096)
        zipped = head.startswith(b"PK\x03\x04")
        if size == 0:
            why = "is empty (0 bytes), not a checkpoint (an interrupted copy or save?)"
        elif _looks_like_text(head):
            first = head.decode("utf-8", "replace").strip().splitlines()[0][:60] if head.strip() else ""
            if first.startswith("version https://git-lfs"):
                kind = "a Git LFS pointer (fetch the file itself: git lfs pull)"
            elif first.lstrip().startswith("<"):
                kind = "HTML or XML (a web page saved instead of the file? download it again)"
            else:
                kind = "text (JSON, YAML, a note?)"
            why = (f"is a text file, not a checkpoint: it is {kind}; it starts with {first!r}. A checkpoint is the "
                   "binary file torch.save writes")
        elif isinstance(exc, pickle.UnpicklingError) and (zipped or head[:1] == b"\x80"):
            why = ("holds pickled Python objects, not only tensors and plain values (e.g. a whole model saved "
                   "with torch.save(model)); save model.state_dict() instead")
        elif zipped:
            why = f"is a truncated or corrupt torch.save archive ({size} bytes); copy it again"
        else:
            why = f"is not a PyTorch checkpoint (torch.load cannot read it; it starts with {head[:8]!r})"
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


def state_mismatch(own: dict, state: dict) -> tuple[list, list, list]:
    """(missing keys, unexpected keys, 'key: file (shape) vs model (shape)') of `state` against the model's state
    dict `own`; BatchNorm's num_batches_tracked may be absent."""
    optional = {k for k in own if k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(state) - optional)
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in sorted(state) if k in own and state[k].shape != own[k].shape]
    return missing, unexpected, wrong_shape


def load_state_dict_strict(module: nn.Module, state: dict, path: str, what: str = "weights",
                           hint: str = "check that the file is for this architecture/backbone (and was saved "
                                       "without SVF)") -> nn.Module:
    """``module.load_state_dict(state)`` where every key must match in name and shape; BatchNorm's
    ``num_batches_tracked`` may be absent (old files predate it). Checked before loading, so a mismatch leaves
    the module untouched; the error lists the keys, names ``path`` and ends with ``hint``. Weights that break
    the weight rule (check_weights: NaN/inf, or beyond WEIGHT_LIMIT) are refused the same way: every load
    for use (pretrained, base_learner, --weights, --resume, released checkpoints) comes through here."""
    own = module.state_dict()
    optional = {k for k in own if k.endswith("num_batches_tracked")}
    missing, unexpected, wrong_shape = state_mismatch(own, state)
    if missing or unexpected or wrong_shape:
        found = [_listed(keys, label) for keys, label in
                 ((missing, "missing keys"), (unexpected, "unexpected keys"), (wrong_shape, "of another shape"))
                 if keys]
        raise ValueError(f"{what} file {path!r} does not match the model: {'; '.join(found)}; {hint}")
    check_weights(state, path, what)
    full = dict(state)
    for k in optional - set(state):
        full[k] = own[k]
    module.load_state_dict(full, strict=True)
    return module


def load_model_weights(model: nn.Module, path: str, hint: str = "", config: dict = None) -> dict:
    """Strictly load a checkpoint's model weights; return the whole checkpoint dict. With `config` (the
    config the model was built from), a mismatch names the keys that differ from the checkpoint's config."""
    return load_model_state(model, load_checkpoint(path, hint), path, config)


def _as_override(value) -> str:
    """A config value as it is written on the command line (key=value): true, null, [1,2,3], text."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def trained_with(saved: dict, config: dict) -> str:
    """'it was trained with finetune=bn (this config: finetune=svf): pass finetune=bn' for the config keys that shape
    the model's state dict (model.finetune.state_config_keys) where the checkpoint's saved config differs from
    `config`; '' when none does."""
    from common.config import finetune_method
    from model.finetune import state_config_keys

    def value(values, key):
        return finetune_method(values) if key == "finetune" else values.get(key)
    keys = dict.fromkeys(state_config_keys(saved) + state_config_keys(config))
    differ = [k for k in keys if (k in saved or k == "finetune") and value(saved, k) != value(config, k)]
    if not differ:
        return ""
    was = [f"{k}={_as_override(value(saved, k))}" for k in differ]
    now = [f"{k}={_as_override(value(config, k))}" for k in differ]
    return f"it was trained with {', '.join(was)} (this config: {', '.join(now)}): pass {' '.join(was)}"


def load_model_state(model: nn.Module, obj, path: str, config: dict = None) -> dict:
    """load_model_weights for a checkpoint already read from `path` (the file is not read again). With `config`
    (the config the model was built from) and a checkpoint that saved its own, a mismatch names the keys that
    shape the model and differ (trained_with: 'pass finetune=bn'), else every key that differs."""
    saved = obj.get("config") if isinstance(obj, dict) else None
    changed = config_differences(saved, config) if config is not None and isinstance(saved, dict) else {}
    state = state_dict_from(obj, path, "checkpoint")
    hint = trained_with(saved, config) if changed else ""
    if hint:  # the model keys of the config differ: that is the whole story, told first and short
        mismatch = state_mismatch(unwrap(model).state_dict(), state)
        if any(mismatch):
            n = sum(map(len, mismatch))
            raise ValueError(f"checkpoint file {path!r} does not fit this model: {hint} ({n} tensor name(s) or "
                             f"shape(s) differ, e.g. {next(keys for keys in mismatch if keys)[0]})")
    if changed:
        why = "the config differs from the one saved in the checkpoint in " + describe_differences(changed)
    else:
        why = "check arch/backbone/svf/reduce_dim/shot against the run that wrote it"
    load_state_dict_strict(unwrap(model), state, path, "checkpoint", why)
    return obj if isinstance(obj, dict) else {}


def evaluation_checkpoint(exp_dir: str, checkpoint_select: str) -> str:
    """The file test.py evaluates for a run: best.pth or last.pth per the selection rule."""
    name = BEST if checkpoint_select == "best" else LAST
    return os.path.join(exp_dir, name)


def load_weights(net: nn.Module, path: str, hint: str, config: dict = None) -> dict:
    """Load a checkpoint of this project, or one written by the released SVF/BAM/PFENet code (recognised by
    its keys and converted exactly: see model.released), strictly; return the checkpoint dict (test.py, predict.py).
    `config`: the one the model was built from; a checkpoint of this project that does not fit names what it was
    trained with."""
    return load_weights_from(net, load_checkpoint(path, hint), path, config)


def load_weights_from(net: nn.Module, obj, path: str, config: dict = None) -> dict:
    """load_weights for a checkpoint already read from `path` (the file is not read again)."""
    from engine.distributed import print0
    from model.released import detect_format, load_released, released_state

    state = released_state(obj)
    if state is None or detect_format(state) is None:
        return load_model_state(net, obj, path, config)
    _, report = load_released(net, obj, path)
    for line in report:
        print0(line)
    return obj
