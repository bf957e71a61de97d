#!/usr/bin/env bash
# One call on the lent GPU machine (H100/H200; torch 2.11 cu130, no network): build the CUDA
# extension, run the CUDA tests, run the CUDA C++ kernels' tests under compute-sanitizer memcheck,
# and run sgg-bench on CUDA.
#
#   bash benchmarks/gpu_check.sh                      # from the repository root; logs + results under $OUT
#   STEPS="env build bench" SIZES=sgdet bash benchmarks/gpu_check.sh   # a second call, other steps
#
# Sized for the device tool's limits (10 minutes a command, 15 minutes of device time a task):
# the tests run `-m cuda` (every CUDA param and the modules on CUDA; the CPU half of the suite runs
# in CI), and every step has its own timeout (seconds: TIMEOUT_BUILD, TIMEOUT_TESTS,
# TIMEOUT_SANITIZER, TIMEOUT_BENCH), so one slow step cannot eat the call; logs are written to $OUT
# as the steps go, so a call cut short still brings back what ran.
#
# Every step runs even if an earlier one failed; the exit status is non-zero if any failed, and
# the last lines printed are a summary table. The bench writes its JSON straight into $OUT (the
# device tool brings that folder back); commit it as benchmarks/results/<device>.json.
# NOTE: written before any GPU was available to this project; its first run is its test.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT_DIR"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" SGG_KERNELS_WITH_CUDA=1
SIZES="${SIZES:-paper}"
STEPS="${STEPS:-env build info tests sanitizer bench}"
TESTS_ARGS="${TESTS_ARGS:--m cuda}"

summary=()
failed=0
step() {  # step NAME TIMEOUT CMD...: run if NAME is in $STEPS, log to $OUT_DIR/NAME.log, record rc and seconds
  local name=$1 limit=$2; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  local start=$(date +%s)
  echo "== $name (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT_DIR/$name.log"
  summary+=("$(printf '%-10s rc=%-3s %5ss%s' "$name" "$rc" "$(( $(date +%s) - start ))" "$([[ $rc -eq 124 ]] && echo ' (timed out)')")")
  [[ $rc -eq 0 ]] || failed=1
}

step env        60                         bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name(0))'"
step build      "${TIMEOUT_BUILD:-240}"     "$PY" -m pip install --no-build-isolation --no-deps -v -e .
step info       60                         "$PY" -m sgg_kernels.info
# shellcheck disable=SC2086  # TESTS_ARGS is a list of pytest arguments
step tests      "${TIMEOUT_TESTS:-240}"     "$PY" -m pytest tests -q -rs -p no:cacheprovider $TESTS_ARGS
step sanitizer  "${TIMEOUT_SANITIZER:-120}" compute-sanitizer --tool memcheck --error-exitcode 99 "$PY" -m pytest tests/test_cluster.py tests/test_pairs.py tests/test_masks.py -q -p no:cacheprovider -k "cuda-cuda and not gradcheck"
step bench      "${TIMEOUT_BENCH:-240}"     "$PY" -m sgg_kernels.bench --device cuda --size "$SIZES" --no-progress --min-time 0.1 --out "$OUT_DIR/bench-${SIZES//,/-}.json"

echo
echo "== summary (logs in $OUT_DIR)"
printf '%s\n' "${summary[@]}"
exit $failed
