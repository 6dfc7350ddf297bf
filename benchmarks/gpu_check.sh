#!/usr/bin/env bash
# GPU verification (DESIGN.md §5): run on an H100/H200 machine with torch, Triton and transformers preinstalled and
# no network. Installs blip_fast without touching the network, runs the GPU-marked tests (HF parity on CUDA among them),
# then the ViT and caption-generation benchmarks against HuggingFace, and writes JSON lines, logs and summary.md to
# OUT_DIR. Every step has its own timeout and a failing step does not stop the others; the exit code is non-zero
# when any step failed. Total well under 8 minutes.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#   BLIP_FAST_GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh /tmp/gpu_dry   # same steps on CPU, tiny config
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
ROOT="$PWD"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
DRY="${BLIP_FAST_GPU_CHECK_DRY:-0}"
PY="${PYTHON:-python}"
STEPS="$OUT/steps.tsv"
printf 'step\tstatus\trc\tseconds\n' >"$STEPS"
FAILED=0

# The whole check stays inside this budget: each step's timeout is cut to what is left of it.
DEADLINE=$(($(date +%s) + ${BLIP_FAST_GPU_CHECK_BUDGET_S:-420}))

# step NAME TIMEOUT_S CMD...: run with a timeout, log to OUT/NAME.log, record the outcome, return the exit code.
step() {
    local name="$1" limit="$2"
    shift 2
    local start rc status left
    start=$(date +%s)
    left=$((DEADLINE - start))
    if [ "$left" -lt 15 ]; then
        printf '%s\t%s\t%s\t%s\n' "$name" "skipped-budget" "-" 0 >>"$STEPS"
        echo "== $name: skipped, time budget spent"
        FAILED=1
        return 124
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (timeout ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        5) status=no-tests ;;  # pytest: nothing selected (e.g. no gpu-marked tests yet)
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    if [ "$status" = timeout ] || [ "$status" = failed ]; then FAILED=1; fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(($(date +%s) - start))" >>"$STEPS"
    tail -n 5 "$OUT/$name.log"
    echo "== $name: $status (rc $rc)"
    return $rc
}

if [ "$DRY" = 1 ]; then
    DEVICE=cpu CONFIG=tiny DTYPE=fp32 SCALE=0.02 REPEATS=2 PRETRAIN_BATCH=4 PRETRAIN_DTYPES=fp32
    export CUDA_VISIBLE_DEVICES=""  # the dry run must behave like a machine without a GPU
    echo "dry run: no GPU" >"$OUT/nvidia-smi.txt"
else
    DEVICE=cuda CONFIG=base DTYPE=fp16 SCALE=1 REPEATS=5 PRETRAIN_BATCH=32 PRETRAIN_DTYPES="fp32 bf16"
    { nvidia-smi && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; } \
        >"$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >>"$OUT/nvidia-smi.txt"
fi

# Install without network. The fallback runs from a mirror of the tree (symlinks) whose blip_fast/ also holds
# kernels/, since blip_fast.kernels is mapped from the top-level kernels/ only by an install.
# With a CUDA torch and nvcc this compiles blip_fast._C (csrc/: one .cu for sm_80 + sm_90, and bindings.cpp); the
# two sources build in parallel and nvcc compiles the two architectures on two threads each.
install_ok=0
if [ "$DRY" != 1 ]; then
    if MAX_JOBS="${MAX_JOBS:-4}" step install 180 "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
    then install_ok=1; fi
fi
if [ "$install_ok" != 1 ] || ! "$PY" -c "import blip_fast.kernels" >/dev/null 2>&1; then
    MIRROR="$(mktemp -d)"
    for entry in "$ROOT"/* "$ROOT"/.ci; do [ "$(basename "$entry")" = blip_fast ] || ln -s "$entry" "$MIRROR/"; done
    mkdir "$MIRROR/blip_fast"
    for entry in "$ROOT"/blip_fast/*; do ln -s "$entry" "$MIRROR/blip_fast/"; done
    ln -s "$ROOT/kernels" "$MIRROR/blip_fast/kernels"
    cd "$MIRROR"
    echo "running from a mirror of the source tree: $MIRROR"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # `benchmarks` and blip_fast from the tree we run in

"$PY" - >"$OUT/environment.json" <<'PYEOF'
import json, torch
from benchmarks import harness
env = harness.environment("cuda" if torch.cuda.is_available() else "cpu")
try:
    import blip_fast._C  # noqa: F401
    env["blip_fast_C"] = "built"
except Exception as error:
    env["blip_fast_C"] = f"absent ({type(error).__name__})"
print(json.dumps(env, indent=2))
PYEOF

# The gpu-marked tests include HF parity on CUDA (tests/test_gpu_parity.py: fp32 ids identical, fp16/bf16 error).
step gpu_tests 120 "$PY" -m pytest -m gpu tests -q --junitxml="$OUT/gpu_tests.xml"
# Issue 5: one decode step's cross-attention, eager HF / SDPA / Triton / CUDA (/ flash-attn, xformers) vs the K/V floor.
step bench_decode_attention 60 "$PY" -m benchmarks.bench_decode_attention --device "$DEVICE" \
    --repeats $((DRY == 1 ? REPEATS : 30)) --out "$OUT"
step bench_vit 60 "$PY" -m benchmarks.bench_vit --config "$CONFIG" --dtype "$DTYPE" --device "$DEVICE" \
    --batch-scale "$SCALE" --repeats "$REPEATS" --out "$OUT"
step bench_generate 150 "$PY" -m benchmarks.bench_generate --config "$CONFIG" --dtype "$DTYPE" --device "$DEVICE" \
    --batch-scale "$SCALE" --repeats "$REPEATS" --check-tokens --out "$OUT"
# Issue 6: CapFilt throughput (captioner nucleus sampling + filter ITM), HF pipeline vs blip_fast.
step bench_capfilt 90 "$PY" -m benchmarks.bench_capfilt --config "$CONFIG" --dtype "$DTYPE" --device "$DEVICE" \
    --batch-scale "$SCALE" --repeats "$REPEATS" --out "$OUT"
# fp32 token parity on the deterministic cases, small batches: fp16 may legitimately diverge, fp32 must not.
step parity_generate_fp32 60 "$PY" -m benchmarks.bench_generate --config "$CONFIG" --dtype fp32 --device "$DEVICE" \
    --cases greedy_bs1,greedy_bs64,beam3 --batch-scale 0.125 --warmup 0 --repeats 1 --check-tokens \
    --name generate_fp32_parity --out "$OUT"

# Issue 4: fused ITC loss vs eager BLIP ITC (B=4096 + queue 57,600 and larger), and fused ITM hard-negative
# mining vs the original per-row loop and the vectorised reference.
step bench_itc 120 "$PY" -m benchmarks.bench_itc --device "$DEVICE" --out "$OUT"
step bench_itm_negatives 90 "$PY" -m benchmarks.bench_itm_negatives --device "$DEVICE" --out "$OUT"

# Issue 3: base-224 pre-training step (ITC + ITM + LM, reference backend) in fp32 and bf16.
for PRECISION in $PRETRAIN_DTYPES; do
    step "pretrain_$PRECISION" 90 "$PY" -m benchmarks.bench_pretrain --config "$CONFIG" --batch "$PRETRAIN_BATCH" \
        --dtype "$PRECISION" --device "$DEVICE" --name pretrain --out "$OUT"
done

{
    echo "# blip_fast GPU check"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), dry=$DRY, $(head -n 1 "$OUT/nvidia-smi.txt" 2>/dev/null)"
    echo
    echo '```json'
    cat "$OUT/environment.json"
    echo '```'
    echo
    echo "| step | status | rc | seconds |"
    echo "|---|---|---|---|"
    tail -n +2 "$STEPS" | sed 's/\t/ | /g; s/^/| /; s/$/ |/'
    echo
    for table in vit generate generate_fp32_parity capfilt pretrain itc itm_negatives decode_attention; do
        [ -f "$OUT/$table.md" ] && cat "$OUT/$table.md" && echo
    done
} >"$OUT/summary.md"
echo "wrote $OUT/summary.md"
exit $FAILED
