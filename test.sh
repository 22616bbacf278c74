#!/bin/sh
# Evaluate one fold: sh test.sh DATASET SPLIT BACKBONE svf|nosvf|METHOD [ARCH] [test.py options] [key=value ...]
#   sh test.sh pascal split0 resnet50 svf              # the run of `sh train.sh pascal split0 resnet50 svf`
#   sh test.sh pascal split0 resnet50 svf --shot 5
# One process per visible GPU (or one CPU process); results are the same for any process count.
set -eu
if [ $# -lt 4 ]; then sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 2; fi
DATASET=$1; SPLIT=$2; BACKBONE=$3; MODE=$4; shift 4
case "$MODE" in
    svf) SVF=true ;;
    nosvf) SVF=false ;;
    freeze|full|bias|bn|lora|dna) SVF= ;;   # another finetune method (docs/training.md)
    *) echo "error: 4th word must be svf, nosvf or a finetune method (freeze full bias bn lora dna), got '$MODE'" >&2; exit 2 ;;
esac
if [ -n "$SVF" ]; then CHOICE="svf=$SVF"; else CHOICE="finetune=$MODE"; fi
if [ $# -gt 0 ] && [ "${1#*=}" = "$1" ] && [ "${1#-}" = "$1" ]; then ARCH=$1; shift; fi
CONFIG="config/${DATASET}_${SPLIT}.yaml"
[ -f "$CONFIG" ] || { echo "error: $CONFIG not found" >&2; exit 2; }
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
if [ -z "${NPROC:-}" ]; then
    NPROC=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
    [ "$NPROC" -gt 0 ] || NPROC=1
fi
${DRY_RUN:+echo} $PYTHON -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$NPROC" \
    test.py --config "$CONFIG" "backbone=$BACKBONE" "$CHOICE" ${ARCH:+"arch=$ARCH"} "$@"
