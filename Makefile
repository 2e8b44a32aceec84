# neox-sophia developer commands. Everything runs inside $(VENV), created on first use.
#   make install   venv + CPU torch (unless a torch is already importable) + the package
#   make test      the whole test suite (CPU; GPU tests skip themselves)
#   make test-fast the unit tier: everything not marked `distributed` (docs/testing.md)
#   make lint      ruff over the package, the tests and the tools (CI runs it first)
#   make train     the quick-start run: the built-in corpus (once), then configs/quickstart.yml on CPU
#   make bench     the optimizer micro-benchmark
#   make gpu-check OUT=DIR   everything a GPU must show (tools/gpu_check.py; CPU sizes without CUDA)
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel. Where a torch is already importable in $(VENV) (a GPU cluster), it is kept.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.neox-sophia-installed

.PHONY: install test test-fast lint train bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest tests -m "not distributed" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check neox_sophia tests tools

train: install
	$(BIN)/neox-sophia corpus --output-dir data/stdlib
	$(BIN)/neox-sophia train configs/quickstart.yml $(TRAIN_ARGS)

bench: install
	$(BIN)/python tools/bench_optimizer.py

gpu-check: install
	$(if $(OUT),,$(error gpu-check writes gpu_check.json and gpu_check.md into a folder: make gpu-check OUT=DIR))
	$(BIN)/neox-sophia corpus --output-dir data/stdlib
	$(BIN)/python tools/gpu_check.py --output $(OUT)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
