"""Reading images, label maps and list files, and writing files atomically.

Every error names the file at fault and says what to do. Images are read with OpenCV and
returned as float32 RGB (0..255); a JPEG or PNG cut short (an interrupted download or copy) is an
error, although OpenCV would decode its missing part as grey; label maps are read with Pillow so that both grayscale
PNGs (SegmentationClassAug) and palette PNGs (VOC's SegmentationClass) give the class indices
(OpenCV would turn a palette PNG into colours).
"""
import contextlib
import io
import json
import os
import tempfile

import cv2
import numpy as np
from PIL import Image, ImageFile

from .splits import IGNORE_LABEL


JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"
PNG_START, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"


def check_complete(data, path):
    """Raise ValueError naming ``path`` if the bytes of a JPEG or PNG file stop before its end marker
    (JPEG end-of-image FFD9, PNG IEND chunk). The marker is looked for in the last 4 KiB, so padding or
    other data appended after it (some cameras and tools write it) is fine; FFD9 cannot occur inside
    JPEG image data, so a file cut short in the middle has none there."""
    tail = bytes(data[-4096:])
    for kind, start, end in (("JPEG", JPEG_START, JPEG_END), ("PNG", PNG_START, PNG_END)):
        if bytes(data[:len(start)]) == start and end not in tail:
            raise ValueError(f"image file {path} is truncated: the {kind} data stops before its end marker "
                             f"({len(data)} bytes; an interrupted download or copy?); replace it or remove it "
                             "from the list")


def read_image(path):
    """Read an image file as a float32 RGB array (H, W, 3) with values in 0..255."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)
    check_complete(data, path)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ValueError(f"cannot decode image file {path}: the file is corrupt or not an image; "
                         "replace it or remove it from the list")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB).astype(np.float32)


def check_image_decodes(path):
    """Decode the whole image file with Pillow (truncated data is an error: LOAD_TRUNCATED_IMAGES is not set;
    a JPEG or PNG without its end marker too, as in read_image) and return its (width, height). make_lists
    checks every listed image with it, so a damaged file is found when the lists are built, not in training."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)
    check_complete(data, path)
    truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            im.load()
            return im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot decode image file {path}: {err}; the file is damaged or not an image: replace it "
                         "or remove it from the list") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok


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


def read_pair(image_path, label_path, labels):
    """Read an image and its label map and check they have the same height and width. ``labels``: what reads the
    mask (a ``dataset.registry.Benchmark``: its family's rule), or a number of classes (a label map 0..n, 255)."""
    image = read_image(image_path)
    label = labels.read_label(label_path) if hasattr(labels, "read_label") else read_label(label_path, labels)
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label map "
                         f"{label_path} is {label.shape[1]}x{label.shape[0]}; they must match")
    return image, label


# The folders a list line's path is re-rooted at when it is an absolute path outside the data root (the released
# fss_list files hold the authors' /root/paddlejob/.../VOC2012/JPEGImages/... paths): PASCAL's image and mask
# folders, COCO's image folders and the label-map folders under annotations/.
LIST_ANCHORS = ("JPEGImages", "SegmentationClassAug", "train2014", "val2014")


def list_entry_path(field, data_root, where=""):
    """The file a list line's path names: relative paths are under ``data_root``; an absolute path inside
    ``data_root`` is kept; any other absolute path (another machine's) is mapped under ``data_root`` from its
    last anchor folder (``LIST_ANCHORS``, with ``annotations/`` kept before train2014/val2014), so
    ``/any/where/VOC2012/JPEGImages/x.jpg`` -> ``<data_root>/JPEGImages/x.jpg`` and
    ``/any/coco/annotations/val2014/x.png`` -> ``<data_root>/annotations/val2014/x.png``."""
    if not os.path.isabs(field):
        return os.path.join(data_root, field)
    root = os.path.abspath(data_root)
    if os.path.normpath(field).startswith(root.rstrip(os.sep) + os.sep):
        return field
    parts = field.split("/")
    for i in range(len(parts) - 2, -1, -1):  # the last anchor that has a file name after it
        if parts[i] in LIST_ANCHORS:
            start = i - 1 if parts[i] in ("train2014", "val2014") and i > 0 and parts[i - 1] == "annotations" else i
            return os.path.join(data_root, *parts[start:])
    raise ValueError(f"{where}: {field!r} is an absolute path outside the data root {root} and has none of the "
                     f"folders {', '.join(a + '/' for a in LIST_ANCHORS)} to map it under the data root; write it "
                     "relative to data_root (e.g. JPEGImages/<id>.jpg) or set data_root to the folder it is in")


def _stem(field):
    return os.path.splitext(os.path.basename(field))[0]


def check_same_image(image_field, label_field, where):
    """PASCAL's and COCO's lists pair ``<name>.jpg`` with ``<name>.png``: a line whose mask names another image is a
    ValueError naming ``where`` (file:line), never re-mapped silently (a mask of another image trains and scores
    garbage without a word)."""
    if _stem(image_field) != _stem(label_field):
        raise ValueError(f"{where}: the image {image_field!r} and the mask {label_field!r} name different images "
                         f"({_stem(image_field)!r} vs {_stem(label_field)!r}); in PASCAL's and COCO's lists an image "
                         "<name>.jpg goes with the mask <name>.png: correct or remove the line")


def list_rows(path, columns: str):
    """(``path:line``, fields) of every non-empty line of a whitespace-separated list file whose lines hold the
    ``columns`` (their names, space-separated, as the error states them); a line with another count is a
    ValueError naming the file and line."""
    count = len(columns.split())
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != count:
                raise ValueError(f"{path}:{line_no}: expected '{columns}', got {line!r}")
            yield f"{path}:{line_no}", fields


def read_list(list_path, data_root, same_image=False):
    """Read a list file of ``image label`` lines; returns [(image_path, label_path)] under data_root, in the
    file's order. Paths relative to data_root (our lists, PFENet's/BAM's/the SVF code's ``val.txt``) or absolute
    (the released ``fss_list/*/data_list_N.txt`` hold the authors' paths: mapped by ``list_entry_path``).
    ``same_image``: every line's image and mask must have the same name (check_same_image; make_lists' inputs)."""
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"data root not found: {data_root} (set data_root / --data-root)")
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"list file not found: {list_path}; build it with "
                                "`python -m dataset.make_lists pascal|coco --data-root PATH`")
    pairs = []
    for where, fields in list_rows(list_path, "image_path label_path"):
        if same_image:
            check_same_image(*fields, where)
        pairs.append(tuple(list_entry_path(field, data_root, where) for field in fields))
    if not pairs:
        raise ValueError(f"list file {list_path} is empty")
    return pairs


def read_id_list(path, missing_hint="", what="image-set file"):
    """Read the image ids of an image-set file: one id per line (VOC's ImageSets/Segmentation/train.txt,
    SBD's train_noval.txt) or ``JPEGImages/<id>.jpg SegmentationClassAug/<id>.png`` lines (PFENet/BAM's
    lists/pascal/voc_sbd_merge_noduplicate.txt and val.txt), whose image and mask must name the same id
    (check_same_image). A file without any id is a ValueError naming it (``what``: how the user gave it)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image-set file not found: {path} ({what})"
                                + (f"; {missing_hint}" if missing_hint else ""))
    ids = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if fields:
                if len(fields) > 1:
                    check_same_image(fields[0], fields[1], f"{path}:{line_no}")
                ids.append(_stem(fields[0]))
    if not ids:
        raise ValueError(f"{what} {path} is empty: it names no image; give a list with one id (or 'image mask' "
                         "pair) per line. Nothing was written")
    return ids


@contextlib.contextmanager
def atomic_path(path, suffix=".tmp"):
    """Yield a temporary path in ``path``'s folder; when the block succeeds it is ``os.replace``d over
    ``path``, otherwise removed, so a crash never leaves a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_temporary_prefix(path), suffix=suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; the file gets what open() would give
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _temporary_prefix(path):
    return "." + os.path.basename(path) + "."


def current_umask():
    """The process's umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def stale_temporaries(folder, names):
    """The temporaries of atomic_path in ``folder`` for the files ``names`` (left there by a process killed
    during a write, or being written now by a live one)."""
    if not os.path.isdir(folder):
        return []
    prefixes = tuple(_temporary_prefix(name) for name in names)
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.startswith(prefixes) and os.path.isfile(os.path.join(folder, f))]


def remove_stale_temporaries(folder, names):
    """Remove the temporaries that atomic_path left in ``folder`` for the files ``names`` when its process
    was killed (kill -9, power loss) during a write; return their paths. Call it before writing those files,
    in a folder no other process writes (train.py: under the run's lock)."""
    stale = stale_temporaries(folder, names)
    for path in stale:
        os.remove(path)
    return stale


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` atomically (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def atomic_write_json(path, obj):
    """Write ``obj`` as strict JSON (NaN/inf are an error), atomically (see atomic_write_text)."""
    atomic_write_text(path, json.dumps(obj, sort_keys=True, allow_nan=False))


def atomic_write_png(path, array):
    """Write a uint8 array as PNG atomically (a half-written label map must never be left behind)."""
    with atomic_path(path, suffix=".png") as tmp:
        if not cv2.imwrite(tmp, array):
            raise OSError(f"cannot write {path}")
