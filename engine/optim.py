"""Optimiser and the ONE learning-rate schedule (poly decay) of the project.

Every parameter group carries an explicit `lr_mult` (and its `weight_decay`), set by
`model.param_groups`; the learning rate of a group at step t of T is

    lr = base_lr * lr_mult * (1 - t / T) ** power

There is no other multiplier anywhere (the released PFENet/BAM/SVF code hid a x10 in a helper).
"""
from __future__ import annotations

import torch


def poly_lr(base_lr: float, step: int, total_steps: int, power: float) -> float:
    """Poly decay: base_lr at step 0, 0 at step total_steps."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    step = min(max(step, 0), total_steps)
    return base_lr * (1.0 - step / total_steps) ** power


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
