"""Engine pieces: LR schedules and optimiser groups, atomic checkpoints, seeds, sharding, the resumable
sampler, and the summary table."""
import json
import os

import pytest
import torch

from engine.checkpoint import atomic_save, load_checkpoint, load_model_weights
from engine.distributed import DistInfo, derive_seed
from engine.optim import build_sgd, scheduled_lr, set_lr


def test_lr_schedule_values_by_hand():
    for step in (0, 1, 37, 99, 100):
        assert scheduled_lr("constant", 0.01, step, 100) == 0.01
    assert scheduled_lr("poly", 0.01, 0, 100, 0.9) == 0.01
    assert scheduled_lr("poly", 0.01, 50, 100, 0.9) == pytest.approx(0.01 * 0.5 ** 0.9)   # 0.0053589
    assert scheduled_lr("poly", 0.01, 75, 100, 0.9) == pytest.approx(0.0028717458874925875)  # 0.01 * 0.25 ** 0.9
    assert scheduled_lr("poly", 0.01, 100, 100, 0.9) == 0.0
    assert scheduled_lr("cosine", 0.01, 0, 100) == 0.01
    assert scheduled_lr("cosine", 0.01, 25, 100) == pytest.approx(0.01 * (0.5 + 0.5 * 0.7071067811865476))
    assert scheduled_lr("cosine", 0.01, 50, 100) == pytest.approx(0.005)
    assert scheduled_lr("cosine", 0.01, 100, 100) == pytest.approx(0.0, abs=1e-18)
    with pytest.raises(ValueError, match="total_steps"):
        scheduled_lr("poly", 0.01, 0, 0, 0.9)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        scheduled_lr("step", 0.01, 0, 100)


def test_sgd_groups_use_explicit_multipliers_only():
    heads, s, frozen = torch.nn.Linear(2, 2), torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(1))
    frozen.requires_grad_(False)
    groups = [{"name": "heads", "params": list(heads.parameters()), "lr_mult": 1.0, "weight_decay": 1e-4},
              {"name": "singular_values", "params": [s], "lr_mult": 0.1, "weight_decay": 0.0},
              {"name": "frozen", "params": [frozen], "lr_mult": 1.0}]
    opt = build_sgd(groups, base_lr=0.02, momentum=0.9, weight_decay=1e-4)
    assert [g["name"] for g in opt.param_groups] == ["heads", "singular_values"]   # frozen group dropped
    assert [g["lr"] for g in opt.param_groups] == [0.02, pytest.approx(0.002)]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.05]
    with pytest.raises(KeyError, match="lr_mult"):
        build_sgd([{"params": [s]}], 0.1, 0.9, 1e-4)


def test_atomic_save_never_leaves_a_half_written_file(tmp_path):
    path = str(tmp_path / "last.pth")
    atomic_save({"epoch": 1, "w": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"epoch": 2, "bad": Unpicklable()}, path)
    assert os.listdir(tmp_path) == ["last.pth"]                 # no temp file left behind
    assert load_checkpoint(path)["epoch"] == 1                  # the previous checkpoint is intact
    with pytest.raises(FileNotFoundError, match="train it"):
        load_checkpoint(str(tmp_path / "best.pth"), hint="train it first")


def test_load_model_weights_is_strict(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(2, 3))
    path = str(tmp_path / "w.pth")
    atomic_save({"model": {"module.0.weight": torch.zeros(3, 2), "module.0.bias": torch.zeros(3)}}, path)
    load_model_weights(net, path)                               # DDP prefix removed
    assert torch.count_nonzero(net[0].weight) == 0
    atomic_save({"model": {"0.weight": torch.zeros(3, 2), "0.extra": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match=r"missing keys \['0.bias'\].*unexpected keys \['0.extra'\]"):
        load_model_weights(net, path)
    atomic_save({"model": {"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(3)}}, path)
    with pytest.raises(ValueError, match=r"1 of another shape \['0.weight: file \(2, 2\) vs model \(3, 2\)'\]"):
        load_model_weights(net, path)


def test_stage1_checkpoint_as_pretrained(tmp_path):
    """`pretrained` naming the stage-1 checkpoint (the demo's setup) is recognised in one place, by path."""
    import types

    from engine.config import stage1_checkpoint_missing
    from engine.preflight import pretrained_is_stage1_checkpoint
    stage1 = str(tmp_path / "stage1" / "best.pth")
    cfg = types.SimpleNamespace(arch="pfenet", base_learner=stage1,
                                pretrained=str(tmp_path / "stage1" / ".." / "stage1" / "best.pth"))
    assert pretrained_is_stage1_checkpoint(cfg) and stage1_checkpoint_missing(cfg) == stage1
    cfg.pretrained = str(tmp_path / "resnet50_v2.pth")
    assert not pretrained_is_stage1_checkpoint(cfg) and stage1_checkpoint_missing(cfg) is None
    cfg.arch = "bam"                                            # BAM needs it whatever `pretrained` is
    assert stage1_checkpoint_missing(cfg) == stage1
    os.makedirs(os.path.dirname(stage1))
    open(stage1, "wb").close()
    assert stage1_checkpoint_missing(cfg) is None              # there already


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(321, 0, 0) == derive_seed(321, 0, 0)
    assert len({derive_seed(321, e, r) for e in range(10) for r in range(4)}) == 40
    assert 0 <= derive_seed(1, 2, 3) < 2 ** 31


class _HandEpisodes(torch.utils.data.Dataset):
    """Test-episode items as dataset.build_test_dataset gives them: a 16 x 16 padded query, one support, and
    the original 12 x 16 label with some 255; random but fixed per index."""
    classes = [1, 2, 3, 4, 5]

    def __len__(self):
        return 11

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(index)
        label = (torch.rand(12, 16, generator=g) < 0.4).long()
        label[0] = 255
        return {"query_img": torch.randn(3, 16, 16, generator=g),
                "support_imgs": torch.randn(1, 3, 16, 16, generator=g), "support_masks": torch.ones(1, 16, 16, dtype=torch.long), "query_label": label,
                "class_id": self.classes[index % 5], "episode": index}


class _QueryOnly(torch.nn.Module):
    """A fixed random 1x1 conv of the query: (B, 2, S, S) logits, supports ignored."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, query, support_imgs, support_masks):
        return self.conv(query)


def test_shards_reassemble_to_the_one_process_result():
    """engine.loop.evaluate_episodes on rank r of W evaluates episodes r, r + W, ... (no process group: the
    all-reduce is left out, and done here by summing the buffers as it would): the shards are disjoint, together
    hold every episode once with the same prediction, and the summed buffers equal the one-process metric."""
    from engine.loop import evaluate_episodes
    from engine.metric import EpisodeIoU

    data, net = _HandEpisodes(), _QueryOnly()

    def run(rank, world):
        seen = {}
        metric = evaluate_episodes(net, data, data.classes, DistInfo(rank=rank, world_size=world),
                                   on_episode=lambda batch, pred: seen.setdefault(int(batch["episode"][0]), pred))
        return metric, seen

    whole, whole_preds = run(0, 1)
    assert list(whole_preds) == list(range(11)) and whole.episodes.tolist() == [3, 2, 2, 2, 2]
    assert 0.1 < whole.miou() < 0.9                                  # a metric that sharding could get wrong
    for world in (2, 3, 4):
        shards = [run(rank, world) for rank in range(world)]
        for rank, (_, preds) in enumerate(shards):
            assert list(preds) == list(range(rank, 11, world))
        assert sorted(i for _, preds in shards for i in preds) == list(range(11))
        for _, preds in shards:
            assert all(torch.equal(p, whole_preds[i]) for i, p in preds.items())
        merged = EpisodeIoU(data.classes)
        merged.load_tensor(sum(metric.as_tensor() for metric, _ in shards))
        assert torch.equal(merged.as_tensor(), whole.as_tensor())
        assert (merged.miou(), merged.fbiou(), merged.class_iou()) == (whole.miou(), whole.fbiou(), whole.class_iou())
        assert all(not torch.equal(metric.as_tensor(), whole.as_tensor()) for metric, _ in shards)  # each is a part


def test_epoch_sampler_skip_continues_the_same_order():
    from engine.distributed import EpochSampler
    data = list(range(23))
    for rank in range(2):
        sampler = EpochSampler(data, DistInfo(rank=rank, world_size=2), seed=5, batch_per_rank=3)
        sampler.set_epoch(4)
        full = list(sampler)
        sampler.set_epoch(4, skip_batches=2)
        assert list(sampler) == full[6:]
        assert sampler.batches_per_epoch() == 11 // 3
        sampler.set_epoch(5)
        assert list(sampler) != full                            # reshuffled every epoch


def test_summarize_table(tmp_path):
    from tools.summarize import build_table, find_results, render
    for fold, miou in enumerate([0.6, 0.7, 0.5, 0.4]):
        r = {"benchmark": "pascal", "arch": "baseline", "backbone": "resnet50", "svf": True, "fold": fold,
             "shot": 1, "trained_shot": 1, "miou": miou}
        (tmp_path / f"f{fold}").mkdir()
        (tmp_path / f"f{fold}" / "test_1shot.json").write_text(json.dumps(r))
    (tmp_path / "f0" / "test_5shot.json").write_text(json.dumps(dict(r, fold=0, shot=5, trained_shot=5, miou=0.8)))
    table = build_table(find_results(str(tmp_path)))
    assert table["pascal"]["baseline+SVF resnet50"][1] == {0: 0.6, 1: 0.7, 2: 0.5, 3: 0.4}
    text = render(table)
    assert "60.00" in text and "55.00" in text and "80.00*1" in text


def test_summarize_rows_untrained_frozen_and_svf(tmp_path):
    from tools.summarize import build_table, find_results, render
    base = {"benchmark": "pascal", "arch": "baseline", "backbone": "resnet18_deep", "fold": 0, "shot": 1}
    runs = {"untrained": dict(base, svf=True, untrained=True, miou=0.1),
            "frozen": dict(base, svf=False, miou=0.4), "svf": dict(base, svf=True, miou=0.5)}
    for name, r in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "test_1shot.json").write_text(json.dumps(r))
    table = build_table(find_results(str(tmp_path)))
    rows = {m: shots[1][0] for m, shots in table["pascal"].items()}
    assert rows == {"baseline resnet18_deep untrained": 0.1, "baseline resnet18_deep frozen backbone": 0.4,
                    "baseline+SVF resnet18_deep": 0.5}
    lines = render(table).splitlines()[2:]  # untrained, frozen, SVF, in this order
    assert [line.split()[-10] for line in lines if line] == ["10.00", "40.00", "50.00"]
