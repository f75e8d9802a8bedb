#!/usr/bin/env bash
# The GPU check. On a machine with a GPU, run
#
#     bash scripts/gpu-check.sh [DIR]
#
# from the repository root; results go to DIR (default gpu-out), five files:
#
#   environment.txt  the GPU (nvidia-smi), versions, which implementation serves each operation
#   check.jsonl      one line per result, written as each finishes: the GPU's ceilings (copy and
#                    read bandwidth, bf16 and FP8 matmul), then FlashMLA and DeepGEMM at
#                    DeepSeek-V3's shapes, each checked against its reference, timed, and given
#                    as a fraction of the matching ceiling (python -m dsinfra.bench.gpu_check)
#   summary.md       the same as a Markdown table, rewritten after each result
#   check.log        what the check printed
#   tests.txt        the Triton kernel tests run compiled on the GPU
#
# Everything stops by a global deadline, GPU_CHECK_SECONDS (default 450) after the start, so
# the whole run fits in 8 minutes; a step cut short keeps what it had written. Uses the
# installed torch and Triton, needs no network; pytest-xdist, where installed, runs the tests
# in parallel. GPU_CHECK_QUICK=1 makes it a smoke run of a few small cases (also on a CPU).
set -uo pipefail
DIR=${1:-gpu-out}
mkdir -p "$DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-450}))
left() { local seconds=$((DEADLINE - SECONDS)); echo $((seconds > 0 ? seconds : 0)); }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    "$PY" -m dsinfra info
} >"$DIR/environment.txt" 2>&1

# The benchmarks with their correctness checks first (most of the time), then the tests.
QUICK=()
[ "${GPU_CHECK_QUICK:-0}" = 1 ] && QUICK=(--quick)
CHECK_SECONDS=$(( $(left) * 2 / 3 ))
timeout --signal=INT --kill-after=10 "$(( CHECK_SECONDS + 60 ))" \
    "$PY" -m dsinfra.bench.gpu_check --out "$DIR" --seconds "$CHECK_SECONDS" "${QUICK[@]}" >"$DIR/check.log" 2>&1
echo "check: exit $? ($(left) s left); $(tail -n 1 "$DIR/check.log")"

# The kernel tests, compiled for this GPU; the random-shape ones are left out (each compiles
# new kernel variants). -x stops at the first failure.
PARALLEL=()
"$PY" -c "import xdist" 2>/dev/null && PARALLEL=(-n 8)
TESTS=(tests/test_triton_utils.py tests/flash_mla/test_decoding.py tests/deep_gemm tests/deep_ep/test_layout.py)
SELECT=(-k "(triton or cuda or gpu or layout) and not random")
[ "${GPU_CHECK_QUICK:-0}" = 1 ] && TESTS=(tests/test_triton_utils.py) && PARALLEL=()
if [ "$(left)" -gt 20 ]; then
    timeout --signal=INT --kill-after=10 "$(( $(left) - 10 ))" \
        "$PY" -m pytest -q -x -p no:cacheprovider "${PARALLEL[@]}" "${TESTS[@]}" "${SELECT[@]}" >"$DIR/tests.txt" 2>&1
    echo "tests: exit $? ($(left) s left); $(tail -n 1 "$DIR/tests.txt")"
else
    echo "tests: not run, the deadline was near" | tee "$DIR/tests.txt"
fi
