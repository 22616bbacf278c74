"""List building on a hand-made VOC tree and on a tiny COCO annotation file; bad inputs of both."""
import json
import os

import cv2
import numpy as np
import pytest

from dataset import registry as registry_module
from dataset.lists import fold_lists, pascal_image_lists
from dataset.make_lists import main as make_lists_main
from dataset.prepare_coco import prepare_split

SIZE = 40  # 1,600-pixel label maps; the tests use min_class_pixels=100


def label_with(*regions):
    """A SIZE x SIZE label map with (class, pixel count) regions laid out row-major, 255 border row."""
    label = np.zeros(SIZE * SIZE, np.uint8)
    start = 0
    for class_id, pixels in regions:
        label[start:start + pixels] = class_id
        start += pixels
    label = label.reshape(SIZE, SIZE)
    label[-1] = 255
    return label


# fold 0: novel 1..5, base 6..20
TREE = {
    "a": label_with((6, 300)),                 # base only
    "b": label_with((6, 300), (1, 300)),       # base + novel: dropped by †
    "c": label_with((7, 99), (8, 100)),        # 7 below the threshold, 8 exactly at it
    "d": label_with((1, 300)),                 # novel only: never a training image
    "e": label_with((7, 300), (2, 5)),         # 5 novel pixels are enough for † to drop it
    "f": label_with(),                         # background only
    "v1": label_with((1, 300), (6, 300)),
    "v2": label_with((2, 50)),
    "v3": label_with((3, 300)),
}


def write_voc_tree(root, labels=TREE, voc_train=("a", "b", "c"), sbd=("b", "c", "d", "e", "f", "v1"),
                   voc_val=("v1", "v2", "v3")):
    for folder in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation", "ImageSets/SBD"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for image_id, label in labels.items():
        cv2.imwrite(os.path.join(root, "JPEGImages", image_id + ".jpg"), np.dstack([label * 10] * 3))
        cv2.imwrite(os.path.join(root, "SegmentationClassAug", image_id + ".png"), label)
    for rel, ids in (("ImageSets/Segmentation/train.txt", voc_train), ("ImageSets/Segmentation/val.txt", voc_val),
                     ("ImageSets/SBD/train_noval.txt", sbd)):
        with open(os.path.join(root, rel), "w") as f:
            f.write("".join(i + "\n" for i in ids))


@pytest.fixture
def voc(tmp_path):
    root, list_dir = str(tmp_path / "voc"), str(tmp_path / "lists")
    write_voc_tree(root)
    with pytest.warns(UserWarning) as warned:
        make_lists_main(["pascal", "--data-root", root, "--list-dir", list_dir, "--min-class-pixels", "100",
                         "--workers", "1"])
    messages = [str(w.message) for w in warned]
    assert any("has 6 images, not the standard 5953 of pascal train" in m for m in messages)
    assert any("has 3 images, not the standard 1449 of pascal val" in m for m in messages)
    return root, list_dir


def names(lists, indices):
    return [os.path.basename(lists.pairs[i][0])[:-4] for i in indices]


def test_image_lists_union_dedup_and_val_removed(voc):
    root, list_dir = voc
    with open(os.path.join(list_dir, "train.txt")) as f:
        train = f.read().splitlines()
    assert train == [f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png" for i in "abcdef"]  # v1 is val
    with open(os.path.join(list_dir, "val.txt")) as f:
        assert [line.split()[0] for line in f] == ["JPEGImages/v1.jpg", "JPEGImages/v2.jpg", "JPEGImages/v3.jpg"]


def test_fold_lists_with_and_without_dagger(voc):
    root, list_dir = voc
    train = os.path.join(list_dir, "train.txt")
    dagger = fold_lists(train, root, "pascal", 0, "base", drop_novel_images=True, min_class_pixels=100)
    assert names(dagger, dagger.images) == ["a", "c"]
    assert {c: names(dagger, v) for c, v in dagger.class_images.items() if v} == {6: ["a"], 8: ["c"]}
    assert dagger.classes == list(range(6, 21))
    plain = fold_lists(train, root, "pascal", 0, "base", drop_novel_images=False, min_class_pixels=100)
    assert names(plain, plain.images) == ["a", "b", "c", "e"]
    assert {c: names(plain, v) for c, v in plain.class_images.items() if v} == {6: ["a", "b"], 7: ["e"], 8: ["c"]}
    val = fold_lists(os.path.join(list_dir, "val.txt"), root, "pascal", 0, "novel", min_class_pixels=100)
    assert names(val, val.images) == ["v1", "v3"]
    assert {c: names(val, v) for c, v in val.class_images.items() if v} == {1: ["v1"], 3: ["v3"]}
    fold1 = fold_lists(train, root, "pascal", 1, "base", drop_novel_images=True, min_class_pixels=100)
    assert names(fold1, fold1.images) == ["d"]  # fold 1: 6..10 novel, 1..5 base
    low = fold_lists(train, root, "pascal", 0, "base", drop_novel_images=True, min_class_pixels=99)
    assert {c: names(low, v) for c, v in low.class_images.items() if v} == {6: ["a"], 7: ["c"], 8: ["c"]}


def test_cache_is_used_and_rebuilt_when_its_key_changes(voc, monkeypatch):
    root, list_dir = voc
    train = os.path.join(list_dir, "train.txt")
    cache_files = set(os.listdir(os.path.join(list_dir, "cache")))
    assert "train_pascal_fold2_base_dropnovel_min100.json" in cache_files  # written by make_lists

    def no_reading(*args):
        raise AssertionError("label maps were read although the cache is valid")
    monkeypatch.setattr(registry_module, "read_label", no_reading)  # what reads PASCAL masks
    fold_lists(train, root, "pascal", 0, "base", drop_novel_images=True, min_class_pixels=100)  # from cache
    # the filter flag is part of the key: a cache written for † is never served without †
    path = os.path.join(list_dir, "cache", "train_pascal_fold0_base_dropnovel_min100.json")
    with open(path) as f:
        cached = json.load(f)
    cached["key"]["drop_novel_images"] = False
    with open(path, "w") as f:
        json.dump(cached, f)
    rebuilt = fold_lists(train, root, "pascal", 0, "base", drop_novel_images=True, min_class_pixels=100)
    assert names(rebuilt, rebuilt.images) == ["a", "c"]
    with open(path) as f:
        assert json.load(f)["key"]["drop_novel_images"] is True
    monkeypatch.undo()
    # a changed list file (another image set) invalidates every cache built from it
    with open(train, "w") as f:
        f.write("JPEGImages/e.jpg SegmentationClassAug/e.png\nJPEGImages/a.jpg SegmentationClassAug/a.png\n")
    plain = fold_lists(train, root, "pascal", 0, "base", drop_novel_images=False, min_class_pixels=100)
    assert names(plain, plain.images) == ["e", "a"]
    assert {c: names(plain, v) for c, v in plain.class_images.items() if v} == {6: ["a"], 7: ["e"]}


def test_bad_inputs_of_the_list_builder(tmp_path):
    with pytest.raises(FileNotFoundError, match="data root not found: .*nowhere"):
        pascal_image_lists(str(tmp_path / "nowhere"))
    root = str(tmp_path / "voc")
    write_voc_tree(root)
    os.remove(os.path.join(root, "SegmentationClassAug", "c.png"))
    with pytest.raises(FileNotFoundError, match=r"label map not found: .*c\.png for image .*c\.jpg"):
        pascal_image_lists(root)
    os.remove(os.path.join(root, "ImageSets", "SBD", "train_noval.txt"))
    with pytest.raises(FileNotFoundError, match=r"image-set file not found: .*train_noval\.txt"):
        pascal_image_lists(root)


def test_label_outside_the_classes_names_the_file(tmp_path):
    root, list_dir = str(tmp_path / "voc"), str(tmp_path / "lists")
    write_voc_tree(root, labels={**TREE, "e": label_with((21, 300))})
    with pytest.raises(ValueError, match=r"label map .*e\.png contains values \[21\], outside 0..20"):
        make_lists_main(["pascal", "--data-root", root, "--list-dir", list_dir, "--workers", "1"])
    assert not os.path.exists(list_dir)  # every input is checked before anything is written


def test_corrupt_or_colour_mask_names_the_file(tmp_path):
    root, list_dir = str(tmp_path / "voc"), str(tmp_path / "lists")
    write_voc_tree(root)
    with open(os.path.join(root, "SegmentationClassAug", "b.png"), "wb") as f:
        f.write(b"\x89PNG broken")
    args = ["pascal", "--data-root", root, "--list-dir", list_dir, "--workers", "1"]
    with pytest.raises(ValueError, match=r"cannot decode label map .*b\.png"):
        make_lists_main(args)
    cv2.imwrite(os.path.join(root, "SegmentationClassAug", "b.png"), np.zeros((SIZE, SIZE, 3), np.uint8) + 7)
    with pytest.raises(ValueError, match=r"label map .*b\.png has mode 'RGB'; expected a single-channel"):
        make_lists_main(args)
    assert not os.path.exists(list_dir)  # every input is checked before anything is written


# ---------------------------------------------------------------- COCO

COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def square(x, y, side):
    return [[x, y, x + side, y, x + side, y + side, x, y + side]]


def write_instances(path, categories=COCO_CATEGORY_IDS):
    # categories listed out of order on purpose: labels follow ascending id, not file order
    cats = [{"id": c, "name": f"cat{c}", "supercategory": "x"} for c in reversed(categories)]
    images = [{"id": 1, "file_name": "COCO_x_1.jpg", "height": 30, "width": 40},
              {"id": 2, "file_name": "COCO_x_2.jpg", "height": 20, "width": 20},
              {"id": 3, "file_name": "COCO_x_3.jpg", "height": 20, "width": 20}]  # no annotation
    anns = [
        # a small "person" (id 1 -> 1) on a large "toothbrush" (id 90 -> 80): small drawn last
        {"id": 10, "image_id": 1, "category_id": 1, "segmentation": square(5, 5, 4), "area": 16.0,
         "bbox": [5, 5, 4, 4], "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 90, "segmentation": square(2, 2, 20), "area": 400.0,
         "bbox": [2, 2, 20, 20], "iscrowd": 0},
        # a crowd region (RLE) of category id 13 ("stop sign", label 12)
        {"id": 12, "image_id": 2, "category_id": 13, "area": 40.0, "bbox": [0, 0, 2, 20], "iscrowd": 1,
         "segmentation": {"size": [20, 20], "counts": [0, 40, 360]}},
    ]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_prepare_coco_and_lists(tmp_path, capsys):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train2014", "val2014"):
        write_instances(root / "annotations" / f"instances_{split}.json")
        (root / split).mkdir()
        for k in (1, 2, 3):
            cv2.imwrite(str(root / split / f"COCO_x_{k}.jpg"), np.zeros((30, 40, 3) if k == 1 else (20, 20, 3), np.uint8))
    assert prepare_split(str(root), "train2014", workers=1) == 2
    assert prepare_split(str(root), "val2014", workers=2) == 2
    for split in ("train2014", "val2014"):
        assert sorted(os.listdir(root / "annotations" / split)) == ["COCO_x_1.png", "COCO_x_2.png"]
        one = cv2.imread(str(root / "annotations" / split / "COCO_x_1.png"), cv2.IMREAD_UNCHANGED)
        expected = np.zeros((30, 40), np.uint8)
        expected[2:22, 2:22] = 80
        expected[5:9, 5:9] = 1
        # pycocotools rasterises polygon edges at half-pixel precision: compare the interiors exactly
        assert one.shape == (30, 40) and np.array_equal(one[3:21, 3:21], expected[3:21, 3:21])
        assert set(np.unique(one)) == {0, 1, 80}
        two = cv2.imread(str(root / "annotations" / split / "COCO_x_2.png"), cv2.IMREAD_UNCHANGED)
        assert (two[:, :2] == 12).all() and (two[:, 2:] == 0).all()  # column-major RLE: 2 columns
    list_dir = str(tmp_path / "lists")
    with pytest.warns(UserWarning, match="not the standard"):
        make_lists_main(["coco", "--data-root", str(root), "--list-dir", list_dir, "--min-class-pixels", "10",
                         "--workers", "1"])
    with open(os.path.join(list_dir, "train.txt")) as f:
        assert f.read().splitlines() == [
            "train2014/COCO_x_1.jpg annotations/train2014/COCO_x_1.png",
            "train2014/COCO_x_2.jpg annotations/train2014/COCO_x_2.png"]
    out = capsys.readouterr().out
    assert "train.txt: 2 images (standard coco train list: 82081)" in out
    # fold 0 interleaved: novel {1, 5, ..., 77}; 80 and 12 are base
    val = fold_lists(os.path.join(list_dir, "val.txt"), str(root), "coco", 0, "novel", min_class_pixels=10)
    assert val.class_images[1] == [0] and val.images == [0]
    base = fold_lists(os.path.join(list_dir, "train.txt"), str(root), "coco", 0, "base", drop_novel_images=True,
                      min_class_pixels=10)
    assert base.images == [1] and base.class_images[12] == [1]  # image 1 has a novel "person"
    consecutive = fold_lists(os.path.join(list_dir, "train.txt"), str(root), "coco", 0, "base",
                             drop_novel_images=True, min_class_pixels=10, coco_split="consecutive")
    # consecutive fold 0: novel 1..20, so image 0 (has 1) is dropped and image 1's class 12 is novel
    assert consecutive.images == [] and consecutive.classes == list(range(21, 81))


def test_prepare_coco_bad_inputs(tmp_path):
    (tmp_path / "annotations").mkdir()
    with pytest.raises(FileNotFoundError, match=r"COCO annotation file not found: .*instances_val2014\.json"):
        prepare_split(str(tmp_path), "val2014")
    write_instances(tmp_path / "annotations" / "instances_val2014.json", categories=COCO_CATEGORY_IDS[:79] + [1])
    with pytest.raises(ValueError, match=r"instances_val2014\.json has 79 categories, expected the 80"):
        prepare_split(str(tmp_path), "val2014")
    write_instances(tmp_path / "annotations" / "instances_val2014.json", categories=COCO_CATEGORY_IDS[:79] + [91])
    with pytest.raises(KeyError, match=r"instances_val2014\.json: annotation 11 has unknown category_id 90"):
        prepare_split(str(tmp_path), "val2014")
    # a COCO label map with 81 is outside 0..80
    label_dir = tmp_path / "annotations" / "train2014"
    label_dir.mkdir()
    (tmp_path / "train2014").mkdir()
    cv2.imwrite(str(tmp_path / "train2014" / "x.jpg"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(label_dir / "x.png"), np.full((8, 8), 81, np.uint8))
    (tmp_path / "annotations" / "val2014").mkdir(exist_ok=True)  # prepare_split made it
    make = ["coco", "--data-root", str(tmp_path), "--list-dir", str(tmp_path / "l"), "--workers", "1"]
    with pytest.raises(ValueError, match=r"annotations/val2014 holds no label map"):  # an empty input is an error
        make_lists_main(make)
    (tmp_path / "val2014").mkdir()
    cv2.imwrite(str(tmp_path / "val2014" / "y.jpg"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "annotations" / "val2014" / "y.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"x\.png contains values \[81\], outside 0..80"):
        make_lists_main(make)
    assert not (tmp_path / "l").exists()  # every input is checked before anything is written


# ---------------------------------------------------------------- the released code's list files

AUTHORS_VOC = "/root/paddlejob/workspace/env_run/datsets/voc/VOC2012"  # the prefix of the released fss_list files


def test_released_pascal_lists_with_absolute_paths_keep_their_order(voc, tmp_path):
    """The SVF code's fss_list/val/data_list_N.txt (the authors' absolute paths) used as val.txt, or given to
    make_lists --val-list: the same images in the file's order (v3 before v1), the paths under our data root."""
    root, _ = voc
    released = tmp_path / "data_list_0.txt"
    released.write_text("".join(f"{AUTHORS_VOC}/JPEGImages/{i}.jpg {AUTHORS_VOC}/SegmentationClassAug/{i}.png\n"
                                for i in ("v3", "v2", "v1")))
    val = fold_lists(str(released), root, "pascal", 0, "novel", min_class_pixels=100)
    assert val.pairs[0] == (os.path.join(root, "JPEGImages", "v3.jpg"),
                            os.path.join(root, "SegmentationClassAug", "v3.png"))
    assert names(val, val.images) == ["v3", "v1"]  # v2's 50 pixels are too few; the file's order kept
    assert {c: names(val, v) for c, v in val.class_images.items() if v} == {1: ["v1"], 3: ["v3"]}
    list_dir = tmp_path / "lists"
    with pytest.warns(UserWarning, match="not the standard"):
        make_lists_main(["pascal", "--data-root", root, "--list-dir", str(list_dir), "--val-list", str(released),
                         "--min-class-pixels", "100", "--workers", "1"])
    assert (list_dir / "val.txt").read_text().splitlines() == [
        f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png" for i in ("v3", "v2", "v1")]
    assert "v1" not in (list_dir / "train.txt").read_text()  # still removed from train
    # an absolute path inside the data root is used as it is; relative and absolute lines mix
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(f"{root}/JPEGImages/v1.jpg SegmentationClassAug/v1.png\n")
    assert fold_lists(str(mixed), root, "pascal", 0, "novel", min_class_pixels=100).pairs == [
        (os.path.join(root, "JPEGImages", "v1.jpg"), os.path.join(root, "SegmentationClassAug", "v1.png"))]


def test_a_list_line_that_cannot_be_mapped_names_the_file_and_line(voc, tmp_path):
    root, _ = voc
    bad = tmp_path / "val.txt"
    bad.write_text(f"{AUTHORS_VOC}/JPEGImages/v1.jpg {AUTHORS_VOC}/SegmentationClassAug/v1.png\n"
                   "/somewhere/images/v3.jpg /somewhere/masks/v3.png\n")
    with pytest.raises(ValueError, match=r"val\.txt:2: '/somewhere/images/v3\.jpg' is an absolute path outside "
                                         r"the data root .* JPEGImages/, SegmentationClassAug/, train2014/, val2014/"):
        fold_lists(str(bad), root, "pascal", 0, "novel", min_class_pixels=100)


def write_coco_tree(root, labels):
    """val2014/<name>.jpg and annotations/val2014/<name>.png (+ one train image) as prepare_coco lays them out."""
    for split, items in (("val2014", labels), ("train2014", {"COCO_train2014_1": label_with((21, 300))})):
        os.makedirs(os.path.join(root, "annotations", split), exist_ok=True)
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for name, label in items.items():
            cv2.imwrite(os.path.join(root, split, name + ".jpg"), np.dstack([label] * 3))
            cv2.imwrite(os.path.join(root, "annotations", split, name + ".png"), label)


def test_released_coco_val_list_keeps_its_unsorted_order(tmp_path):
    """COCO's released lists/coco/fss_list/val.txt is not sorted: make_lists --val-list keeps its order (relative
    or absolute lines), and the queries of a fold come out in that order; without it the label maps are sorted."""
    root = str(tmp_path / "coco")
    # fold 0 interleaved: 1, 5, 9 are novel; 2 is base
    order = {"COCO_val2014_000000553141": label_with((5, 300)), "COCO_val2014_000000020925": label_with((1, 300)),
             "COCO_val2014_000000470885": label_with((2, 300)), "COCO_val2014_000000000042": label_with((9, 300))}
    write_coco_tree(root, order)
    lines = [f"val2014/{n}.jpg annotations/val2014/{n}.png\n" for n in order]
    released = tmp_path / "val.txt"
    released.write_text("".join(lines))
    absolute = tmp_path / "val_abs.txt"
    absolute.write_text("".join(f"/data/authors/coco/{a} /data/authors/coco/{b}" for a, b in
                            (line.split(" ") for line in lines)))
    for given in (released, absolute):
        list_dir = tmp_path / ("lists_" + given.stem)
        with pytest.warns(UserWarning, match="not the standard"):
            make_lists_main(["coco", "--data-root", root, "--list-dir", str(list_dir), "--val-list", str(given),
                             "--min-class-pixels", "100", "--workers", "1"])
        assert (list_dir / "val.txt").read_text() == released.read_text()
        val = fold_lists(str(list_dir / "val.txt"), root, "coco", 0, "novel", min_class_pixels=100)
        assert names(val, val.images) == ["COCO_val2014_000000553141", "COCO_val2014_000000020925",
                                          "COCO_val2014_000000000042"]
        direct = fold_lists(str(given), root, "coco", 0, "novel", min_class_pixels=100)  # the file itself
        assert direct.pairs == val.pairs and direct.images == val.images
    with pytest.warns(UserWarning, match="not the standard"):
        make_lists_main(["coco", "--data-root", root, "--list-dir", str(tmp_path / "sorted"),
                         "--min-class-pixels", "100", "--workers", "1"])
    assert (tmp_path / "sorted" / "val.txt").read_text().splitlines() == sorted(line.strip() for line in lines)
    with pytest.raises(ValueError, match="--sbd-list: not an option of coco's lists"):
        make_lists_main(["coco", "--data-root", root, "--list-dir", str(tmp_path / "x"), "--sbd-list", str(released)])
