"""predict.py / engine.predict.Predictor: your own images segmented from K labelled examples.

- a run trained here (train.py on the tiny synthetic dataset): `predict.py --run` gives, on test episodes, exactly
  the masks test.py scores (same transform, same upsampling, same argmax), from label maps with --class-id;
- a checkpoint of every few-shot arch (random weights, saved as the trainer saves them) at K=1 and K=2: masks at
  the queries' sizes, 0/255, figures, summary, a folder's non-image file skipped and listed; the Python entry
  point equals the command's files exactly; a batch of queries equals one query at a time;
- a merged export (its stored config, no --config) predicts what the model it was merged from predicts;
- masks as people have them (hand-made arrays and files), and every bad input: one line naming the file, a
  non-zero exit, nothing written.
"""
import csv
import os
import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from common.config import dump_config
from conftest import as_bam_release, tiny_cfg
from engine.checkpoint import atomic_save
from engine.predict import BadInput, Predictor, mask_from_array, read_mask, run
from engine.vis import GAP, PANEL, TITLE_HEIGHT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}
QUERY_SIZES = [(30, 50), (44, 37), (64, 64), (21, 80)]  # (H, W): portrait, landscape, square, wide


def predict_cmd(args, ok=True):
    out = subprocess.run([sys.executable, "predict.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=600)
    if ok:
        assert out.returncode == 0, f"predict.py {args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def read_png(path):
    return np.array(Image.open(path))


def read_summary(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def blob_image(h, w, box, seed):
    """A noisy RGB uint8 image with a bright square at box = (top, left, bottom, right)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
    t, l, b, r = box
    img[t:b, l:r] = rng.integers(180, 255, (b - t, r - l, 3), dtype=np.uint8)
    return img


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two supports (images; masks as a 0/255 PNG, and as grayscale and palette label maps of class 7), a query
    folder of four images plus a text file, and the bad inputs."""
    d = tmp_path_factory.mktemp("predict_files")
    (d / "queries").mkdir()
    for i, (h, w) in enumerate(QUERY_SIZES):
        cv2.imwrite(str(d / "queries" / f"q{i}.png"), blob_image(h, w, (h // 4, w // 4, h // 2 + 4, w // 2 + 4), i))
    (d / "queries" / "notes.txt").write_text("not an image\n")
    cv2.imwrite(str(d / "s1.png"), blob_image(45, 37, (10, 5, 30, 20), 10))
    mask = np.zeros((45, 37), np.uint8)
    mask[10:30, 5:20] = 255
    cv2.imwrite(str(d / "s1_mask.png"), mask)
    cv2.imwrite(str(d / "s1_labels.png"), mask // 255 * 7)
    cv2.imwrite(str(d / "s2.png"), blob_image(40, 56, (8, 20, 30, 48), 11))
    label = np.zeros((40, 56), np.uint8)
    label[8:30, 20:48] = 7
    label[0:3] = 3
    label[:, 0] = 255
    palette = Image.fromarray(label, mode="P")
    palette.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    palette.save(str(d / "s2_labels.png"))
    cv2.imwrite(str(d / "empty_mask.png"), np.zeros((45, 37), np.uint8))
    cv2.imwrite(str(d / "small_mask.png"), mask[:40])
    (d / "broken.jpg").write_text("this is text, not a JPEG\n")
    return d


def save_checkpoint(cfg, path, seed=0, perturb=False):
    """A model of `cfg` with random weights saved as train.py saves it (model, config, epoch)."""
    import model as models
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = models.build_model(cfg)
    if perturb:  # adapters start as the identity: move them so that merging matters
        with torch.no_grad():
            for p in net.backbone.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
    atomic_save({"model": net.state_dict(), "config": cfg.to_dict(), "epoch": 3}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict_ckpt")
    return {(arch, shot): save_checkpoint(tiny_cfg(arch=arch, shot=shot, test_size=40), d / f"{arch}_{shot}.pth",
                                          seed=shot)
            for arch in ("baseline", "pfenet", "bam") for shot in (1, 2)}


def supports_of(files, shot):
    if shot == 1:
        return [(files / "s1.png", files / "s1_mask.png")]
    return [(files / "s1.png", files / "s1_labels.png"), (files / "s2.png", files / "s2_labels.png")]


# ---------------------------------------------------------------- masks as people have them

def test_masks_as_people_have_them(tmp_path):
    binary = np.array([[0, 255], [255, 0]], np.uint8)
    assert mask_from_array(binary).tolist() == [[0, 1], [1, 0]]                          # 0/255: white = object
    assert mask_from_array(binary // 255).tolist() == [[0, 1], [1, 0]]                   # 0/1
    assert mask_from_array(np.array([[0, 1], [255, 1]])).tolist() == [[0, 1], [255, 1]]  # 255 ignored beside 1
    assert mask_from_array(np.array([[True, False]])).tolist() == [[1, 0]]
    labels = np.array([[0, 7, 7], [3, 255, 7]], np.uint8)
    assert mask_from_array(labels, class_id=7).tolist() == [[0, 1, 1], [0, 255, 1]]      # label map: N, 255 ignored
    assert mask_from_array(labels, class_id=3).tolist() == [[0, 0, 0], [1, 255, 0]]
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 1:] = 255
    assert mask_from_array(rgb).tolist() == [[0, 1, 1], [0, 0, 0]]                      # pure black/white RGB
    rgba = np.concatenate([rgb, np.full((2, 3, 1), 255, np.uint8)], 2)
    rgba[0, 2, 3] = 0                                                                    # transparent: background
    assert mask_from_array(rgba).tolist() == [[0, 1, 0], [0, 0, 0]]
    # files: a palette PNG's indices are class ids (not its colours); a 1-bit PNG; an RGB PNG
    palette = Image.fromarray(labels, mode="P")
    palette.putpalette([v for i in range(256) for v in (255 - i, i, 0)])
    palette.save(tmp_path / "p.png")
    assert read_mask(tmp_path / "p.png", class_id=7).tolist() == [[0, 1, 1], [0, 255, 1]]
    Image.fromarray(binary > 0).convert("1").save(tmp_path / "bits.png")
    assert read_mask(tmp_path / "bits.png").tolist() == [[0, 1], [1, 0]]
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert read_mask(tmp_path / "rgb.png").tolist() == [[0, 1, 1], [0, 0, 0]]
    # what is refused, each naming the mask
    for array, class_id, message in [
            (labels, 5, "has no pixel of class 5"), (labels, None, "is not a binary mask"),
            (np.arange(200, dtype=np.uint8).reshape(10, 20), None, "save it as a PNG of 0 and 255 only"),
            (np.dstack([rgb, rgb[:, :, :1] // 2])[:, :, 1:], None, "colours other than black and white"),
            (rgb, 1, "colour image; --class-id needs a label map"), (labels, 255, "255 marks ignored pixels")]:
        with pytest.raises(BadInput, match=message) as err:
            mask_from_array(array, class_id, "my_mask.png")
        assert "\n" not in str(err.value) and ("my_mask.png" in str(err.value) or class_id == 255)


# ---------------------------------------------------------------- every arch, K = 1 and 2, command == Python

@pytest.mark.parametrize("arch", ["baseline", "pfenet", "bam"])
@pytest.mark.parametrize("shot", [1, 2])
def test_every_arch_command_equals_python_and_batches(arch, shot, files, checkpoints, tmp_path):
    weights = checkpoints[(arch, shot)]
    pairs = supports_of(files, shot)
    class_id = 7 if shot == 2 else None  # K=1: a 0/255 PNG; K=2: two label maps (grayscale, palette), class 7
    out_dir = tmp_path / "out"
    args = ["--weights", weights, *[w for pair in pairs for w in ("--support", str(pair[0]), str(pair[1]))],
            *(["--class-id", "7"] if class_id else []), "--query", str(files / "queries"), "--out", str(out_dir)]
    out = predict_cmd(args)
    assert f"{shot}-shot" in out.stdout and "1 file(s) skipped" in out.stdout
    assert f"warning: skipped {files / 'queries' / 'notes.txt'}" in out.stderr
    rows = read_summary(out_dir / "summary.csv")
    assert [r["query"] for r in rows] == [str(files / "queries" / n) for n in ("notes.txt", "q0.png", "q1.png",
                                                                              "q2.png", "q3.png")]
    assert rows[0]["status"] == "skipped" and rows[0]["mask"] == "" and "cannot decode" in rows[0]["note"]
    assert sorted(os.listdir(out_dir / "masks")) == ["q0.png", "q1.png", "q2.png", "q3.png"]
    written = []
    for row, (h, w) in zip(rows[1:], QUERY_SIZES):
        mask = read_png(row["mask"])
        assert row["status"] == "ok" and mask.shape == (h, w) and mask.dtype == np.uint8      # the query's size
        assert set(np.unique(mask).tolist()) <= {0, 255}
        assert (int(row["height"]), int(row["width"])) == (h, w)
        assert float(row["foreground_fraction"]) == round(int((mask == 255).sum()) / (h * w), 6)
        figure = cv2.imread(row["figure"])
        assert figure.shape == (TITLE_HEIGHT + PANEL, (shot + 1) * PANEL + shot * GAP, 3)     # K supports | query
        written.append(mask)

    # the Python entry point gives the command's masks exactly, one at a time and in batches
    predictor = Predictor(None, weights)
    queries = [r["query"] for r in rows[1:]]
    single = [predictor.predict(q, supports=pairs, class_id=class_id) for q in queries]
    for batch_size in (4, 3):
        batched = predictor.predict_batch(queries, pairs, class_id=class_id, batch_size=batch_size)
        for a, b in zip(single, batched):
            assert np.array_equal(a.mask, b.mask)
            np.testing.assert_allclose(a.prob, b.prob, rtol=0, atol=1e-5)
    for mask, prediction in zip(written, single):
        assert np.array_equal(mask, prediction.mask * 255)
        sure = np.abs(prediction.prob - 0.5) > 1e-6  # the argmax is the probability above 1/2 (ties aside)
        assert np.array_equal(prediction.mask[sure], (prediction.prob[sure] > 0.5).astype(np.uint8))
    # numpy inputs give what paths give
    image = cv2.imread(queries[1])[:, :, ::-1]
    from_arrays = predictor.predict(image.copy(), supports=[(cv2.imread(str(i))[:, :, ::-1].copy(),
                                                             np.array(Image.open(m))) for i, m in pairs],
                                    class_id=class_id)
    assert np.array_equal(from_arrays.mask, single[1].mask)

    # the command batched (3 per pass, the last batch 1) writes the same files
    batch_dir = tmp_path / "batched"
    predict_cmd(args[:-1] + [str(batch_dir), "--batch-size", "3", "--fg-value", "1", "--no-figures"])
    for name, mask in zip(["q0.png", "q1.png", "q2.png", "q3.png"], written):
        assert np.array_equal(read_png(batch_dir / "masks" / name) * 255, mask)
    assert not (batch_dir / "figures").exists()


# ---------------------------------------------------------------- a run trained here == what test.py scores

@pytest.fixture(scope="module")
def trained_run(tiny_voc, tmp_path_factory):
    data, lists = tiny_voc
    exp = tmp_path_factory.mktemp("predict_run") / "run"
    args = ["--config", "config/demo_split0.yaml", f"data_root={data}", f"list_dir={lists}", "min_class_pixels=16",
            "train_size=32", "test_size=40", "workers=0", "reduce_dim=16", "pretrained=null", "epochs=1",
            "batch_size=4", "val_episodes=4", "test_episodes=4", "test_seeds=[1]", f"exp_dir={exp}"]
    out = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return str(exp)


def test_trained_run_predicts_what_test_py_scores(trained_run, tmp_path):
    import dataset
    import model as models
    from engine.checkpoint import evaluation_checkpoint, load_weights
    from engine.config import load_config
    from engine.distributed import DistInfo
    from engine.loop import evaluate_episodes

    cfg = load_config(os.path.join(trained_run, "config.yaml"))
    assert cfg.checkpoint_select == "last"  # the demo config's rule: --run takes last.pth
    episodes = dataset.build_test_dataset(cfg, 7, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = models.build_model(cfg.replace(pretrained=None, base_learner=None))
    load_weights(net, evaluation_checkpoint(cfg.exp_dir, cfg.checkpoint_select), hint="")
    scored = {}
    evaluate_episodes(net, episodes, dataset.novel_classes(cfg.benchmark, cfg.fold, cfg.coco_split),
                      DistInfo(), on_episode=lambda batch, pred: scored.update({int(batch["episode"][0]): pred}))

    predictor = Predictor.from_run(trained_run)
    assert predictor.weights == os.path.join(trained_run, "last.pth")
    pairs = episodes.lists.pairs
    for index, ep in enumerate(episodes.episodes):
        (query, _), (image, label) = pairs[ep.query], pairs[ep.supports[0]]
        got = predictor.predict(query, supports=[(image, label)], class_id=ep.class_id)
        assert np.array_equal(got.mask, scored[index].numpy().astype(np.uint8)), index

    # the command on the run folder: the same mask, from the episode's label map with --class-id
    ep = episodes.episodes[0]
    (query, _), (image, label) = pairs[ep.query], pairs[ep.supports[0]]
    out = predict_cmd(["--run", trained_run, "--support", image, label, "--class-id", str(ep.class_id),
                       "--query", query, "--out", str(tmp_path / "o")])
    assert "last.pth" in out.stdout
    name = os.path.splitext(os.path.basename(query))[0]
    assert np.array_equal(read_png(tmp_path / "o" / "masks" / f"{name}.png"), scored[0].numpy() * 255)


# ---------------------------------------------------------------- a merged export

def test_merged_export_predicts_what_its_run_predicts(files, tmp_path):
    from tools.export_merged import export_merged
    cfg = tiny_cfg(finetune="lora", lrcc_rank=2, test_size=40)
    trained = save_checkpoint(cfg, tmp_path / "last.pth", seed=4, perturb=True)
    merged = str(tmp_path / "merged.pth")
    assert export_merged(cfg, trained, merged) < 1e-4
    pairs = supports_of(files, 1)
    queries = [str(files / "queries" / f"q{i}.png") for i in range(4)]
    before = Predictor(None, trained).predict_batch(queries, pairs)
    predict_cmd(["--weights", merged, "--support", str(pairs[0][0]), str(pairs[0][1]), "--query",
                 str(files / "queries" / "q*.png"), "--out", str(tmp_path / "o")])
    for q, b in zip(queries, before):
        mask = read_png(tmp_path / "o" / "masks" / os.path.basename(q)) // 255
        sure = np.abs(b.prob - 0.5) > 1e-3  # merging moves logits by < 1e-4: only near-ties may flip
        assert np.array_equal(mask[sure], b.mask[sure]) and sure.mean() > 0.99
    # the run's own config (finetune=lora) with the merged file: the differing key is named
    with pytest.raises(BadInput, match=r"trained with finetune=freeze \(this config: finetune=lora\)"):
        Predictor(cfg, merged)


# ---------------------------------------------------------------- bad input: one line, nothing written

def test_bad_inputs_are_one_line_and_write_nothing(files, checkpoints, tmp_path):
    weights = checkpoints[("baseline", 1)]
    good = ["--support", str(files / "s1.png"), str(files / "s1_mask.png")]
    query = ["--query", str(files / "queries" / "q0.png")]
    config = tmp_path / "baseline.yaml"  # the config of the baseline checkpoints
    config.write_text(dump_config(tiny_cfg(arch="baseline", test_size=40)))
    text = tmp_path / "notes.pth"
    text.write_text("weights: none\n")
    cases = [
        (["--weights", weights, "--support", str(files / "s1.png"), str(files / "empty_mask.png"), *query],
         "empty_mask.png has no object pixel"),
        (["--weights", weights, "--support", str(files / "s1.png"), str(files / "small_mask.png"), *query],
         "small_mask.png is 37x40 but its image"),
        (["--weights", weights, "--support", str(files / "broken.jpg"), str(files / "s1_mask.png"), *query],
         "cannot decode image file " + str(files / "broken.jpg")),
        (["--weights", weights, *good, "--query", str(files / "broken.jpg")], str(files / "broken.jpg")),
        (["--weights", weights, *good, "--query", str(files / "nowhere")], "nowhere not found"),
        (["--weights", weights, "--support", str(files / "s2.png"), str(files / "s2_labels.png"), "--class-id", "9",
          *query], "s2_labels.png has no pixel of class 9"),
        (["--weights", weights, "--support", str(files / "s2.png"), str(files / "s2_labels.png"), *query],
         "s2_labels.png is not a binary mask"),
        (["--config", str(config), "--weights", checkpoints[("pfenet", 1)], *good, *query],
         "it was trained with arch=pfenet (this config: arch=baseline): pass arch=pfenet"),
        (["--weights", checkpoints[("bam", 1)], *good, *good, *query], "BAM trained with shot=1"),
        (["--weights", str(text), *good, *query], "is a text file, not a checkpoint"),
        (["--run", str(files), *good, *query], "has no config.yaml"),
    ]
    for args, message in cases:
        out_dir = tmp_path / "out"
        with pytest.raises(SystemExit) as err:
            run([*args, "--out", str(out_dir)])
        line = str(err.value.code)
        assert line.startswith("error: ") and "\n" not in line and message in line, (args, line)
        assert not out_dir.exists(), args
    # the command itself: exit status 1, the one line on stderr, no traceback
    out = predict_cmd(["--weights", weights, "--support", str(files / "s1.png"), str(files / "empty_mask.png"),
                       *query, "--out", str(tmp_path / "cmd")], ok=False)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"error: mask {files / 'empty_mask.png'} has no object pixel (all background or ignored); a support mask "
        "must mark the object"]
    assert not (tmp_path / "cmd").exists()


# ---------------------------------------------------------------- a released checkpoint (BAM's own key names)



def test_released_checkpoint_with_its_config(files, checkpoints, tmp_path):
    ours = checkpoints[("bam", 1)]
    saved = torch.load(ours, map_location="cpu", weights_only=True)
    released = tmp_path / "train_epoch_3.pth"
    torch.save({"epoch": 3, "state_dict": as_bam_release(saved["model"]), "optimizer": {}}, released)
    config = tmp_path / "bam.yaml"
    config.write_text(dump_config(tiny_cfg(arch="bam", test_size=40)))
    support = ["--support", str(files / "s1.png"), str(files / "s1_mask.png")]
    out = predict_cmd(["--config", str(config), "--weights", str(released), *support,
                       "--query", str(files / "queries" / "q1.png"), "--out", str(tmp_path / "o")])
    assert "BAM's own few-shot checkpoint" in out.stdout
    expected = Predictor(None, ours).predict(files / "queries" / "q1.png", [(files / "s1.png", files / "s1_mask.png")])
    assert np.array_equal(read_png(tmp_path / "o" / "masks" / "q1.png"), expected.mask * 255)
    with pytest.raises(BadInput, match="store no config .* pass --config CFG"):
        Predictor(None, released)


@pytest.mark.parametrize("arch", ["baseline", "pfenet", "bam"])
def test_a_batch_encodes_its_supports_once(arch, checkpoints):
    """One support set for B queries: the backbone sees the B queries and the K supports once (not B x K), and the
    logits are those of the supports repeated for every query."""
    net = Predictor(None, checkpoints[(arch, 2)], device="cpu").net(2)
    g = torch.Generator().manual_seed(0)
    query, supports = torch.randn(3, 3, 40, 40, generator=g), torch.randn(1, 2, 3, 40, 40, generator=g)
    masks = (torch.rand(1, 2, 40, 40, generator=g) > 0.5).long()
    seen = []
    hook = net.backbone.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    with torch.no_grad():
        shared = net(query, supports, masks)
        repeated = net(query, supports.expand(3, -1, -1, -1, -1), masks.expand(3, -1, -1, -1))
    hook.remove()
    assert seen == [3, 2, 3, 6]
    torch.testing.assert_close(shared, repeated, rtol=0, atol=1e-5)
