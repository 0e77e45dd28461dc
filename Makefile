# The README's commands. Every target that runs Python first makes .venv (if missing) and
# installs the pinned stack from requirements/ and the package (editable) into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OUT ?= artifacts
PYTEST_ARGS ?=

BUILD ?= build
STEPS ?= 300

.PHONY: all venv test export cpp bench gpu-check example clean

all: test

$(STAMP): requirements/base.txt requirements/onnx.txt requirements/test.txt requirements/nn4n.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/test.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements/nn4n.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

venv: $(STAMP)

## Run the whole test suite (what CI runs).
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

## Export every artifact with the embedded default config and print the parity table.
export: $(STAMP)
	$(PY) export/export.py --out $(OUT) --force

$(OUT)/rnnloss_native.pt: | $(STAMP)
	$(PY) export/export.py --out $(OUT) --force

## Build the C++ library and programs against the installed torch's libtorch and train on the CPU
## (native engine; ENGINE=torchscript for the TorchScript one).
ENGINE ?= native
cpp: $(STAMP) $(OUT)/rnnloss_native.pt
	cmake -S cpp -B $(BUILD) -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(BUILD) -j2
	$(BUILD)/train_ctrnn $(OUT) --engine $(ENGINE) --steps $(STEPS) --device cpu --out $(BUILD)/ctrnn_trained_$(ENGINE).pt

clean:
	rm -rf build $(OUT) .pytest_cache

## The neurogym example in its own venv (neurogym pins numpy 2.2); writes docs/neurogym_task.png.
EXAMPLE_VENV ?= .venv-example
example:
	test -x $(EXAMPLE_VENV)/bin/python || $(PYTHON) -m venv $(EXAMPLE_VENV)
	$(EXAMPLE_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/example.txt
	$(EXAMPLE_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(EXAMPLE_VENV)/bin/python examples/neurogym_task.py --out docs/neurogym_task.png

## Benchmarks: ratios against the memory floor and a naive transcription, measured in one run.
bench: $(STAMP)
	$(PY) bench/bench_loss.py --device cpu

## Every GPU check in one go (CUDA tests, C++ CUDA training, GPU benchmarks, CUDA export parity),
## with whatever python3 and torch this machine has; writes $(REPORT)/.
REPORT ?= gpu-report
gpu-check:
	bash bench/gpu_check.sh $(REPORT)
