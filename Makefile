# `make demo`  set up (first time) + run a smoke study end to end + render its report
# `make test`  set up (first time) + run the test suite (what CI runs: .ci/run)
#
# Set-up never pulls CUDA wheels on a CPU machine: torch is installed first, pinned
# (TORCH_SPEC), only when the venv has none; the package then accepts any torch >= 2.3.
# GPU users: `make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"`
# or reuse a system torch with `make test VENV_FLAGS=--system-site-packages`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
QUIET_PIP := grep -v -e "is ignored: it is neither" -e "^$$" || true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install test demo bench-deps reports clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)" 2>&1 | $(QUIET_PIP)
	$(PIP) install -q -e ".[test,postgres]" 2>&1 | $(QUIET_PIP)
	$(PY) -c "import torch, harness, optuna, mlflow, fvcore; print('harness ready: torch', torch.__version__)"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	rm -rf runs/demo
	time $(VENV)/bin/harness run studies/vit_digits.yaml --profile smoke --runs-dir runs/demo
	$(VENV)/bin/harness report studies/vit_digits.yaml --profile smoke --runs-dir runs/demo --out runs/demo/report
	@echo "demo report: runs/demo/report/README.md (MLflow UI: $(VENV)/bin/harness ui --runs-dir runs/demo)"

# the peer implementation for side-by-side speed runs (vit-pytorch imports torchvision at
# package import, so it is installed without its dependencies and loaded by file)
bench-deps: install
	$(PIP) install -q --no-deps "vit-pytorch>=1.7" 2>&1 | $(QUIET_PIP)
	$(PIP) install -q einops 2>&1 | $(QUIET_PIP)

clean:
	rm -rf runs .pytest_cache
