#!/bin/sh
# Train one fold:  sh train.sh DATASET SPLIT BACKBONE svf|nosvf|METHOD [ARCH] [key=value ...]
#   sh train.sh pascal split0 resnet50 svf            # = config/pascal_split0.yaml exactly
#   sh train.sh pascal split0 resnet50 nosvf pfenet   # PFENet without SVF (own exp_dir)
#   ARCH=bam sh train.sh coco split2 resnet50 svf shot=5
# DATASET: pascal | coco | demo; ARCH (5th word, else $ARCH, else the config's arch): baseline | pfenet | bam.
# Runs torchrun with one process per visible GPU (NCCL), or one CPU process (gloo) without GPUs.
# Several machines: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (torchrun's usual meaning) on each.
# NPROC overrides the process count; DRY_RUN=1 prints the commands instead of running them.
# When the architecture needs the stage-1 PSPNet (bam) and its checkpoint is missing, it is trained first.
set -eu
if [ $# -lt 4 ]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
DATASET=$1; SPLIT=$2; BACKBONE=$3; MODE=$4; shift 4
case "$MODE" in
    svf) SVF=true ;;
    nosvf) SVF=false ;;
    freeze|full|bias|bn|lora|dna) SVF= ;;   # another finetune method (docs/training.md)
    *) echo "error: 4th word must be svf, nosvf or a finetune method (freeze full bias bn lora dna), got '$MODE'" >&2; exit 2 ;;
esac
if [ -n "$SVF" ]; then CHOICE="svf=$SVF"; else CHOICE="finetune=$MODE"; fi
if [ $# -gt 0 ] && [ "${1#*=}" = "$1" ]; then ARCH=$1; shift; fi
CONFIG="config/${DATASET}_${SPLIT}.yaml"
[ -f "$CONFIG" ] || { echo "error: $CONFIG not found (DATASET pascal|coco|demo, SPLIT split0..split3)" >&2; exit 2; }
set -- "backbone=$BACKBONE" "$CHOICE" ${ARCH:+"arch=$ARCH"} "$@"
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}

if [ -z "${NPROC:-}" ]; then
    NPROC=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
    [ "$NPROC" -gt 0 ] || NPROC=1
fi
if [ "${NNODES:-1}" -gt 1 ]; then
    LAUNCH="$PYTHON -m torch.distributed.run --nnodes $NNODES --node_rank ${NODE_RANK:?set NODE_RANK} --nproc_per_node $NPROC --master_addr ${MASTER_ADDR:?set MASTER_ADDR} --master_port ${MASTER_PORT:-29500}"
else
    LAUNCH="$PYTHON -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node $NPROC"
fi
run() { if [ -n "${DRY_RUN:-}" ]; then echo "$@"; else "$@"; fi; }

# missing data or lists: one clear message before any process is launched
[ -n "${DRY_RUN:-}" ] || $PYTHON -m engine.config "$CONFIG" "$@" --check-data
MISSING=$($PYTHON -m engine.config "$CONFIG" "$@" --missing-stage1)
if [ -n "$MISSING" ]; then
    echo "stage 1: $MISSING is missing; training the PSPNet base learner first"
    run $LAUNCH train.py --config "$CONFIG" "$@" --stage1
fi
run $LAUNCH train.py --config "$CONFIG" "$@"
