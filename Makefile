# make demo: set up .venv, install Fashion-MNIST if missing, run the default training job.
# make test: set up .venv, run the tests and ruff (the dataset is not needed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sparsetrain-setup
DATA_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data demo test

setup: $(STAMP)

# torch first, pinned, so that `pip install -e .` finds it satisfied and pulls nothing else for it.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

data:
	test -d $(DATA_DIR) || { $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; }

demo: setup data
	$(BIN)/sparsetrain train

test: setup
	$(BIN)/python -m pytest
	$(BIN)/ruff check .
