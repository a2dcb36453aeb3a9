#!/usr/bin/env bash
# Zeroth-order fine-tuning with any ZO optimizer of the suite (OPTIM=mezo, zo_adamu, zo_sgd_sign, zo_sgd_mmt,
# zo_sgd_cons, zo_adam, hizoo, lozo, lozo_m, subzero, fzoo; `python -m zo.registry defaults OPTIM MODE` shows the
# LR / EPS it starts from). Environment variables set the run; extra flags come
# last and override. run.py puts checkpoints in a folder of their own for each configuration (result/output/...)
# and a rerun of the same command resumes from the newest complete one. Defaults are the reference's (1000 train / 500 dev / 1000 test, batch 16, 20k steps, dev
# evaluation and checkpoint every 4k steps, constant LR) on the embedded model.
#   TASK=SST2 MODE=lora bash mezo.sh                               # MeZO LoRA
#   OPTIM=zo_adamu TASK=SST2 MODE=prefix bash mezo.sh               # ZO-AdaMU with the paper's LR/EPS for prefix
#   OPTIM=lozo TASK=RTE MODE=ft bash mezo.sh --zo_rank 2 --zo_nu 50  # LOZO with the authors' OPT settings
#   MODEL=facebook/opt-13b TASK=SQuAD MODE=prefix LR=1e-2 EPS=1e-1 bash mezo.sh --non_diff --evaluation_strategy no --save_strategy no --save_model
set -euo pipefail
MODEL=${MODEL:-smollm2-135m}
TASK=${TASK:-SST2}
OPTIM=${OPTIM:-mezo}           # any --zo_optim (python -m zo.registry defaults OPTIM MODE)
MODE=${MODE:-ft}               # ft | prefix | lora
BS=${BS:-16}
SEED=${SEED:-0}
TRAIN=${TRAIN:-1000}
EVAL=${EVAL:-1000}
STEPS=${STEPS:-20000}
EVAL_STEPS=${EVAL_STEPS:-4000}
# per-task defaults (the dev size; the training objective is run.py's default) come from the task table in tasks.py
TASK_DEFAULTS=$(python "$(dirname "$0")/tasks.py" defaults "$TASK") || exit 2
eval "$TASK_DEFAULTS"
DEV=${DEV:-$TASK_DEV}

# the method's LR / EPS for the mode come from the optimizer registry (zo/registry.py: each class's mode_defaults);
# an unknown OPTIM or MODE is an error there that lists the valid names
HERE=$(cd "$(dirname "$0")" && pwd)
METHOD_DEFAULTS=$(PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" python -m zo.registry defaults "$OPTIM" "$MODE") || exit 2
eval "$METHOD_DEFAULTS"
LR=${LR:-$DEFAULT_LR}
EPS=${EPS:-$DEFAULT_EPS}

MODE_ARGS=()
case "$MODE" in
    ft) ;;
    prefix) MODE_ARGS=(--prefix_tuning --num_prefix 5) ;;
    lora) MODE_ARGS=(--lora) ;;
    *) echo "mezo.sh: unknown MODE=$MODE (ft | prefix | lora)" >&2; exit 2 ;;
esac

if [ -z "${PRECISION+set}" ]; then  # fp16 weights on GPUs as in the papers; fp32 on CPU
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then PRECISION=--load_float16; else PRECISION=; fi
fi

TAG=$OPTIM-$MODE-$STEPS-$BS-$LR-$EPS-$SEED
echo "mezo.sh: TAG=$TAG MODEL=$MODEL TASK=$TASK OPTIM=$OPTIM MODE=$MODE BS=$BS LR=$LR EPS=$EPS SEED=$SEED" \
     "TRAIN=$TRAIN DEV=$DEV EVAL=$EVAL STEPS=$STEPS EVAL_STEPS=$EVAL_STEPS PRECISION=${PRECISION:-fp32} extra: $*"

python "$(dirname "$0")/run.py" \
    --model_name "$MODEL" --task_name "$TASK" --tag "$TAG" \
    --train_set_seed "$SEED" --num_train "$TRAIN" --num_dev "$DEV" --num_eval "$EVAL" --logging_steps 10 \
    --max_steps "$STEPS" --trainer zo --zo_optim "$OPTIM" $PRECISION --learning_rate "$LR" --zo_eps "$EPS" \
    --per_device_train_batch_size "$BS" --lr_scheduler_type constant \
    --load_best_model_at_end --evaluation_strategy steps --save_strategy steps --save_total_limit 1 \
    --eval_steps "$EVAL_STEPS" --save_steps "$EVAL_STEPS" \
    "${MODE_ARGS[@]}" "$@"
