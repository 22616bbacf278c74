"""Shared helpers of the model tests (tiny configs, random episodes, a one-thread fixture), and their own test.

One CPU thread: with 2 threads, MKL's SVD on a machine shared with other jobs runs ~20x slower
(resnet18_deep through svf.resolver: 7 s on one thread, 2+ minutes on two under load).
"""
import types

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(**overrides):
    """A flat config for fast models: resnet18_deep, 16-channel heads, PASCAL fold 0, SVF off."""
    values = dict(arch="baseline", backbone="resnet18_deep", pretrained=None, svf=False, svf_lr_mult=0.1,
                  svf_weight_decay=False, backbone_lr_mult=0.1, weight_decay=1e-4, reduce_dim=16,
                  ppm_bins=[1, 2, 3, 6], pyramid_bins=[60, 30, 15, 8], aux_loss_weight=1.0, base_learner=None,
                  num_base_classes=16, shot=1, benchmark="pascal", fold=0, coco_split="interleaved")
    values.update(overrides)
    return types.SimpleNamespace(**values)


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


def test_random_episode_shapes_and_values():
    q, s, sm, qm = random_episode(batch=3, shot=2, size=17)
    assert q.shape == (3, 3, 17, 17) and s.shape == (3, 2, 3, 17, 17)
    assert sm.shape == (3, 2, 17, 17) and qm.shape == (3, 17, 17)
    assert set(qm.unique().tolist()) == {0, 1, 255} and set(sm.unique().tolist()) == {0, 1, 255}
