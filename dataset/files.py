"""Reading images, label maps and list files, and writing files atomically.

Every error names the file at fault and says what to do. Images are read with OpenCV and
returned as float32 RGB (0..255); label maps are read with Pillow so that both grayscale
PNGs (SegmentationClassAug) and palette PNGs (VOC's SegmentationClass) give the class indices
(OpenCV would turn a palette PNG into colours).
"""
import contextlib
import json
import os
import tempfile

import cv2
import numpy as np
from PIL import Image

from .splits import IGNORE_LABEL


def read_image(path):
    """Read an image file as a float32 RGB array (H, W, 3) with values in 0..255."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot decode image file {path}: the file is corrupt or not an image; "
                         "replace it or remove it from the list")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB).astype(np.float32)


def read_label(path, num_classes):
    """Read a label map (H, W) uint8 and check its values are in 0..num_classes or 255."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label map not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise ValueError(f"label map {path} has mode {im.mode!r}; expected a single-channel "
                                 "PNG of class indices (grayscale 'L' or palette 'P')")
            label = np.array(im, dtype=np.uint8)
    except (OSError, SyntaxError) as err:  # PIL's errors for truncated or non-image files
        raise ValueError(f"cannot decode label map {path}: {err}") from err
    check_label_values(label, num_classes, path)
    return label


def label_histogram(label):
    """Pixel count of every value 0..255 of a uint8 label map."""
    return np.bincount(label.ravel(), minlength=256)


def check_label_values(label, num_classes, path, histogram=None):
    """Raise ValueError naming ``path`` if a label is outside 0..num_classes and not 255."""
    hist = label_histogram(label) if histogram is None else histogram
    bad = [int(v) for v in np.flatnonzero(hist) if num_classes < v != IGNORE_LABEL]
    if bad:
        raise ValueError(f"label map {path} contains values {bad}, outside 0..{num_classes} and "
                         f"{IGNORE_LABEL}: is it the right benchmark's label map (e.g. a colour or "
                         "instance PNG instead of SegmentationClassAug)?")


def read_pair(image_path, label_path, num_classes):
    """Read an image and its label map and check they have the same height and width."""
    image = read_image(image_path)
    label = read_label(label_path, num_classes)
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label map "
                         f"{label_path} is {label.shape[1]}x{label.shape[0]}; they must match")
    return image, label


def read_list(list_path, data_root):
    """Read a list file of ``image_rel label_rel`` lines; returns [(image_path, label_path)] under data_root."""
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"data root not found: {data_root} (set data_root / --data-root)")
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"list file not found: {list_path}; build it with "
                                "`python -m dataset.make_lists pascal|coco --data-root PATH`")
    pairs = []
    with open(list_path) as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ValueError(f"{list_path}:{line_no}: expected 'image_path label_path', got {line!r}")
            pairs.append((os.path.join(data_root, fields[0]), os.path.join(data_root, fields[1])))
    if not pairs:
        raise ValueError(f"list file {list_path} is empty")
    return pairs


def read_id_list(path):
    """Read an image-set file of ids (one per line, like VOC's ImageSets/Segmentation/train.txt)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image-set file not found: {path}")
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


@contextlib.contextmanager
def atomic_path(path, suffix=".tmp"):
    """Yield a temporary path in ``path``'s folder; when the block succeeds it is ``os.replace``d over
    ``path``, otherwise removed, so a crash never leaves a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` atomically (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def atomic_write_json(path, obj):
    """Write ``obj`` as JSON, atomically (see atomic_write_text)."""
    atomic_write_text(path, json.dumps(obj, sort_keys=True))


def atomic_write_png(path, array):
    """Write a uint8 array as PNG atomically (a half-written label map must never be left behind)."""
    with atomic_path(path, suffix=".png") as tmp:
        if not cv2.imwrite(tmp, array):
            raise OSError(f"cannot write {path}")
