#!/usr/bin/env bash
# A grid of zeroth-order fine-tuning runs into one folder that restarts where it stopped: rerun the same command
# after a kill (or a reboot) and every run whose result file exists is skipped, while a run that was cut off resumes
# from its newest complete checkpoint (run.py). Lists are space-separated; extra flags come last and go to every run.
#   LRS="1e-3 3e-3" SEEDS="0 1" MODES=lora EPSS=1e-2 bash grid.sh             # 4 runs into result/grid/
#   OPTIMS="mezo zo_adamu" MODES="ft lora prefix" OUT=result/big bash grid.sh --save_total_limit 1
#   python report.py result/grid --plot result/grid/plots                        # the table and the curves
# Each run writes $OUT/<name>.json and keeps its checkpoints in $OUT/output/<name>/. The name holds every swept value
# and size, plus a hash of the extra flags, so a changed command never mistakes another grid's results for its own.
# Within one run the seed sets both the training draw (--train_set_seed) and the trainer's seed (--seed).
# Exit status: 0 when every run has its result; 1 when some failed (listed at the end; the others still ran);
# a run stopped by a signal (Ctrl-C, SIGTERM: run.py checkpoints first) stops the grid with that run's status.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL=${MODEL:-smollm2-135m}
TASK=${TASK:-SST2}
OPTIMS=${OPTIMS:-mezo}           # --zo_optim names (python -c "import zo_methods; print(list(zo_methods.OPTIMIZERS))")
MODES=${MODES:-ft}               # ft | lora | prefix | head
LRS=${LRS:-1e-5}
EPSS=${EPSS:-1e-3}
SEEDS=${SEEDS:-0}
BS=${BS:-16}
TRAIN=${TRAIN:-1000}
EVAL=${EVAL:-1000}
STEPS=${STEPS:-20000}
EVAL_STEPS=${EVAL_STEPS:-4000}
OUT=${OUT:-result/grid}
TASK_DEFAULTS=$(python "$HERE/tasks.py" defaults "$TASK") || exit 2
eval "$TASK_DEFAULTS"
DEV=${DEV:-$TASK_DEV}

for MODE in $MODES; do
    case "$MODE" in ft|lora|prefix|head) ;; *) echo "grid.sh: unknown mode '$MODE' in MODES (ft | lora | prefix | head)" >&2; exit 2 ;; esac
done
for LIST in OPTIMS MODES LRS EPSS SEEDS; do
    if [ -z "${!LIST// /}" ]; then echo "grid.sh: $LIST is empty; give at least one value" >&2; exit 2; fi
done
if [ -z "${PRECISION+set}" ]; then  # fp16 weights on GPUs as in the papers; fp32 on CPU
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then PRECISION=--load_float16; else PRECISION=; fi
fi
EXTRA=""
if [ $# -gt 0 ]; then EXTRA=-x$(printf '%s\0' "$@" | cksum | cut -d' ' -f1); fi

mkdir -p "$OUT"
total=0; done_=0; ran=0; failed=()
for OPTIM in $OPTIMS; do for MODE in $MODES; do for LR in $LRS; do for EPS in $EPSS; do for SEED in $SEEDS; do
    total=$((total + 1))
    NAME=$TASK-$(basename "$MODEL")-$OPTIM-$MODE-lr$LR-eps$EPS-seed$SEED-steps$STEPS-bs$BS-n$TRAIN-$DEV-$EVAL$EXTRA
    if [ -f "$OUT/$NAME.json" ]; then
        echo "grid.sh: [$total] $NAME: result exists, skipped"
        done_=$((done_ + 1))
        continue
    fi
    MODE_ARGS=()
    case "$MODE" in
        lora) MODE_ARGS=(--lora) ;;
        prefix) MODE_ARGS=(--prefix_tuning --num_prefix 5) ;;
        head) MODE_ARGS=(--head_tuning) ;;
    esac
    echo "grid.sh: [$total] $NAME: running"
    status=0
    python "$HERE/run.py" \
        --model_name "$MODEL" --task_name "$TASK" --trainer zo --zo_optim "$OPTIM" $PRECISION \
        --learning_rate "$LR" --zo_eps "$EPS" --seed "$SEED" --train_set_seed "$SEED" \
        --num_train "$TRAIN" --num_dev "$DEV" --num_eval "$EVAL" --max_steps "$STEPS" \
        --per_device_train_batch_size "$BS" --lr_scheduler_type constant --logging_steps 10 \
        --eval_strategy steps --eval_steps "$EVAL_STEPS" --save_strategy steps --save_steps "$EVAL_STEPS" \
        --load_best_model_at_end --save_total_limit 1 \
        --output_dir "$OUT/output/$NAME" --result_file "$OUT/$NAME.json" \
        "${MODE_ARGS[@]}" "$@" || status=$?
    if [ "$status" -ge 128 ]; then  # the run was stopped by a signal: so is the grid (rerun the command to go on)
        echo "grid.sh: stopped during $NAME (exit $status); rerun the same command to continue" >&2
        exit "$status"
    elif [ "$status" -ne 0 ]; then
        failed+=("$NAME (exit $status)")
    else
        ran=$((ran + 1)); done_=$((done_ + 1))
    fi
done; done; done; done; done

echo "grid.sh: $done_ of $total runs have results in $OUT ($ran run now, $((done_ - ran)) skipped)"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'grid.sh: failed: %s\n' "${failed[@]}" >&2
    exit 1
fi
