# The README's commands. Every target that runs Python first makes .venv (if missing) and
# installs the pinned stack from requirements/ and the package (editable) into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OUT ?= artifacts
PYTEST_ARGS ?=
PIP_FLAGS := --quiet --disable-pip-version-check

CPP_BUILD ?= cpp/build
STEPS ?= 300

.PHONY: all venv test test-fast test-latest export cpp docs bench gpu-check example clean

all: test

# $(call install_venv,VENV,REQUIREMENTS,WHAT): make VENV if missing, install REQUIREMENTS, then
# requirements/no-deps.txt (nn4n, onnx2torch: --no-deps, see that file) and this package (editable); say
# what before each step, since pip runs quietly for minutes. WHAT must not contain commas.
define install_venv
	@echo "== $(1): creating it if missing, then installing $(2) ($(3))"
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install $(PIP_FLAGS) -r $(2)
	@echo "== $(1): nn4n and onnx2torch (--no-deps) and this package (editable)"
	$(1)/bin/python -m pip install $(PIP_FLAGS) --no-deps -r requirements/no-deps.txt
	$(1)/bin/python -m pip install $(PIP_FLAGS) --no-deps -e .
	touch $(1)/.installed-stamp
endef

REQUIREMENTS := $(wildcard requirements/*.txt)
$(STAMP): $(REQUIREMENTS) pyproject.toml
	$(call install_venv,$(VENV),requirements/test.txt,torch 2.13.0 CPU with ONNX and ExecuTorch and the test tools: about 2 GB; two or three minutes)

# ONNX Runtime for Node.js, one of the runtimes the ONNX graph is tested in (skipped, saying so, without
# node and npm). --ignore-scripts: its install script would download CUDA libraries it does not need here.
NODE_STAMP := .node/.installed-stamp
$(NODE_STAMP):
	@if command -v npm > /dev/null && command -v node > /dev/null; then \
	  echo "== .node: onnxruntime-node 1.30.0 (npm, about 300 MB)"; \
	  npm install --prefix .node --ignore-scripts --no-audit --no-fund --silent onnxruntime-node@1.30.0 && touch $@; \
	else echo "== no node and npm: the ONNX Runtime for Node.js test will be skipped"; fi

venv: $(STAMP)

## Run the whole test suite (what CI runs), on two workers: the C++ tests (one build) on one of them.
PYTEST_WORKERS ?= -n 2 --dist loadgroup
test: $(STAMP) $(NODE_STAMP)
	$(PY) -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

## The quick subset for a change to the Python core: no C++ builds, no slow tests.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not cpp and not slow" $(PYTEST_ARGS)

## The suite again on the newest torch tested (2.14.1) in its own venv, .venv-latest.
## torch 2.14.1 is on this package index only as a CUDA build: the wheel and its nvidia-* libraries
## take about 6 GB on disk; the suite runs on the CPU (and uses a GPU where one is present).
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
LATEST_STAMP := $(LATEST_VENV)/.installed-stamp

$(LATEST_STAMP): $(REQUIREMENTS) pyproject.toml
	$(call install_venv,$(LATEST_VENV),requirements/latest.txt,torch 2.14.1 CUDA build with its nvidia libraries: about 6 GB; several minutes)

# The C++ tests build cpp/ against this torch's libtorch, a CUDA build: CMake configures it only with
# a CUDA toolkit, found through CUDA_PATH, and links it only if the toolkit has nvrtc. Without both
# they are deselected, and the run says so first.
CUDA_PATH ?= /usr/local/cuda
LATEST_MARK := $(if $(and $(wildcard $(CUDA_PATH)/bin/nvcc),$(wildcard $(CUDA_PATH)/lib64/libnvrtc.so*)),,-m "not cpp")

test-latest: $(LATEST_STAMP)
	@$(if $(LATEST_MARK),echo "== no CUDA toolkit with nvcc and nvrtc at CUDA_PATH=$(CUDA_PATH): the C++ tests (marker cpp) cannot build against torch 2.14.1's CUDA libtorch and are deselected")
	CUDA_PATH=$(CUDA_PATH) $(LATEST_PY) -m pytest $(LATEST_MARK) $(PYTEST_ARGS)

## Export every artifact with the embedded default config and print the parity table.
export: $(STAMP)
	$(PY) export/export.py --out $(OUT) --force

$(OUT)/rnnloss_native.pt: | $(STAMP)
	$(PY) export/export.py --out $(OUT) --force

## Build the C++ library and programs against the installed torch's libtorch and train on the CPU
## (native engine; ENGINE=torchscript for the TorchScript one). The build folder is cpp/build (the
## tests build there too; build/ is setuptools'); a new one uses Ninja when it is installed.
ENGINE ?= native
CPP_GENERATOR := $(if $(wildcard $(CPP_BUILD)/CMakeCache.txt),,$(if $(shell command -v ninja),-G Ninja))
cpp: $(STAMP) $(OUT)/rnnloss_native.pt
	@echo "== configuring and building cpp/ into $(CPP_BUILD) against the libtorch inside $(VENV)'s torch (a minute or two the first time)"
	cmake -S cpp -B $(CPP_BUILD) $(CPP_GENERATOR) -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(CPP_BUILD) -j2 --target train_ctrnn eval_loss
	$(CPP_BUILD)/train_ctrnn $(OUT) --engine $(ENGINE) --steps $(STEPS) --device cpu --out $(CPP_BUILD)/ctrnn_trained_$(ENGINE).pt

clean:
	rm -rf build $(CPP_BUILD) $(OUT) site .pytest_cache examples/out

## The neurogym example in its own venv (neurogym pins numpy 2.2). The figure goes to
## EXAMPLE_OUT, which git ignores; `make example EXAMPLE_OUT=docs/neurogym_task.png` refreshes the docs'
## figure on purpose. EXAMPLE_ARGS passes options (e.g. EXAMPLE_ARGS="--decision-weight 1").
EXAMPLE_VENV ?= .venv-example
EXAMPLE_STAMP := $(EXAMPLE_VENV)/.installed-stamp
EXAMPLE_OUT ?= examples/out/neurogym_task.png
EXAMPLE_ARGS ?=

$(EXAMPLE_STAMP): requirements/example.txt requirements/no-deps.txt pyproject.toml
	$(call install_venv,$(EXAMPLE_VENV),requirements/example.txt,torch 2.13.0 CPU with neurogym and tqdm: about 1 GB; a minute or two)

example: $(EXAMPLE_STAMP)
	$(EXAMPLE_VENV)/bin/python examples/neurogym_task.py --out $(EXAMPLE_OUT) $(EXAMPLE_ARGS)

## The documentation site, from docs/ into site/ (warnings are errors); its own small venv (no torch).
DOCS_VENV ?= .venv-docs
DOCS_STAMP := $(DOCS_VENV)/.installed-stamp
$(DOCS_STAMP): requirements/docs.txt
	test -x $(DOCS_VENV)/bin/python || $(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install $(PIP_FLAGS) -r requirements/docs.txt
	touch $@

docs: $(DOCS_STAMP)
	$(DOCS_VENV)/bin/mkdocs build --strict --site-dir site

## Benchmarks: ratios against the memory floor and a naive transcription, measured in one run.
bench: $(STAMP)
	$(PY) bench/bench_loss.py --device cpu

## Every GPU check in one go (CUDA tests, C++ CUDA training, GPU benchmarks, CUDA export parity),
## with whatever python3 and torch this machine has; writes $(REPORT)/.
REPORT ?= gpu-report
gpu-check:
	bash bench/gpu_check.sh $(REPORT)
