"""The three dataset builders the engine calls, reading the flat ``cfg`` (see docs/data_and_protocol.md,
"Config keys read by the dataset").

Keys read: benchmark (a family of ``dataset.registry``) and its options (data_root, coco_split, classes_file,
num_folds, novel_classes), list_dir, fold, shot, seed, train_size / test_size, filter_novel (the † filter),
train_classes, min_class_pixels, scale_min / scale_max, rotate_max, test_resize_smaller, workers (also the processes
of the one-off label scan when a list cache is missing), episode_sampler / episode_workers. ``cfg`` is a complete
config (``common.config.load_config`` or ``common.config.defaults(**keys)``): the defaults live in the schema only.
What differs between dataset families (classes, folds, label reading, episodes, transforms) comes from the
family's registry entry, never from a branch on its name here.
"""
import os

from .episodes import (BaseClassSegmentation, TestEpisodes, TrainEpisodes, classes_of_images,
                       make_test_episodes, released_test_episodes)
from .files import read_list
from .lists import FoldLists, class_pixel_counts, fold_lists
from .registry import benchmark_of
from .transforms import TestTransform, TrainTransform


def _list_path(cfg, split):
    return os.path.join(cfg.list_dir, split + ".txt")


def _fold_lists(cfg, split, classes, drop_novel_images, bench=None):
    """(FoldLists, {image: classes of the fold with any pixel in it}) of a split."""
    bench = bench or benchmark_of(cfg)
    lists = fold_lists(_list_path(cfg, split), cfg.data_root, bench, cfg.fold, classes=classes,
                       drop_novel_images=drop_novel_images, min_class_pixels=cfg.min_class_pixels,
                       workers=cfg.workers)
    _, counts = class_pixel_counts(_list_path(cfg, split), cfg.data_root, bench, cfg.workers)
    return lists, classes_of_images(lists, counts)


def _test_transform(cfg, bench=None):
    bench = bench or benchmark_of(cfg)
    if bench.family.test_transform is not None:
        return bench.family.test_transform(cfg)
    return TestTransform(int(cfg.test_size), bool(cfg.test_resize_smaller))


def _train_transform(cfg, bench=None):
    bench = bench or benchmark_of(cfg)
    if bench.family.train_transform is not None:
        return bench.family.train_transform(cfg)
    return TrainTransform(size=int(cfg.train_size), scale_min=float(cfg.scale_min), scale_max=float(cfg.scale_max),
                          rotate_max=float(cfg.rotate_max))


def novel_classes_of(cfg):
    """The classes a config's test and validation episodes use: the fold's novel classes."""
    return benchmark_of(cfg).novel_classes(cfg.fold)


def train_classes_of(cfg):
    """The classes a config's training episodes use: the fold's base classes, or all of them (train_classes)."""
    return benchmark_of(cfg).train_classes(cfg.fold, cfg.train_classes)


def build_train_dataset(cfg):
    """Training episodes of the fold's base classes (train list; † per cfg.filter_novel), or of every class with
    train_classes: all (no novel class, so no † filter)."""
    bench = benchmark_of(cfg)
    if bench.family.train_dataset is not None:
        return bench.family.train_dataset(cfg, bench)
    drop_novel = bool(cfg.filter_novel) and cfg.train_classes == "base"
    lists, image_classes = _fold_lists(cfg, "train", cfg.train_classes, drop_novel, bench)
    return TrainEpisodes(lists, int(cfg.shot), _train_transform(cfg, bench), bench, int(cfg.seed), image_classes,
                         base_labels=cfg.arch == "bam")  # for BAM's logged base-learner loss


def build_test_dataset(cfg, seed, num_episodes, shot=None):
    """``num_episodes`` test episodes of the fold's novel classes (val list), fixed by ``seed`` (and drawn as
    ``cfg.episode_sampler`` says: ours, or the released code's for ``cfg.episode_workers`` workers; a family may
    have its own rule)."""
    bench = benchmark_of(cfg)
    shot = int(cfg.shot if shot is None else shot)
    if bench.family.test_dataset is not None:
        return bench.family.test_dataset(cfg, bench, int(seed), int(num_episodes), shot)
    lists, image_classes = _fold_lists(cfg, "val", "novel", False, bench)
    if bench.family.test_episodes is not None:
        episodes = bench.family.test_episodes(cfg, lists, shot, int(num_episodes), int(seed), image_classes)
    elif cfg.episode_sampler == "released":
        episodes = released_test_episodes(lists, shot, int(num_episodes), int(seed), image_classes,
                                          int(cfg.episode_workers))
    else:
        episodes = make_test_episodes(lists, shot, int(num_episodes), int(seed), image_classes)
    return TestEpisodes(lists, episodes, _test_transform(cfg, bench), bench)


def build_base_dataset(cfg, split):
    """Base-class segmentation for the stage-1 PSPNet, as BAM's train_base: EVERY image of the split's list
    (no † filter, no pixel threshold; classes that do not train -> background): "train" (augmented) or "val"
    (test transform)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    bench = benchmark_of(cfg)
    path = _list_path(cfg, split)
    pairs = read_list(path, cfg.data_root)
    lists = FoldLists(list_file=path, pairs=pairs, images=list(range(len(pairs))), class_images={},
                      classes=bench.train_classes(cfg.fold, cfg.train_classes))
    if split == "train":
        return BaseClassSegmentation(lists, _train_transform(cfg, bench), bench, seed=int(cfg.seed))
    return BaseClassSegmentation(lists, _test_transform(cfg, bench), bench)
