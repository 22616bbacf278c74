"""Segment your own images from K labelled examples: `predict.py` and the Python entry point `Predictor`.

    python predict.py --run exp/demo/ablation/split0/svf/seed321 --support cat.jpg cat.png --query photos/ --out seg/
    python predict.py --config CFG --weights W --support IMG MASK [--support IMG MASK ...] --query FILE|FOLDER|GLOB ...

    from predict import Predictor
    p = Predictor.from_run("exp/demo/ablation/split0/svf/seed321")    # or Predictor(config, weights)
    result = p.predict("query.jpg", supports=[("cat.jpg", "cat.png")])  # paths, numpy arrays or PIL images
    result.mask, result.prob                                            # (H, W) uint8 0/1, float32 P(foreground)

The model: any checkpoint this codebase writes (every few-shot `arch`, every `finetune` method, merged exports,
converted or original released SVF/BAM/PFENet checkpoints), loaded as test.py loads it
(engine.checkpoint.load_weights), built with shot = K (the number of support pairs) as test.py --shot does. A
checkpoint that stores its config (train.py's, export_merged's) needs no --config; with one, the keys that shape
the model must agree (a difference is one line naming the key and the value to pass).

Preprocessing is the config's test transform (dataset.transforms.TestTransform: long side to test_size, padded
to a square), and the prediction is the logits upsampled back as the metric does
(engine.metric.logits_at_label_resolution), then argmax: exactly what test.py scores. The supports are encoded
once per batch of queries (model/fewshot.py: supports of batch 1 serve every query), so a batch of B queries
gives the masks of B single predictions.

Masks (supports) are read as people have them (`read_mask`): a binary PNG (0/255 or 0/1; with 0/1/255, 255 is
ignored), a label map or palette PNG with `class_id` (indices are class ids, 255 = ignore), an RGB/RGBA mask that
is pure black/white (RGBA: transparent pixels are background). Every bad input is a `BadInput` (a ValueError)
of one line naming the file, raised before anything is written; the command validates every support and every
explicitly named query, and the weights, before it writes its first file, and writes every file atomically.
docs/predict.md has the outputs and the rules.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from dataset.files import atomic_path, atomic_write_png, read_image
from dataset.splits import IGNORE_LABEL
from dataset.transforms import TestTransform

__all__ = ["Predictor", "Prediction", "BadInput", "read_mask", "mask_from_array", "list_queries", "main"]

FIGURE_DIR, MASK_DIR, SUMMARY = "figures", "masks", "summary.csv"
SUMMARY_COLUMNS = ("query", "status", "mask", "figure", "height", "width", "foreground_fraction", "seconds", "note")
FEW_SHOT_ARCHS = ("baseline", "pfenet", "bam")


class BadInput(ValueError):
    """A bad input file or argument: the message is one line naming it and what to do."""


@dataclass
class Prediction:
    """One query's prediction at its original size: ``mask`` (H, W) uint8 in {0, 1} (the argmax test.py scores),
    ``prob`` (H, W) float32, the foreground probability (softmax of the two upsampled logits)."""
    mask: np.ndarray
    prob: np.ndarray

    @property
    def foreground_fraction(self) -> float:
        return float(self.mask.sum()) / self.mask.size


# ---------------------------------------------------------------- masks and images

def read_mask(path, class_id: Optional[int] = None) -> np.ndarray:
    """A support mask file -> uint8 (H, W) in {0, 1, 255} (255 = ignored); see mask_from_array for the rules."""
    from PIL import Image

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BadInput(f"mask file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            mode, array = im.mode, np.array(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadInput(f"cannot read mask {path}: {err}; it must be an image file (PNG) of the mask") from None
    return mask_from_array(array, class_id, path, mode)


def _values(array, limit=12) -> str:
    values = np.unique(array).tolist()
    return str(values[:limit])[:-1] + (f", ... ({len(values)} values)]" if len(values) > limit else "]")


def mask_from_array(array, class_id: Optional[int] = None, name: str = "mask",
                    mode: Optional[str] = None) -> np.ndarray:
    """A mask as people have it -> uint8 (H, W): 1 object, 0 background, 255 ignored.

    - with ``class_id`` N: a label map (one channel: grayscale or palette indices): N -> 1, 255 -> ignored, every
      other value -> 0; a map without any pixel N is an error naming N;
    - without: a binary mask: values {0, 255} (255 = object), {0, 1}, or {0, 1, 255} (1 = object, 255 = ignored,
      the label-map convention); boolean arrays and 1-bit PNGs too;
    - RGB / RGBA (H, W, 3|4): pure black/white only (white = object); RGBA pixels with alpha 0 are background.
    """
    array = np.asarray(array)
    if array.dtype == bool or mode == "1":
        array = array.astype(np.uint8)
        mode = "L"
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] in (2, 3, 4):  # LA, RGB, RGBA
        if class_id is not None:
            raise BadInput(f"mask {name} is a colour image; --class-id needs a label map (one channel: a grayscale "
                           "or palette PNG of class indices); leave --class-id out for a black/white mask")
        colour = array[:, :, :1] if array.shape[2] == 2 else array[:, :, :3]
        alpha = array[:, :, -1] if array.shape[2] in (2, 4) else None
        visible = np.ones(array.shape[:2], bool) if alpha is None else alpha > 0
        grey = colour[:, :, 0]
        top = 255 if colour.dtype == np.uint8 else (65535 if colour.dtype == np.uint16 else 1)
        pure = (colour == grey[:, :, None]).all(-1) & ((grey == 0) | (grey == top))
        if not pure[visible].all():
            rows, cols = np.nonzero(visible & ~pure)
            example = colour[rows[0], cols[0]].tolist()
            raise BadInput(f"mask {name} has colours other than black and white (e.g. {example} "
                           f"at row {rows[0]}, column {cols[0]}); save the object white on black, or pass a label "
                           "map / palette PNG with --class-id N")
        return ((grey == top) & visible).astype(np.uint8)
    if array.ndim != 2:
        raise BadInput(f"mask {name} has shape {tuple(array.shape)}; expected (H, W) (a grayscale, palette or "
                       "black/white image)")
    if not (np.issubdtype(array.dtype, np.integer) or np.array_equal(array, np.round(array))):
        raise BadInput(f"mask {name} holds non-integer values; expected class indices or 0/255")
    if class_id is not None:
        if class_id == IGNORE_LABEL or class_id < 0:
            raise BadInput(f"--class-id {class_id} is not a class: 255 marks ignored pixels in a label map")
        present = array == class_id
        if not present.any():
            raise BadInput(f"mask {name} has no pixel of class {class_id} (its values: {_values(array)}); pass the "
                           "class id of the object in this label map")
        out = np.zeros(array.shape, np.uint8)
        out[present] = 1
        out[array == IGNORE_LABEL] = IGNORE_LABEL
        return out
    values = set(np.unique(array).tolist())
    if values <= {0, 1, IGNORE_LABEL} and 1 in values:
        return array.astype(np.uint8)                         # 1 object, 255 ignored
    if values <= {0, 255} or values <= {0, 65535}:
        return (array > 0).astype(np.uint8)                    # 0/255 (or 16-bit 0/65535): white is the object
    if values <= {0}:
        return array.astype(np.uint8)                          # empty: the caller names it
    objects = sorted(values - {0, IGNORE_LABEL})
    hint = (f"pass --class-id N to pick one class of a label map (its classes: {objects[:12]})" if len(values) <= 24
            else "is it a JPEG or an anti-aliased mask? save it as a PNG of 0 and 255 only")
    raise BadInput(f"mask {name} is not a binary mask (values {_values(array)}); {hint}")


def as_image(image, name: str = "image") -> np.ndarray:
    """A path (read as the datasets are: dataset.files.read_image), a PIL image or an array (H, W, 3|4) RGB(A) /
    (H, W) grey, uint8 or 0..255 float -> float32 RGB (H, W, 3) on 0..255."""
    if isinstance(image, (str, os.PathLike)):
        try:
            return read_image(os.fspath(image))
        except (ValueError, FileNotFoundError) as err:
            raise BadInput(str(err)) from None
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.size == 0:
        raise BadInput(f"{name}: expected an RGB image (H, W, 3), got an array of shape {tuple(array.shape)}")
    return np.ascontiguousarray(array[:, :, :3], dtype=np.float32)


def as_mask(mask, class_id: Optional[int], name: str) -> np.ndarray:
    if isinstance(mask, (str, os.PathLike)):
        return read_mask(mask, class_id)
    if hasattr(mask, "mode") and hasattr(mask, "convert"):  # PIL
        return mask_from_array(np.array(mask), class_id, name, mask.mode)
    return mask_from_array(mask, class_id, name)


def _name(item, fallback: str) -> str:
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else fallback


@dataclass
class SupportSet:
    """K validated supports: originals and image names (for figures) and the model's input tensors (1, K, ...)."""
    images: list
    masks: list
    names: list
    imgs: torch.Tensor
    mask_tensor: torch.Tensor

    @property
    def shot(self) -> int:
        return len(self.images)


# ---------------------------------------------------------------- config and weights

def check_weights_config(saved: dict, cfg, weights: str):
    """The checkpoint's stored config against the config the model is built from: every key that shapes the
    model (model.finetune.state_config_keys, and the dilation rule) must agree, else one line naming them, e.g.
    "weights W: it was trained with arch=pfenet (this config: arch=baseline): pass arch=pfenet". The number of
    supports is checked on its own (``Predictor``: BAM's K-shot reweighting)."""
    from types import SimpleNamespace

    from engine.checkpoint import trained_with
    from model.build import dilation_rule

    config = dict(cfg.to_dict(), shot=saved.get("shot", cfg.shot))
    reason = trained_with(saved, config)
    if not reason and saved.get("dilation_rule") is not None:
        rule = [dilation_rule(SimpleNamespace(arch=v.get("arch"), dilation_rule=v["dilation_rule"]))
                for v in (saved, config)]
        if rule[0] != rule[1]:  # same tensors, another function: a ResNet's 3x3 convs dilated otherwise
            reason = (f"it was trained with dilation_rule={rule[0]} (this config: dilation_rule={rule[1]}): pass "
                      f"dilation_rule={rule[0]}")
    if reason:
        raise BadInput(f"weights {weights}: {reason}, or leave out --config: the weights carry their own config")


def config_from_weights(saved: dict, overrides: Sequence[str] = ()):
    """A Config from the config dict a checkpoint stores (keys this version does not know are dropped)."""
    from common.config import FIELDS, defaults, parse_override

    values = {k: v for k, v in saved.items() if k in FIELDS}
    values.update(dict(parse_override(text) for text in overrides))
    return defaults(**values)


# ---------------------------------------------------------------- the predictor

class Predictor:
    """A few-shot model ready to segment images from K labelled examples (see the module docstring).

    ``Predictor(config, weights)``: config = a YAML path, a Config, or None (the config the checkpoint stores);
    weights = a checkpoint path, or None (the run's best.pth / last.pth per ``checkpoint_select``).
    ``Predictor.from_run(folder)``: a run folder with config.yaml and best.pth / last.pth.
    ``overrides``: key=value words applied to the config (e.g. ``["test_size=641"]``)."""

    def __init__(self, config=None, weights=None, overrides: Sequence[str] = (), device=None):
        from common.config import Config, load_config
        from engine.checkpoint import evaluation_checkpoint, load_checkpoint

        if config is None and weights is None:
            raise BadInput("give a config, weights, or a run folder (Predictor.from_run / --run)")
        if isinstance(config, Config):
            cfg = config.replace(**{k: v for k, v in (_parse(o) for o in overrides)}) if overrides else config
            origin = "the given config"
        elif config is not None:
            cfg, origin = load_config(os.fspath(config), list(overrides)), os.fspath(config)
        else:
            cfg, origin = None, None
        if weights is None:
            weights = evaluation_checkpoint(cfg.exp_dir, cfg.checkpoint_select)
        self.weights = os.fspath(weights)
        try:
            self.checkpoint = load_checkpoint(self.weights, "train a run first, or pass the checkpoint's path",
                                              "weights")
        except (OSError, ValueError) as err:
            raise BadInput(str(err)) from None
        saved = self.checkpoint.get("config") if isinstance(self.checkpoint, dict) else None
        saved = saved if isinstance(saved, dict) else None
        if cfg is None:
            if saved is None:
                raise BadInput(f"weights {self.weights} store no config (a released checkpoint or a bare state "
                               "dict); pass --config CFG (with key=value overrides) describing the model")
            cfg, origin = config_from_weights(saved, overrides), f"the config stored in {self.weights}"
        elif saved is not None:
            check_weights_config(saved, cfg, self.weights)
        if cfg.arch not in FEW_SHOT_ARCHS:
            raise BadInput(f"arch={cfg.arch} (from {origin}) is BAM's stage-1 model (semantic segmentation of the base "
                           f"classes), not a few-shot model; predict needs arch {', '.join(FEW_SHOT_ARCHS)}")
        self.cfg, self.origin, self.saved = cfg, origin, saved
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.transform = TestTransform(cfg.test_size, cfg.test_resize_smaller)
        self._nets = {}

    @classmethod
    def from_run(cls, folder, weights=None, overrides: Sequence[str] = (), device=None) -> "Predictor":
        """The run in ``folder`` (train.py's exp_dir, e.g. exp/demo/ablation/split0/svf/seed321): its config.yaml
        and the checkpoint its ``checkpoint_select`` names (the other one when only that exists)."""
        from common.config import load_config
        from engine.checkpoint import BEST, LAST

        folder = os.fspath(folder)
        config = os.path.join(folder, "config.yaml")
        if not os.path.isfile(config):
            raise BadInput(f"run folder {folder} has no config.yaml (train.py writes one into its exp_dir); pass "
                           "the run's folder, or --config and --weights")
        if weights is None:
            cfg = load_config(config, list(overrides))
            first, second = (BEST, LAST) if cfg.checkpoint_select == "best" else (LAST, BEST)
            found = [os.path.join(folder, n) for n in (first, second) if os.path.isfile(os.path.join(folder, n))]
            if not found:
                raise BadInput(f"run folder {folder} has no {first} or {second}: has its training finished an epoch?")
            weights = found[0]
        return cls(config, weights, overrides, device)

    # --- model
    def net(self, shot: int):
        """The model built with shot=K (as test.py --shot), weights loaded; built once per K."""
        if shot not in self._nets:
            import model as models
            from engine.checkpoint import load_weights_from

            if self.cfg.arch == "bam" and self.saved is not None and int(self.saved.get("shot", shot)) != shot:
                raise BadInput(f"weights {self.weights}: BAM trained with shot={self.saved['shot']} takes exactly "
                               f"{self.saved['shot']} support pair(s) (its K-shot reweighting is learned for that "
                               f"many); got {shot}")
            with warnings.catch_warnings():  # every weight comes from the checkpoint
                warnings.simplefilter("ignore", models.RandomInitWarning)
                net = models.build_model(self.cfg.replace(shot=shot, pretrained=None, base_learner=None))
            try:
                load_weights_from(net, self.checkpoint, self.weights)
            except ValueError as err:
                raise BadInput(str(err)) from None
            self._nets[shot] = net.to(self.device).eval()
        return self._nets[shot]

    # --- inputs
    def supports(self, supports, class_id: Optional[int] = None) -> SupportSet:
        """Read and check K (image, mask) pairs: sizes agree, every mask has an object, also at test_size."""
        if isinstance(supports, SupportSet):
            return supports
        supports = list(supports)
        if not supports:
            raise BadInput("no support: give at least one (image, mask) pair (--support IMG MASK)")
        images, masks, names, imgs, mask_tensors = [], [], [], [], []
        for k, pair in enumerate(supports, 1):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise BadInput(f"support {k}: expected an (image, mask) pair, got {type(pair).__name__}")
            img_name, mask_name = _name(pair[0], f"support {k} image"), _name(pair[1], f"support {k} mask")
            image, mask = as_image(pair[0], img_name), as_mask(pair[1], class_id, mask_name)
            if image.shape[:2] != mask.shape:
                raise BadInput(f"mask {mask_name} is {mask.shape[1]}x{mask.shape[0]} but its image {img_name} is "
                               f"{image.shape[1]}x{image.shape[0]}; a support mask must have its image's size")
            if not (mask == 1).any():
                raise BadInput(f"mask {mask_name} has no object pixel (all background or ignored); a support "
                               "mask must mark the object" + (f" (class {class_id})" if class_id is not None else ""))
            try:
                img, m = self.transform(image, mask)
            except ValueError as err:
                raise BadInput(f"support image {img_name}: {err}") from None
            if not (m == 1).any():
                raise BadInput(f"mask {mask_name}: its object ({int((mask == 1).sum())} px) vanishes when the image "
                               f"is resized to test_size={self.cfg.test_size}; use a larger object or test_size")
            images.append(image), masks.append(mask), names.append(img_name)
            imgs.append(img), mask_tensors.append(m)
        return SupportSet(images, masks, names, torch.stack(imgs)[None], torch.stack(mask_tensors)[None])

    def query_tensor(self, image: np.ndarray, name: str = "query") -> torch.Tensor:
        try:
            return self.transform(image, np.zeros(image.shape[:2], np.uint8))[0]
        except ValueError as err:
            raise BadInput(f"query {name}: {err}") from None

    # --- prediction
    @torch.no_grad()
    def predict_images(self, images: Sequence[np.ndarray], support_set: SupportSet) -> list:
        """Predictions of RGB float images (as_image), one forward pass for all of them (one batch)."""
        from engine.loop import autocast
        from engine.metric import logits_at_label_resolution

        net = self.net(support_set.shot)
        query = torch.stack([self.query_tensor(im) for im in images]).to(self.device)
        with autocast(self.device, bool(self.cfg.amp)):
            logits = net(query, support_set.imgs.to(self.device), support_set.mask_tensor.to(self.device))
        out = []
        for i, image in enumerate(images):
            up = logits_at_label_resolution(logits[i:i + 1], image.shape[:2])
            prob = torch.softmax(up, 1)[0, 1]
            out.append(Prediction(up.argmax(1)[0].to(torch.uint8).cpu().numpy(), prob.cpu().numpy()))
        return out

    def predict(self, query, supports, class_id: Optional[int] = None) -> Prediction:
        """One query (path, array or PIL image) against supports [(image, mask), ...] (or a SupportSet)."""
        return self.predict_images([as_image(query, _name(query, "query"))], self.supports(supports, class_id))[0]

    def predict_batch(self, queries: Sequence, supports, class_id: Optional[int] = None,
                      batch_size: int = 8) -> list:
        """Several queries, ``batch_size`` per forward pass (the supports are encoded once per batch)."""
        support_set = self.supports(supports, class_id)
        images = [as_image(q, _name(q, f"query {i + 1}")) for i, q in enumerate(queries)]
        return [p for i in range(0, len(images), batch_size)
                for p in self.predict_images(images[i:i + batch_size], support_set)]

    def figure(self, query, prediction: Prediction, supports, label: Optional[np.ndarray] = None,
               class_id: Optional[int] = None) -> np.ndarray:
        """test.py --vis's figure (engine/vis.py), BGR: supports with their mask | query with the prediction;
        with ``label`` (a {0, 1, 255} mask of the query), the ground truth panel and the IoU in the title."""
        from engine.metric import episode_iou
        from engine.vis import COLOURS, iou_text, render_row

        query_image = as_image(query, _name(query, "query"))
        support_set = self.supports(supports, class_id)

        items = [(img, m, COLOURS["support"], f"support {k + 1}: {os.path.basename(name)}")
                 for k, (img, m, name) in enumerate(zip(support_set.images, support_set.masks, support_set.names))]
        title = f"prediction: {100 * prediction.foreground_fraction:.1f}% foreground"
        if label is not None:
            items.append((query_image, label, COLOURS["gt"], "ground truth"))
            title = "prediction: " + iou_text(episode_iou(torch.from_numpy(prediction.mask).long(),
                                                           torch.from_numpy(label).long()))
        items.append((query_image, prediction.mask, COLOURS["pred"], title))
        return render_row(items)


def _parse(text):
    from common.config import parse_override
    return parse_override(text)


# ---------------------------------------------------------------- queries

def _is_hidden(path: str) -> bool:
    return os.path.basename(path).startswith(".")


def list_queries(specs: Sequence[str]) -> list:
    """[(path, explicit)] in order: a FILE (explicit: it must be an image), a FOLDER (its files, sorted, not
    recursive, hidden ones left out) or a GLOB (its matches, sorted); files from folders and globs that are not
    images are skipped later with a warning. Duplicates are kept once."""
    found, seen = [], set()

    def add(path, explicit):
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            found.append((path, explicit))

    for spec in specs:
        if os.path.isdir(spec):
            files = sorted(f for f in os.listdir(spec) if not f.startswith(".")
                           and os.path.isfile(os.path.join(spec, f)))
            if not files:
                raise BadInput(f"query folder {spec} holds no file")
            for f in files:
                add(os.path.join(spec, f), False)
        elif os.path.isfile(spec):
            add(spec, True)
        elif glob.has_magic(spec):
            files = sorted(p for p in glob.glob(spec) if os.path.isfile(p) and not _is_hidden(p))
            if not files:
                raise BadInput(f"query pattern {spec!r} matches no file")
            for f in files:
                add(f, False)
        else:
            raise BadInput(f"query {spec} not found (give an image file, a folder or a quoted glob such as "
                           "'dir/*.jpg')")
    return found


def output_names(paths: Sequence[str]) -> list:
    """The file stem of every query; a stem already taken gets _2, _3, ... (in query order)."""
    names, used = [], set()
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0] or "query"
        name, n = stem, 1
        while name in used:
            n += 1
            name = f"{stem}_{n}"
        used.add(name)
        names.append(name)
    return names


# ---------------------------------------------------------------- the command

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="predict.py", description="Segment your own images from K labelled examples (K-shot).",
        epilog="Overrides: key=value or --set key=value (any config key, e.g. test_size=641). Outputs: OUT/masks/"
               "NAME.png (0 background, 255 object unless --fg-value), OUT/figures/NAME.png, OUT/summary.csv. "
               "docs/predict.md")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", help="a run folder holding config.yaml and best.pth / last.pth (train.py's exp_dir)")
    source.add_argument("--config", help="the config describing the model (not needed when the weights store theirs)")
    parser.add_argument("--weights", help="checkpoint (default: the run's best.pth / last.pth)")
    parser.add_argument("--support", nargs=2, action="append", metavar=("IMG", "MASK"), required=True,
                        help="a labelled example: image and mask; repeat for K-shot")
    parser.add_argument("--class-id", type=int, help="the masks are label maps: this class is the object")
    parser.add_argument("--query", nargs="+", action="append", required=True, metavar="FILE|FOLDER|GLOB",
                        help="images to segment: files, folders (not recursive) or quoted globs")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--batch-size", type=int, help="queries per forward pass (default 8 on a GPU, 1 on the CPU)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when there is one)")
    parser.add_argument("--fg-value", type=int, default=255, help="value of object pixels in the masks written "
                        "(default 255; background is 0)")
    parser.add_argument("--no-figures", action="store_true", help="write the masks and the summary only")
    args, rest = parser.parse_known_args(argv)
    if not (args.run or args.config or args.weights):
        parser.error("give --run FOLDER, or --weights W (with --config CFG when W stores no config)")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if not 1 <= args.fg_value <= 255:
        parser.error(f"--fg-value must be in 1..255, got {args.fg_value}")
    from common.config import split_overrides
    return args, split_overrides(rest)


def predictor_from_args(args, overrides) -> Predictor:
    if args.run:
        return Predictor.from_run(args.run, args.weights, overrides, args.device)
    return Predictor(args.config, args.weights, overrides, args.device)


def _write_figure(path: str, figure: np.ndarray):
    import cv2
    with atomic_path(path, suffix=".png") as tmp:
        if not cv2.imwrite(tmp, figure):
            raise OSError(f"cannot write {path}")


def _summary_text(rows) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def check_inputs(args, overrides):
    """Everything that can be checked before the first write: the weights (built with shot = K), every support,
    every explicitly named query, the --out folder. Returns (predictor, support set, [(query, explicit)])."""
    from engine.preflight import check_writable

    predictor = predictor_from_args(args, overrides)
    support_set = predictor.supports([tuple(pair) for pair in args.support], args.class_id)
    queries = list_queries([q for group in args.query for q in group])
    for path, explicit in queries:  # a named file that is not an image is an error, not a skip
        if explicit:
            predictor.query_tensor(as_image(path, path), path)
    try:
        check_writable(args.out, "--out folder", "the command line")
    except PermissionError as err:
        raise BadInput(str(err)) from None
    predictor.net(support_set.shot)  # weights of another shape (BAM's shot) fail here, before any write
    return predictor, support_set, queries


def skipped_row(path: str, reason: str) -> dict:
    return {"query": path, "status": "skipped", "mask": "", "figure": "", "height": "", "width": "",
            "foreground_fraction": "", "seconds": "", "note": reason}


def write_batch(predictor: Predictor, support_set: SupportSet, batch: list, names: dict, args) -> list:
    """Predict a batch [(path, image)], write each mask (and figure) atomically; the summary rows."""
    start = time.perf_counter()
    predictions = predictor.predict_images([image for _, image in batch], support_set)
    seconds = (time.perf_counter() - start) / len(batch)
    rows = []
    for (path, image), pred in zip(batch, predictions):
        mask_path = os.path.join(args.out, MASK_DIR, names[path] + ".png")
        atomic_write_png(mask_path, pred.mask * np.uint8(args.fg_value))
        figure_path = "" if args.no_figures else os.path.join(args.out, FIGURE_DIR, names[path] + ".png")
        if figure_path:
            _write_figure(figure_path, predictor.figure(image, pred, support_set))
        rows.append({"query": path, "status": "ok", "mask": mask_path, "figure": figure_path,
                     "height": image.shape[0], "width": image.shape[1],
                     "foreground_fraction": f"{pred.foreground_fraction:.6f}", "seconds": f"{seconds:.4f}", "note": ""})
    return rows


def main(argv=None) -> list:
    """The command; returns the summary rows (summary.csv, written last)."""
    from tqdm import tqdm

    from common.config import finetune_method
    from dataset.files import atomic_write_text

    args, overrides = parse_args(argv)
    predictor, support_set, queries = check_inputs(args, overrides)
    batch_size = args.batch_size or (8 if predictor.device.type == "cuda" else 1)
    cfg = predictor.cfg
    method = finetune_method(cfg)
    print(f"weights: {predictor.weights} ({cfg.arch}, {cfg.backbone}, finetune {method}); "
          f"{support_set.shot}-shot; {len(queries)} queries; device {predictor.device}; batch {batch_size}; "
          f"test_size {cfg.test_size}", flush=True)
    names = dict(zip([p for p, _ in queries], output_names([p for p, _ in queries])))
    rows, batch = {}, []
    with tqdm(total=len(queries), desc="queries", unit="img", dynamic_ncols=True, disable=None) as bar:
        for i, (path, _) in enumerate(queries):
            try:  # a file of a folder or glob that is not an image (or too small for test_size) is skipped
                image = as_image(path, path)
                predictor.query_tensor(image, path)
                batch.append((path, image))
            except BadInput as err:
                tqdm.write(f"warning: skipped {path}: {err}", file=sys.stderr)
                rows[path] = skipped_row(path, str(err))
                bar.update(1)
            if batch and (len(batch) == batch_size or i == len(queries) - 1):
                rows.update((r["query"], r) for r in write_batch(predictor, support_set, batch, names, args))
                bar.update(len(batch))
                batch = []
    rows = [rows[path] for path, _ in queries]
    summary = os.path.join(args.out, SUMMARY)
    atomic_write_text(summary, _summary_text(rows))
    done = sum(r["status"] == "ok" for r in rows)
    print(f"{done} mask(s) written to {os.path.join(args.out, MASK_DIR)} (0 background, {args.fg_value} object)"
          + (f", {len(rows) - done} file(s) skipped (the summary says why)" if len(rows) > done else "")
          + f"; summary: {summary}")
    return rows


def run(argv=None):
    """main() with every expected failure as one line on stderr and exit status 1."""
    try:
        return main(argv)
    except (ValueError, KeyError, OSError) as exc:
        sys.exit(f"error: {exc}")
