#!/usr/bin/env bash
# Installs the newest dist/ganops-*.whl into clean virtual environments, away from the
# source tree, and checks it the way a cluster user meets it:
#   1. beside the torch it was built for: the compiled ops load and the test suite passes
#      against the installed package. The Triton kernels' interpreted runs are left out
#      there: the wheel ships the same Python files `make test` has just run them from (and
#      they are most of its time); that the installed package serves them is checked here;
#   2. beside another torch: import still works, warns saying why, and falls back.
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

echo "== $wheel names the torch it was built for"
"$python_boot" - "$wheel" <<'PY'
import re, sys, zipfile
wheel = sys.argv[1]
version = re.match(r"ganops-([^-]+)-", wheel.rsplit("/", 1)[-1]).group(1)
with zipfile.ZipFile(wheel) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    info = z.read("ganops/_build_info.py").decode()
    # The launch checks are test ops (ganops._C_launch_checks): never shipped.
    test_only = [n for n in z.namelist() if "_C_launch_checks" in n]
assert not test_only, f"{wheel} ships the test-only extension: {test_only}"
requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist: torch")]
built_for = re.search(r"'torch_version': '([^'+]+)", info).group(1)
# A local tag (+pt2141cu130) is a build for one torch: its metadata must pin exactly that one.
assert "+pt" in version, f"{wheel}: no local version tag naming its torch"
assert requires == [f"torch=={built_for}"], f"{wheel}: requires {requires}, built against torch {built_for}"
print(f"{version}: Requires-Dist: {requires[0]}")
PY

echo "== $wheel beside torch 2.14.1"
"$python_boot" -m venv "$work/venv"
# The test suite's own dependencies, at requirements.txt's pins (hypothesis: the differential suite).
"$work/venv/bin/pip" install --quiet torch==2.14.1 triton==3.8.0 numpy pytest \
    "$(grep -E '^hypothesis==' requirements.txt)" "$(grep -E '^pytest-xdist==' requirements.txt)"
"$work/venv/bin/pip" install --quiet --no-deps "$wheel"
cd "$work"
venv/bin/python -m ganops
TRITON_INTERPRET=1 venv/bin/python - <<'PY'
import ganops, os, sys, torch
info = ganops.build_info()
assert os.path.realpath(ganops.__file__).startswith(os.path.realpath(sys.prefix)), ganops.__file__
assert info["extension_loaded"], info["extension_error"]
assert ganops.available_backends("cpu") == ["cpp", "triton", "torch"], ganops.available_backends("cpu")
# The installed Triton kernels compile and run (interpreted) through the package.
p = torch.nn.Parameter(torch.ones(3))
p.grad = torch.full((3,), 4.0)
with ganops.use_backend("triton"):
    total = ganops.clip_grad_norm_([p], 1.0)
assert abs(total.item() - 48 ** 0.5) < 1e-5 and abs(p.grad.norm().item() - 1.0) < 1e-5
print("installed wheel loads its compiled ops:", info["version"], info["cuda_arch_list"])
PY
venv/bin/python -m pytest -q -p no:cacheprovider -n auto --dist worksteal -k "not triton" tests

echo "== $wheel beside torch 2.13.0"
"$python_boot" -m venv "$work/venv-other"
venv-other/bin/pip install --quiet torch==2.13.0 numpy
venv-other/bin/pip install --quiet --no-deps "$wheel"
venv-other/bin/python - <<'PY'
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import ganops
messages = [str(w.message) for w in caught if "ganops" in str(w.message)]
assert len(messages) == 1 and "built against torch" in messages[0], messages
assert "cpp" not in ganops.available_backends("cpu")
import torch
p = torch.nn.Parameter(torch.ones(3))
p.grad = torch.full((3,), 4.0)
total = ganops.clip_grad_norm_([p], 1.0)
assert abs(total.item() - 48 ** 0.5) < 1e-5
print("beside another torch: warned and fell back:", messages[0])
PY
echo "wheel checks passed"
