"""train.py + test.py end to end on a tiny synthetic dataset: stage 1, few-shot training with SVF,
resume (after --stop-after and after Ctrl-C) equal to an uninterrupted run, 2 gloo processes
under torchrun, test.py identical for 1/2 processes and 0/2 workers, NaN stop, and the clear
errors for missing data, lists, stage-1 checkpoint and bad keys."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}


def command(script, args, nproc=1):
    if nproc == 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc_per_node", str(nproc), script, *args]


def run(script, args, nproc=1, ok=True):
    out = subprocess.run(command(script, args, nproc), cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=600)
    if ok:
        assert out.returncode == 0, f"{script} {args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_voc):
    """The tiny VOC-layout dataset + lists, a stage-1 checkpoint, and the overrides of a tiny run."""
    tmp = tmp_path_factory.mktemp("e2e")
    data, lists = tiny_voc
    stage1 = str(tmp / "stage1" / "best.pth")
    common = [f"data_root={data}", f"list_dir={lists}", "min_class_pixels=16", "train_size=32", "test_size=40",
              "workers=0", "reduce_dim=16", "deterministic=true", f"base_learner={stage1}",
              "stage1_epochs=1", "stage1_batch_size=4", "stage1_train_size=32", "stage1_pretrained=null"]
    out = run("train.py", ["--config", "config/demo_split0.yaml", *common, "--stage1"])
    assert "checkpoint rule: best.pth = highest base-class mIoU" in out.stdout
    assert os.path.isfile(stage1) and os.path.isfile(str(tmp / "stage1" / "last.pth"))
    fss = common + [f"pretrained={stage1}", "epochs=2", "batch_size=4", "base_lr=0.01", "val_episodes=4",
                    "test_episodes=6", "test_seeds=[1,2]", "checkpoint_select=best", "val_every=1"]
    return {"tmp": tmp, "args": ["--config", "config/demo_split0.yaml", *fss], "stage1": stage1}


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def full_run(tiny):
    exp = str(tiny["tmp"] / "full")
    out = run("train.py", tiny["args"] + [f"exp_dir={exp}"])
    assert "checkpoint rule: best" in out.stdout and "TEST fold" in out.stdout
    assert "trainable params:" in out.stdout and "singular_values" in out.stdout
    return exp, out


def test_training_writes_checkpoints_logs_and_changes_the_model(tiny, full_run):
    exp, out = full_run
    last = torch.load(os.path.join(exp, "last.pth"), weights_only=True)
    assert (last["epoch"], last["iteration"]) == (2, 0)
    assert os.path.isfile(os.path.join(exp, "best.pth")) and os.path.isfile(os.path.join(exp, "config.yaml"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(exp, "tb")))
    assert out.stdout.count("val mIoU") == 2
    assert out.stdout.count("| S change layer2 ") == 2  # how far SVF moved the singular values, per epoch
    # SVF trained the singular values of layer2-4 and left layer0/1's alone
    stage1 = torch.load(tiny["stage1"], weights_only=True)["model"]
    trained = last["model"]
    s_keys = [k for k in trained if k.endswith("vector_S")]
    assert any(k.startswith("backbone.layer4") for k in s_keys)
    conv = next(k for k in stage1 if k.startswith("backbone.layer1") and k.endswith("conv1.weight"))
    assert conv not in trained  # layer1 convs are SVD-factorised in the SVF model


def test_resume_after_stop_equals_uninterrupted(tiny, full_run):
    exp = str(tiny["tmp"] / "stopped")
    out = run("train.py", tiny["args"] + [f"exp_dir={exp}", "--stop-after", "1"])
    assert "--stop-after" in out.stdout
    assert torch.load(os.path.join(exp, "last.pth"), weights_only=True)["epoch"] == 1
    again = run("train.py", tiny["args"] + [f"exp_dir={exp}"], ok=False)
    assert again.returncode != 0 and "--resume" in again.stderr       # never overwrites a run silently
    run("train.py", tiny["args"] + [f"exp_dir={exp}", "--resume"])
    assert_same_weights(os.path.join(exp, "last.pth"), os.path.join(full_run[0], "last.pth"))


def test_ctrl_c_saves_and_resume_equals_uninterrupted(tiny, full_run):
    """Ctrl-C in the middle of the 3rd step of epoch 2 (sent by the trainer to itself at that exact point, see
    engine/faults.py: no timing involved): the step finishes, last.pth holds epoch 1 + 3 steps."""
    exp = str(tiny["tmp"] / "ctrlc")
    out = subprocess.run(command("train.py", tiny["args"] + [f"exp_dir={exp}"]), cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**ENV, "FSS_TEST_FAULT": "step:1:2:SIGINT"})
    assert out.returncode == 130, out.stdout + out.stderr
    assert "interrupted: saved" in out.stdout
    saved = torch.load(os.path.join(exp, "last.pth"), weights_only=True)
    assert (saved["epoch"], saved["iteration"], saved["samples"]) == (1, 3, 12)
    run("train.py", tiny["args"] + [f"exp_dir={exp}", "--resume"])
    assert_same_weights(os.path.join(exp, "last.pth"), os.path.join(full_run[0], "last.pth"))


def test_two_gloo_processes_train_bam(tiny):
    """BAM (frozen stage-1 base learner, class ids in the forward) under DDP with 2 gloo processes."""
    exp = str(tiny["tmp"] / "ddp")
    out = run("train.py", tiny["args"] + [f"exp_dir={exp}", "epochs=1", "arch=bam"], nproc=2)
    assert "bam | backbone resnet18_deep" in out.stdout and "2 process(es) on cpu" in out.stdout
    assert out.stdout.count("val mIoU") == 1                          # printed by rank 0 only
    assert torch.load(os.path.join(exp, "last.pth"), weights_only=True)["epoch"] == 1


def test_test_py_same_numbers_for_processes_and_workers(tiny, full_run):
    exp = full_run[0]
    results = []
    for nproc, workers, extra in [(1, 0, ["--vis", "3"]), (1, 2, []), (2, 0, [])]:
        out_json = str(tiny["tmp"] / f"res_{nproc}_{workers}" / "test_1shot.json")
        out = run("test.py", tiny["args"] + [f"exp_dir={exp}", f"workers={workers}", "--out", out_json, *extra],
                  nproc=nproc)
        assert "FB-IoU" in out.stdout and "mIoU" in out.stdout
        with open(out_json) as fh:
            results.append(json.load(fh))
    first = results[0]
    assert first["world_size"] == 1 and results[2]["world_size"] == 2
    assert [r["episodes"] for r in first["per_seed"]] == [6, 6]
    assert set(first["class_iou"]) == {"1", "2", "3", "4", "5"}
    for other in results[1:]:
        assert other["per_seed"] == first["per_seed"]
        assert (other["miou"], other["fbiou"], other["class_iou"]) == (first["miou"], first["fbiou"], first["class_iou"])
    vis = str(tiny["tmp"] / "res_1_0" / "vis_1shot")                 # next to --out
    assert sorted(os.listdir(vis)) == [f"episode_{i:05d}.png" for i in range(3)]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny, full_run):
    exp = str(tiny["tmp"] / "nan")
    shutil.copytree(full_run[0], exp)
    before = open(os.path.join(exp, "last.pth"), "rb").read()
    out = run("train.py", tiny["args"] + [f"exp_dir={exp}", "epochs=4", "base_lr=1e30", "--resume"], ok=False)
    assert out.returncode == 1, out.stdout + out.stderr
    # a NaN step loss, or (first) an epoch mean loss beyond the divergence rule: both stop with nothing written
    assert ("non-finite loss" in out.stdout or "divergence rule" in out.stdout), out.stdout
    assert f"The last good checkpoint is {os.path.join(exp, 'last.pth')} (epoch 2" in out.stdout
    assert open(os.path.join(exp, "last.pth"), "rb").read() == before


def test_clear_errors(tiny, tmp_path):
    import train
    import test as test_script
    args = tiny["args"]
    with pytest.raises(FileNotFoundError, match="python -m dataset.synthetic --out"):
        train.main(args + [f"data_root={tmp_path}/synthetic"])
    with pytest.raises(FileNotFoundError, match="python -m dataset.make_lists pascal"):
        train.main(args + [f"list_dir={tmp_path}/lists"])
    with pytest.raises(FileNotFoundError, match=r"stage-1 PSPNet checkpoint .* --stage1"):
        train.main(args + ["arch=bam", f"base_learner={tmp_path}/none.pth"])
    with pytest.raises(FileNotFoundError, match=r"are the stage-1 PSPNet checkpoint.*--stage1"):
        train.main(args + [f"base_learner={tmp_path}/none.pth", f"pretrained={tmp_path}/none.pth"])
    with pytest.raises(KeyError, match="did you mean 'base_lr'"):
        train.main(args + ["base_rl=0.1"])
    with pytest.raises(FileNotFoundError, match="train it first"):
        test_script.main(args + [f"exp_dir={tmp_path}/never_trained"])
    out = run("train.py", args + ["epochs=two"], ok=False)
    assert out.returncode != 0 and "'epochs'" in out.stderr and "Traceback" not in out.stderr
