#!/usr/bin/env bash
# Fetch, on a machine with network, the wheels the GPU machine lacks into .whl/ (ignored by git): carry .whl with
# the device call, and benchmarks/gpu_check.sh installs them into its work folder. The GPU machine runs Python 3.12
# with torch 2.11 and Triton 3.6 but no liger-kernel, the LM loss's CUDA kernel (blip_fast.ops.lm_head_loss).
#
#   bash benchmarks/gpu_wheels.sh            # then: device run with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# The versions tests/test_lm_head_loss.py checks against the reference (setup.py's range); pure-Python wheels.
WHEELS=(liger-kernel==0.8.5)
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
ls -l .whl
