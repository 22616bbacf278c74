"""What the tests share: fixtures and helpers, found by pytest here (no test module imports another).

- ``single_thread`` (autouse, every module): torch on one CPU thread. With 2 threads, MKL's SVD on a machine
  shared with other jobs runs ~20x slower (resnet18_deep through svf.resolver: 7 s on one thread, 2+ minutes
  on two under load), and one thread keeps timings comparable between machines.
- ``tiny_voc``: one tiny synthetic PASCAL-layout dataset and its lists, for the end-to-end tests.
- ``tiny_cfg(**overrides)``, ``random_episode(...)`` and ``as_bam_release(state)``: plain functions for the model tests
  (``from conftest import random_episode, tiny_cfg``; pytest puts ``tests/`` on ``sys.path`` for
  ``pytest`` and ``python -m pytest`` alike).
"""
import os
import subprocess
import sys

import pytest
import torch

from common.config import defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory):
    """(data_root, list_dir) of 96 train / 40 val synthetic images of 48 px, lists at min_class_pixels=16.
    Tests read them; a test that changes files works on a copy."""
    tmp = tmp_path_factory.mktemp("tiny_voc")
    data, lists = str(tmp / "data"), str(tmp / "lists")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-m", "dataset.synthetic", "--out", data, "--num-train", "96",
                    "--num-val", "40", "--size", "48"], cwd=ROOT, env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "dataset.make_lists", "pascal", "--data-root", data, "--list-dir", lists,
                    "--min-class-pixels", "16", "--workers", "0"], cwd=ROOT, env=env, check=True, capture_output=True)
    return data, lists


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(**overrides):
    """A complete config (the schema's defaults) for fast models: resnet18_deep, 16-channel heads, PASCAL
    fold 0, SVF off, no weights files."""
    values = dict(arch="baseline", backbone="resnet18_deep", pretrained=None, svf=False, svf_lr_mult=0.1,
                  svf_weight_decay=False, backbone_lr_mult=0.1, weight_decay=1e-4, reduce_dim=16,
                  ppm_bins=[1, 2, 3, 6], pyramid_bins=[60, 30, 15, 8], aux_loss_weight=1.0, base_learner=None,
                  num_base_classes=16, shot=1, benchmark="pascal", fold=0, coco_split="interleaved")
    values.update(overrides)
    return defaults(**values)


def random_episode(batch=2, shot=1, size=33, seed=0):
    """(query, supports, support masks, query mask): a bright square is the foreground everywhere, so a
    model can learn it; masks carry some 255 (ignore) pixels."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 3, size, size, generator=g)
    supports = torch.randn(batch, shot, 3, size, size, generator=g)
    query_mask = torch.zeros(batch, size, size, dtype=torch.long)
    support_masks = torch.zeros(batch, shot, size, size, dtype=torch.long)
    a, b = size // 4, size // 4 + size // 2
    query[:, :, a:b, a:b] += 2.0
    supports[:, :, :, a:b, a:b] += 2.0
    query_mask[:, a:b, a:b] = 1
    support_masks[:, :, a:b, a:b] = 1
    query_mask[:, 0, :] = 255
    support_masks[:, :, 0, :] = 255
    return query, supports, support_masks, query_mask


# The released BAM code's state-dict names of our modules (its checkpoint format), for the tests that write one.
_TO_RELEASED = [(r"backbone\.layer0\.conv1\.", "layer0.0."), (r"backbone\.layer0\.bn1\.", "layer0.1."),
                (r"backbone\.layer0\.conv2\.", "layer0.3."), (r"backbone\.layer0\.bn2\.", "layer0.4."),
                (r"backbone\.layer0\.conv3\.", "layer0.6."), (r"backbone\.layer0\.bn3\.", "layer0.7."),
                (r"backbone\.", ""), (r"base_learner\.ppm\.", "learner_base.0."),
                (r"base_learner\.cls\.", "learner_base.1."), (r"meta\.init_merge\.", "init_merge."),
                (r"meta\.aspp\.", "ASPP_meta."), (r"meta\.res1\.", "res1_meta."), (r"meta\.res2\.0\.0\.", "res2_meta.0."),
                (r"meta\.res2\.1\.0\.", "res2_meta.2."), (r"meta\.cls\.", "cls_meta.")]


def as_bam_release(state):
    """A BAM state dict of this project under BAM's own released key names (written out for the tiny backbone):
    what the released code's checkpoint of the same model holds (test_model_released, test_predict)."""
    import re
    out = {}
    for key, value in state.items():
        for pattern, repl in _TO_RELEASED:
            if re.match(pattern, key):
                key = re.sub("^" + pattern, repl, key)
                break
        out["module." + key] = value
    return out
