"""Build the image lists and the per-fold class lists of PASCAL-5i / COCO-20i, with JSON caches.

Command line::

    python -m dataset.make_lists pascal --data-root PATH [--list-dir lists/pascal]
    python -m dataset.make_lists coco   --data-root PATH [--list-dir lists/coco]
        [--min-class-pixels 2048] [--coco-split interleaved|consecutive] [--workers N]

What it reads (all paths under --data-root):
- pascal: ``ImageSets/Segmentation/train.txt`` and ``val.txt`` (VOC2012), the SBD list
  ``ImageSets/SBD/train_noval.txt`` (SBD's 5,623 training images that are not in VOC2012 val;
  another place with --sbd-list), and for every id ``JPEGImages/<id>.jpg`` and
  ``SegmentationClassAug/<id>.png``. train = (VOC train ∪ SBD train_noval) − VOC val, de-duplicated
  (5,953 images); val = VOC val (1,449).
- coco: the label maps ``annotations/train2014/*.png`` / ``annotations/val2014/*.png`` written by
  ``python -m dataset.prepare_coco`` and their images ``train2014/<name>.jpg`` / ``val2014/<name>.jpg``
  (82,081 / 40,137 images that have at least one annotation).

What it writes: ``<list-dir>/train.txt`` and ``val.txt`` (lines ``image_path label_path`` relative
to the data root), and in ``<list-dir>/cache/`` the class pixel counts of every listed image and,
for every fold, the images and per-class image lists (train with and without the † filter, val).
The datasets read these caches through ``fold_lists`` and rebuild any whose key (list file
content, data root, fold, split convention, filter, min pixels) differs from the request.

Class presence (PFENet/BAM rule): a class counts in an image only if it covers at least
``min_class_pixels`` pixels (2·32·32 = 2048 in the papers). "†" (``drop_novel_images``): training
drops every image that has any pixel of a novel class; without it, novel pixels become background.
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import warnings
from dataclasses import dataclass

from .files import (atomic_write_json, atomic_write_text, label_histogram, read_id_list, read_label,
                    read_list)
from .splits import BENCHMARKS, COCO_SPLITS, NUM_FOLDS, base_classes, novel_classes, num_classes

DEFAULT_MIN_CLASS_PIXELS = 2 * 32 * 32
EXPECTED_COUNTS = {"pascal": {"train": 5953, "val": 1449}, "coco": {"train": 82081, "val": 40137}}
PASCAL_SBD_LIST = os.path.join("ImageSets", "SBD", "train_noval.txt")
COCO_SPLIT_DIRS = {"train": "train2014", "val": "val2014"}
CACHE_VERSION = 1


# ---------------------------------------------------------------- image lists (train.txt / val.txt)

def pascal_image_lists(data_root, sbd_list=None):
    """{"train": [(image_rel, label_rel)], "val": [...]} of PASCAL VOC2012 + SBD (see module doc)."""
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"data root not found: {data_root}")
    seg_sets = os.path.join(data_root, "ImageSets", "Segmentation")
    voc_train = read_id_list(os.path.join(seg_sets, "train.txt"))
    voc_val = read_id_list(os.path.join(seg_sets, "val.txt"))
    sbd_train = read_id_list(sbd_list or os.path.join(data_root, PASCAL_SBD_LIST))
    val_ids = sorted(set(voc_val))
    # Removing val ids again guards against an SBD list that overlaps VOC val (SBD's own train.txt).
    train_ids = sorted((set(voc_train) | set(sbd_train)) - set(val_ids))
    lists = {}
    for split, ids in (("train", train_ids), ("val", val_ids)):
        pairs = []
        for image_id in ids:
            image_rel = os.path.join("JPEGImages", image_id + ".jpg")
            label_rel = os.path.join("SegmentationClassAug", image_id + ".png")
            _check_pair_exists(data_root, image_rel, label_rel)
            pairs.append((image_rel, label_rel))
        lists[split] = pairs
    return lists


def coco_image_lists(data_root):
    """{"train": [...], "val": [...]} of COCO2014 from the label maps written by prepare_coco."""
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"data root not found: {data_root}")
    lists = {}
    for split, folder in COCO_SPLIT_DIRS.items():
        label_dir = os.path.join(data_root, "annotations", folder)
        if not os.path.isdir(label_dir):
            raise FileNotFoundError(f"COCO label folder not found: {label_dir}; write it with "
                                    f"`python -m dataset.prepare_coco --data-root {data_root}`")
        pairs = []
        for name in sorted(os.listdir(label_dir)):
            if not name.endswith(".png"):
                continue
            image_rel = os.path.join(folder, name[:-4] + ".jpg")
            label_rel = os.path.join("annotations", folder, name)
            _check_pair_exists(data_root, image_rel, label_rel)
            pairs.append((image_rel, label_rel))
        lists[split] = pairs
    return lists


def _check_pair_exists(data_root, image_rel, label_rel):
    image_path, label_path = os.path.join(data_root, image_rel), os.path.join(data_root, label_rel)
    if not os.path.isfile(image_path):
        raise FileNotFoundError(f"image file not found: {image_path} (its label map is {label_path})")
    if not os.path.isfile(label_path):
        raise FileNotFoundError(f"label map not found: {label_path} for image {image_path}: every "
                                "listed image needs its mask (SegmentationClassAug for PASCAL)")


def write_image_lists(benchmark, data_root, list_dir, sbd_list=None):
    """Write ``<list_dir>/train.txt`` and ``val.txt``; print counts, warn when not the standard ones."""
    if benchmark == "pascal":
        lists = pascal_image_lists(data_root, sbd_list)
    elif benchmark == "coco":
        lists = coco_image_lists(data_root)
    else:
        raise ValueError(f"unknown benchmark {benchmark!r}: expected one of {BENCHMARKS}")
    for split, pairs in lists.items():
        path = os.path.join(list_dir, split + ".txt")
        atomic_write_text(path, "".join(f"{i} {l}\n" for i, l in pairs))
        expected = EXPECTED_COUNTS[benchmark][split]
        print(f"{path}: {len(pairs)} images (standard {benchmark} {split} list: {expected})")
        if len(pairs) != expected:
            warnings.warn(f"{path} has {len(pairs)} images, not the standard {expected} of {benchmark} "
                          f"{split}: results will not be comparable with published numbers", stacklevel=2)
    return lists


# ---------------------------------------------------------------- class pixel counts (cached scan)

def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _count_classes(args):
    """Pixel count of every class (1..n) present in one label map: [[class, pixels], ...]."""
    image_path, label_path, n_classes = args
    if not os.path.isfile(image_path):
        raise FileNotFoundError(f"image file not found: {image_path} (its label map is {label_path})")
    hist = label_histogram(read_label(label_path, n_classes))  # read_label checks the values
    return [[c, int(hist[c])] for c in range(1, n_classes + 1) if hist[c]]


def _cache_dir(list_path):
    return os.path.join(os.path.dirname(os.path.abspath(list_path)), "cache")


def _load_cache(path, key):
    """The cached value if ``path`` holds a cache written for exactly ``key``, else None."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            cached = json.load(f)
    except (OSError, ValueError):
        return None  # a cache is only a cache: an unreadable one is rebuilt
    return cached["value"] if cached.get("key") == key else None


def class_pixel_counts(list_path, data_root, benchmark, workers=0):
    """Per listed image, {class: pixels} of the classes present; cached in ``<list dir>/cache/``."""
    pairs = read_list(list_path, data_root)
    key = {"version": CACHE_VERSION, "list_file": os.path.abspath(list_path),
           "list_sha256": _file_sha256(list_path), "data_root": os.path.abspath(data_root),
           "benchmark": benchmark}
    stem = os.path.splitext(os.path.basename(list_path))[0]
    path = os.path.join(_cache_dir(list_path), f"{stem}_class_pixels.json")
    value = _load_cache(path, key)
    if value is None:
        n = num_classes(benchmark)
        jobs = [(image, label, n) for image, label in pairs]
        if workers and workers > 1:
            with multiprocessing.Pool(workers) as pool:
                value = pool.map(_count_classes, jobs, chunksize=64)
        else:
            value = [_count_classes(job) for job in jobs]
        atomic_write_json(path, {"key": key, "value": value})
    return pairs, [{int(c): int(p) for c, p in counts} for counts in value]


# ---------------------------------------------------------------- per-fold lists

@dataclass
class FoldLists:
    """Images of one split usable for one fold, and the images of each class.

    ``pairs``: every (image_path, label_path) of the list file; ``images``: indices into pairs of
    the images kept; ``class_images``: {class id: [indices]} of the images where the class counts.
    """
    list_file: str
    pairs: list
    classes: list
    images: list
    class_images: dict


def fold_lists(list_path, data_root, benchmark, fold, classes="base", drop_novel_images=False,
               min_class_pixels=DEFAULT_MIN_CLASS_PIXELS, coco_split="interleaved", workers=0):
    """The images and per-class lists of ``fold`` for ``classes`` ("base" or "novel"), cached.

    An image is kept if at least one of the chosen classes covers ``min_class_pixels`` pixels in it.
    ``drop_novel_images`` (†, only with classes="base") also drops images with any novel pixel.
    """
    if classes not in ("base", "novel"):
        raise ValueError(f"classes must be 'base' or 'novel', got {classes!r}")
    if drop_novel_images and classes != "base":
        raise ValueError("drop_novel_images (†) only applies to base-class (training) lists")
    if benchmark == "pascal":
        coco_split = None  # not part of PASCAL's key: one cache serves any value
    chosen = (base_classes if classes == "base" else novel_classes)(benchmark, fold, coco_split or "interleaved")
    pairs, counts = class_pixel_counts(list_path, data_root, benchmark, workers)
    key = {"version": CACHE_VERSION, "list_file": os.path.abspath(list_path),
           "list_sha256": _file_sha256(list_path), "data_root": os.path.abspath(data_root),
           "benchmark": benchmark, "coco_split": coco_split, "fold": fold, "classes": classes,
           "drop_novel_images": bool(drop_novel_images), "min_class_pixels": int(min_class_pixels)}
    stem = os.path.splitext(os.path.basename(list_path))[0]
    name = (f"{stem}_{benchmark}{'_' + coco_split if coco_split else ''}_fold{fold}_{classes}"
            f"{'_dropnovel' if drop_novel_images else ''}_min{int(min_class_pixels)}.json")
    path = os.path.join(_cache_dir(list_path), name)
    value = _load_cache(path, key)
    if value is None:
        chosen_set = set(chosen)
        images, class_images = [], {c: [] for c in chosen}
        for index, image_counts in enumerate(counts):
            if drop_novel_images and not set(image_counts) <= chosen_set:
                continue
            present = [c for c in chosen if image_counts.get(c, 0) >= min_class_pixels]
            if present:
                images.append(index)
                for c in present:
                    class_images[c].append(index)
        value = {"images": images, "class_images": {str(c): v for c, v in class_images.items()}}
        atomic_write_json(path, {"key": key, "value": value})
    return FoldLists(list_file=list_path, pairs=pairs, classes=list(chosen), images=value["images"],
                     class_images={int(c): v for c, v in value["class_images"].items()})


# ---------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dataset.make_lists", description=__doc__.split("\n")[0])
    parser.add_argument("benchmark", choices=BENCHMARKS)
    parser.add_argument("--data-root", required=True, help="VOC2012 folder (pascal) or COCO folder (coco)")
    parser.add_argument("--list-dir", default=None, help="output folder (default lists/<benchmark>)")
    parser.add_argument("--sbd-list", default=None, help=f"SBD list for pascal (default <data-root>/{PASCAL_SBD_LIST})")
    parser.add_argument("--min-class-pixels", type=int, default=DEFAULT_MIN_CLASS_PIXELS,
                        help="pixels a class needs to count in an image (2048 in the papers)")
    parser.add_argument("--coco-split", choices=COCO_SPLITS, default="interleaved")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that read the label maps")
    args = parser.parse_args(argv)
    list_dir = args.list_dir or os.path.join("lists", args.benchmark)
    write_image_lists(args.benchmark, args.data_root, list_dir, args.sbd_list)
    train_list, val_list = os.path.join(list_dir, "train.txt"), os.path.join(list_dir, "val.txt")
    common = dict(data_root=args.data_root, benchmark=args.benchmark, min_class_pixels=args.min_class_pixels,
                  coco_split=args.coco_split, workers=args.workers)
    print(f"min_class_pixels={args.min_class_pixels}"
          + (f", coco_split={args.coco_split}" if args.benchmark == "coco" else ""))
    print("fold | train images (†) | train images (no †) | val images | fewest images of one class: "
          "train † / val")
    for fold in range(NUM_FOLDS):
        train_dropped = fold_lists(train_list, fold=fold, classes="base", drop_novel_images=True, **common)
        train_all = fold_lists(train_list, fold=fold, classes="base", drop_novel_images=False, **common)
        val = fold_lists(val_list, fold=fold, classes="novel", **common)
        fewest_train = min(len(v) for v in train_dropped.class_images.values())
        fewest_val = min(len(v) for v in val.class_images.values())
        print(f"{fold:4d} | {len(train_dropped.images):16d} | {len(train_all.images):19d} | "
              f"{len(val.images):10d} | {fewest_train} / {fewest_val}")
    print(f"caches in {_cache_dir(train_list)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
