"""The IoU metric (engine/metric.py) on hand-computed cases."""
import math

import pytest
import torch

from engine.metric import (EpisodeIoU, SemanticIoU, intersection_union, logits_at_label_resolution)


def t(rows):
    return torch.tensor(rows, dtype=torch.long)


def test_intersection_union_counts_and_ignores_255():
    pred = t([[1, 1, 0, 0],
              [1, 0, 0, 1]])
    label = t([[1, 0, 0, 255],
               [1, 1, 0, 255]])
    inter, union = intersection_union(pred, label, 2)
    # valid pixels: 6. bg: pred bg {(0,2),(1,1),(1,2)} (+(0,3) ignored), label bg {(0,1),(0,2),(1,2)}
    # I_bg = {(0,2),(1,2)} = 2; U_bg = {(0,1),(0,2),(1,1),(1,2)} = 4
    # fg: pred fg {(0,0),(0,1),(1,0)}, label fg {(0,0),(1,0),(1,1)}: I = 2, U = 4
    assert inter.tolist() == [2, 2]
    assert union.tolist() == [4, 4]


def test_intersection_union_rejects_bad_labels_and_shapes():
    with pytest.raises(ValueError, match="label values"):
        intersection_union(t([[0, 1]]), t([[0, 7]]), 2)
    with pytest.raises(ValueError, match="shape"):
        intersection_union(t([[0, 1]]), t([[0], [1]]), 2)


def test_miou_sums_intersection_and_union_over_episodes_before_dividing():
    metric = EpisodeIoU([1, 2, 3, 4, 5])
    # class 1, episode A: fg I=1, U=1 (IoU 1.0); episode B: fg I=1, U=3 (IoU 1/3)
    metric.update(t([[1, 0, 0, 0]]), t([[1, 0, 0, 0]]), 1)
    metric.update(t([[1, 1, 1, 0]]), t([[1, 0, 0, 0]]), 1)
    # class 3: fg I=0, U=2
    metric.update(t([[1, 0, 0, 0]]), t([[0, 1, 0, 0]]), 3)
    iou = metric.class_iou()
    assert iou[1] == pytest.approx(2 / 4)         # ΣI/ΣU, not (1 + 1/3) / 2
    assert iou[3] == 0.0
    assert math.isnan(iou[2])
    assert metric.missing_classes() == [2, 4, 5]
    assert metric.miou() == pytest.approx((0.5 + 0.0) / 2)
    # FB-IoU over all episodes: bg I = 3 + 1 + 2 = 6, U = 3 + 3 + 4 = 10; fg I = 2, U = 6
    assert metric.fbiou() == pytest.approx((6 / 10 + 2 / 6) / 2)


def test_update_rejects_class_outside_the_fold():
    metric = EpisodeIoU([6, 7, 8, 9, 10])
    with pytest.raises(ValueError, match="episode class 1"):
        metric.update(t([[1]]), t([[1]]), 1)


def test_buffers_summed_over_shards_equal_one_process():
    torch.manual_seed(0)
    episodes = [(torch.randint(0, 2, (5, 7)), torch.randint(0, 2, (5, 7)), c) for c in [1, 2, 3, 4, 5, 1, 3, 2]]
    for pred, label, _ in episodes:
        label[0, 0] = 255
    whole = EpisodeIoU([1, 2, 3, 4, 5])
    shards = [EpisodeIoU([1, 2, 3, 4, 5]) for _ in range(3)]
    for i, (pred, label, c) in enumerate(episodes):
        whole.update(pred, label, c)
        shards[i % 3].update(pred, label, c)
    merged = EpisodeIoU([1, 2, 3, 4, 5])
    merged.load_tensor(sum(s.as_tensor() for s in shards))
    assert torch.equal(merged.intersection, whole.intersection)
    assert torch.equal(merged.union, whole.union)
    assert merged.miou() == whole.miou() and merged.fbiou() == whole.fbiou()


def test_logits_upsampled_to_original_label_top_left():
    # a 2x4 original label shown as a 4x4 padded square (content in the top two rows)
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 1, :2, 2:] = 5.0           # foreground on the right half of the content
    logits[0, 1, 2:, :] = 5.0            # padding rows predicted foreground: must be cropped away
    out = logits_at_label_resolution(logits, (2, 4))
    assert out.shape == (1, 2, 2, 4)
    assert out.argmax(1)[0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    # a 2x2 square of logits for an original 4x8 label: upsampled to 8x8, top 4 rows kept
    small = torch.zeros(1, 2, 2, 2)
    small[0, 1, 0, 1] = 1.0
    out = logits_at_label_resolution(small, (4, 8))
    assert out.shape == (1, 2, 4, 8)


def test_update_from_logits_uses_original_resolution():
    metric = EpisodeIoU([1])
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 1, :2, 2:] = 5.0
    label = t([[0, 0, 1, 1], [0, 255, 1, 0]])
    metric.update_from_logits(logits, label, 1)
    # prediction [[0,0,1,1],[0,0,1,1]]; (1,1) ignored. bg: I = 3, U = 4 ((1,3) is bg in the label only);
    # fg: I = 3, U = 4
    assert metric.intersection[:, 0].tolist() == [3, 3]
    assert metric.union[:, 0].tolist() == [4, 4]


def test_semantic_iou_per_class():
    metric = SemanticIoU(3)
    metric.update(t([[0, 1, 2, 2]]), t([[0, 1, 1, 255]]))
    metric.update(t([[2, 2]]), t([[2, 0]]))
    # class 0: I=1, U=2; class 1: I=1, U=2; class 2: I=1, U=3
    assert metric.class_iou() == pytest.approx([1 / 2, 1 / 2, 1 / 3])
    assert metric.miou() == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3)
