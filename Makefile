# Quick start on a fresh machine (README.md):
#   make bench   set up .venv, build the extension, run sgg-bench on this machine's device
#   make test    set up .venv, build the extension, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
SOURCES = $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) setup.py pyproject.toml

.PHONY: setup build test bench cuda-build cuda-check triton-check clean

setup: $(VENV)/.deps
$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(BIN)/pip install -q --no-build-isolation -e .
	touch $@

test: build
	$(BIN)/python -m pytest tests -q

bench: build
	$(BIN)/sgg-bench

# Build the real CUDA extension against the GPU machine's torch (2.11.0+cu130, in .venv-cuda) with the
# README's command, and check it loads and registers every CUDA kernel (no GPU needed; CI runs this
# with CUDA_BUILD_TESTS=1, which also runs the CPU suite against that build). ~6 min on 2 cores.
cuda-build:
	bash .ci/cuda_build.sh

# Quick development check: compile CUDA sources to objects with nvcc against the main venv's torch,
# for sm_80 and sm_90 with setup.py's -O3, ~40 s a file, no link (FILES=csrc/cuda/x.cu for one file).
cuda-check: setup
	PATH="$(abspath $(BIN)):$$PATH" bash .ci/check_cuda.sh $(FILES)

# Compile every Triton kernel launch for sm_90 and sm_80 (no GPU needed): catches what the interpreter
# accepts but the GPU compiler rejects, and reports registers/spills (CI runs this).
triton-check: build
	$(BIN)/python .ci/check_triton_compile.py > $(VENV)/triton-check.log 2>&1 || { cat $(VENV)/triton-check.log; exit 1; }
	tail -n 1 $(VENV)/triton-check.log

clean:
	rm -rf build build-cuda *.egg-info sgg_kernels/*.so $(VENV)/.built
