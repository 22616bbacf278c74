"""Transforms keep image and mask aligned pixel for pixel; padding is the mean in the image, 255 in the mask.

The input image's colour encodes its label (large blocks of one label per colour), so after any
random scale / rotation / blur / flip / crop, every pixel away from a block edge must still show
the colour of the label the mask gives it.
"""
import cv2
import numpy as np
import pytest
import torch

from dataset.transforms import (IMAGENET_MEAN, TestTransform, TrainTransform, denormalize,
                                resized_test_shape)

COLOURS = np.array([[20, 200, 40], [230, 30, 30], [30, 30, 230], [240, 240, 20], [200, 20, 220]], np.float32)


def colour_coded_pair(h, w, block, rng):
    """Blocks of random labels 0..4 (no 255) and an image painted with each label's colour."""
    grid = rng.integers(0, len(COLOURS), size=(-(-h // block), -(-w // block))).astype(np.uint8)
    label = np.kron(grid, np.ones((block, block), np.uint8))[:h, :w]
    return COLOURS[label].copy(), np.ascontiguousarray(label)


def uniform_neighbourhood(mask, radius):
    """Pixels whose (2r+1)^2 neighbourhood has a single mask value (away from every edge).

    The outer ``radius`` pixels are left out: their neighbours beyond the crop are unknown.
    """
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    m = mask.astype(np.uint8)
    uniform = cv2.dilate(m, kernel) == cv2.erode(m, kernel)
    uniform[:radius], uniform[-radius:], uniform[:, :radius], uniform[:, -radius:] = False, False, False, False
    return uniform


def check_aligned(image_tensor, mask_tensor, radius, min_checked):
    image, mask = denormalize(image_tensor), mask_tensor.numpy()
    interior = uniform_neighbourhood(mask, radius)
    is_pad = mask == 255
    # every interior pixel shows exactly its label's colour (or the mean where padded)
    expected = np.where(is_pad[..., None], IMAGENET_MEAN, COLOURS[np.where(is_pad, 0, mask)])
    err = np.abs(image - expected).max(-1)
    assert err[interior].max() < 0.5, f"misaligned pixels: {(err[interior] >= 0.5).sum()}"
    assert interior.mean() > min_checked  # the check covered much of the crop
    # and padding is 255 in the mask exactly where the image is the mean colour
    mean_pixels = np.abs(image - IMAGENET_MEAN).max(-1) < 1e-3
    assert (mask[mean_pixels] == 255).all()
    return is_pad


# Each step alone must be exact one pixel from any label edge (bilinear image vs nearest mask),
# the Gaussian blur two pixels (its 5x5 kernel); a 1-pixel offset between image and mask fails.
STEPS = {
    "scale": (dict(rotate_p=0, blur_p=0, flip_p=0), 1),
    "rotate": (dict(scale_min=1, scale_max=1, rotate_p=1, blur_p=0, flip_p=0), 1),
    "blur": (dict(scale_min=1, scale_max=1, rotate_p=0, blur_p=1, flip_p=0), 2),
    "flip": (dict(scale_min=1, scale_max=1, rotate_p=0, blur_p=0, flip_p=1), 1),
    "all": ({}, 4),  # the effects add up: 1 (scale) + 1 (rotate) + 2 (blur)
}


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("size", [48, 120])  # crop smaller than the image / padding needed
def test_train_transform_keeps_mask_aligned(step, size):
    options, radius = STEPS[step]
    transform = TrainTransform(size=size, **{"scale_min": 0.8, "scale_max": 1.25, **options})
    padded = 0
    for seed in range(12):
        image, label = colour_coded_pair(70, 90, block=24 if step == "all" else 16, rng=np.random.default_rng(seed))
        img, mask = transform(image, label, np.random.default_rng(1000 + seed))
        assert img.shape == (3, size, size) and img.dtype == torch.float32
        assert mask.shape == (size, size) and mask.dtype == torch.int64
        padded += bool(check_aligned(img, mask, radius, 0.1 if step == "all" else 0.3).any())
    if size == 120:
        assert padded == 12  # every crop needed padding, and the padding was checked


def test_train_transform_is_reproducible_from_the_generator():
    image, label = colour_coded_pair(60, 60, 10, np.random.default_rng(0))
    t = TrainTransform(size=40)
    a = t(image, label, np.random.default_rng(7))
    b = t(image, label, np.random.default_rng(7))
    c = t(image, label, np.random.default_rng(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_crop_keeps_the_foreground():
    label = np.zeros((200, 200), np.uint8)
    label[150:170, 20:40] = 1  # a small object in a corner of a large image
    image = np.zeros((200, 200, 3), np.float32)
    t = TrainTransform(size=100, scale_min=1.0, scale_max=1.0, rotate_p=0.0)
    for seed in range(10):
        _, mask = t(image, label, np.random.default_rng(seed))
        # >= 85% kept each time; one random crop keeps that much only ~11% of the time
        assert int((mask == 1).sum()) >= 0.85 * 400


def test_test_transform_is_bams():
    # BAM's rule by hand: long side -> S, short side int(short * S / long), both floored to a multiple of 8
    assert resized_test_shape(375, 500, 473) == (352, 472)    # int(354.75) = 354 -> 352; 473 -> 472
    assert resized_test_shape(500, 333, 473) == (472, 312)    # int(315.018) = 315 -> 312
    assert resized_test_shape(480, 640, 641) == (480, 640)    # COCO: int(480.75) = 480; 641 -> 640
    assert resized_test_shape(100, 50, 473) == (472, 232)     # smaller images go up: int(236.5) -> 232
    assert resized_test_shape(100, 50, 473, resize_smaller=False) == (100, 50)   # test_Resize: kept, unrounded
    assert resized_test_shape(600, 50, 473, resize_smaller=False) == (472, 32)   # larger: int(39.41) -> 32
    with pytest.raises(ValueError, match="3x40 image becomes empty at test_size 48"):
        resized_test_shape(3, 40, 48)
    rng = np.random.default_rng(0)
    image, label = colour_coded_pair(60, 30, 12, rng)
    img, mask = TestTransform(48)(image, label)
    assert img.shape == (3, 48, 48) and mask.shape == (48, 48)
    assert (mask[:, 24:] == 255).all() and (mask[:, :24] != 255).all()
    assert np.abs(denormalize(img)[:, 24:]).max() < 1e-3   # zero-padded before normalisation
    check_aligned(img[:, :, :24], mask[:, :24], 1, 0.3)
    expected = cv2.resize(label, (24, 48), interpolation=cv2.INTER_NEAREST)  # BAM's nearest resize
    assert np.array_equal(mask[:, :24].numpy(), expected)
    image, label = colour_coded_pair(35, 45, 12, rng)
    img, mask = TestTransform(48, resize_smaller=False)(image, label)   # fits: content at its own size
    assert np.array_equal(mask[:35, :45].numpy(), label) and (mask[35:] == 255).all() and (mask[:, 45:] == 255).all()
    assert np.allclose(denormalize(img)[:35, :45], image, atol=1e-3)

