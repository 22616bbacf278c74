"""Few-shot episodes (training and test) and the base-class segmentation dataset of stage 1.

The episode sampler lives here and only here. As in BAM (and PFENet), an image serves as a query or
support of a class only if the class covers ``min_class_pixels`` in it (``lists.class_images``), but
the episode's class is drawn uniformly among the fold's classes with ANY pixel in the query
(``classes_of_images``); K distinct supports of that class are then drawn among its other images.
- training: item ``index`` is the query image ``lists.images[index]``. All randomness (class,
  supports, augmentation) comes from a numpy Generator seeded with (seed, epoch, index): the index
  is global (a DistributedSampler hands each rank different indices), so an item does not depend
  on the rank, the number of data-loader workers, or which worker loads it.
- test (BAM's test.py): episode k has the query ``lists.images[k % N]``, the list in order and
  again from its start when it runs out; class and supports of all episodes are drawn up front
  from one seed, hence the list is identical for any number of workers or ranks;
  ``shard_indices`` splits it across ranks.
- test, ``released_test_episodes``: the episodes the released code (BAM's test.py / SemData, also the SVF
  code's validation) draws, computed up front in pure Python: see that function.
Masks are binarised: the episode's class -> 1, every other class -> 0, 255 stays 255.
The stage-1 dataset (``BaseClassSegmentation``) is BAM's train_base data: every image of the list.
"""
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .files import read_pair
from .splits import IGNORE_LABEL


@dataclass(frozen=True)
class Episode:
    """One episode: indices into the list's (image, label) pairs, and the 1-based class id."""
    query: int
    supports: tuple
    class_id: int


def binarize(label, class_id):
    """class_id -> 1, other classes and background -> 0, 255 stays 255 (uint8 array)."""
    out = (label == class_id).astype(np.uint8)
    out[label == IGNORE_LABEL] = IGNORE_LABEL
    return out


def base_class_lut(classes):
    """uint8 lookup table: ``classes`` -> 1..n in order, every other value -> 0, 255 stays 255."""
    lut = np.zeros(256, dtype=np.uint8)
    for new_id, c in enumerate(classes, 1):
        lut[c] = new_id
    lut[IGNORE_LABEL] = IGNORE_LABEL
    return lut


def item_rng(seed, epoch, index):
    """The Generator of one training item; depends only on (seed, epoch, index)."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def shard_indices(num_items, rank, world_size):
    """Indices of ``rank``'s share of a test set: strided, disjoint, and together all of them."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return list(range(rank, num_items, world_size))


def classes_of_images(lists, pixel_counts):
    """{image index: [classes of ``lists`` with at least one pixel in it]} for the images of a FoldLists;
    ``pixel_counts[i]`` is {class: pixels} of image i (``dataset.lists.class_pixel_counts``)."""
    return {i: [c for c in lists.classes if pixel_counts[i].get(c, 0) > 0] for i in lists.images}


def check_enough_images(lists, shot, role):
    """Every class needs ``shot`` supports besides the query: raise a clear error otherwise."""
    if isinstance(shot, bool) or not isinstance(shot, int) or shot < 1:
        raise ValueError(f"shot must be a positive integer, got {shot!r}")
    if not lists.classes:
        raise ValueError(f"no {role} class in this fold of {lists.list_file}: a dataset whose classes are all novel "
                         "(e.g. one class) trains with train_classes=all (on its own labelled images), or is only "
                         "tested (with a model trained elsewhere: test.py --weights)")
    if not lists.images:
        raise ValueError(f"no image of {lists.list_file} has a {role} class of this fold: check the "
                         "list, the fold and min_class_pixels")
    short = {c: len(lists.class_images[c]) for c in lists.classes if len(lists.class_images[c]) < shot + 1}
    if short:
        raise ValueError(f"{role} classes of {lists.list_file} with too few images {{class: images}}: "
                         f"{short}; {shot}-shot episodes need {shot + 1} "
                         "(query + distinct supports): lower the shot or min_class_pixels, or use "
                         "more data")


def sample_supports(lists, class_id, query, shot, rng):
    """``shot`` distinct images of ``class_id`` other than ``query``."""
    candidates = [i for i in lists.class_images[class_id] if i != query]
    picked = rng.choice(len(candidates), size=shot, replace=False)
    return tuple(candidates[int(k)] for k in picked)


def make_test_episodes(lists, shot, num_episodes, seed, image_classes):
    """The fixed list of ``num_episodes`` test episodes drawn from ``seed``: queries in list order,
    cycling (BAM's test.py); ``image_classes`` as returned by ``classes_of_images``."""
    check_enough_images(lists, shot, "novel")
    rng = np.random.default_rng(int(seed))
    episodes = []
    for k in range(num_episodes):
        query = lists.images[k % len(lists.images)]
        present = image_classes[query]
        class_id = present[int(rng.integers(len(present)))]
        episodes.append(Episode(query, sample_supports(lists, class_id, query, shot, rng), class_id))
    return episodes


def released_draw(lists, query, shot, image_classes, rng):
    """One episode as the released ``SemData.__getitem__`` draws it with Python's ``random.Random`` ``rng``:
    the class uniformly (``randint``) among the fold's classes with any pixel in the query, in ascending
    order (``np.unique``); per shot one draw that is always discarded, then draws until the image differs
    from the query (same image and label path) and from the shots already taken (by position in the class's
    list); the supports stacked last-drawn first."""
    present = sorted(image_classes[query])
    class_id = present[rng.randint(1, len(present)) - 1]
    files = lists.class_images[class_id]
    query_pair = lists.pairs[query]
    picked = []
    for _ in range(shot):
        rng.randint(1, len(files))  # the released loop draws once, then always enters its while loop
        while True:
            k = rng.randint(1, len(files)) - 1
            if lists.pairs[files[k]] != query_pair and k not in picked:
                break
        picked.append(k)
    return Episode(query, tuple(files[k] for k in reversed(picked)), class_id)


def loader_base_seed(generator):
    """The base seed a torch DataLoader iterator draws from ``generator`` when it is created (each worker then
    seeds Python's ``random`` with base seed + worker id)."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


def released_test_episodes(lists, shot, num_episodes, seed, image_classes, workers=8):
    """The ``num_episodes`` episodes of the released test loop for ``seed``, exactly, computed up front.

    What it emulates (BAM's test.py ``validate``, the SVF code's validation with seed = manual_seed):
    ``setup_seed(seed)`` seeds Python's ``random`` and torch's generator; the list is run through
    ``DataLoader(batch_size=1, shuffle=False, num_workers=workers)`` in passes (a new iterator each) until
    ``num_episodes`` are done. With workers > 0 each pass draws a base seed from torch's generator, item i
    of the pass goes to worker i % workers (round robin), and each worker's Python ``random`` starts from
    base seed + worker id; with 0 workers one Python ``random`` seeded with ``seed`` serves every item.
    Each item is drawn by ``released_draw``. The episode list therefore depends on ``workers``."""
    check_enough_images(lists, shot, "novel")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"episode_workers must be a non-negative integer, got {workers!r}")
    n = len(lists.images)
    if n < 2:
        raise ValueError(f"{lists.list_file}: the released test loop needs at least 2 query images, got {n}")
    generator = torch.Generator().manual_seed(int(seed))
    shared = random.Random(int(seed))
    episodes = []
    for _ in range(math.ceil(num_episodes / n)):
        base = loader_base_seed(generator)
        rngs = [random.Random(base + w) for w in range(workers)]
        for i, query in enumerate(lists.images[:num_episodes - len(episodes)]):
            rng = rngs[i % workers] if workers else shared
            episodes.append(released_draw(lists, query, shot, image_classes, rng))
    return episodes


class _ListDataset(Dataset):
    """Shared loading of (image, label) pairs by index, and the epoch of the random transforms. ``labels``: the
    ``dataset.registry.Benchmark`` whose family reads the masks, or a number of classes (label maps 0..n, 255)."""

    def __init__(self, lists, labels):
        self.lists = lists
        self.labels = labels
        # in shared memory, so that set_epoch also reaches persistent data-loader workers
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self):
        return int(self._epoch)

    def set_epoch(self, epoch):
        """Use the random draws of ``epoch`` (call it before every training epoch)."""
        self._epoch.fill_(int(epoch))

    def _load(self, index):
        image_path, label_path = self.lists.pairs[index]
        return read_pair(image_path, label_path, self.labels)


class TrainEpisodes(_ListDataset):
    """Training episodes over the base classes; call ``set_epoch`` every epoch."""

    def __init__(self, lists, shot, transform, labels, seed, image_classes, base_labels=False):
        super().__init__(lists, labels)
        check_enough_images(lists, shot, "base")
        self.shot, self.transform, self.seed = shot, transform, seed
        self.image_classes = image_classes  # as returned by classes_of_images
        # base_labels: items also carry "query_base_label" (BAM's y_b: base classes -> 1..n in lists.classes
        # order, background and other classes -> 0, 255 kept), transformed with the query
        self.base_lut = base_class_lut(lists.classes) if base_labels else None

    def __len__(self):
        return len(self.lists.images)

    def episode(self, index, rng):
        """The (query, supports, class) of item ``index``, drawn from ``rng``."""
        query = self.lists.images[index]
        present = self.image_classes[query]
        class_id = present[int(rng.integers(len(present)))]
        return Episode(query, sample_supports(self.lists, class_id, query, self.shot, rng), class_id)

    def __getitem__(self, index):
        rng = item_rng(self.seed, self.epoch, index)
        ep = self.episode(index, rng)
        images, masks, extra = [], [], {}
        for i in (ep.query,) + ep.supports:
            image, label = self._load(i)
            if i == ep.query and self.base_lut is not None:
                image, mask, extra["query_base_label"] = self.transform(
                    image, binarize(label, ep.class_id), rng, extra=self.base_lut[label])
            else:
                image, mask = self.transform(image, binarize(label, ep.class_id), rng)
            images.append(image)
            masks.append(mask)
        return {"query_img": images[0], "query_mask": masks[0], "support_imgs": torch.stack(images[1:]),
                "support_masks": torch.stack(masks[1:]), "class_id": ep.class_id, **extra}


class TestEpisodes(_ListDataset):
    """A precomputed list of test episodes (``self.episodes``); items carry the original label."""

    def __init__(self, lists, episodes, transform, labels):
        super().__init__(lists, labels)
        self.episodes, self.transform = episodes, transform

    def __len__(self):
        return len(self.episodes)

    def __getitem__(self, index):
        ep = self.episodes[index]
        image, label = self._load(ep.query)
        query_label = binarize(label, ep.class_id)
        query_img, query_mask = self.transform(image, query_label)
        support_imgs, support_masks = [], []
        for i in ep.supports:
            image, label = self._load(i)
            image, mask = self.transform(image, binarize(label, ep.class_id))
            support_imgs.append(image)
            support_masks.append(mask)
        return {"query_img": query_img, "query_mask": query_mask, "support_imgs": torch.stack(support_imgs),
                "support_masks": torch.stack(support_masks), "class_id": ep.class_id,
                "query_label": torch.from_numpy(query_label).long(), "episode": index}


class BaseClassSegmentation(_ListDataset):
    """``lists.images`` for the stage-1 PSPNet: base classes -> 1..n_base, novel classes and background -> 0.

    ``seed`` given: training (random transform from (seed, epoch, index), call set_epoch);
    None: validation (deterministic test transform).
    """

    def __init__(self, lists, transform, labels, seed=None):
        super().__init__(lists, labels)
        self.transform, self.seed = transform, seed
        self.lut = base_class_lut(lists.classes)

    def __len__(self):
        return len(self.lists.images)

    def __getitem__(self, index):
        image, label = self._load(self.lists.images[index])
        label = self.lut[label]
        if self.seed is None:
            img, label = self.transform(image, label)
        else:
            img, label = self.transform(image, label, item_rng(self.seed, self.epoch, index))
        return {"img": img, "label": label}
