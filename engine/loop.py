"""The episode loop shared by validation in train.py and by test.py (written once).

`evaluate_episodes` runs the model over this rank's shard of a precomputed episode list
(rank r takes episodes r, r+W, ...), adds every episode to an `EpisodeIoU`, and all-reduces the
buffers, so the returned metric is the same for any number of processes and loader workers.
`evaluate_semantic` is the same for stage-1 (PSPNet) validation on the base classes.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from engine.checkpoint import unwrap
from dataset import shard_indices
from engine.distributed import DistInfo, all_reduce_sum_
from engine.metric import EpisodeIoU, SemanticIoU


def autocast(device: torch.device, enabled: bool):
    """Mixed precision on CUDA only (the CPU path stays in float32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def sharded_loader(dataset: Dataset, dist_info: DistInfo, workers: int, batch_size: int = 1) -> DataLoader:
    """Loader over this rank's strided shard, in order (no shuffling: episodes are precomputed)."""
    subset = Subset(dataset, shard_indices(len(dataset), dist_info.rank, dist_info.world_size))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=dist_info.device.type == "cuda")


@torch.no_grad()
def evaluate_episodes(model: torch.nn.Module, dataset: Dataset, class_ids, dist_info: DistInfo,
                      workers: int = 0, amp: bool = False, progress: bool = False,
                      on_episode: Optional[Callable[[dict, torch.Tensor], None]] = None) -> EpisodeIoU:
    """Few-shot evaluation over all episodes of `dataset` (items as built by build_test_dataset).

    on_episode(batch, pred) is called for each episode with the prediction at the original label
    resolution (test.py's --vis uses it).
    """
    net = unwrap(model)
    was_training = net.training
    net.eval()
    device = dist_info.device
    metric = EpisodeIoU(class_ids, device="cpu")
    loader = sharded_loader(dataset, dist_info, workers)
    iterator = loader
    if progress and dist_info.is_main:
        from tqdm import tqdm
        iterator = tqdm(loader, desc="episodes (rank 0 shard)", leave=False, dynamic_ncols=True, disable=None)
    for batch in iterator:
        query = batch["query_img"].to(device, non_blocking=True)
        support_imgs = batch["support_imgs"].to(device, non_blocking=True)
        support_masks = batch["support_masks"].to(device, non_blocking=True)
        with autocast(device, amp):
            logits = net(query, support_imgs, support_masks)
        pred = metric.update_from_logits(logits, batch["query_label"][0], int(batch["class_id"][0])).cpu()
        if on_episode is not None:
            on_episode(batch, pred)
    flat = metric.as_tensor().to(device)
    metric.load_tensor(all_reduce_sum_(flat).cpu())
    net.train(was_training)
    return metric


@torch.no_grad()
def evaluate_semantic(model: torch.nn.Module, dataset: Dataset, num_classes: int, dist_info: DistInfo,
                      workers: int = 0, amp: bool = False) -> SemanticIoU:
    """Stage-1 validation: mIoU over background + base classes of a PSPNet, sharded and all-reduced."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    device = dist_info.device
    metric = SemanticIoU(num_classes, device="cpu")
    for batch in sharded_loader(dataset, dist_info, workers):
        img = batch["img"].to(device, non_blocking=True)
        with autocast(device, amp):
            logits = net(img)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        pred = logits.float().argmax(1).cpu()
        metric.update(pred, batch["label"])
    flat = metric.as_tensor().to(device)
    metric.load_tensor(all_reduce_sum_(flat).cpu())
    net.train(was_training)
    return metric
