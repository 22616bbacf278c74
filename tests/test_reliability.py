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
    (folder / "text.pth").write_text("not a checkpoint\n")
    (folder / "json.pth").write_text('{"model": "resnet50"}\n')
    (folder / "pk.pth").write_text("PK is not a zip archive\n")
    (folder / "binary.pth").write_bytes(bytes(range(256)) * 4)
    torch.save(nn.Linear(2, 2), folder / "module.pth")
    return {"truncated": (folder / "truncated.pth", "truncated or corrupt"), "empty": (folder / "empty.pth", "empty"),
            "text": (folder / "text.pth", "is a text file"), "json": (folder / "json.pth", "is a text file"),
            "pk": (folder / "pk.pth", "is a text file"), "binary": (folder / "binary.pth", "not a PyTorch checkpoint"),
            "module": (folder / "module.pth", "pickled Python objects")}


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "json", "pk", "binary", "module"])
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
    with pytest.raises((ValueError, OSError)) as info:
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
    assert str(path) in message and "is a text file" in message and "pickled" not in message


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
    assert "last.pth" in message and "trained with reduce_dim=8 (this config: reduce_dim=16): pass reduce_dim=8" \
        in message
    message = train_error([*tiny["args"], f"exp_dir={exp}", "svf=true", "--resume"])
    assert "last.pth" in message and "trained with finetune=freeze (this config: finetune=svf)" in message


def test_a_diverging_run_never_writes_its_weights(tiny, tmp_path, capsys):
    """The issue's command: one huge step per epoch leaves weights of ~1e36 and a finite loss (BatchNorm hides the
    scale). Today's check stops the run and keeps the last good checkpoint; no file holds diverged weights."""
    from engine.checkpoint import diverged_tensors
    exp = str(tmp_path / "run")
    code, out = train_here([*tiny["args"], f"exp_dir={exp}", "base_lr=1e6", "batch_size=32", "epochs=3"], capsys)
    assert code == 1, out
    assert "diverged" in out and "last good checkpoint is" in out          # the loss or the weight rule
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


# ------------------------------------------------------------------------------------------ round 2 (issue 23)

HOLD_LOCK = ("import sys\nfrom engine.runlock import exp_dir_lock\nwith exp_dir_lock(sys.argv[1]):\n"
             "    print('held', flush=True)\n    sys.stdin.read()\n")


@contextlib.contextmanager
def lock_held_by_another_process(exp_dir):
    """A subprocess holds exp_dir's lock until the block ends (told through its stdin: no sleep, no race)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(exp_dir)], cwd=ROOT, env=ENV, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        if holder.poll() is None:
            holder.stdin.close()
            holder.wait(timeout=60)


def test_a_second_training_into_a_folder_in_use_stops_at_once(tiny, trained, tmp_path, capsys):
    import socket

    import test as test_script
    import train
    from engine.runlock import ExpDirInUse, exp_dir_holder
    exp = tmp_path / "run"
    shutil.copytree(trained[0], exp)
    before = {name: (exp / name).read_bytes() for name in ("last.pth", "best.pth", "config.yaml")}
    with lock_held_by_another_process(exp) as holder:
        for extra in ([], ["--resume"]):
            with pytest.raises(ExpDirInUse) as info:
                train.main([*tiny["args"], f"exp_dir={exp}", *extra])
            message = str(info.value)
            assert "\n" not in message and f"pid {holder.pid} on host {socket.gethostname()}" in message
            assert str(exp) in message and "started" in message
        assert exp_dir_holder(str(exp)) is not None
        result = test_script.main([*tiny["args"], f"exp_dir={exp}"])        # reading a running run still works
        assert result["miou"] is not None
    assert {name: (exp / name).read_bytes() for name in before} == before   # nothing of the first run touched
    # kill -9 leaves nothing stale: the lock dies with its process
    with lock_held_by_another_process(exp) as holder:
        holder.kill()
        holder.wait(timeout=60)
    assert exp_dir_holder(str(exp)) is None
    code, out = train_here([*tiny["args"], f"exp_dir={exp}", "epochs=3", "--resume"], capsys)
    assert code == 0, out
    assert (exp / "train.lock").read_text() == ""                           # emptied at the end of the run


def write_state(path, state):
    torch.save({"model": state}, path)
    return str(path)


def test_weights_beyond_the_rule_are_refused_wherever_they_are_loaded(tiny, trained, tmp_path):
    """NaN, or x1e37, in one tensor: test.py --weights, --resume, pretrained= and base_learner= refuse the file with
    one line naming the tensor (test.py used to score them: mIoU 0.00 or 1.00, rc 0)."""
    import test as test_script
    from engine.checkpoint import bad_weights
    good = torch.load(os.path.join(trained[0], "last.pth"), weights_only=True)
    name = "meta.cls.3.weight" if "meta.cls.3.weight" in good["model"] else sorted(good["model"])[-2]
    for label, change in (("nan", lambda w: w.fill_(math.nan)), ("huge", lambda w: w.mul_(1e37).add_(1e30))):
        state = {k: v.clone() for k, v in good["model"].items()}
        change(state[name])
        weights = write_state(tmp_path / f"{label}.pth", state)
        with pytest.raises(ValueError) as info:
            test_script.main([*tiny["args"], f"exp_dir={tmp_path / 'eval'}", "--weights", weights])
        assert weights in str(info.value) and f"'{name}'" in str(info.value) and "\n" not in str(info.value)
        resumed = tmp_path / f"resume_{label}"
        resumed.mkdir()
        torch.save({**good, "model": state}, resumed / "last.pth")
        message = train_error([*tiny["args"], f"exp_dir={resumed}", "--resume"])
        assert f"'{name}'" in message and "last.pth" in message
    # backbone weights (pretrained=) and a stage-1 PSPNet (base_learner=)
    import model as models
    from conftest import tiny_cfg
    demo_backbone = load_config("config/demo_split0.yaml").backbone  # what tiny["args"] trains
    pspnet = models.build_model(tiny_cfg(arch="pspnet", backbone=demo_backbone)).state_dict()
    pspnet["backbone.layer1.0.conv1.weight"] = pspnet["backbone.layer1.0.conv1.weight"].clone().fill_(math.inf)
    stage1 = write_state(tmp_path / "stage1.pth", pspnet)
    message = train_error([*tiny["args"], f"exp_dir={tmp_path}/p", f"pretrained={stage1}"])
    assert stage1 in message and "'layer1.0.conv1.weight'" in message
    message = train_error([*tiny["args"], f"exp_dir={tmp_path}/b", "arch=bam", f"base_learner={stage1}"])
    assert stage1 in message and "'backbone.layer1.0.conv1.weight'" in message
    # the rule: NaN/inf, or |w| > 1e6; a BatchNorm running variance is a squared scale (its root is compared)
    assert [k for k, _ in bad_weights({"a.weight": torch.tensor([1e6]), "b.running_var": torch.tensor([1e12]),
                                       "c.running_mean": torch.tensor([-2e6]), "d.running_var": torch.tensor([2e12]),
                                       "e.num_batches_tracked": torch.tensor(10 ** 9)})] == ["c.running_mean",
                                                                                             "d.running_var"]


def test_divergence_rule_keeps_the_last_good_checkpoint_and_names_it(tiny, tmp_path, capsys):
    """The issue's case (base_lr=1e3, batch_size=32): epoch 2's mean loss is ~1e8, far beyond 10x epoch 1's: the run
    stops before validating or saving it; last.pth and best.pth stay epoch 1's, named as the last good one."""
    from engine.checkpoint import diverged_tensors, loss_diverged
    exp = tmp_path / "run"
    code, out = train_here([*tiny["args"], f"exp_dir={exp}", "base_lr=1e3", "batch_size=32", "epochs=3"], capsys)
    assert code == 1, out
    assert "divergence rule" in out and f"The last good checkpoint is {exp / 'last.pth'} (epoch 1)" in out
    for name in ("last.pth", "best.pth"):
        saved = torch.load(exp / name, weights_only=True)
        assert saved["epoch"] == 1 and diverged_tensors(saved["model"]) == []
    assert loss_diverged(float("nan"), math.inf) and not loss_diverged(50.0, math.inf)
    assert loss_diverged(5.01, 0.5) and not loss_diverged(5.0, 0.5) and not loss_diverged(0.09, 0.0)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_saved_checkpoints(tiny, trained, tmp_path, monkeypatch,
                                                                               capsys):
    """ENOSPC in the middle of torch.save's writes (fault injection: every write of a save is a fault point) used to
    end in '[enforce fail at inline_container.cc] unexpected pos'."""
    import train
    from engine.checkpoint import CheckpointWriteError
    exp = tmp_path / "run"
    shutil.copytree(trained[0], exp)
    before = {name: (exp / name).read_bytes() for name in ("last.pth", "best.pth")}
    monkeypatch.setenv("FSS_TEST_FAULT", "last.pth.write:3:0:ENOSPC")
    with pytest.raises(CheckpointWriteError) as info:
        train.main([*tiny["args"], f"exp_dir={exp}", "epochs=3", "--resume"])
    message = str(info.value)
    assert isinstance(info.value, OSError)                                  # train.py's __main__: one line
    assert "\n" not in message and f"cannot write {exp / 'last.pth'}: the disk is full" in message
    assert "enforce fail" not in message
    assert (exp / "last.pth").read_bytes() == before["last.pth"]            # the saved checkpoint untouched
    assert not glob.glob(str(exp / ".last.pth.*"))                          # and no temporary left


@pytest.mark.parametrize("where", ["under_a_file", "proc", "read_only_folder"])
def test_an_unwritable_exp_dir_or_out_is_one_line_before_anything_runs(where, tiny, trained, tmp_path):
    import test as test_script
    if where == "under_a_file":
        (tmp_path / "file").write_text("x")
        folder = tmp_path / "file" / "run"
    elif where == "proc":
        folder = "/proc/self/run"
        if not os.path.isdir("/proc/self"):
            pytest.skip("no /proc")
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: permission bits do not stop writes")
    message = train_error([*tiny["args"], f"exp_dir={folder}"])
    assert f"exp_dir '{folder}'" in message and "not writable" in message
    with pytest.raises(PermissionError) as info:                        # test.py: before any episode
        test_script.main([*tiny["args"], f"exp_dir={trained[0]}", "--out", f"{folder}/r.json"])
    assert f"--out folder '{folder}'" in str(info.value) and "\n" not in str(info.value)


def test_yaml_duplicate_keys_and_empty_files_name_the_file_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("_base_: " + os.path.join(ROOT, "config", "demo.yaml") + "\nepochs: 1\nshot: 1\nepochs: 5\n")
    with pytest.raises(ValueError, match=re.escape(f"{path} line 4") + ".*'epochs' is given twice .*line 2"):
        load_config(str(path))
    path.write_text("nosvf: {base_lr: 0.1, base_lr: 0.2}\n")
    with pytest.raises(ValueError, match=re.escape(f"{path} line 1") + ".*'base_lr' is given twice"):
        load_config(str(path))
    for text in ("", "# only a comment\n\n"):
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"'{path}' is empty")):
            load_config(str(path))


def test_results_json_is_strict_with_classes_without_episodes_named(tiny, trained, tmp_path):
    """One test episode visits one of the fold's 5 classes: the others have no IoU: null and named, never NaN."""
    import test as test_script
    out = tmp_path / "r.json"
    test_script.main([*tiny["args"], f"exp_dir={trained[0]}", "test_episodes=1", "--out", str(out)])

    def refuse(constant):
        raise AssertionError(f"{constant} in the results JSON")
    result = json.loads(out.read_text(), parse_constant=refuse)
    (seed,) = result["per_seed"]
    assert len(seed["classes_without_episodes"]) == 4
    assert all(seed["class_iou"][str(c)] is None for c in seed["classes_without_episodes"])
    assert all(result["class_iou"][str(c)] is None for c in seed["classes_without_episodes"])


def test_stale_temporaries_are_reported_by_test_py_and_removed_by_any_new_run(tiny, trained, tmp_path, capsys):
    import test as test_script
    exp = tmp_path / "run"
    shutil.copytree(trained[0], exp)
    orphan = exp / ".last.pth.k2j3.tmp"
    orphan.write_bytes(b"half a checkpoint")
    with lock_held_by_another_process(exp):                                # a live training: maybe its own write
        capsys.readouterr()
        test_script.main([*tiny["args"], f"exp_dir={exp}"])
        assert str(orphan) not in capsys.readouterr().out
    test_script.main([*tiny["args"], f"exp_dir={exp}"])
    assert f"note: {orphan} was left by an interrupted save" in capsys.readouterr().out
    assert orphan.exists()                                                  # test.py never deletes in a run
    message = train_error([*tiny["args"], f"exp_dir={exp}"])               # refused (last.pth exists) ...
    assert "--resume" in message and not orphan.exists()                   # ... but the orphan is gone


def test_train_sh_usage_dry_run_quoting_and_the_backbone_word_picks_its_weights():
    import shlex
    usage = subprocess.run(["sh", "train.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "set -eu" not in usage.stdout and usage.stdout.startswith("Train one fold")
    out = subprocess.run(["sh", "train.sh", "pascal", "split0", "resnet101", "svf", "exp_dir=my runs/it's"], cwd=ROOT,
                         capture_output=True, text=True, env={**ENV, "DRY_RUN": "1", "NPROC": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout.strip().splitlines()[-1])
    assert words[-3:] == ["backbone=resnet101", "svf=true", "exp_dir=my runs/it's"]
    cfg = load_config(os.path.join(ROOT, "config", "pascal_split0.yaml"), words[-3:])
    assert (cfg.pretrained, cfg.stage1_pretrained) == ("initmodel/resnet101_v2.pth", "initmodel/resnet101_v2.pth")
    cfg = load_config(os.path.join(ROOT, "config", "coco_split0.yaml"), ["backbone=vgg16_bn", "pretrained=mine.pth"])
    assert (cfg.pretrained, cfg.stage1_pretrained) == ("mine.pth", "initmodel/vgg16_bn.pth")


def make_lists_error(data, lists):
    out = run(["dataset.make_lists", "pascal", "--data-root", str(data), "--list-dir", str(lists), "--workers", "0"],
              module=True)
    return out


@pytest.mark.parametrize("damage", ["corrupt_jpeg", "half_jpeg", "mask_size"])
def test_make_lists_checks_what_the_readme_says_in_a_fresh_folder(damage, tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    image = sorted(glob.glob(str(data / "JPEGImages" / "*.jpg")))[7]
    mask = os.path.join(str(data), "SegmentationClassAug", os.path.basename(image)[:-4] + ".png")
    if damage == "corrupt_jpeg":   # a JPEG header, its end marker, and nothing decodable between
        with open(image, "rb") as fh:
            head = fh.read(2)
        with open(image, "wb") as fh:
            fh.write(head + bytes(np.random.default_rng(0).integers(0, 255, 600, dtype=np.uint8)) + b"\xff\xd9")
    elif damage == "half_jpeg":    # the first half of the file (an interrupted copy)
        with open(image, "rb") as fh:
            data_bytes = fh.read()
        with open(image, "wb") as fh:
            fh.write(data_bytes[: len(data_bytes) // 2])
    else:
        label = cv2.imread(mask, cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(mask, np.ascontiguousarray(label[:, :-3]))
    out = make_lists_error(data, tmp_path / "lists")
    if damage == "mask_size":
        one_line_error(out, mask, image, "must match")
    elif damage == "half_jpeg":
        one_line_error(out, f"image file {image} is truncated")
    else:
        one_line_error(out, f"cannot decode image file {image}")


def test_make_lists_cache_follows_edited_masks(tiny, tmp_path):
    """A relabelled mask used to leave the cached class lists stale (the key covered the list file only)."""
    from dataset.lists import class_pixel_counts, write_image_lists
    data, lists = tmp_path / "data", tmp_path / "lists"
    shutil.copytree(tiny["data"], data)
    with pytest.warns(UserWarning):
        write_image_lists("pascal", str(data), str(lists))
    train_list = str(lists / "train.txt")
    pairs, counts = class_pixel_counts(train_list, str(data), "pascal")
    index = next(i for i, c in enumerate(counts) if c)
    label = cv2.imread(pairs[index][1], cv2.IMREAD_GRAYSCALE)
    old = max(counts[index], key=counts[index].get)
    new = 20 if old != 20 else 19
    label[label == old] = new                                             # relabel: same size, same pixel count
    cv2.imwrite(pairs[index][1], label)
    os.utime(pairs[index][1], ns=(1, 1))                                  # even with an old modification time
    _, again = class_pixel_counts(train_list, str(data), "pascal")
    assert old not in again[index] and again[index][new] == counts[index][old] + counts[index].get(new, 0)


# ------------------------------------------------------------------------------------------ round 3 (issue 32)

def test_a_ruined_first_epoch_is_never_kept(tiny, tmp_path, capsys):
    """base_lr=100: epoch 1's mean loss is ~500 (a normal run: ~0.7) with weights below the 1e6 limit; it used to be
    written as last.pth and best.pth (test.py scored it), since the divergence rule had no reference before the first
    epoch ended. Now the run's first step (the model before any update) is the reference: nothing is written, and the
    message says there is no good checkpoint to resume from. The same for an interruption during that epoch."""
    exp = tmp_path / "run"
    ruinous = ["base_lr=100", "batch_size=16", "epochs=3", "finetune=freeze"]
    code, out = train_here([*tiny["args"], f"exp_dir={exp}", *ruinous], capsys)
    assert code == 1, out
    assert "the mean loss of epoch 1" in out and "divergence rule" in out
    assert "There is no good checkpoint: start again with a lower base_lr" in out and "--resume" not in out
    assert not (exp / "last.pth").exists() and not (exp / "best.pth").exists()
    exp = tmp_path / "interrupted"
    out = run(["train.py", *tiny["args"], f"exp_dir={exp}", *ruinous], fault="step:0:1:SIGINT")
    assert out.returncode == 1 and "no good checkpoint" in out.stdout and "divergence rule" in out.stdout, out.stdout
    assert not (exp / "last.pth").exists()
    code, out = train_here([*tiny["args"], f"exp_dir={tmp_path / 'normal'}", "batch_size=16", "epochs=2",
                            "finetune=freeze"], capsys)                 # the same run at a sane LR is not stopped
    assert code == 0 and (tmp_path / "normal" / "last.pth").exists(), out


@pytest.mark.parametrize("bad", ["empty", "other_mask", "damaged_image"])
def test_make_lists_checks_every_input_before_writing(bad, tiny, tmp_path):
    """--val-list of an empty file used to overwrite a good val.txt with an empty one and then blame the output; a
    line 'a.jpg b.png' was re-mapped to a's own mask without a word; a damaged image among new lines was found after
    the new lists had replaced the old ones. Each is now one line naming the input, and nothing is written."""
    data, lists = tmp_path / "data", tmp_path / "lists"
    shutil.copytree(tiny["data"], data)
    shutil.copytree(tiny["lists"], lists)
    before = {p: p.read_bytes() for p in lists.rglob("*") if p.is_file()}
    val = tmp_path / "val_list.txt"
    ids = [os.path.basename(i)[:-4] for i, _ in (line.split() for line in (lists / "val.txt").read_text().splitlines())]
    train_ids = sorted({os.path.basename(i)[:-4] for i, _ in
                        (line.split() for line in (lists / "train.txt").read_text().splitlines())})
    lines = [f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png\n" for i in ids]
    if bad == "empty":
        val.write_text("")
        expected = (str(val), "is empty")
    elif bad == "other_mask":
        lines[1] = f"JPEGImages/{ids[1]}.jpg SegmentationClassAug/{ids[2]}.png\n"
        val.write_text("".join(lines))
        expected = (f"{val}:2", "name different images")
    else:                                          # a training image moved to val, its JPEG cut in half
        image = data / "JPEGImages" / f"{train_ids[0]}.jpg"
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
        val.write_text("".join(lines) + f"JPEGImages/{train_ids[0]}.jpg SegmentationClassAug/{train_ids[0]}.png\n")
        expected = (str(image), "truncated")
    out = run(["dataset.make_lists", "pascal", "--data-root", str(data), "--list-dir", str(lists), "--workers", "0",
               "--min-class-pixels", "16", "--val-list", str(val)], module=True)
    one_line_error(out, *expected)
    assert {p: p.read_bytes() for p in lists.rglob("*") if p.is_file()} == before     # nothing written


def no_evaluation(*args, **kwargs):
    raise AssertionError("test.py evaluated although --out was refusable before the run")


@pytest.mark.parametrize("case", ["folder", "full_disk", "foreign_file"])
def test_test_py_out_is_refused_before_the_run(case, tiny, trained, tmp_path, monkeypatch):
    """An existing folder as --out, a full disk (the probe was an empty file: it passed) and an unrelated file
    (replaced without a word) used to be found only after every episode, or never. Now: one line naming --out and
    what to do, before any episode; --overwrite replaces a foreign file, and a previous result is replaced as
    before."""
    import errno

    import test as test_script
    args = [*tiny["args"], f"exp_dir={trained[0]}"]
    out = tmp_path / "results"
    if case == "folder":
        out.mkdir()
        expected = (f"--out '{out}'", "is a folder", "--out names the results file")
    elif case == "full_disk":
        def full(fd, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "write", full)
        expected = (f"--out folder '{tmp_path}'", "the disk is full", "from the command line (--out)")
    else:
        out.write_text("my notes\n")
        expected = (f"--out '{out}'", "is not a results file of test.py", "--overwrite")
    monkeypatch.setattr(test_script, "evaluate", no_evaluation)
    with pytest.raises(OSError) as info:
        test_script.main([*args, "--out", str(out)])
    message = str(info.value)
    assert "\n" not in message and "demo_split0.yaml" not in message, message   # --out came from the command line
    for fragment in expected:
        assert fragment in message, message
    if case == "foreign_file":
        monkeypatch.undo()
        assert out.read_text() == "my notes\n"
        first = test_script.main([*args, "--out", str(out), "--overwrite"])
        assert json.loads(out.read_text())["miou"] == first["miou"]
        test_script.main([*args, "--out", str(out)])                          # earlier results: replaced


def test_test_py_keeps_the_results_when_writing_them_fails_after_the_run(tiny, trained, tmp_path, monkeypatch,
                                                                         capsys):
    """The disk fills up during the evaluation: the results used to exist only on screen, after a bare
    '[Errno 28] No space left on device'. Now they are printed as JSON, saved in the run's folder, and the error
    names --out, the reason and where the results are."""
    import errno

    import test as test_script
    exp = tmp_path / "run"
    shutil.copytree(trained[0], exp)
    out = tmp_path / "elsewhere" / "r.json"
    real_write = test_script.atomic_write_text

    def full_disk_at_out(path, text):
        if os.path.abspath(path) == str(out):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, text)
    monkeypatch.setattr(test_script, "atomic_write_text", full_disk_at_out)
    capsys.readouterr()
    with pytest.raises(OSError) as info:
        test_script.main([*tiny["args"], f"exp_dir={exp}", "--out", str(out)])
    message = str(info.value)
    (saved,) = glob.glob(str(exp / "test_results_*.json"))
    assert "\n" not in message and f"--out '{out}'" in message and "the disk is full" in message
    assert f"saved to '{saved}'" in message
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{"):printed.rindex("}") + 1])
    assert json.loads(open(saved).read()) == result and result["per_seed"] and not out.exists()


def test_exp_dir_errors_say_where_the_value_came_from(tiny, tmp_path):
    (tmp_path / "file").write_text("x")
    message = train_error([*tiny["args"], f"exp_dir={tmp_path / 'file' / 'run'}"])
    assert f"(from the command line (exp_dir={tmp_path / 'file' / 'run'}))" in message
    config = tmp_path / "c.yaml"
    base = os.path.join(ROOT, "config", "demo_split0.yaml")
    config.write_text(f"_base_: {base}\nexp_dir: {tmp_path / 'file' / 'x'}\n")
    message = train_error(["--config", str(config), *tiny["args"][2:]])
    assert f"(from config {config})" in message


def test_load_released_state_dict_says_what_a_misfit_state_dict_is():
    """A plain (non-SVF) state dict, or another architecture's, used to end in torch's multi-kilobyte dump of
    missing / unexpected / size-mismatched keys."""
    import svf

    def net():
        return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8, 4))
    torch.manual_seed(0)
    plain = net()
    resolved = svf.resolver(net())
    before = {k: v.clone() for k, v in resolved.state_dict().items()}
    for state, words in ((plain.state_dict(), ("no released SVD layers in this state dict", "a plain model's",
                                                "load it into the model before svf.resolver")),
                         (nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 2)).state_dict(),
                          ("a state dict of another architecture", "0.weight"))):
        with pytest.raises(ValueError) as info:
            svf.load_released_state_dict(resolved, state)
        message = str(info.value)
        assert all(w in message for w in words) and "\n" not in message and len(message) < 500, message
    assert all(torch.equal(v, before[k]) for k, v in resolved.state_dict().items())      # nothing loaded
    svf.load_released_state_dict(resolved, svf.resolver(copy_of(plain)).state_dict())     # a fitting one loads
    x = torch.randn(2, 3, 3, 3)
    assert torch.allclose(resolved.eval()(x), plain.eval()(x), atol=1e-5)


def copy_of(module):
    import copy
    return copy.deepcopy(module)


def test_test_py_weights_of_another_method_or_size_says_how_it_was_trained(tiny, trained, tmp_path):
    """A checkpoint trained with another finetune (or reduce_dim, arch, ...): test.py used to dump 69 missing keys
    and 'check arch/backbone/svf/reduce_dim/shot'; the checkpoint saves its config, so the message says it."""
    import test as test_script
    for extra, words in ((["svf=true"], "it was trained with finetune=freeze (this config: finetune=svf): "
                                        "pass finetune=freeze"),
                         (["finetune=bn", "reduce_dim=16"], "it was trained with finetune=freeze, reduce_dim=8 (this "
                                                           "config: finetune=bn, reduce_dim=16): pass finetune=freeze "
                                                           "reduce_dim=8"),
                         (["arch=pfenet"], "pass arch=baseline")):
        with pytest.raises(ValueError) as info:
            test_script.main([*tiny["args"], f"exp_dir={trained[0]}", *extra, "--out", str(tmp_path / "r.json")])
        message = str(info.value)
        assert words in message and "\n" not in message and len(message) < 400, message


def test_lrcc_rank_above_full_rank_is_logged_with_the_rank_used(tiny, tmp_path, capsys):
    code, out = train_here([*tiny["args"], f"exp_dir={tmp_path / 'run'}", "finetune=lora", "lrcc_rank=1000",
                            "epochs=1", "val_episodes=1"], capsys)
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith("lrcc ranks used"))
    assert "(lrcc_rank=1000)" in line and "have a full rank below the 1000 asked and use it" in line, line


def test_train_stats_cover_the_whole_run_across_resumes(tiny, trained, tmp_path, capsys):
    exp = tmp_path / "run"
    steps_per_epoch = trained[2]
    code, out = train_here([*tiny["args"], f"exp_dir={exp}", "epochs=3", "--stop-after", "1"], capsys)
    assert code == 0 and not (exp / "train_stats.json").exists(), out
    code, out = train_here([*tiny["args"], f"exp_dir={exp}", "epochs=3", "--resume"], capsys)
    assert code == 0, out
    stats = json.loads((exp / "train_stats.json").read_text())
    assert stats["steps_timed"] == 3 * steps_per_epoch and stats["step_time_s"] > 0
