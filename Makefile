# Two commands do all set-up: `make repro` (main job) and `make test` (test suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first, pinned: on this machine that version is a local CPU wheel, and a looser
# spec would pull a multi-GB CUDA build. The project's own torch range accepts it.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: repro test lint venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src stages tests

clean-venv:
	rm -rf $(VENV)
