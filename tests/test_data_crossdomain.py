"""FSS-1000 (HSNet) and the cross-domain datasets (PATNet) on stand-ins in their exact layouts: lists, classes, masks,
the 400x400 transform, the episodes (ours and the anchors' exact draws, against a re-statement written the way their
loaders run: NumPy's global state, paths compared as strings) and what the metric receives."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import crossdomain as cd
from dataset import standins


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cdfss"))
    standins.write_all(out)
    standins.write_isic(os.path.join(out, "flat"), seed=2, flat=True)
    standins.write_lung(os.path.join(out, "mc"), montgomery=True)
    return out


def names(paths):
    return [os.path.relpath(p, os.path.dirname(os.path.dirname(p))) for p in paths]


# ---------------------------------------------------------------- lists and classes

def test_fss_class_list_is_read_like_hsnet_sorted_and_crlf_free(root):
    assert cd.read_class_names(os.path.join(root, "fss_splits", "test.txt")) == ["ink_well", "jay's_feather",
                                                                                  "kite_tail"]
    with open(os.path.join(root, "fss_splits", "test.txt"), "rb") as f:
        assert f.read().count(b"\r\n") == 3   # the stand-in has HSNet's test.txt line endings


def test_fss_files_in_hsnet_order(root):
    files = cd.family_files("fss1000", root, class_names=["kite_tail", "ink_well"])
    assert list(files) == ["ink_well", "kite_tail"]
    images = [os.path.basename(i) for i, _ in files["ink_well"]]
    assert images == ["1.jpg", "10.jpg", "2.jpg", "3.jpg", "4.jpg", "5.jpg", "6.jpg", "7.jpg", "8.jpg", "9.jpg"]
    assert files["ink_well"][1][1] == os.path.join(root, "FSS-1000", "ink_well", "10.png")
    # data_root may also be the FSS-1000 folder itself
    assert cd.family_files("fss1000", os.path.join(root, "FSS-1000"), class_names=["ink_well"]) == \
        {"ink_well": files["ink_well"]}


def test_deepglobe_isic_lung_classes_and_pairs(root):
    dg = cd.family_files("deepglobe", root)
    assert list(dg) == ["1", "2", "3", "4", "5", "6"]
    assert [len(v) for v in dg.values()] == [3, 4, 2, 5, 3, 4]
    image, mask = dg["2"][0]
    assert image.endswith(os.path.join("Deepglobe", "2", "test", "origin", "102_00.jpg"))
    assert mask.endswith(os.path.join("Deepglobe", "2", "test", "groundtruth", "102_00.png"))
    isic = cd.family_files("isic", root)
    assert [len(v) for v in isic.values()] == [4, 3, 2]
    assert isic["2"][0][1].endswith(os.path.join(cd.ISIC_MASKS, "ISIC_0000012_segmentation.png"))
    lung = cd.family_files("lung", root)
    assert [os.path.basename(m) for _, m in lung["1"]] == \
        [f"CHNCXR_{k:04d}_{(k - 1) % 2}_mask.png" for k in range(1, 6)]
    assert [os.path.basename(i) for i, _ in lung["1"]] == [f"CHNCXR_{k:04d}_{(k - 1) % 2}.png" for k in range(1, 6)]
    assert os.path.isfile(os.path.join(root, "LungSegmentation", "CXR_png", "CHNCXR_0006_1.png"))  # never listed


def test_isic_flat_folder_grouped_by_class_csv_equals_patnet_folders(root):
    folders = cd.family_files("isic", root)
    flat = cd.family_files("isic", os.path.join(root, "flat"),
                           class_csv=os.path.join(root, "flat", "isic_class_id.csv"))
    assert {c: [os.path.basename(i) for i, _ in v] for c, v in flat.items()} == \
        {c: [os.path.basename(i) for i, _ in v] for c, v in folders.items()}
    with pytest.raises(FileNotFoundError, match="class_id.csv"):
        cd.family_files("isic", os.path.join(root, "flat"))


def test_lung_mask_named_like_its_image(root):
    lung = cd.family_files("lung", os.path.join(root, "mc"))["1"]
    assert lung[-1] == (os.path.join(root, "mc", "LungSegmentation", "CXR_png", "MCUCXR_0001_0.png"),
                        os.path.join(root, "mc", "LungSegmentation", "masks", "MCUCXR_0001_0.png"))


def test_family_list_file_round_trip(root, tmp_path):
    files = cd.family_files("deepglobe", root)
    path = str(tmp_path / "test.txt")
    cd.write_family_list(path, files, root)
    with open(path) as f:
        assert f.readline() == "1 Deepglobe/1/test/origin/101_00.jpg Deepglobe/1/test/groundtruth/101_00.png\n"
    assert cd.read_family_list(path, root) == files


def test_bad_inputs_name_the_file(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        cd.read_class_names(str(tmp_path / "nowhere.txt"))
    with pytest.raises(FileNotFoundError, match="FSS-1000 class 'no_such_class'"):
        cd.family_files("fss1000", root, class_names=["no_such_class"])
    (tmp_path / "bad.txt").write_text("1 a.jpg\n")
    with pytest.raises(ValueError, match="bad.txt:1: expected 'class image mask'"):
        cd.read_family_list(str(tmp_path / "bad.txt"), root)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        cd.read_binary_mask(str(tmp_path / "gone.png"))


# ---------------------------------------------------------------- masks and transform

def test_mask_threshold_after_grey_conversion(tmp_path):
    # Pillow's L = (299 R + 587 G + 114 B) / 1000: (200,0,0) -> 60 -> 0; (0,255,0) -> 150 -> 1; 127 -> 0; 128 -> 1
    rgb = np.array([[[200, 0, 0], [0, 255, 0]], [[127, 127, 127], [128, 128, 128]]], dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "m.png")
    assert cd.read_binary_mask(str(tmp_path / "m.png")).tolist() == [[0, 1], [0, 1]]


def test_square_resize_mask_nearest_and_image_normalised():
    mask = np.array([[0, 1, 1], [1, 0, 0]], dtype=np.uint8)       # 2 x 3 -> 4 x 4: rows 0,0,1,1; cols 0,0,1,2
    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    img, m = cd.SquareResize(4)(image, mask)
    assert m.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert m.dtype == torch.int64 and img.shape == (3, 4, 4)
    expected = (100 - np.array([0.485, 0.456, 0.406]) * 255) / (np.array([0.229, 0.224, 0.225]) * 255)
    assert torch.allclose(img[:, 2, 3], torch.tensor(expected, dtype=torch.float32))


def test_test_items_carry_the_400_mask_as_label(root):
    files = cd.ClassFiles.from_files(cd.family_files("lung", root))
    episodes = cd.make_episodes("lung", files, 2, 3, 0)
    item = cd.BinaryMaskEpisodes(files, episodes, cd.SquareResize())[1]
    assert item["query_img"].shape == (3, 400, 400) and item["support_imgs"].shape == (2, 3, 400, 400)
    assert item["support_masks"].shape == (2, 400, 400)
    assert torch.equal(item["query_label"], item["query_mask"]) and set(item["query_label"].unique().tolist()) <= {0, 1}
    assert item["episode"] == 1 and item["class_id"] == 1


# ---------------------------------------------------------------- the anchors' exact draws

def hsnet_restated(image_paths, shot):
    """HSNet's test loop re-stated: fix_randseed(0), then per item in order the support loop of sample_episode."""
    np.random.seed(0)
    out = []
    for query in image_paths:
        supports = []
        while True:
            n = np.random.choice(range(1, 11), 1, replace=False)[0]
            name = os.path.join(os.path.dirname(query), str(n)) + ".jpg"
            if query != name:
                supports.append(name)
            if len(supports) == shot:
                break
        out.append((query, supports))
    return out


def patnet_restated(per_class, shot, num):
    np.random.seed(0)
    out = []
    cats = list(per_class)
    for idx in range(num):
        cat = cats[idx % len(cats)]
        query = np.random.choice(per_class[cat], 1, replace=False)[0]
        supports = []
        while True:
            s = np.random.choice(per_class[cat], 1, replace=False)[0]
            if query != s:
                supports.append(s)
            if len(supports) == shot:
                break
        out.append((idx % len(cats), query, supports))
    return out


@pytest.mark.parametrize("shot", [1, 5])
def test_hsnet_draw_equals_restatement(root, shot):
    names_ = cd.read_class_names(os.path.join(root, "fss_splits", "test.txt"))
    files = cd.ClassFiles.from_files(cd.family_files("fss1000", root, class_names=names_))
    episodes = cd.make_episodes("fss1000", files, shot, len(files.pairs), 0, sampler="released")
    expected = hsnet_restated([i for i, _ in files.pairs], shot)
    assert [(files.pairs[e.query][0], [files.pairs[s][0] for s in e.supports]) for e in episodes] == expected
    assert [e.class_id for e in episodes] == [1] * 10 + [2] * 10 + [3] * 10


def test_hsnet_first_episode_by_hand(root):
    # np.random.seed(0); np.random.permutation(10) starts with 2, so the first support is 3.jpg
    assert np.random.RandomState(0).permutation(10)[0] == 2
    files = cd.ClassFiles.from_files(cd.family_files("fss1000", root, class_names=["ink_well"]))
    ep = cd.hsnet_episodes(files, 1)[0]
    assert os.path.basename(files.pairs[ep.query][0]) == "1.jpg"
    assert os.path.basename(files.pairs[ep.supports[0]][0]) == "3.jpg"
    with pytest.raises(ValueError, match="at most 10"):
        cd.hsnet_episodes(files, 1, 11)


@pytest.mark.parametrize("family,shot", [("deepglobe", 1), ("deepglobe", 5), ("isic", 5), ("lung", 1)])
def test_patnet_draw_equals_restatement(root, family, shot):
    raw = cd.family_files(family, root)
    files = cd.ClassFiles.from_files(raw)
    episodes = cd.make_episodes(family, files, shot, cd.PATNET_EPISODES, 0, sampler="released")
    key = 1 if family == "lung" else 0   # PATNet lists the lung masks, the other two the images
    expected = patnet_restated({c: [p[key] for p in v] for c, v in raw.items()}, shot, 600)
    assert len(episodes) == 600
    assert [(e.class_id - 1, files.pairs[e.query][key], [files.pairs[s][key] for s in e.supports])
            for e in episodes] == expected


# ---------------------------------------------------------------- our sampler

@pytest.mark.parametrize("family", cd.FAMILIES)
def test_our_episodes_distinct_supports_and_fixed_by_seed(root, family):
    names_ = cd.read_class_names(os.path.join(root, "fss_splits", "test.txt")) if family == "fss1000" else None
    files = cd.ClassFiles.from_files(cd.family_files(family, root, class_names=names_))
    shot = 1 if family in ("isic", "deepglobe") else 2   # both have a class of 2 images
    episodes = cd.make_episodes(family, files, shot, 40, 7)
    assert episodes == cd.make_episodes(family, files, shot, 40, 7)
    assert episodes != cd.make_episodes(family, files, shot, 40, 8)
    for k, e in enumerate(episodes):
        members = files.class_images[e.class_id]
        assert e.query in members and set(e.supports) <= set(members)
        assert e.query not in e.supports and len(set(e.supports)) == len(e.supports)
        if family == "fss1000":
            assert e.query == k % len(files.pairs)
        else:
            assert e.class_id == k % len(files.classes) + 1


def test_our_sampler_refuses_a_shot_larger_than_a_class(root):
    files = cd.ClassFiles.from_files(cd.family_files("isic", root))   # class 3 has 2 images
    with pytest.raises(ValueError, match="2 images; 2-shot episodes need 3"):
        cd.make_episodes("isic", files, 2, 3, 0)


# ---------------------------------------------------------------- registry entries, make_lists, build, test.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def lists(root, tmp_path_factory):
    """make_lists of every family on the stand-ins: {family: list_dir}."""
    from dataset.make_lists import main as make_lists
    out = tmp_path_factory.mktemp("cdfss_lists")
    dirs = {}
    for family in cd.FAMILIES:
        dirs[family] = str(out / family)
        extra = ["--classes-file", os.path.join(root, "fss_splits")] if family == "fss1000" else []
        with pytest.warns(UserWarning, match="not the standard") if family == "fss1000" else _nothing():
            assert make_lists([family, "--data-root", root, "--list-dir", dirs[family], *extra]) == 0
    return dirs


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def cfg_of(family, root, list_dir, **keys):
    from common.config import defaults
    return defaults(benchmark=family, data_root=root, list_dir=list_dir, test_size=64, train_size=48,
                    classes_file=os.path.join(root, "fss_splits") if family == "fss1000" else None, **keys)


def test_registry_classes_and_folds(root):
    from dataset.registry import resolve_benchmark
    fss = resolve_benchmark("fss1000", classes_file=os.path.join(root, "fss_splits"))
    # HSNet's ids + 1: trn (sorted), val (sorted), test (sorted); one fold whose novel classes are the test classes
    assert fss.class_names == ("ant_lion", "bean-bag", "cob_pipe", "dust_pan", "egg_cup", "fire-fly", "gas_lamp",
                               "hat_box", "ink_well", "jay's_feather", "kite_tail")
    assert fss.novel_classes(0) == [9, 10, 11] and fss.base_classes(0) == list(range(1, 9))
    dg = resolve_benchmark("deepglobe")
    assert dg.class_names == ("agriculture", "urban", "rangeland", "forest", "water", "barren")
    assert dg.novel_classes(0) == [1, 2, 3, 4, 5, 6] and dg.num_folds == 1
    assert resolve_benchmark("isic").class_names == ("nevus", "melanoma", "seborrheic_keratosis")
    assert resolve_benchmark("lung").novel_classes(0) == [1]
    with pytest.raises(ValueError, match="fss1000 needs classes_file"):
        resolve_benchmark("fss1000")
    with pytest.raises(ValueError, match="one fixed fold"):
        resolve_benchmark("lung", num_folds=2)


def test_make_lists_writes_the_anchors_order(root, lists):
    with open(os.path.join(lists["fss1000"], "val.txt")) as f:
        val = f.read().split("\n")
    assert val[:3] == ["FSS-1000/ink_well/1.jpg FSS-1000/ink_well/1.png",
                       "FSS-1000/ink_well/10.jpg FSS-1000/ink_well/10.png",
                       "FSS-1000/ink_well/2.jpg FSS-1000/ink_well/2.png"] and len(val) == 31
    with open(os.path.join(lists["fss1000"], "train.txt")) as f:
        assert f.readline() == "FSS-1000/ant_lion/1.jpg FSS-1000/ant_lion/1.png\n"
    with open(os.path.join(lists["lung"], "val.txt")) as f:
        assert f.readline() == ("LungSegmentation/CXR_png/CHNCXR_0001_0.png "
                                "LungSegmentation/masks/CHNCXR_0001_0_mask.png\n")


@pytest.mark.parametrize("family", cd.FAMILIES)
def test_build_test_dataset_is_the_anchor_draw_over_the_lists(root, lists, family):
    from dataset import build_test_dataset
    cfg = cfg_of(family, root, lists[family], episode_sampler="released")
    data = build_test_dataset(cfg, 0, 12, shot=1)
    names_ = cd.read_class_names(os.path.join(root, "fss_splits", "test.txt")) if family == "fss1000" else None
    files = cd.ClassFiles.from_files(cd.family_files(family, root, class_names=names_))
    expected = cd.make_episodes(family, files, 1, 12, 0, sampler="released")
    assert [(e.query, e.supports) for e in data.episodes] == [(e.query, e.supports) for e in expected]
    assert data.files.pairs == files.pairs
    offset = 8 if family == "fss1000" else 0   # fss1000's ids count the trn and val classes first
    assert [e.class_id for e in data.episodes] == [e.class_id + offset for e in expected]
    item = data[0]
    assert item["query_img"].shape == (3, 64, 64) and item["query_label"].shape == (64, 64)


def test_fss1000_trains_on_the_trn_classes_and_cross_domain_sets_refuse_training(root, lists):
    from dataset import build_train_dataset
    train = build_train_dataset(cfg_of("fss1000", root, lists["fss1000"], shot=2))
    assert len(train) == 60 and train.files.classes == ("ant_lion", "bean-bag", "cob_pipe", "dust_pan", "egg_cup",
                                                        "fire-fly")
    train.set_epoch(1)
    item = train[13]
    assert item["support_imgs"].shape == (2, 3, 48, 48) and item["class_id"] == 2
    assert torch.equal(item["support_masks"], train[13]["support_masks"])   # fixed by (seed, epoch, index)
    with pytest.raises(ValueError, match="a test set"):
        build_train_dataset(cfg_of("lung", root, lists["lung"]))


def test_test_py_on_a_cross_domain_config_and_the_summary(root, lists, tmp_path):
    """test.py with config/cdfss_lung.yaml (an untrained small model): the results are named by the target and
    tools/summarize.py puts them in the cross-domain table."""
    import subprocess
    import sys
    exp = str(tmp_path / "exp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}
    for family in ("lung", "deepglobe"):
        out = subprocess.run([sys.executable, "test.py", "--config", f"config/cdfss_{family}.yaml", "--untrained",
                              "backbone=resnet18_deep_half", "pretrained=null", "reduce_dim=16", f"data_root={root}",
                              f"list_dir={lists[family]}", "test_episodes=3", "workers=0", f"exp_dir={exp}",
                              "test_size=48", "episode_sampler=released"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
    with open(os.path.join(exp, "test_lung_1shot_untrained.json")) as f:
        result = json.load(f)
    assert (result["benchmark"], result["train_benchmark"], result["episode_sampler"]) == ("lung", "pascal", "released")
    assert result["seeds"] == [0] and result["class_names"] == {"1": "lung"}
    from tools.summarize import main as summarize
    text = summarize([exp])
    assert "cross-domain: trained on pascal, tested on each target (mIoU %)" in text
    row = next(line for line in text.splitlines() if line.startswith("baseline resnet18_deep_half untrained"))
    dg = json.load(open(os.path.join(exp, "test_deepglobe_1shot_untrained.json")))["miou"]
    assert row.split()[3:6] == [f"{100 * dg:.2f}", "-", f"{100 * result['miou']:.2f}"]
    assert row.split()[-2] == f"{100 * (dg + result['miou']) / 2:.2f}*2"


def test_cross_domain_cells_by_hand():
    from tools.summarize import cross_domain_cells
    assert cross_domain_cells({"deepglobe": 0.4, "isic": 0.3, "lung": 0.7, "fss1000": 0.8}) == \
        ["40.00", "30.00", "70.00", "80.00", "55.00"]
    assert cross_domain_cells({"isic": 0.3, "lung": 0.6}) == ["-", "30.00", "60.00", "-", "45.00*2"]


def test_ablate_targets_one_command_cross_domain_table(root, lists, tiny_voc, tmp_path):
    """tools/ablate.py --targets: a tiny PASCAL-layout model trained on all classes (train_classes: all) per method,
    each run tested on a cross-domain target at two shots; ablation.json's cross_domain rows hold the results
    test.py wrote, and summarize renders them."""
    import subprocess
    import sys
    data, voc_lists = tiny_voc
    (tmp_path / "train.yaml").write_text(
        f"_base_: {ROOT}/config/demo.yaml\ntrain_classes: all\ndata_root: {data}\nlist_dir: {voc_lists}\n"
        "pretrained: null\nmin_class_pixels: 16\ntrain_size: 32\ntest_size: 40\nreduce_dim: 16\nepochs: 1\n"
        "batch_size: 8\nval_episodes: 2\ntest_episodes: 2\ntest_seeds: [1]\nworkers: 0\n")
    (tmp_path / "lung.yaml").write_text(
        f"_base_: train.yaml\nbenchmark: lung\ntrain_benchmark: pascal\ndata_root: {root}\nlist_dir: {lists['lung']}\n"
        "test_size: 40\ntest_episodes: 3\ntest_seeds: [0]\nepisode_sampler: released\n")
    out = str(tmp_path / "ablation")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, "tools/ablate.py", "--config", str(tmp_path / "train.yaml"), "--methods",
                          "freeze", "--train-seeds", "1", "--out", out, "--targets", str(tmp_path / "lung.yaml"),
                          "--target-shots", "1,2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    with open(os.path.join(out, "ablation.json")) as f:
        cross = json.load(f)["cross_domain"]
    assert cross["targets"] == ["lung"] and cross["shots"] == [1, 2] and cross["complete"]
    for row in cross["rows"]:
        suffix = "_untrained" if row["method"] == "untrained" else ""
        for shot in (1, 2):
            with open(os.path.join(out, row["method"], "seed321", f"test_lung_{shot}shot{suffix}.json")) as f:
                result = json.load(f)
            assert result["shot"] == shot and result["episodes_per_seed"] == 3
            assert row["miou"]["lung"][str(shot)] == {"mean": result["miou"], "std": 0.0, "runs": 1}
    assert "cross-domain: each run tested on Chest X-ray" in run.stdout
