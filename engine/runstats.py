"""What a finished training run cost: exp_dir/train_stats.json (written by train.py when a run completes, read by
tools/ablate.py for its table's parameter, step-time and memory columns)."""
from __future__ import annotations

import json
import os
import resource

import torch

import svf

from dataset.files import atomic_write_text
from engine.checkpoint import unwrap
from engine.distributed import DistInfo

RUN_STATS = "train_stats.json"


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind) of this process's peak memory: GPU torch.cuda.max_memory_allocated, CPU the peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"


def write_run_stats(exp_dir: str, net: torch.nn.Module, dist_info: DistInfo, steps: int, seconds: float,
                    peak_before: int, trained_now: bool):
    """exp_dir/train_stats.json: trainable parameters (all, backbone), the mean wall time of the run's ``steps``
    (``seconds`` in all: data loading and mid-epoch validation included, end-of-epoch validation not) and its peak
    memory (this process's, or ``peak_before``, the earlier invocations' from last.pth, if higher), over every
    invocation of the run. A finished run resumed again without training (``trained_now`` false) keeps its file."""
    path = os.path.join(exp_dir, RUN_STATS)
    if not trained_now and os.path.exists(path):
        return
    net, device = unwrap(net), dist_info.device
    (trainable, total), (trainable_backbone, _) = svf.count_parameters(net), svf.count_parameters(net.backbone)
    memory, kind = peak_memory(device)
    stats = {"trainable": trainable, "trainable_backbone": trainable_backbone, "total_parameters": total,
             "steps_timed": steps, "step_time_s": seconds / steps if steps else None,
             "peak_memory_bytes": max(int(memory), peak_before), "memory_kind": kind, "device": device.type,
             "world_size": dist_info.world_size, "torch_threads": torch.get_num_threads()}
    atomic_write_text(path, json.dumps(stats, indent=1) + "\n")
