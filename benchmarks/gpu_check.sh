#!/usr/bin/env bash
# One call on the lent GPU machine (H200/H100, its image's python3 with torch 2.11 cu130 and Triton,
# no network), sized for the device tool: 10 minutes a command, 15 minutes of device time a task
# (machine start included), at most 8 files back from $OUT.
#
#   bash benchmarks/gpu_check.sh                  # from anywhere; everything lands in $OUT
#   GPU_CHECK_REHEARSAL=1 bash benchmarks/gpu_check.sh   # or --rehearse: on a CPU, GPU steps stubbed
#   STEPS="env build sgdet racecheck synccheck" bash benchmarks/gpu_check.sh   # a second call
#
# Device call: run(command="bash benchmarks/gpu_check.sh", timeout_s=600). The default steps' limits
# add up to 535 s (tests/test_gpu_check.py checks <= 540), and no step starts or runs past
# GPU_CHECK_BUDGET seconds (540) after the script started: a later step's limit is cut to what is
# left, and a step with under 5 s left is reported "no time".
#
# Steps, most important first (the default STEPS), each under its own timeout (TIMEOUT_<STEP>):
#   env        nvidia-smi, torch/CUDA/triton versions, device name, nvcc, compute-sanitizer     20 s
#   build      pip install --no-build-isolation --no-deps -v -e . (TORCH_CUDA_ARCH_LIST=9.0), in
#              the BACKGROUND from here on, to $OUT/build.log, then python -m sgg_kernels.info   150 s
#   parity     Triton kernels at small and paper sizes, fp32 (ieee, tf32x3) and bf16, forward and
#              backward, against the float64 reference on the same GPU: tests/test_gpu_parity.py
#              (needs no extension; --noconftest, since tests/conftest.py requires one; pytest-xdist
#              workers where installed, to compile in parallel); errors in $OUT/parity.txt        110 s
#   (the build is waited for here: its 150 s count from its start)
#   bench      sgg-bench --device cuda --size paper --no-compile -> $OUT/bench-paper.json          60 s
#   cudatests  pytest -m cuda: the CUDA C++ kernels (torchvision RoIAlign parity, modules, syncs),
#              without the float64 gradchecks, the Triton params and torch.compile               60 s
#   memcheck   compute-sanitizer --tool memcheck on the CUDA C++ kernels' small tests              35 s
#   initcheck  compute-sanitizer --tool initcheck, same tests                                     25 s
#   sgdet      sgg-bench --size sgdet --no-compile --impls fused,eager -> $OUT/bench-sgdet.json    40 s
#   racecheck  compute-sanitizer --tool racecheck on the shared-memory kernels' tests (masks,
#              cluster knn, roi_align)                                                             20 s
#   synccheck  compute-sanitizer --tool synccheck, same tests                                     15 s
# Not in the default STEPS (for a second call; their limits are not in the 535 s):
#   tritontests  pytest -m cuda -k "triton and not gradcheck" plus tests/test_precision.py: the
#                Triton params at odd shapes, tf32, fp16                                         240 s
#   gradchecks   pytest -m cuda -k gradcheck: the float64 gradchecks on CUDA (many compiles)     240 s
# Steps after build need the extension: keep `build` in STEPS on a fresh machine (a failed build
# skips cudatests and the sanitizer steps; bench and sgdet still run, C++ ops as error rows).
#
# Output ($OUT, default build/gpu_check_out; <= 8 files, the device tool's limit):
#   summary.txt    step, status, rc, seconds, limit: rewritten and printed after every step, so a
#                  call cut short still brings it back; printed once more at the end
#   steps.log      every foreground step's output, appended live under "===== <step>" headers
#   build.log      the background build (pip -v: nvcc lines, ptxas spills), live
#   parity.txt     one line of errors per parity test
#   bench-paper.json, bench-sgdet.json   sgg-bench results: commit as benchmarks/results/<gpu>.json
# One log per step also goes to GPU_CHECK_LOGS (default build/gpu_check_logs/<step>.log), which
# the device tool does not bring back (steps.log holds the same text).
#
# Environment overrides: STEPS; TIMEOUT_<STEP> (seconds, e.g. TIMEOUT_BENCH=120); GPU_CHECK_BUDGET;
# PYTHON (default python3); OUT; GPU_CHECK_LOGS; TORCH_CUDA_ARCH_LIST (9.0); MAX_JOBS (12: leaves
# cores to Triton's compiler in the parity step); PARITY_XDIST (pytest-xdist workers, default 6,
# 0 = serial); PARITY_K, CUDA_TESTS_K, SANITIZE_K, RACE_K (pytest -k expressions); BENCH_ARGS,
# SGDET_ARGS (extra sgg-bench arguments, e.g. BENCH_ARGS="--ops cosine_assign").
# Rehearsal (GPU_CHECK_REHEARSAL=1 or --rehearse): CUDA_VISIBLE_DEVICES is emptied; env runs as
# is (no GPU needed), build is a background stub, the pytest steps run their real selections (every
# test skips: "needs a CUDA GPU"; an empty selection fails), the sanitizer steps the same without
# compute-sanitizer, and bench/sgdet a tiny CPU sgg-bench into the same JSON files.
# GPU_CHECK_STUB_<STEP>="cmd" replaces a step's rehearsal command (tests/test_gpu_check.py uses it
# for timeouts and failures).
#
# shellcheck disable=SC2016  # single-quoted bash -c scripts expand their own "$0" / "$t"
# shellcheck disable=SC2054  # commas inside sgg-bench's --ops / --impls values
#
# Exit status: 0 if every selected step passed, 1 otherwise, 130 if interrupted. Every step runs even
# if an earlier one failed. Estimates of each step's duration (no GPU has run this yet): README.md.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT" || exit 2

REHEARSAL="${GPU_CHECK_REHEARSAL:-0}"
for arg in "$@"; do
  case "$arg" in
    --rehearse) REHEARSAL=1 ;;
    -h | --help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (--rehearse, --help)" >&2; exit 2 ;;
  esac
done
[[ "$REHEARSAL" == 0 ]] && REHEARSAL=""

PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-$ROOT/build/gpu_check_out}"
LOG_DIR="${GPU_CHECK_LOGS:-$ROOT/build/gpu_check_logs}"
BUDGET="${GPU_CHECK_BUDGET:-540}"
DEFAULT_STEPS="env build parity bench cudatests memcheck initcheck sgdet racecheck synccheck"
ALL_STEPS=(env build parity bench cudatests memcheck initcheck sgdet racecheck synccheck tritontests gradchecks)
STEPS="${STEPS:-$DEFAULT_STEPS}"

# Step limits in seconds (the defaults of the default steps add up to 535).
: "${TIMEOUT_ENV:=20}"
: "${TIMEOUT_BUILD:=150}"
: "${TIMEOUT_PARITY:=110}"
: "${TIMEOUT_BENCH:=60}"
: "${TIMEOUT_CUDATESTS:=60}"
: "${TIMEOUT_MEMCHECK:=35}"
: "${TIMEOUT_INITCHECK:=25}"
: "${TIMEOUT_SGDET:=40}"
: "${TIMEOUT_RACECHECK:=20}"
: "${TIMEOUT_SYNCCHECK:=15}"
: "${TIMEOUT_TRITONTESTS:=240}"
: "${TIMEOUT_GRADCHECKS:=240}"

PARITY_K="${PARITY_K:-}"
CUDA_TESTS_K="${CUDA_TESTS_K:-not gradcheck and not triton and not compile_fullgraph}"
SANITIZE_K="${SANITIZE_K:-cuda-cuda and not gradcheck and not opcheck and not float64}"
RACE_K="${RACE_K:-cuda-cuda and not gradcheck and ((test_parity and float32) or test_knn_center_features or (test_roi_align and not torchvision))}"
BENCH_ARGS="${BENCH_ARGS:-}"
SGDET_ARGS="${SGDET_ARGS:---impls fused,eager}"

export PYTHONUNBUFFERED=1 SGG_KERNELS_WITH_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-12}"

mkdir -p "$OUT_DIR" "$LOG_DIR" || exit 2
rm -f "$OUT_DIR/summary.txt" "$OUT_DIR/steps.log" "$OUT_DIR/build.log" "$OUT_DIR/parity.txt" \
  "$LOG_DIR"/*.log "$LOG_DIR"/build.rc "$LOG_DIR"/build.pid
T0=$(date +%s)

declare -A STATUS RC SECS LIMIT
for s in "${ALL_STEPS[@]}"; do
  STATUS[$s]="not selected"; RC[$s]="-"; SECS[$s]="-"; LIMIT[$s]="-"
done
for s in $STEPS; do
  [[ -n "${STATUS[$s]+x}" ]] || { echo "gpu_check.sh: unknown step '$s' in STEPS; known: ${ALL_STEPS[*]}" >&2; exit 2; }
  STATUS[$s]="pending"
  limit_var="TIMEOUT_${s^^}"
  LIMIT[$s]="${!limit_var}"
done
failed=0
BUILD_PID=""
BUILD_START=""

selected() { [[ " $STEPS " == *" $1 "* ]]; }
now() { echo $(( $(date +%s) - T0 )); }

write_summary() {  # write_summary [TITLE]: $OUT/summary.txt, then print it
  local title="${1:-}" tmp="$OUT_DIR/.summary.tmp" s
  {
    echo "gpu_check.sh${REHEARSAL:+ (REHEARSAL: GPU steps stubbed)} started $(date -u -d "@$T0" '+%Y-%m-%d %H:%M:%S' 2>/dev/null || echo "$T0") UTC;" \
      "$(now) s of the ${BUDGET} s budget used${title:+; $title}"
    printf '%-12s %-26s %4s %6s %6s\n' step status rc secs limit
    for s in "${ALL_STEPS[@]}"; do
      printf '%-12s %-26s %4s %6s %6s\n' "$s" "${STATUS[$s]}" "${RC[$s]}" "${SECS[$s]}" "${LIMIT[$s]}"
    done
    echo "logs: $OUT_DIR/steps.log (all steps), $OUT_DIR/build.log; per step: $LOG_DIR/<step>.log"
  } >"$tmp"
  mv -f "$tmp" "$OUT_DIR/summary.txt"
  cat "$OUT_DIR/summary.txt"
}

left_for() {  # left_for NAME: the step's limit, cut to what is left of the budget; fails under 5 s
  local left=$(( BUDGET - $(now) )) limit="${LIMIT[$1]}"
  (( left < 5 )) && return 1
  (( limit > left )) && limit=$left
  echo "$limit"
}

finish() {  # finish NAME RC SECONDS: record a finished step
  local name=$1 rc=$2 secs=$3
  RC[$name]=$rc; SECS[$name]=$secs
  case "$rc" in
    0) STATUS[$name]="ok" ;;
    124 | 137) STATUS[$name]="TIMED OUT"; failed=1 ;;
    *) STATUS[$name]="FAILED"; failed=1 ;;
  esac
}

run_step() {  # run_step NAME CMD...: run CMD under the step's timeout, log to steps.log and LOG_DIR
  local name=$1 limit start rc; shift
  selected "$name" || return 0
  if ! limit=$(left_for "$name"); then
    STATUS[$name]="no time"; write_summary "after $name"; return 0
  fi
  LIMIT[$name]=$limit
  STATUS[$name]="running"
  start=$(date +%s)
  echo
  echo "== $name (limit ${limit} s, at $(now) s): $*"
  {
    echo "===== $name (limit ${limit} s, at $(now) s)"
    printf '$'; printf ' %q' "$@"; echo
  } | tee "$LOG_DIR/$name.log" >>"$OUT_DIR/steps.log"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG_DIR/$name.log" >>"$OUT_DIR/steps.log"
  rc=${PIPESTATUS[0]}
  finish "$name" "$rc" $(( $(date +%s) - start ))
  echo "===== $name: ${STATUS[$name]} (rc $rc, $(( $(date +%s) - start )) s)" | tee -a "$LOG_DIR/$name.log" >>"$OUT_DIR/steps.log"
  tail -n 8 "$LOG_DIR/$name.log"
  write_summary "after $name"
}

skip_step() {  # skip_step NAME WHY
  selected "$1" || return 0
  STATUS[$1]="skipped: $2"
}

stub() {  # stub NAME ARRAY [CMD...]: in a rehearsal, set ARRAY to CMD (if given), or to
  #                              bash -c "$GPU_CHECK_STUB_<NAME>" where that is set
  local name=$1 var="GPU_CHECK_STUB_${1^^}"
  local -n into=$2  # a nameref: assigning it sets the caller's array
  shift 2
  # shellcheck disable=SC2034
  (( $# )) && into=("$@")
  # shellcheck disable=SC2034
  [[ -n "${!var:-}" ]] && into=(bash -c "${!var}")
  return 0
}

build_started=0
start_build() {
  selected build || return 0
  local limit
  if ! limit=$(left_for build); then STATUS[build]="no time"; return 0; fi
  LIMIT[build]=$limit
  local cmd=(bash -c '"$0" -m pip install --no-build-isolation --no-deps -v -e . && "$0" -m sgg_kernels.info' "$PY")
  if [[ -n "$REHEARSAL" ]]; then
    stub build cmd bash -c 'echo "rehearsal: would run (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS):" \
      "$0 -m pip install --no-build-isolation --no-deps -v -e . && $0 -m sgg_kernels.info"; sleep 2; echo "rehearsal: build stub done"' "$PY"
  fi
  echo
  echo "== build (background, limit ${limit} s, at $(now) s): ${cmd[*]}"
  BUILD_START=$(date +%s)
  STATUS[build]="running (background)"
  (
    timeout --kill-after=5 "$limit" "${cmd[@]}" >"$OUT_DIR/build.log" 2>&1 &
    echo $! >"$LOG_DIR/build.pid"
    wait $!
    echo "$? $(date +%s)" >"$LOG_DIR/build.rc"
  ) &
  BUILD_PID=$!
  build_started=1
}

wait_build() {
  [[ -n "$BUILD_PID" ]] || return 0
  echo
  echo "== build: waiting (at $(now) s)"
  wait "$BUILD_PID"
  BUILD_PID=""
  local rc=1 end
  end=$(date +%s)
  [[ -f "$LOG_DIR/build.rc" ]] && read -r rc end <"$LOG_DIR/build.rc"
  finish build "$rc" $(( end - BUILD_START ))
  cp -f "$OUT_DIR/build.log" "$LOG_DIR/build.log" 2>/dev/null
  {
    echo "===== build (background): ${STATUS[build]} (rc $rc, ${SECS[build]} s); last lines of $OUT_DIR/build.log:"
    tail -n 30 "$OUT_DIR/build.log"
  } >>"$OUT_DIR/steps.log"
  tail -n 8 "$OUT_DIR/build.log"
  write_summary "after build"
}

# shellcheck disable=SC2317  # reached through the trap below
on_signal() {
  echo "gpu_check.sh: interrupted" >&2
  if [[ -n "$BUILD_PID" && -f "$LOG_DIR/build.pid" ]]; then kill -TERM "$(cat "$LOG_DIR/build.pid")" 2>/dev/null; fi
  for s in "${ALL_STEPS[@]}"; do
    [[ "${STATUS[$s]}" == running* ]] && STATUS[$s]="INTERRUPTED"
  done
  write_summary "interrupted"
  exit 130
}
trap on_signal INT TERM

# ---------------------------------------------------------------------------------------------
# The steps' commands.
# ---------------------------------------------------------------------------------------------
PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rfEs)
ENV_PY='import os, sys, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", torch.cuda.get_device_name(0), "| capability", "%d.%d" % (p.major, p.minor),
          "| SMs", p.multi_processor_count, "| memory %.1f GiB" % (p.total_memory / 2**30), "| devices", torch.cuda.device_count())
else:
    print("device: no CUDA device visible to torch")
    sys.exit(0 if os.environ.get("GPU_CHECK_REHEARSAL_ENV") else 1)'
env_cmd=(bash -c 'for t in nvidia-smi nvcc compute-sanitizer; do command -v "$t" >/dev/null || echo "$t: not found"; done
  command -v nvidia-smi >/dev/null && nvidia-smi
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -n 2
  echo "cores $(nproc); $(free -g 2>/dev/null | sed -n 2p)"; df -h . | tail -n 1
  exec "$0" -c "$1"' "$PY" "$ENV_PY")

xdist=()
if [[ "${PARITY_XDIST:-6}" != 0 ]] && "$PY" -c 'import xdist' 2>/dev/null; then xdist=(-n "${PARITY_XDIST:-6}"); fi
parity_cmd=(env "SGG_GPU_PARITY_LOG=$OUT_DIR/parity.txt" "${PYTEST[@]}" --noconftest -s -m cuda "${xdist[@]}"
  tests/test_gpu_parity.py ${PARITY_K:+-k "$PARITY_K"})
# shellcheck disable=SC2206  # BENCH_ARGS / SGDET_ARGS are lists of sgg-bench arguments
bench_cmd=("$PY" -m sgg_kernels.bench --device cuda --size paper --no-compile --no-progress
  --out "$OUT_DIR/bench-paper.json" $BENCH_ARGS)
# shellcheck disable=SC2206
sgdet_cmd=("$PY" -m sgg_kernels.bench --device cuda --size sgdet --no-compile --no-progress
  --out "$OUT_DIR/bench-sgdet.json" $SGDET_ARGS)
cudatests_cmd=("${PYTEST[@]}" tests -m cuda -k "$CUDA_TESTS_K"
  --ignore=tests/test_gpu_parity.py --ignore=tests/test_precision.py)
SANITIZED_TESTS=(tests/test_cluster.py tests/test_pairs.py tests/test_masks.py)
sanitize_cmd=("${PYTEST[@]}" "${SANITIZED_TESTS[@]}" -m cuda -k "$SANITIZE_K")
race_cmd=("${PYTEST[@]}" "${SANITIZED_TESTS[@]}" -m cuda -k "$RACE_K")
tritontests_cmd=("${PYTEST[@]}" tests -m cuda -k "(triton or test_precision) and not gradcheck")
gradchecks_cmd=("${PYTEST[@]}" tests -m cuda -k gradcheck)
sanitizer() {  # sanitizer TOOL: the compute-sanitizer prefix
  echo compute-sanitizer --tool "$1" --error-exitcode 99 --print-limit 20
}

if [[ -n "$REHEARSAL" ]]; then
  # The CPU stand-ins: same selections (every test skips without a GPU), a tiny CPU bench.
  # Hide any GPU, so that a rehearsal on a GPU machine (the test suite's) skips the GPU tests too.
  export GPU_CHECK_REHEARSAL_ENV=1 CUDA_VISIBLE_DEVICES=""
  tiny_bench=("$PY" -m sgg_kernels.bench --device cpu --size small --ops cosine_assign,pairwise_edge_fusion
    --passes fwd --impls fused,eager --min-time 0.01 --no-progress)
  stub env env_cmd
  stub parity parity_cmd
  stub bench bench_cmd "${tiny_bench[@]}" --out "$OUT_DIR/bench-paper.json"
  stub sgdet sgdet_cmd "${tiny_bench[@]}" --out "$OUT_DIR/bench-sgdet.json"
  stub cudatests cudatests_cmd
  would() {  # would TOOL CMD...: say what runs on the GPU, then run CMD without compute-sanitizer
    local tool=$1; shift
    printf '%s\n' bash -c 'echo "rehearsal: would run: $1 $2 ... (here without it)"; shift 2; exec "$@"' would "$(sanitizer "$tool")" "$*" "$@"
  }
  mapfile -t memcheck_cmd < <(would memcheck "${sanitize_cmd[@]}")
  mapfile -t initcheck_cmd < <(would initcheck "${sanitize_cmd[@]}")
  mapfile -t racecheck_cmd < <(would racecheck "${race_cmd[@]}")
  mapfile -t synccheck_cmd < <(would synccheck "${race_cmd[@]}")
  for s in memcheck initcheck racecheck synccheck; do stub "$s" "${s}_cmd"; done
  stub tritontests tritontests_cmd
  stub gradchecks gradchecks_cmd
else
  read -r -a prefix <<<"$(sanitizer memcheck)"; memcheck_cmd=("${prefix[@]}" "${sanitize_cmd[@]}")
  read -r -a prefix <<<"$(sanitizer initcheck)"; initcheck_cmd=("${prefix[@]}" "${sanitize_cmd[@]}")
  read -r -a prefix <<<"$(sanitizer racecheck)"; racecheck_cmd=("${prefix[@]}" "${race_cmd[@]}")
  read -r -a prefix <<<"$(sanitizer synccheck)"; synccheck_cmd=("${prefix[@]}" "${race_cmd[@]}")
fi

# ---------------------------------------------------------------------------------------------
# The run: most important facts first.
# ---------------------------------------------------------------------------------------------
sum=0
for s in $STEPS; do sum=$(( sum + LIMIT[$s] )); done
echo "gpu_check.sh${REHEARSAL:+ (rehearsal)}: steps: $STEPS; limits add up to $sum s (budget $BUDGET s); out: $OUT_DIR"
(( sum > BUDGET )) && echo "warning: the selected steps' limits ($sum s) exceed GPU_CHECK_BUDGET ($BUDGET s): the last ones will be cut or skipped"
write_summary "start"

run_step env "${env_cmd[@]}"                    # (1) what machine this is
start_build                                     # (2) the CUDA build, in the background ...
run_step parity "${parity_cmd[@]}"              # (3) ... while the Triton kernels are checked (and JIT-compiled)
wait_build
run_step bench "${bench_cmd[@]}"                # (4) paper timings, no torch.compile
if [[ $build_started == 1 && "${STATUS[build]}" != ok ]]; then
  for s in cudatests memcheck initcheck racecheck synccheck tritontests gradchecks; do skip_step "$s" "no build"; done
fi
[[ "${STATUS[cudatests]}" == pending ]] && run_step cudatests "${cudatests_cmd[@]}"   # (5) CUDA C++ parity, torchvision
[[ "${STATUS[memcheck]}" == pending ]] && run_step memcheck "${memcheck_cmd[@]}"      # (6) memory errors ...
[[ "${STATUS[initcheck]}" == pending ]] && run_step initcheck "${initcheck_cmd[@]}"   #     ... uninitialised reads
run_step sgdet "${sgdet_cmd[@]}"                                                       # (7) sgdet timings
[[ "${STATUS[racecheck]}" == pending ]] && run_step racecheck "${racecheck_cmd[@]}"   # (8) shared-memory races ...
[[ "${STATUS[synccheck]}" == pending ]] && run_step synccheck "${synccheck_cmd[@]}"   #     ... barriers
[[ "${STATUS[tritontests]}" == pending ]] && run_step tritontests "${tritontests_cmd[@]}"
[[ "${STATUS[gradchecks]}" == pending ]] && run_step gradchecks "${gradchecks_cmd[@]}"

echo
echo "== summary (done after $(now) s; $OUT_DIR/summary.txt)"
write_summary "done: $([[ $failed == 0 ]] && echo 'every selected step passed' || echo 'SOME STEPS FAILED')"
exit $failed
