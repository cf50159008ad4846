# `make demo`  set up (first time) + run a smoke study end to end + render its report
# `make test`  set up (first time; with the optional peer, vit-pytorch, whose comparison has
#              tests) + run the test suite (what CI runs: .ci/run)
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
PEER_SPEC ?= vit-pytorch==1.26.14
PYTEST_ARGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
QUIET_PIP := grep -v -e "is ignored: it is neither" -e "^$$" || true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install test demo bench-deps speed-reports gpu-target gpu-wheels gpu-rehearse clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)" 2>&1 | $(QUIET_PIP)
	$(PIP) install -q -e ".[test,postgres]" 2>&1 | $(QUIET_PIP)
	$(PY) -c "import torch, harness, optuna, mlflow, fvcore; print('harness ready: torch', torch.__version__)"
	touch $@

install: $(VENV)/.installed

test: install bench-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	rm -rf runs/demo
	time $(VENV)/bin/harness run studies/vit_digits.yaml --profile smoke --runs-dir runs/demo
	$(VENV)/bin/harness report studies/vit_digits.yaml --profile smoke --runs-dir runs/demo --out runs/demo/report
	@echo "demo report: runs/demo/report/README.md (MLflow UI: $(VENV)/bin/harness ui --runs-dir runs/demo)"

# the peer implementation for side-by-side speed runs (vit-pytorch imports torchvision at
# package import, so it is installed without its dependencies and loaded by file)
bench-deps: install
	$(PIP) install -q --no-deps "$(PEER_SPEC)" 2>&1 | $(QUIET_PIP)
	$(PIP) install -q einops 2>&1 | $(QUIET_PIP)

# Every speed report of docs/speed.md, re-measured on this machine (reports/<study>-<PROFILE><SUFFIX>/):
#   make speed-reports                                  CPU: about 45 minutes on 2 idle AMD Zen 5
#       cores (before speed_packing paired its arms in-trial; about 85 at 47a99d3 on a
#       slower Zen 5 VM), about 115 on 2 Zen 4 cores
#       (104 without speed_paths); on a CPU without native
#       bf16 (AVX2 only) run speed_dit's cpu-fp32 profile instead (about 37 min on 2 Zen 3 cores)
#   make speed-reports PROFILE=gpu SUFFIX=-h100         on a GPU (the gpu profiles, bf16)
#   make gpu-target SUFFIX=-h100                        the GPU checks alone, in minutes: DiT-B/2
#       bf16 training MFU against the card's measured bf16 peak, and NaViT packing vs padding
#       (eager, then with NaViT's transformer blocks compiled)
PROFILE ?= cpu
SUFFIX ?=
SPEED_STUDIES ?= speed_dit speed_vivit speed_packing speed_paths
H := $(VENV)/bin/harness

# $(call studies,NAMES,PROFILE): run each study (resumable) and render its report
studies = for s in $(1); do \
	  $(H) run studies/$$s.yaml --profile $(2) --runs-dir runs/$$s-$(2)$(SUFFIX) --quiet && \
	  $(H) report studies/$$s.yaml --profile $(2) --runs-dir runs/$$s-$(2)$(SUFFIX) \
	    --out reports/$$s-$(2)$(SUFFIX) || exit 1; done

speed-reports: bench-deps
	$(call studies,$(SPEED_STUDIES),$(PROFILE))
	$(PY) -m harness.bench_packing --steps 15 --warmup 3 --processes 3 --out reports/packing_bench-$(PROFILE)$(SUFFIX)/README.md
	$(PY) -m harness.bench_packing --steps 15 --warmup 3 --processes 3 --skew 4 --out reports/packing_bench-$(PROFILE)$(SUFFIX)-skew4/README.md
	$(PY) -m harness.bench_peer --processes 5 --rounds 9 --out reports/peer_vit_pytorch$(SUFFIX)/README.md
	$(PY) -m harness.bench_peer overhead --seconds 60 --out reports/overhead$(SUFFIX)/README.md

# For a CUDA machine that has torch but no package index: `make gpu-wheels PRESENT=FILE` (FILE
# names the packages it has) puts the rest of the harness's dependencies as wheels in .whl/;
# carried there, scripts/gpu_checks.sh's header says how to install and run them
PRESENT ?=
gpu-wheels: install
	bash scripts/gpu_wheels.sh "$(PRESENT)"

# The same, rehearsed here on CPU: a fresh venv with only torch and what PRESENT names, plus
# those wheels installed as the device installs them, runs the smoke profiles of the studies
# scripts/gpu_checks.sh runs (needs the package index; about 5 minutes)
gpu-rehearse: install
	bash scripts/gpu_rehearse.sh "$(PRESENT)"

gpu-target: install
	$(call studies,speed_dit,gpu-target)
	$(call studies,speed_packing,gpu)
	$(call studies,speed_packing,gpu-compile)

clean:
	rm -rf runs .pytest_cache
