"""Small helpers shared by the SVF and lrcc parts of the library (torch only)."""
import torch.nn as nn


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
