# Two commands on a fresh machine: `make demo` (set up + main job) and `make test` (set up + tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines take the CPU build of torch that lies on disk; a GPU machine keeps the user's torch.
TORCH_SPEC ?= torch==2.13.0
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: reproduce setup data demo docs test test-fast test-slow test-cuda check-sync figures figures-smoke bench micro export clean-nbs

$(STAMP): setup.py settings.ini
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	  echo "CUDA torch found: the venv sees it (system site packages)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -q -U pip && \
	  ( $(PY) -c "import torch" 2>/dev/null || $(VENV)/bin/pip install -q "$(TORCH_SPEC)" ); fi
	$(VENV)/bin/pip install -q -e ".[dev]"
	@touch $@

setup: $(STAMP) data

data: $(STAMP)
	$(VENV)/bin/latent-thoughts prepare

demo: setup
	$(VENV)/bin/latent-thoughts demo

export: $(STAMP)
	$(VENV)/bin/nbdev_export && $(VENV)/bin/nbdev_clean

check-sync: $(STAMP)
	bash tools/check_sync.sh

test: setup check-sync
	$(VENV)/bin/nbdev_test --n_workers 2 --timing
	$(VENV)/bin/pytest -rs -m "not slow and not cuda" tests
	@echo "slow and GPU tests were deselected (and notebook cells flagged slow/cuda skipped): make test-slow, make test-cuda"

test-slow: setup
	$(VENV)/bin/nbdev_test --n_workers 2 --flags slow
	$(VENV)/bin/pytest -rs -m "slow" tests

test-cuda: setup
	$(VENV)/bin/nbdev_test --flags cuda
	$(VENV)/bin/pytest -rs -m "cuda" tests

# the companion site in _docs/: every chapter executed (as nbdev_test runs it) and every paper notebook (at smoke scale;
# SCALE=micro: on their defaults, the real figures) rendered with a navigation bar, then checked in headless Chromium
SCALE ?= smoke
docs: setup
	time $(PY) tools/docs.py build --scale $(SCALE) --jobs 2
	$(PY) tools/docs.py check

# every paper notebook (nbs/figNN_*, tabNN_*, adaptive_*) on its defaults -> figures/; one: make figures ONLY='fig12*'
ONLY ?= *
figures: setup
	bash tools/run_figures.sh --only '$(ONLY)'

# the same notebooks at smoke scale (their `(smoke: ...)` parameter values) -> executed/smoke/figures/
figures-smoke: setup
	bash tools/run_figures.sh --smoke --only '$(ONLY)'

# the reproduction suite (suite.yaml): train every micro run (resumably, two single-threaded workers), then evaluate
reproduce: setup
	$(VENV)/bin/latent-thoughts suite train --scale micro --jobs 2
	$(VENV)/bin/latent-thoughts suite eval --scale micro --split validation
	$(VENV)/bin/latent-thoughts suite eval --scale micro --split test
	$(VENV)/bin/latent-thoughts suite eval --scale micro --kind harness --split none
	$(VENV)/bin/latent-thoughts suite claims --scale micro
	$(PY) tools/docs.py readme

# the micro checkpoints the paper notebooks default to (shipped in assets/; this retrains them, resumably)
micro: setup
	bash tools/train_micro.sh

bench: setup
	for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done
