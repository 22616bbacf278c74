"""Pretrain the demo's backbone on synthetic image classification: the demo's stand-in for ImageNet.

    python tools/pretrain_demo_backbone.py                      # writes exp/demo/pretrain/resnet18_deep_half_synthcls.pth
    python tools/pretrain_demo_backbone.py --out FILE --epochs 4 --num-images 2000

Its output with the defaults ships with the repository (``weights/resnet18_deep_half_synthcls.pth``, 11 MB): the
demo's configs read that file, as few-shot configs read downloaded ImageNet weights, so the demo does not spend
five minutes writing it again. Running the tool with its defaults re-makes it (``PRETRAIN=1 sh demo.sh``) and
says whether this machine wrote the same tensors as the shipped file.

As ImageNet weights relate to PASCAL-5i, the backbone learns another task (80-way classification) on other
images and other categories than the few-shot data: ``dataset.synthetic_cls`` (hues half-way between the
segmentation classes' hues, 4 textures the segmentation data never uses, 1 object per image, no masks).
It trains undilated (layer3/layer4 strided, output stride 32, like an ImageNet classifier) with a global
average pool and a linear classifier, BatchNorm in training mode; the few-shot models then load the same
weights into their dilated backbone (same tensors, as ImageNet weights), and the classifier is dropped.

The file is a checkpoint dict ``{"model": {"backbone.*": ..., "classifier.*": ...}, "pretrain": settings,
"heldout_accuracy": ...}`` that ``pretrained=FILE`` loads (only ``backbone.*`` is read). It is cached: with the
file present and written with the same settings the command only says so (``--force`` retrains); with other
settings it stops with an error instead of overwriting.

Float rounding decides which backbone comes out: 1,000 steps of training from scratch turn a rounding difference
into another backbone (as different as another seed). As everybody downloads the same ImageNet weights, every
machine should write the same file, so the two things that change the rounding are fixed:

- the thread count: it always computes on ``--threads`` threads (default 2), whatever OMP_NUM_THREADS says;
- the CPU's kernels (``--numerics pinned``, the default): oneDNN, MKL and ATen pick vectorised kernels by the CPU's
  instruction set (SSE4 / AVX2 / AVX-512), and their float32 results differ. The pretraining computes with oneDNN
  and NNPACK off (convolutions go through ATen's im2col + MKL sgemm), ATen's kernels at their baseline x86-64 build
  (``ATEN_CPU_CAPABILITY=default``) and MKL on its SSE2 branch for every Intel and compatible CPU
  (``MKL_CBWR=COMPATIBLE``, conditional numerical reproducibility; ``MKL_DYNAMIC=OMP_DYNAMIC=FALSE``). Those
  variables act only when torch starts, so ``pretrain()`` runs this tool again in a fresh process with them set
  (``SVF_DEMO_PRETRAIN_PINNED=1`` marks that process, which checks that the pin took effect); its output is ours.
  It computes channels-last (NHWC), where ATen's convolution is about 1.5x faster than on NCHW; the file holds
  plain tensors either way.
  Tested (tests/test_ablate.py): on two emulated CPUs — this one's native kernels, and ATen at baseline, oneDNN
  capped at SSE4.1, MKL on its SSE4.2 branch — the pinned pretraining writes bit-identical tensors, the unpinned
  one other tensors after two steps. It costs about twice the time of a step on 2 threads (measured under load;
  docs/demo.md).
  ``--numerics native`` trains in this process with this CPU's fastest kernels: the same file only on a CPU with
  the same kernels. The cached file records which (``numerics`` in its settings), so a file written one way is
  never reused as the other.

The few-shot runs after it may use any thread count and any CPU (they move a run by tenths of a point, not by a
pretraining draw; docs/demo.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dataset.synthetic_cls import NUM_CLASSES, make_classification_set  # noqa: E402
from engine.checkpoint import atomic_save, torch_load  # noqa: E402
from model.backbones import build_backbone  # noqa: E402

DEFAULT_OUT = "exp/demo/pretrain/resnet18_deep_half_synthcls.pth"
# The file this tool writes with its defaults, shipped with the repository (weights/README.md): the demo's
# "download", so that every machine starts from the same backbone and the demo does not pay for the pretraining.
SHIPPED = "weights/resnet18_deep_half_synthcls.pth"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the few-shot data's normalisation (ImageNet's)


def undilate(backbone: nn.Module) -> nn.Module:
    """Turn a dilated ResNet (layer3/4: stride 1, dilation 2/4) into the plain stride-32 network with the same
    tensors: the first block of layer3 and layer4 strides by 2 (its 3x3 conv and its downsample), every 3x3 conv
    has dilation 1. In place; returns ``backbone``."""
    for stage in ("layer3", "layer4"):
        for index, block in enumerate(getattr(backbone, stage)):
            for conv in (m for m in block.modules() if isinstance(m, nn.Conv2d)):
                if conv.kernel_size == (3, 3):
                    conv.dilation, conv.padding = (1, 1), (1, 1)
                    if index == 0 and conv is first_3x3(block):
                        conv.stride = (2, 2)
                elif index == 0 and conv.kernel_size == (1, 1) and block.downsample is not None \
                        and conv is block.downsample[0]:
                    conv.stride = (2, 2)
    backbone.output_stride = 32
    return backbone


def first_3x3(block: nn.Module) -> nn.Conv2d:
    """The 3x3 conv of a residual block that carries its stride (BasicBlock: conv1, Bottleneck: conv2)."""
    return next(m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))


class Classifier(nn.Module):
    """backbone (undilated) -> global average pool of layer4 -> linear."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.channels["layer4"], num_classes)

    def forward(self, x):
        return self.classifier(self.backbone(x)[-1].mean((2, 3)))


def to_tensor(images) -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB -> normalised float (N, 3, H, W)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 1/8 of the side (reflect padding), per image."""
    n, _, h, w = x.shape
    pad = h // 8
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 200) -> float:
    net.eval()
    correct = sum(int((net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


# The numerical pin (module doc): kernels no CPU feature can change. The environment part must be set before torch
# is imported, so a pinned pretraining runs in a fresh process started with it; the in-process part is set there.
PIN_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE"}
PIN_MARK = "SVF_DEMO_PRETRAIN_PINNED"  # set (to "1") only in the environment of the process pretrain() starts
NUMERICS = {"pinned": "pinned: ATEN_CPU_CAPABILITY=default, MKL_CBWR=COMPATIBLE, MKL_DYNAMIC=OMP_DYNAMIC=FALSE, "
                      "oneDNN off, NNPACK off, channels-last",
            "native": "native: this CPU's kernels (oneDNN, NNPACK, ATen and MKL at the CPU's instruction set)"}


def settings_of(args) -> dict:
    return {"threads": args.threads, "numerics": NUMERICS[args.numerics], "backbone": args.backbone,
            "num_images": args.num_images, "size": args.size, "epochs": args.epochs, "batch_size": args.batch_size,
            "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed, "num_classes": NUM_CLASSES,
            "generator": "dataset.synthetic_cls"}


def pretrain(args) -> dict:
    settings = settings_of(args)
    if os.path.exists(args.out) and not args.force:
        saved = torch_load(args.out, "pretrained backbone").get("pretrain")
        if saved == settings:
            print(f"pretrained backbone: {args.out} exists with these settings; reused (--force retrains)")
            return saved
        differ = sorted(k for k in set(settings) | set(saved or {}) if (saved or {}).get(k) != settings.get(k))
        raise FileExistsError(f"{args.out} was written with other settings ({json.dumps(saved)}; they differ in "
                              f"{', '.join(differ)}); delete it, pass --force, or choose another --out")
    if args.numerics == "pinned" and os.environ.get(PIN_MARK) != "1":
        run_pinned(args)  # a fresh process: the environment part of the pin only acts before torch is imported
        return settings
    previous, previous_nnpack = torch.get_num_threads(), torch._C._get_nnpack_enabled()
    previous_mkldnn = torch.backends.mkldnn.enabled
    torch.set_num_threads(args.threads)  # the rounding, hence the backbone, depends on it (module doc)
    try:
        if args.numerics == "pinned":
            check_pinned_process()
            torch.backends.mkldnn.enabled = False  # convolutions: ATen's im2col + MKL sgemm (pinned by MKL_CBWR)
            torch.backends.nnpack.set_flags(False)  # NNPACK picks its own kernels and blocking by CPU
        train_and_save(args, settings)
    finally:
        torch.set_num_threads(previous)
        torch.backends.mkldnn.enabled = previous_mkldnn
        torch.backends.nnpack.set_flags(previous_nnpack)
    return settings


def pinned_environment(threads: int) -> dict:
    """The environment of the pinned pretraining process: this one's, with the pin's variables (overriding any the
    caller set, e.g. another MKL_CBWR branch) and OMP_NUM_THREADS = the fixed thread count."""
    return {**os.environ, **PIN_ENV, "OMP_NUM_THREADS": str(threads), PIN_MARK: "1"}


def run_pinned(args):
    """Run this tool with ``args`` in a fresh process in the pinned environment; its output goes to ours."""
    argv = [sys.executable, os.path.abspath(__file__), "--numerics", "pinned"]
    for name, value in vars(args).items():
        if name == "numerics" or value is False:
            continue
        argv += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    sys.stdout.flush()
    done = subprocess.run(argv, env=pinned_environment(args.threads))
    if done.returncode != 0:
        raise RuntimeError(f"the pinned pretraining process failed (exit status {done.returncode}); its output is "
                           f"above. `--numerics native` trains in this process instead (module doc)")


def check_pinned_process():
    """In the pinned process: the environment took effect (torch was imported after it was set)."""
    wrong = {k: os.environ.get(k) for k, v in PIN_ENV.items() if os.environ.get(k) != v}
    capability = torch.backends.cpu.get_cpu_capability()
    if wrong or capability != "DEFAULT":
        raise RuntimeError(f"{PIN_MARK}=1 but the process is not pinned (environment {wrong}, ATen CPU capability "
                           f"{capability}): {PIN_MARK} is for the process pretrain() starts, not to be set by hand")


def train_and_save(args, settings: dict):
    start = time.time()
    torch.manual_seed(args.seed)
    images, labels = make_classification_set(args.num_images, args.size, args.seed)
    held_images, held_labels = make_classification_set(args.heldout_images, args.size, args.seed + 1)
    x, y = to_tensor(images), torch.from_numpy(labels)
    held_x, held_y = to_tensor(held_images), torch.from_numpy(held_labels)
    print(f"pretraining {args.backbone} on {args.num_images} synthetic images ({NUM_CLASSES} classes, none of them "
          f"a segmentation class), {args.size} px, {args.epochs} epochs (data made in {time.time() - start:.1f} s)")

    net = Classifier(undilate(build_backbone(args.backbone, "every_block")), NUM_CLASSES)
    # pinned: channels-last, where ATen's own convolution is ~1.5x faster than on NCHW (module doc)
    layout = torch.channels_last if args.numerics == "pinned" else torch.contiguous_format
    net = net.to(memory_format=layout)
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = args.num_images // args.batch_size
    total, warmup = args.epochs * steps_per_epoch, max(1, steps_per_epoch // 2)
    gen = torch.Generator().manual_seed(args.seed)
    step = 0
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(args.num_images, generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            for group in optimizer.param_groups:  # linear warm-up over half an epoch, then cosine decay
                warm = min(1.0, (step + 1) / warmup)
                group["lr"] = args.lr * warm * 0.5 * (1 + math.cos(math.pi * step / total))
            logits = net(augment(x[idx], gen).contiguous(memory_format=layout))
            loss = F.cross_entropy(logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            correct += int((logits.argmax(1) == y[idx]).sum())
            step += 1
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss_sum / steps_per_epoch:.3f} train accuracy "
              f"{100 * correct / (steps_per_epoch * args.batch_size):.1f}% ({time.time() - start:.0f} s)", flush=True)
    heldout = accuracy(net, held_x.contiguous(memory_format=layout), held_y)
    net = net.to(memory_format=torch.contiguous_format)  # the file holds plain (NCHW) tensors either way
    print(f"held-out accuracy {100 * heldout:.1f}% on {args.heldout_images} new images (chance "
          f"{100 / NUM_CLASSES:.1f}%)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_save({"model": net.state_dict(), "pretrain": settings, "heldout_accuracy": heldout}, args.out)
    print(f"wrote {args.out} in {time.time() - start:.0f} s on {args.threads} threads, numerics {args.numerics}; the "
          f"few-shot configs read it "
          f"with pretrained={args.out}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help="weights file (default %(default)s)")
    parser.add_argument("--backbone", default="resnet18_deep_half", choices=["resnet18_deep", "resnet18_deep_half"])
    parser.add_argument("--num-images", type=int, default=4000, help="training images (a balanced set)")
    parser.add_argument("--heldout-images", type=int, default=800, help="new images for the accuracy check")
    parser.add_argument("--size", type=int, default=48, help="image side")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05, help="SGD (Nesterov momentum 0.9), warm-up + cosine")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="threads it computes on, whatever OMP_NUM_THREADS "
                        "says (the backbone depends on it; default %(default)s)")
    parser.add_argument("--numerics", choices=sorted(NUMERICS), default="pinned", help="pinned (default): compute "
                        "with kernels no CPU feature changes, in a fresh process (the same file on every x86-64 CPU, "
                        "slower); native: this process, this CPU's fastest kernels (module doc)")
    parser.add_argument("--force", action="store_true", help="retrain even if the file exists")
    args = parser.parse_args(argv)
    for name in ("num_images", "heldout_images", "epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_images < args.batch_size:
        parser.error(f"--num-images ({args.num_images}) must be at least --batch-size ({args.batch_size})")
    return args


def compare_with_shipped(path: str, settings: dict, shipped: str = SHIPPED) -> str | None:
    """One line on how the backbone in ``path`` (written with ``settings``) relates to the shipped one: identical
    tensors, or how many differ and by how much. None when there is nothing to compare (``path`` is the shipped
    file, the shipped file is absent, or it was written with other settings: another protocol, not another CPU)."""
    shipped_path = shipped if os.path.isabs(shipped) else os.path.join(ROOT, shipped)
    if not os.path.isfile(shipped_path) or os.path.abspath(path) == os.path.abspath(shipped_path):
        return None
    reference = torch_load(shipped_path, "the shipped backbone")
    if reference.get("pretrain") != settings:
        return None
    ours, theirs = torch_load(path, "pretrained backbone")["model"], reference["model"]
    if ours.keys() != theirs.keys():
        return f"{path} holds other tensors than the shipped backbone {shipped} (other names)"
    differ = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    if not differ:
        return (f"identical to the shipped backbone {shipped} ({len(ours)} tensors): this machine writes the same "
                f"file as the one the demo's figures were measured with")
    largest = max(float((ours[k].double() - theirs[k].double()).abs().max()) for k in differ)
    return (f"{len(differ)} of {len(ours)} tensors differ from the shipped backbone {shipped} (largest difference "
            f"{largest:.3g}) although the settings are the same: this machine's kernels round differently (see "
            f"docs/demo.md, 'CPUs, and the numerical pin'); trained from this file, the demo's rows may move by up to "
            f"4 points")


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = pretrain(args)
    if os.environ.get(PIN_MARK) != "1":  # the caller's process (the pinned child's caller reports, not the child)
        line = compare_with_shipped(args.out, settings)
        if line:
            print(line)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")
