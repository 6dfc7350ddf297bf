#!/usr/bin/env bash
# Compile-only check of every csrc/*.cu and csrc/*.cpp with nvcc: one object per source holding every architecture.
# A CPU torch wheel cannot build the extension (DESIGN.md §4b), so CI (.ci/run) and tests/test_decode_attention_cuda.py
# compile against its headers here instead. Exit 0 with a "skipped" line when nvcc or the sources are missing.
#
#   bash csrc/nvcc_check.sh OUT_DIR [ARCH...]        # ARCH like 90 or 80; default 90
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 OUT_DIR [ARCH...]" >&2
    exit 2
fi
out_dir="$1"
shift
archs=("${@:-90}")
cd "$(dirname "$0")/.."

shopt -s nullglob
sources=(csrc/*.cu csrc/*.cpp)
shopt -u nullglob
if ! command -v nvcc >/dev/null 2>&1 || [ ${#sources[@]} -eq 0 ]; then
    echo "nvcc compile check skipped: $(command -v nvcc >/dev/null 2>&1 && echo 'no sources in csrc/' || echo 'nvcc not on PATH')"
    exit 0
fi
mkdir -p "$out_dir/stub/c10/cuda/impl"
# The CPU wheel ships c10/cuda headers but not this generated one; it only defines the shared-library macro.
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$out_dir/stub/c10/cuda/impl/cuda_cmake_macros.h"
read -r -a includes < <(python -c "
import sysconfig
from torch.utils.cpp_extension import include_paths
print(' '.join('-I' + p for p in include_paths() + [sysconfig.get_paths()['include']]))")
gencode=()
for arch in "${archs[@]}"; do gencode+=("-gencode=arch=compute_$arch,code=sm_$arch"); done
# The sources compile at once (each is mostly torch's host headers, one core's work): half the wall time on 2 cores.
pids=()
for source in "${sources[@]}"; do
    echo "nvcc compile check (${archs[*]/#/sm_}): $source"
    nvcc -c "${gencode[@]}" -std=c++17 "${includes[@]}" -I"$out_dir/stub" -Icsrc \
        -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
        -o "$out_dir/$(basename "$source").o" "$source" &
    pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
exit "$failed"
