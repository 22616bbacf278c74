#!/bin/sh
# The demo, end to end on the CPU with synthetic data (no downloads): which way of tuning the backbone works?
#   1. generate the segmentation data (PASCAL VOC layout, 20 classes, 40-64 px images) and its lists;
#   2. pretrain the backbone on synthetic CLASSIFICATION (80 other categories, other images: the demo's
#      ImageNet; tools/pretrain_demo_backbone.py, cached in exp/demo/pretrain/);
#   3. tools/ablate.py: the SVF paper's baseline few-shot model with the backbone untrained-heads / frozen /
#      SVF / fully fine-tuned / BatchNorm-tuned, 3 training seeds each, all tested on the same 2 x 100 episodes;
#   4. print the table (mean ± std over training seeds, paired differences to the frozen backbone).
# Usage: sh demo.sh                           # fold 0; about 19 minutes on 2 cores (measured; docs/demo.md)
#        FOLDS="0 1 2 3" sh demo.sh           # all four folds (four times as long)
#        METHODS=freeze,svf,full,bn,bias SEEDS=5 sh demo.sh
#        JOBS=1 OMP_NUM_THREADS=2 sh demo.sh  # one run at a time on 2 threads (the thread-count check)
#        DEMO_OUT=exp/demo_b sh demo.sh       # the backbone and the runs in another folder (default exp/demo)
#        ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default MKL_CBWR=SSE4_2 DEMO_OUT=exp/demo_sse4 sh demo.sh
#                                             # as a CPU with SSE4 only (the CPU check; docs/demo.md)
# JOBS runs at once (default 2), each on OMP_NUM_THREADS threads (default 1). The pretraining always computes
# on 2 threads, so that it writes the same backbone whatever the thread count (as everybody downloads the same
# ImageNet weights), and with kernels no CPU feature changes (its numerical pin: oneDNN off, ATen and MKL at
# baseline x86-64), so that every x86-64 CPU writes the same backbone. The figures do not depend on JOBS; they move
# a little with OMP_NUM_THREADS and the CPU (float rounding in the few-shot runs), within the tolerance docs/demo.md
# states. DEMO_OUT holds the backbone and the runs; the data and lists are shared.
# Re-running reuses the data, the pretrained backbone and finished runs (unfinished ones are resumed).
set -eu
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
FOLDS=${FOLDS:-0}
METHODS=${METHODS:-freeze,svf,full,bn}
SEEDS=${SEEDS:-3}
JOBS=${JOBS:-2}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DEMO_OUT=${DEMO_OUT:-exp/demo}
export OMP_NUM_THREADS
START=$(date +%s)
DATA=$($PYTHON -m engine.config config/demo.yaml --get data_root)
LISTS=$($PYTHON -m engine.config config/demo.yaml --get list_dir)
PIXELS=$($PYTHON -m engine.config config/demo.yaml --get min_class_pixels)
if [ ! -f "$DATA/ImageSets/Segmentation/val.txt" ]; then
    $PYTHON -m dataset.synthetic --out "$DATA" --num-train 400 --num-val 150 --size 64 --workers "$JOBS"
fi
$PYTHON -m dataset.make_lists pascal --data-root "$DATA" --list-dir "$LISTS" --min-class-pixels "$PIXELS" --workers 0
PRETRAINED=$DEMO_OUT/pretrain/$(basename "$($PYTHON -m engine.config config/demo.yaml --get pretrained)")
echo "=== pretraining the backbone on synthetic classification (the demo's ImageNet)"
$PYTHON tools/pretrain_demo_backbone.py --out "$PRETRAINED"
for FOLD in $FOLDS; do
    echo "=== fold $FOLD: methods untrained,$METHODS x $SEEDS training seeds"
    $PYTHON tools/ablate.py --config "config/demo_split$FOLD.yaml" --methods "$METHODS" --train-seeds "$SEEDS" \
        --jobs "$JOBS" --out "$DEMO_OUT/ablation/split$FOLD" "pretrained=$PRETRAINED"
done
$PYTHON tools/summarize.py "$DEMO_OUT/ablation" --markdown
echo "demo finished in $(( $(date +%s) - START )) s wall-clock (JOBS=$JOBS, OMP_NUM_THREADS=$OMP_NUM_THREADS); CPU time"
echo "(user, system) of this shell and of every command it ran:"
times
