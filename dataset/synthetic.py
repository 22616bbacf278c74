"""A small synthetic dataset in the exact PASCAL VOC layout, learnable few-shot, from a seed.

Command line::

    python -m dataset.synthetic --out PATH [--seed 0] [--num-train 600] [--num-val 200] [--size 160] [--workers 0]

writes under PATH::

    JPEGImages/<id>.jpg                     RGB images, sides drawn in [5/8·size, size] (100..160 px)
    SegmentationClassAug/<id>.png           grayscale label maps: 0 background, 1..20, 255 borders
    ImageSets/Segmentation/train.txt        VOC-style training ids (a quarter of the training images)
    ImageSets/Segmentation/val.txt          validation ids
    ImageSets/SBD/train_noval.txt           SBD-style training ids (the rest, overlapping train.txt
                                            a little, so the list builder's de-duplication is used)

so that ``python -m dataset.make_lists pascal --data-root PATH`` reads it like the real data (it
warns that the counts are not 5,953 / 1,449). Use ``--min-class-pixels 128`` with it: 2048 pixels is
1.1% of a 500x375 VOC image, and 1.1% of a ~130x130 synthetic image is about 190 pixels; objects
here are at least ~300 pixels after occlusion, so 128 only drops fragments of occluded objects.

How the classes are made recognisable from one support: every class has its own hue and its own
texture, and both vary a little per instance; objects are ellipses, star polygons or smooth blobs
of varied size (1-3 objects of distinct classes per image, occluding each other) on a cluttered
background made only of low-saturation (grey) shapes and textures, so colour saturation
separates objects from background and hue + texture separate classes. Class c = 5i + j + 1
(i = PASCAL-5i fold, j = 0..4) gets hue (4j + i)·18° and texture (i + j) mod 4 (solid, stripes,
checker, dots): a fold's five novel classes are spread 72° apart around the colour wheel, every
texture also occurs among the base classes of every fold, and classes whose hues are neighbours
(18° apart) always differ in texture.

Deterministic: image k is drawn from a Generator seeded with (seed, k) only, so ``--workers N`` (N processes
drawing images in parallel) writes the same files as one process. ``--size 500`` gives PASCAL VOC-sized images
(VOC's are at most 500 px a side, mostly 500x375; here sides are drawn in 313..500).
"""
import argparse
import os
import sys
import time

import cv2
import numpy as np

from .files import atomic_write_text
from .splits import IGNORE_LABEL, num_classes

NUM_CLASSES = num_classes("pascal")
TEXTURES = ("solid", "stripes", "checker", "dots")


def class_appearance(class_id):
    """(hue in OpenCV units 0..180, texture name) of a class 1..20 (see the module doc)."""
    fold, member = divmod(class_id - 1, 5)
    hue_index = 4 * member + fold
    return hue_index * 9.0, TEXTURES[(fold + member) % 4]


def _texture(kind, h, w, rng):
    """A 0/1 float pattern of the given kind (1 = the darker second tone)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    period = rng.uniform(6.0, 9.0)
    if kind == "solid":
        return np.zeros((h, w), np.float32)
    if kind == "stripes":
        return (np.mod(u, period) < period / 2).astype(np.float32)
    if kind == "checker":
        return ((np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2).astype(np.float32)
    # dots: a lattice of discs of radius ~period/4
    du = np.mod(u, period) - period / 2
    dv = np.mod(v, period) - period / 2
    return (du * du + dv * dv < (period / 3.2) ** 2).astype(np.float32)


def _hsv_to_rgb(hue, sat, val):
    """One colour, HSV in OpenCV units (hue 0..180, sat/val 0..1) -> RGB float 0..255."""
    pixel = np.array([[[hue, sat * 255, val * 255]]], np.float32).clip(0, [180, 255, 255]).astype(np.uint8)
    return cv2.cvtColor(pixel, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _object_appearance(class_id, h, w, rng):
    """The (h, w, 3) RGB appearance of one instance of a class, to be masked by its shape."""
    hue, kind = class_appearance(class_id)
    hue = (hue + rng.uniform(-1.5, 1.5)) % 180
    sat, val = rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0)
    light = _hsv_to_rgb(hue, sat, val)
    dark = _hsv_to_rgb(hue, sat, val * 0.45)
    pattern = _texture(kind, h, w, rng)[..., None]
    image = light * (1 - pattern) + dark * pattern
    # a gentle shading gradient so that an object is not a flat colour
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (xx * np.cos(direction) + yy * np.sin(direction)) / max(h, w)
    return image * (1 + 0.12 * ramp[..., None])


def _shape_mask(h, w, rng):
    """A random ellipse, star polygon or smooth blob (uint8 0/1) of varied size."""
    mask = np.zeros((h, w), np.uint8)
    radius = rng.uniform(0.14, 0.32) * min(h, w)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    kind = rng.integers(3)
    if kind == 0:
        axes = (int(radius), int(radius * rng.uniform(0.55, 1.0)))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, rng.uniform(0, 180), 0, 360, 1, -1)
        return mask
    n = int(rng.integers(5, 10)) if kind == 1 else 64
    theta = np.sort(rng.uniform(0, 2 * np.pi, n)) if kind == 1 else np.linspace(0, 2 * np.pi, n, endpoint=False)
    if kind == 1:  # star-like polygon: radii jump between vertices
        r = radius * rng.uniform(0.55, 1.1, n)
    else:  # blob: radius with a few smooth harmonics
        r = np.full(n, radius)
        for harmonic in (2, 3, 4):
            r += radius * rng.uniform(0, 0.18) * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
    points = np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], 1).round().astype(np.int32)
    cv2.fillPoly(mask, [points], 1)
    return mask


def _background(h, w, rng):
    """A cluttered background of grey shapes, grey textures, a gradient and noise (no class colour)."""
    base = rng.uniform(70, 190)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (xx * np.cos(direction) + yy * np.sin(direction)) / max(h, w)
    image = np.repeat((base + 40 * ramp)[..., None], 3, axis=2)
    for _ in range(int(rng.integers(3, 9))):
        shape = np.zeros((h, w), np.uint8)
        if rng.random() < 0.5:
            p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.rectangle(shape, p1, p2, 1, -1)
        else:
            axes = (int(rng.integers(5, max(6, w // 3))), int(rng.integers(5, max(6, h // 3))))
            cv2.ellipse(shape, (int(rng.integers(0, w)), int(rng.integers(0, h))), axes,
                        rng.uniform(0, 180), 0, 360, 1, -1)
        grey = rng.uniform(30, 225)
        tint = rng.uniform(-8, 8, 3)  # saturation stays far below the objects'
        fill = grey + tint
        if rng.random() < 0.4:  # grey texture, so texture alone never means "object"
            pattern = _texture(TEXTURES[int(rng.integers(1, 4))], h, w, rng)[..., None]
            fill = fill * (1 - 0.35 * pattern)
        else:
            fill = np.broadcast_to(fill, (h, w, 3))
        image = np.where(shape[..., None] > 0, fill, image)
    return image


def make_sample(rng, max_size):
    """One (RGB uint8 image, uint8 label map) pair."""
    min_size = int(round(max_size * 5 / 8))
    h, w = int(rng.integers(min_size, max_size + 1)), int(rng.integers(min_size, max_size + 1))
    image = _background(h, w, rng)
    label = np.zeros((h, w), np.uint8)
    num_objects = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    classes = rng.choice(np.arange(1, NUM_CLASSES + 1), size=num_objects, replace=False)
    shapes = [_shape_mask(h, w, rng) for _ in classes]
    order = np.argsort([-int(s.sum()) for s in shapes])  # large first, so small objects stay visible on top
    for k in order:
        shape, class_id = shapes[k], int(classes[k])
        soft = cv2.GaussianBlur(shape.astype(np.float32), (3, 3), 0)[..., None]  # soft edge, like a photo
        image = image * (1 - soft) + _object_appearance(class_id, h, w, rng) * soft
        label[shape > 0] = class_id
    # VOC draws a 255 band over every object's contour; the soft image edge lies inside it
    kernel = np.ones((3, 3), np.uint8)
    border = np.zeros((h, w), bool)
    for class_id in np.unique(label[label > 0]):
        region = (label == class_id).astype(np.uint8)
        border |= cv2.dilate(region, kernel) != cv2.erode(region, kernel)
    label[border] = IGNORE_LABEL
    image = image + rng.normal(0, 4, image.shape)
    return image.clip(0, 255).astype(np.uint8), label


def _write_sample(out, seed, index, size):
    """Draw image ``index`` and write its JPEG and label PNG; returns its id."""
    image_id = f"synth_{index:06d}"
    image, label = make_sample(np.random.default_rng([seed, index]), size)
    if not cv2.imwrite(os.path.join(out, "JPEGImages", image_id + ".jpg"),
                       cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92]):
        raise OSError(f"cannot write {os.path.join(out, 'JPEGImages', image_id + '.jpg')}")
    if not cv2.imwrite(os.path.join(out, "SegmentationClassAug", image_id + ".png"), label):
        raise OSError(f"cannot write {os.path.join(out, 'SegmentationClassAug', image_id + '.png')}")
    return image_id


def write_dataset(out, seed=0, num_train=600, num_val=200, size=160, workers=0):
    """Write the dataset (see the module doc) and return {"train": ids, "val": ids}; ``workers`` > 0 draws the
    images in that many processes (the same files)."""
    if num_train < 1 or num_val < 1 or size < 32 or workers < 0:
        raise ValueError("need num_train >= 1, num_val >= 1, size >= 32 and workers >= 0")
    for folder in ("JPEGImages", "SegmentationClassAug", os.path.join("ImageSets", "Segmentation"),
                   os.path.join("ImageSets", "SBD")):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    jobs = [(out, seed, index, size) for index in range(num_train + num_val)]
    if workers:
        import multiprocessing
        # fork where the platform has it: a spawned worker would first re-import the caller's main module
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(workers) as pool:
            all_ids = pool.starmap(_write_sample, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
    else:
        all_ids = [_write_sample(*job) for job in jobs]
    ids = {"train": all_ids[:num_train], "val": all_ids[num_train:]}
    train = ids["train"]
    voc_train = [i for k, i in enumerate(train) if k % 4 == 0]
    sbd_train = [i for k, i in enumerate(train) if k % 4 != 0 or k % 8 == 0]  # overlaps voc_train
    sets = {os.path.join("ImageSets", "Segmentation", "train.txt"): voc_train,
            os.path.join("ImageSets", "Segmentation", "val.txt"): ids["val"],
            os.path.join("ImageSets", "SBD", "train_noval.txt"): sbd_train}
    for rel, id_list in sets.items():
        atomic_write_text(os.path.join(out, rel), "".join(i + "\n" for i in id_list))
    return ids


def write_folder_dataset(out, masks="label_maps", num_classes=NUM_CLASSES, num_images=200, size=160, seed=0):
    """The same images in the layout of the ``folder`` benchmark (dataset/folder.py; the stand-in of "your own
    data"): ``images/<id>.jpg``, ``classes.txt`` (the first ``num_classes`` VOC names) and either label maps
    ``masks/<id>.png`` (classes above ``num_classes`` -> background, 255 borders kept) or, with
    ``masks="class_folders"``, binary 0/255 masks ``masks/<class>/<id>.png`` for the classes present (borders -> 0).
    Returns the ids written."""
    if masks not in ("label_maps", "class_folders"):
        raise ValueError(f"masks must be 'label_maps' or 'class_folders', got {masks!r}")
    if not 1 <= num_classes <= NUM_CLASSES or num_images < 1 or size < 32:
        raise ValueError(f"need 1 <= num_classes <= {NUM_CLASSES}, num_images >= 1 and size >= 32")
    from .splits import CLASS_NAMES
    names = CLASS_NAMES["pascal"][:num_classes]
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    ids, index = [], -1
    while len(ids) < num_images:
        index += 1
        image_id = f"img_{index:05d}"
        image, label = make_sample(np.random.default_rng([seed, index]), size)
        label[(label > num_classes) & (label != IGNORE_LABEL)] = 0
        if not (0 < label[label != IGNORE_LABEL]).any():
            continue  # no class of the subset in it: draw another
        if not cv2.imwrite(os.path.join(out, "images", image_id + ".jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, 92]):
            raise OSError(f"cannot write {os.path.join(out, 'images', image_id + '.jpg')}")
        writes = ([(os.path.join(out, "masks"), label)] if masks == "label_maps" else
                  [(os.path.join(out, "masks", names[c - 1]), np.where(label == c, 255, 0).astype(np.uint8))
                   for c in np.unique(label) if 0 < c <= num_classes])
        for folder, mask in writes:
            os.makedirs(folder, exist_ok=True)
            if not cv2.imwrite(os.path.join(folder, image_id + ".png"), mask):
                raise OSError(f"cannot write {os.path.join(folder, image_id + '.png')}")
        ids.append(image_id)
    atomic_write_text(os.path.join(out, "classes.txt"), "".join(n + "\n" for n in names))
    return ids


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dataset.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (the data root)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--size", type=int, default=160, help="largest image side; sides are in [5/8 size, size]")
    parser.add_argument("--workers", type=int, default=0, help="processes drawing images (0: this one); same files")
    parser.add_argument("--layout", choices=("voc", "folder"), default="voc",
                        help="voc (PASCAL's layout, the default) or folder (images/ + masks/ + classes.txt: the "
                             "layout of benchmark folder, your own data's; --num-train images, --num-val ignored)")
    parser.add_argument("--masks", choices=("label_maps", "class_folders"), default="label_maps",
                        help="--layout folder: label maps masks/<id>.png, or binary masks masks/<class>/<id>.png")
    parser.add_argument("--classes", type=int, default=NUM_CLASSES, help="--layout folder: the first N classes")
    args = parser.parse_args(argv)
    start = time.time()
    if args.layout == "folder":
        ids = write_folder_dataset(args.out, args.masks, args.classes, args.num_train, args.size, args.seed)
        print(f"wrote {len(ids)} images of {args.classes} classes to {args.out} in {time.time() - start:.1f} s; "
              f"next: python -m dataset.make_lists folder --data-root {args.out} --min-class-pixels 128")
        return 0
    ids = write_dataset(args.out, args.seed, args.num_train, args.num_val, args.size, args.workers)
    print(f"wrote {len(ids['train'])} train + {len(ids['val'])} val images to {args.out} "
          f"in {time.time() - start:.1f} s; next: python -m dataset.make_lists pascal --data-root {args.out} "
          f"--list-dir PATH --min-class-pixels 128")
    return 0


if __name__ == "__main__":
    sys.exit(main())
