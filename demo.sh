#!/bin/sh
# The demo, end to end on the CPU with a synthetic dataset (no downloads):
#   1. generate data/synthetic (PASCAL VOC layout, 20 classes) and lists/demo;
#   2. stage 1: train a PSPNet with the small deep-stem ResNet-18 on the fold's 15 base classes
#      (stands in for ImageNet pretraining, which cannot be downloaded here);
#   3. evaluate the few-shot model before training (backbone from stage 1, heads untrained);
#   4. train the few-shot model (the SVF paper's baseline with SVF) and test it;
#   5. the same with the backbone frozen (svf=false: same seeds, episodes and heads' LR), SVF's reference;
#   6. print the per-fold table (tools/summarize.py): untrained / frozen backbone / +SVF rows.
# Usage: sh demo.sh                  # fold 0
#        FOLDS="0 1 2 3" sh demo.sh  # all four folds (about four times as long)
# Re-running reuses the data, the lists and finished runs (unfinished ones are resumed).
set -eu
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
FOLDS=${FOLDS:-0}
START=$(date +%s)
if [ ! -f data/synthetic/ImageSets/Segmentation/val.txt ]; then
    $PYTHON -m dataset.synthetic --out data/synthetic --num-train 400 --num-val 150
fi
$PYTHON -m dataset.make_lists pascal --data-root data/synthetic --list-dir lists/demo --min-class-pixels 128
for FOLD in $FOLDS; do
    CFG=config/demo_split$FOLD.yaml
    STAGE1_DIR=$(dirname "$($PYTHON -m engine.config "$CFG" --get base_learner)")
    EXP_DIR=$($PYTHON -m engine.config "$CFG" --get exp_dir)
    echo "=== fold $FOLD: stage 1 (PSPNet on the base classes) -> $STAGE1_DIR"
    RESUME=""; [ -f "$STAGE1_DIR/last.pth" ] && RESUME=--resume
    $PYTHON train.py --config "$CFG" --stage1 $RESUME
    echo "=== fold $FOLD: few-shot model before training"
    $PYTHON test.py --config "$CFG" --untrained
    echo "=== fold $FOLD: few-shot training (baseline + SVF) -> $EXP_DIR"
    RESUME=""; [ -f "$EXP_DIR/last.pth" ] && RESUME=--resume
    $PYTHON train.py --config "$CFG" $RESUME
    $PYTHON test.py --config "$CFG" --vis 4
    FROZEN_DIR=$($PYTHON -m engine.config "$CFG" svf=false --get exp_dir)
    echo "=== fold $FOLD: few-shot training with the backbone frozen (svf=false) -> $FROZEN_DIR"
    RESUME=""; [ -f "$FROZEN_DIR/last.pth" ] && RESUME=--resume
    $PYTHON train.py --config "$CFG" svf=false $RESUME
    $PYTHON test.py --config "$CFG" svf=false
done
$PYTHON tools/summarize.py exp/demo
echo "demo finished in $(( $(date +%s) - START )) s"
