"""Few-shot segmentation data: the dataset registry (PASCAL-5i, COCO-20i, any folder of images and masks), lists,
episodes, transforms, synthetic data.

Entry points: ``build_train_dataset(cfg)``, ``build_test_dataset(cfg, seed, num_episodes, shot=None)``,
``build_base_dataset(cfg, split)``; a config's classes with ``benchmark_of(cfg)``, ``novel_classes_of(cfg)``,
``train_classes_of(cfg)``; dataset families in ``dataset.registry``; PASCAL/COCO fold splits in ``dataset.splits``;
list building with ``python -m dataset.make_lists``, COCO label maps with ``python -m dataset.prepare_coco``, a
synthetic dataset in the VOC layout with ``python -m dataset.synthetic``.
"""
from .build import (build_base_dataset, build_test_dataset, build_train_dataset, novel_classes_of,
                    train_classes_of)
from .episodes import Episode, shard_indices
from .registry import Benchmark, benchmark_of, families, resolve_benchmark
from .splits import base_classes, novel_classes, num_classes

__all__ = ["build_train_dataset", "build_test_dataset", "build_base_dataset", "Episode", "shard_indices",
           "novel_classes", "base_classes", "num_classes", "novel_classes_of", "train_classes_of", "Benchmark",
           "benchmark_of", "families", "resolve_benchmark"]
