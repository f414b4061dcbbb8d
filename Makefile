# needleprobe — `make demo` runs the whole pipeline offline on the packaged model; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/dataset_main.yaml
DEMO_CONFIG := configs/demo.yaml
# The CPU build of torch lies on this machine's disk; a bare `torch` would pull a multi-GB CUDA build.
# On a GPU machine: make install TORCH_SPEC=torch EXTRAS=dev,notebook,gpu
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,notebook
NP := $(BIN)/needleprobe
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo demo-data extract fit train check test test-fast bench bench-extract bench-fit clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(NP) demo-data
	HF_HUB_OFFLINE=1 $(NP) extract --config $(DEMO_CONFIG)
	HF_HUB_OFFLINE=1 $(NP) fit --config $(DEMO_CONFIG)
	HF_HUB_OFFLINE=1 $(NP) check --config $(DEMO_CONFIG)

demo-data: install
	$(NP) demo-data

# NPROC > 1: one process per GPU under torchrun, each writing its shard of the cache (README, "Running at scale").
NPROC ?= 1
EXTRACT := $(if $(filter 1,$(NPROC)),$(NP) extract,$(BIN)/python -m torch.distributed.run --standalone --nproc-per-node $(NPROC) -m needleprobe extract)

extract: install
	$(EXTRACT) --config $(CONFIG) $(ARGS)

fit: install
	$(NP) fit --config $(CONFIG) $(ARGS)

train: install
	$(NP) train --config $(CONFIG) $(ARGS)

check: install
	$(NP) check --config $(CONFIG)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(ARGS)

# The same suite without the end-to-end subprocess runs (SIGKILL resume, torchrun, notebook, browser).
test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" $(ARGS)

bench: bench-extract bench-fit

bench-extract: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_extract.py $(ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_site_extract.py

bench-fit: install
	$(BIN)/python benchmarks/bench_fit.py $(ARGS)

clean:
	rm -rf cache/activations results/probes results/run_records results/monitor results/report
