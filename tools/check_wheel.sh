#!/usr/bin/env bash
# Installs the newest dist/ganops-*.whl into clean virtual environments, away from the
# source tree, and checks it the way a cluster user meets it. The wheel is built once, per
# CUDA major (+cu13), on LibTorch's stable ABI and CPython's limited API, so the same file
# must serve every torch from 2.11 on:
#   1. its name, tags and metadata: cp310-abi3, +cu<major>, torch>=2.11,<3, no test-only module;
#   2. an ABI audit of every shipped .so: no undefined C++ symbol of libtorch, libc10 or
#      libtorch_python (nm), and abi3audit clean (only CPython's limited API);
#   3. beside torch 2.14.1 (a CUDA build): both modules load, an interpreted Triton call runs
#      through the installed package, and the test suite passes, less the interpreted Triton
#      runs: they exercise no compiled code, `make test` has just run them from the same
#      files, and they would take CI past its time budget;
#   4. beside torch 2.13.0 (a CPU-only build, another torch than the one it was built
#      against, and no triton): the CPU kernels load, and the whole test suite passes.
# PYTEST_WORKERS: pytest-xdist's options for the suites (the Makefile passes its own).
set -euo pipefail
cd "$(dirname "$0")/.."
wheel=$(ls -t dist/ganops-*.whl 2>/dev/null | head -n 1)
[ -n "$wheel" ] || { echo "no dist/ganops-*.whl: run 'make wheel' first" >&2; exit 1; }
wheel=$(realpath "$wheel")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r tests "$work/tests"
# pytest's settings only; there is no setup.py or package source in $work.
cp pyproject.toml "$work/"
python_boot=${PYTHON_BOOT:-python3}
pytest_workers=${PYTEST_WORKERS--n auto --dist worksteal}
test_requirements=("numpy" "pytest" "$(grep -E '^hypothesis==' requirements.txt)" "$(grep -E '^pytest-xdist==' requirements.txt)")

echo "== $(basename "$wheel"): name, tags and metadata"
"$python_boot" - "$wheel" <<'PY'
import re, sys, zipfile
wheel = sys.argv[1]
name = wheel.rsplit("/", 1)[-1]
match = re.fullmatch(r"ganops-([^-]+)-cp310-abi3-linux_x86_64\.whl", name)
assert match, f"{name}: not a cp310-abi3 wheel"
version = match.group(1)
with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    info = z.read("ganops/_build_info.py").decode()
modules = sorted(n for n in names if n.endswith(".so"))
# The launch checks are test ops (ganops._C_launch_checks): never shipped.
assert modules == ["ganops/_C.abi3.so", "ganops/_C_cuda.abi3.so"], modules
cuda_major = re.search(r"'cuda_major': (\d+)", info).group(1)
assert version.endswith(f"+cu{cuda_major}"), f"{name}: the version names no CUDA major (+cu{cuda_major})"
requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist: torch")]
assert len(requires) == 1 and set(requires[0][len("torch"):].split(",")) == {">=2.11", "<3"}, requires
print(f"{version}: {modules}; Requires-Dist: {requires[0]}")
PY

echo "== ABI audit"
mkdir "$work/unpacked"
(cd "$work/unpacked" && "$python_boot" -m zipfile -e "$wheel" .)
for so in "$work"/unpacked/ganops/*.so; do
    # Itanium mangling: a nested name starts N, then const/volatile qualifiers, then the
    # first namespace as <length><name>: at, c10, torch. Typeinfo and vtables (_ZTI, _ZTV) too.
    cxx=$(nm -D --undefined-only "$so" | awk '{print $NF}' | grep -E '^_Z(T[IVS])?N[rVK]*(2at|3c10|5torch)[0-9]' || true)
    count=$(printf '%s' "$cxx" | grep -c . || true)
    echo "$(basename "$so"): $count undefined C++ symbols of libtorch, libc10 or libtorch_python"
    if [ "$count" != 0 ]; then echo "$cxx" | head -n 20 >&2; exit 1; fi
done
"$python_boot" -m venv "$work/audit"
"$work/audit/bin/pip" install --quiet abi3audit
"$work/audit/bin/abi3audit" --strict --verbose "$wheel"

check_installed() {  # venv, expected CPU backends, whether the CUDA kernels must load
    # From $work: the source tree's ganops must not shadow the installed one.
    cd "$work"
    TRITON_INTERPRET=1 "$1/bin/python" - "$2" "$3" <<'PY'
import os, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import ganops
import torch
assert not [str(w.message) for w in caught if "ganops" in str(w.message)], [str(w.message) for w in caught]
info = ganops.build_info()
assert os.path.realpath(ganops.__file__).startswith(os.path.realpath(sys.prefix)), ganops.__file__
assert info["extension_loaded"], info["extension_error"]
expected_backends, cuda_expected = sys.argv[1].split(","), sys.argv[2] == "1"
assert ganops.available_backends("cpu") == expected_backends, ganops.available_backends("cpu")
assert info["cuda_kernels_loaded"] == cuda_expected, info["cuda_kernels_error"]
# The compiled CPU kernels, and the Triton kernels where triton is installed (interpreted),
# run through the installed package.
for backend in [b for b in expected_backends if b != "torch"]:
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 4.0)
    total = ganops.clip_grad_norm_([p], 1.0, backend=backend)
    assert abs(total.item() - 48 ** 0.5) < 1e-5 and abs(p.grad.norm().item() - 1.0) < 1e-5, backend
print(f"beside torch {torch.__version__}: ganops {info['version']} loads its CPU kernels"
      f"{' and its CUDA kernels' if cuda_expected else ''}; backends on CPU: {expected_backends}")
PY
    cd - > /dev/null
}

run_suite() {  # venv, pytest options
    (cd "$work" && "$1/bin/python" -m pytest -q -p no:cacheprovider $pytest_workers "${@:2}" tests)
}

echo "== beside torch 2.14.1"
"$python_boot" -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet torch==2.14.1 triton==3.8.0 "${test_requirements[@]}"
"$work/venv/bin/pip" install --quiet --no-deps "$wheel"
check_installed "$work/venv" cpp,triton,torch 1
run_suite "$work/venv" -k "not triton"

echo "== beside torch 2.13.0 (CPU-only)"
"$python_boot" -m venv "$work/venv-2.13"
"$work/venv-2.13/bin/pip" install --quiet torch==2.13.0 "${test_requirements[@]}"
"$work/venv-2.13/bin/pip" install --quiet --no-deps "$wheel"
check_installed "$work/venv-2.13" cpp,torch 0
run_suite "$work/venv-2.13"
echo "wheel checks passed"
