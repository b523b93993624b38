"""The benchmark runner's cases under pytest-benchmark: `make bench-pytest`.

Each (case, implementation) is verified against the case's reference, then timed by
pytest-benchmark with the case's untimed reset before every round.
"""

import pytest
import torch

from benchmarks.harness import _flatten, max_error
from benchmarks.run import bench_modules


def _params():
    params = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for module in bench_modules(None):
        for device in devices:
            for case in module.cases(device):
                for impl in [case.reference] + case.impls:
                    params.append(pytest.param(case, impl, id=f"{case.op}/{case.name}/{device}/{impl.label}"))
    return params


@pytest.mark.parametrize("case,impl", _params())
def test_benchmark(benchmark, case, impl):
    ref = [t.detach().clone() for t in _flatten(case.reference.outputs())]
    out = impl.outputs()
    scale = max((r.double().abs().max().item() for r in ref if r.numel()), default=0.0)
    assert max_error(out, ref) <= case.atol + case.rtol * scale
    benchmark.group = f"{case.op}: {case.name} ({case.device})"
    benchmark.pedantic(impl.fn, setup=impl.reset, rounds=20, warmup_rounds=2)
