"""Distributed helpers for `torchrun` (torchvision reference-script conventions).

- `init_distributed()` reads RANK / WORLD_SIZE / LOCAL_RANK from the environment torchrun sets;
  NCCL when CUDA is available, gloo on the CPU (so the same code path is tested on CPUs);
  a plain `python train.py` is a world of one.
- `all_reduce_sum_` sums a metric buffer over ranks; `dataset.shard_indices` gives rank r the episode
  indices r, r + W, r + 2W, ... so every episode is evaluated exactly once.
- `derive_seed(*keys)` turns (seed, epoch, rank, iteration, ...) into a 31-bit seed, the same in
  every process and every run; `worker_init_fn` seeds numpy / random in data-loader workers from
  the per-worker torch seed that the loader's generator determines.
- training data: `EpochSampler` (this rank's part of an epoch's permutation, minus the batches a resumed run
  already did) and `train_loader`; `sync_trained_batchnorm` makes trained BatchNorm layers synchronise over ranks.
"""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(use_cuda: bool | None = None) -> DistInfo:
    """Join the torchrun process group (if any) and pick this process's device."""
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # torchrun provides MASTER_ADDR/MASTER_PORT; env:// reads them
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://",
                                **({"device_id": device} if use_cuda else {}))
    return DistInfo(rank, world_size, local_rank, device)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over all ranks (no-op in a world of one)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier():
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)



def derive_seed(*keys: int) -> int:
    """A 31-bit seed from integer keys, identical in every process (unlike Python's hash())."""
    digest = hashlib.sha256(",".join(str(int(k)) for k in keys).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int):
    """Seed torch (CPU and CUDA), numpy and random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def worker_init_fn(worker_id: int):
    """Seed numpy/random in a loader worker from its torch seed (base seed from the generator + id)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def loader_generator(*keys: int) -> torch.Generator:
    """A generator for DataLoader(generator=...): fixes the per-worker seeds of one epoch."""
    return torch.Generator().manual_seed(derive_seed(*keys))


def train_loader(train_set: Dataset, sampler: Sampler, batch_per_rank: int, workers: int, device: torch.device,
                 generator: torch.Generator) -> DataLoader:
    """The training loader of one epoch (benchmarks/loader_speed.py times this very loader)."""
    return DataLoader(train_set, batch_size=batch_per_rank, sampler=sampler, num_workers=workers, drop_last=True,
                      worker_init_fn=worker_init_fn, pin_memory=device.type == "cuda", generator=generator)


class EpochSampler(Sampler):
    """This rank's part of a DistributedSampler permutation, minus the batches already done."""

    def __init__(self, dataset, dist_info: DistInfo, seed: int, batch_per_rank: int):
        self.inner = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                        shuffle=True, seed=seed, drop_last=True)
        self.batch_per_rank = batch_per_rank
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0):
        self.inner.set_epoch(epoch)
        self.skip = skip_batches * self.batch_per_rank

    def batches_per_epoch(self) -> int:
        return len(self.inner) // self.batch_per_rank

    def __iter__(self):
        return iter(list(self.inner)[self.skip:])

    def __len__(self):
        return len(self.inner) - self.skip


def trained_batchnorm(net: torch.nn.Module) -> list:
    """(parent module, child name) of every BatchNorm whose parameters train and whose statistics update (train
    mode after ``net.train()``: not those of a backbone kept in eval mode, e.g. under finetune=bn)."""
    return [(parent, name) for parent in net.modules() for name, child in parent.named_children()
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and child.training
            and any(p.requires_grad for p in child.parameters(recurse=False))]


def sync_trained_batchnorm(net: torch.nn.Module) -> int:
    """Replace every BatchNorm whose parameters train by a SyncBatchNorm (statistics over all processes,
    as BAM's stage 1); frozen ones (eval mode, hooks) stay as they are. Returns how many were replaced."""
    targets = trained_batchnorm(net)
    for parent, name in targets:
        setattr(parent, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(getattr(parent, name)))
    return len(targets)
