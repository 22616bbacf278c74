"""model/finetune.py: every way to train the backbone (config key `finetune`), on resnet18_deep at random init.

Per method: the exact trainable set (names and count, hand-counted for resnet18_deep layer2-4), one optimizer
step moves exactly it (BatchNorm statistics stay), the merged model equals the trained one where the method
merges, save -> load -> resume is bit-exact; BAM's base learner keeps an untouched copy; refusals are clear."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import lrcc
import svf
from common.config import BACKBONE_STAGES, DNA_MODES, FINETUNE_METHODS, SVF_FACTORS, load_config
from engine.checkpoint import load_state_dict_strict
from engine.optim import build_sgd
from model import build_model, param_groups
from model import finetune
from model.backbones import STAGES
from conftest import random_episode, tiny_cfg

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# every LR multiplier high, so that one SGD step visibly moves every trainable tensor (S's steps are tiny)
FAST = dict(base_lr=0.1, svf_lr_mult=100.0, backbone_lr_mult=1.0, bias_lr_mult=1.0, bn_lr_mult=1.0,
            lora_lr_mult=1.0, dna_lr_mult=1.0, svf_weight_decay=True, dna_compress_step=2)

# resnet18_deep layer2-4: BatchNorm channels 5 x (128 + 256 + 512) = 4480 (bn1, bn2 of two blocks + downsample)
# singular values: layer2 128+128+64+128+128, layer3 256+256+128+256+256, layer4 512+512+256+512+512
COUNTS = {"freeze": 0, "svf": 4032, "bias": 4480, "bn": 8960}


def _cfg(method, **extra):
    keys = dict(FAST, finetune=method, svf=method == "svf")
    keys.update(extra)
    return tiny_cfg(**keys)


def _build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


def _expected(backbone, method, cfg):
    """The trainable names, written out per method independently of the registry."""
    stages = tuple(f"{s}." for s in cfg.finetune_stages)
    names = [n for n, _ in backbone.named_parameters() if n.startswith(stages)]
    modules = dict(backbone.named_modules())
    if method == "freeze":
        return set()
    if method == "full":
        return set(names)
    if method == "bias":
        return {n for n in names if n.endswith(".bias")}
    if method == "bn":
        return {n for n in names if isinstance(modules[n.rsplit(".", 1)[0]], nn.BatchNorm2d)}
    if method == "svf":
        return {n for n in names if n.endswith("vector_S")}
    if method == "lora":
        return {n for n in names if n.endswith(("lora_A", "lora_B"))}
    return {n for n in names if n.endswith(("lora_B", "sparse_weight"))}  # dna, tune_U_S


def _step(model, cfg, seed=1):
    optimizer = build_sgd(param_groups(model, cfg), cfg.base_lr, cfg.momentum, cfg.weight_decay)
    _one_step(model, optimizer, seed)
    return optimizer


def _one_step(model, optimizer, seed):
    q, s, sm, qm = random_episode(batch=2, size=33, seed=seed)
    model.train()
    torch.manual_seed(seed)  # dropout
    extra = {"class_id": torch.tensor([6, 7])} if hasattr(model, "base_learner") else {}  # BAM: base classes
    _, loss = model(q, s, sm, qm, **extra)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_registry_and_the_schema_agree():
    assert tuple(finetune.METHODS) == FINETUNE_METHODS
    assert SVF_FACTORS == svf.tuning.FACTORS and BACKBONE_STAGES == STAGES
    assert set(DNA_MODES) == set(lrcc.MODES) - {"lora_mode"}
    for method in finetune.METHODS.values():  # every LR key is a float key of the schema
        assert method.lr_key is None or isinstance(getattr(tiny_cfg(), method.lr_key), float)


@pytest.mark.parametrize("method", FINETUNE_METHODS)
def test_trainable_set_one_step_merge_and_resume(method, tmp_path):
    cfg = _cfg(method)
    model = _build(cfg)
    backbone = model.backbone
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == _expected(backbone, method, cfg)
    count = sum(backbone.get_parameter(n).numel() for n in trainable)
    if method in COUNTS:
        assert count == COUNTS[method]
    elif method == "full":  # every parameter of layer2-4
        assert count == sum(p.numel() for s in ("layer2", "layer3", "layer4") for p in getattr(backbone, s).parameters())
    else:  # lora / dna: the factors of every 3x3 and 1x1 conv of layer2-4 at rank int(in_channels / 4)
        convs = [m for s in ("layer2", "layer3", "layer4") for m in getattr(backbone, s).modules()
                 if isinstance(m, lrcc.LowRankConv2d)]
        assert len(convs) == 15
        lora = sum(m.rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels) for m in convs)
        dna = sum(m.rank * m.out_channels + m.weight.numel() for m in convs)  # U and the (dense) sparse part
        assert count == (lora if method == "lora" else dna)
        assert all(m.rank == m.in_channels // 4 for m in convs)
    group = finetune.backbone_group(model, cfg)
    if method == "freeze":
        assert group is None
    else:
        method_entry = finetune.METHODS[method]
        assert group["name"] == method_entry.group and group["lr_mult"] == getattr(cfg, method_entry.lr_key)

    before = _state(model)
    x = random_episode(batch=1, size=33, seed=5)[:3]
    optimizer = _step(model, cfg)
    after = _state(model)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    backbone_moved = {k[len("backbone."):] for k in moved if k.startswith("backbone.")}
    assert backbone_moved == trainable, sorted(backbone_moved ^ trainable)[:5]  # BN statistics included: frozen
    assert any(not k.startswith("backbone.") for k in moved)  # the heads train

    model.eval()
    with torch.no_grad():
        trained_out = model(*x)
        if finetune.METHODS[method].merge is not None:  # merged: plain layers, same outputs
            plain = finetune.merged(model, cfg).eval()
            assert not any(isinstance(m, (svf.SVDLayer, lrcc.LowRankConv2d)) for m in plain.backbone.modules())
            torch.testing.assert_close(plain(*x), trained_out, rtol=1e-4, atol=1e-5)

    # save -> load into a fresh build (another seed) -> resume: the next step is bit-exact
    path = tmp_path / "last.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    again = _build(cfg, seed=7)
    load_state_dict_strict(again, ckpt["model"], str(path))
    optimizer2 = build_sgd(param_groups(again, cfg), cfg.base_lr, cfg.momentum, cfg.weight_decay)
    optimizer2.load_state_dict(ckpt["optimizer"])
    _one_step(model, optimizer, seed=2)
    _one_step(again, optimizer2, seed=2)
    a, b = model.state_dict(), again.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_bn_method_folds_only_the_frozen_batchnorm_and_fold_changes_nothing():
    on, off = _build(_cfg("bn")), _build(_cfg("bn", fold_batchnorm=False))
    from svf.fold import active_bn
    folded = {n.split(".")[0] for n, m in on.backbone.named_modules() if active_bn(m) is not None}
    assert folded == {"layer0", "layer1"}  # the tuned stages' BatchNorm (gamma/beta train) are not folded
    x = random_episode(batch=2, size=33, seed=3)
    for model in (on, off):
        model.train()
        torch.manual_seed(0)
        _, loss = model(*x)
        loss.backward()
    torch.testing.assert_close(on.backbone.layer3[0].bn1.weight.grad, off.backbone.layer3[0].bn1.weight.grad,
                               rtol=1e-4, atol=1e-6)
    on.eval(), off.eval()
    with torch.no_grad():
        torch.testing.assert_close(on(*x[:3]), off(*x[:3]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,stages,shared", [("full", ["layer2", "layer3", "layer4"], 2),
                                                  ("lora", ["layer3", "layer4"], 3)])
def test_bam_base_learner_reads_an_untouched_copy(method, stages, shared):
    reference = _build(_cfg("freeze", arch="bam"))  # the same random stage-1 backbone, not modified
    model = _build(_cfg(method, arch="bam", finetune_stages=stages))
    assert int(model.base_shared_stages) == shared
    base = model.base_backbone
    assert base is not model.backbone and not any(p.requires_grad for p in base.parameters())
    ref = reference.backbone.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in base.state_dict().items())
    _step(model, _cfg(method, arch="bam", finetune_stages=stages))
    assert all(torch.equal(v, ref[k]) for k, v in base.state_dict().items())
    assert not torch.equal(model.backbone.layer4[0].conv1.lora_B if method == "lora"
                           else model.backbone.layer4[0].conv1.weight, ref["layer4.0.conv1.weight"])


def test_stage_one_statistics_and_stages():
    derived = _build(tiny_cfg(arch="pspnet", svf=False))  # BAM's stage 1: every stage, statistics update
    assert all(p.requires_grad for p in derived.backbone.parameters())
    assert finetune.method_of(tiny_cfg(arch="pspnet", svf=False)).name == "full"
    cfg = tiny_cfg(arch="pspnet", svf=False, finetune="full")  # explicit full: finetune_stages only
    model = _build(cfg).train()
    assert {n.split(".")[0] for n, p in model.backbone.named_parameters() if p.requires_grad} == {
        "layer2", "layer3", "layer4"}
    before = _state(model.backbone)
    img, label = torch.randn(2, 3, 33, 33), torch.randint(0, 16, (2, 33, 33))
    optimizer = build_sgd(param_groups(model, cfg), 0.01, 0.9, 1e-4)
    _, loss = model(img, label)
    loss.backward()
    optimizer.step()
    after = model.backbone.state_dict()
    moved_stats = {k.split(".")[0] for k in before if "running_" in k and not torch.equal(before[k], after[k])}
    assert moved_stats == {"layer2", "layer3", "layer4"}
    with pytest.raises(ValueError, match="needs an explicit finetune"):
        build_model(tiny_cfg(arch="pspnet", svf=False, finetune_stages=["layer4"]))


@pytest.mark.parametrize("method,backbone,message", [
    # torchvision's Swin attention reads qkv.weight / proj.weight itself: a LoRA/DnA layer there would be ignored
    ("lora", "swin_t", r"reads the weight of layer2\.[0-9.]+attn\.qkv directly .*use finetune=svf"),
    ("dna", "swin_t", r"reads the weight of layer2\.[0-9.]+attn\.qkv directly"),
])
def test_refused_combinations(method, backbone, message):
    with pytest.raises(ValueError, match=message):
        build_model(tiny_cfg(backbone=backbone, finetune=method))


def test_bn_tunes_layernorm_where_there_is_no_batchnorm():
    model = _build(_cfg("bn", backbone="swin_t"))
    modules = dict(model.backbone.named_modules())
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.backbone.named_parameters() if n.startswith(("layer2.", "layer3.", "layer4."))
                         and isinstance(modules[n.rsplit(".", 1)[0]], nn.LayerNorm)} and trainable


@pytest.mark.parametrize("arch,backbone,method", [("pfenet", "resnet18_deep", "bn"), ("baseline", "vgg16_bn", "lora"),
                                                  ("baseline", "swin_t", "bias")])
def test_other_models_and_backbones(arch, backbone, method):
    cfg = _cfg(method, arch=arch, backbone=backbone, lrcc_rank=2)
    model = _build(cfg)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == _expected(model.backbone, method, cfg) and trainable
    if method == "bias" and backbone == "swin_t":  # LayerNorm beta and Linear biases
        assert any(".norm1.bias" in n for n in trainable) and any("mlp.0.bias" in n for n in trainable)
    q, s, sm, qm = random_episode(batch=1, size=65)
    _, loss = model.train()(q, s, sm, qm)
    loss.backward()
    assert all(model.backbone.get_parameter(n).grad is not None for n in trainable)


def test_config_svf_and_finetune_rules(tmp_path):
    base = os.path.join(ROOT, "config", "pascal_split0.yaml")
    assert load_config(base).finetune is None and load_config(base).svf is True
    cfg = load_config(base, ["finetune=full"])  # the command line over the file's svf: true
    assert (cfg.svf, cfg.finetune, cfg.lr_schedule) == (False, "full", "poly")  # the nosvf block: not svf
    assert load_config(base, ["svf=true", "finetune=svf"]).svf is True
    with pytest.raises(ValueError, match="svf=True and finetune='bias' .*contradict"):
        load_config(base, ["svf=true", "finetune=bias"])
    path = tmp_path / "c.yaml"
    path.write_text("_base_: " + os.path.join(ROOT, "config", "pascal.yaml") + "\nfinetune: bias\n")
    assert load_config(str(path)).finetune == "bias"
    assert load_config(str(path), ["svf=true"]).finetune is None  # a later svf overrides the file's finetune
    assert load_config(str(path), ["svf=false"]).finetune == "bias"
    with pytest.raises(ValueError, match="svf is true exactly when finetune is svf"):
        load_config(base).replace(finetune="full")
    # one folder per method; svf true / false keep theirs
    dirs = {m: load_config(base, [f"finetune={m}"]).exp_dir for m in FINETUNE_METHODS}
    assert dirs["svf"] == load_config(base).exp_dir == "exp/pascal/baseline_svf/resnet50/split0/1shot"
    assert dirs["freeze"] == load_config(base, ["svf=false"]).exp_dir == "exp/pascal/baseline_nosvf/resnet50/split0/1shot"
    assert len(set(dirs.values())) == len(dirs)
    assert "baseline_svf_US/" in load_config(base, ["svf_factors=US"]).exp_dir
    assert "baseline_full_l34/" in load_config(base, ["finetune=full", "finetune_stages=[layer3,layer4]"]).exp_dir


def test_merged_export_loads_into_a_plain_build_with_the_same_outputs(tmp_path):
    from tools.export_merged import export_merged
    cfg = _cfg("lora", lrcc_rank=2)
    model = _build(cfg)
    _step(model, cfg)
    path, out = str(tmp_path / "last.pth"), str(tmp_path / "merged.pth")
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    assert export_merged(cfg, path, out) < 1e-4
    saved = torch.load(out, weights_only=True)
    assert saved["merged_from"] == "lora" and saved["config"]["finetune"] == "freeze"
    plain = _build(cfg.replace(svf=False, finetune="freeze"), seed=3)
    load_state_dict_strict(plain, saved["model"], out)
    x = random_episode(batch=1, size=33, seed=4)[:3]
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(*x), model.eval()(*x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="arch=bam is not exported"):
        export_merged(_cfg("lora", arch="bam"), path, out)


def test_summary_takes_key_value_words(capsys):
    from model.summary import main
    main(["--config", os.path.join(ROOT, "config", "demo_split0.yaml"), "pretrained=null", "finetune=bn",
          "backbone=resnet18_deep",
          "--set", "finetune_stages=[layer4]"])
    out = capsys.readouterr().out
    assert "finetune=bn" in out and "finetune bn:" in out
    backbone = next(line for line in out.splitlines() if line.split()[0] == "backbone")
    assert "trainable        5,120 /" in backbone  # layer4: 5 BatchNorm x 512 channels x (gamma, beta)


def test_train_and_test_run_a_method_end_to_end(tiny_voc, tmp_path):
    """train.py prints the method and its trainable count first; test.py --weights reads its checkpoint."""
    data, lists = tiny_voc
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}
    args = ["--config", "config/demo_split0.yaml", f"data_root={data}", f"list_dir={lists}", "min_class_pixels=16",
            "train_size=32", "test_size=40", "workers=0", "reduce_dim=16", "pretrained=null", "epochs=1",
            "batch_size=4", "val_episodes=4", "test_episodes=4", "test_seeds=[1]", "finetune=lora", "lrcc_rank=2",
            f"exp_dir={tmp_path / 'run'}"]
    out = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    head = out.stdout.splitlines()[:3]
    assert head[1].startswith("finetune lora:") and "backbone trainable params: " in head[1]
    assert "group 1 lora" in out.stdout
    out = subprocess.run([sys.executable, "test.py", *args, "--weights", str(tmp_path / "run" / "last.pth")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "mIoU" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
