"""Side by side: our FSS-1000 / cross-domain episodes, transform and metric against HSNet's and PATNet's own code.

    python tools/check_anchors.py --hsnet PATH/hsnet --patnet PATH/PATNet [--data-root DIR] [--shots 1 5]

PATH/hsnet and PATH/PATNet are the user's checkouts of github.com/juhongm999/hsnet and github.com/slei109/PATNet;
their ``data/`` and ``common/`` modules are imported from there (nothing of them is in this repository; they need
torchvision). The data root holds the datasets in their layouts (default: stand-ins written by dataset.standins
in a temporary folder); FSS-1000's class lists are read from ``<data-root>/fss_splits/`` when it exists (the
stand-ins'), else from HSNet's ``data/splits/fss/``. Their loaders run as their test.py runs them
(``fix_randseed(0)``, 0 workers, batch 1, the 400x400 transform), ours as test.py builds it (``python -m
dataset.make_lists <family>``, then the registry's entry, ``episode_sampler: released``, test_size 400), and for
every dataset and shot the script compares, episode by episode: the query and support files, the class, the
transformed images (to 1e-5) and masks (exactly); then mIoU and FB-IoU of the same random predictions through
their Evaluator/AverageMeter (on the CPU: ``.cuda()`` is made a no-op) and through engine.metric.EpisodeIoU.
Exit status 0 when everything matches. Their code needs no GPU here.
"""
import argparse
import contextlib
import os
import sys
import tempfile
import types
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.config import defaults  # noqa: E402
from dataset import build_test_dataset  # noqa: E402
from dataset import crossdomain as cd  # noqa: E402
from dataset.make_lists import main as make_lists  # noqa: E402
from dataset.registry import benchmark_of  # noqa: E402
from dataset.standins import write_all  # noqa: E402
from engine.metric import EpisodeIoU  # noqa: E402

BENCHMARKS = {"fss1000": "fss", "deepglobe": "deepglobe", "isic": "isic", "lung": "lung"}


@contextlib.contextmanager
def anchor_code(repo, workdir):
    """Import ``data`` and ``common`` from ``repo`` (cwd = ``workdir``, where their relative paths are read)."""
    saved_path, saved_cwd, saved_cuda = list(sys.path), os.getcwd(), torch.Tensor.cuda
    purge = [m for m in sys.modules if m == "data" or m.startswith(("data.", "common."))
             or m in ("common", "tensorboardX")]
    kept = {m: sys.modules.pop(m) for m in purge}
    sys.modules["tensorboardX"] = types.SimpleNamespace(SummaryWriter=None)   # their logger imports it
    torch.Tensor.cuda = lambda self, *a, **k: self                           # their AverageMeter calls .cuda()
    # their data/ and common/ have no __init__.py: a regular package of that name anywhere on sys.path (ours:
    # common/) would win over them, so only their folder and the installed packages stay on the path
    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [os.path.abspath(repo)] + [p for p in saved_path if p not in ("", ".", ours)
                                             and os.path.abspath(p) != ours]
    os.chdir(workdir)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        sys.path[:] = saved_path
        torch.Tensor.cuda = saved_cuda
        for m in [m for m in sys.modules if m == "data" or m.startswith(("data.", "common.")) or m == "common"]:
            del sys.modules[m]
        sys.modules.update(kept)


def run_theirs(repo, workdir, family, data_root, shot, num):
    """Their test-time items, in order: [(query, supports, class_id, batch)], and their mIoU/FB-IoU of ``preds``."""
    from importlib import import_module
    with anchor_code(repo, workdir):
        dataset_mod = import_module("data.dataset")
        utils = import_module("common.utils")
        kwargs = {"use_original_imgsize": False} if "use_original_imgsize" in \
            dataset_mod.FSSDataset.initialize.__code__.co_varnames else {}
        dataset_mod.FSSDataset.initialize(img_size=cd.ANCHOR_SIZE, datapath=data_root, **kwargs)
        loader = dataset_mod.FSSDataset.build_dataloader(BENCHMARKS[family], 1, 0, 0, "test", shot)
        if family != "fss1000":
            loader.dataset.num = num
        utils.fix_randseed(0)
        items = []
        for k, batch in enumerate(loader):
            if k == num:
                break
            items.append(batch)
        metric_fn = import_module("common.evaluation").Evaluator
        metric_fn.initialize()
        meter = import_module("common.logger").AverageMeter(loader.dataset)
        offset = min(loader.dataset.class_ids)
        return items, metric_fn, meter, offset


def our_items(family, data_root, split_dir, shot, num, tmp):
    """Our test dataset as test.py builds it: make_lists, then the registry's entry with episode_sampler released."""
    list_dir = os.path.join(tmp, "lists", family)
    if not os.path.isdir(list_dir):
        with contextlib.redirect_stdout(open(os.devnull, "w")), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the stand-ins are not the standard counts
            make_lists([family, "--data-root", data_root, "--list-dir", list_dir, "--classes-file", split_dir]
                       if family == "fss1000" else [family, "--data-root", data_root, "--list-dir", list_dir])
    cfg = defaults(benchmark=family, data_root=data_root, list_dir=list_dir, shot=shot, test_size=cd.ANCHOR_SIZE,
                   classes_file=split_dir if family == "fss1000" else None, episode_sampler="released")
    return benchmark_of(cfg).novel_classes(0), build_test_dataset(cfg, 0, num, shot)


def compare(family, repo, workdir, data_root, split_dir, shot, num, log):
    theirs, evaluator, meter, offset = run_theirs(repo, workdir, family, data_root, shot, num)
    class_ids, ours = our_items(family, data_root, split_dir, shot, len(theirs), workdir)
    files = ours.files
    ok = files_ok = len(theirs) == len(ours)
    ours_metric = EpisodeIoU(class_ids)
    gen = torch.Generator().manual_seed(shot)
    worst_img = 0.0
    for k, batch in enumerate(theirs):
        ep, item = ours.episodes[k], ours[k]
        same_files = (batch["query_name"][0] == files.pairs[ep.query][0 if family != "lung" else 1]
                      and [n[0] for n in batch["support_names"]]
                      == [files.pairs[i][0 if family != "lung" else 1] for i in ep.supports])
        # their ids: the position in the split's sorted classes + a hard-coded offset (FSS-1000 test: 760, the
        # others 0); ours: HSNet's / PATNet's + 1 (on the real split; the stand-ins have fewer trn/val classes)
        same_class = int(batch["class_id"][0]) - offset == class_ids.index(ep.class_id)
        worst_img = max(worst_img, float((batch["query_img"][0] - item["query_img"]).abs().max()),
                        float((batch["support_imgs"][0] - item["support_imgs"]).abs().max()))
        same_masks = (torch.equal(batch["query_mask"][0].long(), item["query_mask"])
                      and torch.equal(batch["support_masks"][0].long(), item["support_masks"]))
        if not (same_files and same_class and same_masks):
            log(f"  episode {k}: files {same_files}, class {same_class}, masks {same_masks}")
            ok = files_ok = False
        pred = torch.randint(0, 2, item["query_mask"].shape, generator=gen)
        inter, union = evaluator.classify_prediction(pred[None].float(), {"query_mask": batch["query_mask"]})
        meter.update(inter, union, batch["class_id"], loss=None)
        ours_metric.update(pred, item["query_label"], ep.class_id)
    # their class ids are hard-coded (FSS-1000 test: 760..999, all 240 in the mean): on stand-ins with fewer classes
    # the mean is taken over the classes that exist, and their I/U buffers are compared column by column
    columns = torch.arange(offset, offset + len(class_ids))
    meter.class_ids_interest = columns
    theirs_iu = torch.cat([meter.intersection_buf[:, columns], meter.union_buf[:, columns]]).double()
    ours_iu = torch.cat([ours_metric.intersection, ours_metric.union]).double()
    # their buffers are float32: a sum above 2**24 pixels (over ~105 episodes of one class at 400x400) is rounded
    exact = torch.equal(theirs_iu, ours_iu)
    same_buffers = "exactly" if exact else ("to float32 rounding" if torch.allclose(theirs_iu, ours_iu, rtol=1e-6)
                                            else "NO")
    ok = ok and same_buffers != "NO"
    their_miou, their_fb = (float(v) / 100 for v in meter.compute_iou())
    tol = 1e-6  # their IoU is divided in float32
    miou_ok = abs(their_miou - ours_metric.miou()) < tol and abs(their_fb - ours_metric.fbiou()) < tol
    ok = ok and worst_img < 1e-5 and miou_ok
    log(f"{os.path.basename(os.path.normpath(repo))}: {family:9s} {shot}-shot: {len(theirs)} episodes; "
        f"files, classes, masks equal: {'yes' if files_ok else 'NO'}; image max |diff| {worst_img:.1e}; "
        f"I/U buffers equal {same_buffers}; mIoU theirs {100 * their_miou:.5f} "
        f"ours {100 * ours_metric.miou():.5f}; FB-IoU theirs {100 * their_fb:.5f} ours {100 * ours_metric.fbiou():.5f}"
        f" -> {'MATCH' if ok else 'DIFFER'}")
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hsnet", required=True, help="a checkout of github.com/juhongm999/hsnet")
    parser.add_argument("--patnet", required=True, help="a checkout of github.com/slei109/PATNet")
    parser.add_argument("--data-root", help="the datasets in their layouts (default: stand-ins in a temporary folder)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--episodes", type=int, default=60, help="episodes per PATNet dataset (theirs: 600)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data_root or write_all(os.path.join(tmp, "data"))
        split_dir = os.path.join(data_root, "fss_splits")
        if not os.path.isdir(split_dir):
            split_dir = os.path.join(args.hsnet, "data", "splits", "fss")
        workdir = os.path.join(tmp, "work")   # their FSS-1000 reads ./data/splits/fss/test.txt
        os.makedirs(os.path.join(workdir, "data", "splits"), exist_ok=True)
        os.symlink(os.path.abspath(split_dir), os.path.join(workdir, "data", "splits", "fss"))
        ok = True
        for shot in args.shots:
            ok &= compare("fss1000", args.hsnet, workdir, data_root, split_dir, shot, None, print)
            for family in ("fss1000", "deepglobe", "isic", "lung"):
                ok &= compare(family, args.patnet, workdir, data_root, split_dir, shot,
                              None if family == "fss1000" else args.episodes, print)
    print("all match" if ok else "some differ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
