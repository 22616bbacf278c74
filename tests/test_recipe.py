"""The released recipe as our default (config/pascal_*, config/coco_*): LR schedule and groups for SVF on
and off, stage 1, the test protocol's seeds, and the `nosvf` block of the config."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from engine.config import ConfigKeyError, load_config
from engine.optim import build_sgd, scheduled_lr, set_lr
from model import param_groups
from engine.distributed import sync_trained_batchnorm
from train import stage1_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyFSS(nn.Module):
    """What param_groups looks at: a backbone with singular values (SVF on) or plain weights, and heads."""

    def __init__(self, svf, backbone_trains=False):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.layer2 = nn.Module()
        if svf:
            self.backbone.layer2.vector_S = nn.Parameter(torch.ones(1, 4, 1, 1))
        else:
            self.backbone.layer2.weight = nn.Parameter(torch.ones(4), requires_grad=backbone_trains)
        self.head = nn.Conv2d(2, 2, 1)


def group_lrs_over_run(cfg, steps_per_epoch=3):
    """{group name: [lr at every step of the run]} as train.py sets them, plus the optimizer."""
    optimizer = build_sgd(param_groups(TinyFSS(cfg.svf), cfg), cfg.base_lr, cfg.momentum, cfg.weight_decay)
    total = cfg.epochs * steps_per_epoch
    lrs = {g["name"]: [] for g in optimizer.param_groups}
    for step in range(total):
        set_lr(optimizer, scheduled_lr(cfg.lr_schedule, cfg.base_lr, step, total, cfg.power))
        for g in optimizer.param_groups:
            lrs[g["name"]].append(g["lr"])
    return lrs, optimizer


@pytest.mark.parametrize("bench,epochs", [("pascal", 200), ("coco", 50)])
def test_svf_runs_the_released_recipe_constant_lr(bench, epochs):
    for fold in range(4):
        cfg = load_config(f"config/{bench}_split{fold}.yaml")
        assert (cfg.svf, cfg.epochs, cfg.batch_size, cfg.early_stop_epochs) == (True, epochs, 8, 75)
        assert cfg.val_mid_epoch == (epochs <= 100)  # the released code: half-epoch validation if epochs <= 100
        assert cfg.sync_bn and cfg.test_episodes == 1000 and cfg.test_seeds == [510, 365, 382, 322, 988]
    lrs, optimizer = group_lrs_over_run(cfg)
    assert len(lrs["heads"]) == epochs * 3
    assert all(lr == 0.015 for lr in lrs["heads"])
    assert all(lr == pytest.approx(0.0015, rel=1e-12) for lr in lrs["singular_values"])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 1e-4]  # S decays too, as released


def test_nosvf_runs_bams_recipe_with_its_x10_explicit():
    cfg = load_config("config/pascal_split0.yaml", ["svf=false"])
    assert (cfg.lr_schedule, cfg.base_lr, cfg.head_lr_mult) == ("poly", 0.005, 10.0)
    assert cfg.exp_dir.endswith("baseline_nosvf/resnet50/split0/1shot")
    lrs, optimizer = group_lrs_over_run(cfg, steps_per_epoch=2)
    assert list(lrs) == ["heads"]  # the few-shot models' backbone is frozen without SVF
    heads = lrs["heads"]
    total = len(heads)
    assert heads[0] == pytest.approx(0.05)  # BAM: base_lr 0.005, x10 in its poly helper
    assert heads[total // 2] == pytest.approx(0.05 * 0.5 ** 0.9)
    assert heads[-1] == pytest.approx(0.05 * (1 / total) ** 0.9)
    # the command line still wins over the nosvf block; an empty block keeps the file's values
    assert load_config("config/pascal_split0.yaml", ["svf=false", "base_lr=0.01"]).base_lr == 0.01
    plain = load_config("config/pascal_split0.yaml", ["svf=false", "nosvf={}"])
    assert (plain.lr_schedule, plain.base_lr, plain.head_lr_mult) == ("constant", 0.015, 1.0)
    # with SVF on the block is not applied
    assert load_config("config/pascal_split0.yaml").head_lr_mult == 1.0


def test_nosvf_block_is_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("nosvf: {base_rl: 0.1}\n")
    with pytest.raises(ConfigKeyError, match=r"'nosvf'.*unknown config key 'base_rl'.*did you mean 'base_lr'"):
        load_config(str(path))
    path.write_text("nosvf: {svf: true}\n")
    with pytest.raises(ValueError, match="'svf' cannot be set inside it"):
        load_config(str(path))
    path.write_text("nosvf: {base_lr: fast}\n")
    with pytest.raises(ValueError, match="'base_lr' .*expects a number"):
        load_config(str(path))
    with pytest.raises(ValueError, match="lr_schedule.*must be one of"):
        load_config(None, ["lr_schedule=step"])


def test_test_seeds_are_bams():
    # BAM's test.py: setup_seed(123) (numpy.random.seed) then numpy.random.randint(0, 1000, 5)
    expected = np.random.RandomState(123).randint(0, 1000, 5).tolist()
    assert expected == [510, 365, 382, 322, 988]
    assert load_config(None).test_seeds == expected


@pytest.mark.parametrize("bench,backbone_lr", [("pascal", 0.00025), ("coco", 0.0025)])
def test_stage1_is_bams_train_base(bench, backbone_lr):
    cfg = stage1_config(load_config(f"config/{bench}_split0.yaml"))
    assert (cfg.arch, cfg.svf, cfg.lr_schedule, cfg.val_mid_epoch) == ("pspnet", False, "poly", False)
    assert cfg.test_size == cfg.train_size == 417  # BAM's base configs validate at val_size = train_h
    optimizer = build_sgd(param_groups(TinyFSS(svf=False, backbone_trains=True), cfg), cfg.base_lr, cfg.momentum, cfg.weight_decay)
    set_lr(optimizer, scheduled_lr(cfg.lr_schedule, cfg.base_lr, 0, 100, cfg.power))
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["heads"] == pytest.approx(0.0025) and lrs["backbone"] == pytest.approx(backbone_lr)


def test_sync_bn_replaces_only_trained_batchnorm():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    frozen = net[2][0]
    for p in frozen.parameters():
        p.requires_grad_(False)
    weight = net[1].weight
    assert sync_trained_batchnorm(net) == 1
    assert isinstance(net[1], nn.SyncBatchNorm) and net[1].weight is weight  # the optimizer's tensors stay
    assert net[2][0] is frozen


def test_mid_epoch_validation_and_early_stop(tmp_path):
    """train.py: validation halfway through every epoch but the first, and the stop after
    early_stop_epochs epochs without a better validation mIoU (head_lr_mult 0: the heads, all that trains, keep the mIoU flat)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}
    data, lists = str(tmp_path / "data"), str(tmp_path / "lists")
    subprocess.run([sys.executable, "-m", "dataset.synthetic", "--out", data, "--num-train", "96",
                    "--num-val", "40", "--size", "48"], cwd=ROOT, env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "dataset.make_lists", "pascal", "--data-root", data, "--list-dir", lists,
                    "--min-class-pixels", "16", "--workers", "0"], cwd=ROOT, env=env, check=True, capture_output=True)
    exp = str(tmp_path / "exp")
    args = ["--config", "config/demo_split0.yaml", f"data_root={data}", f"list_dir={lists}", "min_class_pixels=16",
            "train_size=32", "test_size=40", "workers=0", "reduce_dim=16", "pretrained=null", "svf=false",
            "epochs=6", "batch_size=16", "base_lr=0.01", "head_lr_mult=0", "lr_schedule=constant", "val_episodes=3", "val_mid_epoch=true",
            "early_stop_epochs=2", "checkpoint_select=best", "val_every=1", f"exp_dir={exp}"]
    out = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [line.split(" | ")[0].split(" loss")[0] for line in out.stdout.splitlines() if line.startswith("epoch ")]
    assert lines == ["epoch 1/6", "epoch 1.5/6", "epoch 2/6", "epoch 2.5/6", "epoch 3/6"]
    assert "early stop: no better validation mIoU in the 2 epochs since epoch 1" in out.stdout
    assert "lr_schedule constant" in out.stdout
    last = torch.load(os.path.join(exp, "last.pth"), map_location="cpu", weights_only=True)
    assert (last["epoch"], last["best_epoch"]) == (3, 1)
