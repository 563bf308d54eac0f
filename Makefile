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

.PHONY: install lock test lint demo demo-core cluster-demo bench clean services-up services-down

$(VENV)/.pyoco-installed: pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	# Exactly the locked set (hash-checked, no resolution); torch is the one above.
	# --no-build-isolation: DeepSpeed ships as an sdist whose setup.py imports torch; an isolated build
	# would fetch a second (CUDA) torch just to build it.
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation --no-deps --require-hashes -r requirements.lock
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PIP) check
	@touch $@

# Re-resolve requirements.lock from pyproject.toml's ranges (latest compatible releases, with hashes).
# torch stays at TORCH_SPEC and, with its CUDA-only dependencies, out of the lock (see its header).
LOCK_NO_EMIT := torch triton cuda-bindings cuda-pathfinder cuda-toolkit nvidia-cublas nvidia-cuda-cupti \
	nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand \
	nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-nccl-cu13 nvidia-nvjitlink \
	nvidia-nvshmem-cu13 nvidia-nvtx
lock: install
	$(PIP) install -q uv
	echo "$(TORCH_SPEC)" > $(VENV)/lock-constraints.txt
	head -n 4 requirements.lock > $(VENV)/lock-header.txt
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --generate-hashes --no-header --no-annotate \
		-c $(VENV)/lock-constraints.txt --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
		$(addprefix --no-emit-package ,$(LOCK_NO_EMIT)) -o $(VENV)/lock-body.txt
	cat $(VENV)/lock-header.txt $(VENV)/lock-body.txt > requirements.lock

install: $(VENV)/.pyoco-installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The most complete end-to-end path; see README.
demo: install
	bash scripts/demo.sh

# The demo workflow as a Ray job on the local 2-node token-auth cluster below, every path on its moto S3;
# stops the cluster afterwards unless KEEP=1. See README ("A Ray cluster") and infra/local/README.md.
cluster-demo: install
	bash scripts/cluster_demo.sh

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
