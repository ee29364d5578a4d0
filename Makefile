# gex-bench: `make demo` and `make test` do all set-up on a fresh machine (venv, package, data) and are safe to repeat.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export WANDB_SILENT := true

.PHONY: help setup data demo test bench gpu-check clean
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,peers,cluster]'
	@touch $(STAMP)

setup: $(STAMP) ## create .venv and install gex-bench into it

data: ## install Fashion-MNIST (Debian package dataset-fashion-mnist) when it is missing
	@if [ -f $(FMNIST) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing the Debian package dataset-fashion-mnist"; \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) || \
	  { echo "could not install dataset-fashion-mnist; put the IDX .gz files under data/fashion_mnist/ or pass data.download=true"; exit 1; }; \
	else \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist', or put the IDX .gz files under data/fashion_mnist/, or pass data.download=true"; exit 1; \
	fi

# Methods of the demo. Left out for time (measured at the default scale, results/README.md): arnoldi (31 min fit), la_kfac
# (16 min, and inverted by its clamp at the authors' settings), gex_lin (scores by JVPs: minutes); if_exact/if_cg/lissa need a small
# model or few samples. Add them back with `make demo DEMO_METHODS=...`.
DEMO_METHODS ?= gex,gex_clamped,gex_mean_loss,aum,loss,random,forgetting,knn,el2n,cl,tracin,tracin_rp,randproj,grad_dot,trak,ekfac
DEMO_RUNS ?= outputs/demo

demo: setup data ## CPU detection benchmark: every method on Fashion-MNIST 10k, 10% noise, then the table
	$(PY) -m experiments.pretrain hydra.run.dir=$(DEMO_RUNS)/pretrain
	$(PY) -m experiments.detect -m method=$(DEMO_METHODS) hydra.sweep.dir=$(DEMO_RUNS)/detect
	$(PY) -m experiments.report runs=$(DEMO_RUNS)/detect out=$(DEMO_RUNS)/report logger=none
	@cat $(DEMO_RUNS)/report/tables/detect.md
	$(PY) -m experiments.demo_check $(DEMO_RUNS)

test: setup data ## the test suite (CPU, offline W&B, temporary directories)
	WANDB_MODE=offline $(PY) -m pytest -q

bench: setup data ## speed benchmarks (ratios measured in one run)
	$(PY) -m experiments.bench

gpu-check: setup data ## on a CUDA machine (~8 min, one H200): detection vs the CPU records, step throughput, torchrun; writes results/gpu/<time>/
	$(PY) -m experiments.gpu_check

clean: ## remove caches and run outputs (keeps .venv)
	rm -rf outputs multirun cache .pytest_cache
