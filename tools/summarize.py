"""Per-fold table of test results, in the layout of the papers' tables.

    python tools/summarize.py exp/            # every test_*shot*.json under exp/
    python tools/summarize.py exp/ --markdown

One row per method (benchmark, arch, backbone, SVF, COCO split, untrained or trained), columns
fold0..fold3 and their mean for 1-shot and 5-shot (mIoU %, mean over the test seeds). The mean is
printed only when all four folds are there; otherwise it is the mean of the folds present, marked
with `*` and the number of folds. Results of `test.py --weights OTHER` (not the run's own checkpoint)
get rows of their own, marked `[--weights FILE]`. When a fold has several results (e.g. two runs), the newest file wins.

    python tools/summarize.py exp/demo/ablation --compare /other/clone/exp/demo/ablation

Cross-domain results (test.py on config/cdfss_*.yaml: a model trained on one benchmark, `train_benchmark`, tested
on another) form their own table: one row per method, a column per target dataset (Deepglobe, ISIC, Chest X-ray,
FSS-1000, in PATNet's order) and their mean, for 1-shot and 5-shot; the mean over fewer targets is marked `*n`.

Comparisons written by tools/ablate.py (`ablation.json`: one row per fine-tuning method, mean ± std over
training seeds) are printed as their own tables after it; the test results of their runs stay out of the
per-fold table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

SHOTS = (1, 5)
FOLDS = (0, 1, 2, 3)
CROSS_DOMAIN_TARGETS = ("deepglobe", "isic", "lung", "fss1000")  # PATNet's table order
TARGET_TITLES = {"deepglobe": "Deepglobe", "isic": "ISIC", "lung": "Chest X-ray", "fss1000": "FSS-1000"}


ABLATION = "ablation.json"  # what tools/ablate.py writes at the top of its runs' folder


def find_results(root: str) -> list[tuple[str, dict]]:
    """(path, result) of every test result JSON under root, oldest first; the runs of an ablation (a folder with
    an ablation.json) are left out: find_ablations reads them."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"results folder '{root}' not found; test.py writes exp_dir/test_{{K}}shot.json")
    found = []
    for folder, subfolders, files in os.walk(root):
        if ABLATION in files:
            subfolders[:] = []
            continue
        for name in files:
            if name.startswith("test_") and "shot" in name and name.endswith(".json"):
                path = os.path.join(folder, name)
                result = read_json(path)
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
    if result.get("finetune") not in (None, "svf", "full" if result["arch"] == "pspnet" else "freeze"):
        name += f" finetune={result['finetune']}"
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


def table_name(result: dict) -> str:
    """The table a result goes to: its benchmark; a folder benchmark by its data folder's name (``folder cells``)."""
    if result.get("benchmark") == "folder" and result.get("data_root"):
        return f"folder {os.path.basename(os.path.normpath(result['data_root']))}"
    return result["benchmark"]


class Table(dict):
    """{benchmark: {method: {shot: {fold: mIoU}}}}, and ``folds``: {benchmark: its number of folds} (4 unless the
    results say otherwise: a folder benchmark's ``num_folds``)."""
    folds: dict


def is_cross_domain(result: dict) -> bool:
    """A model tested on another benchmark than it trained on (test.py's ``train_benchmark``)."""
    return result.get("train_benchmark", result["benchmark"]) != result["benchmark"]


def build_cross_domain_table(results: list[tuple[str, dict]]) -> dict:
    """{trained on: {method: {shot: {target: mIoU}}}} of the cross-domain results; later files replace earlier ones."""
    table: dict = {}
    for _, r in results:
        if is_cross_domain(r):
            table.setdefault(r["train_benchmark"], {}).setdefault(method_name(r), {}).setdefault(
                r["shot"], {})[r["benchmark"]] = r["miou"]
    return table


def cross_domain_cells(by_target: dict, targets=CROSS_DOMAIN_TARGETS) -> list[str]:
    """One cell per target (mIoU %, '-' when missing) and their mean (``*n``: over the n targets present)."""
    cells = [f"{100 * by_target[t]:.2f}" if by_target.get(t) is not None else "-" for t in targets]
    present = [by_target[t] for t in targets if by_target.get(t) is not None]
    if not present:
        return cells + ["-"]
    mean = f"{100 * sum(present) / len(present):.2f}"
    return cells + [mean if len(present) == len(targets) else f"{mean}*{len(present)}"]


def render_rows(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                               for r in rows]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    def fmt(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(header)] + [fmt(r) for r in rows]


def render_cross_domain(table: dict, markdown: bool = False) -> str:
    """The cross-domain table(s): a row per method, a column per target and their mean, 1- and 5-shot."""
    lines = []
    header = ["method"] + [f"{s}-shot {TARGET_TITLES[t]}" for s in SHOTS for t in CROSS_DOMAIN_TARGETS] + \
        [f"{s}-shot mean" for s in SHOTS]
    for source, methods in sorted(table.items()):
        rows = []
        for name, shots in sorted(methods.items(), key=lambda item: row_order(item[0])):
            cells = {s: cross_domain_cells(shots.get(s, {})) for s in SHOTS}
            rows.append([name] + [c for s in SHOTS for c in cells[s][:-1]] + [cells[s][-1] for s in SHOTS])
        lines.append(f"cross-domain: trained on {source}, tested on each target (mIoU %)")
        lines += render_rows(header, rows, markdown) + [""]
    return "\n".join(lines)


def build_table(results: list[tuple[str, dict]]) -> Table:
    """{benchmark: {method: {shot: {fold: mIoU}}}}; later files replace earlier ones (cross-domain results are left
    to build_cross_domain_table)."""
    table = Table()
    table.folds = {}
    for _, r in results:
        if is_cross_domain(r):
            continue
        name = table_name(r)
        table.setdefault(name, {}).setdefault(method_name(r), {}).setdefault(r["shot"], {})[r["fold"]] = r["miou"]
        table.folds[name] = int(r.get("num_folds", len(FOLDS)))
    return table


def format_cells(by_fold: dict, folds=FOLDS) -> list[str]:
    cells = [f"{100 * by_fold[f]:.2f}" if f in by_fold else "-" for f in folds]
    if not by_fold:
        return cells + ["-"]
    mean = 100 * sum(by_fold.values()) / len(by_fold)
    return cells + ([f"{mean:.2f}"] if len(by_fold) == len(folds) else [f"{mean:.2f}*{len(by_fold)}"])


def render(table: dict, markdown: bool = False) -> str:
    lines = []
    for benchmark, methods in sorted(table.items()):
        folds = tuple(range(getattr(table, "folds", {}).get(benchmark, len(FOLDS))))
        header = ["method"] + [f"{s}-shot {c}" for s in SHOTS for c in [f"fold{f}" for f in folds] + ["mean"]]
        rows = [[name] + [c for s in SHOTS for c in format_cells(shots.get(s, {}), folds)]
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


def read_json(path: str):
    """The JSON in ``path``; an error naming the file when it is not valid JSON."""
    with open(path) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None


def find_ablations(root: str) -> list[tuple[str, dict]]:
    """(path, data) of every ablation.json under root (tools/ablate.py), sorted by path."""
    found = []
    for folder, _, files in os.walk(root):
        if ABLATION in files:
            path = os.path.join(folder, ABLATION)
            data = read_json(path)
            if data.get("kind") != "ablation" or not isinstance(data.get("rows"), list):
                raise ValueError(f"{path} is not an ablation written by tools/ablate.py (no kind: ablation / rows)")
            found.append((path, data))
    return sorted(found)


def _pm(mean, std, scale=100.0) -> str:
    return "-" if mean is None else f"{scale * mean:.2f} ± {scale * (std or 0.0):.2f}"


def _count(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K" if n >= 1e3 else str(n)


ABLATION_HEADER = ["method", "backbone params trained", "mIoU %", "per training seed", "per test seed",
                   "Δ mIoU vs {ref} (paired)", "FB-IoU %", "s/step", "peak memory MiB"]


def ablation_rows(data: dict) -> list[list[str]]:
    """The cells of an ablation's table, one row per method (see ABLATION_HEADER)."""
    rows = []
    for r in data["rows"]:
        runs = r["runs"]
        seeds = " / ".join(f"{100 * run['miou']:.2f}" for run in runs) if runs else "-"
        tests = " / ".join(f"{100 * v:.2f}" for v in r.get("miou_per_test_seed") or []) or "-"
        delta = "-" if r.get("delta_mean") is None else f"{100 * r['delta_mean']:+.2f} ± {100 * r['delta_std']:.2f}"
        step = "-" if r.get("step_time_s") is None else f"{r['step_time_s']:.3f}"
        memory = "-" if r.get("peak_memory_bytes") is None else f"{r['peak_memory_bytes'] / 2 ** 20:.0f}"
        rows.append([r["method"], _count(r.get("trainable_backbone")), _pm(r["miou_mean"], r["miou_std"]), seeds,
                     tests, delta, _pm(r["fbiou_mean"], r["fbiou_std"]), step, memory])
    return rows


def render_ablation(data: dict, markdown: bool = False) -> str:
    """An ablation's table (tools/ablate.py's JSON) with a title line and its footnote."""
    header = [h.format(ref=data.get("reference") or "-") for h in ABLATION_HEADER]
    rows = ablation_rows(data)
    memory = {"cuda_max_allocated": "torch.cuda.max_memory_allocated", "cpu_peak_rss": "peak RSS of the process"}
    title = (f"{data['benchmark']} fold {data['fold']} {data['shot']}-shot, {data['arch']} {data['backbone']}: "
             f"{len(data['train_seeds'])} training seed(s) {data['train_seeds']}, test seeds {data['test_seeds']} x "
             f"{data['test_episodes']} episodes (the same in every row)")
    lines = [title]
    if markdown:
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(header, widths))))
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                  for r in rows]
    kinds = sorted({memory.get(r.get("memory_kind"), r.get("memory_kind")) for r in data["rows"] if r.get("memory_kind")})
    lines.append(f"mIoU / FB-IoU: mean ± sample std over training seeds of each run's mean over the test seeds; "
                 f"s/step: training wall time per step (data loading included); memory: {', '.join(kinds) or '-'}"
                 + ("" if data.get("complete", True) else "; INCOMPLETE: some runs are missing"))
    if data.get("cross_domain"):
        lines.append(render_ablation_cross_domain(data["cross_domain"], markdown))
    return "\n".join(lines) + "\n"


def render_ablation_cross_domain(cross: dict, markdown: bool = False) -> str:
    """An ablation's cross-domain table: per method, mIoU per target and shot (mean ± std over training seeds) and
    the mean over the targets (of the seed means)."""
    targets, shots = cross["targets"], cross["shots"]
    header = ["method"] + [f"{s}-shot {TARGET_TITLES.get(t, t)}" for s in shots for t in targets] + \
        [f"{s}-shot mean" for s in shots]
    rows = []
    for row in cross["rows"]:
        cells, means = [], []
        for s in shots:
            values = [row["miou"].get(t, {}).get(str(s)) for t in targets]
            cells += [_pm(v["mean"], v["std"]) if v else "-" for v in values]
            present = [v["mean"] for v in values if v and v["mean"] is not None]
            mean = "-" if not present else f"{100 * sum(present) / len(present):.2f}"
            means.append(mean if len(present) == len(targets) or not present else f"{mean}*{len(present)}")
        rows.append([row["method"]] + cells + means)
    title = ("cross-domain: each run tested on " + ", ".join(TARGET_TITLES.get(t, t) for t in targets)
             + " (mIoU %, mean ± std over training seeds)" + ("" if cross.get("complete", True) else "; INCOMPLETE"))
    return "\n".join([title] + render_rows(header, rows, markdown))


def compare_ablations(a: dict, b: dict) -> tuple[str, float]:
    """Lines comparing two runs of the same ablation (e.g. two machines or thread counts), and the largest
    difference of a row's mean mIoU (points). Per method: mean mIoU in a and b, their difference, and the
    largest difference of one training seed's mIoU."""
    lines, worst = [f"{'method':<10} {'mIoU a':>8} {'mIoU b':>8} {'b - a':>7} {'max |run b - run a|':>20}"], 0.0
    rows_b = {r["method"]: r for r in b["rows"]}
    for ra in a["rows"]:
        rb = rows_b.get(ra["method"])
        if rb is None or ra["miou_mean"] is None or rb["miou_mean"] is None:
            lines.append(f"{ra['method']:<10} (not in both)")
            continue
        runs_b = {run["seed"]: run["miou"] for run in rb["runs"]}
        per_run = [abs(runs_b[run["seed"]] - run["miou"]) for run in ra["runs"] if run["seed"] in runs_b]
        diff = 100 * (rb["miou_mean"] - ra["miou_mean"])
        worst = max(worst, abs(diff))
        lines.append(f"{ra['method']:<10} {100 * ra['miou_mean']:8.2f} {100 * rb['miou_mean']:8.2f} {diff:+7.2f} "
                     f"{100 * max(per_run, default=float('nan')):20.2f}")
    lines.append(f"largest difference of a row's mean mIoU: {worst:.2f} points")
    return "\n".join(lines), worst


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="folder searched recursively for test_*shot*.json and ablation.json")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--compare", metavar="OTHER_ROOT", help="compare every ablation under root with the one at "
                        "the same place under OTHER_ROOT (another machine's or thread count's run of it)")
    args = parser.parse_args(argv)
    if args.compare:
        parts = []
        for path, data in find_ablations(args.root):
            other = os.path.join(args.compare, os.path.relpath(path, args.root))
            if not os.path.isfile(other):
                raise FileNotFoundError(f"{other} not found (the counterpart of {path})")
            text, _ = compare_ablations(data, read_json(other))
            parts.append(f"a = {path}\nb = {other}\n{text}")
        if not parts:
            raise FileNotFoundError(f"no ablation.json under '{args.root}'")
        print("\n\n".join(parts))
        return "\n\n".join(parts)
    results, ablations = find_results(args.root), find_ablations(args.root)
    if not results and not ablations:
        raise FileNotFoundError(f"no test results (test_*shot*.json) or ablations (ablation.json) under "
                                f"'{args.root}'; run test.py or tools/ablate.py first")
    parts = [render(build_table(results), args.markdown)] if results else []
    cross = build_cross_domain_table(results)
    parts += [render_cross_domain(cross, args.markdown)] if cross else []
    parts += [f"ablation {os.path.dirname(path)}\n" + render_ablation(data, args.markdown) for path, data in ablations]
    text = "\n".join(parts)
    print(text)
    return text


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
