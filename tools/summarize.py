"""Per-fold table of test results, in the layout of the papers' tables.

    python tools/summarize.py exp/            # every test_*shot*.json under exp/
    python tools/summarize.py exp/ --markdown

One row per method (benchmark, arch, backbone, SVF, COCO split, untrained or trained), columns
fold0..fold3 and their mean for 1-shot and 5-shot (mIoU %, mean over the test seeds). The mean is
printed only when all four folds are there; otherwise it is the mean of the folds present, marked
with `*` and the number of folds. Results of `test.py --weights OTHER` (not the run's own checkpoint)
get rows of their own, marked `[--weights FILE]`. When a fold has several results (e.g. two runs), the newest file wins.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

SHOTS = (1, 5)
FOLDS = (0, 1, 2, 3)


def find_results(root: str) -> list[tuple[str, dict]]:
    """(path, result) of every test result JSON under root, oldest first."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"results folder '{root}' not found; test.py writes exp_dir/test_{{K}}shot.json")
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.startswith("test_") and "shot" in name and name.endswith(".json"):
                path = os.path.join(folder, name)
                with open(path) as fh:
                    try:
                        result = json.load(fh)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path} is not valid JSON: {exc}") from None
                if "miou" in result and "fold" in result:
                    found.append((path, result))
    found.sort(key=lambda item: os.path.getmtime(item[0]))
    return found


def method_name(result: dict) -> str:
    """The row: ``baseline+SVF resnet50`` (singular values trained), ``baseline resnet50 frozen backbone``
    (svf off: the few-shot models train their heads only), ``baseline resnet50 untrained`` (as built)."""
    untrained = result.get("untrained")
    name = f"{result['arch']}{'+SVF' if result['svf'] and not untrained else ''} {result['backbone']}"
    if not result["svf"] and not untrained:
        name += " frozen backbone"
    if result.get("benchmark") == "coco" and result.get("coco_split", "interleaved") != "interleaved":
        name += f" ({result['coco_split']})"
    if not result.get("filter_novel", True):
        name += " (no †)"
    if result.get("untrained"):
        name += " untrained"
    if result.get("checkpoint_select") == "--weights":  # not the run's own checkpoint (test.py --weights)
        name += f" [--weights {os.path.basename(str(result.get('weights')))}]"
    if result.get("trained_shot", result["shot"]) != result["shot"]:
        name += f" (trained {result['trained_shot']}-shot)"
    return name


def row_order(name: str) -> tuple:
    """A method's untrained row first, then its frozen-backbone row, then +SVF (and other trained rows)."""
    rank = 0 if " untrained" in name else 1 if " frozen backbone" in name else 2
    base = name.replace("+SVF", "").replace(" untrained", "").replace(" frozen backbone", "")
    return base, rank, name


def build_table(results: list[tuple[str, dict]]) -> dict:
    """{benchmark: {method: {shot: {fold: mIoU}}}}; later files replace earlier ones."""
    table: dict = {}
    for _, r in results:
        table.setdefault(r["benchmark"], {}).setdefault(method_name(r), {}).setdefault(r["shot"], {})[r["fold"]] = r["miou"]
    return table


def format_cells(by_fold: dict) -> list[str]:
    cells = [f"{100 * by_fold[f]:.2f}" if f in by_fold else "-" for f in FOLDS]
    if not by_fold:
        return cells + ["-"]
    mean = 100 * sum(by_fold.values()) / len(by_fold)
    return cells + ([f"{mean:.2f}"] if len(by_fold) == len(FOLDS) else [f"{mean:.2f}*{len(by_fold)}"])


def render(table: dict, markdown: bool = False) -> str:
    lines = []
    header = ["method"] + [f"{s}-shot {c}" for s in SHOTS for c in [f"fold{f}" for f in FOLDS] + ["mean"]]
    for benchmark, methods in sorted(table.items()):
        rows = [[name] + [c for s in SHOTS for c in format_cells(shots.get(s, {}))]
                for name, shots in sorted(methods.items(), key=lambda item: row_order(item[0]))]
        lines.append(f"{benchmark} (mIoU %)")
        if markdown:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(r) + " |" for r in rows]
        else:
            widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
            fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            lines.append(fmt(header))
            lines += [fmt(r) for r in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="folder searched recursively for test_*shot*.json")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    results = find_results(args.root)
    if not results:
        raise FileNotFoundError(f"no test results (test_*shot*.json) under '{args.root}'; run test.py first")
    text = render(build_table(results), args.markdown)
    print(text)
    return text


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
