"""Build the image lists and the per-fold class lists of PASCAL-5i / COCO-20i, with JSON caches.

Command line::

    python -m dataset.make_lists pascal --data-root PATH [--list-dir lists/pascal]
    python -m dataset.make_lists coco   --data-root PATH [--list-dir lists/coco]
        [--min-class-pixels 2048] [--coco-split interleaved|consecutive] [--workers N]

What it reads (all paths under --data-root):
- pascal: ``ImageSets/Segmentation/train.txt`` and ``val.txt`` (VOC2012), the SBD list
  ``ImageSets/SBD/train_noval.txt`` (SBD's 5,623 training images that are not in VOC2012 val;
  another place with --sbd-list; PFENet's/BAM's ``voc_sbd_merge_noduplicate.txt`` is accepted there too,
  and their ``val.txt`` or the SVF code's ``fss_list/val/data_list_N.txt`` with --val-list: lines
  ``JPEGImages/<id>.jpg SegmentationClassAug/<id>.png``, or absolute paths of another machine),
  and for every id ``JPEGImages/<id>.jpg`` and
  ``SegmentationClassAug/<id>.png``. train = (VOC train ∪ SBD train_noval) − VOC val, de-duplicated
  (5,953 images, sorted); val = VOC val (1,449), in the val list's order.
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
from .splits import BENCHMARKS, COCO_SPLITS, NUM_FOLDS


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dataset.make_lists", description=__doc__.split("\n")[0])
    parser.add_argument("benchmark", choices=BENCHMARKS)
    parser.add_argument("--data-root", required=True, help="VOC2012 folder (pascal) or COCO folder (coco)")
    parser.add_argument("--list-dir", default=None, help="output folder (default lists/<benchmark>)")
    parser.add_argument("--sbd-list", default=None, help=f"SBD list for pascal (default <data-root>/{PASCAL_SBD_LIST})")
    parser.add_argument("--val-list", default=None,
                        help="val list, order kept: pascal's ids or 'image label' lines (default <data-root>/"
                             "ImageSets/Segmentation/val.txt); coco's 'image label' lines (the released "
                             "lists/coco/fss_list/val.txt; default: every annotations/val2014 label map, sorted)")
    parser.add_argument("--min-class-pixels", type=int, default=DEFAULT_MIN_CLASS_PIXELS,
                        help="pixels a class needs to count in an image (2048 in the papers)")
    parser.add_argument("--coco-split", choices=COCO_SPLITS, default="interleaved")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that read the label maps")
    args = parser.parse_args(argv)
    list_dir = args.list_dir or os.path.join("lists", args.benchmark)
    write_image_lists(args.benchmark, args.data_root, list_dir, args.sbd_list, args.val_list, args.workers)
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
    print(f"caches in {cache_dir(train_list)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as exc:  # a bad mask or a missing file: one line, not a traceback
        sys.exit(f"error: {exc}")
