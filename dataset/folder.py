"""The ``folder`` family: any folder of images and masks as a few-shot benchmark (``benchmark: folder``).

Layout under ``data_root`` (one of two mask layouts)::

    images/<name>.jpg|jpeg|png|bmp|tif|tiff|webp
    masks/<name>.png                    label maps: 0 background, i = class i (line i of classes.txt), 255 ignore
    masks/<class name>/<name>.png       or: one folder of binary masks per class (0/255 or 0/1; values >= 128 are
                                        the class when the mask has values above 1, as FSS-1000's masks)
    classes.txt                         class names, one per line, line i = class id i (required for label maps;
                                        for per-class folders the default is the folders' names, sorted)

``classes_file`` names another classes file. Masks are lossless files (.png, .bmp, .tif, .tiff) with the
image's name; a palette PNG's indices are its classes. With per-class folders an image may have masks in
several class folders: it is listed once per class (its other classes are background in that line's mask).

The split (config keys, read when the benchmark is resolved):
- ``novel_classes: [name, ...]``: one fold whose novel classes are these; every other class is a base class;
- else ``num_folds: k`` (null = min(4, number of classes)): fold i's novel classes are ids
  ``i·n//k + 1 .. (i+1)·n//k``, consecutive blocks as PASCAL-5i's (k = 4 on 20 classes gives exactly PASCAL-5i's);
- a one-class dataset has one fold whose novel class is that class: test a model trained elsewhere on it, or
  tune on its labelled images with ``train_classes: all`` (training then uses every class).

Which images train and which test (``python -m dataset.make_lists folder``): by default every image is in both
lists (classes, not images, separate training from testing in a k-fold split, as in PASCAL-5i; a test query is
never its own support); ``--val-fraction F`` puts a fixed fraction in val only (chosen by a hash of the name, so
adding images never moves the others); ``--train-ids FILE --val-ids FILE`` (image names, one per line) choose them.
"""
from __future__ import annotations

import hashlib
import math
import os

import numpy as np
from PIL import Image

from .files import check_label_values, read_id_list

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")
IMAGES, MASKS, CLASSES_FILE = "images", "masks", "classes.txt"


def _classes_path(options):
    return options.get("classes_file") or os.path.join(options.get("data_root") or ".", CLASSES_FILE)


def _class_folders(data_root):
    masks = os.path.join(data_root, MASKS)
    if not os.path.isdir(masks):
        return []
    return sorted(d for d in os.listdir(masks) if os.path.isdir(os.path.join(masks, d)))


def layout(data_root) -> str:
    """``label_maps`` (masks/<name>.png) or ``class_folders`` (masks/<class>/<name>.png); mixed is an error."""
    masks = os.path.join(data_root, MASKS)
    if not os.path.isdir(masks):
        raise FileNotFoundError(f"mask folder not found: {masks}; the folder benchmark reads {data_root}/images/ and "
                                f"{data_root}/masks/ (label maps masks/<name>.png, or masks/<class>/<name>.png)")
    folders = _class_folders(data_root)
    files = [f for f in os.listdir(masks) if os.path.isfile(os.path.join(masks, f)) and not f.startswith(".")]
    if folders and files:
        raise ValueError(f"{masks} holds both mask files ({files[0]}, ...) and class folders ({folders[0]}/, ...): "
                         "use one layout (label maps masks/<name>.png, or one folder of binary masks per class)")
    return "class_folders" if folders else "label_maps"


def read_classes_file(path):
    """Class names of a classes file: one per line, line i = id i; blank lines and duplicates are errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classes file not found: {path}; write one class name per line (line 1 = value 1 "
                                "in the label maps, line 2 = value 2, ...), or set classes_file=PATH")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ValueError(f"classes file {path} is empty: write one class name per line")
    for i, name in enumerate(lines, 1):
        if not name:
            raise ValueError(f"{path}:{i}: empty class name (line i names class i: no gaps)")
        if name in lines[:i - 1]:
            raise ValueError(f"{path}:{i}: class {name!r} is named twice")
    if len(lines) > 254:
        raise ValueError(f"classes file {path} names {len(lines)} classes; label maps hold at most 254 (255 = ignore)")
    return tuple(lines)


def folder_classes(options):
    """Class names of the dataset at ``options['data_root']`` (classes file, else the class folders' names)."""
    path = _classes_path(options)
    data_root = options.get("data_root")
    if options.get("classes_file") is None and not os.path.isfile(path) and data_root:
        folders = _class_folders(data_root) if os.path.isdir(os.path.join(data_root, MASKS)) else []
        if folders:
            return tuple(folders)
    names = read_classes_file(path)
    if data_root and os.path.isdir(os.path.join(data_root, MASKS)) and layout(data_root) == "class_folders":
        extra = sorted(set(_class_folders(data_root)) - set(names))
        if extra:
            raise ValueError(f"class folder(s) {extra} of {os.path.join(data_root, MASKS)} are not in the classes file "
                             f"{path}: add them, or remove the folders")
    return names


def kfold_novel(num_classes, k):
    """Fold i's novel ids: i·n//k + 1 .. (i+1)·n//k (consecutive blocks, PASCAL-5i's rule for n=20, k=4)."""
    return tuple(tuple(range(i * num_classes // k + 1, (i + 1) * num_classes // k + 1)) for i in range(k))


def folder_folds(options, names):
    novel, k = options.get("novel_classes"), options.get("num_folds")
    if novel:
        if k not in (None, 1):
            raise ValueError(f"novel_classes {list(novel)} make one fold; num_folds={k} contradicts it: leave "
                             "num_folds null")
        unknown = [c for c in novel if c not in names]
        if unknown:
            raise ValueError(f"novel_classes names {unknown}, not classes of the dataset (classes file "
                             f"{_classes_path(options)}: {list(names)})")
        return (tuple(sorted(names.index(c) + 1 for c in novel)),)
    k = min(4, len(names)) if k is None else int(k)
    if not 1 <= k <= len(names):
        raise ValueError(f"num_folds={k} for {len(names)} classes: choose 1..{len(names)} folds (each fold needs a "
                         "novel class)")
    return kfold_novel(len(names), k)


def read_folder_label(path, bench):
    """A mask of the folder family as a label map: a label map as it is (values checked), or, in a class folder,
    the class id where the binary mask is set (value 1 when the mask has no value above 1, else >= 128)."""
    folder = os.path.dirname(os.path.abspath(path))
    parent = os.path.basename(folder)
    in_class_folder = os.path.basename(os.path.dirname(folder)) == MASKS and parent in bench.class_names
    mask = read_mask_values(path)
    if not in_class_folder:
        check_label_values(mask, bench.num_classes, path)
        return mask
    class_id = bench.class_names.index(parent) + 1
    return np.where(binary_foreground(mask), class_id, 0).astype(np.uint8)


def read_mask_values(path):
    """The values of a single-channel mask file as uint8 (L, P: its indices; 1-bit: 0/1; an RGB(A) mask must be
    grey (R = G = B) and gives that grey)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask not found: {path}")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("L", "P"):
                return np.array(im, dtype=np.uint8)
            if mode == "1":
                return np.array(im, dtype=np.uint8)
            if mode in ("RGB", "RGBA"):
                rgb = np.array(im.convert("RGB"), dtype=np.uint8)
                if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                    raise ValueError(f"mask {path} is a colour image: save masks as single-channel PNGs of class "
                                     "values (or grey 0/255 binary masks)")
                return rgb[..., 0].copy()
            if mode in ("I;16", "I"):
                values = np.array(im)
                if values.max(initial=0) > 255:
                    raise ValueError(f"mask {path} has values above 255 ({int(values.max())}): masks hold class "
                                     "values 0..254 and 255 = ignore")
                return values.astype(np.uint8)
    except (OSError, SyntaxError) as err:
        raise ValueError(f"cannot decode mask {path}: {err}") from err
    raise ValueError(f"mask {path} has mode {mode!r}; expected a single-channel image of class values")


def binary_foreground(mask):
    """Foreground of a binary mask: == 1 for a 0/1 mask, >= 128 for a 0/255 (or anti-aliased 0..255) one."""
    return mask == 1 if int(mask.max(initial=0)) <= 1 else mask >= 128


# ---------------------------------------------------------------- image lists (make_lists)

def _stems(folder, extensions, what):
    """{stem: file name} of the files of ``folder`` with those extensions; two files with one stem is an error."""
    out = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in extensions or not os.path.isfile(os.path.join(folder, name)):
            continue
        if stem in out:
            raise ValueError(f"two {what} named {stem!r} in {folder}: {out[stem]} and {name}; keep one")
        out[stem] = name
    return out


def _pairs(data_root):
    """Every (image_rel, mask_rel) of the dataset, sorted: per image, per class folder."""
    image_dir = os.path.join(data_root, IMAGES)
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder not found: {image_dir}; the folder benchmark reads {data_root}/images/ "
                                f"and {data_root}/masks/")
    images = _stems(image_dir, IMAGE_EXTENSIONS, "images")
    if not images:
        raise ValueError(f"no image in {image_dir} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    kind = layout(data_root)
    mask_dirs = ([(os.path.join(MASKS, c), c) for c in _class_folders(data_root)] if kind == "class_folders"
                 else [(MASKS, None)])
    pairs, masked = [], set()
    for rel_dir, _ in mask_dirs:
        masks = _stems(os.path.join(data_root, rel_dir), MASK_EXTENSIONS, "masks")
        orphans = sorted(set(masks) - set(images))
        if orphans:
            raise ValueError(f"mask {os.path.join(data_root, rel_dir, masks[orphans[0]])} has no image "
                             f"{image_dir}/{orphans[0]}.* ({len(orphans)} such mask(s)): add the image or remove "
                             "the mask")
        for stem, name in masks.items():
            pairs.append((os.path.join(IMAGES, images[stem]), os.path.join(rel_dir, name)))
            masked.add(stem)
    unmasked = sorted(set(images) - masked)
    if unmasked and kind == "label_maps":
        raise ValueError(f"image {os.path.join(image_dir, images[unmasked[0]])} has no mask "
                         f"{os.path.join(data_root, MASKS, unmasked[0])}.png ({len(unmasked)} such image(s)): every "
                         "image needs its label map (move unlabelled images out of images/)")
    if unmasked:
        print(f"{len(unmasked)} image(s) have a mask in no class folder (e.g. {images[unmasked[0]]}): not listed")
    return sorted(pairs)


def _val_share(stem):
    return int(hashlib.sha1(stem.encode()).hexdigest()[:8], 16) / 16 ** 8


def folder_image_lists(data_root, args):
    """{"train": pairs, "val": pairs} (see the module doc for how images are chosen)."""
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"data root not found: {data_root}")
    pairs = _pairs(data_root)
    stem = lambda pair: os.path.splitext(os.path.basename(pair[0]))[0]  # noqa: E731
    fraction, train_ids, val_ids = (getattr(args, k, None) for k in ("val_fraction", "train_ids", "val_ids"))
    if fraction is not None and (train_ids or val_ids):
        raise ValueError("--val-fraction and --train-ids/--val-ids exclude each other")
    if bool(train_ids) != bool(val_ids):
        raise ValueError("--train-ids and --val-ids go together (image names, one per line, in each)")
    if train_ids:
        chosen = {}
        known = {stem(p) for p in pairs}
        for split, path in (("train", train_ids), ("val", val_ids)):
            ids = read_id_list(path)
            if not ids:
                raise ValueError(f"--{split}-ids file {path} is empty: name one image per line")
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise ValueError(f"--{split}-ids file {path} names {unknown[0]!r}, which is not an image with a mask "
                                 f"in {data_root} ({len(unknown)} such name(s))")
            chosen[split] = set(ids)
        return {split: [p for p in pairs if stem(p) in chosen[split]] for split in ("train", "val")}
    if fraction is None:
        return {"train": list(pairs), "val": list(pairs)}
    if not 0 < fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {fraction}")
    stems = sorted({stem(p) for p in pairs}, key=lambda s: (_val_share(s), s))
    val = set(stems[:max(1, math.floor(fraction * len(stems) + 0.5))])
    return {"train": [p for p in pairs if stem(p) not in val], "val": [p for p in pairs if stem(p) in val]}


def _family():
    from .registry import Family
    return Family(
        "folder", "any folder of images/ and masks/ (label maps + classes.txt, or one binary-mask folder per class)",
        folder_classes, folder_folds, folder_image_lists, read_folder_label,
        data_hint="put images/ and masks/ there (label maps masks/<name>.png with classes.txt, or one folder of "
                  "binary masks per class: masks/<class>/<name>.png); see docs/own_data.md",
        make_lists_options=("val_fraction", "train_ids", "val_ids"), data_named=True)


FAMILY = _family()
