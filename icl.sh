#!/usr/bin/env bash
# Zero-shot / in-context-learning evaluation: every eval example gets its own random demonstrations.
#   bash icl.sh                                      # embedded model, SST2, 32 demos, 1000 eval examples
#   TASK=Copa bash icl.sh --num_train 0              # zero-shot; extra flags come last and override
#   MODEL=facebook/opt-13b TASK=RTE bash icl.sh --sfc
#   bash icl.sh --num_eval 10 --verbose              # also log every prompt, its candidates and their scores
# PRECISION defaults to --load_float16 when an NVIDIA GPU is visible (as in the papers) and to fp32 otherwise.
set -euo pipefail
MODEL=${MODEL:-smollm2-135m}
TASK=${TASK:-SST2}
if [ -z "${PRECISION+set}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then PRECISION=--load_float16; else PRECISION=; fi
fi
echo "icl.sh: MODEL=$MODEL TASK=$TASK PRECISION=${PRECISION:-fp32} extra: $*"
python "$(dirname "$0")/run.py" --model_name "$MODEL" --task_name "$TASK" --tag icl \
    --num_train 32 --num_eval 1000 $PRECISION "$@"
