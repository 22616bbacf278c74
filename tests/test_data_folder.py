"""The dataset registry and the folder benchmark (your own images and masks): classes, folds, both mask layouts,
binary-mask reading, make_lists (checks, splits, counts), and train.py + test.py + tools/summarize.py end to end on
stand-ins written by dataset.synthetic in the folder layout (label maps; per-class binary folders; one class)."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import yaml

from common.config import BENCHMARKS, load_config
from dataset import registry
from dataset.folder import binary_foreground, kfold_novel, read_mask_values
from dataset.lists import fold_lists
from dataset.make_lists import main as make_lists_main
from dataset.splits import novel_classes
from dataset.synthetic import write_folder_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}


def run(args, ok=True):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if ok:
        assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def write(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), array)


def test_registry_names_agree_with_the_config_schema():
    assert tuple(registry.families()) == BENCHMARKS


def test_kfold_rule_is_pascal5i_on_20_classes_and_consecutive_blocks_otherwise():
    assert [list(f) for f in kfold_novel(20, 4)] == [novel_classes("pascal", f) for f in range(4)]
    assert kfold_novel(5, 2) == ((1, 2), (3, 4, 5))
    assert kfold_novel(1, 1) == ((1,),)
    pascal = registry.resolve_benchmark("pascal")
    assert pascal.novel_classes(3) == [16, 17, 18, 19, 20] and pascal.base_classes(0) == list(range(6, 21))
    assert pascal.train_classes(0, "all") == list(range(1, 21))
    with pytest.raises(ValueError, match="pascal's folds are fixed"):
        registry.resolve_benchmark("pascal", num_folds=2)
    with pytest.raises(ValueError, match=r"fold must be an integer in 0..3 for pascal"):
        pascal.novel_classes(4)


def test_classes_file_and_split_options(tmp_path):
    (tmp_path / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match=r"classes file not found: .*classes.txt; write one class name"):
        registry.resolve_benchmark("folder", data_root=str(tmp_path))
    (tmp_path / "classes.txt").write_text("cell\nnucleus\n\nvessel\n")
    with pytest.raises(ValueError, match=r"classes.txt:3: empty class name"):
        registry.resolve_benchmark("folder", data_root=str(tmp_path))
    (tmp_path / "classes.txt").write_text("cell\nnucleus\ncell\n")
    with pytest.raises(ValueError, match=r"classes.txt:3: class 'cell' is named twice"):
        registry.resolve_benchmark("folder", data_root=str(tmp_path))
    (tmp_path / "classes.txt").write_text("cell\nnucleus\nvessel\nfat\nbone\n")
    bench = registry.resolve_benchmark("folder", data_root=str(tmp_path))
    assert bench.num_folds == 4 and bench.folds == ((1,), (2,), (3,), (4, 5))
    named = registry.resolve_benchmark("folder", data_root=str(tmp_path), novel_classes=["vessel", "cell"])
    assert named.novel_classes(0) == [1, 3] and named.base_classes(0) == [2, 4, 5] and named.num_folds == 1
    with pytest.raises(ValueError, match=r"novel_classes names \['tumour'\], not classes of the dataset"):
        registry.resolve_benchmark("folder", data_root=str(tmp_path), novel_classes=["tumour"])
    with pytest.raises(ValueError, match="num_folds=6 for 5 classes"):
        registry.resolve_benchmark("folder", data_root=str(tmp_path), num_folds=6)
    with pytest.raises(ValueError, match=r"fold must be an integer in 0..1 for folder \(2 folds\), got 2: set num_folds"):
        registry.resolve_benchmark("folder", data_root=str(tmp_path), num_folds=2).novel_classes(2)


def test_binary_masks_as_people_have_them(tmp_path):
    """0/255, 0/1, anti-aliased 0..255 (>= 128, FSS-1000's rule), 1-bit, palette and grey RGB masks."""
    values = np.array([[0, 1, 127, 128, 255]], np.uint8)
    assert binary_foreground(values).tolist() == [[False, False, False, True, True]]
    assert binary_foreground(np.array([[0, 1, 1]], np.uint8)).tolist() == [[False, True, True]]
    from PIL import Image
    Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1").save(tmp_path / "bit.png")
    assert read_mask_values(str(tmp_path / "bit.png")).tolist() == [[0, 1]]
    pal = Image.fromarray(np.array([[0, 3]], np.uint8), mode="P")
    pal.putpalette([0, 0, 0] * 3 + [255, 0, 0] + [0] * 756)
    pal.save(tmp_path / "pal.png")
    assert read_mask_values(str(tmp_path / "pal.png")).tolist() == [[0, 3]]  # indices, not colours
    Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)).save(tmp_path / "grey.png")
    assert read_mask_values(str(tmp_path / "grey.png")).tolist() == [[0, 255]]
    Image.fromarray(np.array([[[0, 0, 0], [255, 0, 0]]], np.uint8)).save(tmp_path / "red.png")
    with pytest.raises(ValueError, match=r"red.png is a colour image"):
        read_mask_values(str(tmp_path / "red.png"))
    # in a class folder the mask becomes that class's id; a label map is checked against the classes
    root = tmp_path / "d"
    write(root / "images" / "a.jpg", np.zeros((4, 5, 3), np.uint8))
    write(root / "masks" / "fat" / "a.png", np.array([[0, 255, 255, 130, 12]] * 4, np.uint8))
    (root / "masks" / "bone").mkdir()
    bench = registry.resolve_benchmark("folder", data_root=str(root))
    assert bench.class_names == ("bone", "fat")  # no classes.txt: the folders' names, sorted
    assert bench.read_label(str(root / "masks" / "fat" / "a.png"))[0].tolist() == [0, 2, 2, 2, 0]


def test_layout_errors_name_the_file(tmp_path):
    root = tmp_path / "d"
    write(root / "images" / "a.jpg", np.zeros((4, 4, 3), np.uint8))
    write(root / "images" / "b.jpg", np.zeros((4, 4, 3), np.uint8))
    write(root / "masks" / "a.png", np.zeros((4, 4), np.uint8))
    (root / "classes.txt").write_text("x\ny\n")
    lists = str(tmp_path / "l")
    with pytest.raises(ValueError, match=r"image .*images/b.jpg has no mask .*masks/b.png \(1 such image"):
        make_lists_main(["folder", "--data-root", str(root), "--list-dir", lists])
    write(root / "masks" / "b.png", np.zeros((4, 4), np.uint8))
    write(root / "masks" / "c.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"mask .*masks/c.png has no image .*images/c"):
        make_lists_main(["folder", "--data-root", str(root), "--list-dir", lists])
    os.remove(root / "masks" / "c.png")
    write(root / "masks" / "x" / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"holds both mask files .* and class folders"):
        make_lists_main(["folder", "--data-root", str(root), "--list-dir", lists])
    assert not os.path.exists(lists)  # nothing was written
    os.remove(root / "masks" / "x" / "a.png")
    os.rmdir(root / "masks" / "x")
    with pytest.raises(ValueError, match="--sbd-list: not an option of folder's lists"):
        make_lists_main(["folder", "--data-root", str(root), "--list-dir", lists, "--sbd-list", "x"])


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Three folder datasets written by dataset.synthetic: label maps of 8 classes, binary masks per class of 8
    classes, and a one-class dataset of binary masks."""
    tmp = tmp_path_factory.mktemp("folder")
    out = {"maps": str(tmp / "maps"), "binary": str(tmp / "binary"), "one": str(tmp / "one")}
    write_folder_dataset(out["maps"], "label_maps", num_classes=8, num_images=48, size=48, seed=1)
    write_folder_dataset(out["binary"], "class_folders", num_classes=8, num_images=48, size=48, seed=1)
    write_folder_dataset(out["one"], "class_folders", num_classes=1, num_images=14, size=48, seed=2)
    return out


def test_both_layouts_list_the_same_class_presence(stand_ins, capsys):
    """The same images as label maps and as per-class binary masks: every class has the same images in both."""
    per_class = {}
    for kind in ("maps", "binary"):
        root = stand_ins[kind]
        assert make_lists_main(["folder", "--data-root", root, "--min-class-pixels", "16", "--workers", "0",
                                "--num-folds", "2"]) == 0
        printed = capsys.readouterr().out
        assert "folder: 8 classes, 2 fold(s)" in printed and "aeroplane, bicycle, bird, boat" in printed
        bench = registry.resolve_benchmark("folder", data_root=root, num_folds=2)
        lists = fold_lists(os.path.join(root, "lists", "val.txt"), root, bench, 0, classes="novel",
                           min_class_pixels=16)
        per_class[kind] = {c: sorted(os.path.basename(lists.pairs[i][0]) for i in v)
                           for c, v in lists.class_images.items()}
    assert per_class["maps"] == per_class["binary"] and all(per_class["maps"].values())


def test_val_fraction_and_id_files(stand_ins, tmp_path):
    root = stand_ins["maps"]

    def names(path):
        with open(path) as fh:
            return [line.split()[0] for line in fh]

    make_lists_main(["folder", "--data-root", root, "--list-dir", str(tmp_path / "a"), "--val-fraction", "0.25",
                     "--min-class-pixels", "16"])
    train, val = names(tmp_path / "a" / "train.txt"), names(tmp_path / "a" / "val.txt")
    assert len(val) == 12 and len(train) == 36 and not set(train) & set(val)
    make_lists_main(["folder", "--data-root", root, "--list-dir", str(tmp_path / "b"), "--val-fraction", "0.25",
                     "--min-class-pixels", "16"])
    assert names(tmp_path / "b" / "val.txt") == val  # the same split every time
    (tmp_path / "train_ids.txt").write_text("img_00000\nimg_00001\n")
    (tmp_path / "val_ids.txt").write_text("img_00002\nnot_there\n")
    with pytest.raises(ValueError, match=r"--val-ids file .*val_ids.txt names 'not_there'"):
        make_lists_main(["folder", "--data-root", root, "--list-dir", str(tmp_path / "c"),
                         "--train-ids", str(tmp_path / "train_ids.txt"), "--val-ids", str(tmp_path / "val_ids.txt")])
    assert not os.path.exists(tmp_path / "c")


def test_config_resolves_folder_keys(stand_ins, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"_base_": os.path.join(ROOT, "config", "folder.yaml"),
                                    "data_root": stand_ins["one"]}))
    cfg = load_config(str(path), ["train_classes=all"])
    assert cfg.list_dir == os.path.join(stand_ins["one"], "lists")
    assert os.path.basename(os.path.normpath(stand_ins["one"])) in cfg.exp_dir
    bench = registry.benchmark_of(cfg)
    assert bench.class_names == ("aeroplane",) and bench.folds == ((1,),)
    assert bench.train_classes(0, cfg.train_classes) == [1]


@pytest.fixture(scope="module")
def tiny_args():
    return ["min_class_pixels=16", "train_size=32", "test_size=40", "workers=0", "reduce_dim=16", "pretrained=null",
            "backbone=resnet18_deep", "batch_size=4", "base_lr=0.01", "val_episodes=4", "test_episodes=8",
            "test_seeds=[1,2]", "checkpoint_select=last", "deterministic=true", "finetune=freeze"]


def test_train_and_test_on_a_folder_benchmark_and_summarize(stand_ins, tiny_args, tmp_path):
    """Label maps, fold 1 of 2: a training epoch, test.py, the summary table; a one-class dataset: test.py on the
    model trained on the other dataset, then tuning on its own labelled images (train_classes: all)."""
    root = stand_ins["binary"]
    run(["-m", "dataset.make_lists", "folder", "--data-root", root, "--min-class-pixels", "16", "--num-folds", "2"])
    exp = str(tmp_path / "exp" / "binary")
    common = ["--config", "config/folder.yaml", f"data_root={root}", "num_folds=2", "fold=1", *tiny_args]
    out = run(["train.py", *common, "epochs=1", f"exp_dir={exp}"])
    assert os.path.isfile(os.path.join(exp, "last.pth")), out.stdout[-2000:]
    out = run(["test.py", *common, f"exp_dir={exp}"])
    assert "bottle" in out.stdout and "mIoU" in out.stdout  # the class names of the folder's classes.txt
    result = yaml.safe_load(open(os.path.join(exp, "test_1shot.json")))
    assert result["benchmark"] == "folder" and result["num_folds"] == 2 and result["fold"] == 1
    assert sorted(result["class_iou"]) == ["5", "6", "7", "8"]
    assert result["class_names"]["5"] == "bottle"
    table = run(["tools/summarize.py", str(tmp_path / "exp")]).stdout
    assert "folder binary (mIoU %)" in table and "fold1" in table and "fold2" not in table
    # the one-class dataset: test the model trained above (its weights), then tune on its own labelled images
    one = stand_ins["one"]
    run(["-m", "dataset.make_lists", "folder", "--data-root", one, "--min-class-pixels", "16", "--val-fraction", "0.5"])
    one_args = ["--config", "config/folder.yaml", f"data_root={one}", *tiny_args]
    out = run(["test.py", *one_args, "--weights", os.path.join(exp, "last.pth"),
               "--out", str(tmp_path / "one_before.json")])
    assert "aeroplane" in out.stdout
    out = run(["train.py", *one_args, "epochs=1", "train_classes=all", f"exp_dir={tmp_path / 'one'}"])
    assert os.path.isfile(os.path.join(tmp_path, "one", "last.pth"))
    out = run(["train.py", *one_args, "epochs=1", f"exp_dir={tmp_path / 'one_base'}"], ok=False)
    assert out.returncode != 0 and "no base class in this fold" in out.stderr and "train_classes=all" in out.stderr \
        and "Traceback" not in out.stderr, out.stderr[-2000:]
