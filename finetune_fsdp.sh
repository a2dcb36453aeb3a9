#!/usr/bin/env bash
# First-order fine-tuning sharded with FSDP over NUM_GPU GPUs (torchrun). Same variables as finetune.sh; the
# effective batch is BS x NUM_GPU (per-device batch 1, BS accumulation steps). Layers are wrapped by the model's own
# `_no_split_modules` (OPTDecoderLayer, LlamaDecoderLayer, ...) unless you pass --fsdp_transformer_layer_cls_to_wrap.
#   NUM_GPU=4 MODEL=facebook/opt-13b TASK=SST2 bash finetune_fsdp.sh
set -euo pipefail
if [ -z "${NUM_GPU:-}" ]; then echo "finetune_fsdp.sh: set NUM_GPU (GPUs to shard over), e.g. NUM_GPU=4" >&2; exit 2; fi
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
    *) echo "finetune_fsdp.sh: unknown MODE=$MODE (ft | prefix | lora)" >&2; exit 2 ;;
esac

# per-task defaults (the dev size; the training objective is run.py's default) come from the task table in tasks.py
TASK_DEFAULTS=$(python "$(dirname "$0")/tasks.py" defaults "$TASK") || exit 2
eval "$TASK_DEFAULTS"
DEV=${DEV:-$TASK_DEV}

TAG=fsdp-$MODE-$EPOCH-$BS-$LR-$SEED
echo "finetune_fsdp.sh: TAG=$TAG MODEL=$MODEL TASK=$TASK MODE=$MODE NUM_GPU=$NUM_GPU EPOCH=$EPOCH BS=$BS LR=$LR" \
     "SEED=$SEED TRAIN=$TRAIN DEV=$DEV EVAL=$EVAL extra: $*"

OMP_NUM_THREADS=${OMP_NUM_THREADS:-10} torchrun --nproc_per_node="$NUM_GPU" --master_port=$((RANDOM + 1000)) \
    "$(dirname "$0")/run.py" \
    --model_name "$MODEL" --task_name "$TASK" --tag "$TAG" \
    --train_set_seed "$SEED" --num_train "$TRAIN" --num_dev "$DEV" --num_eval "$EVAL" --logging_steps 10 \
    --trainer regular --fp16 --no_auto_device --learning_rate "$LR" --num_train_epochs "$EPOCH" \
    --per_device_train_batch_size 1 --gradient_accumulation_steps "$BS" \
    --load_best_model_at_end --evaluation_strategy epoch --save_strategy epoch --save_total_limit 1 \
    --fsdp "full_shard auto_wrap" "${MODE_ARGS[@]}" "$@"
