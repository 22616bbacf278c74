"""The dataset registry: one entry (a ``Family``) per dataset family, as ``model/finetune.py`` is for methods.

A family says, for every dataset of its kind on disk:
- its classes (names in id order; ids are 1-based, 0 is background, 255 ignore) and its folds (the novel classes
  of each fold; the base classes are the others);
- how ``python -m dataset.make_lists <family>`` finds its (image, mask) pairs and which options it takes;
- how a mask file becomes a label map of class ids (``read_label``);
- its test episodes and its train / test transforms (the defaults are BAM's protocol: ``dataset.episodes``,
  ``dataset.transforms``);
- the standard image counts (a warning when a list differs) and how to get the data (the preflight's hint).

``benchmark_of(cfg)`` resolves the config's ``benchmark`` into a ``Benchmark``: the family plus the classes and
folds of the dataset at ``cfg.data_root``. Everything downstream (lists, caches, episodes, the metric's classes,
BAM's base classes, the figures' class names) asks the ``Benchmark``, never the family's name.

Adding a family is adding an entry to ``_families()`` (and its name to ``common.config.BENCHMARKS``, which imports
nothing of the project; a test checks the two agree).
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import splits
from .files import read_label


@dataclass(frozen=True)
class Family:
    """One dataset family. Callables take the ``Benchmark`` being built or used (``bench``) where they need it.

    ``classes(options)`` -> class names in id order; ``folds(options, names)`` -> the novel class ids of every fold;
    ``image_lists(data_root, args)`` -> {"train": [(image_rel, mask_rel)], "val": [...]} for make_lists (``args``:
    its parsed command line); ``read_label(path, bench)`` -> uint8 label map of class ids (0, 1..n, 255);
    ``make_lists_options``: the make_lists flags the family reads (any other flag given is refused).
    ``test_episodes`` / ``test_transform`` / ``train_transform``: None = the default protocol (dataset.build).
    ``train_dataset(cfg, bench)`` / ``test_dataset(cfg, bench, seed, num_episodes, shot)``: a family whose files are
    no label maps (one binary mask per image, its class told by its folder: FSS-1000, the cross-domain sets of
    dataset/crossdomain.py) builds its datasets itself from the lists; None = the label-map pipeline.
    ``data_named``: the family is whatever ``data_root`` holds (``folder``), so two datasets of it are told apart by
    that folder's name (``common.config.data_name``): ablate's default output folder (summarize's tables go by
    the results' data_root).
    """
    name: str
    summary: str
    classes: Callable
    folds: Callable
    image_lists: Callable
    read_label: Callable
    data_hint: str
    expected_counts: Optional[dict] = None
    make_lists_options: tuple = ()
    test_episodes: Optional[Callable] = None
    test_transform: Optional[Callable] = None
    train_transform: Optional[Callable] = None
    train_dataset: Optional[Callable] = None
    test_dataset: Optional[Callable] = None
    data_named: bool = False

    def __reduce__(self):  # pickled by name (data-loader and list-scan worker processes): its callables may be closures
        return family, (self.name,)


@dataclass(frozen=True)
class Benchmark:
    """A family resolved for one dataset: its class names, its folds (novel ids per fold) and the options that
    resolved it (data_root, coco_split, classes_file, num_folds, novel_classes)."""
    family: Family
    class_names: tuple
    folds: tuple
    options: tuple = field(default=())  # sorted (key, value) pairs: hashable, picklable

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_folds(self) -> int:
        return len(self.folds)

    def option(self, key, default=None):
        return dict(self.options).get(key, default)

    def class_name(self, class_id: int) -> str:
        n = self.num_classes
        if isinstance(class_id, bool) or not isinstance(class_id, int) or not 1 <= class_id <= n:
            raise ValueError(f"class id must be an integer in 1..{n} for {self.name}, got {class_id!r}")
        return self.class_names[class_id - 1]

    def _check_fold(self, fold):
        if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < self.num_folds:
            raise ValueError(f"fold must be an integer in 0..{self.num_folds - 1} for {self.name} "
                             f"({self.num_folds} fold{'s' if self.num_folds > 1 else ''}), got {fold!r}"
                             + (": set num_folds or novel_classes" if self.name == "folder" else ""))

    def novel_classes(self, fold: int) -> list:
        """Sorted ids of the novel (test) classes of ``fold``."""
        self._check_fold(fold)
        return sorted(self.folds[fold])

    def base_classes(self, fold: int) -> list:
        """Sorted ids of the base classes of ``fold``: every class not novel."""
        novel = set(self.novel_classes(fold))
        return [c for c in range(1, self.num_classes + 1) if c not in novel]

    def train_classes(self, fold: int, which: str = "base") -> list:
        """The classes training episodes use: the fold's base classes, or ``all`` of them (a model trained on every
        class: PATNet's "fold 4" for cross-domain testing, or a one-class dataset tuned on its labelled images)."""
        if which == "base":
            return self.base_classes(fold)
        if which == "all":
            self._check_fold(fold)
            return list(range(1, self.num_classes + 1))
        raise ValueError(f"train_classes must be 'base' or 'all', got {which!r}")

    def read_label(self, path):
        """The label map of a mask file (uint8, 0 background, 1..n, 255 ignore), checked."""
        return self.family.read_label(path, self)

    @property
    def cache_id(self) -> str:
        """What identifies the classes in the list caches: the family's name, plus a digest of the class names
        where a dataset chooses them (a renamed or reordered classes file rebuilds the caches)."""
        if self.family.name in ("pascal", "coco"):
            return self.family.name
        digest = hashlib.sha256("\n".join(self.class_names).encode()).hexdigest()[:16]
        return f"{self.family.name}:{digest}"


# ---------------------------------------------------------------- PASCAL-5i and COCO-20i (facts in dataset/splits.py)

def _fixed_classes(name):
    return lambda options: splits.CLASS_NAMES[name]


def _fixed_folds(name):
    def folds(options, names):
        if options.get("novel_classes") or options.get("num_folds") not in (None, splits.NUM_FOLDS):
            raise ValueError(f"{name}'s folds are fixed ({'PASCAL-5i' if name == 'pascal' else 'COCO-20i'}): leave "
                             "num_folds and novel_classes null, or use benchmark: folder to choose the classes")
        coco_split = options.get("coco_split") or "interleaved"
        return tuple(tuple(splits.novel_classes(name, f, coco_split)) for f in range(splits.NUM_FOLDS))
    return folds


def _label_map_reader(path, bench):
    return read_label(path, bench.num_classes)


def _pascal_lists(data_root, args):
    from .lists import pascal_image_lists
    return pascal_image_lists(data_root, args.sbd_list, args.val_list)


def _coco_lists(data_root, args):
    from .lists import coco_image_lists
    return coco_image_lists(data_root, args.val_list)


def _families():
    from . import crossdomain, folder  # families with a module of their own (layouts, class lists, masks)

    return {f.name: f for f in (
        Family("pascal", "PASCAL-5i: VOC2012 JPEGImages + SBD's SegmentationClassAug, 20 classes, 4 folds",
               _fixed_classes("pascal"), _fixed_folds("pascal"), _pascal_lists, _label_map_reader,
               data_hint="put VOC2012 with SBD's SegmentationClassAug there (JPEGImages/, SegmentationClassAug/, "
                         "ImageSets/)",
               expected_counts={"train": 5953, "val": 1449}, make_lists_options=("sbd_list", "val_list")),
        Family("coco", "COCO-20i: COCO2014 label maps written by dataset.prepare_coco, 80 classes, 4 folds",
               _fixed_classes("coco"), _fixed_folds("coco"), _coco_lists, _label_map_reader,
               data_hint="put COCO2014 there (train2014/, val2014/, annotations/instances_*2014.json) and run "
                         "python -m dataset.prepare_coco --data-root DATA_ROOT",
               expected_counts={"train": 82081, "val": 40137}, make_lists_options=("val_list",)),
        folder.FAMILY,
        *crossdomain.registry_entries(),  # fss1000 (HSNet's), deepglobe, isic, lung (PATNet's cross-domain sets)
    )}


@functools.lru_cache(maxsize=None)
def families() -> dict:
    """{name: Family} of every registered family."""
    return _families()


def family(name: str) -> Family:
    table = families()
    if name not in table:
        raise ValueError(f"unknown benchmark {name!r}: expected one of {sorted(table)}")
    return table[name]


OPTION_KEYS = ("data_root", "coco_split", "classes_file", "num_folds", "novel_classes")


def resolve_benchmark(name: str, **options) -> Benchmark:
    """The ``Benchmark`` of family ``name`` for ``options`` (any of OPTION_KEYS; the folder family needs
    data_root)."""
    unknown = set(options) - set(OPTION_KEYS)
    if unknown:
        raise TypeError(f"unknown benchmark option(s) {sorted(unknown)}: expected {OPTION_KEYS}")
    fam = family(name)
    if name == "pascal":
        options["coco_split"] = None  # not a PASCAL fact: one cache serves any value
    names = tuple(fam.classes(options))
    folds = fam.folds(options, names)
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))
    return Benchmark(fam, names, tuple(tuple(f) for f in folds), frozen)


def benchmark_of(cfg) -> Benchmark:
    """The ``Benchmark`` a config names (``benchmark`` and the data keys of OPTION_KEYS)."""
    return resolve_benchmark(cfg.benchmark, **{k: getattr(cfg, k) for k in OPTION_KEYS})


def as_benchmark(benchmark, data_root=None, coco_split="interleaved") -> Benchmark:
    """A ``Benchmark`` as given, or resolved from a family name (PASCAL / COCO need nothing more; the folder
    family reads its classes under ``data_root``)."""
    if isinstance(benchmark, Benchmark):
        return benchmark
    return resolve_benchmark(benchmark, data_root=data_root, coco_split=coco_split)
