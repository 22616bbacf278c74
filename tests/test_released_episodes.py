"""``episode_sampler: released`` gives exactly the episodes of the released test loop.

The reference here is a re-statement, written from reading the released code (BAM's test.py ``validate`` and
util/dataset.py ``SemData.__getitem__``, the same in the SVF code), run through a REAL torch DataLoader: a
map-style dataset whose ``__getitem__`` draws with the module-level ``random`` (class by ``randint`` over the
novel classes present, supports by rejection on paths and on repeated positions, stacked last-drawn first);
``random.seed(seed); torch.manual_seed(seed)`` as ``setup_seed``; passes over the list (a new iterator each)
until the episodes are done; batch size 1, no shuffling. Our sampler never runs a DataLoader: it computes the
same list up front from the seeding rule of torch's workers.
"""
import math
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from common.config import defaults
from dataset import build_test_dataset
from dataset.build import _fold_lists
from dataset.episodes import make_test_episodes, released_test_episodes
from dataset.lists import FoldLists
from dataset.splits import novel_classes

RELEASED_SEEDS = (510, 365, 382, 322, 988)  # BAM's test.py: np.random.seed(123); np.random.randint(0, 1000, 5)


class ReleasedSemData(Dataset):
    """The draws of the released SemData in 'val' mode, on paths; returns (query, class, supports) as indices."""

    def __init__(self, data_list, sub_class_file_list, label_classes, shot):
        self.data_list, self.sub_class_file_list = data_list, sub_class_file_list
        self.label_classes, self.shot = label_classes, shot  # label_classes: np.unique order, novel ones only
        self.index_of = {pair: i for i, pair in enumerate(data_list)}

    def __len__(self):
        return len(self.data_list)

    def __getitem__(self, index):
        image_path, label_path = self.data_list[index]
        label_class = self.label_classes[index]
        class_chosen = label_class[random.randint(1, len(label_class)) - 1]
        file_class_chosen = self.sub_class_file_list[class_chosen]
        num_file = len(file_class_chosen)
        support_paths, support_idx_list = [], []
        for _ in range(self.shot):
            support_idx = random.randint(1, num_file) - 1
            support_image_path, support_label_path = image_path, label_path
            while ((support_image_path == image_path and support_label_path == label_path)
                   or support_idx in support_idx_list):
                support_idx = random.randint(1, num_file) - 1
                support_image_path, support_label_path = file_class_chosen[support_idx]
            support_idx_list.append(support_idx)
            support_paths.append((support_image_path, support_label_path))
        s_x = torch.tensor([self.index_of[support_paths[0]]])
        for i in range(1, self.shot):  # torch.cat([s_xs[i], s_x]): the last drawn ends up first
            s_x = torch.cat([torch.tensor([self.index_of[support_paths[i]]]), s_x], 0)
        return torch.tensor(index), torch.tensor(class_chosen), s_x


def released_loop(data_list, sub_class_file_list, label_classes, shot, seed, workers, test_num):
    """[(query, class, supports)] in the order BAM's validate() consumes them."""
    data = ReleasedSemData(data_list, sub_class_file_list, label_classes, shot)
    loader = DataLoader(data, batch_size=1, shuffle=False, num_workers=workers, pin_memory=False, sampler=None)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    out, iter_num = [], 0
    for _ in range(math.ceil(test_num / (len(loader) - 1))):
        for query, class_id, supports in loader:
            if iter_num >= test_num:
                break
            iter_num += 1
            out.append((int(query), int(class_id), tuple(int(s) for s in supports[0])))
    return out


def fake_fold(benchmark, num_images, seed, min_pixels=2048):
    """A FoldLists of ``num_images`` fake images (in an unsorted order, as COCO's released val.txt) with random
    novel-class pixel counts, plus its image_classes and the released-style path lists built from it."""
    rng = np.random.default_rng(seed)
    classes = novel_classes(benchmark, 0, "interleaved")
    names = [f"img{int(k):06d}" for k in rng.permutation(10 * num_images)[:num_images]]  # not sorted
    pairs = [(f"/data/JPEGImages/{n}.jpg", f"/data/SegmentationClassAug/{n}.png") for n in names]
    counts = []
    for _ in range(num_images):
        present = rng.choice(classes, size=int(rng.integers(1, 4)), replace=False)
        counts.append({int(c): int(rng.choice([5, 500, 3000, 9000])) for c in present})
    images = [i for i, c in enumerate(counts) if any(p >= min_pixels for p in c.values())]
    class_images = {c: [i for i in images if counts[i].get(c, 0) >= min_pixels] for c in classes}
    lists = FoldLists(list_file="val.txt", pairs=pairs, classes=list(classes), images=images, class_images=class_images)
    image_classes = {i: [c for c in classes if counts[i].get(c, 0) > 0] for i in images}
    # the released fss_list files: data_list (the images kept, list order), sub_class_file_list {class: [pairs]}
    data_list = [pairs[i] for i in images]
    sub_class_file_list = {c: [pairs[i] for i in v] for c, v in class_images.items()}
    label_classes = [sorted(image_classes[i]) for i in images]  # np.unique(label), novel classes only
    return lists, image_classes, (data_list, sub_class_file_list, label_classes)


def as_released(lists, episodes):
    """Our episodes as (position in data_list, class, supports as positions in data_list)."""
    pos = {i: k for k, i in enumerate(lists.images)}
    return [(pos[e.query], e.class_id, tuple(pos[s] for s in e.supports)) for e in episodes]


@pytest.mark.parametrize("bench,num_images", [("pascal", 100), ("coco", 240)])
@pytest.mark.parametrize("shot", [1, 5])
def test_released_sampler_equals_the_released_loader_with_workers(bench, num_images, shot):
    """All five released test seeds through a real 2-worker DataLoader; several passes over the list (a new
    base seed each). 250 episodes per seed keep it fast: nothing changes from one pass to the next."""
    lists, image_classes, released = fake_fold(bench, num_images, seed=shot)
    assert lists.pairs != sorted(lists.pairs)  # the list order is kept, not sorted
    assert len(lists.images) < 250  # more than one pass
    for seed in RELEASED_SEEDS:
        ours = released_test_episodes(lists, shot, 250, seed, image_classes, workers=2)
        assert as_released(lists, ours) == released_loop(*released, shot, seed, workers=2, test_num=250)


def test_released_sampler_default_worker_count_and_main_process():
    """The released configs' 8 workers, and 0 workers (the main process's random, continued across passes)."""
    lists, image_classes, released = fake_fold("coco", 240, seed=5)
    for workers in (8, 0):
        ours = released_test_episodes(lists, 5, 300, 510, image_classes, workers=workers)
        assert as_released(lists, ours) == released_loop(*released, 5, 510, workers=workers, test_num=300)
    eight = released_test_episodes(lists, 1, 400, 510, image_classes, workers=8)
    assert eight != released_test_episodes(lists, 1, 400, 510, image_classes, workers=0)  # as released
    assert eight != make_test_episodes(lists, 1, 400, 510, image_classes)  # ours draws otherwise


def test_episode_sampler_key_reaches_the_test_dataset(tiny_voc):
    """build_test_dataset with episode_sampler=released: the same queries in list order as ours, the released
    draws; validation (seed = cfg.seed) goes through the same builder."""
    data, lists_dir = tiny_voc
    cfg = dict(benchmark="pascal", data_root=data, list_dir=lists_dir, fold=0, min_class_pixels=16, test_size=48,
               workers=0, shot=1)
    ours = build_test_dataset(defaults(**cfg), seed=510, num_episodes=30)
    rel = build_test_dataset(defaults(**cfg, episode_sampler="released", episode_workers=2), seed=510,
                             num_episodes=30)
    assert [e.query for e in rel.episodes] == [e.query for e in ours.episodes]
    lists, image_classes = _fold_lists(defaults(**cfg), "val", "novel", False)
    assert rel.episodes == released_test_episodes(lists, 1, 30, 510, image_classes, workers=2)
    assert rel.episodes != ours.episodes
    assert rel[0]["support_imgs"].shape[0] == 1


def test_bad_episode_workers_is_a_clear_error():
    with pytest.raises(ValueError, match="episode_workers"):
        defaults(episode_workers=-1)
    with pytest.raises(ValueError, match="episode_sampler"):
        defaults(episode_sampler="numpy")
