"""Synthetic image classification for pretraining the demo's backbone: the demo's stand-in for ImageNet.

The SVF paper tunes a backbone pretrained on ImageNet classification (other images, other categories,
another task) for few-shot segmentation. This generator gives the demo the same relation to its
segmentation data (``dataset.synthetic``): every image shows one object of one of ``NUM_CLASSES`` = 80
categories on the same kind of grey cluttered background, and none of those categories is a segmentation
class:

- hue: 20 hues half-way between the segmentation classes' hues (``(k + 0.5)·18°``, k = 0..19, where the
  segmentation classes sit on ``k·18°``);
- texture: 4 textures the segmentation data never uses (``PRETRAIN_TEXTURES``: rings, grid, waves,
  speckle; the segmentation classes use solid, stripes, checker, dots);
- category = (hue, texture): 20 x 4 = 80 classes.

So a classifier has to learn hue, saturation (object vs background), texture and shape features, as an
ImageNet classifier learns general colour/texture/shape features, without ever seeing a segmentation
class's (hue, texture), a segmentation image, or a mask. Images are drawn from their own random stream
(``STREAM``), so none equals an image of ``dataset.synthetic``.

    images, labels = make_classification_set(num_images=4000, size=64, seed=0)   # uint8 (N,H,W,3), int64 (N,)

Deterministic: image k is drawn from a Generator seeded with (STREAM, seed, k) only.
"""
import numpy as np

from .synthetic import TEXTURES, _background, _hsv_to_rgb, _shape_mask

__all__ = ["PRETRAIN_TEXTURES", "NUM_HUES", "NUM_CLASSES", "STREAM", "pretrain_class_appearance",
           "make_classification_sample", "make_classification_set"]

PRETRAIN_TEXTURES = ("rings", "grid", "waves", "speckle")
NUM_HUES = 20
NUM_CLASSES = NUM_HUES * len(PRETRAIN_TEXTURES)
STREAM = 7_310_001  # first word of every image's seed: a random stream of its own (dataset.synthetic's is (seed, k))

assert not set(PRETRAIN_TEXTURES) & set(TEXTURES)


def pretrain_class_appearance(class_id):
    """(hue in OpenCV units 0..180, texture name) of pretraining class 0..NUM_CLASSES-1."""
    if not 0 <= class_id < NUM_CLASSES:
        raise ValueError(f"pretraining class {class_id} is outside 0..{NUM_CLASSES - 1}")
    hue_index, texture = divmod(class_id, len(PRETRAIN_TEXTURES))
    return (hue_index + 0.5) * 9.0, PRETRAIN_TEXTURES[texture]


def _pretrain_texture(kind, h, w, rng):
    """A 0/1 float pattern (1 = the darker second tone) of one of PRETRAIN_TEXTURES."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(6.0, 9.0)
    if kind == "rings":  # concentric rings around a random centre
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        return (np.mod(np.hypot(yy - cy, xx - cx), period) < period / 2).astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    if kind == "grid":  # thin lines both ways
        return ((np.mod(u, period) < 1.6) | (np.mod(v, period) < 1.6)).astype(np.float32)
    if kind == "waves":  # wavy stripes
        return (np.sin(2 * np.pi * (u + 2.5 * np.sin(2 * np.pi * v / (2.5 * period))) / period) > 0).astype(np.float32)
    if kind == "speckle":  # random specks of random size
        pattern = np.zeros((h, w), np.float32)
        count = int(h * w / (period * period) * 1.5)
        ys, xs = rng.uniform(0, h, count), rng.uniform(0, w, count)
        radii = rng.uniform(0.8, 2.2, count)
        for y, x, r in zip(ys, xs, radii):
            pattern[(yy - y) ** 2 + (xx - x) ** 2 < r * r] = 1.0
        return pattern
    raise ValueError(f"unknown pretraining texture {kind!r}; expected one of {PRETRAIN_TEXTURES}")


def make_classification_sample(rng, size, class_id):
    """One RGB uint8 image (size x size) with one object of pretraining class ``class_id``."""
    hue, kind = pretrain_class_appearance(class_id)
    image = _background(size, size, rng)
    hue = (hue + rng.uniform(-1.5, 1.5)) % 180
    sat, val = rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0)
    light, dark = _hsv_to_rgb(hue, sat, val), _hsv_to_rgb(hue, sat, val * 0.45)
    pattern = _pretrain_texture(kind, size, size, rng)[..., None]
    look = light * (1 - pattern) + dark * pattern
    shape = _shape_mask(size, size, rng).astype(np.float32)[..., None]
    image = image * (1 - shape) + look * shape
    image = image + rng.normal(0, 4, image.shape)
    return image.clip(0, 255).astype(np.uint8)


def make_classification_set(num_images, size=64, seed=0):
    """(images uint8 (N, size, size, 3), labels int64 (N,)): image k has class k mod NUM_CLASSES (balanced)."""
    if num_images < 1 or size < 16:
        raise ValueError(f"need num_images >= 1 and size >= 16, got {num_images} and {size}")
    images = np.empty((num_images, size, size, 3), np.uint8)
    labels = np.arange(num_images, dtype=np.int64) % NUM_CLASSES
    for k in range(num_images):
        images[k] = make_classification_sample(np.random.default_rng([STREAM, seed, k]), size, int(labels[k]))
    return images, labels
