# pyoco: `make demo` and `make test` work from a fresh clone; both create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch that this machine (and CI) carries on disk; installing it first means the
# `torch>=2.4` range in pyproject.toml is already met and pip never pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test lint demo demo-core bench clean services-up services-down

$(VENV)/.pyoco-installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	# --no-build-isolation: DeepSpeed ships as an sdist whose setup.py imports torch; an isolated build
	# would fetch a second (CUDA) torch just to build it.
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation -e '.[dev]'
	@touch $@

install: $(VENV)/.pyoco-installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The most complete end-to-end path; see README.
demo: install
	bash scripts/demo.sh

bench: install
	$(PY) bench/noise.py
	$(PY) bench/preprocess.py
	$(PY) bench/train.py

# A local token-auth Ray head (+1 worker node), mlflow server and moto S3, all on 127.0.0.1.
services-up: install
	infra/local/up.sh

services-down:
	infra/local/down.sh

clean:
	rm -rf demo .pytest_cache .ruff_cache
