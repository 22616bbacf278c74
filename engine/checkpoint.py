"""Checkpoints: atomic writes, safe loads, and which file a run's evaluation uses.

A run's folder (`cfg.exp_dir`) holds
- `last.pth`: model, optimizer and AMP scaler state, epoch and iteration reached (written after every
  epoch, and on Ctrl-C / SIGTERM mid-epoch); `--resume` continues from it;
- `best.pth`: the model of the epoch with the highest validation mIoU, with that epoch's metrics.
Every write goes to a temporary file in the same folder that is then `os.replace`d over the target,
so a crash never leaves a half-written checkpoint. Loads use `torch.load(weights_only=True)`:
checkpoints hold only tensors and plain values.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from dataset.files import atomic_path

LAST = "last.pth"
BEST = "best.pth"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


def atomic_save(obj, path: str):
    """torch.save to `path` through a temporary file in the same folder, then os.replace."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())



def load_checkpoint(path: str, hint: str = "") -> dict:
    """torch.load(weights_only=True) on the CPU, with a clear error for a missing file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' not found" + (f"; {hint}" if hint else ""))
    return torch.load(path, map_location="cpu", weights_only=True)


def model_state_from(obj: dict, path: str) -> dict:
    """The model state dict inside a checkpoint of ours (`model` key) or a bare state dict."""
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"'{path}' is neither a checkpoint of this project (with a 'model' entry) "
                     f"nor a state dict of tensors; keys: {list(obj)[:10] if isinstance(obj, dict) else type(obj)}")


def load_model_weights(model: nn.Module, path: str, hint: str = "") -> dict:
    """Strictly load a checkpoint's model weights; return the whole checkpoint dict."""
    obj = load_checkpoint(path, hint)
    state = model_state_from(obj, path)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    net = unwrap(model)
    expected = net.state_dict().keys()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:  # checked before loading, so a mismatch leaves the model untouched
        raise ValueError(f"weights in '{path}' do not match the model built from the config: "
                         f"missing {missing[:20]} (of {len(missing)}), "
                         f"unexpected {unexpected[:20]} (of {len(unexpected)}); "
                         f"check arch/backbone/svf/shot against the run that wrote it")
    net.load_state_dict(state)
    return obj if isinstance(obj, dict) else {}


def evaluation_checkpoint(exp_dir: str, checkpoint_select: str) -> str:
    """The file test.py evaluates for a run: best.pth or last.pth per the selection rule."""
    name = BEST if checkpoint_select == "best" else LAST
    return os.path.join(exp_dir, name)
