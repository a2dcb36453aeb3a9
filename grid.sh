#!/usr/bin/env bash
# A grid of fine-tuning runs into one folder that restarts where it stopped: rerun the same command after a kill (or a
# reboot) and every run whose result file exists is skipped, while a run that was cut off resumes from its newest
# complete checkpoint (run.py). Lists are space-separated; extra flags come last and go to every run.
#   LRS="1e-3 3e-3" SEEDS="0 1" MODES=lora EPSS=1e-2 bash grid.sh             # 4 runs into result/grid/
#   OPTIMS="mezo zo_adamu" MODES="ft lora prefix" OUT=result/big bash grid.sh --save_total_limit 1
#   OPTIMS="mezo lozo adam" MODES=lora FORWARDS=400 EVAL_FORWARDS=200 JOBS=2 \
#       LRS_mezo="3e-4 1e-3 3e-3" LRS_lozo="1e-4 3e-4 1e-3" LRS_adam="3e-5 1e-4 3e-4" bash grid.sh
#   python report.py result/grid --plot result/grid/plots                        # the table and the curves
# OPTIMS: --zo_optim names (python -m zo.registry list), and `adam`: first-order training (--trainer regular, torch's
# AdamW with weight decay 0, i.e. Adam). LRS_<optim> gives one method its own LR list; where neither it nor LRS is
# set, each method starts from its registry LR for the mode, and EPSS unset gives each its registry ε (python run.py
# --help lists both with their sources).
# Budgets: STEPS optimizer steps per run, or FORWARDS training forward passes, which each method turns into
# ⌊FORWARDS / its forward passes a step⌋ steps (2 for MeZO, 3 for HiZOO, N+1 for FZOO, ...; --zo_num_directions among
# the extra flags counts); Adam's step is one forward and one backward, so Adam runs FORWARDS steps. Dev evaluation
# and checkpoints every EVAL_STEPS steps, or every EVAL_FORWARDS forward passes.
# STOP_AT (seconds since the epoch, as `date +%s` prints): no run starts at or after that time; runs already going
# finish, the ones left are listed and the grid exits 1 (rerun to continue). For a machine lent for a fixed time.
# JOBS runs at a time (default 1), each with THREADS torch threads (default: the cores / JOBS). A run holds a lock
# ($OUT/locks/<name>.lock) while it trains, so two grids sharing a folder never run the same configuration: the second
# skips it and says so.
# Each run writes $OUT/<name>.json and keeps its checkpoints in $OUT/output/<name>/. The name holds every swept value
# and size, plus a hash of the extra flags, so a changed command never mistakes another grid's results for its own.
# Within one run the seed sets both the training draw (--train_set_seed) and the trainer's seed (--seed).
# Exit status: 0 when every run has its result; 1 when some failed or were running in another grid (listed at the end;
# the others still ran); a run stopped by a signal (Ctrl-C, SIGTERM: run.py checkpoints first) stops the grid with
# that run's status, after the runs still going have checkpointed and stopped too.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL=${MODEL:-smollm2-135m}
TASK=${TASK:-SST2}
OPTIMS=${OPTIMS:-mezo}
MODES=${MODES:-ft}               # ft | lora | prefix | head
SEEDS=${SEEDS:-0}
BS=${BS:-16}
TRAIN=${TRAIN:-1000}
EVAL=${EVAL:-1000}
STEPS=${STEPS:-20000}
EVAL_STEPS=${EVAL_STEPS:-4000}
FORWARDS=${FORWARDS:-}
EVAL_FORWARDS=${EVAL_FORWARDS:-}
JOBS=${JOBS:-1}
STOP_AT=${STOP_AT:-}
OUT=${OUT:-result/grid}
TASK_DEFAULTS=$(python "$HERE/tasks.py" defaults "$TASK") || exit 2
eval "$TASK_DEFAULTS"
DEV=${DEV:-$TASK_DEV}

for MODE in $MODES; do
    case "$MODE" in ft|lora|prefix|head) ;; *) echo "grid.sh: unknown mode '$MODE' in MODES (ft | lora | prefix | head)" >&2; exit 2 ;; esac
done
for LIST in OPTIMS MODES SEEDS; do
    if [ -z "${!LIST// /}" ]; then echo "grid.sh: $LIST is empty; give at least one value" >&2; exit 2; fi
done
for LIST in LRS EPSS; do
    if [ -n "${!LIST+set}" ] && [ -z "${!LIST// /}" ]; then
        echo "grid.sh: $LIST is empty; give at least one value (or unset it for each method's registry value)" >&2; exit 2
    fi
done
for NUMBER in JOBS ${STOP_AT:+STOP_AT} ${FORWARDS:+FORWARDS} ${EVAL_FORWARDS:+EVAL_FORWARDS} ${THREADS:+THREADS}; do
    if ! [[ ${!NUMBER} =~ ^[1-9][0-9]*$ ]]; then echo "grid.sh: $NUMBER=${!NUMBER} is not a positive integer" >&2; exit 2; fi
done
if [ -n "$EVAL_FORWARDS" ] && [ -z "$FORWARDS" ]; then
    echo "grid.sh: EVAL_FORWARDS counts forward passes; give the budget in FORWARDS too (or use STEPS and EVAL_STEPS)" >&2
    exit 2
fi
if [ -z "${PRECISION+set}" ]; then  # fp16 weights on GPUs as in the papers; fp32 on CPU
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then PRECISION=--load_float16; else PRECISION=; fi
fi
if [ -z "${THREADS:-}" ]; then
    THREADS=$(( $(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1) / JOBS )); [ "$THREADS" -ge 1 ] || THREADS=1
fi
DIRECTIONS=""   # --zo_num_directions among the extra flags: it changes a ZO method's forward passes a step
for ((i = 1; i <= $#; i++)); do
    case "${!i}" in
        --zo_num_directions) j=$((i + 1)); DIRECTIONS=${!j:-} ;;
        --zo_num_directions=*) DIRECTIONS=${!i#*=} ;;
    esac
done
EXTRA=""
if [ $# -gt 0 ]; then EXTRA=-x$(printf '%s\0' "$@" | cksum | cut -d' ' -f1); fi

mkdir -p "$OUT/locks"
declare -A RUN_NAME=() RUN_LOCK=()
total=0; done_=0; ran=0; failed=(); busy=(); late=(); stop=0

finish() {  # the run with this pid has ended with this status
    local pid=$1 status=$2 name=${RUN_NAME[$1]} fd=${RUN_LOCK[$1]}
    exec {fd}>&-   # the run's lock (the run itself, gone, held the other copy)
    unset "RUN_NAME[$pid]" "RUN_LOCK[$pid]"
    if [ "$status" -ge 128 ]; then   # stopped by a signal: so is the grid (rerun the command to go on)
        echo "grid.sh: stopped during $name (exit $status); rerun the same command to continue" >&2
        [ "$stop" -ne 0 ] || stop=$status
    elif [ "$status" -ne 0 ]; then
        failed+=("$name (exit $status)")
    else
        ran=$((ran + 1)); done_=$((done_ + 1))
        echo "grid.sh: $name: done"
    fi
}

reap() {  # wait until fewer than $1 runs are going (bash >= 4.3: wait -n)
    local pid status
    while [ ${#RUN_NAME[@]} -ge "$1" ] && [ ${#RUN_NAME[@]} -gt 0 ]; do
        wait -n || true
        for pid in "${!RUN_NAME[@]}"; do
            if ! kill -0 "$pid" 2>/dev/null; then status=0; wait "$pid" || status=$?; finish "$pid" "$status"; fi
        done
    done
}

interrupted() {  # Ctrl-C or SIGTERM to the grid: every run checkpoints and stops, then the grid exits
    trap - INT TERM
    [ ${#RUN_NAME[@]} -eq 0 ] || kill -TERM "${!RUN_NAME[@]}" 2>/dev/null || true
    reap 1
    echo "grid.sh: interrupted; rerun the same command to continue" >&2
    exit "$1"
}
trap 'interrupted 130' INT
trap 'interrupted 143' TERM

for OPTIM in $OPTIMS; do for MODE in $MODES; do
    if [ "$OPTIM" = adam ]; then
        DEFAULT_LR=1e-4; DEFAULT_EPS=""; PER_STEP=1   # Adam: one forward (and one backward) a step
    else
        METHOD_DEFAULTS=$(PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" python -m zo.registry defaults "$OPTIM" "$MODE") || exit 2
        eval "$METHOD_DEFAULTS"
        PER_STEP=$(PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" python -m zo.registry forwards "$OPTIM" ${DIRECTIONS:+"$DIRECTIONS"}) || exit 2
    fi
    OWN_LRS=LRS_$OPTIM
    LR_LIST=${!OWN_LRS:-${LRS:-$DEFAULT_LR}}
    EPS_LIST=${EPSS:-$DEFAULT_EPS}
    [ "$OPTIM" != adam ] || EPS_LIST=-   # ε is a ZO setting: one Adam run per LR
    RUN_STEPS=$STEPS; RUN_EVAL=$EVAL_STEPS
    if [ -n "$FORWARDS" ]; then
        RUN_STEPS=$((FORWARDS / PER_STEP)); RUN_EVAL=$(( ${EVAL_FORWARDS:-$FORWARDS} / PER_STEP ))
        if [ "$RUN_STEPS" -lt 1 ] || [ "$RUN_EVAL" -lt 1 ]; then
            echo "grid.sh: $OPTIM takes $PER_STEP forward passes a step; FORWARDS=$FORWARDS EVAL_FORWARDS=${EVAL_FORWARDS:-} leave no step" >&2
            exit 2
        fi
    fi
    for LR in $LR_LIST; do for EPS in $EPS_LIST; do for SEED in $SEEDS; do
        total=$((total + 1))
        if [ "$OPTIM" = adam ]; then
            NAME=$TASK-$(basename "$MODEL")-adam-$MODE-lr$LR-seed$SEED-steps$RUN_STEPS-bs$BS-n$TRAIN-$DEV-$EVAL$EXTRA
            METHOD_ARGS=(--trainer regular --optim adamw_torch --weight_decay 0)
        else
            NAME=$TASK-$(basename "$MODEL")-$OPTIM-$MODE-lr$LR-eps$EPS-seed$SEED-steps$RUN_STEPS-bs$BS-n$TRAIN-$DEV-$EVAL$EXTRA
            METHOD_ARGS=(--trainer zo --zo_optim "$OPTIM" --zo_eps "$EPS")
        fi
        if [ -f "$OUT/$NAME.json" ]; then
            echo "grid.sh: [$total] $NAME: result exists, skipped"
            done_=$((done_ + 1))
            continue
        fi
        [ "$stop" -eq 0 ] || break 5
        reap "$JOBS"
        [ "$stop" -eq 0 ] || break 5
        if [ -n "$STOP_AT" ] && [ "$(date +%s)" -ge "$STOP_AT" ]; then
            echo "grid.sh: [$total] $NAME: not started (STOP_AT $STOP_AT has passed)"
            late+=("$NAME")
            continue
        fi
        exec {lock}>"$OUT/locks/$NAME.lock"
        if ! flock -n "$lock"; then
            exec {lock}>&-
            echo "grid.sh: [$total] $NAME: running in another grid, skipped"
            busy+=("$NAME")
            continue
        fi
        MODE_ARGS=()
        case "$MODE" in
            lora) MODE_ARGS=(--lora) ;;
            prefix) MODE_ARGS=(--prefix_tuning --num_prefix 5) ;;
            head) MODE_ARGS=(--head_tuning) ;;
        esac
        echo "grid.sh: [$total] $NAME: running"
        # the run inherits the lock's descriptor: a run that outlives a killed grid keeps its configuration locked
        OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS python "$HERE/run.py" \
            --model_name "$MODEL" --task_name "$TASK" "${METHOD_ARGS[@]}" $PRECISION \
            --learning_rate "$LR" --seed "$SEED" --train_set_seed "$SEED" \
            --num_train "$TRAIN" --num_dev "$DEV" --num_eval "$EVAL" --max_steps "$RUN_STEPS" \
            --per_device_train_batch_size "$BS" --lr_scheduler_type constant --logging_steps 10 \
            --eval_strategy steps --eval_steps "$RUN_EVAL" --save_strategy steps --save_steps "$RUN_EVAL" \
            --load_best_model_at_end --save_total_limit 1 \
            --output_dir "$OUT/output/$NAME" --result_file "$OUT/$NAME.json" \
            "${MODE_ARGS[@]}" "$@" &
        RUN_NAME[$!]=$NAME; RUN_LOCK[$!]=$lock
    done; done; done
done; done
reap 1
trap - INT TERM

if [ "$stop" -ne 0 ]; then
    exit "$stop"
fi
echo "grid.sh: $done_ of $total runs have results in $OUT ($ran run now, $((done_ - ran)) skipped)"
if [ ${#busy[@]} -gt 0 ]; then
    printf 'grid.sh: running in another grid (rerun this command when it is done): %s\n' "${busy[@]}" >&2
fi
if [ ${#late[@]} -gt 0 ]; then
    printf 'grid.sh: not started before STOP_AT (rerun this command to run them): %s\n' "${late[@]}" >&2
fi
if [ ${#failed[@]} -gt 0 ]; then
    printf 'grid.sh: failed: %s\n' "${failed[@]}" >&2
fi
if [ ${#failed[@]} -gt 0 ] || [ ${#busy[@]} -gt 0 ] || [ ${#late[@]} -gt 0 ]; then
    exit 1
fi
