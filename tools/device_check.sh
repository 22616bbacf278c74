#!/bin/sh
# The GPU path in one go, for a machine with a CUDA GPU and nothing downloadable (about 3 minutes on one H100):
#   1. the CUDA tests (pytest -m cuda): singular-value autograd under float32/float16/bfloat16 autocast,
#      one AMP training step of baseline/PFENet/BAM with SVF, test.py CUDA vs CPU, resolver/merge device+dtype;
#   2. a small synthetic dataset (PASCAL VOC layout) and its lists;
#   3. stage 1 (PSPNet, resnet18_deep) and `sh train.sh demo split0 resnet18_deep svf` with amp=true, briefly;
#   4. test.py on that run (AMP);
#   5. benchmarks/svf_speed.py --paper-size: step time, arithmetic and peak GPU memory of floor / frozen / full /
#      released-style SVF / ours, each with and without frozen BatchNorm folded, for the ResNet-50 backbone alone
#      and the baseline FSS model, and merged inference, at batch 8, 473x473.
# What it measures goes to $OUT (default exp/device_check/<time>) in five files: summary.txt, steps.log (every
# step's output), pytest_cuda.xml, test_1shot.json, svf_speed.json; data and checkpoints go to a temporary folder. Each step runs even when an earlier one failed; the summary lists them all and
# the exit status is 1 when any failed. Usage: sh tools/device_check.sh     (OUT=folder to choose where)
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! $PYTHON -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "device_check: needs a CUDA GPU (torch.cuda.is_available() is False on this machine); run it on a GPU machine" >&2
    exit 2
fi
OUT=${OUT:-exp/device_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/svf_device_check.XXXXXX")
START=$(date +%s)
FAILED=0
: > "$OUT/summary.txt"; : > "$OUT/steps.log"

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $WORK/NAME.log, record status and time
    name=$1; limit=$2; shift 2
    t0=$(date +%s)
    echo "=== $name: $*"
    timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then status=ok; else status="FAILED (exit $rc$([ $rc -eq 124 ] && echo ", over ${limit}s"))"; FAILED=1; fi
    printf '%-12s %-28s %4d s\n' "$name" "$status" "$dt" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || tail -n 25 "$WORK/$name.log"
    { echo "=== $name ($status, $dt s): $*"; cat "$WORK/$name.log"; echo; } >> "$OUT/steps.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
    $PYTHON -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'torchvision', torchvision.__version__, 'device', torch.cuda.get_device_name())"
} > "$WORK/env.txt" 2>&1
cat "$WORK/env.txt" | tee -a "$OUT/summary.txt"

DATA=$WORK/data; LISTS=$WORK/lists; STAGE1=$WORK/stage1/best.pth; RUN=$WORK/run
SET="data_root=$DATA list_dir=$LISTS min_class_pixels=128 workers=4 amp=true base_learner=$STAGE1 pretrained=$STAGE1"
SET="$SET stage1_epochs=3 epochs=3 val_episodes=40 test_episodes=100 test_seeds=[321,322] exp_dir=$RUN"

step pytest_cuda 200 $PYTHON -m pytest -m cuda -q -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml"
step data 120 sh -c "$PYTHON -m dataset.synthetic --out $DATA --num-train 200 --num-val 60 && \
    $PYTHON -m dataset.make_lists pascal --data-root $DATA --list-dir $LISTS --min-class-pixels 128"
# shellcheck disable=SC2086  # $SET is a list of key=value words
step stage1 150 $PYTHON train.py --config config/demo_split0.yaml $SET --stage1
# shellcheck disable=SC2086
step train 150 env NPROC=1 sh train.sh demo split0 resnet18_deep svf $SET
# shellcheck disable=SC2086
step test 120 $PYTHON test.py --config config/demo_split0.yaml $SET --out "$OUT/test_1shot.json"
step svf_speed 300 $PYTHON benchmarks/svf_speed.py --paper-size --json "$OUT/svf_speed.json"

{
    echo
    echo "device check on $(sed -n 2p "$WORK/env.txt")"
    echo "pytest -m cuda: $(tail -n 1 "$WORK/pytest_cuda.log")"
    grep -h "loss" "$WORK/train.log" | tail -n 2
    grep -h -E "^(mIoU|FB-IoU)" "$WORK/test.log"
    sed -n '/^training step/,$p' "$WORK/svf_speed.log"
    echo "total $(( $(date +%s) - START )) s; logs and figures in $OUT"
} | tee -a "$OUT/summary.txt"
rm -rf "$WORK"
exit $FAILED
