"""Hostile but realistic inputs and faults (issue "nothing lost, nothing silently wrong"): each test
pins one case that used to run silently wrong or end in a traceback.

- impossible config values, YAML syntax errors, --shot 0 / --stop-after 0;
- empty, truncated and non-checkpoint files as pretrained / --weights / last.pth, and --resume with a
  config that builds another model or another batch size;
- a diverging run never writes its weights; an epoch resumed after its last step logs its real loss;
- test.py --weights OTHER never overwrites the run's own results;
- truncated images, bad masks and a missing SBD list in the data tools;
- svf / lrcc misuse; file permissions and temporaries of interrupted writes.
"""
import contextlib
import glob
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn

from engine.checkpoint import atomic_save, load_checkpoint
from engine.config import FIELDS, check_value, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}
ENV.pop("FSS_TEST_FAULT", None)


def run(script_args, fault=None, module=False):
    cmd = [sys.executable, *(["-m"] if module else []), *script_args]
    env = {**ENV, "FSS_TEST_FAULT": fault} if fault else ENV
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def one_line_error(out, *fragments):
    """The process failed with exactly one line on stderr, no traceback, holding every fragment."""
    err = out.stderr.strip()
    assert out.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1, err[-3000:]
    for fragment in fragments:
        assert fragment in err, err
    return err


# ------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("override, key", [
    ("epochs=0", "epochs"), ("epochs=-3", "epochs"), ("batch_size=0", "batch_size"), ("val_every=0", "val_every"),
    ("test_episodes=0", "test_episodes"), ("val_episodes=0", "val_episodes"), ("base_lr=-0.1", "base_lr"),
    ("base_lr=.nan", "base_lr"), ("momentum=1.5", "momentum"), ("test_seeds=[]", "test_seeds"),
    ("test_seeds=[1,1]", "test_seeds"), ("seed=-1", "seed"), ("shot=0", "shot"), ("workers=-1", "workers"),
    ("scale_min=1.5", "scale_min, scale_max"), ("stage1_scale_max=0.1", "stage1_scale_min, stage1_scale_max"),
    ("ppm_bins=[0, 2]", "ppm_bins"),
])
def test_impossible_config_values_are_refused_before_anything_runs(override, key, tmp_path):
    with pytest.raises(ValueError, match=re.escape(key)):
        load_config("config/demo_split0.yaml", [override])
    k, v = override.split("=", 1)
    path = tmp_path / "c.yaml"
    path.write_text(f"{k}: {v}\n")                                     # the same from a file
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_config(str(path))


def test_every_numeric_key_has_a_range_that_its_default_satisfies():
    for key, field in FIELDS.items():
        if field.type in ("int", "float", "int_list", "float_list") and field.choices is None:
            assert field.valid is not None, f"config key {key} has no valid range"
        if field.default is not None:
            assert check_value(key, field.default, "defaults") == field.default


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("fold: 0\nshot: 1\ntest_seeds: [1, 2\nepochs: 3\n")
    out = run(["train.py", "--config", str(path)])
    one_line_error(out, f"{path} line 4, column", "YAML syntax error")


def test_shot_zero_and_stop_after_zero_are_errors(capsys):
    import test as test_script
    import train
    with pytest.raises(SystemExit):
        test_script.parse_args(["--config", "config/demo_split0.yaml", "--shot", "0"])
    assert "--shot must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--config", "config/demo_split0.yaml", "--stop-after", "0"])
    assert "--stop-after must be at least 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ weight files

def bad_files(folder):
    """{kind: path} of files that are not loadable checkpoints, and the words the error must use."""
    torch.save({"model": {"w": torch.zeros(64, 64)}}, folder / "good.pth")
    data = (folder / "good.pth").read_bytes()
    (folder / "truncated.pth").write_bytes(data[: len(data) // 2])
    (folder / "empty.pth").write_bytes(b"")
    (folder / "text.pth").write_text("hello, this is not a checkpoint\n")
    torch.save(nn.Linear(2, 2), folder / "module.pth")
    return {"truncated": (folder / "truncated.pth", "truncated or corrupt"), "empty": (folder / "empty.pth", "empty"),
            "text": (folder / "text.pth", "not a PyTorch checkpoint"),
            "module": (folder / "module.pth", "pickled Python objects")}


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "module"])
def test_unreadable_checkpoint_files_are_errors_naming_the_file_and_what_it_is_not(kind, tmp_path):
    from model.weights import read_state_dict
    path, words = bad_files(tmp_path)[kind]
    for load in (load_checkpoint, read_state_dict):
        with pytest.raises(ValueError) as info:
            load(str(path))
        message = str(info.value)
        assert str(path) in message and words in message and "\n" not in message


# ------------------------------------------------------------------------------------------ training runs

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_voc):
    tmp = tmp_path_factory.mktemp("reliability")
    data, lists = tiny_voc
    args = ["--config", "config/demo_split0.yaml", f"data_root={data}", f"list_dir={lists}", "min_class_pixels=16",
            "train_size=32", "test_size=40", "workers=0", "reduce_dim=8", "svf=false",
            "pretrained=null", "base_learner=null", "epochs=2", "batch_size=4", "base_lr=0.01", "val_episodes=4",
            "test_episodes=4", "test_seeds=[1]", "checkpoint_select=best", "val_every=1"]
    return {"tmp": tmp, "data": data, "lists": lists, "args": args}


@pytest.fixture(scope="module")
def trained(tiny):
    import train
    exp = str(tiny["tmp"] / "trained")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train.main([*tiny["args"], f"exp_dir={exp}"]) == 0
    steps = int(re.search(r"(\d+) steps/epoch", printed.getvalue()).group(1))
    return exp, printed.getvalue(), steps


def epoch_losses(stdout):
    return re.findall(r"^epoch (\d+)/\d+ loss (\S+)", stdout, re.M)


def train_error(args):
    """train.py's one-line error for `args` (what its __main__ prints after 'error: '), run in this process."""
    import train
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        train.main(args)
    assert "\n" not in str(info.value)
    return str(info.value)


def train_here(args, capsys):
    """Run train.py in this process; (exit code, what it printed)."""
    import train
    capsys.readouterr()
    code = train.main(args)
    return code, capsys.readouterr().out


def test_pretrained_that_is_not_a_checkpoint_is_one_line(tiny, tmp_path):
    path, _ = bad_files(tmp_path)["text"]
    message = train_error([*tiny["args"], f"exp_dir={tmp_path}/run", f"pretrained={path}"])
    assert str(path) in message and "not a PyTorch checkpoint" in message


def test_resume_from_a_file_that_is_not_a_training_checkpoint_is_one_line(tiny, tmp_path):
    exp = tmp_path / "run"
    exp.mkdir()
    torch.save({"backbone.w": torch.zeros(2)}, exp / "last.pth")        # a bare state dict
    message = train_error([*tiny["args"], f"exp_dir={exp}", "--resume"])
    assert str(exp / "last.pth") in message and "not a training checkpoint" in message
    (exp / "last.pth").write_bytes(b"")
    message = train_error([*tiny["args"], f"exp_dir={exp}", "--resume"])
    assert str(exp / "last.pth") in message and "empty" in message


def test_resume_with_a_config_that_builds_another_model_names_the_keys(tiny, trained, tmp_path):
    exp = str(tmp_path / "run")
    shutil.copytree(trained[0], exp)
    message = train_error([*tiny["args"], f"exp_dir={exp}", "reduce_dim=16", "epochs=3", "--resume"])
    assert "last.pth" in message and "reduce_dim: 8 -> 16" in message
    message = train_error([*tiny["args"], f"exp_dir={exp}", "svf=true", "--resume"])
    assert "last.pth" in message and "svf: False -> True" in message


def test_a_diverging_run_never_writes_its_weights(tiny, tmp_path, capsys):
    """The issue's command: one huge step per epoch leaves weights of ~1e36 and a finite loss (BatchNorm hides the
    scale). Today's check stops the run and keeps the last good checkpoint; no file holds diverged weights."""
    from engine.checkpoint import diverged_tensors
    exp = str(tmp_path / "run")
    code, out = train_here([*tiny["args"], f"exp_dir={exp}", "base_lr=1e6", "batch_size=32", "epochs=3"], capsys)
    assert code == 1, out
    assert "the model diverged" in out and "last good checkpoint is kept" in out
    for name in ("last.pth", "best.pth"):
        if os.path.exists(os.path.join(exp, name)):
            assert diverged_tensors(torch.load(os.path.join(exp, name), weights_only=True)["model"]) == []
    with pytest.raises(RuntimeError, match="diverged"):
        atomic_save({"model": {"w": torch.full((4,), 1e30)}}, str(tmp_path / "x.pth"))
    with pytest.raises(RuntimeError, match="diverged"):
        atomic_save({"model": {"w": torch.tensor([0.0, math.nan])}}, str(tmp_path / "x.pth"))
    assert not os.path.exists(tmp_path / "x.pth")


def test_resume_mid_epoch_with_another_batch_size(tiny, tmp_path, capsys):
    exp = str(tmp_path / "run")
    out = run(["train.py", *tiny["args"], f"exp_dir={exp}"], fault="step:0:2:SIGINT")
    assert out.returncode == 130, out.stdout[-2000:] + out.stderr[-2000:]
    saved = torch.load(os.path.join(exp, "last.pth"), weights_only=True)
    assert (saved["epoch"], saved["iteration"], saved["samples"]) == (0, 3, 12)
    message = train_error([*tiny["args"], f"exp_dir={exp}", "batch_size=8", "--resume"])
    assert "12 samples" in message and "batch_size=8" in message      # 12 is not a whole number of 8s
    code, out = train_here([*tiny["args"], f"exp_dir={exp}", "batch_size=6", "--resume"], capsys)
    assert code == 0, out
    assert "at epoch 0, iteration 2" in out                             # 12 samples = 2 batches of 6
    assert "0.0000" not in dict(epoch_losses(out))["1"]


def test_an_epoch_resumed_after_its_last_step_logs_its_real_loss(tiny, trained, tmp_path, capsys):
    exp = str(tmp_path / "run")
    steps = trained[2]
    out = run(["train.py", *tiny["args"], f"exp_dir={exp}"], fault=f"validation:0:{steps}:SIGINT")
    assert out.returncode == 130 and "interrupted: saved" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    code, out = train_here([*tiny["args"], f"exp_dir={exp}", "--resume"], capsys)
    assert code == 0, out
    assert epoch_losses(out) == epoch_losses(trained[1])                # not "loss 0.0000" for epoch 1


def test_results_of_other_weights_never_overwrite_the_runs_own(tiny, trained, tmp_path):
    import test as test_script
    from tools import summarize
    exp = str(tmp_path / "run")
    shutil.copytree(trained[0], exp)
    other = str(tmp_path / "other.pth")
    shutil.copy(os.path.join(exp, "last.pth"), other)
    test_script.main([*tiny["args"], f"exp_dir={exp}"])
    own = os.path.join(exp, "test_1shot.json")
    with open(own) as fh:
        before = fh.read()
    test_script.main([*tiny["args"], f"exp_dir={exp}", "--weights", other])
    with open(own) as fh:
        assert fh.read() == before
    (result,) = glob.glob(os.path.join(exp, "test_1shot_weights-other-*.json"))
    with open(result) as fh:
        assert json.load(fh)["weights"] == other
    table = summarize.main([exp])
    rows = [line for line in table.splitlines() if line.startswith("baseline")]
    assert len(rows) == 2 and sum("[--weights other.pth]" in r for r in rows) == 1


# ------------------------------------------------------------------------------------------ data tools

@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_truncated_image_is_an_error_naming_the_file(ext, tmp_path):
    from dataset.files import read_image
    rng = np.random.default_rng(0)
    path = str(tmp_path / f"img{ext}")
    cv2.imwrite(path, rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert read_image(path).shape == (64, 64, 3)
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "ab") as fh:
        fh.write(b"\0" * 16)                                          # zero padding after the end: fine
    assert read_image(path).shape == (64, 64, 3)
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"image file {re.escape(path)} is truncated"):
        read_image(path)


def test_make_lists_bad_mask_is_one_line(tiny, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(tiny["data"], data)
    mask = sorted(glob.glob(os.path.join(data, "SegmentationClassAug", "*.png")))[5]
    label = cv2.imread(mask, cv2.IMREAD_GRAYSCALE)
    label[:4, :4] = 50
    cv2.imwrite(mask, label)
    out = run(["dataset.make_lists", "pascal", "--data-root", data, "--list-dir", str(tmp_path / "lists"),
               "--workers", "2"], module=True)
    one_line_error(out, mask, "[50]")


def test_make_lists_explains_the_sbd_list_and_takes_pfenet_lists(tiny, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(tiny["data"], data)
    sbd = os.path.join(data, "ImageSets", "SBD", "train_noval.txt")
    with open(sbd) as fh:
        ids = fh.read().split()
    os.remove(sbd)
    out = run(["dataset.make_lists", "pascal", "--data-root", data, "--list-dir", str(tmp_path / "lists")],
              module=True)
    one_line_error(out, sbd, "--sbd-list", "voc_sbd_merge_noduplicate.txt")
    # PFENet/BAM's lists: "JPEGImages/<id>.jpg SegmentationClassAug/<id>.png" lines
    with open(os.path.join(tiny["lists"], "train.txt")) as fh:
        train = fh.read()
    merge = tmp_path / "voc_sbd_merge_noduplicate.txt"
    merge.write_text("".join(f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png\n" for i in ids))
    val = tmp_path / "val.txt"
    shutil.copy(os.path.join(tiny["lists"], "val.txt"), val)
    from dataset.lists import write_image_lists
    with pytest.warns(UserWarning):                                   # not the standard 5,953 images
        write_image_lists("pascal", data, str(tmp_path / "lists"), str(merge), str(val))
    assert (tmp_path / "lists" / "train.txt").read_text() == train
    assert (tmp_path / "lists" / "val.txt").read_text() == val.read_text()


# ------------------------------------------------------------------------------------------ svf / lrcc

def test_svf_resolver_refuses_a_meta_device_model():
    import svf
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1))
    with pytest.raises(ValueError, match="meta device"):
        svf.resolver(model)


def test_lrcc_guards(tmp_path):
    import lrcc
    with pytest.raises(ValueError, match="nothing to convert"):
        lrcc.model_convert_conv(nn.Sequential(nn.Linear(4, 4)), mode="lora_mode", verbose=False)
    conv = nn.Sequential(nn.Conv2d(4, 8, 3))
    with pytest.raises(ValueError, match="r_ratio"):
        lrcc.model_convert_conv(conv, mode="lora_mode", r_ratio=float("nan"), verbose=False)
    not_cache = tmp_path / "cache.pt"
    not_cache.write_text("not a cache\n")
    with pytest.raises(ValueError, match="not an lrcc decomposition cache"):
        lrcc.model_convert_conv(conv, mode="tune_U_S", cache_path=str(not_cache), compress_step=2, verbose=False)


# ------------------------------------------------------------------------------------------ files

@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_follow_the_umask(umask, tmp_path):
    import lrcc
    from dataset.files import atomic_write_text
    previous = os.umask(umask)
    try:
        atomic_write_text(str(tmp_path / "list.txt"), "a b\n")
        atomic_save({"model": {"w": torch.zeros(2)}}, str(tmp_path / "last.pth"))
        lrcc.model_convert_conv(nn.Sequential(nn.Conv2d(4, 8, 3)), mode="tune_U_S", cache_path=str(tmp_path / "c.pt"),
                                compress_step=2, verbose=False)
    finally:
        os.umask(previous)
    for name in ("list.txt", "last.pth", "c.pt"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_stale_temporaries_of_the_runs_files_are_removed_and_nothing_else(tmp_path):
    from dataset.files import remove_stale_temporaries
    names = [".last.pth.k2j3.tmp", ".best.pth.x9.tmp", ".config.yaml.aa.tmp", "last.pth", ".other.tmp", "notes.txt"]
    for name in names:
        (tmp_path / name).write_text("x")
    removed = remove_stale_temporaries(str(tmp_path), ["last.pth", "best.pth", "config.yaml"])
    assert sorted(os.path.basename(p) for p in removed) == sorted(names[:3])
    assert sorted(os.listdir(tmp_path)) == sorted(names[3:])
