#!/usr/bin/env bash
# First-order fine-tuning (HF Trainer, AdamW, linear LR decay): full parameters, prefix tuning or LoRA.
# Environment variables set the run; extra flags come last and override.
#   TASK=SST2 bash finetune.sh                       # full fine-tuning of the embedded model
#   MODEL=facebook/opt-1.3b TASK=RTE MODE=lora LR=1e-4 bash finetune.sh
set -euo pipefail
MODEL=${MODEL:-smollm2-135m}
TASK=${TASK:-SST2}
EPOCH=${EPOCH:-5}
BS=${BS:-8}
LR=${LR:-1e-5}
SEED=${SEED:-0}
TRAIN=${TRAIN:-1000}
EVAL=${EVAL:-1000}
MODE=${MODE:-ft}               # ft | prefix | lora

MODE_ARGS=()
case "$MODE" in
    ft) ;;
    prefix) MODE_ARGS=(--prefix_tuning --num_prefix 5) ;;
    lora) MODE_ARGS=(--lora) ;;
    *) echo "finetune.sh: unknown MODE=$MODE (ft | prefix | lora)" >&2; exit 2 ;;
esac

# per-task defaults (the dev size, the largest per-device batch of long-input tasks; the training objective is
# run.py's default) come from the task table in tasks.py
TASK_DEFAULTS=$(python "$(dirname "$0")/tasks.py" defaults "$TASK") || exit 2
eval "$TASK_DEFAULTS"
DEV=${DEV:-$TASK_DEV}
TASK_ARGS=()
if [ -n "$TASK_FO_BATCH_LIMIT" ] && [ "$BS" -gt "$TASK_FO_BATCH_LIMIT" ]; then  # same effective batch, less memory
    GA=$((BS / TASK_FO_BATCH_LIMIT)); BS=$TASK_FO_BATCH_LIMIT; TASK_ARGS=(--gradient_accumulation_steps "$GA")
fi

if [ -z "${PRECISION+set}" ]; then  # fp16 mixed precision on GPUs as in the papers; fp32 on CPU
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then PRECISION=--fp16; else PRECISION=; fi
fi

TAG=$MODE-$EPOCH-$BS-$LR-$SEED
echo "finetune.sh: TAG=$TAG MODEL=$MODEL TASK=$TASK MODE=$MODE EPOCH=$EPOCH BS=$BS LR=$LR SEED=$SEED" \
     "TRAIN=$TRAIN DEV=$DEV EVAL=$EVAL PRECISION=${PRECISION:-fp32} extra: $*"

python "$(dirname "$0")/run.py" \
    --model_name "$MODEL" --task_name "$TASK" --tag "$TAG" \
    --train_set_seed "$SEED" --num_train "$TRAIN" --num_dev "$DEV" --num_eval "$EVAL" --logging_steps 10 \
    --trainer regular $PRECISION --learning_rate "$LR" --num_train_epochs "$EPOCH" --per_device_train_batch_size "$BS" \
    --load_best_model_at_end --evaluation_strategy epoch --save_strategy epoch --save_total_limit 1 \
    "${MODE_ARGS[@]}" "${TASK_ARGS[@]}" "$@"
