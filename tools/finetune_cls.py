"""Few-shot image classification with lrcc: the seed's experiment as a command.

Fine-tunes a torchvision ResNet-18 on an ImageFolder dataset with N images per class for training and
the rest of each class for testing, for full fine-tuning and any lrcc mode, and prints the seed's
table (method x shots -> test accuracy %). The seed's own numbers (ImageNet weights, Caltech-101):
full 89.16 / 80.94, lora_mode r_ratio 0.25 89.27 / 82.57, tune_U_S r_ratio 0.25 89.32 / 81.13 (10 / 5 shots).

    python tools/finetune_cls.py --data caltech101/101_ObjectCategories --weights resnet18-f37072fd.pth \
        --shots 10 5 --methods full lora_mode tune_U_S --cache-dir cache/

The split is fixed by --seed (per class: a seeded permutation of the sorted files, the first N train);
with the same --seed every method sees the same images and the run is repeatable. Inside converted
layers the mode's table decides what trains; BatchNorm and the new classifier train in every method
(the seed's default).
"""
import argparse
import json
import os
import random
import sys

import torch
import torch.nn as nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lrcc  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
METHODS = ("full",) + lrcc.MODES


def split_per_class(targets, shots, seed):
    """Indices (train, test): per class, a permutation seeded by ``seed``; the first ``shots`` train."""
    by_class = {}
    for index, label in enumerate(targets):
        by_class.setdefault(label, []).append(index)
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in sorted(by_class):
        indices = by_class[label]
        if len(indices) <= shots:
            raise ValueError(f"class {label} has {len(indices)} images; {shots}-shot training needs at least "
                             f"{shots + 1} (one left for testing)")
        order = torch.randperm(len(indices), generator=gen).tolist()
        train += [indices[i] for i in order[:shots]]
        test += [indices[i] for i in order[shots:]]
    return train, test


class ImageSubset(torch.utils.data.Dataset):
    """Some images of an ImageFolder, with their own transform."""

    def __init__(self, folder, indices, transform):
        self.folder, self.indices, self.transform = folder, indices, transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        path, label = self.folder.samples[self.indices[i]]
        return self.transform(self.folder.loader(path)), label


def transforms_for(image_size):
    from torchvision import transforms as T
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose([T.RandomResizedCrop(image_size, scale=(0.6, 1.0)), T.RandomHorizontalFlip(),
                       T.ToTensor(), normalize])
    test = T.Compose([T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size), T.ToTensor(), normalize])
    return train, test


def build_model(args, method, num_classes, cache_path):
    from torchvision.models import resnet18
    model = resnet18()
    if args.weights:
        if not os.path.exists(args.weights):
            raise FileNotFoundError(f"--weights file {args.weights} does not exist")
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)  # strict: a wrong file is an error, never a partial load
        except RuntimeError as err:
            raise ValueError(f"{args.weights} is not a torchvision ResNet-18 state dict: {err}") from err
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    if method == "full":
        return model
    return lrcc.model_convert_conv(model, method, cache_path=cache_path, ignore_op_name=args.ignore_op_name,
                                   r_ratio=args.r_ratio, compress_step=args.compress_step,
                                   lambda_s=args.lambda_s, verbose=args.verbose)


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def loader(dataset, batch_size, shuffle, seed, workers):
    def seed_worker(worker_id):
        random.seed(seed + worker_id)
        torch.manual_seed(seed + worker_id)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def accuracy(model, data, device):
    model.eval()
    correct = total = 0
    for images, labels in tqdm(data, desc="test", leave=False):
        correct += int((model(images.to(device)).argmax(1) == labels.to(device)).sum())
        total += len(labels)
    return 100.0 * correct / total


@torch.no_grad()
def recompute_batchnorm_statistics(model, data, device):
    """"Precise BN": replace the running statistics by their exact average over ``data`` under the final
    weights (the running averages lag far behind the weights when there are only a few dozen steps)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for images, _ in data:
        model(images.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def run_one(args, folder, method, shots, device):
    """Train one method on one shot count; return the test accuracy in %."""
    seed_everything(args.seed)
    train_idx, test_idx = split_per_class(folder.targets, shots, args.seed)
    train_tf, test_tf = transforms_for(args.image_size)
    train_data = loader(ImageSubset(folder, train_idx, train_tf), args.batch_size, True, args.seed, args.workers)
    test_data = loader(ImageSubset(folder, test_idx, test_tf), args.batch_size, False, args.seed, args.workers)
    cache = os.path.join(args.cache_dir, "resnet18_decomposition.pt") if args.cache_dir else None
    model = build_model(args, method, len(folder.classes), cache).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = lrcc.count_parameters(model)
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    steps = args.epochs * len(train_data)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    criterion = nn.CrossEntropyLoss()
    bar = tqdm(total=steps, desc=f"{method} {shots}-shot ({trainable:,d}/{total:,d} params train)")
    for _ in range(args.epochs):
        model.train()
        if args.bn_eval:  # tiny batches: keep the pretrained running statistics (affine params still train)
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        for images, labels in train_data:
            loss = criterion(model(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    if args.precise_bn:
        recompute_batchnorm_statistics(model, train_data, device)
    return accuracy(model, test_data, device)


def format_table(results, shots, r_ratio):
    """The seed's table as markdown: one row per method, one column per shot count."""
    rows = ["| method | " + " | ".join(f"{s} images/class acc (%)" for s in shots) + " |",
            "|" + "---|" * (len(shots) + 1)]
    for method, by_shot in results.items():
        label = "full fine-tune" if method == "full" else f"{method}, r_ratio={r_ratio}"
        rows.append(f"| {label} | " + " | ".join(f"{by_shot[s]:.2f}" for s in shots) + " |")
    return "\n".join(rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="ImageFolder root (one folder per class)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="torchvision-format ResNet-18 state-dict file (e.g. ImageNet weights)")
    source.add_argument("--random-init", action="store_true", help="start from random weights (tests)")
    parser.add_argument("--shots", type=int, nargs="+", default=[10, 5], help="training images per class")
    parser.add_argument("--methods", nargs="+", default=["full", "lora_mode", "tune_U_S"], choices=METHODS)
    parser.add_argument("--r-ratio", type=float, default=0.25)
    parser.add_argument("--compress-step", type=int, default=50)
    parser.add_argument("--lambda-s", type=float, default=0.01)
    parser.add_argument("--ignore-op-name", nargs="*", default=["downsample"],
                        help="convs left unconverted (substrings of module names); the seed's example")
    parser.add_argument("--cache-dir", help="folder for the decomposition cache (reused across runs)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01, help="SGD (momentum 0.9) with a cosine schedule")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--bn-eval", action="store_true",
                        help="keep BatchNorm in eval mode while training (default: train mode, as the seed)")
    parser.add_argument("--precise-bn", action="store_true",
                        help="before testing, recompute BatchNorm statistics on the training images")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="also write the results as JSON to this file")
    parser.add_argument("--verbose", action="store_true", help="print lrcc's conversion summary")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from torchvision.datasets import ImageFolder
    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data folder {args.data} does not exist")
    folder = ImageFolder(args.data)
    results = {m: {s: run_one(args, folder, m, s, torch.device(args.device)) for s in args.shots}
               for m in args.methods}
    print(format_table(results, args.shots, args.r_ratio))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
