"""benchmarks/svf_speed.py counts the arithmetic right and runs end to end on a tiny setting (its timings are
not checked here: they are reported in docs/svf.md, measured on a quiet machine)."""
import json
import os
import subprocess
import sys

import torch
import torch.nn as nn

import svf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import svf_speed  # noqa: E402


def _x():
    return (torch.randn(1, 4, 5, 5, requires_grad=True),)


def test_mac_count_of_plain_and_factored_conv_by_hand():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False))
    # plain: 8x5x5 outputs x 4x3x3 MACs each = 7,200 forward; backward 7,200 each for dx and dW
    assert svf_speed.count_macs(conv, _x(), {}) == {"forward": 7200, "backward": 14400}
    conv[0].weight.requires_grad_(False)
    assert svf_speed.count_macs(conv, _x(), {}) == {"forward": 7200, "backward": 7200}
    assert svf_speed.count_macs(conv, (torch.randn(1, 4, 5, 5),), {}) == {"forward": 7200, "backward": 0}
    factored = svf.mark_only_singular_values_as_trainable(svf.resolver(conv))
    # rank 8: V 8x5x5 x 36 = 7,200, U 8x5x5 x 8 = 1,600 forward; backward Uᵀg 1,600 + dx through V 7,200
    assert factored[0].rank == 8
    assert svf_speed.count_macs(factored, _x(), {}) == {"forward": 8800, "backward": 8800}
    # the released form (plain autograd through conv_V and conv_U) does the same arithmetic, counted per module
    svf_speed._set_variant(type("Holder", (), {"backbone": factored})(), "svf_paper")
    assert svf_speed.count_macs(factored, _x(), {}) == {"forward": 8800, "backward": 8800}
    with torch.no_grad():  # frozen: one conv with the merged weight
        assert svf_speed.count_macs(svf.resolver(conv), _x(), {})["forward"] == 7200


def test_benchmark_runs_both_models_and_writes_its_numbers(tmp_path):
    out = tmp_path / "speed.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "benchmarks/svf_speed.py", "--backbone", "resnet18_deep", "--size", "33",
                    "--iters", "1", "--warmup", "1", "--skip-inference", "--json", str(out)],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    for model in ("backbone", "fss"):
        for clock in ("wall", "cpu"):
            runs = res[model][clock]
            assert set(runs) == {"floor", "frozen", "full", "svf_paper", "svf_ours",
                                 "floor+fold", "frozen+fold", "full+fold", "svf_ours+fold"}
            assert all(r["min_s"] > 0 for r in runs.values())
            # folding changes no arithmetic and no trainable parameter, and saves memory
            for v in ("floor", "frozen", "full", "svf_ours"):
                assert runs[v]["gmacs"] == runs[v + "+fold"]["gmacs"]
                assert runs[v]["trainable"] == runs[v + "+fold"]["trainable"]
            assert runs["svf_ours+fold"]["saved_mib"] < runs["svf_ours"]["saved_mib"] < runs["svf_paper"]["saved_mib"]
            assert runs["floor"]["gmacs"] < runs["svf_ours"]["gmacs"] <= runs["svf_paper"]["gmacs"]
