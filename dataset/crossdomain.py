"""FSS-1000 (HSNet's protocol) and the cross-domain benchmark (PATNet's): layouts, lists, masks, transform, episodes.

Four dataset families whose label files are binary masks of one class per image (docs/data_and_protocol.md,
"FSS-1000" and "Cross-domain few-shot segmentation"):

- ``fss1000``: ``FSS-1000/<class>/<n>.jpg`` + ``<n>.png`` (n = 1..10); the class split (trn / val / test:
  520 / 240 / 240 names) is HSNet's ``data/splits/fss/{trn,val,test}.txt``, which the user passes (not shipped).
- ``deepglobe``: PATNet's preprocessed tiles ``Deepglobe/<c>/test/origin/<stem>.jpg`` and
  ``Deepglobe/<c>/test/groundtruth/<stem>.png``, c = 1..6.
- ``isic``: ``ISIC/ISIC2018_Task1-2_Training_Input/<c>/<id>.jpg`` (c = 1..3, PATNet's grouping of the images by
  its ``class_id.csv``; or the official flat folder plus that csv), masks
  ``ISIC/ISIC2018_Task1_Training_GroundTruth/<id>_segmentation.png``.
- ``lung``: ``LungSegmentation/CXR_png/<id>.png``, masks ``LungSegmentation/masks/<id>_mask.png``; one class,
  listed from the mask files (an image without a mask is never drawn).

``family_files(family, data_root, ...)`` lists ``{class name: [(image, mask), ...]}`` in the anchors' order
(classes sorted, files ``sorted(glob)`` per class), which is what their samplers index into. Masks are read as
the anchors read them (Pillow, converted to 8-bit grey, < 128 -> 0, >= 128 -> 1) and images decoded with Pillow;
``SquareResize`` is their transform: both sides resized to 400 (image bilinear as torchvision's Resize on a PIL
image, mask nearest as torch's ``F.interpolate``), the metric computed on that 400x400 mask.

Episodes (``make_episodes``):
- ``ours`` (the default): one NumPy Generator from the seed; fss1000: queries in list order (cycling), K DISTINCT
  supports among the other images of the query's class; the cross-domain three: episode k of class k mod n, query
  uniform in the class, K distinct supports other than the query.
- ``released`` (``episode_sampler: released``): exactly what HSNet's / PATNet's test loop draws: ``hsnet_episodes``
  and ``patnet_episodes`` (their ``fix_randseed(0)`` seeds NumPy's global state, the loader has 0 workers at test,
  so items are drawn in index order from one stream; batch size does not matter).
"""
import functools
import glob
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from .episodes import Episode, item_rng
from .files import atomic_write_text, check_complete, list_rows
from .transforms import to_tensors

FAMILIES = ("fss1000", "deepglobe", "isic", "lung")
ANCHOR_SIZE = 400            # HSNet's and PATNet's test.py: FSSDataset.initialize(img_size=400)
PATNET_EPISODES = 600        # PATNet's deepglobe/isic/lung datasets: num=600
FSS_SPLITS = ("trn", "val", "test")
FSS_SPLIT_SIZES = {"trn": 520, "val": 240, "test": 240}
FSS_CLASS_OFFSET = {"trn": 0, "val": 520, "test": 760}   # HSNet's class ids: index in the sorted split + this
FSS_IMAGES = tuple(range(1, 11))                          # HSNet draws supports as <n>.jpg, n in 1..10
FOLDERS = {"fss1000": "FSS-1000", "deepglobe": "Deepglobe", "isic": "ISIC", "lung": "LungSegmentation"}
DEEPGLOBE_CLASSES = ("1", "2", "3", "4", "5", "6")
ISIC_CLASSES = ("1", "2", "3")
LUNG_CLASSES = ("1",)
ISIC_IMAGES = "ISIC2018_Task1-2_Training_Input"
ISIC_MASKS = "ISIC2018_Task1_Training_GroundTruth"
# class_id.csv's names in the order of folders 1, 2, 3 when the folders are built from the csv here (PATNet does
# not publish its grouping: this is the csv's order of first appearance; docs/data_and_protocol.md)
ISIC_CSV_NAMES = ("nevus", "melanoma", "seborrheic_keratosis")
MASK_THRESHOLD = 128
SAMPLERS = ("ours", "released")


# ---------------------------------------------------------------- files and lists

def family_root(family, data_root):
    """The dataset's own folder: ``data_root`` itself if it is named so (FSS-1000, Deepglobe, ISIC,
    LungSegmentation), else ``data_root/<that name>`` (the anchors' ``--datapath``)."""
    check_family(family)
    name = FOLDERS[family]
    return data_root if os.path.basename(os.path.normpath(data_root)) == name else os.path.join(data_root, name)


def check_family(family):
    if family not in FAMILIES:
        raise ValueError(f"unknown dataset family {family!r}: expected one of {FAMILIES}")


def read_class_names(path):
    """Class names of one of HSNet's FSS-1000 split files (one name a line, CRLF or LF), sorted as HSNet sorts them.
    HSNet reads ``f.read().split('\\n')[:-1]``: a file without a final newline loses its last name there; here every
    non-empty line counts."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FSS-1000 class list not found: {path}; pass HSNet's data/splits/fss/<split>.txt "
                                "(github.com/juhongm999/hsnet) with --fss-splits DIR")
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    bad = [n for n in names if len(n.split()) != 1 or "/" in n]
    if bad:
        raise ValueError(f"{path}: class names must be folder names without spaces or '/', got {bad[:3]}")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: a class is named twice; is it the right file (HSNet's data/splits/fss/)?")
    return sorted(names)


def _sorted_files(folder, ext, what):
    """``sorted(glob(folder/*))`` keeping names whose part after the first dot is ``ext``, as the anchors filter."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} folder not found: {folder}")
    return [p for p in sorted(glob.glob(os.path.join(glob.escape(folder), "*")))
            if len(os.path.basename(p).split(".")) > 1 and os.path.basename(p).split(".")[1] == ext]


def _stem(path):
    return os.path.basename(path).split(".")[0]


def fss1000_files(root, class_names):
    """{class: [(jpg, png)]} of FSS-1000 for ``class_names`` (sorted), files in ``sorted(glob)`` order (1, 10, 2..9)."""
    return {c: [(p, os.path.join(os.path.dirname(p), _stem(p) + ".png"))
                for p in _sorted_files(os.path.join(root, c), "jpg", f"FSS-1000 class '{c}'")]
            for c in sorted(class_names)}


def deepglobe_files(root):
    return {c: [(p, os.path.join(root, c, "test", "groundtruth", _stem(p) + ".png"))
                for p in _sorted_files(os.path.join(root, c, "test", "origin"), "jpg", f"Deepglobe class {c} image")]
            for c in DEEPGLOBE_CLASSES}


def read_isic_classes(csv_path):
    """{image id: folder '1'|'2'|'3'} from ISIC's class_id.csv (``ID,Class`` rows; names in ISIC_CSV_NAMES)."""
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"ISIC class file not found: {csv_path}; pass PATNet's data/isic/class_id.csv "
                                "(github.com/slei109/PATNet) with --isic-classes FILE")
    out = {}
    with open(csv_path) as f:
        for line_no, line in enumerate(f, 1):
            fields = [x.strip() for x in line.split(",")]
            if line_no == 1 and fields[0] == "ID" or not line.strip():
                continue
            if len(fields) != 2 or fields[1] not in ISIC_CSV_NAMES:
                raise ValueError(f"{csv_path}:{line_no}: expected 'ID,<{'|'.join(ISIC_CSV_NAMES)}>', got {line!r}")
            out[fields[0]] = str(ISIC_CSV_NAMES.index(fields[1]) + 1)
    return out


def isic_files(root, class_csv=None):
    """ISIC's three classes: PATNet's folders ``<images>/1..3`` when they exist, else the official flat folder
    grouped by ``class_csv`` (ids not in the csv are left out)."""
    images = os.path.join(root, ISIC_IMAGES)
    masks = os.path.join(root, ISIC_MASKS)
    if all(os.path.isdir(os.path.join(images, c)) for c in ISIC_CLASSES):
        by_class = {c: _sorted_files(os.path.join(images, c), "jpg", f"ISIC class {c}") for c in ISIC_CLASSES}
    elif class_csv is None:
        raise FileNotFoundError(f"{images} has no class folders 1, 2, 3 (PATNet's layout); pass ISIC's class_id.csv "
                                "(--isic-classes FILE, config key isic_classes) to group the flat folder")
    else:
        classes = read_isic_classes(class_csv)
        by_class = {c: [] for c in ISIC_CLASSES}
        for p in _sorted_files(images, "jpg", "ISIC image"):
            if _stem(p) in classes:
                by_class[classes[_stem(p)]].append(p)
    return {c: [(p, os.path.join(masks, _stem(p) + "_segmentation.png")) for p in files]
            for c, files in by_class.items()}


def lung_image_of_mask(mask_path, image_dir):
    """The X-ray of a mask: ``<id>_mask.png`` -> ``CXR_png/<id>.png``; a mask named like its image
    (``<id>.png``, the Montgomery half of the Kaggle set) -> ``CXR_png/<id>.png``. PATNet cuts the last 9
    characters whatever they are, which names no file for the latter."""
    name = os.path.basename(mask_path)
    stem = name[:-len("_mask.png")] if name.endswith("_mask.png") else os.path.splitext(name)[0]
    return os.path.join(image_dir, stem + ".png")


def lung_files(root):
    images = os.path.join(root, "CXR_png")
    return {"1": [(lung_image_of_mask(m, images), m) for m in _sorted_files(os.path.join(root, "masks"), "png",
                                                                            "Chest X-ray mask")]}


def family_files(family, data_root, class_names=None, class_csv=None):
    """{class name: [(image path, mask path)]} of a family in the anchors' order (see the module docstring);
    ``class_names``: the FSS-1000 split's names (``read_class_names``); ``class_csv``: ISIC's class_id.csv."""
    root = family_root(family, data_root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{family} data not found: {root} (set data_root to the folder that holds "
                                f"{FOLDERS[family]}/)")
    if family == "fss1000":
        if not class_names:
            raise ValueError("fss1000 needs the split's class names (HSNet's data/splits/fss/<split>.txt)")
        return fss1000_files(root, class_names)
    if family == "deepglobe":
        return deepglobe_files(root)
    if family == "isic":
        return isic_files(root, class_csv)
    return lung_files(root)


def write_family_list(path, files, data_root):
    """Write ``{class: [(image, mask)]}`` as ``class image mask`` lines (paths relative to ``data_root``), in order."""
    lines = [f"{c} {os.path.relpath(i, data_root)} {os.path.relpath(m, data_root)}"
             for c, pairs in files.items() for i, m in pairs]
    if any(len(line.split()) != 3 for line in lines):
        raise ValueError(f"{path}: a path or class name holds a space; rename it")
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_family_list(path, data_root):
    """{class: [(image, mask)]} of a list written by ``write_family_list``, in the file's order."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"list file not found: {path}; build it with python -m dataset.make_lists "
                                "<fss1000|deepglobe|isic|lung> --data-root PATH")
    out = {}
    for _, (name, image, mask) in list_rows(path, "class image mask"):
        out.setdefault(name, []).append((os.path.join(data_root, image), os.path.join(data_root, mask)))
    if not out:
        raise ValueError(f"list file {path} is empty")
    return out


@dataclass(frozen=True)
class ClassFiles:
    """The flat (image, mask) list of a family's split, with its classes in order: ``pairs[i]``; the images of
    class k (1-based, ``classes[k-1]``) are ``class_images[k]`` (indices into pairs, in the anchors' order)."""
    classes: tuple
    pairs: tuple
    class_images: dict

    @classmethod
    def from_files(cls, files):
        pairs, class_images = [], {}
        for k, (name, items) in enumerate(files.items(), 1):
            class_images[k] = list(range(len(pairs), len(pairs) + len(items)))
            pairs.extend(items)
        return cls(tuple(files), tuple(pairs), class_images)

    def class_of(self, index):
        """The 1-based class of ``pairs[index]``."""
        for k, members in self.class_images.items():
            if members and members[0] <= index <= members[-1]:
                return k
        raise IndexError(f"no image {index} in a list of {len(self.pairs)}")


# ---------------------------------------------------------------- reading and the transform

def read_rgb(path):
    """An image as uint8 RGB, decoded with Pillow (``.convert('RGB')``, as the anchors); a cut JPEG/PNG is an error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    check_complete(np.fromfile(path, dtype=np.uint8), path)
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot decode image file {path}: {err}; replace it or remove it from the list") from None


def read_binary_mask(path):
    """A mask as the anchors read it: 8-bit grey (Pillow's ``convert('L')``), < 128 -> 0, >= 128 -> 1 (uint8)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask file not found: {path} (every listed image needs its mask)")
    try:
        with Image.open(path) as im:
            grey = np.array(im.convert("L"))
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot decode mask file {path}: {err}; replace it") from None
    return (grey >= MASK_THRESHOLD).astype(np.uint8)


@dataclass
class SquareResize:
    """The anchors' transform: image -> size x size (Pillow bilinear: torchvision's Resize on a PIL image),
    mask -> size x size (nearest as torch's F.interpolate); -> normalised (3,S,S) float and (S,S) long."""
    __test__ = False
    size: int = ANCHOR_SIZE

    def __call__(self, image, mask):
        s = int(self.size)
        image = np.asarray(Image.fromarray(image).resize((s, s), Image.BILINEAR), dtype=np.float32)
        mask = F.interpolate(torch.from_numpy(mask)[None, None].float(), (s, s), mode="nearest")[0, 0]
        return to_tensors(image, mask.to(torch.uint8).numpy())


# ---------------------------------------------------------------- episodes

def _check_shot(files, shot, family):
    if isinstance(shot, bool) or not isinstance(shot, int) or shot < 1:
        raise ValueError(f"shot must be a positive integer, got {shot!r}")
    short = {files.classes[k - 1]: len(v) for k, v in files.class_images.items() if len(v) < 2}
    if short:
        raise ValueError(f"{family}: classes with fewer than 2 images {{class: images}}: {short}; an episode needs a "
                         "query and a different support: check the data root and the lists")


def hsnet_episodes(files, shot, num_episodes=None, seed=0):
    """HSNet's FSS-1000 test episodes (data/fss.py + test.py), exactly: item idx has the query ``pairs[idx]``
    (classes sorted, files sorted); its supports are drawn from NumPy's global state seeded by
    ``fix_randseed(seed)``: ``np.random.choice(range(1, 11), 1, replace=False)[0]`` names ``<n>.jpg`` in the
    query's folder, kept if it is not the query, until ``shot`` are kept (a support may repeat). 0 workers, so
    the items are drawn in order from that one stream; ``num_episodes`` (<= the images) stops early."""
    _check_shot(files, shot, "fss1000")
    n = len(files.pairs) if num_episodes is None else int(num_episodes)
    if n > len(files.pairs):
        raise ValueError(f"episode_sampler released on fss1000 has one episode per image: test_episodes must be "
                         f"at most {len(files.pairs)}, got {n}")
    rng = np.random.RandomState(int(seed))
    index_of = {pair[0]: i for i, pair in enumerate(files.pairs)}
    episodes = []
    for query in range(n):
        image = files.pairs[query][0]
        folder = os.path.dirname(image)
        supports = []
        while True:
            name = os.path.join(folder, str(rng.choice(FSS_IMAGES, 1, replace=False)[0]) + ".jpg")
            if name != image:
                if name not in index_of:
                    raise FileNotFoundError(f"HSNet's sampler drew {name}, which is not listed: FSS-1000 classes "
                                            "hold 1.jpg .. 10.jpg; check the class folder")
                supports.append(index_of[name])
            if len(supports) == shot:
                break
        episodes.append(Episode(query, tuple(supports), files.class_of(query)))
    return episodes


def patnet_episodes(files, shot, num_episodes=PATNET_EPISODES, seed=0):
    """PATNet's Deepglobe / ISIC / Chest X-ray test episodes (data/{deepglobe,isic,lung}.py + test.py), exactly:
    item idx is of class ``idx mod n_classes``; from NumPy's global state seeded by ``fix_randseed(seed)``, the
    query is ``np.random.choice(class list, 1, replace=False)[0]`` (a full permutation per draw: legacy
    ``choice`` without replacement), then supports drawn the same way, kept when they differ from the query,
    until ``shot`` are kept (a support may repeat). 0 workers: items in index order from that one stream."""
    _check_shot(files, shot, "patnet")
    rng = np.random.RandomState(int(seed))
    n_classes = len(files.classes)
    episodes = []
    for idx in range(int(num_episodes)):
        class_id = idx % n_classes + 1
        members = files.class_images[class_id]
        query = members[rng.choice(len(members), 1, replace=False)[0]]
        supports = []
        while True:
            support = members[rng.choice(len(members), 1, replace=False)[0]]
            if support != query:
                supports.append(support)
            if len(supports) == shot:
                break
        episodes.append(Episode(query, tuple(supports), class_id))
    return episodes


def _distinct_supports(members, query, shot, rng, family):
    candidates = [i for i in members if i != query]
    if len(candidates) < shot:
        raise ValueError(f"{family}: a class has {len(candidates) + 1} images; {shot}-shot episodes need {shot + 1} "
                         "(query + distinct supports): lower the shot")
    return tuple(candidates[int(k)] for k in rng.choice(len(candidates), size=shot, replace=False))


def our_episodes(family, files, shot, num_episodes, seed):
    """Our deterministic episodes (one NumPy Generator from ``seed``), K distinct supports: fss1000 one query per
    image in list order (cycling); the others class k mod n, query uniform in the class."""
    _check_shot(files, shot, family)
    rng = np.random.default_rng(int(seed))
    episodes = []
    for k in range(int(num_episodes)):
        if family == "fss1000":
            query = k % len(files.pairs)
            class_id = files.class_of(query)
        else:
            class_id = k % len(files.classes) + 1
            members = files.class_images[class_id]
            query = members[int(rng.integers(len(members)))]
        episodes.append(Episode(query, _distinct_supports(files.class_images[class_id], query, shot, rng, family),
                                class_id))
    return episodes


def make_episodes(family, files, shot, num_episodes, seed, sampler="ours"):
    """The test episodes of a family: ``ours`` or the anchors' exact draw (``released``: HSNet for fss1000,
    PATNet for the others)."""
    check_family(family)
    if sampler == "released":
        if family == "fss1000":
            return hsnet_episodes(files, shot, num_episodes, seed)
        return patnet_episodes(files, shot, num_episodes, seed)
    if sampler != "ours":
        raise ValueError(f"episode_sampler must be one of {SAMPLERS}, got {sampler!r}")
    return our_episodes(family, files, shot, num_episodes, seed)


# ---------------------------------------------------------------- datasets

class _BinaryMaskData(Dataset):
    def __init__(self, files, transform):
        self.files, self.transform = files, transform
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch):
        self._epoch.fill_(int(epoch))

    def load(self, index):
        """(image, mask) of ``pairs[index]``, transformed."""
        image_path, mask_path = self.files.pairs[index]
        image, mask = read_rgb(image_path), read_binary_mask(mask_path)
        return self.transform(image, mask)

    def episode_item(self, ep):
        query_img, query_mask = self.load(ep.query)
        supports = [self.load(i) for i in ep.supports]
        return {"query_img": query_img, "query_mask": query_mask,
                "support_imgs": torch.stack([s[0] for s in supports]),
                "support_masks": torch.stack([s[1] for s in supports]), "class_id": ep.class_id,
                "query_label": query_mask.clone()}   # the metric's label: the resized mask, as the anchors


class BinaryMaskEpisodes(_BinaryMaskData):
    """Precomputed test episodes (``self.episodes``) of a family; the query label is the 400x400 mask."""

    def __init__(self, files, episodes, transform):
        super().__init__(files, transform)
        self.episodes = episodes

    def __len__(self):
        return len(self.episodes)

    def __getitem__(self, index):
        return {**self.episode_item(self.episodes[index]), "episode": index}


class BinaryMaskTrainEpisodes(_BinaryMaskData):
    """Training episodes (FSS-1000's trn classes, as HSNet trains): item ``index`` has the query ``pairs[index]`` and
    K distinct supports of its class from a Generator of (seed, epoch, index); HSNet's transform (no augmentation)."""

    def __init__(self, files, shot, transform, seed):
        super().__init__(files, transform)
        _check_shot(files, shot, "training")
        self.shot, self.seed = shot, seed

    def __len__(self):
        return len(self.files.pairs)

    def __getitem__(self, index):
        rng = item_rng(self.seed, int(self._epoch), index)
        class_id = self.files.class_of(index)
        ep = Episode(index, _distinct_supports(self.files.class_images[class_id], index, self.shot, rng, "training"),
                     class_id)
        item = self.episode_item(ep)
        del item["query_label"]
        return item


# ---------------------------------------------------------------- registry entries (dataset/registry.py)
#
# A binary mask per image and a class per folder is no label map: FSS-1000's 1,000 classes do not fit uint8 label
# maps (255 = ignore), and the anchors use every listed image whatever its mask holds. So these families are read by
# their own datasets (the registry's ``train_dataset`` / ``test_dataset`` hooks) from the lists make_lists writes
# (``image mask`` lines in the anchors' order), the class of a pair told by its path (``pair_class``).

# Deepglobe's six classes in the order of PATNet's folders 1..6: its preprocess.py's labelset applied to OpenCV's BGR
# images of the Deepglobe colour legend (urban 0,255,255 / agriculture 255,255,0 / ... in RGB)
DEEPGLOBE_NAMES = ("agriculture", "urban", "rangeland", "forest", "water", "barren")
LUNG_NAMES = ("lung",)
FSS_HINT = ("put FSS-1000 there (FSS-1000/<class>/<n>.jpg + <n>.png, github.com/HKUSTCV/FSS-1000) and set "
            "classes_file to the folder of HSNet's class lists (data/splits/fss of github.com/juhongm999/hsnet: "
            "trn.txt, val.txt, test.txt)")


def _refuse_fold_options(name, options):
    if options.get("novel_classes") or options.get("num_folds") not in (None, 1):
        raise ValueError(f"{name} has one fixed fold (its test classes): leave num_folds and novel_classes null")


@functools.lru_cache(maxsize=None)
def fss_split_names(split_dir):
    """{trn|val|test: sorted class names} of HSNet's split folder; the three must not share a name."""
    if not split_dir:
        raise ValueError("fss1000 needs classes_file: the folder of HSNet's class lists (its data/splits/fss, with "
                         "trn.txt, val.txt and test.txt); set classes_file=PATH (make_lists: --classes-file PATH)")
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"fss1000: classes_file must be the folder of HSNet's trn.txt, val.txt and test.txt "
                                f"(its data/splits/fss); {split_dir} is not a folder")
    names = {s: read_class_names(os.path.join(split_dir, f"{s}.txt")) for s in FSS_SPLITS}
    shared = set(names["trn"]) & set(names["test"]) | set(names["trn"]) & set(names["val"]) | \
        set(names["val"]) & set(names["test"])
    if shared:
        raise ValueError(f"{split_dir}: class(es) {sorted(shared)[:3]} are in two of trn/val/test; use HSNet's files")
    return names


def _fss_classes(options):
    """HSNet's 1,000 classes: trn, val, test, each sorted; our id = HSNet's class id + 1."""
    names = fss_split_names(options.get("classes_file"))
    return tuple(names["trn"] + names["val"] + names["test"])


def _fss_folds(options, names):
    _refuse_fold_options("fss1000", options)
    split = fss_split_names(options.get("classes_file"))
    first = len(split["trn"]) + len(split["val"]) + 1
    return (tuple(range(first, first + len(split["test"]))),)


def _fixed_names(names):
    return lambda options: names


def _all_novel(name):
    def folds(options, names):
        _refuse_fold_options(name, options)
        return (tuple(range(1, len(names) + 1)),)
    return folds


def _relative(files, data_root):
    return [(os.path.relpath(i, data_root), os.path.relpath(m, data_root))
            for pairs in files.values() for i, m in pairs]


def _image_lists(family):
    """make_lists: {"train": [...], "val": [...]} in the anchors' order. fss1000: train = the trn classes' images,
    val = the test classes'; the cross-domain three are test sets: both lists hold every image."""
    def image_lists(data_root, args):
        options = getattr(args, "options", {})
        if family == "fss1000":
            split = fss_split_names(options.get("classes_file"))
            return {"train": _relative(family_files(family, data_root, class_names=split["trn"]), data_root),
                    "val": _relative(family_files(family, data_root, class_names=split["test"]), data_root)}
        csv = options.get("classes_file") if family == "isic" else None
        pairs = _relative(family_files(family, data_root, class_csv=csv), data_root)
        return {"train": pairs, "val": list(pairs)}
    return image_lists


@functools.lru_cache(maxsize=None)
def _isic_class_of_id(data_root, class_csv):
    files = isic_files(family_root("isic", data_root), class_csv)
    return {_stem(i): int(c) for c, pairs in files.items() for i, _ in pairs}


def pair_class(bench, image_path, mask_path):
    """The 1-based class id (in ``bench.class_names``) of a listed (image, mask) pair, told by its path."""
    name = bench.name
    if name == "fss1000":
        folder = os.path.basename(os.path.dirname(image_path))
        index = _class_index(bench.class_names).get(folder)
    elif name == "deepglobe":
        parts = os.path.normpath(image_path).split(os.sep)
        index = int(parts[-4]) if len(parts) >= 4 and parts[-4] in DEEPGLOBE_CLASSES else None
    elif name == "isic":
        index = _isic_class_of_id(bench.option("data_root"), bench.option("classes_file")).get(_stem(image_path))
    else:
        index = 1
    if index is None:
        raise ValueError(f"{name}: the class of {image_path} cannot be told from its path (not in a class folder of "
                         "the dataset's layout, or not in the class list): rebuild the lists with make_lists")
    return index


@functools.lru_cache(maxsize=None)
def _class_index(class_names):
    return {n: k for k, n in enumerate(class_names, 1)}


def lists_files(bench, pairs, classes):
    """(ClassFiles of the ``classes`` (ids) in ``pairs``' order, [class id of each ClassFiles class],
    [index into pairs of each ClassFiles pair])."""
    wanted, grouped = set(classes), {}
    for index, (image, mask) in enumerate(pairs):
        k = pair_class(bench, image, mask)
        if k in wanted:
            grouped.setdefault(k, []).append((index, (image, mask)))
    ids = [k for k in classes if k in grouped]
    files = ClassFiles.from_files({bench.class_name(k): [p for _, p in grouped[k]] for k in ids})
    return files, ids, [i for k in ids for i, _ in grouped[k]]


def _read_list(cfg, split):
    from .files import read_list
    return read_list(os.path.join(cfg.list_dir, split + ".txt"), cfg.data_root)


def _test_dataset(family):
    def build(cfg, bench, seed, num_episodes, shot):
        files, ids, _ = lists_files(bench, _read_list(cfg, "val"), bench.novel_classes(cfg.fold))
        if not ids:
            raise ValueError(f"{cfg.list_dir}/val.txt has no image of {bench.name}'s test classes: rebuild it with "
                             f"python -m dataset.make_lists {bench.name} --data-root {cfg.data_root}")
        episodes = make_episodes(family, files, shot, num_episodes, seed, cfg.episode_sampler)
        episodes = [Episode(e.query, e.supports, ids[e.class_id - 1]) for e in episodes]
        return BinaryMaskEpisodes(files, episodes, SquareResize(int(cfg.test_size)))
    return build


def _train_dataset(family):
    def build(cfg, bench):
        if family != "fss1000":
            raise ValueError(f"{family} is a test set (PATNet's cross-domain targets): train on PASCAL with "
                             "train_classes: all (config/pascal_all.yaml) and test with config/cdfss_{family}.yaml")
        files, _, _ = lists_files(bench, _read_list(cfg, "train"), bench.train_classes(cfg.fold, cfg.train_classes))
        return BinaryMaskTrainEpisodes(files, int(cfg.shot), SquareResize(int(cfg.train_size)), int(cfg.seed))
    return build


def _mask_reader(path, bench):
    """The registry's label reader for these families: the binary mask (0/1); their datasets read it themselves."""
    return read_binary_mask(path)


def registry_entries():
    """The registry's Family entries of fss1000, deepglobe, isic and lung."""
    from .registry import Family

    hints = {"fss1000": FSS_HINT,
             "deepglobe": "put PATNet's preprocessed Deepglobe tiles there (Deepglobe/<1..6>/test/origin/*.jpg, "
                          "groundtruth/*.png: its data/preprocess.py, or the tiles its README links)",
             "isic": "put ISIC2018 task 1 there (ISIC/ISIC2018_Task1-2_Training_Input/, ISIC2018_Task1_Training_"
                     "GroundTruth/, challenge.isic-archive.com) with the images in class folders 1..3, or set "
                     "classes_file to PATNet's data/isic/class_id.csv",
             "lung": "put the Chest X-ray set there (LungSegmentation/CXR_png/, masks/: kaggle.com/datasets/"
                     "nikhilpandey360/chest-xray-masks-and-labels)"}
    summaries = {"fss1000": "FSS-1000 as HSNet: 1,000 classes (520 trn / 240 val / 240 test), 10 images each",
                 "deepglobe": "Deepglobe (PATNet's tiles): 6 land-cover classes, a cross-domain test set",
                 "isic": "ISIC2018 skin lesions: 3 classes (PATNet's class_id.csv), a cross-domain test set",
                 "lung": "Chest X-ray lungs: 1 class, a cross-domain test set"}
    names = {"fss1000": _fss_classes, "deepglobe": _fixed_names(DEEPGLOBE_NAMES),
             "isic": _fixed_names(ISIC_CSV_NAMES), "lung": _fixed_names(LUNG_NAMES)}
    folds = {"fss1000": _fss_folds, "deepglobe": _all_novel("deepglobe"), "isic": _all_novel("isic"),
             "lung": _all_novel("lung")}
    counts = {"fss1000": {"train": 5200, "val": 2400}}
    return [Family(f, summaries[f], names[f], folds[f], _image_lists(f), _mask_reader, data_hint=hints[f],
                   expected_counts=counts.get(f), train_dataset=_train_dataset(f), test_dataset=_test_dataset(f))
            for f in FAMILIES]
