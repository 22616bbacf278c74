"""SVF on the deep-stem ResNet-50 (the paper's setting): exactly 12,544 trainable singular values in
layer2-4 besides the heads, gradients only on those, output stride 8, summary counts per stage."""
import io

import pytest
import torch

import svf
from model import STAGES
from model.summary import main, summarize
from conftest import random_episode, tiny_cfg

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")


@pytest.fixture(scope="module")
def model_and_summary():
    out = io.StringIO()
    torch.manual_seed(0)
    model = summarize(tiny_cfg(arch="baseline", backbone="resnet50", svf=True, pretrained=None), file=out)
    return model, out.getvalue()


def test_resnet50_svf_trains_heads_and_12544_singular_values(model_and_summary):
    model, _ = model_and_summary
    trainable, _ = svf.count_parameters(model)
    heads = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone."))
    per_stage = [svf.count_parameters(getattr(model.backbone, s))[0] for s in STAGES]
    assert per_stage == [0, 0, 1792, 5120, 5632] and trainable == heads + 12544


def test_resnet50_svf_backward_and_output_stride(model_and_summary):
    model, _ = model_and_summary
    model.train()
    q, s, sm, qm = random_episode(batch=1, shot=1, size=65)
    logits, loss = model(q, s, sm, qm)
    model.zero_grad(set_to_none=True)
    loss.backward()
    assert logits.shape == (1, 2, 65, 65)
    grads = {n for n, p in model.backbone.named_parameters() if p.grad is not None}
    expected = {n for n, _ in model.backbone.named_parameters()
                if n.endswith("vector_S") and n.split(".")[0] in ("layer2", "layer3", "layer4")}
    assert grads == expected and len(expected) == 42  # every conv of layer2-4 (13 + 19 + 10)
    with torch.no_grad():
        feats = model.backbone(q)
    assert [f.shape[-1] for f in feats] == [17, 17, 9, 9, 9]  # (65 - 1) / 8 + 1 = 9: output stride 8


def test_summary_prints_trainable_line_and_stage_counts(model_and_summary):
    _, text = model_and_summary
    model, _ = model_and_summary
    trainable, total = svf.count_parameters(model)
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in text
    for stage, n in zip(STAGES, (0, 0, 1792, 5120, 5632)):
        assert any(line.split()[0] == stage and f" {n:,d} /" in line for line in text.splitlines()), stage
    assert "heads (all)" in text


def test_summary_command_line_reads_config_and_overrides(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text("arch: pfenet\nbackbone: resnet18_deep\nsvf: false\nbenchmark: pascal\nfold: 1\n"
                      f"pretrained: {tmp_path / 'missing.pth'}\nreduce_dim: 16\n")
    main(["--config", str(config), "--set", "arch=bam"])
    out = capsys.readouterr().out
    assert "note: pretrained file" in out and "missing.pth" in out and "random initialisation" in out
    assert "arch=bam backbone=resnet18_deep svf=False" in out and "trainable params: " in out
    base_line = next(line for line in out.splitlines() if line.split()[0] == "base_learner")
    assert "trainable            0 /" in base_line  # the base learner is frozen
