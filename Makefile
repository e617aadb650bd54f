# hccfed: `make demo` runs the main job on the synthetic hospitals,
# `make test` runs the whole test suite. Both build .venv from nothing first.
#
# Install order matters (measured on Python 3.11, CPU-only machine):
#  1. numpy and versioneer first: pyradiomics has no wheel for 3.11 and its
#     source build needs them, without build isolation;
#  2. torch pinned to the CPU build (2.13.0 comes from this machine's disk; a
#     bare `torch` would pull a multi-GB CUDA build). A GPU hospital installs
#     the CUDA build instead: make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
#  3. the project itself, editable, with its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
NUMPY_SPEC ?= numpy==2.3.5
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench benchmark benchmark-quick install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(NUMPY_SPEC)" versioneer
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q --no-build-isolation "pyradiomics==3.0.1"
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hccfed simulate

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m hccfed.simulation.bench

# Ranking the models: several cohort seeds, each hospital's large held-out cohort (runs/benchmark/).
# BENCHMARK_ARGS="--encoders cnn,vit --device cuda" passes options through.
benchmark: $(STAMP)
	$(VENV)/bin/hccfed benchmark $(BENCHMARK_ARGS)

benchmark-quick: $(STAMP)
	$(VENV)/bin/hccfed benchmark --quick $(BENCHMARK_ARGS)

clean:
	rm -rf .cache runs data/synthetic data/benchmark
