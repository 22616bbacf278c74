#!/bin/sh
# The GPU path and the open GPU questions in one go, for a machine with a CUDA GPU and nothing downloadable. The
# per-step time limits sum to 480 s (8 minutes on one H200, about 6 expected); each step, in order:
#   pytest_cuda     the CUDA tests (pytest -m cuda): singular-value autograd and folded BatchNorm under float32/float16/
#                   bfloat16 autocast, one AMP step of baseline/PFENet/BAM with SVF, test.py CUDA vs CPU, resolver/merge
#                   device+dtype, adapters saved on one device and loaded on the other, keep_small_updates under
#                   CUDA's foreach/fused optimizer kernels;
#   data, stage1, train, test   a small synthetic dataset (PASCAL VOC layout), stage 1 (PSPNet, resnet18_deep),
#                   `sh train.sh demo split0 resnet18_deep_half svf` with amp=true (2 epochs each), test.py on that run;
#   svf_speed       Q2: benchmarks/svf_speed.py --paper-size: step time and peak memory of floor / floor+fold /
#                   released form / ours / ours+fold, ResNet-50 backbone alone and baseline FSS model, batch 8, 473x473;
#   s_movement      Q1: benchmarks/s_movement.py: per-stage movement of S in 200 steps of the released recipe at paper
#                   size, float32 and AMP, with and without svf.keep_small_updates;
#   finetune_speed  Q4: benchmarks/finetune_speed.py: step time and peak memory of every fine-tuning method
#                   (float32, AMP);
#   finetune_5shot  the SVF step at 5-shot (the loader's 5-shot comparison);
#   vit_speed       benchmarks/vit_speed.py: a DINOv3 ViT-S/16 backbone (timm, random init) at batch 8, 448x448: step
#                   time and peak memory of frozen / floor / svf / lora rank 1 and 8 / full (layer2-4 tuned);
#   loader_speed    Q3: benchmarks/loader_speed.py: episodes/s of train.py's loader (1-/5-shot, 4/8/16 workers) on
#                   VOC-sized JPEGs made on the spot, against the GPU's consumption at batch 8 (svf_speed,
#                   finetune_5shot).
# Then tools/device_summary.py answers the four questions from the JSON files. Everything goes to $OUT (default
# exp/device_check/<time>): summary.txt, steps.log (every step's output), pytest_cuda.xml, test_1shot.json,
# svf_speed.json, s_movement.json, finetune_speed.json, finetune_5shot.json, loader_speed.json, vit_speed.json; data and checkpoints
# to a temporary folder. Each step runs even when an earlier one failed; the summary lists them all and the exit
# status is 1 when any failed.
# Usage: sh tools/device_check.sh      (OUT=folder to choose where)
#   DEVICE_CHECK_STEPS="s_movement loader_speed"   only these steps (names above)
#   DEVICE_CHECK_TINY=1   the benchmarks at toy sizes, on any device, limits x5 (tests/test_device_check.py runs this
#                         on the CPU to check the script and the summary; its figures mean nothing)
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
ALL_STEPS="pytest_cuda data stage1 train test svf_speed s_movement finetune_speed finetune_5shot loader_speed vit_speed"
STEPS=${DEVICE_CHECK_STEPS:-$ALL_STEPS}
TINY=${DEVICE_CHECK_TINY:-0}
for s in $STEPS; do
    case " $ALL_STEPS " in *" $s "*) ;; *)
        echo "device_check: unknown step '$s' in DEVICE_CHECK_STEPS; the steps are: $ALL_STEPS" >&2; exit 2;;
    esac
done
if [ "$TINY" != 1 ] && ! $PYTHON -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
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

if [ "$TINY" = 1 ]; then
    SCALE=5
    SPEED_ARGS="--backbone resnet18_deep --size 33 --batch 1 --iters 1 --warmup 1"
    SM_ARGS="--steps 2 --size 65 --batch 2 --batches 1 --backbone resnet18_deep --runs float32 float32+keep"
    FT_ARGS="--size 33 --batch 1 --backbone resnet18_deep --iters 1 --warmup 1"
    FT_METHODS="freeze svf"
    LS_ARGS="--workers 0 1 --size 65 --image-size 64 --num-train 200 --batches 3"
    VIT_ARGS="--size 32 --batch 1 --iters 1 --warmup 1"
else
    SCALE=1
    SPEED_ARGS="--paper-size --iters 3 --warmup 1"
    SM_ARGS="--steps 200"
    FT_ARGS="--iters 3 --warmup 1"
    FT_METHODS="freeze svf full bias bn lora dna"
    LS_ARGS="--workers 4 8 16 --batches 25"
    VIT_ARGS="--device cuda --size 448 --batch 8 --iters 10 --warmup 3"
fi

step() {  # step NAME TIMEOUT_S COMMAND...: run if chosen, log to $WORK/NAME.log, record status and time
    name=$1; limit=$(( $2 * SCALE )); shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0;; esac
    t0=$(date +%s)
    echo "=== $name: $*"
    timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then status=ok; else status="FAILED (exit $rc$([ $rc -eq 124 ] && echo ", over ${limit}s"))"; FAILED=1; fi
    printf '%-15s %-28s %4d s\n' "$name" "$status" "$dt" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || tail -n 25 "$WORK/$name.log"
    { echo "=== $name ($status, $dt s): $*"; cat "$WORK/$name.log"; echo; } >> "$OUT/steps.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
    $PYTHON -c "import os, torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'torchvision', torchvision.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', 'cpus', len(os.sched_getaffinity(0)))"
} > "$OUT/env.txt" 2>&1
tee -a "$OUT/summary.txt" < "$OUT/env.txt"

DATA=$WORK/data; LISTS=$WORK/lists; STAGE1=$WORK/stage1/best.pth; RUN=$WORK/run
SET="data_root=$DATA list_dir=$LISTS min_class_pixels=128 workers=4 amp=true base_learner=$STAGE1 pretrained=$STAGE1"
SET="$SET stage1_epochs=2 epochs=2 val_episodes=40 test_episodes=100 test_seeds=[321,322] exp_dir=$RUN"

# limits (s): 80 + 20 + 35 + 35 + 25 + 60 + 90 + 55 + 20 + 40 + 20 = 480; the benchmarks write their JSON after
# each run or setting, so one stopped by its limit keeps what it measured
step pytest_cuda 80 $PYTHON -m pytest -m cuda -q -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml"
step data 20 sh -c "$PYTHON -m dataset.synthetic --out $DATA --num-train 200 --num-val 60 --workers 8 && \
    $PYTHON -m dataset.make_lists pascal --data-root $DATA --list-dir $LISTS --min-class-pixels 128"
# shellcheck disable=SC2086  # $SET and the *_ARGS are lists of words
step stage1 35 $PYTHON train.py --config config/demo_split0.yaml $SET --stage1
# shellcheck disable=SC2086
step train 35 env NPROC=1 sh train.sh demo split0 resnet18_deep_half svf $SET
# shellcheck disable=SC2086
step test 25 $PYTHON test.py --config config/demo_split0.yaml $SET --out "$OUT/test_1shot.json"
# shellcheck disable=SC2086
step svf_speed 60 $PYTHON benchmarks/svf_speed.py $SPEED_ARGS --skip-inference \
    --variants floor floor+fold svf_paper svf_ours svf_ours+fold --json "$OUT/svf_speed.json"
# shellcheck disable=SC2086
step s_movement 90 $PYTHON benchmarks/s_movement.py $SM_ARGS --json "$OUT/s_movement.json"
# shellcheck disable=SC2086
step finetune_speed 55 $PYTHON benchmarks/finetune_speed.py $FT_ARGS --methods $FT_METHODS \
    --json "$OUT/finetune_speed.json"
# shellcheck disable=SC2086
step finetune_5shot 20 $PYTHON benchmarks/finetune_speed.py $FT_ARGS --methods svf --shot 5 \
    --json "$OUT/finetune_5shot.json"
# shellcheck disable=SC2086
step loader_speed 40 $PYTHON benchmarks/loader_speed.py $LS_ARGS --json "$OUT/loader_speed.json" \
    --against "$OUT/svf_speed.json" "$OUT/finetune_5shot.json"
# shellcheck disable=SC2086
step vit_speed 20 $PYTHON benchmarks/vit_speed.py $VIT_ARGS --json "$OUT/vit_speed.json"

{
    echo
    echo "device check on $(grep -v -e '^name, memory' -e '^torch ' "$OUT/env.txt" | head -n 1)" \
        "($(grep '^torch ' "$OUT/env.txt"))"
    [ -f "$WORK/pytest_cuda.log" ] && echo "pytest -m cuda: $(tail -n 1 "$WORK/pytest_cuda.log")"
    [ -f "$WORK/train.log" ] && grep -h "loss" "$WORK/train.log" | tail -n 2
    [ -f "$WORK/test.log" ] && grep -h -E "^(mIoU|FB-IoU)" "$WORK/test.log"
    $PYTHON tools/device_summary.py "$OUT"
    [ -f "$WORK/vit_speed.log" ] && cat "$WORK/vit_speed.log"
    echo "total $(( $(date +%s) - START )) s; logs and figures in $OUT"
} 2>&1 | tee -a "$OUT/summary.txt"
rm -rf "$WORK"
exit $FAILED
