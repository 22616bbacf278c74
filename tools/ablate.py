"""Compare ways of fine-tuning the backbone on one pipeline: every method x training seed, one table.

    python tools/ablate.py --config config/demo_split0.yaml --methods freeze,svf,full,bn --train-seeds 3
    python tools/ablate.py --config config/pascal_split0.yaml --methods freeze,svf,full --train-seeds 3 \\
        --nproc 4 --out exp/ablation/pascal0                     # the paper-size comparison, 4 GPUs per run
    python tools/ablate.py ... epochs=2 test_episodes=100        # any key=value applies to every run

For every method (a value of the `finetune` config key; before that key existed, `freeze` and `svf` map onto
`svf=false|true`) and every training seed, train.py trains a run in OUT/<method>/seed<S> and test.py tests it;
`untrained` (test.py --untrained: pretrained backbone, heads as initialised at the first training seed) is
tested once: nothing trains in it, it is the floor the others start from.
What a training seed is: the config's `seed`, which fixes the episode order, the augmentation, the heads'
initialisation and dropout (train.py's reproducibility rules). So at one seed every method trains on exactly
the same batches, and the seeds together measure how much a result moves when all of that changes. The test
episodes come from `test_seeds` alone: every run is tested on the same episodes.

The table (also `python tools/summarize.py OUT`): per method, the backbone parameters it trains, mIoU and
FB-IoU as mean ± sample std over training seeds (each run's figure is its mean over the test seeds), the
figure of every training seed, the mean over training seeds for every test seed, the paired difference to
the reference method (`--reference`, default freeze: per seed, method - reference on the same batches and
episodes, then mean ± std), the mean step time and the peak memory of the training runs (train.py's
exp_dir/train_stats.json). OUT/ablation.json holds all of it and is rewritten after every run.

Cross-domain (the paper's question where the domain changes): with --targets, every run is also tested on each
target config (test.py --config TARGET with the run's own words, then --target-set key=value ones; at every shot of
--target-shots), and a second table gives, per method, mIoU per target and shot (mean ± std over training seeds)
and the mean over targets. The whole CD-FSS table with freeze/svf/full/bn/lora rows is one command:

    python tools/ablate.py --config config/pascal_all.yaml --methods freeze,svf,full,bn,lora --train-seeds 1 \
        --targets config/cdfss_deepglobe.yaml,config/cdfss_isic.yaml,config/cdfss_lung.yaml,config/cdfss_fss1000.yaml \
        --target-shots 1,5 --target-set classes_file=PATH/hsnet/data/splits/fss

Reuse: a run whose train_stats.json exists is not retrained, and a test result newer than the checkpoint it
evaluated is not recomputed; an unfinished run (last.pth, no train_stats.json) is resumed with --resume. A
run folder trained with other settings is an error (delete it or choose another --out). Logs:
OUT/<method>/seed<S>/train.log and test.log; --verbose also prints them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common.config import FIELDS, data_name, load_config, split_overrides  # noqa: E402
from dataset.files import atomic_write_text  # noqa: E402
from dataset.registry import family  # noqa: E402
from engine.checkpoint import config_differences, describe_differences, evaluation_checkpoint  # noqa: E402
from tools.summarize import ABLATION, read_json, render_ablation  # noqa: E402

from engine.runstats import RUN_STATS  # noqa: E402  (exp_dir/train_stats.json, written by train.py when a run completes)

UNTRAINED = "untrained"
# settings that do not change what a run trains: a folder trained without them is reused (and retested)
IGNORED_KEYS = ("workers", "test_episodes", "test_seeds", "test_resize_smaller")


def method_overrides(method: str) -> list[str]:
    """The config words that select `method`: finetune=METHOD, or svf=true|false before that key existed."""
    if "finetune" in FIELDS:
        return [f"finetune={'freeze' if method == UNTRAINED else method}"]
    legacy = {"svf": ["svf=true"], "freeze": ["svf=false"], UNTRAINED: ["svf=false"]}
    if method not in legacy:
        raise ValueError(f"method {method!r} needs the `finetune` config key; this version knows only "
                         f"{sorted(m for m in legacy if m != UNTRAINED)}")
    return legacy[method]


class Run:
    """One method at one training seed: its folder, its config words and its resolved config."""

    def __init__(self, args, overrides: list[str], method: str, seed: int):
        self.method, self.seed = method, seed
        self.dir = os.path.join(args.out, method, f"seed{seed}")
        self.words = [*overrides, *method_overrides(method), f"seed={seed}", f"exp_dir={self.dir}"]
        self.cfg = load_config(args.config, self.words)  # every run's config is checked before anything runs
        self.args = args

    @property
    def trained(self) -> bool:
        return self.method == UNTRAINED or os.path.isfile(os.path.join(self.dir, RUN_STATS))

    @property
    def result_path(self) -> str:
        return os.path.join(self.dir, f"test_{self.cfg.shot}shot{'_untrained' if self.method == UNTRAINED else ''}.json")

    def target_result_path(self, target_cfg, shot: int) -> str:
        """test.py's results of this run on a cross-domain target (test_<benchmark>_<K>shot[_untrained].json)."""
        return os.path.join(self.dir, f"test_{target_cfg.benchmark}_{shot}shot"
                                      f"{'_untrained' if self.method == UNTRAINED else ''}.json")

    def target_configs(self) -> list:
        """The resolved config of every --targets file for this run (checked before anything runs)."""
        return [load_config(t, [*self.words, *self.args.target_overrides]) for t in self.args.target_list]

    def check_same_settings(self):
        """Refuse a folder that was trained with other settings (its config.yaml)."""
        path = os.path.join(self.dir, "config.yaml")
        if self.method == UNTRAINED or not os.path.isfile(path):
            return
        with open(path) as fh:
            saved = yaml.safe_load(fh) or {}
        changed = {k: v for k, v in config_differences(saved, self.cfg.to_dict()).items() if k not in IGNORED_KEYS}
        if changed:
            raise ValueError(f"{self.dir} was trained with other settings ({describe_differences(changed)}); delete "
                             f"it or choose another --out")

    def result_is_current(self, path=None, cfg=None) -> bool:
        path, cfg = path or self.result_path, cfg or self.cfg
        if not os.path.isfile(path):
            return False
        result = read_json(path)
        if (result.get("episodes_per_seed"), result.get("seeds")) != (cfg.test_episodes, list(cfg.test_seeds)):
            return False
        if result.get("episode_sampler", cfg.episode_sampler) != cfg.episode_sampler:
            return False
        if self.method == UNTRAINED:  # built from the pretrained weights: retested when they are newer
            weights = self.cfg.pretrained
            return not weights or not os.path.isfile(weights) or \
                os.path.getmtime(path) >= os.path.getmtime(weights)
        checkpoint = evaluation_checkpoint(self.dir, self.cfg.checkpoint_select)
        return os.path.isfile(checkpoint) and os.path.getmtime(path) >= os.path.getmtime(checkpoint)


def launch(args, script: str, words: list[str], log_path: str) -> dict:
    """Run train.py/test.py (under torch.distributed.run with --nproc > 1) with its output in log_path;
    returns {wall_s, cpu_s} of the process tree. A failure is an error that shows the log's end."""
    if args.nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                   "--nproc_per_node", str(args.nproc), script, *words]
    else:
        command = [sys.executable, script, *words]
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.time()
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONPATH": ROOT})
        for line in proc.stdout:
            log.write(line)
            if args.verbose:
                print(line, end="", flush=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's CPU time (its waited-for children included)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        with open(log_path) as fh:
            tail = "".join(fh.readlines()[-25:])
        raise RuntimeError(f"{script} {' '.join(words)} failed (exit {proc.returncode}); the end of {log_path}:\n{tail}")
    return {"wall_s": time.time() - start, "cpu_s": usage.ru_utime + usage.ru_stime}


def execute(run: Run, index: int, total: int) -> dict:
    """Train (or resume, or reuse) and test (or reuse) one run; returns what it cost this time."""
    args, cost = run.args, {}
    label = f"[{index}/{total}] {run.method} seed {run.seed}"
    run.check_same_settings()
    if not run.trained:
        resume = ["--resume"] if os.path.isfile(os.path.join(run.dir, "last.pth")) else []
        print(f"{label}: {'resuming' if resume else 'training'} -> {run.dir}", flush=True)
        cost["train"] = launch(args, "train.py", ["--config", args.config, *run.words, *resume],
                               os.path.join(run.dir, "train.log"))
    if not run.result_is_current():
        untrained = ["--untrained"] if run.method == UNTRAINED else []
        cost["test"] = launch(args, "test.py", ["--config", args.config, *run.words, *untrained],
                              os.path.join(run.dir, "test.log"))
    for target, target_cfg in zip(args.target_list, run.target_configs()):
        for shot in args.target_shot_list:
            if run.result_is_current(run.target_result_path(target_cfg, shot), target_cfg):
                continue
            untrained = ["--untrained"] if run.method == UNTRAINED else []
            spent = launch(args, "test.py", ["--config", target, *run.words, *args.target_overrides,
                                             "--shot", str(shot), *untrained],
                           os.path.join(run.dir, f"test_{target_cfg.benchmark}.log"))
            for k in ("wall_s", "cpu_s"):
                cost.setdefault("cross-domain test", {"wall_s": 0.0, "cpu_s": 0.0})[k] += spent[k]
    if cost:
        spent = " ".join(f"{k} {v['wall_s']:.0f} s (cpu {v['cpu_s']:.0f} s)" for k, v in cost.items())
        print(f"{label}: {spent}; mIoU {100 * read_json(run.result_path)['miou']:.2f}", flush=True)
    else:
        print(f"{label}: reused {run.dir}", flush=True)
    return cost


def mean_std(values: list) -> tuple:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(args, runs: dict, seeds: list[int], cfg, methods: list[str]) -> dict:
    """ablation.json's content from the runs' result files (missing ones are left out, complete: false)."""
    reference = {r.seed: read_json(r.result_path)["miou"] for r in runs.get(args.reference, [])
                 if os.path.isfile(r.result_path)}
    rows, complete = [], True
    for method in methods:
        entries, stats = [], []
        for run in runs[method]:
            if not os.path.isfile(run.result_path):
                complete = False
                continue
            result = read_json(run.result_path)
            entry = {"seed": run.seed, "exp_dir": run.dir, "miou": result["miou"], "fbiou": result["fbiou"],
                     "per_test_seed": [{"seed": s["seed"], "miou": s["miou"], "fbiou": s["fbiou"]}
                                       for s in result["per_seed"]]}
            stats_path = os.path.join(run.dir, RUN_STATS)
            if method != UNTRAINED and os.path.isfile(stats_path):
                entry["train_stats"] = read_json(stats_path)
                stats.append(entry["train_stats"])
            entries.append(entry)
        miou, fbiou = mean_std([e["miou"] for e in entries]), mean_std([e["fbiou"] for e in entries])
        per_test = [statistics.fmean(e["per_test_seed"][j]["miou"] for e in entries)
                    for j in range(len(cfg.test_seeds))] if entries else []
        deltas = [e["miou"] - reference[e["seed"]] for e in entries if e["seed"] in reference]
        delta = mean_std(deltas) if method not in (args.reference, UNTRAINED) else (None, None)
        timed = [s["step_time_s"] for s in stats if s.get("step_time_s") is not None]
        rows.append({"method": method, "runs": entries, "miou_mean": miou[0], "miou_std": miou[1],
                     "fbiou_mean": fbiou[0], "fbiou_std": fbiou[1], "miou_per_test_seed": per_test,
                     "delta_mean": delta[0], "delta_std": delta[1], "delta_seeds": len(deltas),
                     "trainable": stats[0]["trainable"] if stats else None,
                     "trainable_backbone": stats[0]["trainable_backbone"] if stats else (0 if method == UNTRAINED else None),
                     "step_time_s": statistics.fmean(timed) if timed else None,
                     "peak_memory_bytes": max(s["peak_memory_bytes"] for s in stats) if stats else None,
                     "memory_kind": stats[0]["memory_kind"] if stats else None})
    data = {"kind": "ablation", "config": args.config, "overrides": args.overrides, "out": args.out,
            "benchmark": cfg.benchmark, "fold": cfg.fold, "shot": cfg.shot, "arch": cfg.arch, "backbone": cfg.backbone,
            "train_seeds": seeds, "test_seeds": list(cfg.test_seeds), "test_episodes": cfg.test_episodes,
            "reference": args.reference if args.reference in methods else None, "methods": methods,
            "complete": complete, "rows": rows}
    if args.target_list:
        data["cross_domain"] = cross_domain_rows(args, runs, methods)
        data["complete"] = complete and data["cross_domain"]["complete"]
    return data


def cross_domain_rows(args, runs: dict, methods: list[str]) -> dict:
    """Per method, per target and shot: mIoU mean ± std over training seeds (the runs' target results)."""
    targets, rows, complete = [], [], True
    for method in methods:
        cells = {}
        for run in runs[method]:
            for target_cfg in run.target_configs():
                if target_cfg.benchmark not in targets:
                    targets.append(target_cfg.benchmark)
                for shot in args.target_shot_list:
                    path = run.target_result_path(target_cfg, shot)
                    if not os.path.isfile(path):
                        complete = False
                        continue
                    cells.setdefault(target_cfg.benchmark, {}).setdefault(str(shot), []).append(read_json(path)["miou"])
        rows.append({"method": method, "miou": {t: {s: {"mean": mean_std(v)[0], "std": mean_std(v)[1], "runs": len(v)}
                                                    for s, v in by_shot.items()} for t, by_shot in cells.items()}})
    return {"targets": targets, "shots": list(args.target_shot_list), "configs": list(args.target_list),
            "overrides": list(args.target_overrides), "complete": complete, "rows": rows}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Overrides: key=value or --set key=value, applied to every run.")
    parser.add_argument("--config", required=True, help="YAML config, e.g. config/demo_split0.yaml")
    parser.add_argument("--methods", default="freeze,svf", help="comma-separated values of `finetune` (default "
                        "%(default)s); an `untrained` row is added unless --no-untrained")
    parser.add_argument("--train-seeds", type=int, default=3, help="how many training seeds: the config's seed, "
                        "seed+1, ... (default %(default)s)")
    parser.add_argument("--seeds", help="explicit comma-separated training seeds (instead of --train-seeds)")
    parser.add_argument("--reference", default="freeze", help="the method the paired differences are taken to")
    parser.add_argument("--no-untrained", action="store_true", help="leave out the untrained row")
    parser.add_argument("--out", help="folder of the runs and ablation.json (default exp/ablation/<benchmark>/"
                        "<arch>_<backbone>/split<fold>/<shot>shot; a folder benchmark adds its data folder's name "
                        "after <benchmark>)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torch.distributed.run; GPUs)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default %(default)s); on a CPU, JOBS runs "
                        "of OMP_NUM_THREADS threads each use JOBS x OMP_NUM_THREADS cores. A run's figures do not "
                        "depend on it (each is its own process); its step time does")
    parser.add_argument("--targets", default="", help="comma-separated cross-domain target configs "
                        "(config/cdfss_*.yaml): every run is also tested on each")
    parser.add_argument("--target-shots", default=None, help="comma-separated shots of the target tests (default: "
                        "the config's shot)")
    parser.add_argument("--target-set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for the target tests only (after the runs' own), e.g. data_root=...")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--verbose", action="store_true", help="also print train.py's and test.py's output")
    args, rest = parser.parse_known_args(argv)
    args.overrides = split_overrides(rest)
    if args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.target_overrides = split_overrides(args.target_set)
    try:
        args.target_shot_list = [int(s) for s in args.target_shots.split(",")] if args.target_shots else None
    except ValueError:
        parser.error(f"--target-shots must be comma-separated integers, got {args.target_shots!r}")
    if not args.method_list or len(set(args.method_list)) != len(args.method_list) or UNTRAINED in args.method_list:
        parser.error(f"--methods needs distinct method names (untrained is added by itself), got {args.methods!r}")
    if args.seeds is None and args.train_seeds < 1:
        parser.error(f"--train-seeds must be at least 1, got {args.train_seeds}")
    return args


def training_seeds(args, cfg) -> list[int]:
    if args.seeds is not None:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"--seeds must be distinct integers, got {args.seeds!r}")
        return seeds
    return [cfg.seed + i for i in range(args.train_seeds)]


def default_out(cfg) -> str:
    """exp/ablation/<benchmark>[/<data folder's name>]/<arch>_<backbone>/split<fold>/<shot>shot: a folder benchmark
    (any data_root) gets one folder per dataset, so two datasets never share runs."""
    dataset = [data_name(cfg.data_root)] if family(cfg.benchmark).data_named else []
    return os.path.join("exp", "ablation", cfg.benchmark, *dataset, f"{cfg.arch}_{cfg.backbone}", f"split{cfg.fold}",
                        f"{cfg.shot}shot")


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    cfg = load_config(args.config, args.overrides)
    if args.out is None:
        args.out = default_out(cfg)
    seeds = training_seeds(args, cfg)
    args.target_shot_list = args.target_shot_list or [cfg.shot]
    methods = ([] if args.no_untrained else [UNTRAINED]) + args.method_list
    runs = {m: [Run(args, args.overrides, m, s) for s in (seeds[:1] if m == UNTRAINED else seeds)] for m in methods}
    for run in (r for rs in runs.values() for r in rs):
        run.target_configs()  # every target config resolves before anything runs
    order = [run for s in seeds for m in methods for run in runs[m] if run.seed == s]  # seed by seed
    print(f"ablation: {len(methods)} rows x {len(seeds)} training seeds {seeds} -> {args.out}", flush=True)
    out_json = os.path.join(args.out, ABLATION)
    os.makedirs(args.out, exist_ok=True)
    cpu = 0.0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each run is its own process: threads only wait
        pending = {pool.submit(execute, run, i, len(order)) for i, run in enumerate(order, 1)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:  # let the runs in flight finish, start no more
                    for other in pending:
                        other.cancel()
                    wait(pending)
                    raise future.exception()
                cpu += sum(c["cpu_s"] for c in future.result().values())
            data = summarise(args, runs, seeds, cfg, methods)
            atomic_write_text(out_json, json.dumps(data, indent=1) + "\n")
    data["wall_s"], data["cpu_s"] = time.time() - start, cpu
    atomic_write_text(out_json, json.dumps(data, indent=1) + "\n")
    print("\n" + render_ablation(data, args.markdown))
    print(f"{out_json}; this invocation: {data['wall_s']:.0f} s wall, {cpu:.0f} s CPU in train.py/test.py")
    return data


if __name__ == "__main__":
    try:
        main()
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")
