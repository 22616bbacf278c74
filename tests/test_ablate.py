"""The demo's pieces: the classification pretraining of its backbone (tools/pretrain_demo_backbone.py) and
the ablation runner (tools/ablate.py: methods x training seeds -> one table and ablation.json, read by
tools/summarize.py)."""
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# ------------------------------------------------------------------------------------------ pretraining

def test_undilated_backbone_has_the_same_tensors_and_stride_32():
    from model.backbones import build_backbone
    from tools.pretrain_demo_backbone import undilate
    dilated = build_backbone("resnet18_deep", "every_block")
    plain = undilate(build_backbone("resnet18_deep", "every_block"))
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in dilated.state_dict().items()}
    feats = plain(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 16, 8, 4, 2]   # an ImageNet-style ResNet: stride 32
    assert dilated(torch.randn(1, 3, 64, 64))[-1].shape[-1] == 8


def test_pretraining_writes_weights_the_configs_load_and_is_cached(tmp_path, capsys):
    from model import build_backbone, load_backbone_weights
    from tools.pretrain_demo_backbone import main
    out = str(tmp_path / "w.pth")
    tiny = ["--out", out, "--num-images", "32", "--heldout-images", "16", "--size", "32", "--epochs", "1",
            "--batch-size", "16"]
    main(tiny)
    saved = torch.load(out, weights_only=True)
    assert saved["pretrain"]["num_images"] == 32 and 0 <= saved["heldout_accuracy"] <= 1
    assert set(saved["model"]) - {k for k in saved["model"] if k.startswith("backbone.")} == \
        {"classifier.weight", "classifier.bias"}
    assert saved["pretrain"]["threads"] == 2 and saved["pretrain"]["backbone"] == "resnet18_deep_half"
    backbone = build_backbone("resnet18_deep_half", "every_block")  # the few-shot models' dilated backbone
    load_backbone_weights(backbone, out)                              # strict: every tensor found
    key = "layer3.0.conv1.weight"
    assert torch.equal(backbone.state_dict()[key], saved["model"]["backbone." + key])
    capsys.readouterr()
    main(tiny)                                                        # same settings: reused, not retrained
    assert "reused" in capsys.readouterr().out
    assert torch.equal(torch.load(out, weights_only=True)["model"]["backbone." + key], saved["model"]["backbone." + key])
    with pytest.raises(FileExistsError, match="other settings"):
        main(tiny[:-2] + ["--batch-size", "8"])
    assert saved["pretrain"]["numerics"].startswith("pinned: ")      # the default: the numerical pin, recorded
    assert all(t.is_contiguous() for t in saved["model"].values())   # computed channels-last, saved plain
    with pytest.raises(FileExistsError, match="differ in numerics"):  # an unpinned file is never taken for a pinned one
        main(tiny + ["--numerics", "native"])


def test_the_shipped_backbone_is_the_tools_default_output_and_the_demo_model_loads_it():
    """weights/ holds what the tool writes with its defaults (pinned numerics, 2 threads): a change to the tool's
    defaults without a new file fails here. The demo's config reads that file, and every backbone tensor of its
    few-shot model comes from it (strict loading) -- in a fresh clone, with nothing run before."""
    from common.config import load_config
    from model import build_model
    from tools.pretrain_demo_backbone import SHIPPED, parse_args, settings_of
    saved = torch.load(os.path.join(ROOT, SHIPPED), weights_only=True)
    assert saved["pretrain"] == settings_of(parse_args([]))
    with open(os.path.join(ROOT, SHIPPED), "rb") as fh:       # the checksum weights/README.md and docs/demo.md state
        digest = hashlib.sha256(fh.read()).hexdigest()
    with open(os.path.join(ROOT, "weights", "README.md")) as fh:
        assert re.findall(r"`([0-9a-f]{64})`", fh.read()) == [digest]
    with open(os.path.join(ROOT, "docs", "demo.md")) as fh:
        assert re.findall(r"sha256 `([0-9a-f]+)…`", fh.read()) == [digest[:8]]
    assert saved["pretrain"]["numerics"].startswith("pinned: ")
    assert 1 / saved["pretrain"]["num_classes"] < saved["heldout_accuracy"] <= 1   # it learned something
    cfg = load_config(os.path.join(ROOT, "config/demo.yaml"), ["finetune=freeze"])  # plain tensors, comparable
    assert cfg.pretrained == SHIPPED and cfg.stage1_pretrained == SHIPPED
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)  # config paths are relative to the repository root
        model = build_model(cfg)
    finally:
        os.chdir(cwd)
    backbone = {k: v for k, v in model.backbone.state_dict().items() if "num_batches_tracked" not in k}
    mismatched = [k for k, v in backbone.items() if not torch.equal(v, saved["model"]["backbone." + k])]
    assert backbone and mismatched == []


def test_a_remade_backbone_is_compared_with_the_shipped_one(tmp_path):
    """PRETRAIN=1: the tool says whether this machine wrote the shipped tensors, and how far it is off if not;
    nothing to compare for the shipped file itself or for other settings (another protocol, not another CPU)."""
    from tools.pretrain_demo_backbone import compare_with_shipped
    shipped = tmp_path / "shipped.pth"
    settings = {"seed": 0, "numerics": "pinned: x"}
    model = {"backbone.a": torch.ones(3), "backbone.b": torch.zeros(2), "classifier.weight": torch.ones(2, 2)}
    torch.save({"model": model, "pretrain": settings}, shipped)
    same, other = tmp_path / "same.pth", tmp_path / "other.pth"
    torch.save({"model": {k: v.clone() for k, v in model.items()}, "pretrain": settings}, same)
    torch.save({"model": {**model, "backbone.b": torch.tensor([0.0, 0.25])}, "pretrain": settings}, other)
    assert compare_with_shipped(str(same), settings, str(shipped)).startswith("identical to the shipped backbone")
    line = compare_with_shipped(str(other), settings, str(shipped))
    assert line.startswith("1 of 3 tensors differ") and "largest difference 0.25" in line
    assert compare_with_shipped(str(other), {**settings, "seed": 1}, str(shipped)) is None
    assert compare_with_shipped(str(shipped), settings, str(shipped)) is None
    assert compare_with_shipped(str(same), settings, str(tmp_path / "absent.pth")) is None


# The two CPUs the pinned pretraining must not tell apart, emulated on one machine: its native kernels (ATen,
# oneDNN and MKL at this CPU's instruction set), and one capped to baseline ATen, SSE4.1 oneDNN and MKL's SSE4.2
# branch. These variables are read when torch starts, so each run is a process of its own.
EMULATED_CPUS = {"native": {},
                 "sse4": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "SSE4_2"}}


def test_pinned_pretraining_writes_the_same_tensors_on_emulated_cpus_and_unpinned_does_not(tmp_path):
    """The issue-31 check: with the numerical pin (the default) the pretraining writes bit-identical tensors on the
    two emulated CPUs; without it (--numerics native) the same two steps already write other tensors, so the check
    has teeth. Toy size: 2 steps of batch 16, on 1 thread (the pin is about the instruction set, not the thread
    count), both CPUs at once."""
    from tools.pretrain_demo_backbone import PIN_ENV, PIN_MARK
    unset = {*PIN_ENV, PIN_MARK, "ONEDNN_MAX_CPU_ISA"}
    weights = {}
    for numerics in ("pinned", "native"):
        running = {}
        for cpu, variables in EMULATED_CPUS.items():
            out = str(tmp_path / f"{numerics}_{cpu}.pth")
            env = {**{k: v for k, v in os.environ.items() if k not in unset}, **variables, "OMP_NUM_THREADS": "1",
                   "PYTHONWARNINGS": "ignore"}
            running[cpu] = out, subprocess.Popen(
                [sys.executable, "tools/pretrain_demo_backbone.py", "--out", out, "--numerics", numerics, "--threads",
                 "1", "--num-images", "32", "--heldout-images", "8", "--size", "32", "--epochs", "1", "--batch-size",
                 "16"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cpu, (out, process) in running.items():
            output = process.communicate(timeout=300)[0]
            assert process.returncode == 0, output[-3000:]
            weights[numerics, cpu] = torch.load(out, weights_only=True)["model"]
    pinned_native, pinned_sse4 = weights["pinned", "native"], weights["pinned", "sse4"]
    assert pinned_native.keys() == pinned_sse4.keys()
    assert [k for k in pinned_native if not torch.equal(pinned_native[k], pinned_sse4[k])] == []
    unpinned_native, unpinned_sse4 = weights["native", "native"], weights["native", "sse4"]
    differ = sum(not torch.equal(unpinned_native[k], unpinned_sse4[k]) for k in unpinned_native)
    assert differ > len(unpinned_native) // 2


def test_the_pinned_process_refuses_a_mark_without_the_pin(tmp_path):
    """The mark says 'this process was started pinned'; set by hand in an unpinned process it is an error, not a
    silent unpinned file recorded as pinned."""
    env = {**os.environ, "SVF_DEMO_PRETRAIN_PINNED": "1", "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "tools/pretrain_demo_backbone.py", "--out", str(tmp_path / "w.pth"),
                           "--num-images", "16", "--heldout-images", "8", "--size", "32", "--epochs", "1",
                           "--batch-size", "16"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "not pinned" in done.stderr and not os.path.exists(tmp_path / "w.pth")


def test_pretraining_computes_on_its_own_thread_count_whatever_the_process_uses(tmp_path):
    """The backbone depends on the rounding, hence on the thread count: the pretraining always computes on
    --threads, so a process on 1 thread and one on 3 write the same tensors, and each gets its own count back.
    Checked in this process (--numerics native); the pinned pretraining is a fresh process on --threads."""
    from tools.pretrain_demo_backbone import main
    before = torch.get_num_threads()
    weights = []
    try:
        for process_threads in (1, 3):
            torch.set_num_threads(process_threads)
            out = str(tmp_path / f"w{process_threads}.pth")
            main(["--out", out, "--num-images", "32", "--heldout-images", "8", "--size", "32", "--epochs", "1",
                  "--batch-size", "16", "--threads", "2", "--numerics", "native"])
            assert torch.get_num_threads() == process_threads
            weights.append(torch.load(out, weights_only=True)["model"])
    finally:
        torch.set_num_threads(before)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# ------------------------------------------------------------------------------------------ ablate.py

def test_default_output_folder_is_one_per_folder_dataset():
    """Two folder datasets (any data_root) never share an ablation's runs; PASCAL keeps its path."""
    from tools.ablate import default_out
    from common.config import load_config
    cells = load_config(os.path.join(ROOT, "config/folder.yaml"), ["data_root=data/cells/", "fold=1"])
    defects = load_config(os.path.join(ROOT, "config/folder.yaml"), ["data_root=/x/defects", "fold=1"])
    pascal = load_config(os.path.join(ROOT, "config/pascal_split0.yaml"), [])
    assert default_out(cells) == os.path.join("exp", "ablation", "folder", "cells", f"{cells.arch}_{cells.backbone}",
                                              "split1", f"{cells.shot}shot")
    assert default_out(defects).split(os.sep)[:4] == ["exp", "ablation", "folder", "defects"]
    assert default_out(pascal) == os.path.join("exp", "ablation", "pascal", f"{pascal.arch}_{pascal.backbone}",
                                               "split0", f"{pascal.shot}shot")


def fake_result(miou, seeds=(1, 2)):
    return {"miou": miou, "fbiou": miou + 0.2, "episodes_per_seed": 4, "seeds": list(seeds),
            "per_seed": [{"seed": s, "miou": miou + 0.01 * (i - 0.5) * 2, "fbiou": miou + 0.2} for i, s in enumerate(seeds)]}


def test_table_statistics_from_run_folders(tmp_path):
    """mean ± std over training seeds, per test seed, paired difference to freeze, stats from train_stats.json."""
    from tools import ablate
    from tools.summarize import find_ablations, find_results, main as summarize_main
    words = ["pretrained=null", "test_episodes=4", "test_seeds=[1,2]"]
    args = ablate.parse_args(["--config", "config/demo_split0.yaml", "--methods", "freeze,svf", "--seeds", "5,6",
                              "--out", str(tmp_path), *words])
    cfg = ablate.load_config(args.config, args.overrides)
    runs = {m: [ablate.Run(args, args.overrides, m, s) for s in (5, 6)] for m in ("untrained", "freeze", "svf")}
    mious = {"untrained": (0.10, 0.12), "freeze": (0.40, 0.44), "svf": (0.43, 0.45)}
    for method, group in runs.items():
        for run, miou in zip(group, mious[method]):
            os.makedirs(run.dir)
            with open(run.result_path, "w") as fh:
                json.dump(fake_result(miou), fh)
            if method != "untrained":
                with open(os.path.join(run.dir, "train_stats.json"), "w") as fh:
                    json.dump({"trainable": 1000, "trainable_backbone": 0 if method == "freeze" else 4032,
                               "step_time_s": 0.5 if run.seed == 5 else 0.7, "peak_memory_bytes": 2 ** 30,
                               "memory_kind": "cpu_peak_rss"}, fh)
    data = ablate.summarise(args, runs, [5, 6], cfg, ["untrained", "freeze", "svf"])
    rows = {r["method"]: r for r in data["rows"]}
    assert data["complete"] and data["reference"] == "freeze"
    assert rows["freeze"]["miou_mean"] == pytest.approx(0.42) and rows["freeze"]["miou_std"] == pytest.approx(0.02 ** 0.5 * 0.2)
    assert rows["svf"]["delta_mean"] == pytest.approx(0.02) and rows["svf"]["delta_std"] == pytest.approx(0.02 ** 0.5 * 0.1 * 0.2 * 5)
    assert rows["freeze"]["delta_mean"] is None and rows["untrained"]["delta_mean"] is None
    assert rows["svf"]["miou_per_test_seed"] == pytest.approx([0.43, 0.45])
    assert rows["svf"]["trainable_backbone"] == 4032 and rows["untrained"]["trainable_backbone"] == 0
    assert rows["svf"]["step_time_s"] == pytest.approx(0.6) and rows["svf"]["peak_memory_bytes"] == 2 ** 30
    with open(tmp_path / "ablation.json", "w") as fh:
        json.dump(data, fh)
    # summarize.py prints the ablation's table and keeps its runs out of the per-fold table
    assert find_results(str(tmp_path)) == [] and len(find_ablations(str(tmp_path))) == 1
    text = summarize_main([str(tmp_path)])
    svf_line = next(line for line in text.splitlines() if line.startswith("svf"))
    assert "4.0 K" in svf_line and "44.00 ± 1.41" in svf_line and "43.00 / 45.00" in svf_line
    assert "+2.00 ± 1.41" in svf_line and "0.600" in svf_line and "1024" in svf_line
    from tools.summarize import compare_ablations                     # two machines' runs of one ablation
    assert compare_ablations(data, data)[1] == 0
    other = json.loads(json.dumps(data))
    other["rows"][2]["miou_mean"] += 0.005
    other["rows"][2]["runs"][1]["miou"] += 0.01
    text, worst = compare_ablations(data, other)
    assert worst == pytest.approx(0.5) and "+0.50" in text and "1.00" in text.splitlines()[3]
    os.remove(runs["svf"][1].result_path)                             # a missing run: the table says so
    assert not ablate.summarise(args, runs, [5, 6], cfg, ["untrained", "freeze", "svf"])["complete"]


def test_methods_map_onto_the_config_and_bad_input_is_refused(tmp_path):
    from tools import ablate
    assert ablate.method_overrides("full") == ["finetune=full"]
    assert ablate.method_overrides("untrained") == ["finetune=freeze"]
    with pytest.raises(SystemExit):
        ablate.parse_args(["--config", "config/demo_split0.yaml", "--methods", "svf,svf"])
    with pytest.raises(ValueError, match="finetune"):               # every run's config is checked first
        ablate.main(["--config", "config/demo_split0.yaml", "--methods", "freeze,nonsense", "--out", str(tmp_path)])


def test_ablate_end_to_end_then_reuses_everything(tiny_voc, tmp_path):
    """A tiny real run (train.py and test.py as subprocesses), then the same command again: nothing reruns."""
    data, lists = tiny_voc
    out = str(tmp_path / "abl")
    command = [sys.executable, "tools/ablate.py", "--config", "config/demo_split0.yaml", "--methods", "freeze",
               "--train-seeds", "1", "--out", out, f"data_root={data}", f"list_dir={lists}", "min_class_pixels=16",
               "train_size=32", "test_size=40", "workers=0", "reduce_dim=16", "pretrained=null", "epochs=1",
               "batch_size=8", "val_episodes=2", "test_episodes=4", "test_seeds=[1,2]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[2/2] freeze seed 321: train" in first.stdout and "mIoU / FB-IoU: mean ± sample std" in first.stdout
    with open(os.path.join(out, "ablation.json")) as fh:
        saved = json.load(fh)
    assert [r["method"] for r in saved["rows"]] == ["untrained", "freeze"] and saved["complete"]
    assert saved["rows"][1]["trainable_backbone"] == 0 and saved["rows"][1]["step_time_s"] > 0
    assert os.path.isfile(os.path.join(out, "freeze", "seed321", "train.log"))
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count(": reused ") == 2, again.stdout + again.stderr
    changed = subprocess.run(command + ["base_lr=0.5"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert changed.returncode != 0 and "trained with other settings (base_lr" in changed.stderr


def test_parallel_runs_give_the_same_table_and_a_failure_stops_the_rest(tiny_voc, tmp_path, monkeypatch):
    """--jobs 2 runs two train.py/test.py processes at once: every figure equals the one-at-a-time run's (each
    run is its own process on the same thread count). A run that fails is the error ablate stops with."""
    from tools import ablate
    data, lists = tiny_voc
    words = [f"data_root={data}", f"list_dir={lists}", "min_class_pixels=16", "train_size=32", "test_size=40",
             "workers=0", "reduce_dim=16", "pretrained=null", "epochs=1", "batch_size=8", "val_episodes=2",
             "test_episodes=4", "test_seeds=[1,2]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    tables = []
    for jobs in (1, 2):
        out = str(tmp_path / f"jobs{jobs}")
        command = [sys.executable, "tools/ablate.py", "--config", "config/demo_split0.yaml", "--methods",
                   "freeze,svf", "--train-seeds", "1", "--jobs", str(jobs), "--out", out, *words]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        with open(os.path.join(out, "ablation.json")) as fh:
            tables.append(json.load(fh))
    for one, two in zip(tables[0]["rows"], tables[1]["rows"]):
        assert one["method"] == two["method"]
        assert [(r["miou"], r["fbiou"], r["per_test_seed"]) for r in one["runs"]] == \
            [(r["miou"], r["fbiou"], r["per_test_seed"]) for r in two["runs"]], one["method"]
    assert tables[1]["complete"] and [r["method"] for r in tables[1]["rows"]] == ["untrained", "freeze", "svf"]

    def fail_one(run, index, total):
        if run.method == "svf" and run.seed == 6:
            raise RuntimeError(f"train.py failed; the end of {run.dir}/train.log")
        return {}
    monkeypatch.setattr(ablate, "execute", fail_one)
    with pytest.raises(RuntimeError, match="svf/seed6/train.log"):
        ablate.main(["--config", "config/demo_split0.yaml", "--methods", "freeze,svf", "--seeds", "5,6",
                     "--jobs", "2", "--out", str(tmp_path / "failing"), *words])
    with pytest.raises(SystemExit):
        ablate.parse_args(["--config", "config/demo_split0.yaml", "--jobs", "0"])
