# make bench   verify every op's backends against the reference, then time them
# make bench-pytest   the same cases under pytest-benchmark
# make test    the test suite (CPU; GPU tests run too where a GPU is visible)
# make build   (re)build the extension in place; ninja recompiles only what changed
# make wheel   dist/ganops-*.whl for TORCH_CUDA_ARCH_LIST (default 8.0;9.0+PTX)
#
# Each target creates .venv and installs requirements.txt on first use.

PYTHON_BOOT ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
CUDA_HOME   ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME

.PHONY: build test bench bench-pytest wheel clean

$(VENV)/.requirements: requirements.txt
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

build: $(VENV)/.requirements
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest tests

bench: build
	$(PY) -m benchmarks.run

bench-pytest: build
	$(PY) -m pytest benchmarks/test_benchmarks.py --benchmark-sort=name

clean:
	rm -rf build dist *.egg-info ganops/_C*.so ganops/_build_info.py
