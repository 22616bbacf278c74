"""Training and test transforms of an (image, label) pair, with OpenCV, image and mask kept aligned.

Training (PFENet/BAM recipe), each step drawing from the caller's numpy Generator
so that an episode is reproducible from its seed: random scale (linear for the image, nearest for
the mask: INTER_NEAREST_EXACT, because OpenCV's INTER_NEAREST is offset by half a pixel from
INTER_LINEAR and would shift the mask against the image); rotation within ±rotate_max with p=0.5
(image padded with the ImageNet mean, mask with 255); Gaussian blur 5x5 with p=0.5 (image only);
horizontal flip with p=0.5; crop to size×size
(padding the image with the mean and the mask with 255 when smaller, retrying up to 30 crops to keep
at least 85% of the foreground, else the crop that kept most); ImageNet normalisation on 0..255.

Test (BAM's test transform, the protocol of the published tables): the long side is resized to
``size`` (the short side scaled by the same ratio and truncated), then both sides are rounded down
to a multiple of 8 (``resized_test_shape``); the result sits at the TOP-LEFT of a size×size canvas,
the image padded with zeros before normalisation and the mask with 255 (nearest-neighbour resize
with OpenCV's INTER_NEAREST, as BAM). The released configs resize smaller images up too
(``resized_val: True``); ``resize_smaller=False`` keeps them at their size (BAM's test_Resize).
The evaluation upsamples the logits to L×L (L = the label's long side) and keeps the top-left block of
the original label's size: ``engine.metric.logits_at_label_resolution`` is that rule.
"""
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from .splits import IGNORE_LABEL

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255
_MEAN_BORDER = tuple(float(v) for v in IMAGENET_MEAN)


def to_tensors(image, label):
    """float32 RGB (H, W, 3) 0..255 and uint8 (H, W) -> normalised (3, H, W) float and (H, W) long."""
    image = (image - IMAGENET_MEAN) / IMAGENET_STD
    return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(label)).long())


def denormalize(image):
    """Inverse of the normalisation: (3, H, W) tensor -> float32 RGB (H, W, 3) array on 0..255."""
    return image.permute(1, 2, 0).numpy() * IMAGENET_STD + IMAGENET_MEAN


def foreground(label):
    """Pixels that are neither background (0) nor ignore (255)."""
    return (label != 0) & (label != IGNORE_LABEL)


@dataclass
class TrainTransform:
    """Random training augmentation; ``__call__(image, label, rng)`` -> (3,S,S) float, (S,S) long."""
    size: int
    scale_min: float = 0.9
    scale_max: float = 1.1
    rotate_max: float = 10.0
    rotate_p: float = 0.5
    blur_p: float = 0.5
    blur_kernel: int = 5
    flip_p: float = 0.5
    crop_tries: int = 30
    crop_keep_foreground: float = 0.85

    def __call__(self, image, label, rng, extra=None):
        """``extra``: another label map of the same image (BAM's base-class label) that undergoes exactly the same
        geometric transform; given, the result is (image, label, extra)."""
        labels = [label] if extra is None else [label, extra]
        scale = rng.uniform(self.scale_min, self.scale_max)
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        labels = [cv2.resize(m, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST_EXACT)
                  for m in labels]
        if rng.random() < self.rotate_p:
            angle = rng.uniform(-self.rotate_max, self.rotate_max)
            h, w = labels[0].shape
            matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
            image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=_MEAN_BORDER)
            labels = [cv2.warpAffine(m, matrix, (w, h), flags=cv2.INTER_NEAREST,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=IGNORE_LABEL) for m in labels]
        if rng.random() < self.blur_p:
            image = cv2.GaussianBlur(image, (self.blur_kernel, self.blur_kernel), 0)
        if rng.random() < self.flip_p:
            image, labels = image[:, ::-1], [m[:, ::-1] for m in labels]
        image, labels = self._crop(image, labels, rng)
        if extra is None:
            return to_tensors(image, labels[0])
        image, label = to_tensors(image, labels[0])
        return image, label, torch.from_numpy(np.ascontiguousarray(labels[1])).long()

    def _crop(self, image, labels, rng):
        s = self.size
        h, w = labels[0].shape
        pad_h, pad_w = max(s - h, 0), max(s - w, 0)
        if pad_h or pad_w:  # centred padding, as PFENet
            top, left = pad_h // 2, pad_w // 2
            image = cv2.copyMakeBorder(np.ascontiguousarray(image), top, pad_h - top, left, pad_w - left,
                                       cv2.BORDER_CONSTANT, value=_MEAN_BORDER)
            labels = [cv2.copyMakeBorder(np.ascontiguousarray(m), top, pad_h - top, left, pad_w - left,
                                         cv2.BORDER_CONSTANT, value=IGNORE_LABEL) for m in labels]
            h, w = labels[0].shape
        fg = foreground(labels[0])
        total = int(fg.sum())
        best, best_kept = None, -1
        for _ in range(self.crop_tries):
            y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            kept = int(fg[y:y + s, x:x + s].sum())
            if kept > best_kept:
                best, best_kept = (y, x), kept
            if kept >= self.crop_keep_foreground * total:
                break
        y, x = best
        return image[y:y + s, x:x + s], [m[y:y + s, x:x + s] for m in labels]


@dataclass
class TestTransform:
    """BAM's test transform (``resized_test_shape``), padded to size×size at the top-left; -> (3,S,S), (S,S) long."""
    __test__ = False  # a transform, not a pytest test class
    size: int
    resize_smaller: bool = True

    def __call__(self, image, label):
        h, w = label.shape
        new_h, new_w = resized_test_shape(h, w, self.size, self.resize_smaller)
        if (new_h, new_w) != (h, w):
            image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
            label = cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
        image = cv2.copyMakeBorder(image, 0, self.size - new_h, 0, self.size - new_w, cv2.BORDER_CONSTANT, value=0)
        label = cv2.copyMakeBorder(label, 0, self.size - new_h, 0, self.size - new_w,
                                   cv2.BORDER_CONSTANT, value=IGNORE_LABEL)
        return to_tensors(image, label)


def resized_test_shape(h, w, size, resize_smaller=True):
    """BAM's test size of an h×w image: the long side -> ``size``, the short side -> int(short × size / long),
    both rounded down to a multiple of 8; with ``resize_smaller=False`` an image that already fits
    (long side <= size) keeps its own size, unrounded (BAM's test_Resize)."""
    if not resize_smaller and max(h, w) <= size:
        return h, w
    if h >= w:
        new_h, new_w = size, int(w * (size / h))
    else:
        new_h, new_w = int(h * (size / w)), size
    new_h, new_w = new_h // 8 * 8, new_w // 8 * 8
    if new_h == 0 or new_w == 0:
        raise ValueError(f"a {h}x{w} image becomes empty at test_size {size} (sides are rounded down to a "
                         "multiple of 8): raise test_size")
    return new_h, new_w
