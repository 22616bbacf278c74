"""Train a few-shot segmentation model, or with --stage1 the PSPNet base learner (BAM's stage 1).

    python train.py --config config/pascal_split0.yaml [key=value ...] [--resume]
    python -m torch.distributed.run --nproc_per_node 4 train.py --config ...   (what train.sh runs)
    python train.py --config config/pascal_split0.yaml --stage1   (writes cfg.base_learner's folder)

One process per GPU (NCCL) or CPU processes (gloo) under torchrun; `batch_size` is the total over
all processes. SGD with the `lr_schedule` of engine/optim.py and the explicit per-group LR
multipliers of `model.param_groups`. After every `val_every` epochs (and, with `val_mid_epoch`,
halfway through every epoch but the first, as the released code does on COCO) the model is validated
on `val_episodes` episodes of the fold's novel classes (stage 1: the base classes' mIoU on the val
images; sharded over ranks, buffers all-reduced) and
`last.pth` is written; `best.pth` keeps the highest validation mIoU, and training stops after
`early_stop_epochs` epochs without a better one (the released code's stop_interval). Because that
validation uses the test fold (as PFENet, BAM and SVF do), `checkpoint_select: last` is offered for
a selection that never looks at the test classes; the log states which rule applies.

Reproducibility: the episode order comes from a DistributedSampler seeded with `seed`, the
augmentation of item i in epoch e from (seed, epoch, i) in the dataset, and the global torch RNG
(dropout) is reseeded from (seed, epoch, iteration, rank) before every step, so `--resume` after
an interruption ends with the same weights as an uninterrupted run (`deterministic: true` on CPU).
A non-finite loss stops the run before the update and keeps the last good checkpoint; a checkpoint
is never written from a diverged run (the divergence rule: a weight NaN/inf or beyond 1e6, or an epoch's
mean loss above 10x the lowest so far, the run's first step, taken before any update, counting as the first
reference; engine/checkpoint.py, docs/reliability.md), and a non-finite
validation is never "best". A second training into a folder in use stops at once (engine/runlock.py). Ctrl-C or
SIGTERM finishes the current step (or checkpoint write), saves `last.pth` there and exits.
`last.pth` records the position in the epoch in samples, so a run may resume with another
batch_size when that position is a whole number of its batches (else a clear error).

The script reads top to bottom: `train` builds the `Stage` (what differs between stage 1 and few-shot
training: datasets, loss, validation, checkpoint rule), the model and its optimizer; `resume` loads
last.pth into them and returns its `RunState` (epoch, iteration, the epoch's running loss, best
result); `fit` runs the epochs (`train_one_epoch`, `validate`) and writes `checkpoint_state`, the same
state the Ctrl-C handler saves.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset

import svf

from dataset.files import atomic_write_text, remove_stale_temporaries
from engine.checkpoint import (BEST, LAST, LOSS_DIVERGENCE_FACTOR, NonFiniteWeights, atomic_save, config_differences,
                               describe_differences, evaluation_checkpoint, load_model_state, load_resume_checkpoint,
                               loss_diverged, unwrap)
from engine.config import FIELDS, Config, dump_config, finetune_method, load_config, split_overrides
from engine.faults import (fault_point, hold_interrupts, install_interrupt_handlers, interrupts_deferred,
                           release_interrupts, restore_handlers)
from engine.distributed import (DistInfo, EpochSampler, all_reduce_sum_, cleanup_distributed, derive_seed,
                                init_distributed, loader_generator, print0, seed_everything, sync_trained_batchnorm,
                                train_loader, trained_batchnorm)
from engine.loop import autocast, evaluate_episodes, evaluate_semantic
from engine.optim import build_sgd, describe_groups, scheduled_lr, set_lr
from engine.preflight import check_base_learner, check_data, check_pretrained, check_writable, value_origin
from engine.runlock import ExpDirInUse, own_exp_dir
from engine.runstats import peak_memory, write_run_stats


class NonFiniteLoss(RuntimeError):
    """A step's loss was NaN/inf on some rank; raised before that step's update."""


class DivergedLoss(RuntimeError):
    """An epoch's mean loss broke the divergence rule (engine.checkpoint.loss_diverged); nothing saved from it."""


@dataclass
class Stage:
    """What differs between stage 1 (the PSPNet base learner, arch pspnet) and few-shot training."""
    name: str                                             # in the run's first log line
    train_set: Dataset                                    # items for `loss`, with set_epoch(epoch)
    val_set: Dataset
    loss: Callable[[torch.nn.Module, dict], torch.Tensor]  # (model, batch) -> training loss
    validate: Callable[[torch.nn.Module], tuple]           # model -> (mIoU, FB-IoU or NaN)
    has_fbiou: bool                                       # whether validation reports FB-IoU
    checkpoint_rule: str                                  # which checkpoint test.py evaluates, and why


@dataclass
class RunState:
    """Where the run stands; last.pth records it (checkpoint_state) and --resume restores it."""
    epoch: int = 0              # the epoch in progress, from 0
    iteration: int = 0          # steps done in it
    loss_sum: float = 0.0       # of those steps' losses (mean over ranks)
    loss_steps: int = 0         # steps in loss_sum
    best_miou: float = -math.inf
    best_epoch: float = 0       # x.5 for a validation halfway through epoch x+1
    term_sums: dict = field(default_factory=dict)  # this rank's loss terms (loss_terms) summed over those steps
    lowest_loss: float = math.inf  # the divergence rule's reference: the lowest of the run's first step loss
                                   # (before any update) and its epoch mean losses so far
    timed_steps: int = 0           # train_stats.json, over the whole run (kept in last.pth across resumes): steps
    timed_seconds: float = 0.0     # trained, their wall time (data loading and mid-epoch validation included),
    peak_memory_bytes: int = 0     # and the peak memory of the invocations before this one

    def record_step(self, loss: float):
        """Count one step's loss (mean over ranks) in the epoch; the run's first step sets the first reference."""
        self.loss_sum, self.loss_steps = self.loss_sum + loss, self.loss_steps + 1
        if not math.isfinite(self.lowest_loss):  # the model as built: a reference for the first epoch too
            self.lowest_loss = loss

    def epoch_loss(self) -> float:
        return self.loss_sum / self.loss_steps if self.loss_steps else math.nan

    def epoch_terms(self) -> str:
        """' | main 0.41 aux1 0.52 ...': the epoch's mean of each loss term, for the log line."""
        if not self.term_sums or not self.loss_steps:
            return ""
        return " | " + " ".join(f"{k} {v / self.loss_steps:.4f}" for k, v in self.term_sums.items())


@dataclass
class Run:
    """What the epochs work with, built once by train(): the model (DDP-wrapped under torchrun), its optimizer
    and AMP scaler, the training sampler and the tensorboard writer."""
    cfg: Config
    dist_info: DistInfo
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_amp: bool
    sampler: EpochSampler
    writer: Optional[object]      # a tensorboard SummaryWriter on rank 0, else None
    s_start: Optional[dict]       # SVF's singular values before training (None without SVF)
    last_good: Optional[str] = None  # the last good checkpoint written (or resumed from), for the messages

    @property
    def iters_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch()

    @property
    def last_path(self) -> str:
        return os.path.join(self.cfg.exp_dir, LAST)

    @property
    def best_path(self) -> str:
        return os.path.join(self.cfg.exp_dir, BEST)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="Overrides: key=value or --set key=value (any config key).")
    parser.add_argument("--config", required=True, help="YAML config, e.g. config/pascal_split0.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from exp_dir/last.pth")
    parser.add_argument("--stage1", action="store_true", help="train the PSPNet base learner (BAM stage 1)")
    parser.add_argument("--stop-after", type=int, metavar="N",
                        help="leave after N epochs of this invocation (time-limited jobs); the LR schedule still "
                             "spans `epochs`, and --resume continues")
    args, rest = parser.parse_known_args(argv)
    if args.stop_after is not None and args.stop_after < 1:
        parser.error(f"--stop-after must be at least 1 (epochs of this invocation), got {args.stop_after}")
    return args, split_overrides(rest)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    origin = " ".join([args.config] + overrides)
    if args.stage1:
        cfg = stage1_config(cfg)
    check_data(cfg, origin)
    check_base_learner(cfg, origin)
    check_pretrained(cfg, origin)
    check_writable(cfg.exp_dir, "exp_dir", value_origin("base_learner" if args.stage1 else "exp_dir", args.config,
                                                        overrides))
    dist_info = init_distributed()
    try:
        with own_exp_dir(cfg.exp_dir, dist_info) as owned:  # a second training into this folder stops here
            return train(cfg, args, dist_info) if owned else 1
    finally:
        cleanup_distributed()


def train(cfg: Config, args, dist_info: DistInfo) -> int:
    """Build the stage, the model and its optimizer; resume from last.pth (--resume); fit."""
    import model as models

    device, world = dist_info.device, dist_info.world_size
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} is the total over {world} processes and must divide by it")
    use_amp = cfg.amp and device.type == "cuda"
    if cfg.amp and not use_amp:
        print0("note: amp=true applies to CUDA only; this CPU run uses float32")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(derive_seed(cfg.seed, dist_info.rank))

    last_path = os.path.join(cfg.exp_dir, LAST)
    if dist_info.is_main:  # what a kill -9 during a save left behind (this run owns the folder: none is live)
        for path in remove_stale_temporaries(cfg.exp_dir, [LAST, BEST, "config.yaml"]):
            print0(f"removed {path}, left by an interrupted save")
    if not args.resume and os.path.exists(last_path):
        raise FileExistsError(f"'{last_path}' exists: continue that run with --resume, or choose another "
                              f"exp_dir=... (or delete the folder) to start afresh")

    # build: what the stage trains on and validates with, the model, its optimizer
    stage = build_stage(cfg, dist_info, use_amp)
    net = models.build_model(cfg).to(device)
    if cfg.sync_bn and world > 1 and trained_batchnorm(net):
        if device.type == "cuda":
            print0(f"sync_bn: {sync_trained_batchnorm(net)} trained BatchNorm layer(s) synchronised over {world} processes")
        else:
            print0("note: sync_bn applies to GPUs only (PyTorch's SyncBatchNorm); this CPU run keeps per-process "
                   "BatchNorm statistics")
    optimizer = build_sgd(models.param_groups(net, cfg), cfg.base_lr, cfg.momentum, cfg.weight_decay)
    s_start = None  # SVF: the singular values before training, to log how far they moved
    if cfg.svf:
        svf.keep_small_updates(optimizer, net)  # S's updates (lr x grad ~1e-9) would round away in float32
        s_start = svf.state_dict(net.backbone)["singular_values"]
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    # resume: the weights, optimizer and position of last.pth, or a fresh start
    state = resume(last_path, cfg, net, optimizer, scaler, use_amp) if args.resume else RunState()

    # fit: wrap for DDP, shard the training items, open the log, then the epochs
    if dist_info.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = EpochSampler(stage.train_set, dist_info, cfg.seed, cfg.batch_size // world)
    if sampler.batches_per_epoch() == 0:
        raise ValueError(f"{len(stage.train_set)} training items are fewer than one batch of {cfg.batch_size}; "
                         "lower batch_size")
    writer = None
    if dist_info.is_main:
        os.makedirs(cfg.exp_dir, exist_ok=True)
        atomic_write_text(os.path.join(cfg.exp_dir, "config.yaml"), dump_config(cfg))
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(cfg.exp_dir, "tb"))
    run = Run(cfg, dist_info, net, optimizer, scaler, use_amp, sampler, writer, s_start)
    if args.resume:
        run.last_good = f"{last_path} (epoch {state.epoch}, iteration {state.iteration})"
    if dist_info.is_main:
        log_run(run, stage)
    return fit(run, stage, state, args.stop_after)


def log_run(run: Run, stage: Stage):
    """The head of the log: trainable parameters, model and data, optimizer, checkpoint rule, output."""
    from model.finetune import describe, describe_ranks
    cfg, optimizer = run.cfg, run.optimizer
    svf.print_trainable_parameters(unwrap(run.net))
    trainable, total = svf.count_parameters(unwrap(run.net).backbone)
    print0(f"{describe(cfg)} | backbone trainable params: {trainable:,d} of {total:,d}")
    ranks = describe_ranks(unwrap(run.net).backbone, cfg)  # lora / dna: the ranks used, and where they were capped
    if ranks:
        print0(ranks)
    print0(f"{stage.name} | backbone {cfg.backbone} | finetune {finetune_method(cfg)} | fold {cfg.fold} | shot {cfg.shot} | "
           f"{run.dist_info.world_size} process(es) on {run.dist_info.device.type} | "
           f"{len(stage.train_set)} training items, {run.iters_per_epoch} steps/epoch x {cfg.epochs} epochs")
    print0("optimizer: SGD momentum {} | base_lr {} | lr_schedule {}{}\n{}".format(
        cfg.momentum, cfg.base_lr, cfg.lr_schedule, f" (power {cfg.power})" if cfg.lr_schedule == "poly" else "",
        describe_groups(optimizer)))
    print0("checkpoint rule: " + stage.checkpoint_rule)
    print0(f"output: {cfg.exp_dir}")


def build_stage(cfg: Config, dist_info: DistInfo, use_amp: bool) -> Stage:
    """Stage 1 (arch pspnet): base-class images with their semantic labels, validated by the mIoU over
    background + base classes. Otherwise: training episodes, validated on `val_episodes` episodes of
    the fold's novel classes."""
    import dataset

    device = dist_info.device
    if cfg.arch == "pspnet":
        train_set, val_set = dataset.build_base_dataset(cfg, "train"), dataset.build_base_dataset(cfg, "val")

        def stage1_loss(net, batch):
            _, loss = net(batch["img"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True))
            return loss

        def validate_semantic(net):
            metric = evaluate_semantic(net, val_set, cfg.num_base_classes, dist_info, cfg.workers, use_amp)
            return metric.miou(), math.nan

        return Stage("stage-1 PSPNet", train_set, val_set, stage1_loss, validate_semantic, has_fbiou=False,
                     checkpoint_rule="best.pth = highest base-class mIoU on the val images (no novel class involved)")

    train_set = dataset.build_train_dataset(cfg)
    val_set = dataset.build_test_dataset(cfg, cfg.seed, cfg.val_episodes)
    class_ids = dataset.novel_classes_of(cfg)

    def episode_loss(net, batch):
        # BAM removes the episode's class from its base learner's output in training; its base-class label
        # gives the logged (not optimised) base-learner loss aux2
        extra = {"class_id": batch["class_id"].to(device)} if cfg.arch == "bam" else {}
        if "query_base_label" in batch:
            extra["base_label"] = batch["query_base_label"].to(device, non_blocking=True)
        _, loss = net(batch["query_img"].to(device, non_blocking=True),
                      batch["support_imgs"].to(device, non_blocking=True),
                      batch["support_masks"].to(device, non_blocking=True),
                      batch["query_mask"].to(device, non_blocking=True), **extra)
        return loss

    def validate_episodes(net):
        metric = evaluate_episodes(net, val_set, class_ids, dist_info, cfg.workers, use_amp)
        return metric.miou(), metric.fbiou()

    if cfg.checkpoint_select == "best":
        rule = (f"best — test.py evaluates best.pth, the epoch with the highest mIoU on {cfg.val_episodes} "
                f"validation episodes of the TEST fold's novel classes (as in PFENet/BAM/SVF); use "
                f"checkpoint_select=last for a choice that does not look at the test classes")
    else:
        rule = "last — test.py evaluates last.pth, the final epoch (no selection on the test fold)"
    return Stage(cfg.arch, train_set, val_set, episode_loss, validate_episodes, has_fbiou=True, checkpoint_rule=rule)


def stage1_config(cfg: Config) -> Config:
    """The PSPNet base-learner run of a config: stage1_* settings, written beside cfg.base_learner.

    As BAM's train_base.py: poly decay, the heads at stage1_base_lr and the backbone at
    backbone_lr_mult of it, validation at the crop size (its val_size = train_h) and only at epoch ends."""
    if not cfg.base_learner:
        raise ValueError("--stage1 needs base_learner (where the stage-1 checkpoint goes) in the config")
    return cfg.replace(arch="pspnet", svf=False, finetune=None, finetune_stages=FIELDS["finetune_stages"].default,
                       pretrained=cfg.stage1_pretrained, epochs=cfg.stage1_epochs, batch_size=cfg.stage1_batch_size,
                       base_lr=cfg.stage1_base_lr, lr_schedule="poly", head_lr_mult=1.0,
                       train_size=cfg.stage1_train_size, test_size=cfg.stage1_train_size,
                       scale_min=cfg.stage1_scale_min, scale_max=cfg.stage1_scale_max, val_mid_epoch=False,
                       exp_dir=os.path.dirname(cfg.base_learner) or ".")


def resume(path: str, cfg: Config, net, optimizer, scaler, use_amp: bool) -> RunState:
    """Load last.pth's model, optimizer and scaler state; return the position and best result it recorded."""
    ckpt = load_resume_checkpoint(path)
    load_model_state(net, ckpt, path, config=cfg.to_dict())
    changed = config_differences(ckpt["config"], cfg.to_dict())
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as exc:
        raise ValueError(f"the optimizer state in '{path}' does not fit this config's parameter groups "
                         f"({exc}); config changes: {describe_differences(changed) or 'none'}") from None
    if use_amp and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    state = RunState(epoch=ckpt["epoch"], iteration=resume_iteration(ckpt, cfg.batch_size, path),
                     loss_sum=ckpt.get("epoch_loss_sum", 0.0), loss_steps=ckpt.get("epoch_loss_steps", 0),
                     term_sums=dict(ckpt.get("epoch_loss_terms", {})),
                     best_miou=ckpt["best_miou"], best_epoch=ckpt["best_epoch"],
                     lowest_loss=ckpt.get("lowest_epoch_loss", math.inf))
    timing = ckpt.get("timing", {})  # train_stats.json covers the whole run
    state.timed_steps, state.timed_seconds = int(timing.get("steps", 0)), float(timing.get("seconds", 0.0))
    state.peak_memory_bytes = int(timing.get("peak_memory_bytes", 0))
    if changed:
        print0("resume: config differs from the checkpoint's in " + describe_differences(changed))
    print0(f"resume: {path} at epoch {state.epoch}, iteration {state.iteration}")
    return state


def resume_iteration(ckpt: dict, batch_size: int, path: str) -> int:
    """Steps of `batch_size` already done in the checkpoint's epoch, from the samples it consumed."""
    samples = ckpt.get("samples", ckpt["iteration"] * ckpt["config"]["batch_size"])
    if samples % batch_size:
        raise ValueError(f"'{path}' stopped after {samples} samples of epoch {ckpt['epoch'] + 1}, which is not a whole "
                         f"number of batches of batch_size={batch_size}; resume with a batch_size that divides "
                         f"{samples} (the run used {ckpt['config']['batch_size']})")
    return samples // batch_size


def fit(run: Run, stage: Stage, state: RunState, stop_after: Optional[int] = None) -> int:
    """Train from state's position to cfg.epochs; after each epoch log, validate (every val_every epochs and
    at the last) and save last.pth. Returns the exit code: 0, 130 after Ctrl-C/SIGTERM (last.pth saved at
    the step reached), 1 after a non-finite loss or diverged weights (nothing saved from them)."""
    cfg, is_main, writer = run.cfg, run.dist_info.is_main, run.writer
    start_epoch = state.epoch
    # the released code validates after iteration round(n/2) (0-based) of every epoch but the first
    mid_epoch_step = round(run.iters_per_epoch / 2) if cfg.val_mid_epoch and run.iters_per_epoch > 1 else None
    previous_handlers = install_interrupt_handlers()
    steps_at_start = state.timed_steps
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.time()
            train_one_epoch(run, stage, state, epoch, mid_epoch_step if epoch > 0 else None)
            mean_loss = state.epoch_loss()
            loss_text = f"{mean_loss:.4f}" if state.loss_steps else "n/a (no step of it was logged)"
            line = f"epoch {epoch + 1}/{cfg.epochs} loss {loss_text}{state.epoch_terms()} ({time.time() - t0:.0f}s)"
            check_divergence(state, f"epoch {epoch + 1}")
            if run.s_start is not None:  # relative change of S per layer since the start: 0 means SVF trains nothing
                s_change = svf.singular_value_change(unwrap(run.net).backbone, run.s_start)
                line += " | S change " + " ".join(f"{layer} {v:.1e}" for layer, v in s_change.items())
                for layer, v in s_change.items() if writer else ():
                    writer.add_scalar(f"svf/relative_change_{layer}", v, epoch + 1)
            if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
                line += validate(run, stage, state, epoch + 1)
            state.epoch, state.iteration, state.loss_sum, state.loss_steps = epoch + 1, 0, 0.0, 0
            state.term_sums = {}
            if is_main:
                save(checkpoint_state(run, state), run.last_path)
                run.last_good = f"{run.last_path} (epoch {state.epoch})"
                if math.isfinite(mean_loss):
                    writer.add_scalar("train/epoch_loss", mean_loss, epoch + 1)
                writer.flush()
            print0(line)
            if cfg.early_stop_epochs and epoch + 1 - math.ceil(state.best_epoch) >= cfg.early_stop_epochs:
                print0(f"early stop: no better validation mIoU in the {epoch + 1 - math.ceil(state.best_epoch)} epochs "
                       f"since epoch {state.best_epoch} (early_stop_epochs={cfg.early_stop_epochs})")
                break
            if stop_after and epoch + 1 - start_epoch >= stop_after and epoch + 1 < cfg.epochs:
                print0(f"stopping after {stop_after} epoch(s) as asked (--stop-after); continue with --resume")
                return 0
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the save short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if is_main:
            try:
                check_divergence(state, f"the {state.loss_steps} step(s) of epoch {state.epoch + 1} done so far",
                                 whole_epoch=False)
                atomic_save(checkpoint_state(run, state), run.last_path)
            except (NonFiniteWeights, DivergedLoss) as exc:
                print(f"\ninterrupted: {exc}; nothing written from it. {good_checkpoint_advice(run)}", flush=True)
                return 1
            print(f"\ninterrupted: saved {run.last_path} at epoch {state.epoch}, iteration "
                  f"{state.iteration}; continue with: python train.py --config ... --resume", flush=True)
        return 130
    except (NonFiniteLoss, NonFiniteWeights, DivergedLoss) as exc:
        done = "stopped before applying that update" if isinstance(exc, NonFiniteLoss) else "stopped"
        print0(f"error: {exc}; {done}, nothing written from it. {good_checkpoint_advice(run)}")
        return 1
    finally:
        restore_handlers(previous_handlers)
        if writer:
            writer.close()
    print0(f"done: best validation mIoU {100 * state.best_miou:.2f} at epoch {state.best_epoch}; "
           f"test.py evaluates {evaluation_checkpoint(cfg.exp_dir, cfg.checkpoint_select)}")
    if is_main:
        write_run_stats(run.cfg.exp_dir, run.net, run.dist_info, state.timed_steps, state.timed_seconds,
                        state.peak_memory_bytes, trained_now=state.timed_steps > steps_at_start)
    return 0


def train_one_epoch(run: Run, stage: Stage, state: RunState, epoch: int, mid_epoch_step: Optional[int] = None):
    """This rank's batches of `epoch` from step state.iteration on (a resumed epoch skips the steps done);
    state follows every step. With mid_epoch_step, validate after that step (0-based)."""
    cfg, dist_info, optimizer, scaler = run.cfg, run.dist_info, run.optimizer, run.scaler
    device, skip, iters_per_epoch = dist_info.device, state.iteration, run.iters_per_epoch
    run.sampler.set_epoch(epoch, skip)
    stage.train_set.set_epoch(epoch)
    loader = train_loader(stage.train_set, run.sampler, run.sampler.batch_per_rank, cfg.workers, device,
                          loader_generator(cfg.seed, epoch, dist_info.rank))
    run.net.train()
    bar = None
    if dist_info.is_main:
        from tqdm import tqdm
        bar = tqdm(total=iters_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   dynamic_ncols=True, leave=False, disable=None)
    step_start = time.time()
    for it, batch in enumerate(loader, start=skip):
        hold_interrupts()  # Ctrl-C / SIGTERM take effect after the whole step (release_interrupts)
        step = epoch * iters_per_epoch + it
        lr = scheduled_lr(cfg.lr_schedule, cfg.base_lr, step, cfg.epochs * iters_per_epoch, cfg.power)
        set_lr(optimizer, lr)
        torch.manual_seed(derive_seed(cfg.seed, epoch, it, dist_info.rank))
        with autocast(device, run.use_amp):
            loss = stage.loss(run.net, batch)
        stats = torch.stack([loss.detach().float(), (~torch.isfinite(loss.detach())).float()])
        stats = all_reduce_sum_(stats).cpu()
        if stats[1] > 0:
            raise NonFiniteLoss(f"non-finite loss (NaN/inf) at epoch {epoch + 1}, iteration {it + 1}")
        fault_point("step", epoch, it)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        mean = float(stats[0]) / dist_info.world_size
        state.epoch, state.iteration = epoch, it + 1
        state.record_step(mean)
        now = time.time()  # the step's wall time, its data loading included (and a mid-epoch validation, next)
        state.timed_steps, state.timed_seconds = state.timed_steps + 1, state.timed_seconds + now - step_start
        step_start = now
        terms = loss_terms(run, cfg)  # this rank's (rank 0's in the log, as the released log)
        for name, value in terms.items():
            state.term_sums[name] = state.term_sums.get(name, 0.0) + value
        release_interrupts()
        if run.writer:
            run.writer.add_scalar("train/loss", mean, step + 1)
            run.writer.add_scalar("train/lr", lr, step + 1)
            for name, value in terms.items():
                run.writer.add_scalar(f"train/loss_{name}", value, step + 1)
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
        if it == mid_epoch_step:
            check_divergence(state, f"the first {it + 1} steps of epoch {epoch + 1}", whole_epoch=False)
            print0(f"epoch {epoch + 0.5}/{cfg.epochs}" + validate(run, stage, state, epoch + 0.5))
    if bar:
        bar.close()


def loss_terms(run: Run, cfg: Config) -> dict:
    """This rank's loss terms of the last step (the model's ``loss_terms``: main, aux1, BAM's aux2) and, with
    aux2, ``released_total`` = main + aux_loss_weight * aux1 + aux2: the loss the released BAM code logs
    (its aux_weight2 is 1); the optimised loss is the released one without aux2, which has no gradient."""
    terms = {k: float(v) for k, v in getattr(unwrap(run.net), "loss_terms", {}).items()}
    if "aux2" in terms:
        terms["released_total"] = terms["main"] + cfg.aux_loss_weight * terms.get("aux1", 0.0) + terms["aux2"]
    return terms


def validate(run: Run, stage: Stage, state: RunState, epochs_done) -> str:
    """Validate and keep best.pth; epochs_done is an int at an epoch's end, x.5 halfway through one.
    Returns the text for the log line."""
    fault_point("validation", state.epoch, state.iteration)
    miou, fbiou = stage.validate(run.net)
    text = f" | val mIoU {100 * miou:.2f}" + (f" FB-IoU {100 * fbiou:.2f}" if stage.has_fbiou else "")
    if run.writer:
        tag = "" if isinstance(epochs_done, int) else "_mid_epoch"
        run.writer.add_scalar("val/miou" + tag, miou, math.ceil(epochs_done))
        if stage.has_fbiou:
            run.writer.add_scalar("val/fbiou" + tag, fbiou, math.ceil(epochs_done))
    if math.isfinite(miou) and miou > state.best_miou:  # a NaN validation is never "best"
        if run.dist_info.is_main:
            save({"model": unwrap(run.net).state_dict(), "epoch": epochs_done, "miou": miou,
                  "fbiou": fbiou, "config": run.cfg.to_dict()}, run.best_path)
        state.best_miou, state.best_epoch = miou, epochs_done
        text += " (best)"
    return text


def checkpoint_state(run: Run, state: RunState) -> dict:
    """last.pth: what --resume needs to continue exactly where `state` stands."""
    return {"model": unwrap(run.net).state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict() if run.use_amp else {}, "epoch": state.epoch,
            "iteration": state.iteration, "samples": state.iteration * run.cfg.batch_size,
            "epoch_loss_sum": state.loss_sum, "epoch_loss_steps": state.loss_steps,
            "epoch_loss_terms": dict(state.term_sums),
            "best_miou": state.best_miou, "best_epoch": state.best_epoch, "lowest_epoch_loss": state.lowest_loss,
            "timing": {"steps": state.timed_steps, "seconds": state.timed_seconds,
                       "peak_memory_bytes": max(peak_memory(run.dist_info.device)[0], state.peak_memory_bytes)},
            "config": run.cfg.to_dict()}


def check_divergence(state: RunState, what: str, whole_epoch: bool = True):
    """The divergence rule on the loss (engine.checkpoint.loss_diverged), before anything is validated or saved:
    raise DivergedLoss when the mean loss of `what` (an epoch, or its first half before a mid-epoch validation, or
    the steps done before an interruption) is beyond it; a whole epoch that passes lowers the reference. The first
    epoch is checked against the run's first step, whose loss is that of the model before any update."""
    mean = state.epoch_loss()
    if not state.loss_steps:
        return
    if loss_diverged(mean, state.lowest_loss):
        raise DivergedLoss(f"the mean loss of {what}, {mean:.4g}, is more than the divergence rule allows "
                           f"({LOSS_DIVERGENCE_FACTOR:g}x {state.lowest_loss:.4g}, the lowest of the first step's loss "
                           f"and the epoch mean losses so far): the run diverged")
    if whole_epoch:
        state.lowest_loss = min(state.lowest_loss, mean)


def good_checkpoint_advice(run: Run) -> str:
    """What to do after a diverged or non-finite state: resume from the last good checkpoint, or start again."""
    if run.last_good is None:
        return "There is no good checkpoint: start again with a lower base_lr (or amp=false)"
    return (f"The last good checkpoint is {run.last_good}: lower base_lr (or set amp=false) and resume from it with "
            "--resume")


def save(obj: dict, path: str):
    with interrupts_deferred():  # a Ctrl-C during the write lets it finish first
        atomic_save(obj, path)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, KeyError, OSError, ExpDirInUse) as exc:
        # bad config, missing inputs, a folder in use or not writable, a full disk: one clear line, not a traceback
        sys.exit(f"error: {exc}")
