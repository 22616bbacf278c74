"""Few-shot segmentation data: PASCAL-5i and COCO-20i lists, episodes, transforms, synthetic data.

Entry points: ``build_train_dataset(cfg)``, ``build_test_dataset(cfg, seed, num_episodes, shot=None)``,
``build_base_dataset(cfg, split)``; fold splits in ``dataset.splits``; list building with
``python -m dataset.make_lists``, COCO label maps with ``python -m dataset.prepare_coco``, a
synthetic dataset in the VOC layout with ``python -m dataset.synthetic``.
"""
from .build import build_base_dataset, build_test_dataset, build_train_dataset
from .episodes import Episode, shard_indices
from .splits import base_classes, novel_classes, num_classes

__all__ = ["build_train_dataset", "build_test_dataset", "build_base_dataset", "Episode", "shard_indices",
           "novel_classes", "base_classes", "num_classes"]
