"""Fold splits of PASCAL-5i and COCO-20i (both COCO conventions): the values the papers use."""
import pytest

from dataset.splits import base_classes, class_name, novel_classes, num_classes


def test_pascal_folds():
    assert novel_classes("pascal", 0) == [1, 2, 3, 4, 5]
    assert novel_classes("pascal", 3) == [16, 17, 18, 19, 20]
    assert base_classes("pascal", 1) == [1, 2, 3, 4, 5] + list(range(11, 21))
    assert num_classes("pascal") == 20


def test_coco_interleaved_is_default():
    assert novel_classes("coco", 0) == list(range(1, 80, 4))
    assert novel_classes("coco", 2)[:3] == [3, 7, 11]
    assert novel_classes("coco", 3)[-1] == 80
    assert novel_classes("coco", 1) == novel_classes("coco", 1, "interleaved")
    assert len(base_classes("coco", 0)) == 60 and num_classes("coco") == 80


def test_coco_consecutive():
    assert novel_classes("coco", 0, "consecutive") == list(range(1, 21))
    assert novel_classes("coco", 3, "consecutive") == list(range(61, 81))
    assert base_classes("coco", 1, "consecutive") == list(range(1, 21)) + list(range(41, 81))


@pytest.mark.parametrize("name,split", [("pascal", "interleaved"), ("coco", "interleaved"),
                                             ("coco", "consecutive")])
def test_folds_partition_the_classes(name, split):
    n = num_classes(name)
    novel = [novel_classes(name, f, split) for f in range(4)]
    assert sorted(c for fold in novel for c in fold) == list(range(1, n + 1))  # each class novel once
    for f in range(4):
        assert sorted(novel[f] + base_classes(name, f, split)) == list(range(1, n + 1))


@pytest.mark.parametrize("fold", [-1, 4, 1.0, True, "0"])
def test_bad_fold(fold):
    with pytest.raises(ValueError, match="fold must be an integer in 0..3"):
        novel_classes("pascal", fold)


def test_bad_benchmark_and_convention():
    with pytest.raises(ValueError, match="unknown benchmark 'voc'"):
        novel_classes("voc", 0)
    with pytest.raises(ValueError, match="unknown coco_split 'random'"):
        base_classes("coco", 0, "random")


def test_class_names():
    for benchmark in ("pascal", "coco"):
        names = [class_name(benchmark, c) for c in range(1, num_classes(benchmark) + 1)]
        assert len(set(names)) == num_classes(benchmark)
    assert [class_name("pascal", c) for c in novel_classes("pascal", 0)] == [
        "aeroplane", "bicycle", "bird", "boat", "bottle"]
    assert (class_name("pascal", 15), class_name("pascal", 20)) == ("person", "tvmonitor")
    assert [class_name("coco", c) for c in (1, 5, 40, 62, 80)] == ["person", "airplane", "bottle", "toilet",
                                                                  "toothbrush"]
    with pytest.raises(ValueError, match=r"1\.\.20 for pascal"):
        class_name("pascal", 0)
    with pytest.raises(ValueError, match="unknown benchmark"):
        class_name("voc", 1)
