"""The synthetic VOC-layout dataset: layout, determinism, VOC-like 255 borders, one-shot recognisable classes."""
import contextlib
import io
import os
import warnings

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from common.config import defaults
from dataset import build_test_dataset
from dataset.make_lists import main as make_lists_main
from dataset.synthetic import TEXTURES, class_appearance, main as synthetic_main, write_dataset


def read_tree(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                files[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return files


def test_layout_and_determinism(tmp_path):
    synthetic_main(["--out", str(tmp_path / "a"), "--seed", "3", "--num-train", "8", "--num-val", "4",
                    "--size", "64"])
    write_dataset(str(tmp_path / "b"), seed=3, num_train=8, num_val=4, size=64)
    write_dataset(str(tmp_path / "c"), seed=4, num_train=8, num_val=4, size=64)
    write_dataset(str(tmp_path / "d"), seed=3, num_train=8, num_val=4, size=64, workers=2)
    a, b, c, d = (read_tree(tmp_path / x) for x in "abcd")
    assert a == b == d  # byte for byte from the seed, in one process or several
    assert a.keys() == c.keys() and a != c
    ids = [f"synth_{k:06d}" for k in range(12)]
    assert sorted(k for k in a if k.startswith("JPEGImages")) == [f"JPEGImages/{i}.jpg" for i in ids]
    labels = sorted(k for k in a if k.startswith("SegmentationClassAug"))
    assert labels == [f"SegmentationClassAug/{i}.png" for i in ids]
    voc_train = a["ImageSets/Segmentation/train.txt"].decode().split()
    sbd = a["ImageSets/SBD/train_noval.txt"].decode().split()
    assert sorted(set(voc_train) | set(sbd)) == ids[:8] and set(voc_train) & set(sbd)  # overlapping lists
    assert a["ImageSets/Segmentation/val.txt"].decode().split() == ids[8:]
    for i in ids:
        image = cv2.imread(str(tmp_path / "a" / "JPEGImages" / f"{i}.jpg"))
        label = cv2.imread(str(tmp_path / "a" / "SegmentationClassAug" / f"{i}.png"), cv2.IMREAD_UNCHANGED)
        assert label.dtype == np.uint8 and label.ndim == 2 and image.shape[:2] == label.shape
        assert all(40 <= side <= 64 for side in label.shape)
        values = set(np.unique(label).tolist())
        assert values <= set(range(21)) | {255} and values - {0, 255}
        # like VOC, a 255 band separates every object from the background and from other objects
        for a_, b_ in ((label[1:], label[:-1]), (label[:, 1:], label[:, :-1])):
            touching = (a_ != b_) & (a_ != 255) & (b_ != 255)
            assert not touching.any()


def test_class_appearances_are_distinct():
    looks = [class_appearance(c) for c in range(1, 21)]
    assert len(set(looks)) == 20 and len({hue for hue, _ in looks}) == 20
    by_hue = sorted(looks)
    for (_, t1), (_, t2) in zip(by_hue, by_hue[1:] + by_hue[:1]):
        assert t1 != t2  # neighbours on the colour wheel differ in texture
    for fold in range(4):
        novel_hues = sorted(looks[c - 1][0] for c in range(5 * fold + 1, 5 * fold + 6))
        assert np.diff(novel_hues).tolist() == [36.0] * 4  # 72 degrees apart (OpenCV hue units)
        base_textures = {looks[c - 1][1] for c in range(1, 21) if not 5 * fold < c <= 5 * fold + 5}
        assert base_textures == set(TEXTURES)


def test_novel_classes_recognisable_from_one_support(tmp_path):
    """A raw-colour prototype of one support finds the class; a prototype of another class does not."""
    root = str(tmp_path)
    write_dataset(root, seed=0, num_train=1, num_val=60, size=96)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        make_lists_main(["pascal", "--data-root", root, "--list-dir", root + "/lists", "--min-class-pixels", "32",
                         "--workers", "1"])
    cfg = defaults(benchmark="pascal", data_root=root, list_dir=root + "/lists", fold=0, shot=1,
                   min_class_pixels=32, test_size=96, seed=0, workers=0)
    items = [item for item in build_test_dataset(cfg, seed=0, num_episodes=30)]

    def prototype(item):
        features = F.avg_pool2d(item["support_imgs"][:1], 5, 1, 2)[0]
        mask = (item["support_masks"][0] == 1).float()
        return (features * mask).sum((1, 2)) / mask.sum()

    def miou(pick_support):
        inter, union = np.zeros(21), np.zeros(21)
        for k, item in enumerate(items):
            query = F.avg_pool2d(item["query_img"][None], 5, 1, 2)[0]
            proto = prototype(pick_support(k))
            pred = (((query - proto[:, None, None]) ** 2).sum(0) < 0.6).float()
            label = item["query_label"]  # the original resolution: the prediction's top-left L x L block
            side = max(label.shape)
            pred = F.interpolate(pred[None, None], size=(side, side), mode="nearest")[0, 0, :label.shape[0],
                                                                                      :label.shape[1]].bool()
            valid, target = label != 255, label == 1
            inter[item["class_id"]] += (pred & target & valid).sum().item()
            union[item["class_id"]] += ((pred | target) & valid).sum().item()
        return (inter[union > 0] / union[union > 0]).mean()

    def other_class(k):
        return next(item for item in items[k + 1:] + items[:k] if item["class_id"] != items[k]["class_id"])

    assert len({item["class_id"] for item in items}) == 5
    right, wrong = miou(lambda k: items[k]), miou(other_class)
    assert right > 0.5 and wrong < 0.1, (right, wrong)
    print(f"raw-colour prototype mIoU: right support {right:.3f}, other class {wrong:.3f}")
    assert torch.is_tensor(items[0]["query_img"])


def test_pretraining_classes_are_none_of_the_segmentation_classes():
    """The demo's stand-in for ImageNet (dataset.synthetic_cls): 80 categories, each (hue, texture) new; every
    hue half-way between two segmentation hues, every texture one the segmentation data never draws."""
    from dataset.synthetic_cls import NUM_CLASSES, PRETRAIN_TEXTURES, pretrain_class_appearance
    seg = [class_appearance(c) for c in range(1, 21)]
    seg_hues = {hue for hue, _ in seg}
    looks = [pretrain_class_appearance(c) for c in range(NUM_CLASSES)]
    assert NUM_CLASSES == 80 and len(set(looks)) == 80
    assert not {texture for _, texture in looks} & set(TEXTURES)
    assert {texture for _, texture in looks} == set(PRETRAIN_TEXTURES)
    for hue, _ in looks:  # 4.5 OpenCV units (9 degrees) from the nearest segmentation hue; jitter is +-1.5
        assert min(min(abs(hue - h), 180 - abs(hue - h)) for h in seg_hues) == 4.5
    assert not set(looks) & set(seg)


def test_pretraining_images_show_their_class_and_are_deterministic():
    from dataset.synthetic_cls import NUM_CLASSES, make_classification_set, pretrain_class_appearance
    images, labels = make_classification_set(NUM_CLASSES, size=48, seed=0)
    again, _ = make_classification_set(NUM_CLASSES, size=48, seed=0)
    other, _ = make_classification_set(NUM_CLASSES, size=48, seed=1)
    assert np.array_equal(images, again) and not np.array_equal(images, other)  # deterministic from the seed
    assert labels.tolist() == list(range(NUM_CLASSES)) and images.shape == (NUM_CLASSES, 48, 48, 3)
    for k in range(0, NUM_CLASSES, 7):  # the saturated (object) pixels carry the class's hue
        hsv = cv2.cvtColor(images[k], cv2.COLOR_RGB2HSV)
        saturated = hsv[..., 1] > 150
        assert saturated.sum() > 50
        hue = pretrain_class_appearance(int(labels[k]))[0]
        angles = hsv[..., 0][saturated].astype(float) * np.pi / 90
        mean_hue = (np.degrees(np.arctan2(np.sin(angles).mean(), np.cos(angles).mean())) / 2) % 180
        assert min(abs(mean_hue - hue), 180 - abs(mean_hue - hue)) < 4, (k, mean_hue, hue)
