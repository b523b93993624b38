# make bench   verify every op's backends against the reference, then time them
# make bench-pytest   the same cases under pytest-benchmark
# make test    the test suite (CPU; GPU tests run too where a GPU is visible)
# make fuzz    a long random campaign of the differential suite (FUZZ_EXAMPLES, SEED)
# make build   (re)build the extension in place; ninja recompiles only what changed
# make wheel   dist/ganops-*.whl for TORCH_CUDA_ARCH_LIST (default 8.0;9.0+PTX)
# make wheel-check   that wheel installed and tested in clean environments
#
# Each target creates .venv and installs requirements.txt on first use.

PYTHON_BOOT ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
CUDA_HOME   ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME

.PHONY: build test fuzz bench bench-pytest wheel wheel-check cuda-resources clean

$(VENV)/.requirements: requirements.txt
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

build: $(VENV)/.requirements
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest tests

# The differential suite with many random examples per test. The seed is printed first and
# with any failure; `make fuzz SEED=<n>` replays a campaign, and hypothesis prints the
# @reproduce_failure line of each failing example.
FUZZ_EXAMPLES ?= 400
fuzz: build
	@seed=$${SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; \
	echo "fuzz seed: $$seed  (replay: make fuzz SEED=$$seed FUZZ_EXAMPLES=$(FUZZ_EXAMPLES))"; \
	GANOPS_HYPOTHESIS_PROFILE=fuzz GANOPS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_differential.py \
		--hypothesis-seed=$$seed --hypothesis-show-statistics -p no:cacheprovider; \
	status=$$?; [ $$status -eq 0 ] || echo "fuzz seed $$seed failed: make fuzz SEED=$$seed FUZZ_EXAMPLES=$(FUZZ_EXAMPLES)"; \
	exit $$status

bench: build
	$(PY) -m benchmarks.run

bench-pytest: build
	$(PY) -m pytest benchmarks/test_benchmarks.py --benchmark-sort=name

# A wheel for a cluster: CUDA kernels for every architecture in the list, on a machine with
# or without a GPU; the version carries the torch and CUDA it was built for.
wheel: $(VENV)/.requirements
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}" GANOPS_BUILD_CUDA="$${GANOPS_BUILD_CUDA:-1}" \
	GANOPS_LOCAL_VERSION=1 $(PY) -m pip wheel --quiet --no-build-isolation --no-deps -w dist .
	@ls -l dist/ganops-*.whl

# The wheel installed in clean environments, beside the right torch and beside another.
wheel-check: wheel
	bash tools/check_wheel.sh

# Registers, shared memory, stack and local memory of every compiled CUDA kernel.
cuda-resources: build
	$(PY) -m pytest -q -s tests/test_cuda_build.py

clean:
	rm -rf build dist *.egg-info ganops/_C*.so ganops/_build_info.py
