"""Build the image lists and the per-fold class lists of a benchmark (any family of dataset/registry.py), with
JSON caches.

Command line::

    python -m dataset.make_lists pascal --data-root PATH [--list-dir lists/pascal]
    python -m dataset.make_lists coco   --data-root PATH [--list-dir lists/coco]
        [--min-class-pixels 2048] [--coco-split interleaved|consecutive] [--workers N]
    python -m dataset.make_lists folder --data-root PATH [--list-dir PATH/lists]
        [--val-fraction F | --train-ids FILE --val-ids FILE]
        [--classes-file FILE] [--num-folds K | --novel-classes NAME,NAME] [--min-class-pixels N]
    python -m dataset.make_lists fss1000 --data-root PATH --classes-file HSNET/data/splits/fss [--list-dir ...]
    python -m dataset.make_lists deepglobe|isic|lung --data-root PATH [--classes-file class_id.csv (isic, flat)]

fss1000, deepglobe, isic, lung (dataset/crossdomain.py): --data-root is the folder that holds FSS-1000/ (or
Deepglobe/, ISIC/, LungSegmentation/: the anchors' --datapath) or that folder itself; the lists are ``image mask``
lines in the order HSNet's / PATNet's loaders list the files (classes sorted, ``sorted(glob)`` per class). fss1000:
train = the images of HSNet's trn classes, val = those of its test classes (its class lists are the user's: pass
the folder of HSNet's data/splits/fss); the cross-domain three are test sets: both lists hold every image.

What it reads (all paths under --data-root):
- pascal: ``ImageSets/Segmentation/train.txt`` and ``val.txt`` (VOC2012), the SBD list
  ``ImageSets/SBD/train_noval.txt`` (SBD's 5,623 training images that are not in VOC2012 val;
  another place with --sbd-list; PFENet's/BAM's ``voc_sbd_merge_noduplicate.txt`` is accepted there too,
  and their ``val.txt`` or the SVF code's ``fss_list/val/data_list_N.txt`` with --val-list: lines
  ``JPEGImages/<id>.jpg SegmentationClassAug/<id>.png``, or absolute paths of another machine),
  and for every id ``JPEGImages/<id>.jpg`` and
  ``SegmentationClassAug/<id>.png``. train = (VOC train ∪ SBD train_noval) − VOC val, de-duplicated
  (5,953 images, sorted); val = VOC val (1,449), in the val list's order.
- folder: ``images/`` and ``masks/`` (label maps with ``classes.txt``, or one binary-mask folder per class): see
  dataset/folder.py and docs/own_data.md. Every image and mask is paired by name; an image without its label map, a
  mask without its image, two files of one name are errors naming the file.
- coco: the label maps ``annotations/train2014/*.png`` / ``annotations/val2014/*.png`` written by
  ``python -m dataset.prepare_coco`` and their images ``train2014/<name>.jpg`` / ``val2014/<name>.jpg``
  (82,081 / 40,137 images that have at least one annotation), sorted by name; --val-list takes the released
  ``lists/coco/fss_list/val.txt`` instead (``val2014/<name>.jpg annotations/val2014/<name>.png`` lines, relative
  or absolute), whose order (not sorted) is kept, so the released code's queries come in the same order.

Absolute paths in a list (the released ``fss_list`` files hold the authors' paths) are mapped under --data-root
from their last ``JPEGImages/``, ``SegmentationClassAug/``, ``train2014/`` or ``val2014/`` folder (``annotations/``
kept before the last two); a path with none of them is an error naming the file and line. The same mapping
applies when a list written elsewhere is used directly as ``<list_dir>/val.txt``. A ``--val-list`` (or
``--sbd-list``) line whose mask names another image than its image (``a.jpg b.png``) is an error naming the file
and line, never re-mapped to the image's own mask; an input list without any image is an error naming it.

Nothing is written until every input has passed: the lists' files exist, every image decodes and every mask has
valid values and its image's size (the class scan below runs on the new lists before they replace the old ones),
so a bad input leaves the previous ``train.txt`` / ``val.txt`` and caches as they were.

What it writes: ``<list-dir>/train.txt`` and ``val.txt`` (lines ``image_path label_path`` relative
to the data root), and in ``<list-dir>/cache/`` the class pixel counts of every listed image and,
for every fold, the images and per-class image lists (train with and without the † filter, val).
The datasets read these caches through ``dataset.lists.fold_lists`` and rebuild any whose key (list file
content, data root, fold, split convention, filter, min pixels) differs from the request.

Class presence and the † filter: see dataset/lists.py.
"""

import argparse
import os
import sys

from .lists import DEFAULT_MIN_CLASS_PIXELS, PASCAL_SBD_LIST, cache_dir, fold_lists, write_image_lists
from .registry import families, resolve_benchmark
from .splits import COCO_SPLITS


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dataset.make_lists", description=__doc__.split("\n")[0])
    parser.add_argument("benchmark", choices=sorted(families()))
    parser.add_argument("--data-root", required=True, help="VOC2012 folder (pascal), COCO folder (coco), or the "
                        "folder of images/ and masks/ (folder)")
    parser.add_argument("--list-dir", default=None,
                        help="output folder (default lists/<benchmark>; folder: <data-root>/lists)")
    parser.add_argument("--sbd-list", default=None, help=f"SBD list for pascal (default <data-root>/{PASCAL_SBD_LIST})")
    parser.add_argument("--val-list", default=None,
                        help="val list, order kept: pascal's ids or 'image label' lines (default <data-root>/"
                             "ImageSets/Segmentation/val.txt); coco's 'image label' lines (the released "
                             "lists/coco/fss_list/val.txt; default: every annotations/val2014 label map, sorted)")
    parser.add_argument("--min-class-pixels", type=int, default=DEFAULT_MIN_CLASS_PIXELS,
                        help="pixels a class needs to count in an image (2048 in the papers)")
    parser.add_argument("--coco-split", choices=COCO_SPLITS, default="interleaved")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="folder: this fraction of the images in val only (by a hash of the name); default: "
                             "every image in both lists")
    parser.add_argument("--train-ids", default=None, help="folder: file of the training images' names")
    parser.add_argument("--val-ids", default=None, help="folder: file of the val images' names")
    parser.add_argument("--classes-file", default=None, help="folder: class names (default <data-root>/classes.txt); "
                        "fss1000: the folder of HSNet's trn.txt/val.txt/test.txt; isic: class_id.csv for the flat "
                        "image folder")
    parser.add_argument("--num-folds", type=int, default=None, help="folder: k folds (default min(4, classes))")
    parser.add_argument("--novel-classes", default=None,
                        help="folder: the novel classes of its one fold, comma-separated names")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that read the label maps")
    args = parser.parse_args(argv)
    novel = [c.strip() for c in args.novel_classes.split(",")] if args.novel_classes else None
    bench = resolve_benchmark(args.benchmark, data_root=args.data_root, coco_split=args.coco_split,
                              classes_file=args.classes_file, num_folds=args.num_folds, novel_classes=novel)
    default_dir = os.path.join(args.data_root, "lists") if args.benchmark == "folder" else \
        os.path.join("lists", args.benchmark)
    list_dir = args.list_dir or default_dir
    write_image_lists(bench, args.data_root, list_dir, args.sbd_list, args.val_list, args.workers,
                      val_fraction=args.val_fraction, train_ids=args.train_ids, val_ids=args.val_ids)
    train_list, val_list = os.path.join(list_dir, "train.txt"), os.path.join(list_dir, "val.txt")
    if bench.family.test_dataset is not None:  # binary masks, a class per folder (dataset/crossdomain.py)
        return summarize_class_lists(bench, args.data_root, train_list, val_list)
    common = dict(data_root=args.data_root, benchmark=bench, min_class_pixels=args.min_class_pixels,
                  workers=args.workers)
    print(f"{bench.name}: {bench.num_classes} classes, {bench.num_folds} fold(s); min_class_pixels="
          f"{args.min_class_pixels}" + (f", coco_split={args.coco_split}" if args.benchmark == "coco" else ""))
    print("fold | novel classes | train images (†) | train images (no †) | val images | fewest images of one "
          "class: train † / val")
    for fold in range(bench.num_folds):
        has_base = bool(bench.base_classes(fold))
        train_dropped = fold_lists(train_list, fold=fold, classes="base", drop_novel_images=True, **common) \
            if has_base else None
        train_all = fold_lists(train_list, fold=fold, classes="base" if has_base else "all", **common)
        val = fold_lists(val_list, fold=fold, classes="novel", **common)
        fewest = lambda lists: min((len(v) for v in lists.class_images.values()), default=0)  # noqa: E731
        novel_names = ", ".join(bench.class_name(c) for c in bench.novel_classes(fold))
        if len(novel_names) > 40:
            novel_names = novel_names[:37] + "..."
        dropped = f"{len(train_dropped.images):16d}" if train_dropped else f"{'(no base class)':>16}"
        print(f"{fold:4d} | {novel_names} | {dropped} | {len(train_all.images):19d} | {len(val.images):10d} | "
              f"{fewest(train_dropped) if train_dropped else '-'} / {fewest(val)}")
        if fewest(val) < 2:
            print(f"     warning: a novel class of fold {fold} has fewer than 2 val images: no 1-shot episode of it "
                  "(a query needs another image of its class as support)")
    print(f"caches in {cache_dir(train_list)}")
    return 0


def summarize_class_lists(bench, data_root, train_list, val_list):
    """The classes and images of each list of a family with binary masks (fss1000, deepglobe, isic, lung)."""
    from .crossdomain import lists_files
    from .files import read_list

    for split, path, classes in (("train", train_list, bench.train_classes(0, "base") or bench.novel_classes(0)),
                                 ("val", val_list, bench.novel_classes(0))):
        files, ids, _ = lists_files(bench, read_list(path, data_root), classes)
        sizes = [len(v) for v in files.class_images.values()]
        print(f"{split}: {len(ids)} classes, {len(files.pairs)} images (fewest in a class: {min(sizes, default=0)})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as exc:  # a bad mask or a missing file: one line, not a traceback
        sys.exit(f"error: {exc}")
