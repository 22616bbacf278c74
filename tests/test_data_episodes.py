"""Episodes on a small generated VOC-layout dataset: determinism, sharding, base/novel rules, bad inputs."""
import os
import shutil

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from common.config import defaults
from dataset import (build_base_dataset, build_test_dataset, build_train_dataset, novel_classes, base_classes,
                     shard_indices)
from dataset.make_lists import main as make_lists_main
from dataset.synthetic import write_dataset
from dataset.transforms import TestTransform


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    write_dataset(root, seed=0, num_train=160, num_val=100, size=64)
    list_dir = os.path.join(root, "lists")
    with pytest.warns(UserWarning):  # not the standard 5,953 / 1,449 counts
        make_lists_main(["pascal", "--data-root", root, "--list-dir", list_dir, "--min-class-pixels", "32",
                         "--workers", "1"])
    return root, list_dir


def make_cfg(synthetic, **overrides):
    root, list_dir = synthetic
    cfg = dict(benchmark="pascal", data_root=root, list_dir=list_dir, fold=0, shot=1, filter_novel=True,
               min_class_pixels=32, train_size=40, test_size=48, seed=321, workers=0)
    cfg.update(overrides)
    return defaults(**cfg)


def collect(dataset, num_workers):
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers, shuffle=False)
    return {int(item["episode"]): item for item in loader}


def assert_same_items(a, b):
    assert a.keys() == b.keys()
    for key in a:
        for name in a[key]:
            assert torch.equal(torch.as_tensor(a[key][name]), torch.as_tensor(b[key][name])), (key, name)


def test_test_episodes_identical_for_workers_and_shards(synthetic):
    cfg = make_cfg(synthetic, shot=2)
    dataset = build_test_dataset(cfg, seed=5, num_episodes=10)
    assert len(dataset) == 10 and len(dataset.episodes) == 10
    serial = collect(dataset, 0)
    assert_same_items(serial, collect(dataset, 2))
    shards = [shard_indices(len(dataset), rank, 2) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(10)) and not set(shards[0]) & set(shards[1])
    sharded = {}
    for shard in shards:
        sharded.update(collect(Subset(dataset, shard), 0))
    assert_same_items(serial, sharded)
    # rebuilding from the same seed gives the same list; another seed gives another
    assert build_test_dataset(cfg, seed=5, num_episodes=10).episodes == dataset.episodes
    assert build_test_dataset(cfg, seed=6, num_episodes=10).episodes != dataset.episodes


def test_test_episode_contents(synthetic):
    cfg = make_cfg(synthetic, fold=2)
    dataset = build_test_dataset(cfg, seed=0, num_episodes=70, shot=3)
    lists = dataset.lists
    assert len(lists.images) < 70  # the list runs out and starts again (BAM's test.py)
    assert [ep.query for ep in dataset.episodes] == [lists.images[k % len(lists.images)] for k in range(70)]
    for ep in dataset.episodes:
        assert ep.class_id in novel_classes("pascal", 2)
        assert len(set(ep.supports)) == 3 and ep.query not in ep.supports
        assert all(i in lists.class_images[ep.class_id] for i in ep.supports)
    item = dataset[3]
    ep = dataset.episodes[3]
    image_path, label_path = lists.pairs[ep.query]
    raw = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
    expected = np.where(raw == 255, 255, raw == ep.class_id).astype(np.int64)
    assert np.array_equal(item["query_label"].numpy(), expected)  # original size, binarised
    assert item["query_img"].shape == (3, 48, 48) and item["support_imgs"].shape == (3, 3, 48, 48)
    _, mask = TestTransform(48)(np.zeros(raw.shape + (3,), np.float32), expected.astype(np.uint8))
    assert torch.equal(item["query_mask"], mask)
    assert set(item["support_masks"].unique().tolist()) <= {0, 1, 255}
    assert item["class_id"] == ep.class_id and item["episode"] == 3


def test_test_protocol_is_bams(synthetic):
    """1,000 episodes per seed, queries in list order, the class drawn among the query's novel classes
    with ANY pixel (the >= min_class_pixels rule only picks the queries and supports)."""
    cfg = make_cfg(synthetic, fold=0)
    pairs = []
    for seed in (510, 365, 382, 322, 988):
        dataset = build_test_dataset(cfg, seed=seed, num_episodes=1000)
        images = dataset.lists.images
        assert len(dataset) == 1000
        assert [ep.query for ep in dataset.episodes] == [images[k % len(images)] for k in range(1000)]
        pairs += [(ep.query, ep.class_id) for ep in dataset.episodes]
    pixels = {}
    for query, class_id in set(pairs):
        label = cv2.imread(dataset.lists.pairs[query][1], cv2.IMREAD_UNCHANGED)
        pixels[query, class_id] = int((label == class_id).sum())
        present = {c for c in novel_classes("pascal", 0) if (label == c).any()}
        # every novel class present in the query gets drawn, whatever its size
        assert {c for q, c in set(pairs) if q == query} == present
    assert min(pixels.values()) > 0
    assert min(pixels.values()) < cfg.min_class_pixels  # a class below the threshold was drawn


@pytest.mark.parametrize("filter_novel", [True, False])
def test_train_episodes_use_base_classes_and_never_the_query(synthetic, filter_novel):
    cfg = make_cfg(synthetic, fold=1, shot=2, filter_novel=filter_novel)
    dataset = build_train_dataset(cfg)
    base, novel = set(base_classes("pascal", 1)), set(novel_classes("pascal", 1))
    seen = set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            rng = np.random.default_rng([cfg.seed, epoch, index])
            ep = dataset.episode(index, rng)
            assert ep.class_id in base and ep.query not in ep.supports and len(set(ep.supports)) == 2
            assert all(i in dataset.lists.class_images[ep.class_id] for i in ep.supports)
            seen.add(ep.class_id)
    assert seen == base  # all 15 base classes get drawn, and no novel one
    for i in dataset.lists.images:
        label = cv2.imread(dataset.lists.pairs[i][1], cv2.IMREAD_UNCHANGED)
        has_novel = bool(set(np.unique(label).tolist()) & novel)
        assert not (filter_novel and has_novel)  # † leaves no image with a novel pixel
    if not filter_novel:  # without † images with novel pixels are used; those pixels are background
        with_novel = [i for i in dataset.lists.images
                      if set(np.unique(cv2.imread(dataset.lists.pairs[i][1], 0)).tolist()) & novel]
        assert with_novel


def test_train_items_reproducible_and_independent_of_workers(synthetic):
    dataset = build_train_dataset(make_cfg(synthetic, shot=2))
    dataset.set_epoch(4)
    subset = Subset(dataset, list(range(6)))
    a = list(DataLoader(subset, batch_size=2, num_workers=0))
    b = list(DataLoader(subset, batch_size=2, num_workers=2))
    for x, y in zip(a, b):
        for key in x:
            assert torch.equal(torch.as_tensor(x[key]), torch.as_tensor(y[key]))
    item = dataset[0]
    assert item["query_img"].shape == (3, 40, 40) and item["support_imgs"].shape == (2, 3, 40, 40)
    assert item["query_mask"].dtype == torch.int64 and item["support_masks"].shape == (2, 40, 40)
    assert set(torch.cat([item["query_mask"].flatten(), item["support_masks"].flatten()]).tolist()) <= {0, 1, 255}
    assert (item["support_masks"] == 1).any()
    dataset.set_epoch(5)
    assert not torch.equal(dataset[0]["query_img"], a[0]["query_img"][0])


def test_set_epoch_reaches_persistent_workers(synthetic):
    dataset = build_train_dataset(make_cfg(synthetic))
    loader = DataLoader(Subset(dataset, [0, 1]), batch_size=2, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        (batch,) = list(loader)
        expected = torch.stack([dataset[0]["query_img"], dataset[1]["query_img"]])
        assert torch.equal(batch["query_img"], expected), epoch


def test_base_dataset_is_bams_train_base(synthetic):
    """Stage 1: every image of the list (no † filter, no pixel threshold), novel classes -> background."""
    cfg = make_cfg(synthetic, fold=0)
    val = build_base_dataset(cfg, "val")
    lut = np.zeros(256, np.int64)
    lut[6:21] = np.arange(1, 16)  # fold 0 base classes 6..20 -> 1..15; novel 1..5 -> 0
    lut[255] = 255
    assert val.lists.images == list(range(len(val.lists.pairs))) == list(range(100))
    for index in range(len(val)):
        item = val[index]
        label = cv2.imread(val.lists.pairs[val.lists.images[index]][1], cv2.IMREAD_UNCHANGED)
        _, expected = TestTransform(48)(np.zeros(label.shape + (3,), np.float32), lut[label].astype(np.uint8))
        assert torch.equal(item["label"], expected) and item["img"].shape == (3, 48, 48)
    train = build_base_dataset(cfg, "train")
    assert train.lists.images == list(range(160))  # every training image, † or not
    assert len(build_base_dataset(make_cfg(synthetic, fold=0, filter_novel=False), "train")) == 160
    novel = set(novel_classes("pascal", 0))
    with_novel = [i for i in train.lists.images
                  if novel & set(np.unique(cv2.imread(train.lists.pairs[i][1], cv2.IMREAD_UNCHANGED)).tolist())]
    assert with_novel
    from dataset.episodes import item_rng
    train.set_epoch(3)
    for index in with_novel[:5]:
        image, label = train._load(index)
        expected_label = lut[label].astype(np.uint8)  # the novel pixels at 0
        assert (expected_label[np.isin(label, list(novel))] == 0).all()
        _, expected = train.transform(image, expected_label, item_rng(cfg.seed, 3, index))
        assert torch.equal(train[index]["label"], expected)
    labels = torch.stack([train[i]["label"] for i in range(len(train))])
    assert labels.shape[1:] == (40, 40) and set(labels.unique().tolist()) <= set(range(16)) | {255}


def test_bad_inputs_of_the_datasets(synthetic, tmp_path):
    with pytest.raises(FileNotFoundError, match="data root not found: .*missing_root"):
        build_train_dataset(make_cfg(synthetic, data_root=str(tmp_path / "missing_root")))
    with pytest.raises(FileNotFoundError, match=r"list file not found: .*nolists.*train\.txt.*dataset\.make_lists"):
        build_train_dataset(make_cfg(synthetic, list_dir=str(tmp_path / "nolists")))
    bad_fold = make_cfg(synthetic)
    bad_fold.fold = 4   # past the schema's check: the dataset checks the fold itself
    with pytest.raises(ValueError, match="fold must be an integer in 0..3"):
        build_test_dataset(bad_fold, seed=0, num_episodes=2)
    too_few = r"novel classes of .*val\.txt with too few images \{class: images\}: \{1: \d+, .*50-shot episodes need 51"
    with pytest.raises(ValueError, match=too_few):
        build_test_dataset(make_cfg(synthetic), seed=0, num_episodes=2, shot=50)
    with pytest.raises(ValueError, match="shot must be a positive integer, got 0"):
        build_test_dataset(make_cfg(synthetic), seed=0, num_episodes=2, shot=0)
    with pytest.raises(ValueError, match=r"base classes of .*train\.txt with too few .* 40-shot episodes need 41"):
        build_train_dataset(make_cfg(synthetic, shot=40))
    cfg = make_cfg(synthetic)
    del cfg.shot
    with pytest.raises(AttributeError, match="config has no key 'shot'"):
        build_train_dataset(cfg)


def test_unreadable_image_and_mismatched_mask_name_the_file(synthetic, tmp_path):
    """A file damaged after the lists were made fails in the loader, naming the file; make_lists' own check
    (dataset.lists) refuses the damaged copy when the lists are rebuilt."""
    root, list_dir = synthetic
    copy = tmp_path / "copy"
    (copy / "JPEGImages").mkdir(parents=True)
    (copy / "SegmentationClassAug").mkdir()
    lines, labels = [], []
    for name in sorted(os.listdir(os.path.join(root, "JPEGImages")))[:3]:
        stem = name[:-4]
        shutil.copy(os.path.join(root, "JPEGImages", name), copy / "JPEGImages" / name)
        shutil.copy(os.path.join(root, "SegmentationClassAug", stem + ".png"), copy / "SegmentationClassAug")
        labels.append(copy / "SegmentationClassAug" / (stem + ".png"))
        lines.append(f"JPEGImages/{name} SegmentationClassAug/{stem}.png\n")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("".join(lines))
    from dataset.lists import fold_lists
    from dataset.episodes import BaseClassSegmentation
    lists = fold_lists(str(tmp_path / "lists" / "train.txt"), str(copy), "pascal", 0, "base", min_class_pixels=1)
    lists.images = [0, 1]
    # then one image is damaged and one mask loses a row
    label = cv2.imread(str(labels[1]), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(labels[1]), label[:-1])
    (copy / "JPEGImages" / sorted(os.listdir(copy / "JPEGImages"))[0]).write_bytes(b"not a jpeg at all")
    data = BaseClassSegmentation(lists, TestTransform(32), 20)
    with pytest.raises(ValueError, match=r"cannot decode image file .*JPEGImages/.*\.jpg"):
        data[0]
    with pytest.raises(ValueError, match=r"image .*\.jpg is \d+x\d+ but its label map .*\.png is"):
        data[1]
    with pytest.raises(ValueError, match=r"cannot decode image file .*JPEGImages/.*\.jpg"):
        fold_lists(str(tmp_path / "lists" / "train.txt"), str(copy), "pascal", 0, "base", min_class_pixels=1)
