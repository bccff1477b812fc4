# Front door: make venv | make test | make lint | make cuda-check | make triton-check | make bench | make demo
# GPU runbook (benchmarks/NOTES.md): make gpu-session OUT=dir [STEPS=check,moe,...] [BUDGET=s]
#   | make gpu-check | make bench-gpu SUITE=moe|decode|router|gmm|fame [K=expr]
PYTHON ?= python3
GPU_PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU machines carry torch 2.13.0 (CPU build) on disk; a GPU machine keeps the torch it has.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test test-gpu lint cuda-check triton-check bench demo gpu-session gpu-check bench-gpu runbook-dry-run

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# CPU suite: torch backend, and the real Triton kernels through the interpreter. The suite is spread
# over TEST_JOBS processes of one thread each (pytest-xdist; with two threads each on 2 cores the
# fast tests crawled, with one they take under 6 minutes). The slow tests are collected first
# and handed out one test at a time, so the long runs spread over the processes.
TEST_JOBS ?= 2
test: venv
	TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) --dist load --maxschedchunk 1

# Same suite on a CUDA machine, Triton compiled (bf16 included).
test-gpu: venv
	env -u TRITON_INTERPRET $(BIN)/python -m pytest -q -p no:cacheprovider

# ruff check (no formatter: kernel launch arguments are grouped by hand, STYLE.md), then mypy on the
# public API of the kernel package ([tool.mypy] files in pyproject.toml)
lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

# Every csrc/*.cu through nvcc for sm_90 (CUDA_ARCH overrides) and a syntax check of the bindings; no GPU needed.
cuda-check: venv
	$(BIN)/python csrc/cuda_check.py

# Every Triton kernel compiled for sm_90 without a GPU, at the benchmark shapes: compile errors, shared memory
# that does not fit, registers and spills (benchmarks/triton_check.py). TRITON_CONFIGS=all: every autotune config.
TRITON_CONFIGS ?= default
triton-check: venv
	env -u TRITON_INTERPRET $(BIN)/python -m benchmarks.triton_check --configs $(TRITON_CONFIGS)

bench: venv
	$(BIN)/python -m pytest benchmarks/ --benchmark -q -p no:cacheprovider

# On a lent GPU machine, one command: the tests, then the suites, in order until BUDGET seconds, the
# results packed into OUT/gpu-results.tar.gz after each step (STEPS picks and orders them).
BUDGET ?= 540
gpu-session:
	@test -n "$(OUT)" || { echo "make gpu-session: OUT=DIR is required (on the device machine: OUT=\$$OUT)" >&2; exit 2; }
	$(GPU_PYTHON) -m benchmarks.runbook session --out "$(OUT)" --budget-s $(BUDGET) $(if $(STEPS),--steps "$(STEPS)")

# On a lent GPU machine, with its own python3 (no venv, no downloads): install, build, test, summarise.
gpu-check:
	$(GPU_PYTHON) -m benchmarks.runbook check

# One benchmark suite at its GPU shapes into benchmarks/results/ (K= narrows it with pytest -k).
bench-gpu:
	$(GPU_PYTHON) -m benchmarks.runbook bench --suite $(SUITE) $(if $(K),-k "$(K)")

# CI: every step of the runbook that needs no CUDA, with the venv's python, into a scratch folder.
runbook-dry-run: venv
	out=$$(mktemp -d) && $(BIN)/python -m benchmarks.runbook session --dry-run --budget-s 1800 --out $$out \
	  && tar tzf $$out/gpu-results.tar.gz

# Both stages, the three ablations, generation and metrics on the default synthetic data (runs/demo/).
demo: venv
	$(BIN)/python -m pip install -q -e ".[demo]"
	$(BIN)/python -m gavamoe.demo --out runs/demo
