"""Optimiser and the ONE learning-rate schedule function of the project (`scheduled_lr`).

Every parameter group carries an explicit `lr_mult` (and its `weight_decay`), set by
`model.param_groups`; the learning rate of a group at step t of T (config key `lr_schedule`) is

    lr = base_lr * lr_mult * f(t / T),   f = 1                       (constant)
                                         f = (1 - t/T) ** power      (poly)
                                         f = (1 + cos(pi t/T)) / 2   (cosine)

There is no other multiplier anywhere: the released PFENet/BAM code multiplied every group by 10
inside its poly helper, and the released SVF code, with SVF on, rebuilt a cosine scheduler at every
iteration so that its LR never decayed. Both are written here as what they do: `head_lr_mult: 10`
and `lr_schedule: constant`.
"""
from __future__ import annotations

import math

import torch

from engine.config import FIELDS

LR_SCHEDULES = FIELDS["lr_schedule"].choices  # constant, poly, cosine


def scheduled_lr(schedule: str, base_lr: float, step: int, total_steps: int, power: float = 0.9) -> float:
    """The learning rate of an lr_mult=1 group at step `step` (0-based) of `total_steps`."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {schedule!r}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    if schedule == "constant":
        return base_lr
    if schedule == "poly":
        return base_lr * (1.0 - progress) ** power
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_sgd(param_groups: list[dict], base_lr: float, momentum: float, weight_decay: float):
    """SGD over groups that each state `lr_mult`; a group without `weight_decay` gets the default."""
    groups = []
    for i, group in enumerate(param_groups):
        if "lr_mult" not in group:
            raise KeyError(f"parameter group {i} ({group.get('name', 'unnamed')}) has no 'lr_mult'; "
                           "model.param_groups must state every multiplier explicitly")
        params = [p for p in group["params"] if p.requires_grad]
        if not params:
            continue  # a fully frozen group (e.g. SVF off) contributes nothing
        g = dict(group, params=params)
        g.setdefault("weight_decay", weight_decay)
        g["lr"] = base_lr * g["lr_mult"]
        groups.append(g)
    if not groups:
        raise ValueError("no trainable parameters: every parameter group is frozen")
    return torch.optim.SGD(groups, lr=base_lr, momentum=momentum, weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float):
    """Set each group's lr to lr * its lr_mult."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]


def describe_groups(optimizer: torch.optim.Optimizer) -> str:
    """One line per group: name, tensors, parameters, lr_mult, weight decay (for the log)."""
    lines = []
    for i, g in enumerate(optimizer.param_groups):
        n = sum(p.numel() for p in g["params"])
        lines.append(f"  group {i} {g.get('name', '')!s:<12} tensors={len(g['params']):<4} params={n:<10} "
                     f"lr_mult={g['lr_mult']:g} weight_decay={g['weight_decay']:g}")
    return "\n".join(lines)
