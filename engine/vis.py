"""Figures of test episodes (`test.py --vis N`), made to be read at a glance, with OpenCV only.

One PNG per episode, one row of panels, each image scaled to PANEL px on its long side under a title strip:

    support 1 .. K            | query + ground truth      | query + prediction
    (its mask tinted blue)    | (tinted green)            | (tinted magenta)
    "support 1: aeroplane"    | "ground truth: aeroplane" | "prediction: IoU 71.3%"

A mask is tinted (half image, half colour) and outlined in its colour; pixels labelled 255 (ignored by the
metric) are greyed. Each title is written in its mask's colour. The IoU is the foreground IoU of this one
episode, at the label's original resolution with 255 ignored (`engine.metric.episode_iou`); the class name
comes from the benchmark (`dataset.registry`).
"""
from __future__ import annotations

import math
import os

import cv2
import numpy as np

from dataset.splits import IGNORE_LABEL

PANEL = 360          # long side of every image panel, px
TITLE_HEIGHT = 34    # the strip above each panel
GAP = 6              # between panels
BACKGROUND = (32, 32, 32)
COLOURS = {"support": (0, 120, 255), "gt": (0, 210, 0), "pred": (255, 0, 255)}  # RGB
IGNORE_GREY = 128


def iou_text(iou: float) -> str:
    """'IoU 71.3%' (one decimal, as a percentage), 'IoU n/a' for an episode without foreground anywhere."""
    return "IoU n/a" if math.isnan(iou) else f"IoU {100 * iou:.1f}%"


def panel_titles(class_name: str, shot: int, iou: float) -> list[str]:
    """Titles of the panels, left to right: the supports, the ground truth, the prediction."""
    return ([f"support {k + 1}: {class_name}" for k in range(shot)]
            + [f"ground truth: {class_name}", f"prediction: {iou_text(iou)}"])


def tint(rgb: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    """uint8 RGB with mask == 1 tinted and outlined in `colour` and mask == 255 greyed, at rgb's size."""
    out = rgb.astype(np.float32)
    fg, ignore = mask == 1, mask == IGNORE_LABEL
    out[fg] = 0.5 * out[fg] + 0.5 * np.asarray(colour, np.float32)
    out[ignore] = 0.5 * out[ignore] + 0.5 * IGNORE_GREY
    out = np.clip(out, 0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(fg.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), 2)
    return out


def scaled(rgb: np.ndarray, mask: np.ndarray):
    """Image and mask resized so that the long side is PANEL px (mask by nearest neighbour)."""
    h, w = mask.shape
    size = (max(1, round(w * PANEL / max(h, w))), max(1, round(h * PANEL / max(h, w))))
    return (cv2.resize(np.clip(rgb, 0, 255).astype(np.uint8), size, interpolation=cv2.INTER_LINEAR),
            cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST))


def panel(rgb: np.ndarray, mask: np.ndarray, colour, title: str) -> np.ndarray:
    """One (TITLE_HEIGHT + PANEL) x PANEL RGB panel: the title in `colour`, the tinted image at the top left."""
    img, m = scaled(rgb, mask)
    out = np.full((TITLE_HEIGHT + PANEL, PANEL, 3), BACKGROUND, np.uint8)
    out[TITLE_HEIGHT:TITLE_HEIGHT + img.shape[0], :img.shape[1]] = tint(img, m, colour)
    scale = 0.6
    while scale > 0.3 and cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > PANEL - 12:
        scale -= 0.05  # long COCO names: shrink the text rather than cut it
    cv2.putText(out, title, (6, TITLE_HEIGHT - 11), cv2.FONT_HERSHEY_SIMPLEX, scale, tuple(int(c) for c in colour),
                1, cv2.LINE_AA)
    return out


def render_episode(supports, query: np.ndarray, label: np.ndarray, pred: np.ndarray, class_name: str,
                   iou: float) -> np.ndarray:
    """The figure as a BGR uint8 array (cv2.imwrite's order). supports: [(RGB (H, W, 3), mask (H, W))];
    query RGB (H0, W0, 3) with its label and the prediction (H0, W0) in {0, 1} (label also 255)."""
    titles = panel_titles(class_name, len(supports), iou)
    return render_row([(img, m, COLOURS["support"], t) for (img, m), t in zip(supports, titles)]
                      + [(query, label, COLOURS["gt"], titles[-2]), (query, pred, COLOURS["pred"], titles[-1])])


def render_row(items) -> np.ndarray:
    """One row of panels as a BGR uint8 array: items [(RGB (H, W, 3), mask (H, W) in {0, 1, 255}, colour, title)],
    left to right (render_episode's figure; predict.py's, without the ground truth panel when it has none)."""
    panels = [panel(img, m, colour, title) for img, m, colour, title in items]
    gap = np.full((TITLE_HEIGHT + PANEL, GAP, 3), BACKGROUND, np.uint8)
    row = [p for pair in zip(panels, [gap] * len(panels)) for p in pair][:-1]
    return cv2.cvtColor(np.concatenate(row, axis=1), cv2.COLOR_RGB2BGR)


def make_visualiser(vis_dir: str, count: int, benchmark, resize_smaller: bool = True):
    """on_episode(batch, pred) callback of engine.loop.evaluate_episodes writing the figures of the first
    `count` episodes (by episode index) to vis_dir/episode_{index:05d}.png. `benchmark`: a
    dataset.registry.Benchmark (or a family name) that names the classes."""
    from dataset.registry import as_benchmark
    from dataset.transforms import denormalize, resized_test_shape
    from engine.metric import episode_iou

    bench = as_benchmark(benchmark)
    os.makedirs(vis_dir, exist_ok=True)

    def on_episode(batch, pred):
        index = int(batch["episode"][0])
        if index >= count:
            return
        label = batch["query_label"][0]
        h0, w0 = label.shape
        square = denormalize(batch["query_img"][0])
        hs, ws = resized_test_shape(h0, w0, square.shape[0], resize_smaller)  # top-left content of the square
        query = cv2.resize(square[:hs, :ws], (w0, h0), interpolation=cv2.INTER_LINEAR)
        supports = [(denormalize(img), m.numpy())
                    for img, m in zip(batch["support_imgs"][0], batch["support_masks"][0])]
        figure = render_episode(supports, query, label.numpy(), pred.numpy(),
                                bench.class_name(int(batch["class_id"][0])), episode_iou(pred, label))
        path = os.path.join(vis_dir, f"episode_{index:05d}.png")
        if not cv2.imwrite(path, figure):
            raise OSError(f"could not write {path}")

    return on_episode
