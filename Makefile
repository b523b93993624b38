# make bench   verify every op's backends against the reference, then time them
# make bench-pytest   the same cases under pytest-benchmark
# make test    the test suite (CPU; GPU tests run too where a GPU is visible)
# make test TORCH=2.13.0   the same against another torch, in .venv-torch-2.13.0
# make fuzz    a long random campaign of the differential suite (FUZZ_EXAMPLES, SEED)
# make build   (re)build the extension in place; ninja recompiles only what changed
# make wheel   dist/ganops-*+cu13-cp310-abi3-*.whl for TORCH_CUDA_ARCH_LIST (default 8.0;9.0+PTX)
# make wheel-check   that wheel's ABI audit, and the suite beside torch 2.14.1 and 2.13.0
# make gpu-check REPORT=dir [QUICK=1]   everything a GPU can check, into dir/report.md
# make wheelhouse   the test dependencies as wheels, for gpu-check on a machine offline
#
# Each target creates .venv and installs requirements.txt on first use.

PYTHON_BOOT ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
CUDA_HOME   ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME

.PHONY: build test fuzz bench bench-pytest wheel wheel-check cuda-resources gpu-check wheelhouse clean

$(VENV)/.requirements: requirements.txt
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

build: $(VENV)/.requirements
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

# The suite runs in one pytest-xdist worker per core (TEST_WORKERS=1: in this process); the
# slowest tests (the Triton interpreter's) are spread over them by work stealing.
TEST_WORKERS ?= auto
PYTEST_WORKERS = $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal)

ifeq ($(TORCH),)
test: build
	$(PY) -m pytest $(PYTEST_WORKERS) tests
else
# Another torch in its own venv, with the rest of requirements.txt (triton's pin belongs to
# the default torch; a CUDA torch brings the triton it needs). The package is built against
# it and installed normally, away from the source tree: the in-place build's ganops/_C*.so
# and _build_info.py stay the default .venv's. -P keeps the source tree off sys.path, so the
# tests import the installed package (pytest's header says which).
# TORCH_VENV: reuse a venv elsewhere that already holds that torch (a CUDA torch is GBs).
TORCH_VENV ?= .venv-torch-$(TORCH)
OTHER_VENV := $(TORCH_VENV)
OTHER_PY   := $(OTHER_VENV)/bin/python

$(OTHER_VENV)/.requirements: requirements.txt
	test -x $(OTHER_PY) || $(PYTHON_BOOT) -m venv $(OTHER_VENV)
	grep -v -E '^(torch|triton)([=<>! ]|$$)' requirements.txt > $(OTHER_VENV)/requirements-other.txt
	$(OTHER_PY) -m pip install --quiet torch==$(TORCH) -r $(OTHER_VENV)/requirements-other.txt
	touch $@

test: $(OTHER_VENV)/.requirements
	$(OTHER_PY) -m pip install --quiet --no-build-isolation --no-deps .
	$(OTHER_PY) -P -m pytest $(PYTEST_WORKERS) tests
endif

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

# A wheel for a cluster: one per CUDA major (ganops-<version>+cu13-cp310-abi3-...whl), for
# every torch >= 2.11 of that CUDA major and every CPython >= 3.10 (stable ABI, abi3); CUDA
# kernels for every architecture in the list, built on a machine with or without a GPU.
# Without the test-only extension of the launch checks (ganops._C_launch_checks).
wheel: $(VENV)/.requirements
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}" GANOPS_BUILD_CUDA="$${GANOPS_BUILD_CUDA:-1}" \
	GANOPS_LOCAL_VERSION=1 GANOPS_LAUNCH_CHECKS=0 $(PY) -m pip wheel --quiet --no-build-isolation --no-deps -w dist .
	@ls -l dist/ganops-*.whl

# The wheel's ABI audit, then the wheel installed in clean environments beside torch 2.14.1
# (the suite, less the interpreted Triton runs `make test` makes) and beside torch 2.13.0
# (the whole suite).
wheel-check: wheel
	PYTEST_WORKERS="$(PYTEST_WORKERS)" bash tools/check_wheel.sh

# Registers, shared memory, stack and local memory of every compiled CUDA kernel.
cuda-resources: build
	$(PY) -m pytest -q -s tests/test_cuda_build.py

# Builds against the torch of $(GPU_PYTHON) (the GPU machine's own, not a venv), then runs
# the tests only a GPU can run, the CUDA-graph replays, compute-sanitizer and the CUDA
# benchmarks, within 9 minutes; REPORT ends up holding report.md, report.json and
# logs.tar.gz. Without a GPU every step says why it skipped (CI's rehearsal). On a lent
# GPU machine, the one command is in the README ("Checking on a GPU").
REPORT     ?= gpu-report
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py --report $(REPORT) $(if $(QUICK),--quick,)

# pytest and hypothesis (and their dependencies) as wheels in wheelhouse/, small enough to
# carry to a GPU machine without network; gpu-check installs them from there when missing.
# For each Python in WHEELHOUSE_PYTHONS: some of them ship compiled wheels per version.
WHEELHOUSE_PYTHONS ?= 3.11 3.12
wheelhouse: $(VENV)/.requirements
	for v in $(WHEELHOUSE_PYTHONS); do \
	  $(PY) -m pip download --quiet --only-binary=:all: --python-version $$v --dest wheelhouse \
	    -r tools/gpu_check_requirements.txt || exit 1; done

clean:
	rm -rf build dist *.egg-info ganops/_C*.so ganops/_build_info.py
