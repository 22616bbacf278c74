"""The --vis figures (engine/vis.py) of a hand-made episode: file, size, colours where the masks are, and the
IoU in the title equal to the hand-computed one."""
import math
import re

import cv2
import numpy as np
import pytest
import torch

from dataset.transforms import IMAGENET_MEAN, IMAGENET_STD
from engine.metric import episode_iou
from engine.vis import COLOURS, GAP, PANEL, TITLE_HEIGHT, iou_text, make_visualiser, panel_titles

GREY = 200.0  # every image pixel: tinted pixels are 0.5 * GREY + 0.5 * colour, ignored ones 0.5 * GREY + 64


def hand_episode():
    """A 64 x 80 query (label: 30 x 30 square at rows/cols 10..39, row 0 ignored; prediction: 30 x 40 at rows
    20..49, cols 20..59) and one 80 x 80 padded support (mask 20..59, padding rows 64.. ignored), as the loader
    gives them; IoU = 20 * 20 / (900 + 1200 - 400) = 400 / 1700."""
    label = torch.zeros(64, 80, dtype=torch.long)
    label[10:40, 10:40] = 1
    label[0] = 255
    pred = torch.zeros(64, 80, dtype=torch.long)
    pred[20:50, 20:60] = 1
    grey = torch.from_numpy(((GREY - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)).view(3, 1, 1)
    support_mask = torch.zeros(80, 80, dtype=torch.long)
    support_mask[20:60, 20:60] = 1
    support_mask[64:] = 255
    batch = {"query_img": grey.expand(1, 3, 80, 80).clone(), "support_imgs": grey.expand(1, 1, 3, 80, 80).clone(),
             "support_masks": support_mask[None, None], "query_label": label[None],
             "class_id": torch.tensor([1]), "episode": torch.tensor([0])}
    return batch, pred


def test_episode_iou_and_titles_by_hand():
    batch, pred = hand_episode()
    iou = episode_iou(pred, batch["query_label"][0])
    assert iou == 400 / 1700                                       # 255 row ignored: 900 + 1200 - 400
    titles = panel_titles("aeroplane", 2, iou)
    assert titles[:3] == ["support 1: aeroplane", "support 2: aeroplane", "ground truth: aeroplane"]
    printed = float(re.fullmatch(r"prediction: IoU (\d+\.\d)%", titles[3]).group(1))
    assert printed == round(100 * 400 / 1700, 1) == 23.5
    assert iou_text(1.0) == "IoU 100.0%" and iou_text(math.nan) == "IoU n/a"
    assert math.isnan(episode_iou(torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long)))


def test_figure_shows_masks_in_their_colours(tmp_path):
    batch, pred = hand_episode()
    make_visualiser(str(tmp_path), count=1, benchmark="pascal")(batch, pred)
    make_visualiser(str(tmp_path), count=1, benchmark="pascal")(dict(batch, episode=torch.tensor([1])), pred)
    assert [p.name for p in tmp_path.iterdir()] == ["episode_00000.png"]      # only the first `count` episodes
    figure = cv2.imread(str(tmp_path / "episode_00000.png"))[:, :, ::-1].astype(int)  # RGB
    assert PANEL >= 320 and figure.shape == (TITLE_HEIGHT + PANEL, 3 * PANEL + 2 * GAP, 3)

    def pixel(panel_index, row, col, size=80):
        """The figure's pixel at (row, col) of a panel's image whose long side is `size` px."""
        scale = PANEL / size
        return figure[TITLE_HEIGHT + int((row + 0.5) * scale), panel_index * (PANEL + GAP) + int((col + 0.5) * scale)]

    def tinted(colour):
        return 0.5 * GREY + 0.5 * np.array(colour)

    support, gt, prediction = 0, 1, 2
    for panel_index, row, col, expected in [
            (support, 40, 40, tinted(COLOURS["support"])), (support, 10, 10, [GREY] * 3),
            (support, 70, 40, [0.5 * GREY + 64] * 3),                        # padding: ignored, greyed
            (gt, 25, 25, tinted(COLOURS["gt"])), (gt, 55, 70, [GREY] * 3), (gt, 0, 70, [0.5 * GREY + 64] * 3),
            (gt, 45, 50, [GREY] * 3),                                        # predicted, not ground truth
            (prediction, 35, 50, tinted(COLOURS["pred"])), (prediction, 15, 15, [GREY] * 3),
            (prediction, 0, 70, [GREY] * 3)]:                                # the prediction panel shows no 255
        assert np.abs(pixel(panel_index, row, col) - expected).max() <= 2, (panel_index, row, col)
    # the tinted area is the mask's area (scaled; the outline drawn in full colour is the rest)
    pred_box = figure[TITLE_HEIGHT:TITLE_HEIGHT + 64 * PANEL // 80, 2 * (PANEL + GAP):]
    inside = (np.abs(pred_box - tinted(COLOURS["pred"])).max(-1) <= 2).sum()
    outline = (np.abs(pred_box - np.array(COLOURS["pred"])).max(-1) <= 2).sum()
    assert 0.9 * 1200 * (PANEL / 80) ** 2 < inside + outline <= 1.05 * 1200 * (PANEL / 80) ** 2
    # each title is written in its mask's colour
    for panel_index, colour in [(support, "support"), (gt, "gt"), (prediction, "pred")]:
        strip = figure[:TITLE_HEIGHT, panel_index * (PANEL + GAP):panel_index * (PANEL + GAP) + PANEL]
        assert (np.abs(strip - np.array(COLOURS[colour])).max(-1) <= 10).sum() > 20, colour


@pytest.mark.parametrize("bench,name", [("pascal", "aeroplane"), ("coco", "person")])
def test_figure_names_the_class(bench, name, tmp_path, monkeypatch):
    batch, pred = hand_episode()
    seen = {}
    monkeypatch.setattr("engine.vis.panel_titles", lambda *a: seen.setdefault("args", a) and panel_titles(*a))
    make_visualiser(str(tmp_path), count=1, benchmark=bench)(batch, pred)
    assert seen["args"] == (name, 1, 400 / 1700)
