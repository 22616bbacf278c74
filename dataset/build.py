"""The three dataset builders the engine calls, reading the flat ``cfg`` (see docs/data_and_protocol.md,
"Config keys read by the dataset").

Keys read: benchmark, data_root, list_dir, fold, shot, seed, train_size / test_size, coco_split, filter_novel
(the † filter), min_class_pixels, scale_min / scale_max, rotate_max, test_resize_smaller, workers (also the
processes of the one-off label scan when a list cache is missing), episode_sampler / episode_workers. ``cfg`` is
a complete config (``common.config.load_config`` or ``common.config.defaults(**keys)``): the defaults live in the
schema only.
"""
import os

from .episodes import (BaseClassSegmentation, TestEpisodes, TrainEpisodes, classes_of_images,
                       make_test_episodes, released_test_episodes)
from .files import read_list
from .lists import FoldLists, class_pixel_counts, fold_lists
from .splits import base_classes, num_classes
from .transforms import TestTransform, TrainTransform

def _list_path(cfg, split):
    return os.path.join(cfg.list_dir, split + ".txt")


def _fold_lists(cfg, split, classes, drop_novel_images):
    """(FoldLists, {image: classes of the fold with any pixel in it}) of a split."""
    benchmark = cfg.benchmark
    lists = fold_lists(_list_path(cfg, split), cfg.data_root, benchmark,
                       cfg.fold, classes=classes, drop_novel_images=drop_novel_images,
                       min_class_pixels=cfg.min_class_pixels,
                       coco_split=cfg.coco_split, workers=cfg.workers)
    _, counts = class_pixel_counts(_list_path(cfg, split), cfg.data_root, benchmark, cfg.workers)
    return lists, classes_of_images(lists, counts)


def _test_transform(cfg):
    return TestTransform(int(cfg.test_size), bool(cfg.test_resize_smaller))


def _train_transform(cfg):
    return TrainTransform(size=int(cfg.train_size), scale_min=float(cfg.scale_min), scale_max=float(cfg.scale_max),
                          rotate_max=float(cfg.rotate_max))


def build_train_dataset(cfg):
    """Training episodes of the fold's base classes (train list; † per cfg.filter_novel)."""
    lists, image_classes = _fold_lists(cfg, "train", "base", bool(cfg.filter_novel))
    return TrainEpisodes(lists, int(cfg.shot), _train_transform(cfg),
                         num_classes(cfg.benchmark), int(cfg.seed), image_classes,
                         base_labels=cfg.arch == "bam")  # for BAM's logged base-learner loss


def build_test_dataset(cfg, seed, num_episodes, shot=None):
    """``num_episodes`` test episodes of the fold's novel classes (val list), fixed by ``seed`` (and drawn as
    ``cfg.episode_sampler`` says: ours, or the released code's for ``cfg.episode_workers`` workers)."""
    lists, image_classes = _fold_lists(cfg, "val", "novel", False)
    shot = int(cfg.shot if shot is None else shot)
    if cfg.episode_sampler == "released":
        episodes = released_test_episodes(lists, shot, int(num_episodes), int(seed), image_classes,
                                          int(cfg.episode_workers))
    else:
        episodes = make_test_episodes(lists, shot, int(num_episodes), int(seed), image_classes)
    return TestEpisodes(lists, episodes, _test_transform(cfg), num_classes(cfg.benchmark))


def build_base_dataset(cfg, split):
    """Base-class segmentation for the stage-1 PSPNet, as BAM's train_base: EVERY image of the split's list
    (no † filter, no pixel threshold; novel classes -> background): "train" (augmented) or "val" (test
    transform)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    benchmark = cfg.benchmark
    path = _list_path(cfg, split)
    pairs = read_list(path, cfg.data_root)
    lists = FoldLists(list_file=path, pairs=pairs, images=list(range(len(pairs))), class_images={},
                      classes=base_classes(benchmark, cfg.fold, cfg.coco_split))
    if split == "train":
        return BaseClassSegmentation(lists, _train_transform(cfg), num_classes(benchmark), seed=int(cfg.seed))
    return BaseClassSegmentation(lists, _test_transform(cfg), num_classes(benchmark))
