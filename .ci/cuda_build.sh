#!/usr/bin/env bash
# Build the real CUDA extension against the GPU machine's torch (2.11.0+cu130) on a machine without a
# GPU, with the README's own command, and check that it loads and registers every CUDA kernel.
#
#   1. a second venv (CUDA_VENV, default .venv-cuda) with .ci/requirements-cuda.txt;
#   2. the README's install command, `SGG_KERNELS_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=... pip install
#      --no-build-isolation .`, run in a copy of the checkout (build-cuda/src: the main venv's editable
#      build keeps its own objects in build/); no CUDA_HOME by hand: setup.py finds the toolkit;
#   3. fails on a compiler warning located in csrc/ or a ptxas spill/local-memory warning;
#   4. .ci/check_cuda_build.py, run from outside the checkout: the installed package's _C loads, its
#      CUDA kernels are built and every `cuda=` entry of every backend table is registered;
#   5. with CUDA_BUILD_TESTS=1 (CI sets it), the kernel tests on the CPU against that build and torch
#      (CUDA_BUILD_TESTS_ALL=1: the whole suite).
# Environment: CUDA_ARCHS (default "8.0;9.0": A100 and H100/H200), MAX_JOBS (default 2).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
VENV="${CUDA_VENV:-.venv-cuda}"
ARCHS="${CUDA_ARCHS:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
start=$SECONDS

if [[ ! -f "$VENV/.deps" || .ci/requirements-cuda.txt -nt "$VENV/.deps" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r .ci/requirements-cuda.txt
  touch "$VENV/.deps"
fi
echo "== cuda build: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)') after $((SECONDS - start)) s"

SRC="$ROOT/build-cuda/src"
rm -rf "$ROOT/build-cuda"
mkdir -p "$SRC"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$SRC"
LOG="$ROOT/build-cuda/build.log"
# The README's command ("Installing into your own environment"), with the CI's architectures.
if ! (cd "$SRC" && SGG_KERNELS_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" "$ROOT/$VENV/bin/pip" install -v --no-build-isolation .) >"$LOG" 2>&1; then
  grep -v "is ignored: it is neither" "$LOG" | tail -n 60
  echo "== cuda build: FAILED (full log: $LOG)"
  exit 1
fi
echo "== cuda build: built and installed for TORCH_CUDA_ARCH_LIST=$ARCHS after $((SECONDS - start)) s"
grep -m1 "sgg_kernels: building the CUDA kernels" "$LOG" || true
# compiler diagnostics located in our sources, and ptxas's own warning lines (not the nvcc command
# lines, which carry -Xptxas=-warn-spills): spills, local memory
own=$(grep -E "^\s*$SRC/csrc/[^:(]*[:(][0-9]+.*warning|^\s*ptxas( |:).*warning" "$LOG" || true)
if [[ -n "$own" ]]; then
  echo "$own"
  echo "== cuda build: FAILED: warnings in our sources or register spills (above)"
  exit 1
fi
for arch in ${ARCHS//;/ }; do
  a="${arch//./}"; a="${a%+PTX}"
  grep -q "code=sm_$a" "$LOG" || { echo "== cuda build: FAILED: no sm_$a code in the build"; exit 1; }
done

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
(cd "$scratch" && "$ROOT/$VENV/bin/python" "$ROOT/.ci/check_cuda_build.py")
echo "== cuda build: checked after $((SECONDS - start)) s"

if [[ "${CUDA_BUILD_TESTS:-0}" == "1" ]]; then
  # From outside the checkout, so the tests import the installed CUDA build (tests/helpers.py).
  # The kernel and op-machinery tests (every C++ CPU kernel of this build, forward and backward);
  # the whole suite passes against it too (CUDA_BUILD_TESTS_ALL=1), at ~8 more minutes of CI.
  if [[ "${CUDA_BUILD_TESTS_ALL:-0}" == "1" ]]; then targets=("$ROOT/tests"); else
    targets=("$ROOT"/tests/test_{machinery,cluster,pairs,masks,prototypes,bad_inputs}.py); fi
  (cd "$scratch" && "$ROOT/$VENV/bin/python" -m pytest "${targets[@]}" -q -p no:cacheprovider)
  echo "== cuda build: CPU tests against torch 2.11.0+cu130 done after $((SECONDS - start)) s"
fi
