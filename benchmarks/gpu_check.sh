#!/usr/bin/env bash
# GPU verification (DESIGN.md §5) on an H100/H200 machine with torch, Triton and transformers preinstalled and no
# network: build blip_fast (and its CUDA extension), run the GPU tests, run the benchmarks against their baselines.
#
#   bash benchmarks/gpu_check.sh OUT_DIR             # full check, <= 480 s of step budgets
#   bash benchmarks/gpu_check.sh --quick OUT_DIR     # ~3 min rerun after a fix: no CUDA-extension build, the core
#   bash benchmarks/gpu_check.sh --plan              # print the steps and their budgets, run nothing
#   BLIP_FAST_GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh OUT_DIR    # CPU rehearsal: same steps, tiny configs
#
# OUT_DIR gets three files, all rewritten after every step (and the archive every 20 s within one), so a run killed
# at any moment returns what it did (the device machine returns at most 8 files, nothing buffered):
#   summary.md      the steps table, environment + build + resolved backends, every result table, failing logs' tails
#   steps.tsv       step, budget_s, status (pending/running/ok/failed/timeout/skipped), rc, seconds
#   results.tar.gz  gpu_check/: each step's log, each benchmark's JSON lines (appended row by row) and table
# Steps run in order of value, each killed at its budget (a step may use what earlier steps left unused, never
# later steps' time). Steps past the total budget run only on time left over. Environment: PYTHON (default
# python3), BLIP_FAST_GPU_CHECK_STEPS=a,b (only these), BLIP_FAST_GPU_CHECK_BUDGET_S (total, default 480 / 180),
# BLIP_FAST_GPU_CHECK_BUDGET_SCALE=N (every budget times N, for a rehearsal on a slow or shared machine),
# BLIP_FAST_GPU_CHECK_WHEELS (default .whl: wheels to install first, see benchmarks/gpu_wheels.sh).
set -uo pipefail

# ---------------------------------------------------------------------------------------------- the steps
# step NAME FULL_S QUICK_S COMMAND...  (QUICK_S 0: not in --quick). Adding a check is one line here.
# between FUNCTION                     (runs in this shell between steps: state the later steps need)
checks() {
    between use_carried_wheels
    step environment 15 15 "$PY" -m benchmarks.gpu_env --stage machine --out "$WORK"
    between prepare_build
    step build 120 0 "${BUILD[@]}"
    between use_built_tree
    step backends 15 15 "$PY" -m benchmarks.gpu_env --stage build --out "$WORK" ${BUILT:+--expect-extension}
    # The GPU code proven correct: fast core first (HF parity, CUDA graphs, the CUDA op), then the Triton kernels.
    step tests_core 45 45 "$PY" -m pytest "${PYTEST[@]}" -m gpu -k "not test_matches_reference" \
        tests/test_gpu_parity.py tests/test_decode_engine.py tests/test_decode_attention_cuda.py \
        tests/test_pretrain.py tests/test_capfilt_images.py tests/test_fp8.py --junitxml="$WORK/tests_core.xml"
    step tests_kernels 50 40 "$PY" -m pytest "${PYTEST[@]}" "${XDIST[@]}" -m gpu tests/test_itc_kernel.py \
        tests/test_itm_negatives_kernel.py tests/test_decode_attention_kernel.py tests/test_lm_head_loss.py \
        --junitxml="$WORK/tests_kernels.xml"
    # The real CLI (DataLoader workers, pinned memory, lazily captured CUDA graphs) on tar shards; tiny models, one
    # run (--repeats 0): the path is the point here, the throughput of base models is bench_capfilt's.
    step capfilt_cli 35 30 "$PY" -m benchmarks.capfilt_cli "${CAPFILT_CLI[@]}" --out "$WORK" --name capfilt_cli
    # One row per headline benchmark, against its baseline in the same process.
    step generate 40 30 "$PY" -m benchmarks.bench_generate "${MODEL[@]}" "${GENERATE[@]}" --cases greedy_bs256 \
        --check-tokens --out "$WORK" --name generate
    step itc 20 0 "$PY" -m benchmarks.bench_itc "${DEV[@]}" --batches "$ITC_HEADLINE" --out "$WORK" --name itc
    step vit 20 0 "$PY" -m benchmarks.bench_vit "${MODEL[@]}" --batches 256 --out "$WORK" --name vit
    step decode_attention 20 0 "$PY" -m benchmarks.bench_decode_attention "${DEV[@]}" --images "$DECODE_HEADLINE" \
        --out "$WORK" --name decode_attention
    step itm_negatives 20 0 "$PY" -m benchmarks.bench_itm_negatives "${DEV[@]}" --out "$WORK" --name itm_negatives
    step capfilt 35 0 "$PY" -m benchmarks.bench_capfilt "${MODEL[@]}" --cases k1_bs64 --out "$WORK" --name capfilt
    # Issue 15: the fast path (fused kernels, shared cross K/V, fused LM loss) against the reference, eager both.
    step pretrain_bf16 30 0 "$PY" -m benchmarks.bench_pretrain "${PRETRAIN[@]}" --paths "reference:$LOW,fast:$LOW" \
        --no-compile --out "$WORK" --name pretrain_bf16
    step tests_sweep 20 0 "$PY" -m pytest "${PYTEST[@]}" "${XDIST[@]}" -m gpu -k test_matches_reference \
        tests/test_decode_attention_cuda.py --junitxml="$WORK/tests_sweep.xml"
    # The rest: past the 480 s of budgets, run on the time the steps above left unused.
    # Issue 12's cost metrics on the GPU: CUDA kernels per generated token (profiler), host syncs per call.
    step costs 40 0 env BLIP_FAST_COMPILE=0 "$PY" -m benchmarks.bench_costs "${COSTS[@]}" --baseline none \
        --sections decoding,calls --out "$WORK" --name costs
    step generate_rest 60 0 "$PY" -m benchmarks.bench_generate "${MODEL[@]}" "${GENERATE[@]}" \
        --cases greedy_bs1,greedy_bs64,beam3,nucleus --check-tokens --out "$WORK" --name generate_rest
    step generate_fp32_parity 40 0 "$PY" -m benchmarks.bench_generate "${MODEL[@]}" --dtype fp32 \
        --batch-scale 0.125 --cases greedy_bs1,greedy_bs64,beam3 --warmup 0 --repeats 1 --check-tokens \
        --out "$WORK" --name generate_fp32_parity
    step decode_attention_rest 25 0 "$PY" -m benchmarks.bench_decode_attention "${DEV[@]}" --images "$DECODE_REST" \
        --out "$WORK" --name decode_attention_rest
    step itc_rest 30 0 "$PY" -m benchmarks.bench_itc "${DEV[@]}" --batches "$ITC_REST" --out "$WORK" --name itc_rest
    step vit_rest 20 0 "$PY" -m benchmarks.bench_vit "${MODEL[@]}" --batches 1,64 --out "$WORK" --name vit_rest
    step capfilt_rest 40 0 "$PY" -m benchmarks.bench_capfilt "${MODEL[@]}" --cases k3_bs64,k5_bs32 --out "$WORK" \
        --name capfilt_rest
    step pretrain_fp32 30 0 "$PY" -m benchmarks.bench_pretrain "${PRETRAIN[@]}" --paths reference:fp32 \
        --out "$WORK" --name pretrain_fp32
    # The compiled layers (compile time in first_call_ms).
    # Issue 15: input pipeline, PIL in workers vs nvJPEG + augmentation on the GPU.
    step input 40 0 "$PY" -m benchmarks.bench_input "${INPUT[@]}" --out "$WORK" --name input
    # Issue 12: CapFilt's input at 384 px, PIL in workers vs bytes from workers + nvJPEG and resize on the GPU.
    # Issue 12: the optional FP8 ViT (BLIP_FAST_VIT_FP8): state errors and task agreement against fp32, img/s.
    step fp8_vit 40 0 "$PY" -m benchmarks.bench_fp8_vit "${FP8[@]}" --out "$WORK" --name fp8_vit
    step capfilt_input 30 0 "$PY" -m benchmarks.bench_input --task capfilt --image-size 384 "${INPUT[@]}" \
        --out "$WORK" --name capfilt_input
    step pretrain_compiled 90 0 "$PY" -m benchmarks.bench_pretrain "${PRETRAIN[@]}" --paths "fast:$LOW" "${COMPILE[@]}" \
        --out "$WORK" --name pretrain_compiled
}

# Sizes: base shapes in fp16 on the GPU; tiny ones on a CPU for the dry run.
configure() {
    if [ "$DRY" = 1 ]; then
        export CUDA_VISIBLE_DEVICES=""  # behave like a machine without a GPU
        hide_missing_packages
        MODEL=(--config tiny --dtype fp32 --device cpu --batch-scale 0.02 --warmup 0 --repeats 1)
        DEV=(--device cpu --warmup 0 --repeats 1) GENERATE=(--new-tokens 6 --copy-mb 8)
        PRETRAIN=(--config tiny --batch 4 --device cpu --warmup 0 --repeats 1)
        COMPILE=(--no-compile)  # inductor on a CPU compiles for minutes
        INPUT=(--device cpu --workers 0 --images 8 --batch 4 --batches 2)
        CAPFILT_CLI=(--config tiny --device cpu --shards 2 --per-shard 4 --batch-size 4 --source-size 64 --repeats 0)
        ITC_HEADLINE=33 ITC_REST=8 DECODE_HEADLINE=4 DECODE_REST=2,1 LOW=fp32 COSTS=(--config tiny --device cpu)
        FP8=(--device cpu --config tiny --image-sizes 64 --batch 1)
        BUILD=("$PY" setup.py --version)  # the build decision only: never reinstall the developer's environment
    else
        MODEL=(--config base --dtype fp16 --device cuda --repeats 5) DEV=(--device cuda) GENERATE=()
        PRETRAIN=(--config base --batch 32 --device cuda) COMPILE=(--compile)
        INPUT=(--device cuda --workers 4,8 --images 256 --batch 96 --batches 6)
        CAPFILT_CLI=(--config tiny --device cuda --shards 4 --per-shard 32 --batch-size 32 --repeats 0)
        ITC_HEADLINE=4096 ITC_REST=1024,32768 DECODE_HEADLINE=256 DECODE_REST=64,1 LOW=bf16
        COSTS=(--config base --device cuda)
        FP8=(--device cuda --dtype fp16 --batch 8 --speed-batch 256 --repeats 5)
        BUILD=("$PY" -m pip install -v --no-index --no-deps --no-build-isolation -e .)
    fi
    # -v: a step killed at its budget still shows in its log which test was running; durations size the next budgets.
    PYTEST=(-v -rfEs --durations=15 -p no:cacheprovider -o console_output_style=classic)
    XDIST=()
    if [ "$DRY" != 1 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then XDIST=(-n 4); fi  # parallel Triton compiles
}

# The GPU machine has neither deepspeed nor webdataset: the dry run hides them (any import of them fails), so a
# step that would need them fails here first.
hide_missing_packages() {
    local site
    site="$(mktemp -d)"
    printf '%s\n' "import sys" "sys.modules.update(deepspeed=None, webdataset=None)" >"$site/sitecustomize.py"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}

# ---------------------------------------------------------------------------------------------- between steps
use_carried_wheels() {
    # What the GPU machine lacks (liger-kernel, the LM loss's CUDA kernel), fetched here by benchmarks/gpu_wheels.sh
    # into .whl/ and carried: installed beside the work folder, first on PYTHONPATH (the environment step lists it).
    local wheels=("${BLIP_FAST_GPU_CHECK_WHEELS:-$ROOT/.whl}"/*.whl) site
    [ -e "${wheels[0]}" ] || return 0
    site="$(dirname "$WORK")/site"  # beside the work folder: not packed into the archive
    if "$PY" -m pip install --no-index --no-deps --no-compile --target "$site" "${wheels[@]}" \
        >"$WORK/logs/wheels.log" 2>&1; then
        export PYTHONPATH="$site:$PYTHONPATH"
    else
        echo "carried wheels not installed (see logs/wheels.log)"
    fi
}

prepare_build() {
    # csrc/cuda_env.py: a CUDA_HOME that really holds a toolkit, TORCH_CUDA_ARCH_LIST = this GPU's capability.
    "$PY" csrc/cuda_env.py >"$WORK/logs/cuda_env.txt" 2>&1
    eval "$(grep -E '^(export|unset) ' "$WORK/logs/cuda_env.txt")"
    export MAX_JOBS="${MAX_JOBS:-4}"
}

use_built_tree() {
    # After an editable install, blip_fast (with blip_fast.kernels mapped from kernels/) imports from the tree.
    # Otherwise run from a mirror (symlinks) whose blip_fast/ holds kernels/ as an install would map it.
    BUILT=""
    local build
    build=$(index_of build)
    if [ "$DRY" != 1 ] && [ "$build" -ge 0 ] && [ "${STATUS[$build]}" = ok ]; then BUILT=1; fi
    if (cd "$ROOT" && "$PY" -c "import blip_fast.kernels") >/dev/null 2>&1; then return; fi
    local mirror
    mirror="$(mktemp -d)"
    for entry in "$ROOT"/* "$ROOT"/.ci; do [ "$(basename "$entry")" = blip_fast ] || ln -s "$entry" "$mirror/"; done
    mkdir "$mirror/blip_fast"
    for entry in "$ROOT"/blip_fast/*; do ln -s "$entry" "$mirror/blip_fast/"; done
    ln -s "$ROOT/kernels" "$mirror/blip_fast/kernels"
    cd "$mirror" || return
    export PYTHONPATH="$mirror${PYTHONPATH:+:$PYTHONPATH}"
    echo "running from a mirror of the source tree: $mirror" | tee -a "$WORK/logs/build.log"
}

# ---------------------------------------------------------------------------------------------- machinery
NAMES=() BUDGETS=() STATUS=() RCS=() SECS=() CUMULATIVE=()

index_of() {
    local i
    for i in "${!NAMES[@]}"; do [ "${NAMES[$i]}" = "$1" ] && echo "$i" && return; done
    echo -1
}

selected() {  # whether BLIP_FAST_GPU_CHECK_STEPS (if set) names this step
    [ -z "${BLIP_FAST_GPU_CHECK_STEPS:-}" ] || [[ ",$BLIP_FAST_GPU_CHECK_STEPS," == *",$1,"* ]]
}

between() {
    [ "$PHASE" = run ] && "$@"
    return 0
}

step() {
    local name="$1" full="$2" quick="$3"
    shift 3
    local budget=$full
    [ "$QUICK" = 1 ] && budget=$quick
    if [ -n "${BLIP_FAST_GPU_CHECK_STEPS:-}" ] && [ "$budget" = 0 ]; then budget=$full; fi
    budget=$((budget * SCALE))
    if [ "$PHASE" = plan ]; then
        if [ "$budget" -gt 0 ] && selected "$name"; then
            NAMES+=("$name") BUDGETS+=("$budget") STATUS+=(pending) RCS+=(-) SECS+=(-)
        fi
        return 0
    fi
    local i
    i=$(index_of "$name")
    [ "$i" -ge 0 ] && run_step "$i" "$@"
    return 0
}

# run_step INDEX COMMAND...: run with a timeout at the step's end of budget, log to WORK/logs/NAME.log, record.
run_step() {
    local i=$1
    shift
    local name=${NAMES[$i]} started now limit pid rc status last_pack
    started=$(date +%s)
    limit=$((START + CUMULATIVE[i] - started))
    [ $((END - started)) -lt "$limit" ] && limit=$((END - started))
    if [ "$limit" -lt 5 ]; then
        STATUS[i]=skipped RCS[i]=- SECS[i]=0
        echo "== $name: skipped, no time left"
        write_outputs
        return
    fi
    STATUS[i]=running
    write_outputs
    echo "== [$((i + 1))/${#NAMES[@]}] $name: up to ${limit}s (budget ${BUDGETS[$i]}s)"
    timeout --kill-after=5 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1 </dev/null &
    pid=$!
    CHILD=$pid
    last_pack=$(date +%s)
    while kill -0 "$pid" 2>/dev/null; do
        sleep 0.2
        now=$(date +%s)
        if [ $((now - last_pack)) -ge 20 ]; then pack; last_pack=$now; fi
    done
    wait "$pid"
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    STATUS[i]=$status RCS[i]=$rc SECS[i]=$(($(date +%s) - started))
    tail -n 3 "$WORK/logs/$name.log" | cut -c1-200
    echo "== $name: $status (rc $rc, ${SECS[$i]}s)"
    write_outputs
}

# Atomic rewrites: a file in OUT is always complete (NAME.part, then a rename within OUT).
publish() {
    mv -f "$OUT/$1.part" "$OUT/$1"
}

pack() {
    # Exit status 1: a file grew while being read (a step appending rows); the archive is still whole.
    tar -czf "$OUT/results.tar.gz.part" -C "$(dirname "$WORK")" "$(basename "$WORK")" 2>/dev/null
    [ $? -le 1 ] && publish results.tar.gz
}

write_outputs() {
    local i
    {
        printf 'step\tbudget_s\tstatus\trc\tseconds\n'
        for i in "${!NAMES[@]}"; do
            printf '%s\t%s\t%s\t%s\t%s\n' "${NAMES[$i]}" "${BUDGETS[$i]}" "${STATUS[$i]}" "${RCS[$i]}" "${SECS[$i]}"
        done
    } >"$OUT/steps.tsv.part" && publish steps.tsv
    cp "$OUT/steps.tsv" "$WORK/steps.tsv"
    summary >"$OUT/summary.md.part" && publish summary.md
    pack
}

summary() {
    local i name
    echo "# blip_fast GPU check"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ): $MODE, $(($(date +%s) - START)) s of $((END - START)) s used;" \
        "blip_fast $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')."
    echo "Every log, JSON line and table is in results.tar.gz (gpu_check/)."
    echo
    echo "| step | budget_s | status | rc | seconds |"
    echo "|---|---|---|---|---|"
    for i in "${!NAMES[@]}"; do
        echo "| ${NAMES[$i]} | ${BUDGETS[$i]} | ${STATUS[$i]} | ${RCS[$i]} | ${SECS[$i]} |"
    done
    echo
    for name in "${NAMES[@]}"; do  # environment.md (the environment and backends steps') comes first
        [ -f "$WORK/$name.md" ] && cat "$WORK/$name.md" && echo
    done
    for i in "${!NAMES[@]}"; do
        case ${STATUS[$i]} in
            failed | timeout | killed)
                echo "### ${NAMES[$i]}: ${STATUS[$i]} (last lines of its log)"
                echo
                echo '```'
                grep -v '^\s*$' "$WORK/logs/${NAMES[$i]}.log" 2>/dev/null | tail -n 25 | cut -c1-300
                echo '```'
                echo
                ;;
        esac
    done
}

on_signal() {
    local i
    [ -n "${CHILD:-}" ] && kill -TERM "$CHILD" 2>/dev/null  # timeout passes it on to the step
    for i in "${!NAMES[@]}"; do [ "${STATUS[$i]}" = running ] && STATUS[i]=killed; done
    write_outputs
    exit 143
}

print_plan() {
    local i total=0 note
    printf '%-24s %8s\n' step budget_s
    for i in "${!NAMES[@]}"; do
        total=$((total + BUDGETS[i]))
        note=""
        [ "$total" -gt "$TOTAL" ] && note="  (on time left over)"
        printf '%-24s %8s%s\n' "${NAMES[$i]}" "${BUDGETS[$i]}" "$note"
    done
    echo "total budget: $TOTAL s ($MODE); steps' budgets add up to $total s"
}

main() {
    QUICK=0
    local plan_only=0
    while [ $# -gt 0 ]; do
        case $1 in
            --quick) QUICK=1 ;;
            --plan) plan_only=1 ;;
            -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
            -*) echo "unknown option $1" >&2; exit 2 ;;
            *) break ;;
        esac
        shift
    done
    if [ $plan_only = 0 ] && [ $# -ne 1 ]; then
        echo "usage: $0 [--quick] [--plan] OUT_DIR" >&2
        exit 2
    fi
    cd "$(dirname "$0")/.." || exit 2
    ROOT="$PWD"
    PY="${PYTHON:-python3}"
    DRY="${BLIP_FAST_GPU_CHECK_DRY:-0}"
    MODE="$([ "$QUICK" = 1 ] && echo quick || echo full)$([ "$DRY" = 1 ] && echo ', dry run on CPU')"
    SCALE="${BLIP_FAST_GPU_CHECK_BUDGET_SCALE:-1}"  # a whole factor on every budget: a rehearsal on a slow machine
    TOTAL="${BLIP_FAST_GPU_CHECK_BUDGET_S:-$((SCALE * ($([ "$QUICK" = 1 ] && echo 180 || echo 480))))}"
    configure
    if [ $plan_only = 1 ]; then PHASE=plan WORK=WORK; checks; print_plan; exit 0; fi

    mkdir -p "$1" || exit 2
    OUT="$(cd "$1" && pwd)"
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/blip_fast_gpu_check.XXXXXX")/gpu_check"
    export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    run_checks
    echo
    sed -n '/^| step/,/^$/p' "$OUT/summary.md"
    echo "wrote $OUT: $(cd "$OUT" && echo *)"
    local i
    for i in "${!STATUS[@]}"; do [ "${STATUS[$i]}" = ok ] || exit 1; done
    exit 0
}

# run_checks: plan the steps (with WORK, TOTAL and MODE set), then run them against the clock, writing OUT as it goes.
run_checks() {
    mkdir -p "$OUT" "$WORK/logs"
    NAMES=() BUDGETS=() STATUS=() RCS=() SECS=() CUMULATIVE=()
    PHASE=plan
    checks
    START=$(date +%s)
    END=$((START + TOTAL))
    local i sum=0
    for i in "${!NAMES[@]}"; do sum=$((sum + BUDGETS[i])); CUMULATIVE+=("$sum"); done
    print_plan | tee "$WORK/plan.txt"
    trap on_signal TERM INT
    write_outputs
    PHASE=run
    checks
    trap - TERM INT
}

# Sourced (tests): define the functions only.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
