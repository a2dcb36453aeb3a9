#!/usr/bin/env bash
# First-order fine-tuning with the weights sharded over NPROC processes (FSDP2, launched by torchrun): one GPU per
# process on a GPU machine (NCCL), or CPU processes (gloo). Same variables as finetune.sh; the effective batch is
# BS x NPROC (per-process batch 1, BS accumulation steps). Every weight is sharded along its first dimension by the
# model's own FSDP plan in transformers; checkpoints hold the weights only (transformers cannot checkpoint the
# optimizer of a model sharded when it is loaded), enough to load the best one at the end, not to resume.
#   NPROC=4 MODEL=facebook/opt-13b TASK=SST2 bash finetune_fsdp.sh      # 4 GPUs (NUM_GPU= is accepted too)
#   NPROC=2 TASK=SST2 bash finetune_fsdp.sh --max_steps 20               # 2 CPU processes, the embedded model
set -euo pipefail
NPROC=${NPROC:-${NUM_GPU:-}}
if [ -z "$NPROC" ]; then echo "finetune_fsdp.sh: set NPROC (processes to shard over: GPUs, or CPU processes), e.g. NPROC=4" >&2; exit 2; fi
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

if [ -z "${PRECISION+set}" ]; then  # fp16 mixed precision on GPUs as in the papers; fp32 on CPU
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then PRECISION=--fp16; else PRECISION=; fi
fi
# CPU processes share the cores: give each its share (torch would otherwise start a thread per core in every one)
if [ -z "${OMP_NUM_THREADS:-}" ]; then OMP_NUM_THREADS=$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 )); fi
export OMP_NUM_THREADS

TAG=fsdp-$MODE-$EPOCH-$BS-$LR-$SEED
echo "finetune_fsdp.sh: TAG=$TAG MODEL=$MODEL TASK=$TASK MODE=$MODE NPROC=$NPROC EPOCH=$EPOCH BS=$BS LR=$LR" \
     "SEED=$SEED TRAIN=$TRAIN DEV=$DEV EVAL=$EVAL PRECISION=${PRECISION:-fp32} extra: $*"

torchrun --nproc_per_node="$NPROC" --master_port=$((RANDOM + 1000)) "$(dirname "$0")/run.py" \
    --model_name "$MODEL" --task_name "$TASK" --tag "$TAG" \
    --train_set_seed "$SEED" --num_train "$TRAIN" --num_dev "$DEV" --num_eval "$EVAL" --logging_steps 10 \
    --trainer regular $PRECISION --learning_rate "$LR" --num_train_epochs "$EPOCH" \
    --per_device_train_batch_size 1 --gradient_accumulation_steps "$BS" \
    --load_best_model_at_end --evaluation_strategy epoch --save_strategy epoch --save_total_limit 1 \
    --fsdp "full_shard auto_wrap" --save_only_model "${MODE_ARGS[@]}" "$@"
