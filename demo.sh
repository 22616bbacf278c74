#!/bin/sh
# The demo, end to end on the CPU with synthetic data (no downloads): which way of tuning the backbone works?
#   1. generate the segmentation data (PASCAL VOC layout, 20 classes, 40-64 px images) and its lists;
#   2. the pretrained backbone: weights/resnet18_deep_half_synthcls.pth, shipped with the repository (the demo's
#      "ImageNet weights": pretrained on synthetic CLASSIFICATION, 80 other categories, other images, by
#      tools/pretrain_demo_backbone.py); PRETRAIN=1 makes it again here (5 minutes) and compares it with the shipped file;
#   3. tools/ablate.py: the SVF paper's baseline few-shot model with the backbone untrained-heads / frozen /
#      SVF / fully fine-tuned / BatchNorm-tuned, 3 training seeds each, all tested on the same 2 x 100 episodes;
#   4. print the table (mean ± std over training seeds, paired differences to the frozen backbone).
# Usage: sh demo.sh                           # fold 0; about 13 minutes on 2 cores (measured; docs/demo.md)
#        FOLDS="0 1 2 3" sh demo.sh           # all four folds (four times as long)
#        METHODS=freeze,svf,full,bn,bias SEEDS=5 sh demo.sh
#        JOBS=1 OMP_NUM_THREADS=2 sh demo.sh  # one run at a time on 2 threads (the thread-count check)
#        PRETRAIN=1 sh demo.sh                # pretrain the backbone here too (into DEMO_OUT/pretrain/); the runs use
#                                             # the shipped file if this machine wrote the same one, else its own
#        DEMO_OUT=exp/demo_b sh demo.sh       # the runs (and a PRETRAIN=1 backbone) in another folder (default exp/demo)
#        ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default MKL_CBWR=SSE4_2 DEMO_OUT=exp/demo_sse4 sh demo.sh
#                                             # as a CPU with SSE4 only (the CPU check; docs/demo.md)
# JOBS runs at once (default 2), each on OMP_NUM_THREADS threads (default 1). The figures do not depend on JOBS; they
# move a little with OMP_NUM_THREADS and the CPU (float rounding in the few-shot runs), within the tolerance
# docs/demo.md states. The pretraining (PRETRAIN=1) always computes on 2 threads with kernels no CPU feature changes,
# so that every x86-64 CPU writes the shipped file (docs/demo.md: CPUs, and the numerical pin).
# Re-running reuses the data and finished runs (unfinished ones are resumed); the data and lists are shared.
set -eu
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
FOLDS=${FOLDS:-0}
METHODS=${METHODS:-freeze,svf,full,bn}
SEEDS=${SEEDS:-3}
JOBS=${JOBS:-2}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DEMO_OUT=${DEMO_OUT:-exp/demo}
PRETRAIN=${PRETRAIN:-0}
case $PRETRAIN in 0|1) ;; *) echo "error: PRETRAIN=$PRETRAIN: 0 (the shipped backbone, default) or 1 (pretrain it here)" >&2; exit 2;; esac
export OMP_NUM_THREADS
START=$(date +%s)
DATA=$($PYTHON -m engine.config config/demo.yaml --get data_root)
LISTS=$($PYTHON -m engine.config config/demo.yaml --get list_dir)
PIXELS=$($PYTHON -m engine.config config/demo.yaml --get min_class_pixels)
if [ ! -f "$DATA/ImageSets/Segmentation/val.txt" ]; then
    $PYTHON -m dataset.synthetic --out "$DATA" --num-train 400 --num-val 150 --size 64 --workers "$JOBS"
fi
$PYTHON -m dataset.make_lists pascal --data-root "$DATA" --list-dir "$LISTS" --min-class-pixels "$PIXELS" --workers 0
SHIPPED=$($PYTHON -m engine.config config/demo.yaml --get pretrained)
PRETRAINED=$SHIPPED
if [ "$PRETRAIN" = 1 ]; then
    OWN=$DEMO_OUT/pretrain/$(basename "$SHIPPED")
    echo "=== pretraining the backbone on synthetic classification (the demo's ImageNet) -> $OWN"
    $PYTHON tools/pretrain_demo_backbone.py --out "$OWN"
    if ! cmp -s "$OWN" "$SHIPPED"; then
        echo "=== the runs use this machine's backbone $OWN (not the shipped one: see the line above)"
        PRETRAINED=$OWN
    fi
elif [ ! -f "$SHIPPED" ]; then
    echo "error: the demo's pretrained backbone $SHIPPED is missing (it ships with the repository): restore it with" \
         "git checkout -- $SHIPPED, or make it here with PRETRAIN=1 sh demo.sh" >&2
    exit 1
fi
echo "=== backbone: $PRETRAINED"
for FOLD in $FOLDS; do
    echo "=== fold $FOLD: methods untrained,$METHODS x $SEEDS training seeds"
    $PYTHON tools/ablate.py --config "config/demo_split$FOLD.yaml" --methods "$METHODS" --train-seeds "$SEEDS" \
        --jobs "$JOBS" --out "$DEMO_OUT/ablation/split$FOLD" "pretrained=$PRETRAINED"
done
$PYTHON tools/summarize.py "$DEMO_OUT/ablation" --markdown
echo "demo finished in $(( $(date +%s) - START )) s wall-clock (JOBS=$JOBS, OMP_NUM_THREADS=$OMP_NUM_THREADS, PRETRAIN=$PRETRAIN); CPU time"
echo "(user, system) of this shell and of every command it ran:"
times
