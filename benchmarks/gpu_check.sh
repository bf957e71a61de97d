#!/usr/bin/env bash
# One call on the lent GPU machine (H100/H200; torch 2.11 cu130, no network): build the CUDA
# extension, run the whole test suite on CUDA, run the CUDA C++ kernels' tests under
# compute-sanitizer memcheck, and run sgg-bench on CUDA at the paper and sgdet sizes.
#
#   bash benchmarks/gpu_check.sh          # from the repository root; logs + results under $OUT
#
# Every step runs even if an earlier one failed; the exit status is non-zero if any failed, and
# the last lines printed are a summary table. Result JSON files are copied to $OUT (the device
# tool brings that folder back); commit them under benchmarks/results/.
# NOTE: written before any GPU was available to this project; its first run is its test.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT_DIR"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" SGG_KERNELS_WITH_CUDA=1
SIZES="${SIZES:-paper,sgdet}"

summary=()
failed=0
step() {  # step NAME CMD...: run, log to $OUT_DIR/NAME.log, record rc and seconds
  local name=$1; shift
  local start=$(date +%s)
  echo "== $name: $*"
  "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT_DIR/$name.log"
  summary+=("$(printf '%-10s rc=%-3s %5ss' "$name" "$rc" "$(( $(date +%s) - start ))")")
  [[ $rc -eq 0 ]] || failed=1
}

step env        bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name(0))'"
step build      "$PY" -m pip install --no-build-isolation --no-deps -v -e .
step info       "$PY" -m sgg_kernels.info
step tests      "$PY" -m pytest tests -q -rs -p no:cacheprovider
step sanitizer  compute-sanitizer --tool memcheck --error-exitcode 99 "$PY" -m pytest tests/test_cluster.py tests/test_pairs.py tests/test_masks.py -q -p no:cacheprovider -k "cuda-cuda"
step bench      "$PY" -m sgg_kernels.bench --device cuda --size "$SIZES" --no-progress
cp benchmarks/results/*.json "$OUT_DIR/" 2>/dev/null || true

echo
echo "== summary (logs in $OUT_DIR)"
printf '%s\n' "${summary[@]}"
exit $failed
