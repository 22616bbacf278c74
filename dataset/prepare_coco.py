"""Turn the official COCO2014 instance annotations into PNG label maps for COCO-20i.

Command line::

    python -m dataset.prepare_coco --data-root PATH [--splits train2014 val2014] [--workers N]

Reads ``PATH/annotations/instances_<split>.json`` (the official files) and writes, for every image
with at least one annotation, ``PATH/annotations/<split>/<image file name>.png``: a grayscale label
map with 0 = background and 1..80 = the 80 categories in the official order (ascending COCO
category id: person=1 ... toothbrush=80). Images without any annotation get no label map and so are
not listed (COCO2014 then gives the usual 82,081 train / 40,137 val images). Instances are painted
from the largest area to the smallest, so a small object lying on a large one stays visible;
crowd annotations are painted with their class like the others. Each PNG is written atomically,
so an interrupted run can simply be restarted. Next step: ``python -m dataset.make_lists coco``.
"""
import argparse
import multiprocessing
import os
import sys
import time

import numpy as np

from .files import atomic_write_png
from .splits import num_classes

_STATE = {}  # the COCO index shared with forked worker processes (copy-on-write)


def load_coco(json_path):
    """pycocotools' COCO index of an instances json, with a clear error if it is missing."""
    from pycocotools.coco import COCO  # imported here: only this command needs pycocotools

    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"COCO annotation file not found: {json_path}; download the official "
                                "annotations_trainval2014.zip and unzip it in the data root")
    return COCO(json_path)


def category_to_label(coco, json_path):
    """{COCO category id: label 1..80} in the official (ascending id) order."""
    category_ids = sorted(set(coco.getCatIds()))  # a repeated id must not pass as a category
    if len(category_ids) != num_classes("coco"):
        raise ValueError(f"{json_path} has {len(category_ids)} categories, expected the "
                         f"{num_classes('coco')} of COCO2014 instances")
    return {cat_id: index for index, cat_id in enumerate(category_ids, 1)}


def label_map(coco, image_id, lut, json_path):
    """The (H, W) uint8 label map of one image."""
    info = coco.imgs[image_id]
    label = np.zeros((info["height"], info["width"]), np.uint8)
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))
    for ann in sorted(annotations, key=lambda a: (-a.get("area", 0), a["id"])):
        if ann["category_id"] not in lut:
            raise KeyError(f"{json_path}: annotation {ann['id']} has unknown category_id {ann['category_id']}")
        label[coco.annToMask(ann) > 0] = lut[ann["category_id"]]
    return label


def _write_one(image_id):
    coco, lut, json_path, out_dir = _STATE["coco"], _STATE["lut"], _STATE["json"], _STATE["out"]
    name = os.path.splitext(coco.imgs[image_id]["file_name"])[0] + ".png"
    atomic_write_png(os.path.join(out_dir, name), label_map(coco, image_id, lut, json_path))


def prepare_split(data_root, split, workers=1):
    """Write the label maps of one split (e.g. "train2014"); returns how many were written."""
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"data root not found: {data_root}")
    json_path = os.path.join(data_root, "annotations", f"instances_{split}.json")
    coco = load_coco(json_path)
    lut = category_to_label(coco, json_path)
    out_dir = os.path.join(data_root, "annotations", split)
    os.makedirs(out_dir, exist_ok=True)
    image_ids = sorted(i for i in coco.imgs if coco.getAnnIds(imgIds=[i], iscrowd=None))
    _STATE.update(coco=coco, lut=lut, json=json_path, out=out_dir)
    try:
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for _ in pool.imap_unordered(_write_one, image_ids, chunksize=64):
                    pass
        else:
            for image_id in image_ids:
                _write_one(image_id)
    finally:
        _STATE.clear()
    return len(image_ids)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dataset.prepare_coco", description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", required=True, help="COCO folder holding annotations/ and train2014/, val2014/")
    parser.add_argument("--splits", nargs="+", default=["train2014", "val2014"])
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    for split in args.splits:
        start = time.time()
        count = prepare_split(args.data_root, split, args.workers)
        print(f"{split}: wrote {count} label maps to {os.path.join(args.data_root, 'annotations', split)} "
              f"in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
