#!/usr/bin/env bash
# Compile-check CUDA sources (csrc/cuda/*.cu) with nvcc, without linking: a quick development check
# (`make cuda-check FILES=csrc/cuda/pairs.cu`). CI builds and loads the real extension instead
# (.ci/cuda_build.sh).
#
# Works on a machine without a GPU or CUDA libraries (the CI machine): it only needs nvcc and an
# installed torch (CPU wheels ship the c10/cuda and ATen/cuda headers). Objects go to a temporary
# directory that is removed afterwards. One line per file; exits non-zero if any file fails.
#
# Usage (from anywhere, with the venv that holds torch activated):
#   .ci/check_cuda.sh            # every csrc/cuda/*.cu
#   .ci/check_cuda.sh FILE.cu    # only the given files
# Environment: NVCC (default nvcc), CUDA_ARCH (default "sm_80 sm_90": CI's TORCH_CUDA_ARCH_LIST,
#   each compiled; ptxas spills differ per architecture), NVCC_EXTRA (more flags),
#   CHECK_CUDA_WERROR (default 1: a warning in our own sources fails the check), CHECK_CUDA_VERBOSE
#   (1: print the compiler's log also when clean, e.g. with NVCC_EXTRA="-Xptxas -v" for registers).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
NVCC="${NVCC:-nvcc}"
read -r -a ARCHS <<<"${CUDA_ARCH:-sm_80 sm_90}"

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda: nvcc not found (set NVCC=/path/to/nvcc)" >&2
  exit 2
fi
if ! command -v python >/dev/null 2>&1; then
  echo "check_cuda: python not found on PATH (activate the venv that holds torch)" >&2
  exit 2
fi

# torch's include dirs, the Python headers, and the flags torch's CUDAExtension passes to nvcc
# (half/bfloat16 operator switches, --expt-relaxed-constexpr), so the check sees what the build sees.
mapfile -t TORCH_INFO < <(python - <<'PY'
import sysconfig
from torch.utils import cpp_extension as ce
print(" ".join("-I" + p for p in ce.include_paths()))
print("-I" + sysconfig.get_paths()["include"])
print(" ".join(getattr(ce, "COMMON_NVCC_FLAGS", ["--expt-relaxed-constexpr"])))
PY
)
if [[ ${#TORCH_INFO[@]} -ne 3 ]]; then
  echo "check_cuda: could not read torch's include paths (is torch installed in this python: $(command -v python)?)" >&2
  exit 2
fi
read -r -a TORCH_INCLUDES <<<"${TORCH_INFO[0]}"
read -r -a PY_INCLUDE <<<"${TORCH_INFO[1]}"
read -r -a TORCH_NVCC_FLAGS <<<"${TORCH_INFO[2]}"
read -r -a EXTRA <<<"${NVCC_EXTRA:-}"

FLAGS=(
  # setup.py's nvcc flags (-O3 -lineinfo): ptxas's register allocation, and so its spills, depend on them
  -c -std=c++17 -O3 -lineinfo
  # CPU torch wheels lack c10/cuda/impl/cuda_cmake_macros.h; this is what it would define.
  -DC10_CUDA_BUILD_SHARED_LIBS -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
  -DSGG_KERNELS_WITH_CUDA=1 -DPy_LIMITED_API=0x030A0000
  "${TORCH_NVCC_FLAGS[@]}"
  -Xcompiler -fPIC -Xcompiler -Wall
  -Xptxas -warn-spills,-warn-lmem-usage
  "${TORCH_INCLUDES[@]}" "${PY_INCLUDE[@]}" "-I$ROOT/csrc"
)

if [[ $# -gt 0 ]]; then
  FILES=("$@")
else
  shopt -s nullglob
  FILES=("$ROOT"/csrc/cuda/*.cu)
  shopt -u nullglob
fi
if [[ ${#FILES[@]} -eq 0 ]]; then
  echo "check_cuda: no CUDA sources under csrc/cuda"
  exit 0
fi

OBJDIR="$(mktemp -d "${TMPDIR:-/tmp}/check_cuda.XXXXXX")"
trap 'rm -rf "$OBJDIR"' EXIT

# Warnings located in this repository's sources fail the check (CHECK_CUDA_WERROR=0: report
# only); warnings from torch's headers (e.g. C++20 bit-field initializers under -std=c++17 with
# torch >= 2.13) are counted, not shown.
WERROR="${CHECK_CUDA_WERROR:-1}"
failed=0
for src in "${FILES[@]}"; do
  # absolute path, so nvcc's diagnostics name our files as $ROOT/csrc/...
  src="$(cd "$(dirname "$src")" && pwd -P)/$(basename "$src")"
  rel="${src#"$ROOT"/}"
  obj="$OBJDIR/$(basename "$src" .cu).o"
  log="$OBJDIR/$(basename "$src" .cu).log"
  start=$SECONDS
  GENCODE=()
  for a in "${ARCHS[@]}"; do GENCODE+=(-gencode "arch=compute_${a#sm_},code=$a"); done
  if "$NVCC" "${FLAGS[@]}" "${GENCODE[@]}" ${EXTRA[@]+"${EXTRA[@]}"} "$src" -o "$obj" >"$log" 2>&1; then
    # ours: warnings located in csrc/, and ptxas warnings (spills, local memory) about our kernels
    own=$(grep -E "^$ROOT/csrc/[^:(]*[:(][0-9]+.*warning|^ptxas.*warning" "$log" || true)
    nown=$(printf '%s' "$own" | grep -c . || true)
    nhdr=$(( $(grep -ci "warning" "$log" || true) - nown ))
    if [[ "$nown" != "0" ]]; then
      status="WARN"; [[ "$WERROR" == "1" ]] && { status="FAIL"; failed=1; }
      echo "$status  $rel ($((SECONDS - start)) s, $nown warnings in our sources, $nhdr warning lines from torch headers)"
      sed 's/^/      /' "$log"
    else
      echo "ok    $rel ($((SECONDS - start)) s, 0 warnings in our sources, $nhdr warning lines from torch headers)"
      [[ "${CHECK_CUDA_VERBOSE:-0}" == "1" ]] && sed 's/^/      /' "$log"
    fi
  else
    echo "FAIL  $rel ($((SECONDS - start)) s)"
    sed 's/^/      /' "$log"
    failed=1
  fi
done
exit "$failed"
