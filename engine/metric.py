"""The segmentation metric: intersection and union counts summed over episodes (the ONLY metric).

Protocol (PFENet / BAM / HSNet; docs/data_and_protocol.md, "Test protocol"):
- logits are upsampled to the ORIGINAL-resolution label, pixels labelled 255 are ignored;
- per novel class, intersection and union are summed over all episodes of that class and
  mIoU = mean over the fold's novel classes of ΣI / ΣU (not a mean of per-episode IoUs);
- FB-IoU = mean of the background IoU and the foreground IoU, each accumulated over all episodes.

`EpisodeIoU` keeps `intersection` and `union` as [2, n_classes] integer buffers (row 0 background,
row 1 foreground; one column per novel class) plus the episode count per class, so that summing the
buffers of several processes (one all-reduce) gives exactly the single-process result.
`SemanticIoU` is the same accumulation for ordinary C-class segmentation (stage-1 validation).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from dataset.splits import IGNORE_LABEL


def logits_at_label_resolution(logits: torch.Tensor, label_hw: Sequence[int]) -> torch.Tensor:
    """Upsample square test logits (B, C, S, S) to an original label of size (H0, W0).

    The test transform resized the image's long side to S and padded it to S x S at the bottom and
    right, so the square maps onto an L x L square (L = max(H0, W0)) whose top-left H0 x W0 block
    is the original image (PFENet's `ori_resize` evaluation, bilinear with align_corners=True).
    """
    h0, w0 = int(label_hw[0]), int(label_hw[1])
    side = max(h0, w0)
    up = F.interpolate(logits.float(), size=(side, side), mode="bilinear", align_corners=True)
    return up[:, :, :h0, :w0]


def intersection_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int):
    """Per-class (intersection, union) pixel counts of one prediction, 255 in `label` ignored.

    pred, label: integer tensors of the same shape; returns two int64 tensors of length num_classes.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
    valid = label != IGNORE_LABEL
    pred, label = pred[valid].long(), label[valid].long()
    if label.numel() and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"label values must be in 0..{num_classes - 1} or {IGNORE_LABEL}, "
                         f"got {sorted(set(label.unique().tolist()))[:10]}")
    inter = torch.bincount(pred[pred == label], minlength=num_classes)[:num_classes]
    area_pred = torch.bincount(pred, minlength=num_classes)[:num_classes]
    area_label = torch.bincount(label, minlength=num_classes)
    return inter, area_pred + area_label - inter


def episode_iou(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Foreground IoU of ONE episode (what a figure shows; mIoU sums I and U over episodes instead):
    pred and label (H0, W0), label in {0, 1, 255}; NaN when neither has a foreground pixel."""
    inter, union = intersection_union(pred, label, 2)
    return float(inter[1]) / float(union[1]) if int(union[1]) > 0 else math.nan


class EpisodeIoU:
    """Few-shot episodes: binary (background / episode class) I and U summed per class."""

    def __init__(self, class_ids: Sequence[int], device="cpu"):
        self.class_ids = [int(c) for c in class_ids]
        self.column = {c: i for i, c in enumerate(self.class_ids)}
        n = len(self.class_ids)
        self.intersection = torch.zeros(2, n, dtype=torch.int64, device=device)
        self.union = torch.zeros(2, n, dtype=torch.int64, device=device)
        self.episodes = torch.zeros(n, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, label: torch.Tensor, class_id: int):
        """Add one episode: pred and label (H0, W0) at the original resolution, label in {0,1,255}."""
        class_id = int(class_id)
        if class_id not in self.column:
            raise ValueError(f"episode class {class_id} is not one of this metric's classes {self.class_ids}")
        col = self.column[class_id]
        inter, union = intersection_union(pred, label, 2)
        self.intersection[:, col] += inter.to(self.intersection.device)
        self.union[:, col] += union.to(self.union.device)
        self.episodes[col] += 1

    def update_from_logits(self, logits: torch.Tensor, label: torch.Tensor, class_id: int):
        """logits (1, 2, S, S) of the padded test image, label (H0, W0): upsample, argmax, add;
        returns the prediction at the label's resolution."""
        pred = logits_at_label_resolution(logits, label.shape[-2:]).argmax(1)[0]
        self.update(pred, label.to(pred.device), class_id)
        return pred

    # --- distributed: one tensor, one all-reduce
    def as_tensor(self) -> torch.Tensor:
        return torch.cat([self.intersection.flatten(), self.union.flatten(), self.episodes])

    def load_tensor(self, flat: torch.Tensor):
        n = len(self.class_ids)
        flat = flat.to(self.intersection.device)
        self.intersection.copy_(flat[:2 * n].view(2, n))
        self.union.copy_(flat[2 * n:4 * n].view(2, n))
        self.episodes.copy_(flat[4 * n:])

    # --- results
    def class_iou(self) -> dict[int, float]:
        """Foreground IoU per class (ΣI/ΣU); NaN for a class with no pixels in any episode."""
        inter, union = self.intersection[1].double(), self.union[1].double()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, math.nan))
        return {c: float(iou[i]) for i, c in enumerate(self.class_ids)}

    def missing_classes(self) -> list[int]:
        """Classes no episode has visited (excluded from mIoU; callers print them)."""
        return [c for i, c in enumerate(self.class_ids) if int(self.episodes[i]) == 0]

    def miou(self) -> float:
        """Mean of ΣI/ΣU over the classes that had episodes (all of them in the standard protocol)."""
        values = [v for c, v in self.class_iou().items() if c not in self.missing_classes() and not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    def fbiou(self) -> float:
        """Mean of background and foreground IoU, each accumulated over all episodes."""
        inter, union = self.intersection.sum(1).double(), self.union.sum(1).double()
        if (union == 0).any():
            return math.nan
        return float((inter / union).mean())


class SemanticIoU:
    """C-class segmentation (stage-1 base learner): per-class I and U summed over images."""

    def __init__(self, num_classes: int, device="cpu"):
        self.num_classes = num_classes
        self.intersection = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.union = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, label: torch.Tensor):
        inter, union = intersection_union(pred, label, self.num_classes)
        self.intersection += inter.to(self.intersection.device)
        self.union += union.to(self.union.device)

    def as_tensor(self) -> torch.Tensor:
        return torch.cat([self.intersection, self.union])

    def load_tensor(self, flat: torch.Tensor):
        flat = flat.to(self.intersection.device)
        self.intersection.copy_(flat[:self.num_classes])
        self.union.copy_(flat[self.num_classes:])

    def class_iou(self) -> list[float]:
        return [float(i) / float(u) if u > 0 else math.nan
                for i, u in zip(self.intersection.tolist(), self.union.tolist())]

    def miou(self) -> float:
        values = [v for v in self.class_iou() if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan
