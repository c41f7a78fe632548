# Each target does its own set-up on a fresh machine: a virtualenv in .venv with the CPU torch build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is the CPU build on this project's machines; on a CUDA machine install your torch first.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-dev demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"

## demo: train a tiny model on synthetic long videos, generate 4x-long clips with each sampler, evaluate
demo: install
	$(BIN)/longgen demo --out outputs/demo

## test: the whole test suite (CPU, tiny random models, no downloads)
test: install-dev
	$(BIN)/python -m pytest -q

lint: install-dev
	$(BIN)/ruff check longgen train scripts tests benchmarks

clean:
	rm -rf outputs .pytest_cache
