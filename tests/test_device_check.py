"""tools/device_check.sh on a machine without CUDA: one clear line and a non-zero exit, nothing run or written; an
unknown step named the same way; and the GPU-question steps at toy sizes on the CPU (DEVICE_CHECK_TINY=1: the
benchmarks s_movement, finetune_speed and loader_speed end to end through the script, their JSON files and the
summary tools/device_summary.py writes from them)."""
import json
import os
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, **env):
    return subprocess.run(["sh", "tools/device_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "out"), **env})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run the whole check")
def test_device_check_refuses_without_cuda(tmp_path):
    out = _run(tmp_path)
    assert out.returncode == 2
    assert out.stdout == "" and out.stderr.count("\n") == 1
    assert "needs a CUDA GPU" in out.stderr and "GPU machine" in out.stderr
    assert not (tmp_path / "out").exists()


def test_device_check_refuses_an_unknown_step(tmp_path):
    out = _run(tmp_path, DEVICE_CHECK_STEPS="s_movement loader_sped")
    assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1
    assert "unknown step 'loader_sped'" in out.stderr and "loader_speed" in out.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_question_steps_at_toy_size_on_the_cpu(tmp_path):
    """The three new benchmarks through the script; the loader is compared with a GPU step time given by hand
    (the svf_speed.json the skipped svf_speed step would have written)."""
    (tmp_path / "out").mkdir()
    speed = {"args": {"batch": 8, "shot": 1, "size": 473, "iters": 3},
             "fss": {"wall": {"svf_ours+fold": {"min_s": 0.5, "peak_mib": 100.0, "saved_mib": 50.0}}}}
    (tmp_path / "out" / "svf_speed.json").write_text(json.dumps(speed))
    out = _run(tmp_path, DEVICE_CHECK_TINY="1", DEVICE_CHECK_STEPS="s_movement finetune_speed loader_speed")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    folder = tmp_path / "out"
    summary = (folder / "summary.txt").read_text()
    for name in ("s_movement", "finetune_speed", "loader_speed"):
        assert any(line.startswith(name) and " ok " in line for line in summary.splitlines()), (name, summary)
    assert "pytest_cuda" not in summary and "stage1" not in summary  # steps not chosen do not run

    moved = json.loads((folder / "s_movement.json").read_text())
    assert moved["recipe"]["lr_S"] == pytest.approx(0.0015) and moved["recipe"]["weight_decay_S"] == 1e-4
    assert set(moved["runs"]) == {"float32", "float32+keep"}
    for run in moved["runs"].values():
        assert set(run["stages"]) == {"layer2", "layer3", "layer4"} and run["applied_steps"] == 2 and run["finite"]
        for st in run["stages"].values():
            assert st["rel_change"] > 0 and 0 <= st["unchanged"] <= 1
    # the two runs start alike and differ only by rounding: by less than S moved
    for stage, err in moved["rounding_error"]["float32"].items():
        assert 0 < err < moved["runs"]["float32+keep"]["stages"][stage]["rel_change"]

    methods = json.loads((folder / "finetune_speed.json").read_text())["methods"]
    assert set(methods) == {"freeze", "svf"}
    assert methods["freeze"]["trainable_backbone"] == 0 < methods["svf"]["trainable_backbone"]
    assert all(m["float32"]["min_s"] > 0 and m["float32"]["finite"] for m in methods.values())

    loader = json.loads((folder / "loader_speed.json").read_text())
    assert set(loader["results"]) == {"1shot_w0", "1shot_w1", "5shot_w0", "5shot_w1"}
    for r in loader["results"].values():
        assert r["episodes_per_s"] > 0 and r["shapes"]["support_imgs"] == [8, r["shot"], 3, 65, 65]
    assert loader["gpu"]["1"]["episodes_per_s"] == 16.0  # batch 8 / 0.5 s
    one = loader["results"]["1shot_w1"]
    assert one["loader_over_gpu"] == pytest.approx(one["episodes_per_s"] / 16)
    assert "loader_over_gpu" not in loader["results"]["5shot_w1"]  # no 5-shot step time given

    for title in ("Q1 does the released recipe", "Q2 step time", "Q3 can the loader", "Q4 every fine-tuning"):
        assert title in summary
    assert "unreadable" not in summary and "float32+keep  layer4" in summary
    assert "svf_ours+fold       0.5000" in summary  # Q2 from the given svf_speed.json


def test_step_limits_fit_one_eight_minute_gpu_call():
    """The per-step limits of the GPU run sum to at most 8 minutes (the device machine allows 10 a command)."""
    import re
    with open(os.path.join(ROOT, "tools", "device_check.sh")) as f:
        text = f.read()
    limits = {m.group(1): int(m.group(2)) for m in re.finditer(r"^step (\w+) (\d+) ", text, re.M)}
    steps = re.search(r'^ALL_STEPS="([^"]+)"', text, re.M).group(1).split()
    assert sorted(limits) == sorted(steps)  # every step has a limit and is listed
    assert sum(limits.values()) <= 480
