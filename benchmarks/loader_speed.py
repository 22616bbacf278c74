"""Can the data pipeline feed the GPU? Training episodes per second of the real training loader.

    python benchmarks/loader_speed.py --workers 4 8 16 --json loader_speed.json \\
        --against svf_speed.json finetune_speed_5shot.json        # the GPU's step times to compare with
    python benchmarks/loader_speed.py --workers 0 1 --size 65 --image-size 64 --num-train 40 --batches 3   # tiny

What is timed is what train.py runs: ``dataset.build_train_dataset`` of ``config/pascal_split0.yaml`` (JPEG and PNG
decoding, the episode sampler, the training transform at ``train_size``: scale, rotation, blur, flip, crop,
normalisation; 1-shot and 5-shot) through ``engine.distributed.train_loader`` (train.py's DataLoader: batch 8, its workers,
pinned memory on CUDA). The images are written on the spot into a temporary folder in the PASCAL VOC layout by
``dataset.synthetic`` at VOC's size (``--image-size 500``: sides 313..500, JPEG quality 92), with lists built by
``dataset.make_lists`` as for the real data. The sampler cycles through the training images (a few hundred are
enough: a decoded image is not cached, so repeating one costs what a new one does; the files sit in the page
cache, as a dataset read every epoch mostly does).

Per (shot, workers): the time to the first batch (worker start-up, paid once per epoch since train.py makes a new
loader every epoch) and the steady rate: episodes per second between the end of the ``--warmup`` batches and the
last batch. With ``--against``, the GPU's consumption: batch / step time of the SVF model at that shot, read from
``benchmarks/svf_speed.py --json`` (``fss`` model, ``svf_ours+fold``, wall clock) or
``benchmarks/finetune_speed.py --json`` (method ``svf``, float32; its AMP step is printed beside); the ratio
loader/GPU below 1 means the GPU waits.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch
from torch.utils.data import Sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dataset  # noqa: E402
from common.config import load_config  # noqa: E402
from dataset.files import atomic_write_text  # noqa: E402
from dataset.make_lists import main as make_lists  # noqa: E402
from dataset.synthetic import write_dataset  # noqa: E402
from engine.distributed import train_loader  # noqa: E402

CONFIG = os.path.join(ROOT, "config", "pascal_split0.yaml")
VOC_PIXELS = 500 * 375  # config/pascal.yaml's min_class_pixels (2048) is meant for images of about this size


class Cycle(Sampler):
    """``length`` indices: a fixed permutation of the dataset's, repeated."""

    def __init__(self, size, length, seed=0):
        self.order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
        self.length = length

    def __iter__(self):
        return iter([self.order[i % len(self.order)] for i in range(self.length)])

    def __len__(self):
        return self.length


def make_data(root, args):
    """Synthetic VOC-layout images and their lists under ``root``; returns (data_root, list_dir, min_class_pixels)."""
    data, lists = os.path.join(root, "data"), os.path.join(root, "lists")
    t0 = time.perf_counter()
    write_dataset(data, seed=0, num_train=args.num_train, num_val=max(8, args.num_train // 10), size=args.image_size,
                  workers=min(os.cpu_count() or 1, 16) if args.num_train >= 64 else 0)
    # the config's threshold, scaled to these images' area (VOC-sized images: the config's 2048 itself)
    config_pixels = load_config(CONFIG).min_class_pixels
    min_pixels = max(16, round(config_pixels * min(1.0, (args.image_size * args.image_size * 0.75) / VOC_PIXELS)))
    make_lists(["pascal", "--data-root", data, "--list-dir", lists, "--min-class-pixels", str(min_pixels),
                "--workers", "0"])
    print(f"data: {args.num_train} training images (largest side {args.image_size}) in "
          f"{time.perf_counter() - t0:.1f} s; min_class_pixels {min_pixels}", flush=True)
    return data, lists, min_pixels


def time_loader(cfg, args, workers, device):
    """(seconds to the first batch, steady episodes per second, batches) of train.py's loader."""
    train_set = dataset.build_train_dataset(cfg)
    train_set.set_epoch(0)
    batches = args.warmup + args.batches
    sampler = Cycle(len(train_set), batches * args.batch)
    loader = train_loader(train_set, sampler, args.batch, workers, device, torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    first = steady_start = None
    episodes = 0
    for i, batch in enumerate(loader):
        now = time.perf_counter()
        if i == 0:
            first = now - t0
        if i == args.warmup:
            steady_start, episodes = now, 0
        elif i > args.warmup:
            episodes += batch["query_img"].shape[0]
        if i == 0:
            shapes = {k: list(v.shape) for k, v in batch.items() if torch.is_tensor(v)}
    end = time.perf_counter()
    rate = episodes / (end - steady_start) if steady_start is not None and end > steady_start else float("nan")
    return {"first_batch_s": first, "episodes_per_s": rate, "timed_batches": args.batches - 1, "shapes": shapes,
            "training_items": len(train_set)}


def gpu_step_times(paths):
    """{shot: {"step_s", "batch", "source"}} from svf_speed.py (fss svf_ours+fold, wall) or finetune_speed.py (svf)
    JSON files; a missing or failed file is skipped with a note."""
    found = {}
    for path in paths or ():
        try:
            with open(path) as f:
                res = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"--against {path}: skipped ({exc})")
            continue
        a = res.get("args", {})
        if "fss" in res:  # svf_speed.py
            runs = res["fss"].get("wall", {})
            name = next((n for n in ("svf_ours+fold", "svf_ours") if n in runs), None)
            if name:
                found[int(a.get("shot", 1))] = {"step_s": runs[name]["min_s"], "batch": int(a["batch"]),
                                                "source": f"{os.path.basename(path)}: fss {name}"}
        elif "float32" in res.get("methods", {}).get("svf", {}):  # finetune_speed.py
            svf_run = res["methods"]["svf"]
            found[int(a.get("shot", 1))] = {"step_s": svf_run["float32"]["min_s"], "batch": int(a["batch"]),
                                            "source": f"{os.path.basename(path)}: method svf, float32"}
            if "amp" in svf_run:
                found[int(a.get("shot", 1))]["amp_step_s"] = svf_run["amp"]["min_s"]
        else:
            print(f"--against {path}: no SVF step time in it; skipped")
    return found


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--size", type=int, default=473, help="train_size (the training crop side)")
    ap.add_argument("--image-size", type=int, default=500, help="largest side of the generated images (VOC: 500)")
    ap.add_argument("--num-train", type=int, default=240, help="training images generated")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=40, help="batches timed after the warm-up")
    ap.add_argument("--warmup", type=int, default=None, help="batches not timed (default: 2 + the most workers)")
    ap.add_argument("--data", help="an existing folder of dataset.synthetic images (VOC layout) with lists under "
                                   "<data>/lists; default: generated into a temporary folder, deleted after")
    ap.add_argument("--against", nargs="*", help="svf_speed.py / finetune_speed.py JSON files with GPU step times")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="only decides pinned memory, as in train.py")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)
    if args.batches < 2 or args.batch < 1 or min(args.workers) < 0 or min(args.shots) < 1:
        ap.error("--batches >= 2, --batch >= 1, --workers >= 0 and --shots >= 1")
    args.warmup = 2 + max(args.workers) if args.warmup is None else args.warmup
    device = torch.device(args.device)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    tmp = None
    try:
        if args.data:
            data, lists, min_pixels = args.data, os.path.join(args.data, "lists"), None
        else:
            tmp = tempfile.mkdtemp(prefix="loader_speed_")
            data, lists, min_pixels = make_data(tmp, args)
        out = {"args": vars(args), "cpus": cpus, "torch": torch.__version__, "results": {}, "gpu": {}}
        print(f"loader: train_size {args.size}, batch {args.batch}, {cpus} CPUs; warm-up {args.warmup} batches, "
              f"then {args.batches - 1} timed", flush=True)
        for shot in args.shots:
            for workers in args.workers:
                keys = [f"data_root={data}", f"list_dir={lists}", f"shot={shot}", f"workers={workers}",
                        f"train_size={args.size}", "pretrained=null", "base_learner=null"]
                if min_pixels is not None:
                    keys.append(f"min_class_pixels={min_pixels}")
                r = time_loader(load_config(CONFIG, keys), args, workers, device)
                out["results"][f"{shot}shot_w{workers}"] = {"shot": shot, "workers": workers, **r}
                write(out, args.json)  # after every setting: a run stopped by a time limit keeps what it measured
                print(f"{shot}-shot, {workers:>2} workers: {r['episodes_per_s']:8.1f} episodes/s "
                      f"(first batch after {r['first_batch_s']:.2f} s)", flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    compare(out, gpu_step_times(args.against))
    write(out, args.json)
    return out


def write(out, path):
    if path:
        atomic_write_text(path, json.dumps(out, indent=2))


def compare(out, gpu):
    """Each setting's loader/GPU ratio against the GPU's episodes per second at its shot (printed and in ``out``)."""
    out["gpu"] = gpu
    for shot, g in sorted(out["gpu"].items()):
        need = g["batch"] / g["step_s"]
        g["episodes_per_s"] = need
        print(f"\nGPU at {shot}-shot: {need:.1f} episodes/s (batch {g['batch']} / {g['step_s']:.3f} s, {g['source']})")
        if "amp_step_s" in g:
            g["amp_episodes_per_s"] = g["batch"] / g["amp_step_s"]
            print(f"  (with AMP: {g['amp_episodes_per_s']:.1f} episodes/s)")
        for key, r in out["results"].items():
            if r["shot"] == shot:
                r["loader_over_gpu"] = r["episodes_per_s"] / need
                verdict = "keeps up" if r["loader_over_gpu"] >= 1 else f"the GPU waits {1 / r['loader_over_gpu']:.1f}x"
                print(f"  {r['workers']:>2} workers: loader/GPU {r['loader_over_gpu']:.2f} ({verdict})")


if __name__ == "__main__":
    main()
