"""Shared fixtures and the tolerance table.

Without a GPU the Triton kernels run in interpreter mode on CPU tensors: TRITON_INTERPRET
must be set before triton compiles anything, so it is set here, before ganops' Triton
modules are imported.

The launch checks (``torch.ops.ganops._<op>_cuda_launch_check``) live in the test-only
extension ganops._C_launch_checks, imported here; where it was not built (an installed
wheel) every test that calls one is skipped, saying so.

``pytest --gpu-only`` keeps only the tests a CPU cannot run (tools/gpu_check.py on a lent
GPU machine; CPU CI runs the rest): those parametrized on a CUDA device, and those that
skip without a CUDA GPU (``requires_cuda``, "needs two CUDA GPUs").
"""

import importlib
import os
import re

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

import ganops  # noqa: E402

# Hypothesis profiles of tests/test_differential.py. "ci" (make test): a fixed seed and a
# bounded number of examples per test, the same cases every run. "fuzz" (make fuzz): many
# random examples; the seed of a failure is printed with the reproduction line.
# GANOPS_HYPOTHESIS_PROFILE picks one (default "ci"); GANOPS_FUZZ_EXAMPLES sizes "fuzz".
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
# "ci" does not shrink a failure (shrinking an interpreted Triton case can take minutes);
# its reproduction blob is printed all the same.
settings.register_profile("ci", derandomize=True, max_examples=30, deadline=None, database=None,
                          suppress_health_check=_SLOW_OK, print_blob=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.register_profile("fuzz", derandomize=False, max_examples=int(os.environ.get("GANOPS_FUZZ_EXAMPLES", "400")),
                          deadline=None, suppress_health_check=_SLOW_OK, print_blob=True)
settings.load_profile(os.environ.get("GANOPS_HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()


def _share_the_cores_among_xdist_workers():
    """Under pytest-xdist (make test) each worker gets its share of the cores for torch's
    intra-op threads. Left at torch's default, every worker runs a thread per core: OpenMP's
    waiting threads then spin against each other's work, and the 4000-step training example
    took 690 s instead of 110 s with two workers on two cores. Tests that compare thread
    counts set their own."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_the_cores_among_xdist_workers()


def _load_launch_checks() -> str | None:
    """Imports ganops._C_launch_checks; returns why it is unavailable, or None."""
    if not ganops._ext.load():
        return f"the compiled ops are not loaded: {ganops._ext.load_error()}"
    try:
        importlib.import_module("ganops._C_launch_checks")
    except (ImportError, OSError) as exc:
        return (f"the launch checks' test extension ganops._C_launch_checks is not available ({exc}); "
                f"`make build` builds it, a wheel leaves it out")
    return None


LAUNCH_CHECKS_MISSING = _load_launch_checks()
# A skip reason that marks a test as needing a CUDA GPU, for --gpu-only.
_NEEDS_GPU = re.compile(r"needs (a|two) CUDA GPU")


def pytest_addoption(parser):
    parser.addoption("--gpu-only", action="store_true",
                     help="only the tests a CPU cannot run: CUDA-parametrized or GPU-requiring ones")


def _needs_gpu(item) -> bool:
    if _calls_launch_check(item):  # a CUDA launch emulated on the CPU
        return False
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "cuda" in callspec.id.lower():
        return True
    return any(_NEEDS_GPU.search(str(mark.kwargs.get("reason", ""))) for mark in item.iter_markers("skipif"))


def _names_launch_check(code, module_globals, seen) -> bool:
    """Whether the code, a function or lambda defined in it, or a function of the test module
    it calls by name (a helper such as launch_check_orders), names a launch check op."""
    if code in seen:
        return False
    seen.add(code)
    if any(name.endswith("_cuda_launch_check") for name in code.co_names):
        return True
    nested = [c for c in code.co_consts if hasattr(c, "co_names")]
    helpers = [getattr(module_globals.get(name), "__code__", None) for name in code.co_names]
    return any(_names_launch_check(c, module_globals, seen) for c in nested + [h for h in helpers if h is not None])


def _calls_launch_check(item) -> bool:
    function = getattr(item, "function", None)
    code = getattr(function, "__code__", None)
    return code is not None and _names_launch_check(code, function.__globals__, set())


def pytest_collection_modifyitems(config, items):
    if LAUNCH_CHECKS_MISSING:
        skip = pytest.mark.skip(reason=LAUNCH_CHECKS_MISSING)
        for item in items:
            if _calls_launch_check(item):
                item.add_marker(skip)
    if config.getoption("--gpu-only"):
        keep = [item for item in items if _needs_gpu(item)]
        config.hook.pytest_deselected(items=[item for item in items if not _needs_gpu(item)])
        items[:] = keep


def pytest_report_header(config):
    """What this run tests: the torch, CUDA and triton in use, where ganops was imported
    from and what it was built against, and the backends that serve each device."""
    info = ganops.build_info()
    gpu = torch.cuda.get_device_name(0) if HAS_CUDA else "none visible"
    lines = [
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), GPU: {gpu}, "
        f"triton {info['triton_version'] or 'not installed'}"
        f"{', TRITON_INTERPRET=1' if ganops._backend.triton_interpret() else ''}",
        f"ganops {info['version']} from {os.path.dirname(ganops.__file__)}, built against torch "
        f"{info['torch_version']}, CUDA kernels: {info['cuda_kernels']} ({info['cuda_kernels_reason']}), "
        f"loaded here: {info['cuda_kernels_loaded']}"
        f"{'' if info['cuda_kernels_loaded'] else ' (' + str(info['cuda_kernels_error']) + ')'}",
    ]
    if not info["extension_loaded"]:
        lines.append(f"ganops compiled ops not loaded: {info['extension_error']}")
    for device in ("cpu", "cuda"):
        backends = info["available_backends"][device]
        lines.append(f"backends on {device}: {', '.join(backends) if backends else 'none (no GPU)'}")
    return lines
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; none is visible")

# Tolerances against a float64 result (docs/design.md): float64 to ~1e-10, float32 to ~1e-5
# relative. Half types are held to 2x the error of the reference run in that precision,
# see assert_within_reference_error; these are the floors of that rule.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-3),
}


def tol(dtype):
    return TOLERANCES[dtype]


def assert_within_reference_error(actual, reference_low, exact, floor_dtype, factor=2.0):
    """The flash-attention rule: ``actual``'s error against ``exact`` (a float64 result) is
    at most ``factor`` times the error of the reference run in the same low precision, with
    the dtype's tolerance as a floor for results the reference happens to get exactly."""
    exact = exact.double()
    err = (actual.double() - exact).abs().max().item()
    ref_err = (reference_low.double() - exact).abs().max().item()
    t = TOLERANCES[floor_dtype]
    floor = t["atol"] + t["rtol"] * exact.abs().max().item()
    assert err <= factor * ref_err + floor, (
        f"error {err:.3g} exceeds {factor}x the reference's {ref_err:.3g} (+ floor {floor:.3g})")


def backends_for(device: str) -> list[str]:
    """Every backend that can serve ``device`` here; the rest are reported as skips."""
    return ganops.available_backends(device)


def backend_params(devices=("cpu", "cuda")):
    """(device, backend) pairs for parametrize, each skipped with the reason it cannot run."""
    params = []
    for device in devices:
        for backend in ("cpp", "triton", "torch"):
            if device == "cuda" and not HAS_CUDA:
                reason = "needs a CUDA GPU; none is visible"
            else:
                reason = ganops._backend.unavailable_reason(backend, device)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return params
