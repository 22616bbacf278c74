"""The three dataset builders the engine calls, reading the flat ``cfg`` (see the README's config keys).

Keys read: benchmark, data_root, list_dir, fold, shot, seed, train_size / test_size, and optional
coco_split ("interleaved"), filter_novel (True, the † filter), min_class_pixels (2048),
scale_min / scale_max (0.9-1.1 PASCAL, 0.8-1.25 COCO), rotate_max (10), workers (0: processes
for the one-off label scan when a list cache is missing).
"""
import os

from .episodes import BaseClassSegmentation, TestEpisodes, TrainEpisodes, make_test_episodes
from .lists import DEFAULT_MIN_CLASS_PIXELS, fold_lists
from .splits import num_classes
from .transforms import TestTransform, TrainTransform

_REQUIRED = object()
_SCALE_RANGE = {"pascal": (0.9, 1.1), "coco": (0.8, 1.25)}


def _get(cfg, key, default=_REQUIRED):
    value = cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)
    if value is _REQUIRED:
        raise KeyError(f"config key {key!r} is missing: the dataset needs it (see config/*.yaml)")
    return value


def _fold_lists(cfg, split, classes, drop_novel_images):
    benchmark = _get(cfg, "benchmark")
    return fold_lists(os.path.join(_get(cfg, "list_dir"), split + ".txt"), _get(cfg, "data_root"), benchmark,
                      _get(cfg, "fold"), classes=classes, drop_novel_images=drop_novel_images,
                      min_class_pixels=_get(cfg, "min_class_pixels", DEFAULT_MIN_CLASS_PIXELS),
                      coco_split=_get(cfg, "coco_split", "interleaved"), workers=_get(cfg, "workers", 0))


def _train_transform(cfg):
    default_min, default_max = _SCALE_RANGE[_get(cfg, "benchmark")]
    return TrainTransform(size=int(_get(cfg, "train_size")), scale_min=float(_get(cfg, "scale_min", default_min)),
                          scale_max=float(_get(cfg, "scale_max", default_max)),
                          rotate_max=float(_get(cfg, "rotate_max", 10.0)))


def build_train_dataset(cfg):
    """Training episodes of the fold's base classes (train list; † per cfg.filter_novel)."""
    lists = _fold_lists(cfg, "train", "base", bool(_get(cfg, "filter_novel", True)))
    return TrainEpisodes(lists, int(_get(cfg, "shot")), _train_transform(cfg),
                         num_classes(_get(cfg, "benchmark")), int(_get(cfg, "seed")))


def build_test_dataset(cfg, seed, num_episodes, shot=None):
    """``num_episodes`` test episodes of the fold's novel classes (val list), fixed by ``seed``."""
    lists = _fold_lists(cfg, "val", "novel", False)
    shot = int(_get(cfg, "shot") if shot is None else shot)
    episodes = make_test_episodes(lists, shot, int(num_episodes), int(seed))
    return TestEpisodes(lists, episodes, TestTransform(int(_get(cfg, "test_size"))),
                        num_classes(_get(cfg, "benchmark")))


def build_base_dataset(cfg, split):
    """Base-class segmentation for the stage-1 PSPNet: "train" (augmented, †) or "val" (test transform)."""
    if split == "train":
        lists = _fold_lists(cfg, "train", "base", bool(_get(cfg, "filter_novel", True)))
        return BaseClassSegmentation(lists, _train_transform(cfg), num_classes(_get(cfg, "benchmark")),
                                     seed=int(_get(cfg, "seed")))
    if split == "val":
        lists = _fold_lists(cfg, "val", "base", False)
        return BaseClassSegmentation(lists, TestTransform(int(_get(cfg, "test_size"))),
                                     num_classes(_get(cfg, "benchmark")))
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
