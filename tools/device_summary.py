"""The four GPU questions answered from the JSON files `sh tools/device_check.sh` writes to its output folder.

    python tools/device_summary.py exp/device_check/<time>

Q1 does S train (s_movement.json), Q2 step time and peak memory of floor / fold / released / ours
(svf_speed.json), Q3 can the loader feed the GPU (loader_speed.json), Q4 every fine-tuning method
(finetune_speed.json). A missing file is reported as such (its step failed or was not run: see steps.log).
"""
import json
import math
import os
import sys


def _load(folder, name):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _missing(name):
    return [f"  {name}: not produced (its step failed or was not run; see steps.log)"]


def _fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def s_movement(res):
    lines = [f"  {res['recipe']['arch']} + SVF, {res['recipe']['backbone']}, batch {res['args']['batch']} at "
             f"{res['args']['size']}², {res['args']['steps']} steps on {res['device']}; "
             f"S lr {res['recipe']['lr_S']:g}, momentum {res['recipe']['momentum']}, weight decay on S {res['recipe']['weight_decay_S']:g}",
             f"  {'run':<13} {'stage':<7} {'‖S−S₀‖/‖S₀‖':>12} {'beyond decay':>13} {'unchanged':>10} {'grad/ulp':>9} "
             f"{'vs keep':>9}"]
    for name, r in res["runs"].items():
        err = {} if name.endswith("+keep") else res["rounding_error"].get(name, {})
        for stage, st in r["stages"].items():
            lines.append(f"  {name:<13} {stage:<7} {st['rel_change']:>12.2e} {st['rel_change_beyond_decay']:>13.2e} "
                         f"{st['unchanged']:>10.4f} {st['grad_ulps_median']:>9.2e} {_fmt(err.get(stage), '>9.2e')}")
    for name, r in res["runs"].items():
        lines.append(f"  {name}: {r['precision']}; {r['applied_steps']}/{r['steps']} steps applied; loss "
                     f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}; {r['seconds_per_step']:.3f} s/step")
    lines.append("  (beyond decay: the movement weight decay alone does not explain; grad/ulp: median |lr·∂L/∂S| over "
                 "float32's spacing at S, last step; vs keep: ‖S − S_keep‖/‖S₀‖ at the end)")
    return lines


def svf_speed(res):
    lines = []
    for model in ("backbone", "fss"):
        runs = res.get(model, {}).get("wall")
        if not runs:
            continue
        floor = {False: runs.get("floor"), True: runs.get("floor+fold")}
        a = res["args"]
        lines.append(f"  {model}: batch {a['batch']} at {a['size']}², least of {a['iters']} steps (wall clock)")
        lines.append(f"  {'variant':<16} {'step (s)':>9} {'x floor':>8} {'peak MiB':>9} {'saved MiB':>10}")
        for name, r in runs.items():
            f = floor[name.endswith("+fold")]
            x = r["min_s"] / f["min_s"] if f else float("nan")
            lines.append(f"  {name:<16} {r['min_s']:>9.4f} {_fmt(x, '>8.2f')} {_fmt(r['peak_mib'], '>9.0f')} "
                         f"{r['saved_mib']:>10.0f}")
    return lines or ["  svf_speed.json holds no training figures"]


def loader_speed(res):
    lines = [f"  {res['cpus']} CPUs, train_size {res['args']['size']}, batch {res['args']['batch']}, images up to "
             f"{res['args']['image_size']} px"]
    gpu = {int(k): v for k, v in res.get("gpu", {}).items()}
    for key, r in res["results"].items():
        g = gpu.get(r["shot"])
        need = f"GPU needs {g['episodes_per_s']:.1f}/s -> loader/GPU {r['loader_over_gpu']:.2f}" if g else \
            "no GPU step time for this shot"
        lines.append(f"  {r['shot']}-shot, {r['workers']:>2} workers: {r['episodes_per_s']:8.1f} episodes/s "
                     f"(first batch {r['first_batch_s']:.2f} s); {need}")
    for shot, g in sorted(gpu.items()):
        amp = f", with AMP {g['amp_episodes_per_s']:.1f}/s" if "amp_episodes_per_s" in g else ""
        lines.append(f"  GPU at {shot}-shot: batch {g['batch']} / {g['step_s']:.4f} s = {g['episodes_per_s']:.1f} "
                     f"episodes/s{amp} ({g['source']})")
    return lines


def finetune_speed(res):
    precisions = res["args"]["precisions"]
    a = res["args"]
    lines = [f"  baseline, {a['backbone']}, batch {a['batch']} at {a['size']}², {a['shot']}-shot, on {res['device']}",
             f"  {'method':<8} {'trainable':>11} {'backbone':>10}" +
             "".join(f" | {p + ' (s)':>12} {'peak MiB':>9}" for p in precisions)]
    for name, r in res["methods"].items():
        line = f"  {name:<8} {r['trainable']:>11,d} {r['trainable_backbone']:>10,d}"
        for p in precisions:
            m = r.get(p, {})
            line += f" | {_fmt(m.get('min_s'), '>12.4f')} {_fmt(m.get('peak_mib'), '>9.0f')}"
        lines.append(line)
    return lines


SECTIONS = [("Q1 does the released recipe's S train (float32 / AMP, with and without svf.keep_small_updates)",
             "s_movement.json", s_movement),
            ("Q2 step time and peak memory: floor / fold / released form / ours", "svf_speed.json", svf_speed),
            ("Q3 can the loader feed the GPU", "loader_speed.json", loader_speed),
            ("Q4 every fine-tuning method", "finetune_speed.json", finetune_speed)]


def summarize(folder):
    lines = []
    for title, name, fn in SECTIONS:
        res = _load(folder, name)
        try:
            body = fn(res) if res is not None else _missing(name)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:  # a file from another version
            body = [f"  {name}: unreadable ({type(exc).__name__}: {exc})"]
        lines += ["", title] + body
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        sys.exit("usage: python tools/device_summary.py OUT_FOLDER   (the folder tools/device_check.sh wrote)")
    print(summarize(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
