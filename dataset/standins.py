"""Small stand-ins of FSS-1000, Deepglobe, ISIC2018 and Chest X-ray, written in each dataset's exact layout.

Random images and masks (from a seed) under the file names, folders and mask encodings of the real datasets
(dataset/crossdomain.py describes them), so that listing, episodes, transform and metric are tested on files
shaped like the ones users bring. Nothing here comes from those datasets or from HSNet's / PATNet's repositories:
class names and the split and class files are made up in their formats.

    python -m dataset.standins --out data/standins      # writes FSS-1000/, Deepglobe/, ISIC/, LungSegmentation/,
                                                       # fss_splits/{trn,val,test}.txt and isic_class_id.csv
"""
import argparse
import os

import numpy as np
from PIL import Image

# made-up FSS-1000-style class names (lower case, '_', '-' and "'" as in the real list)
FSS_STANDIN_CLASSES = {
    "trn": ("ant_lion", "bean-bag", "cob_pipe", "dust_pan", "egg_cup", "fire-fly"),
    "val": ("gas_lamp", "hat_box"),
    "test": ("ink_well", "jay's_feather", "kite_tail"),
}


def _image(rng, h, w, grey=False):
    shape = (h, w) if grey else (h, w, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "L" if grey else "RGB")


def _mask_values(rng, h, w, low=0, high=255):
    """A mask with a random rectangle of ``high`` on ``low`` plus a few pixels just below / at the threshold
    (127 -> 0, 128 -> 1), so that the 128 threshold is exercised."""
    m = np.full((h, w), low, dtype=np.uint8)
    y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    m[y0:y0 + int(rng.integers(h // 4, h // 2 + 1)), x0:x0 + int(rng.integers(w // 4, w // 2 + 1))] = high
    m[0, 0], m[-1, -1] = 127, 128
    return m


def _save_jpg(img, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, quality=90)


def _save_png(array, path, rgb=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(np.stack([array] * 3, -1) if rgb else array, "RGB" if rgb else "L")
    img.save(path)


def write_fss1000(out, seed=0, classes=FSS_STANDIN_CLASSES, size=(24, 28)):
    """``out/FSS-1000/<class>/<n>.jpg`` + ``<n>.png`` (n = 1..10; RGB masks 0/255) and ``out/fss_splits/<split>.txt``
    (one class a line, the test file with CRLF endings, unsorted: HSNet's files are both)."""
    rng = np.random.default_rng(seed)
    h, w = size
    for split, names in classes.items():
        for name in names:
            for n in range(1, 11):
                _save_jpg(_image(rng, h, w), os.path.join(out, "FSS-1000", name, f"{n}.jpg"))
                _save_png(_mask_values(rng, h, w), os.path.join(out, "FSS-1000", name, f"{n}.png"), rgb=True)
        os.makedirs(os.path.join(out, "fss_splits"), exist_ok=True)
        newline = "\r\n" if split == "test" else "\n"
        with open(os.path.join(out, "fss_splits", f"{split}.txt"), "w", newline="") as f:
            f.write("".join(n + newline for n in reversed(names)))
    return os.path.join(out, "FSS-1000")


def write_deepglobe(out, seed=1, per_class=(3, 4, 2, 5, 3, 4), size=(20, 20)):
    """``out/Deepglobe/<c>/test/origin/<stem>.jpg`` + ``groundtruth/<stem>.png`` (c = 1..6; 3-channel 0/255 masks, as
    PATNet's preprocessing writes them with OpenCV); tile stems ``<id>_<row><col>``."""
    rng = np.random.default_rng(seed)
    h, w = size
    for c, count in enumerate(per_class, 1):
        for k in range(count):
            stem = f"{100 + 7 * k + c}_{k % 6}{(k * 5) % 6}"
            base = os.path.join(out, "Deepglobe", str(c), "test")
            _save_jpg(_image(rng, h, w), os.path.join(base, "origin", stem + ".jpg"))
            _save_png(_mask_values(rng, h, w), os.path.join(base, "groundtruth", stem + ".png"), rgb=True)
    return os.path.join(out, "Deepglobe")


def write_isic(out, seed=2, per_class=(4, 3, 2), flat=False, size=(18, 26)):
    """ISIC2018 task 1: ``out/ISIC/ISIC2018_Task1-2_Training_Input/<c>/ISIC_<7 digits>.jpg`` (PATNet's folders 1..3;
    ``flat``: the official single folder) and ``ISIC2018_Task1_Training_GroundTruth/<id>_segmentation.png`` (grey
    0/255); ``out/isic_class_id.csv`` in class_id.csv's format (``ID,Class``, CRLF) for the flat layout."""
    from .crossdomain import ISIC_CSV_NAMES, ISIC_IMAGES, ISIC_MASKS
    rng = np.random.default_rng(seed)
    h, w = size
    rows, number = [], 0
    for c, count in enumerate(per_class, 1):
        for _ in range(count):
            image_id = f"ISIC_{number:07d}"
            number += 3
            folder = os.path.join(out, "ISIC", ISIC_IMAGES, "" if flat else str(c))
            _save_jpg(_image(rng, h, w), os.path.join(folder, image_id + ".jpg"))
            _save_png(_mask_values(rng, h, w), os.path.join(out, "ISIC", ISIC_MASKS, image_id + "_segmentation.png"))
            rows.append(f"{image_id},{ISIC_CSV_NAMES[c - 1]}")
    with open(os.path.join(out, "isic_class_id.csv"), "w", newline="") as f:
        f.write("ID,Class\r\n" + "".join(r + "\r\n" for r in sorted(rows)))
    return os.path.join(out, "ISIC")


def write_lung(out, seed=3, count=5, montgomery=False, size=(30, 22)):
    """``out/LungSegmentation/CXR_png/CHNCXR_<4 digits>_<0|1>.png`` (grey) and ``masks/<id>_mask.png`` (grey 0/255);
    one X-ray without a mask (never drawn); ``montgomery``: also an ``MCUCXR_...`` pair whose mask has the image's
    own name (the Kaggle set's Montgomery half)."""
    rng = np.random.default_rng(seed)
    h, w = size
    base = os.path.join(out, "LungSegmentation")
    ids = [f"CHNCXR_{k + 1:04d}_{k % 2}" for k in range(count + 1)]
    for k, image_id in enumerate(ids):
        _image(rng, h, w, grey=True).save(_ensure(os.path.join(base, "CXR_png", image_id + ".png")))
        if k < count:
            _save_png(_mask_values(rng, h, w), os.path.join(base, "masks", image_id + "_mask.png"))
    if montgomery:
        _image(rng, h, w, grey=True).save(_ensure(os.path.join(base, "CXR_png", "MCUCXR_0001_0.png")))
        _save_png(_mask_values(rng, h, w), os.path.join(base, "masks", "MCUCXR_0001_0.png"))
    return base


def _ensure(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def write_all(out, seed=0, isic_flat=False, lung_montgomery=False):
    """Every stand-in under ``out`` (the anchors' ``--datapath``)."""
    write_fss1000(out, seed)
    write_deepglobe(out, seed + 1)
    write_isic(out, seed + 2, flat=isic_flat)
    write_lung(out, seed + 3, montgomery=lung_montgomery)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dataset.standins", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--isic-flat", action="store_true", help="ISIC's official flat folder + class csv")
    parser.add_argument("--lung-montgomery", action="store_true", help="also a mask named like its image")
    args = parser.parse_args(argv)
    write_all(args.out, args.seed, args.isic_flat, args.lung_montgomery)
    print(f"stand-ins written under {args.out}")


if __name__ == "__main__":
    main()
