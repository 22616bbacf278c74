"""Image lists and per-fold class lists of PASCAL-5i / COCO-20i, cached as JSON.

The library side of ``python -m dataset.make_lists`` (see that module for the files read and
written). ``fold_lists`` is what the datasets call: it returns the images of a split usable for a
fold and the images of each class, from a cache in ``<list dir>/cache/`` that is rebuilt whenever
its key (list file content, data root, benchmark, COCO split convention, fold, classes, † filter,
min pixels, and the size and modification time in nanoseconds of every listed image and mask) differs
from the request: an edited, relabelled or replaced mask or image rebuilds it.

Building the cache checks every listed pair: the image decodes completely (Pillow, a truncated or
corrupt file is an error), the mask's values are classes of the benchmark (or 255), and the mask has
its image's width and height.

Class presence (PFENet/BAM rule): a class counts in an image only if it covers at least
``min_class_pixels`` pixels (2·32·32 = 2048 in the papers). "†" (``drop_novel_images``): training
drops every image that has any pixel of a novel class; without it, novel pixels become background.
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import warnings
from dataclasses import dataclass

from .files import (atomic_write_json, atomic_write_text, check_image_decodes, label_histogram, read_id_list,
                    read_list)
from .registry import as_benchmark

DEFAULT_MIN_CLASS_PIXELS = 2 * 32 * 32
PASCAL_SBD_LIST = os.path.join("ImageSets", "SBD", "train_noval.txt")
COCO_SPLIT_DIRS = {"train": "train2014", "val": "val2014"}
CACHE_VERSION = 2  # 2: the key covers every image's and mask's size and mtime_ns


# ---------------------------------------------------------------- image lists (train.txt / val.txt)

SBD_LIST_HINT = ("that list names SBD's 5,623 training images that are not in VOC2012 val (train_noval.txt, from "
                 "the SBD page of Bharath Hariharan, home.bharathh.info/pubs/codes/SBD/, the usual companion of "
                 "SegmentationClassAug); pass it with --sbd-list PATH, or pass PFENet's/BAM's "
                 "lists/pascal/voc_sbd_merge_noduplicate.txt (the whole train list) with --sbd-list")


def pascal_image_lists(data_root, sbd_list=None, val_list=None):
    """{"train": [(image_rel, label_rel)], "val": [...]} of PASCAL VOC2012 + SBD (files: see dataset/make_lists.py).
    val keeps the order of its list file (the released code's episodes follow it); train is sorted."""
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"data root not found: {data_root}")
    seg_sets = os.path.join(data_root, "ImageSets", "Segmentation")
    voc_train = read_id_list(os.path.join(seg_sets, "train.txt"), what="VOC train list")
    voc_val = read_id_list(val_list or os.path.join(seg_sets, "val.txt"),
                           what="--val-list file" if val_list else "VOC val list")
    sbd_train = read_id_list(sbd_list or os.path.join(data_root, PASCAL_SBD_LIST), missing_hint=SBD_LIST_HINT,
                             what="--sbd-list file" if sbd_list else "SBD list")
    val_ids = list(dict.fromkeys(voc_val))  # the file's order, each id once
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


def coco_image_lists(data_root, val_list=None):
    """{"train": [...], "val": [...]} of COCO2014 from the label maps written by prepare_coco (sorted by name);
    with ``val_list`` (the released ``lists/coco/fss_list/val.txt``: ``val2014/<name>.jpg
    annotations/val2014/<name>.png`` lines, relative or absolute), val is that file's pairs in its order."""
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"data root not found: {data_root}")
    lists = {}
    if val_list is not None:
        lists["val"] = _listed_pairs(val_list, data_root)
    for split, folder in COCO_SPLIT_DIRS.items():
        if split in lists:
            continue
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
        if not pairs:
            raise ValueError(f"COCO label folder {label_dir} holds no label map (*.png); write them with "
                             f"`python -m dataset.prepare_coco --data-root {data_root}`. Nothing was written")
        lists[split] = pairs
    return {split: lists[split] for split in COCO_SPLIT_DIRS}


def _listed_pairs(list_path, data_root):
    """The (image_rel, label_rel) pairs of a list file, in its order, relative to data_root (absolute paths
    mapped by files.list_entry_path); every pair must exist."""
    root = os.path.abspath(data_root)
    pairs = []
    for image_path, label_path in read_list(list_path, data_root, same_image=True):
        rel = tuple(os.path.relpath(os.path.abspath(p), root) for p in (image_path, label_path))
        _check_pair_exists(data_root, *rel)
        pairs.append(rel)
    return pairs


def _check_pair_exists(data_root, image_rel, label_rel):
    image_path, label_path = os.path.join(data_root, image_rel), os.path.join(data_root, label_rel)
    if not os.path.isfile(image_path):
        raise FileNotFoundError(f"image file not found: {image_path} (its label map is {label_path})")
    if not os.path.isfile(label_path):
        raise FileNotFoundError(f"label map not found: {label_path} for image {image_path}: every "
                                "listed image needs its mask (SegmentationClassAug for PASCAL)")


def write_image_lists(benchmark, data_root, list_dir, sbd_list=None, val_list=None, workers=0, **family_args):
    """Write ``<list_dir>/train.txt`` and ``val.txt`` of a family (a name or a ``Benchmark``) from the pairs its
    ``image_lists`` finds; print counts, warn when not the standard ones. ``sbd_list``, ``val_list`` and
    ``family_args`` (e.g. the folder family's ``val_fraction``) are the make_lists options; one the family does not
    read is an error.

    Every input is checked before anything is written: the id lists (none empty), every listed image and mask
    (they exist, the image decodes, the mask's values and size: the scan of class_pixel_counts, whose cache is
    written with the lists), so a bad input leaves the previous lists and caches as they were."""
    bench = as_benchmark(benchmark, data_root)
    fam = bench.family
    given = {k: v for k, v in dict(family_args, sbd_list=sbd_list, val_list=val_list).items() if v is not None}
    unread = sorted(set(given) - set(fam.make_lists_options))
    if unread:
        flags = ", ".join("--" + k.replace("_", "-") for k in unread)
        raise ValueError(f"{flags}: not an option of {fam.name}'s lists (it reads "
                         f"{', '.join('--' + k.replace('_', '-') for k in fam.make_lists_options) or 'none'})")
    args = argparse.Namespace(**{k: given.get(k) for k in fam.make_lists_options})
    args.options = dict(bench.options)  # e.g. classes_file
    lists = fam.image_lists(data_root, args)
    for split, pairs in lists.items():
        if not pairs:
            raise ValueError(f"no {split} image found for {fam.name} under {data_root}: nothing written to "
                             f"{os.path.join(list_dir, split + '.txt')}")
    texts = {split: "".join(f"{i} {l}\n" for i, l in pairs) for split, pairs in lists.items()}
    scans = {}  # split -> (cache path, key, scan) of the lists whose scan is not cached yet
    for split, pairs in lists.items():
        path = os.path.join(list_dir, split + ".txt")
        under_root = [tuple(os.path.join(data_root, p) for p in pair) for pair in pairs]  # as read_list gives them
        content_sha256 = hashlib.sha256(texts[split].encode()).hexdigest()
        key = _list_key(path, data_root, bench, under_root, sha256=content_sha256)
        cache = _class_pixels_cache(path)
        if _load_cache(cache, key) is None:
            scans[split] = (cache, key, _scan_pairs(under_root, bench, workers))
    for split, pairs in lists.items():
        path = os.path.join(list_dir, split + ".txt")
        atomic_write_text(path, texts[split])
        if split in scans:
            cache, key, value = scans[split]
            atomic_write_json(cache, {"key": key, "value": value})
        expected = (fam.expected_counts or {}).get(split)
        print(f"{path}: {len(pairs)} images" + (f" (standard {fam.name} {split} list: {expected})" if expected else ""))
        if expected is not None and len(pairs) != expected:
            warnings.warn(f"{path} has {len(pairs)} images, not the standard {expected} of {fam.name} "
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
    """Pixel count of every class (1..n) present in one label map: [[class, pixels], ...]. Checks the pair:
    the image decodes completely, the label values are valid, and both have the same size."""
    image_path, label_path, bench = args
    if not os.path.isfile(image_path):
        raise FileNotFoundError(f"image file not found: {image_path} (its label map is {label_path})")
    width, height = check_image_decodes(image_path)
    label = bench.read_label(label_path)  # checks the values
    if label.shape != (height, width):
        raise ValueError(f"label map {label_path} is {label.shape[1]}x{label.shape[0]} but its image {image_path} "
                         f"is {width}x{height}; they must match (a mask of another image, or a resized one?)")
    hist = label_histogram(label)
    return [[c, int(hist[c])] for c in range(1, bench.num_classes + 1) if hist[c]]


def cache_dir(list_path):
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
    return cached["value"] if isinstance(cached, dict) and cached.get("key") == key else None


def _files_stamp(pairs):
    """sha256 of the size and st_mtime_ns of every image and mask of `pairs` (a stat per file, no read): any
    file replaced, edited or relabelled since a cache was built changes it."""
    digest = hashlib.sha256()
    for pair in pairs:
        for path in pair:
            try:
                st = os.stat(path)
                digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{path}\0missing\n".encode())  # the scan names it
    return digest.hexdigest()


def _list_key(list_path, data_root, bench, pairs, sha256=None):
    """What every cache built from a list file depends on (read_list checks the paths first); ``sha256``: that of
    the list's content when it is not written yet (write_image_lists)."""
    return {"version": CACHE_VERSION, "list_file": os.path.abspath(list_path),
            "list_sha256": sha256 or _file_sha256(list_path), "data_root": os.path.abspath(data_root),
            "benchmark": bench.cache_id, "files_size_mtime_sha256": _files_stamp(pairs)}


def _class_pixels_cache(list_path):
    stem = os.path.splitext(os.path.basename(list_path))[0]
    return os.path.join(cache_dir(list_path), f"{stem}_class_pixels.json")


def _scan_pairs(pairs, bench, workers=0):
    """[[class, pixels], ...] of every (image, mask) pair, each pair checked (_count_classes)."""
    jobs = [(image, label, bench) for image, label in pairs]
    if workers and workers > 1:
        with multiprocessing.Pool(workers) as pool:
            return pool.map(_count_classes, jobs, chunksize=64)
    return [_count_classes(job) for job in jobs]


def class_pixel_counts(list_path, data_root, benchmark, workers=0):
    """(pairs, per listed image {class: pixels} of the classes present); cached in ``<list dir>/cache/``.
    ``benchmark``: a ``dataset.registry.Benchmark`` or a family name."""
    bench = as_benchmark(benchmark, data_root)
    pairs = read_list(list_path, data_root)
    key = _list_key(list_path, data_root, bench, pairs)
    path = _class_pixels_cache(list_path)
    value = _load_cache(path, key)
    if value is None:
        value = _scan_pairs(pairs, bench, workers)
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
    """The images and per-class lists of ``fold`` for ``classes`` ("base", "novel" or "all"), cached.
    ``benchmark``: a ``dataset.registry.Benchmark``, or a family name resolved with ``coco_split``.

    An image is kept if at least one of the chosen classes covers ``min_class_pixels`` pixels in it.
    ``drop_novel_images`` (†, only with classes="base") also drops images with any novel pixel.
    """
    if classes not in ("base", "novel", "all"):
        raise ValueError(f"classes must be 'base', 'novel' or 'all', got {classes!r}")
    if drop_novel_images and classes != "base":
        raise ValueError("drop_novel_images (†) only applies to base-class (training) lists")
    bench = as_benchmark(benchmark, data_root, coco_split)
    coco_split = bench.option("coco_split") if bench.name == "coco" else None  # one PASCAL cache serves any value
    chosen = (bench.novel_classes(fold) if classes == "novel" else bench.train_classes(fold, classes))
    pairs = read_list(list_path, data_root)
    key = {**_list_key(list_path, data_root, bench, pairs), "coco_split": coco_split, "fold": fold,
           "classes": classes, "drop_novel_images": bool(drop_novel_images),
           "min_class_pixels": int(min_class_pixels)}
    if bench.name not in ("pascal", "coco"):
        key["folds"] = [list(f) for f in bench.folds]
    stem = os.path.splitext(os.path.basename(list_path))[0]
    name = (f"{stem}_{bench.name}{'_' + coco_split if coco_split else ''}_fold{fold}_{classes}"
            f"{'_dropnovel' if drop_novel_images else ''}_min{int(min_class_pixels)}.json")
    path = os.path.join(cache_dir(list_path), name)
    value = _load_cache(path, key)
    if value is None:
        _, counts = class_pixel_counts(list_path, data_root, bench, workers)
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
