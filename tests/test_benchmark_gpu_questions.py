"""The pieces of the GPU-question benchmarks checked by hand: benchmarks/s_movement.py (weight decay's factor,
float32 spacing, per-stage movement, the fixed episodes), benchmarks/loader_speed.py (its sampler, the GPU step
times it reads). The scripts themselves run end to end at toy sizes through tools/device_check.sh in
tests/test_device_check.py."""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn as nn

import svf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import loader_speed  # noqa: E402
import s_movement  # noqa: E402


def test_decay_factor_by_hand_and_as_torch_sgd_computes_it():
    # lr 0.1, wd 0.5, momentum 0.9: S 1 -> 1 - 0.1*0.5 = 0.95 -> buf 0.9*0.5 + 0.5*0.95 = 0.925 -> 0.95 - 0.0925
    assert s_movement.decay_factor(0.1, 0.5, 0.9, 0) == 1.0
    assert s_movement.decay_factor(0.1, 0.5, 0.9, 1) == pytest.approx(0.95, abs=1e-15)
    assert s_movement.decay_factor(0.1, 0.5, 0.9, 2) == pytest.approx(0.8575, abs=1e-15)
    s = torch.tensor([2.0, -3.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([s], lr=0.0015, momentum=0.9, weight_decay=1e-4)
    for _ in range(50):
        s.grad = torch.zeros_like(s)
        opt.step()
    f = s_movement.decay_factor(0.0015, 1e-4, 0.9, 50)
    torch.testing.assert_close(s.detach(), torch.tensor([2.0, -3.0], dtype=torch.float64) * f, rtol=1e-15, atol=0)
    assert 0 < 1 - f < 50 * 0.0015 * 1e-4 * 10  # it decays, by less than 50 steps at momentum's full 10x


def test_spacing_is_float32s_gap_away_from_zero():
    got = s_movement.spacing(torch.tensor([1.0, 1.5, 2.0, -1.0, 0.75, 1e-3]))
    want = torch.tensor([2.0 ** -23, 2.0 ** -23, 2.0 ** -22, 2.0 ** -23, 2.0 ** -24, 2.0 ** -33])
    assert torch.equal(got, want)


def _stages():
    """A stand-in backbone: layer2 and layer3 with two singular values each (1x1 convs), layer0 frozen."""
    torch.manual_seed(0)
    model = nn.Module()
    for name in ("layer0", "layer2", "layer3"):
        setattr(model, name, svf.resolver(nn.Sequential(nn.Conv2d(2, 2, 1, bias=False))))
    with torch.no_grad():
        for name, s in (("layer0", [1.0, 1.0]), ("layer2", [3.0, 4.0]), ("layer3", [1.0, 2.0])):
            getattr(model, name)[0].vector_S.copy_(torch.tensor(s).view_as(getattr(model, name)[0].vector_S))
    model.layer0.requires_grad_(False)
    return model


def test_stage_stats_and_rounding_error_by_hand():
    model = _stages()
    start = s_movement.s_values(model)
    with torch.no_grad():
        model.layer2[0].vector_S.copy_(torch.tensor([3.0 * 0.5, 4.0 * 0.5 + 1.0]).view_as(model.layer2[0].vector_S))
        model.layer0[0].vector_S.add_(1.0)  # frozen: not reported
    stats = s_movement.stage_stats(model, start, factor=0.5)
    assert set(stats) == {"layer2", "layer3"}
    # layer2: S - S0 = (-1.5, -1), |S0| = 5; beyond decay: S - 0.5 S0 = (0, 1)
    assert stats["layer2"]["rel_change"] == pytest.approx(math.sqrt(1.5 ** 2 + 1) / 5)
    assert stats["layer2"]["rel_change_beyond_decay"] == pytest.approx(1 / 5)
    assert stats["layer2"]["unchanged"] == 0 and stats["layer2"]["entries"] == 2
    # layer3 did not move: unchanged 1, and "beyond decay" is the decay it did not follow
    assert stats["layer3"]["rel_change"] == 0 and stats["layer3"]["unchanged"] == 1
    assert stats["layer3"]["rel_change_beyond_decay"] == pytest.approx(0.5)
    kept = s_movement.s_values(model)
    plain = {k: v.clone() for k, v in kept.items()}
    key = "layer2.0.vector_S"
    plain[key] = plain[key] + torch.tensor([0.0, 0.3]).view_as(plain[key])
    err = s_movement.rounding_error(start, plain, kept)
    assert set(err) == {"layer0", "layer2"}  # the stages that moved in either run
    assert err["layer2"] == pytest.approx(0.3 / 5)


def test_fixed_episodes_share_their_class():
    cfg = s_movement.recipe_config(type("A", (), {"backbone": "resnet18_deep", "size": 65, "batch": 3})())
    batches = s_movement.synthetic_batches(cfg, num_batches=2, batch=3, seed=0)
    assert len(batches) == 2
    again = s_movement.synthetic_batches(cfg, num_batches=2, batch=3, seed=0)
    for (q, s, sm, qm), b in zip(batches, again):
        assert q.shape == (3, 3, 65, 65) and s.shape == (3, 1, 3, 65, 65)
        assert sm.shape == (3, 1, 65, 65) and qm.shape == (3, 65, 65)
        assert all(torch.equal(x, y) for x, y in zip((q, s, sm, qm), b))  # fixed by the seed
        assert set(torch.unique(qm).tolist()) <= {0, 1, 255} and set(torch.unique(sm).tolist()) <= {0, 1, 255}
        for i in range(3):  # the episode's class is in the query and in its support
            assert (qm[i] == 1).any() and (sm[i] == 1).any()


def test_loader_cycle_repeats_one_permutation():
    sampler = loader_speed.Cycle(5, 12, seed=3)
    order = list(sampler)
    assert len(sampler) == 12 and len(order) == 12
    assert sorted(order[:5]) == list(range(5)) and order[5:10] == order[:5] and order[10:] == order[:2]


def test_loader_reads_gpu_step_times(tmp_path):
    speed = {"args": {"batch": 8, "shot": 1}, "fss": {"wall": {"svf_ours": {"min_s": 0.2},
                                                              "svf_ours+fold": {"min_s": 0.1}}}}
    five = {"args": {"batch": 8, "shot": 5}, "methods": {"svf": {"float32": {"min_s": 0.4}, "amp": {"min_s": 0.25}}}}
    paths = []
    for name, content in (("speed.json", speed), ("five.json", five), ("other.json", {"args": {}})):
        paths.append(str(tmp_path / name))
        (tmp_path / name).write_text(json.dumps(content))
    got = loader_speed.gpu_step_times(paths + [str(tmp_path / "missing.json")])
    assert got[1] == {"step_s": 0.1, "batch": 8, "source": "speed.json: fss svf_ours+fold"}
    assert got[5] == {"step_s": 0.4, "batch": 8, "source": "five.json: method svf, float32", "amp_step_s": 0.25}
    assert set(got) == {1, 5}
