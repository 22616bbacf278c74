"""Fold splits of PASCAL-5i and COCO-20i: the ONLY place in the project where they live.

Class ids are 1-based and global (PASCAL 1..20, COCO 1..80 in the official category order);
0 is background and 255 is ignore in every label map.

- PASCAL-5i: fold i's novel classes are {5i+1 .. 5i+5}.
- COCO-20i, two conventions that give different numbers and must not be compared:
  ``interleaved`` (PFENet, BAM, HSNet, SVF; the default): fold i novel = {4k+i+1 : k = 0..19};
  ``consecutive``: fold i novel = {20i+1 .. 20i+20}.
The base (training) classes of a fold are all the other classes.
Class names (``class_name``): VOC2012's 20 in their id order; COCO's 80 in the official category order
(the 91 category ids with the 11 unused ones removed: person = 1 ... toothbrush = 80).
"""

BENCHMARKS = ("pascal", "coco")
COCO_SPLITS = ("interleaved", "consecutive")
NUM_FOLDS = 4
IGNORE_LABEL = 255
CLASS_NAMES = {
    "pascal": ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"),
    "coco": ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
             "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
             "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
             "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
             "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
             "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
             "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
             "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
             "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"),
}


def num_classes(benchmark):
    """Number of foreground classes of a benchmark: 20 (pascal) or 80 (coco)."""
    if benchmark == "pascal":
        return 20
    if benchmark == "coco":
        return 80
    raise ValueError(f"unknown benchmark {benchmark!r}: expected one of {BENCHMARKS}")


def class_name(benchmark, class_id):
    """The name of 1-based class ``class_id`` of a benchmark ("aeroplane" for pascal 1, "person" for coco 1)."""
    n = num_classes(benchmark)
    if isinstance(class_id, bool) or not isinstance(class_id, int) or not 1 <= class_id <= n:
        raise ValueError(f"class id must be an integer in 1..{n} for {benchmark}, got {class_id!r}")
    return CLASS_NAMES[benchmark][class_id - 1]


def _check_fold(fold):
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < NUM_FOLDS:
        raise ValueError(f"fold must be an integer in 0..{NUM_FOLDS - 1}, got {fold!r}")


def novel_classes(benchmark, fold, coco_split="interleaved"):
    """Sorted 1-based ids of the novel (test) classes of ``fold``."""
    n = num_classes(benchmark)
    _check_fold(fold)
    if benchmark == "pascal":
        return list(range(5 * fold + 1, 5 * fold + 6))
    if coco_split == "interleaved":
        return [4 * k + fold + 1 for k in range(n // 4)]
    if coco_split == "consecutive":
        return list(range(20 * fold + 1, 20 * fold + 21))
    raise ValueError(f"unknown coco_split {coco_split!r}: expected one of {COCO_SPLITS}")


def base_classes(benchmark, fold, coco_split="interleaved"):
    """Sorted 1-based ids of the base (training) classes of ``fold``: every class not novel."""
    novel = set(novel_classes(benchmark, fold, coco_split))
    return [c for c in range(1, num_classes(benchmark) + 1) if c not in novel]
