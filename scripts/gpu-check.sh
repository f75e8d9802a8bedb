#!/usr/bin/env bash
# One run on a lent GPU machine (the `device` tool): the GPU tests, the CUDA
# benchmarks of the kernel components, and a one-GPU demo, everything written
# under $OUT. Uses the machine's own torch and Triton (no installs there).
#
#   run: bash scripts/gpu-check.sh            (timeout_s about 540)
#
# Then copy the figures from $OUT/bench-cuda.json into docs/performance.md.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.txt, never stop the script
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    timeout "$seconds" "$@" >"$OUT/$name.txt" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s"
    tail -n 3 "$OUT/$name.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/nvidia-smi.txt" 2>&1
step info 60 "$PY" -m dsinfra info
# the kernel tests run their Triton kernels on the GPU when there is one; then every test marked gpu
step kernel-tests 150 "$PY" -m pytest -q tests/test_triton_utils.py tests/flash_mla tests/deep_gemm -p no:cacheprovider
step gpu-tests 90 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
step bench-cuda 240 "$PY" -m dsinfra bench flash_mla deep_gemm eplb --device cuda --json "$OUT/bench-cuda.json"
step demo-cuda 120 "$PY" -m dsinfra demo --quick --pp 1 --ep 1 --device cuda --out "$OUT/demo"
