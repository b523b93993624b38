"""The benchmark runner's cases under pytest-benchmark: `make bench-pytest`.

Each (case, implementation) is verified against the case's reference, then timed by
pytest-benchmark with the case's untimed reset before every round (on CUDA also the L2
flush of the runner; pytest-benchmark times on the host, so the runner's CUDA events are
the numbers to quote).
"""

import pytest
import torch

from benchmarks.harness import check, flush_l2, reference_outputs
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
    check(case, impl, reference_outputs(case))
    benchmark.group = f"{case.op}: {case.name} ({case.device})"
    def setup():
        if impl.reset:
            impl.reset()
        if case.device.startswith("cuda"):
            flush_l2(case.device)
            torch.cuda.synchronize()

    def call():
        impl.fn()
        if case.device.startswith("cuda"):
            torch.cuda.synchronize()

    benchmark.pedantic(call, setup=setup, rounds=20, warmup_rounds=2)
