"""timm backbones (``backbone: timm:<name>``, model/timm_backbone.py) on small configurations built without weights:
a DINOv2-style ViT (patch 14, layer scale, register tokens), a DINOv3-style ViT (timm's Eva: patch 16, rotary
position embeddings, registers), a ConvNeXt and a ResNet.

Per family: features of the expected strides and widths, the same function as timm's own forward; weights files
(safetensors and .pth, as timm/hub write them) load strictly, another model's file or an unknown name is one line;
every FSS arch trains a step and evaluates; every finetune method trains exactly its declared set (written out here
independently of the registry), one step moves exactly it, merging gives the trained model; SVF's resolve and merge
are exact on these blocks and timm's fused attention stays in use; LoRA/DnA on Linear layers merge exactly."""
import contextlib
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrcc
import svf
from common.config import FINETUNE_METHODS
from engine.optim import build_sgd
from model import build_backbone, build_model, finetune, param_groups
from model.summary import summarize
from model.weights import load_backbone_weights
from conftest import random_episode, tiny_cfg

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")

DINOV2 = "timm:vit_small_patch14_reg4_dinov2"
DINOV3 = "timm:vit_small_patch16_dinov3"
CONVNEXT = "timm:convnext_atto"
RESNET = "timm:resnet18"
# timm.create_model options of the small test models. Layer scale starts at 0.1 (the published models start at 1e-5,
# trained ones hold ~0.1-1): at 1e-5 a random block's gradients are ~1e-10 and one test step would not move S.
SMALL = {
    DINOV2: dict(embed_dim=32, depth=4, num_heads=2, img_size=56, init_values=0.1),
    DINOV3: dict(embed_dim=32, depth=4, num_heads=2, img_size=64, init_values=0.1),
    CONVNEXT: dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), ls_init_value=0.1),  # layer scale as above
    RESNET: dict(layers=(1, 1, 1, 1), zero_init_last=False),  # timm zeroes the last BatchNorm of each block
}
SWIN = "timm:swin_tiny_patch4_window7_224"  # the hierarchical family's other member: features only
DINOV2_PLAIN = "timm:vit_small_patch14_dinov2"  # DINOv2 without registers, the name the README lists first
EXTRA = {SWIN: dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
         DINOV2_PLAIN: dict(embed_dim=32, depth=4, num_heads=2, img_size=56)}
# what each family must give at a 64x64 input: (widths layer0..4, strides layer0..4)
FEATURES = {
    SWIN: ((24, 24, 48, 96, 192), (4, 4, 8, 16, 32)), DINOV2_PLAIN: ((32,) * 5, (14,) * 5),
    DINOV2: ((32,) * 5, (14,) * 5), DINOV3: ((32,) * 5, (16,) * 5),
    CONVNEXT: ((8, 8, 16, 32, 64), (4, 4, 8, 16, 32)), RESNET: ((64, 64, 128, 256, 512), (4, 4, 8, 8, 8)),
}
# the parameter-name prefixes of layer2-4 (the default finetune_stages), written out per model
TUNED = {
    DINOV2: ("net.blocks.1.", "net.blocks.2.", "net.blocks.3.", "net.norm."),
    DINOV3: ("net.blocks.1.", "net.blocks.2.", "net.blocks.3.", "net.norm."),
    CONVNEXT: ("net.stages.1.", "net.stages.2.", "net.stages.3."),
    RESNET: ("net.layer2.", "net.layer3.", "net.layer4."),
}
FAST = dict(base_lr=0.1, svf_lr_mult=100.0, backbone_lr_mult=1.0, bias_lr_mult=1.0, bn_lr_mult=1.0,
            lora_lr_mult=1.0, dna_lr_mult=1.0, dna_compress_step=2, lrcc_rank=2)


def _backbone(name, seed=0):
    torch.manual_seed(seed)
    return build_backbone(name, timm_kwargs=EXTRA.get(name) or SMALL[name]).eval()


def _cfg(name, method="freeze", **extra):
    keys = dict(FAST, backbone=name, backbone_kwargs=SMALL[name], finetune=method, svf=method == "svf")
    keys.update(extra)
    return tiny_cfg(**keys)


def _build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(SMALL) + list(EXTRA))
def test_features_have_the_family_widths_and_strides(name):
    backbone = _backbone(name)
    widths, strides = FEATURES[name]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone(x)
    assert tuple(backbone.channels[s] for s in ("layer0", "layer1", "layer2", "layer3", "layer4")) == widths
    patch = strides[0] if name in (DINOV2, DINOV3, DINOV2_PLAIN) else None
    for f, width, stride in zip(feats, widths, strides):
        side = int(64 / patch + 0.5) if patch else -(-64 // stride)  # a ViT: the image rounded to whole patches
        assert tuple(f.shape) == (2, width, side, side), (name, tuple(f.shape))
    assert backbone.output_stride == strides[-1]


def test_the_test_models_have_the_published_block_types():
    v2, v3 = _backbone(DINOV2).net, _backbone(DINOV3).net
    assert type(v2).__name__ == "VisionTransformer" and v2.patch_embed.patch_size == (14, 14)
    assert v2.reg_token is not None and v2.reg_token.shape[1] == 4 and v2.num_prefix_tokens == 5
    assert type(v2.blocks[0].ls1).__name__ == "LayerScale"  # DINOv2's layer scale
    assert type(v3).__name__ == "Eva" and v3.patch_embed.patch_size == (16, 16) and v3.rope is not None
    assert v3.num_prefix_tokens == 5 and v3.blocks[0].gamma_1 is not None  # registers, layer scale
    assert v2.pos_embed is not None and v3.pos_embed is None  # DINOv3: rotary position embeddings only


@pytest.mark.parametrize("name", [DINOV2, DINOV3])
def test_vit_features_are_timms_own_forward(name):
    backbone = _backbone(name)
    net = backbone.net
    x = torch.randn(2, 3, 70, 42) if name == DINOV2 else torch.randn(2, 3, 64, 48)  # whole patches
    with torch.no_grad():
        feats = backbone(x)
        tokens = net.forward_features(x)[:, net.num_prefix_tokens:]
    h, w = x.shape[-2] // backbone.patch, x.shape[-1] // backbone.patch
    torch.testing.assert_close(feats[4], tokens.transpose(1, 2).reshape(2, -1, h, w), rtol=0, atol=0)
    with torch.no_grad():  # other sizes are resized to the nearest multiple of the patch
        odd = backbone(torch.randn(1, 3, 33, 47))
    p = backbone.patch
    assert odd[4].shape[-2:] == (int(33 / p + 0.5), int(47 / p + 0.5))


def test_layer4_mask_multiplies_the_patch_tokens_layer4_reads():
    backbone = _backbone(DINOV3)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ones = backbone(x, layer4_mask=torch.ones(1, 1, 64, 64))
        plain = backbone(x)
        zeros = backbone(x, layer4_mask=torch.zeros(1, 1, 64, 64))
    assert all(torch.equal(a, b) for a, b in zip(ones, plain))
    assert torch.equal(zeros[3], plain[3]) and not torch.allclose(zeros[4], plain[4])


@pytest.mark.parametrize("name", [DINOV2, DINOV3, CONVNEXT, RESNET])
def test_timm_weight_files_load_strictly(name, tmp_path):
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(1)
    dynamic = dict(dynamic_img_size=True) if name in (DINOV2, DINOV3) else {}  # the same tensors, any input size
    net = timm.create_model(name[len("timm:"):], pretrained=False, num_classes=7, **SMALL[name], **dynamic).eval()
    state = {k: v.contiguous() for k, v in net.state_dict().items()}  # with its classifier, as timm saves it
    save_file(state, str(tmp_path / "model.safetensors"))
    torch.save(state, tmp_path / "model.pth")
    x = torch.randn(1, 3, 56, 56) if name == DINOV2 else torch.randn(1, 3, 64, 64)  # whole patches
    results = []
    for file in ("model.safetensors", "model.pth"):
        backbone = load_backbone_weights(_backbone(name, seed=5), tmp_path / file)
        assert all(torch.equal(backbone.state_dict()["net." + k], v) for k, v in state.items()
                   if "net." + k in backbone.state_dict())
        with torch.no_grad():
            results.append(backbone(x)[4])
    assert torch.equal(*results)
    if name in (DINOV2, DINOV3):
        with torch.no_grad():
            reference = net.forward_features(x)[:, net.num_prefix_tokens:]
        torch.testing.assert_close(results[0].flatten(2).transpose(1, 2), reference, rtol=0, atol=0)


def test_bad_weights_and_names_are_one_line(tmp_path):
    import timm
    other = timm.create_model("resnet18", pretrained=False, num_classes=0, layers=(1, 1, 1, 1))
    torch.save(other.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="holds another model's weights") as err:
        load_backbone_weights(_backbone(DINOV2), tmp_path / "resnet.pth")
    assert "\n" not in str(err.value)
    state = _backbone(DINOV3).net.state_dict()
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight' has 1 NaN"):
        load_backbone_weights(_backbone(DINOV3), tmp_path / "nan.pth")
    wider = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0,
                              **dict(SMALL[DINOV3], embed_dim=64))
    torch.save(wider.state_dict(), tmp_path / "wider.pth")
    with pytest.raises(ValueError, match="of another shape") as err:
        load_backbone_weights(_backbone(DINOV3), tmp_path / "wider.pth")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="has no model 'vit_small_patch14_dinov' ; did you mean|has no model") as err:
        build_backbone("timm:vit_small_patch14_dinov")
    assert "vit_small_patch14_dinov2" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="finetune_stages entry 'blocks.2-9': .* has modules 0-3"):
        build_model(_cfg(DINOV2, "full", finetune_stages=["blocks.2-9"]))
    with pytest.raises(ValueError, match="finetune_stages entry 'stages.0'.* layer0, layer1"):
        build_model(tiny_cfg(finetune="full", finetune_stages=["stages.0"]))


@pytest.mark.parametrize("arch", ["baseline", "pfenet", "bam", "pspnet"])
def test_every_arch_trains_a_step_and_evaluates_on_a_vit(arch):
    cfg = _cfg(DINOV3, "svf" if arch != "pspnet" else "full", arch=arch)
    model = _build(cfg)
    optimizer = build_sgd(param_groups(model, cfg), cfg.base_lr, cfg.momentum, cfg.weight_decay)
    q, s, sm, qm = random_episode(batch=2, size=40, seed=1)
    model.train()
    if arch == "pspnet":
        _, loss = model(q, qm.clamp(max=15))
    else:
        extra = {"class_id": torch.tensor([6, 7])} if arch == "bam" else {}
        _, loss = model(q, s, sm, qm, **extra)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(q) if arch == "pspnet" else model(q, s, sm)
    assert out.shape[0] == 2 and out.shape[-2:] == (40, 40) and torch.isfinite(out).all()
    if arch == "bam":  # its base learner reads an untouched frozen copy, from the image
        assert int(model.base_shared_stages) == 0 and not any(p.requires_grad for p in model.base_backbone.parameters())


def _expected(name, backbone, method):
    """The trainable names of ``method`` on layer2-4, written out per method."""
    names = [n for n, _ in backbone.named_parameters() if n.startswith(TUNED[name])]
    modules = dict(backbone.named_modules())
    owner = lambda n: modules[n.rsplit(".", 1)[0]]  # noqa: E731
    norm = nn.BatchNorm2d if name == RESNET else nn.LayerNorm  # bn: LayerNorm where there is no BatchNorm
    return {
        "freeze": set(), "full": set(names), "bias": {n for n in names if n.endswith(".bias")},
        "bn": {n for n in names if isinstance(owner(n), norm)},
        "svf": {n for n in names if n.endswith("vector_S")},
        "lora": {n for n in names if n.endswith(("lora_A", "lora_B"))},
        "dna": {n for n in names if n.endswith(("lora_B", "sparse_weight"))},
    }[method]


@pytest.mark.parametrize("method", FINETUNE_METHODS)
@pytest.mark.parametrize("name", list(SMALL))
def test_every_method_trains_exactly_its_set_and_merges(name, method):
    cfg = _cfg(name, method)
    model = _build(cfg)
    backbone = model.backbone
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    expected = _expected(name, backbone, method)
    assert trainable == expected, sorted(trainable ^ expected)[:5]
    assert (method == "freeze") == (not trainable)
    if method in ("svf", "lora", "dna"):  # every Linear of attention and MLP (every conv of a CNN) converted
        kinds = (svf.SVDLayer,) if method == "svf" else lrcc.LOW_RANK_LAYERS
        plain = nn.Linear if name in (DINOV2, DINOV3) else nn.Conv2d
        factors = (".fc_V", ".fc_U", ".conv_V", ".conv_U")  # the plain layers inside an SVD layer
        left = [n for n, m in backbone.named_modules() if (n + ".").startswith(TUNED[name]) and type(m) is plain
                and not n.endswith(factors)]
        assert not left, left[:3]
        if name in (DINOV2, DINOV3):
            converted = {n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, kinds)}
            assert converted == {"qkv", "proj", "fc1", "fc2"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_sgd(param_groups(model, cfg), cfg.base_lr, cfg.momentum, cfg.weight_decay)
    q, s, sm, qm = random_episode(batch=2, size=96, seed=3)  # layer4 at 3x3 or more: the support mask reaches it
    model.train()
    torch.manual_seed(0)
    _, loss = model(q, s, sm, qm)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    moved = {k[len("backbone."):] for k, v in model.state_dict().items()
             if k.startswith("backbone.") and not torch.equal(v, before[k])}
    # DnA's sparse part moves on its support only: a depthwise conv's (1 x 49) group matrices are exactly low rank
    empty = {n for n in trainable if n.endswith("sparse_weight")
             and not backbone.get_buffer(n.replace("sparse_weight", "sparse_mask")).any()}
    assert moved == trainable - empty, sorted(moved ^ (trainable - empty))[:5]  # BatchNorm statistics stay
    assert not empty or (name == CONVNEXT and all(".conv_dw." in n for n in empty))
    if finetune.METHODS[method].merge is not None:
        model.eval()
        with torch.no_grad():
            trained = model(q, s, sm)
            plain_model = finetune.merged(model, cfg).eval()
            assert not any(isinstance(m, (svf.SVDLayer,) + lrcc.LOW_RANK_LAYERS) for m in plain_model.modules())
            torch.testing.assert_close(plain_model(q, s, sm), trained, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(SMALL))
def test_svf_resolve_and_merge_are_exact(name):
    backbone = _backbone(name)
    x = torch.randn(2, 3, 64, 64)
    resolved = svf.resolver(backbone).eval()
    with torch.no_grad():
        plain, ours = backbone(x), resolved(x)
        assert all(_rel(a, b) <= 1e-5 for a, b in zip(ours, plain)), [_rel(a, b) for a, b in zip(ours, plain)]
        g = torch.Generator().manual_seed(0)
        for m in resolved.modules():
            if isinstance(m, svf.SVDLayer):
                m.vector_S.mul_(1 + 0.1 * torch.randn(m.vector_S.shape, generator=g))
        tuned = resolved(x)
        merged = svf.merge(resolved).eval()(x)
    assert _rel(tuned[4], plain[4]) > 1e-3
    assert all(_rel(a, b) <= 1e-5 for a, b in zip(merged, tuned))


@pytest.mark.parametrize("name", [DINOV2, DINOV3])
def test_resolved_attention_keeps_timms_fused_kernel(name, monkeypatch):
    model = _build(_cfg(name, "svf"))
    attentions = [m for n, m in model.backbone.named_modules() if n.endswith(".attn")]
    assert attentions and all(a.fused_attn for a in attentions)
    assert all(isinstance(a.qkv, svf.SVD_Linear) and isinstance(a.proj, svf.SVD_Linear)
               for a in attentions[1:])  # blocks 1-3 tuned; block 0 (layer1) stays plain
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    q, s, sm, qm = random_episode(batch=1, size=40, seed=3)
    model.train()
    _, loss = model(q, s, sm, qm)
    loss.backward()
    assert len(calls) == 2 * len(attentions)  # query and support pass, every block
    assert all(a.qkv.vector_S.grad is not None for a in attentions[1:])


def test_lora_on_linear_layers_merges_exactly_and_refuses_weight_readers():
    vit = _backbone(DINOV2)
    converted = lrcc.model_convert_conv(vit.net.blocks, "lora_mode", r=4, include_linear=True, verbose=False)
    layers = [m for m in converted.modules() if isinstance(m, lrcc.LowRankLinear)]
    assert len(layers) == 16
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in layers:
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        out, plain = converted(x), vit.net.blocks(x)
        merged = lrcc.merge(converted)(x)
    assert _rel(out, plain) > 1e-3 and _rel(merged, out) <= 1e-5
    assert not any(isinstance(m, lrcc.LOW_RANK_LAYERS) for m in lrcc.merge(converted).modules())
    # the adapter file holds the Linear layers' factors: into the plain blocks (merged) or as lrcc layers
    saved = lrcc.state_dict(converted)
    assert len(saved["layers"]) == 16 and all("in_features" in o for o in saved["layers"].values())
    import copy
    with torch.no_grad():
        into_plain = lrcc.load_state_dict(copy.deepcopy(vit.net.blocks), saved)
        as_layers = lrcc.load_state_dict(copy.deepcopy(vit.net.blocks), saved, merge=False)
        assert _rel(into_plain(x), out) <= 1e-5 and torch.equal(as_layers(x), out)
    # timm's *_qkvb attention reads qkv.weight with its separate q/k/v biases: a LoRA there would be ignored
    with pytest.raises(ValueError, match="reads the weight of .*attn.qkv directly") as err:
        _build(tiny_cfg(backbone="timm:vit_small_patch16_dinov3_qkvb", backbone_kwargs=SMALL[DINOV3],
                        finetune="lora", lrcc_rank=2))
    assert "\n" not in str(err.value)


def test_module_paths_as_finetune_stages_and_the_summary():
    cfg = _cfg(DINOV2, "full", finetune_stages=["blocks.2-3"])
    model = _build(cfg)
    trainable = {n.split(".")[2] for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"2", "3"}
    assert "_blocks2-3" in cfg.exp_dir
    part = _build(_cfg(DINOV2, "svf", finetune_stages=["blocks.3.attn"]))  # a module inside a block
    assert {n for n, p in part.backbone.named_parameters() if p.requires_grad} == {
        "net.blocks.3.attn.qkv.vector_S", "net.blocks.3.attn.proj.vector_S"}
    assert type(part.backbone.net.blocks[3].mlp.fc1) is nn.Linear  # outside the tuned module: left plain
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model = summarize(_cfg(DINOV3, "svf"), file=out)
    text = out.getvalue()
    assert "(timm-vit): layer0 = patch_embed" in text and "layer4 = blocks.3 .. norm" in text
    per_block = sum(p.numel() for p in model.backbone.net.blocks[3].parameters() if p.requires_grad)
    assert per_block == 4 * 32  # the singular values of qkv, proj, fc1, fc2 (rank 32 each)
    assert f"{'layer4':<14s} trainable {per_block:>12,d}" in text
    assert f"{'layer1':<14s} trainable {0:>12,d}" in text


TINY_VIT = "{embed_dim: 16, depth: 4, num_heads: 2, patch_size: 8, img_size: 32, init_values: 0.1}"


def _tiny_run(tiny_voc):
    data, lists = tiny_voc
    return ["--config", "config/demo_vit.yaml", f"data_root={data}", f"list_dir={lists}", "min_class_pixels=16",
            "train_size=32", "test_size=40", "workers=0", "reduce_dim=16", "batch_size=8", "val_episodes=2",
            "test_episodes=4", "test_seeds=[1,2]", "deterministic=true", f"backbone_kwargs={TINY_VIT}"]


def _run(args, ok=True):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_a_timm_checkpoint_resumes_bit_exactly_tests_and_exports_merged(tiny_voc, tmp_path):
    """train.py on the ViT demo config (SVF), stopped after one epoch and resumed = uninterrupted, bit for bit;
    test.py evaluates the checkpoint; tools/export_merged.py merges it and the merged file tests as finetune=freeze."""
    args = _tiny_run(tiny_voc) + ["finetune=svf", "epochs=2"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    out = _run(["train.py", *args, f"exp_dir={whole}"])
    assert "(timm-vit)" in out.stdout or "trainable params" in out.stdout
    _run(["train.py", *args, f"exp_dir={parts}", "--stop-after", "1"])
    _run(["train.py", *args, f"exp_dir={parts}", "--resume"])
    a = torch.load(f"{whole}/last.pth", weights_only=True)["model"]
    b = torch.load(f"{parts}/last.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and any("vector_S" in k for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    tested = _run(["test.py", *args, f"exp_dir={whole}"])
    assert "mIoU" in tested.stdout
    merged = str(tmp_path / "merged.pth")
    exported = _run(["tools/export_merged.py", *args, f"exp_dir={whole}", "--out", merged])
    difference = float(exported.stdout.strip().rsplit(" ", 1)[-1])
    assert difference < 1e-4
    plain = torch.load(merged, weights_only=True)["model"]
    assert not any("vector_S" in k for k in plain) and "backbone.net.blocks.3.attn.qkv.weight" in plain
    again = _run(["test.py", *args, f"exp_dir={whole}", "finetune=freeze", "svf=false", "--weights", merged])
    assert "mIoU" in again.stdout


def test_ablate_compares_methods_on_a_vit_in_one_command(tiny_voc, tmp_path):
    import json
    out = str(tmp_path / "abl")
    _run(["tools/ablate.py", "--config", "config/demo_vit.yaml", "--methods", "svf,lora", "--train-seeds", "1",
          "--out", out, *_tiny_run(tiny_voc)[2:], "epochs=1"])
    with open(f"{out}/ablation.json") as fh:
        rows = {r["method"]: r for r in json.load(fh)["rows"]}
    assert set(rows) == {"untrained", "svf", "lora"}
    # the tiny ViT's layer2-4 = blocks 1-3: SVF trains 4 x 16 singular values per block, LoRA rank 1 the factors
    assert rows["svf"]["trainable_backbone"] == 3 * 4 * 16
    assert rows["lora"]["trainable_backbone"] == 3 * ((16 + 48) + (16 + 16) + (16 + 64) + (64 + 16))


def test_one_registry_entry_per_family_decides_every_name():
    from model.backbones import BACKBONES, FAMILIES, family_of
    names = {"resnet50": "resnet-deep", "resnet18_deep_half": "resnet-deep", "resnet50_tv": "torchvision",
             "vgg16_bn": "vgg", "swin_t": "swin", "timm:vit_small_patch14_dinov2": "timm-vit",
             "timm:vit_large_patch16_dinov3": "timm-vit", "timm:deit_small_patch16_224": "timm-vit",
             "timm:eva02_small_patch14_224": "timm-vit", "timm:convnext_tiny": "timm-hierarchical",
             "timm:swin_base_patch4_window7_224": "timm-hierarchical", "timm:resnet50": "timm-cnn",
             "timm:efficientnet_b0": "timm-cnn"}
    assert {n: family_of(n).name for n in names} == names
    assert len({f.name for f in FAMILIES}) == len(FAMILIES) and all(f.layers and f.strides for f in FAMILIES)
    assert {n for f in FAMILIES for n in f.names} == set(BACKBONES)  # every fixed name has exactly one family
    with pytest.raises(ValueError, match="unknown backbone 'resnet5'"):
        family_of("resnet5")


def test_pretrained_hub_lets_timm_download_and_the_weight_rule_applies(monkeypatch):
    """pretrained=hub: timm.create_model(pretrained=True) (faked here: nothing is downloaded) and the weight rule."""
    import timm
    calls = []
    real = timm.create_model

    def fake(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        net = real(name, pretrained=False, **kwargs)
        with torch.no_grad():
            net.blocks[0].mlp.fc1.weight[0, 0] = float("inf")  # a broken download
        return net

    monkeypatch.setattr(timm, "create_model", fake)
    with pytest.raises(ValueError, match=r"'hub:timm:vit_small_patch16_dinov3' holds unusable weights: tensor "
                                         r"'net.blocks.0.mlp.fc1.weight'"):
        build_model(_cfg(DINOV3, "svf", pretrained="hub"))
    assert calls == [True]
    with pytest.raises(ValueError, match="pretrained=hub and backbone_kwargs apply to backbone=timm:<name> only"):
        build_model(tiny_cfg(pretrained="hub"))
