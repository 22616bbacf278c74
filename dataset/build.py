"""The three dataset builders the engine calls, reading the flat ``cfg`` (see docs/data_and_protocol.md,
"Config keys read by the dataset").

Keys read: benchmark, data_root, list_dir, fold, shot, seed, train_size / test_size, and optional
coco_split ("interleaved"), filter_novel (True, the † filter), min_class_pixels (2048),
scale_min / scale_max (0.9-1.1 PASCAL, 0.8-1.25 COCO), rotate_max (10), test_resize_smaller (True),
workers (0: processes for the one-off label scan when a list cache is missing).
"""
import os

from .episodes import (BaseClassSegmentation, TestEpisodes, TrainEpisodes, classes_of_images,
                       make_test_episodes)
from .files import read_list
from .lists import DEFAULT_MIN_CLASS_PIXELS, FoldLists, class_pixel_counts, fold_lists
from .splits import base_classes, num_classes
from .transforms import TestTransform, TrainTransform

_REQUIRED = object()
_SCALE_RANGE = {"pascal": (0.9, 1.1), "coco": (0.8, 1.25)}


def _get(cfg, key, default=_REQUIRED):
    value = cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)
    if value is _REQUIRED:
        raise KeyError(f"config key {key!r} is missing: the dataset needs it (see config/*.yaml)")
    return value


def _list_path(cfg, split):
    return os.path.join(_get(cfg, "list_dir"), split + ".txt")


def _fold_lists(cfg, split, classes, drop_novel_images):
    """(FoldLists, {image: classes of the fold with any pixel in it}) of a split."""
    benchmark = _get(cfg, "benchmark")
    lists = fold_lists(_list_path(cfg, split), _get(cfg, "data_root"), benchmark,
                       _get(cfg, "fold"), classes=classes, drop_novel_images=drop_novel_images,
                       min_class_pixels=_get(cfg, "min_class_pixels", DEFAULT_MIN_CLASS_PIXELS),
                       coco_split=_get(cfg, "coco_split", "interleaved"), workers=_get(cfg, "workers", 0))
    _, counts = class_pixel_counts(_list_path(cfg, split), _get(cfg, "data_root"), benchmark, _get(cfg, "workers", 0))
    return lists, classes_of_images(lists, counts)


def _test_transform(cfg):
    return TestTransform(int(_get(cfg, "test_size")), bool(_get(cfg, "test_resize_smaller", True)))


def _train_transform(cfg):
    default_min, default_max = _SCALE_RANGE[_get(cfg, "benchmark")]
    return TrainTransform(size=int(_get(cfg, "train_size")), scale_min=float(_get(cfg, "scale_min", default_min)),
                          scale_max=float(_get(cfg, "scale_max", default_max)),
                          rotate_max=float(_get(cfg, "rotate_max", 10.0)))


def build_train_dataset(cfg):
    """Training episodes of the fold's base classes (train list; † per cfg.filter_novel)."""
    lists, image_classes = _fold_lists(cfg, "train", "base", bool(_get(cfg, "filter_novel", True)))
    return TrainEpisodes(lists, int(_get(cfg, "shot")), _train_transform(cfg),
                         num_classes(_get(cfg, "benchmark")), int(_get(cfg, "seed")), image_classes)


def build_test_dataset(cfg, seed, num_episodes, shot=None):
    """``num_episodes`` test episodes of the fold's novel classes (val list), fixed by ``seed``."""
    lists, image_classes = _fold_lists(cfg, "val", "novel", False)
    shot = int(_get(cfg, "shot") if shot is None else shot)
    episodes = make_test_episodes(lists, shot, int(num_episodes), int(seed), image_classes)
    return TestEpisodes(lists, episodes, _test_transform(cfg), num_classes(_get(cfg, "benchmark")))


def build_base_dataset(cfg, split):
    """Base-class segmentation for the stage-1 PSPNet, as BAM's train_base: EVERY image of the split's list
    (no † filter, no pixel threshold; novel classes -> background): "train" (augmented) or "val" (test
    transform)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    benchmark = _get(cfg, "benchmark")
    path = _list_path(cfg, split)
    pairs = read_list(path, _get(cfg, "data_root"))
    lists = FoldLists(list_file=path, pairs=pairs, images=list(range(len(pairs))), class_images={},
                      classes=base_classes(benchmark, _get(cfg, "fold"), _get(cfg, "coco_split", "interleaved")))
    if split == "train":
        return BaseClassSegmentation(lists, _train_transform(cfg), num_classes(benchmark), seed=int(_get(cfg, "seed")))
    return BaseClassSegmentation(lists, _test_transform(cfg), num_classes(benchmark))
