# Front door: make venv | make test | make lint | make cuda-check | make bench | make demo
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU machines carry torch 2.13.0 (CPU build) on disk; a GPU machine keeps the torch it has.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test test-gpu lint cuda-check bench demo

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# CPU suite: torch backend, and the real Triton kernels through the interpreter.
test: venv
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -p no:cacheprovider

# Same suite on a CUDA machine, Triton compiled (bf16 included).
test-gpu: venv
	env -u TRITON_INTERPRET $(BIN)/python -m pytest -q -p no:cacheprovider

# ruff check only: kernel launch arguments are grouped by hand (STYLE.md), which a formatter would undo
lint: venv
	$(BIN)/ruff check .

# Every csrc/*.cu through nvcc for sm_90 (CUDA_ARCH overrides) and a syntax check of the bindings; no GPU needed.
cuda-check: venv
	$(BIN)/python csrc/cuda_check.py

bench: venv
	$(BIN)/python -m pytest benchmarks/ --benchmark -q -p no:cacheprovider

# Both stages, the two ablations, generation and metrics on the default synthetic data (runs/demo/).
demo: venv
	$(BIN)/python -m pip install -q -e ".[demo]"
	$(BIN)/python -m gavamoe.demo --out runs/demo
