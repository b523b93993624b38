"""The shared benchmark harness: cases, verification, timing, peak memory.

A bench_<op>.py module defines ``cases(device) -> list[Case]``. For every case the runner
first runs the reference and every other implementation once and compares their outputs
(stopping loudly on a mismatch), then times each: warm-up calls, then the median of
individually timed calls (CUDA: events after synchronisation, and the L2 cache flushed
before every call, so no call finds its inputs left in cache by the one before). ``reset``
runs untimed before every call, for ops that work in place. A memory-bound case names the
bytes an ideal implementation moves (``bytes_moved``), and the runner turns its times into
GB/s and a fraction of the device's copy bandwidth measured in the same run.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


@dataclasses.dataclass
class Impl:
    label: str
    fn: Callable[[], Any]
    reset: Callable[[], None] | None = None
    # Maps fn's return value to the outputs compared with the reference, untimed: for ops
    # that work in place, the tensors they changed.
    result: Callable[[Any], Any] | None = None
    check: bool = True
    # For calls of seconds: (warm-up calls, timed calls), in place of the defaults of
    # time_impl (a time budget and at least 7 timed calls).
    repeats: tuple[int, int] | None = None

    def outputs(self):
        """Resets, runs once and returns the outputs to compare."""
        if self.reset:
            self.reset()
        out = self.fn()
        return self.result(out) if self.result else out


@dataclasses.dataclass
class Target:
    """``impl`` must be at least ``speedup`` times faster than the best of ``baselines``."""
    impl: str
    baselines: tuple[str, ...]
    speedup: float
    # Optional: peak extra memory of impl at most this fraction of the first baseline's.
    memory_fraction: float | None = None


@dataclasses.dataclass
class Case:
    op: str
    name: str
    device: str
    reference: Impl
    impls: list[Impl]
    rtol: float
    atol: float
    targets: list[Target] = dataclasses.field(default_factory=list)
    measure_memory: bool = False
    # For memory-bound cases: the bytes one call must read and write at the least.
    bytes_moved: int | None = None


class VerificationError(AssertionError):
    pass


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _flatten(item)]
    if out is None:
        return []
    raise TypeError(f"benchmark outputs must be tensors or tuples of tensors, got {type(out).__name__}")


def max_error(out, ref) -> float:
    """Largest absolute difference; raises if shapes differ or NaNs appear in one only."""
    outs, refs = _flatten(out), _flatten(ref)
    if len(outs) != len(refs):
        raise VerificationError(f"{len(outs)} outputs against the reference's {len(refs)}")
    worst = 0.0
    for o, r in zip(outs, refs):
        if o.shape != r.shape:
            raise VerificationError(f"shape {tuple(o.shape)} against the reference's {tuple(r.shape)}")
        o64, r64 = o.detach().double().cpu(), r.detach().double().cpu()
        if not torch.equal(o64.isnan(), r64.isnan()):
            raise VerificationError("NaNs differ from the reference's")
        finite = ~r64.isnan()
        if finite.any():
            worst = max(worst, (o64[finite] - r64[finite]).abs().max().item())
    return worst


def fwd_bwd(fn: Callable, x: torch.Tensor, grad: torch.Tensor) -> Callable:
    """A timed call of fn's forward and its backward with ``grad``: returns (output, dx)."""
    def run():
        leaf = x.detach().requires_grad_()
        out = fn(leaf)
        (dx,) = torch.autograd.grad(out, leaf, grad)
        return out.detach(), dx
    return run


def reference_outputs(case: Case) -> list[torch.Tensor]:
    """The reference's outputs, run once and kept (the reference may reuse its buffers)."""
    return [r.detach().clone() for r in _flatten(case.reference.outputs())]


def check(case: Case, impl: Impl, ref: list[torch.Tensor]) -> float:
    """Runs ``impl`` once; its max error against ``ref``, or VerificationError past the case's
    tolerance (atol + rtol x the largest reference value)."""
    err = max_error(impl.outputs(), ref)
    scale = max((r.detach().double().abs().max().item() for r in ref if r.numel()), default=0.0)
    if err > case.atol + case.rtol * scale:
        raise VerificationError(
            f"{case.op} / {case.name}: {impl.label} differs from the reference by {err:.3g} "
            f"(allowed {case.atol:g} + {case.rtol:g} x {scale:.3g})")
    return err


def verify(case: Case) -> dict[str, float]:
    """Runs the reference and every checked implementation once; returns their max errors."""
    ref = reference_outputs(case)
    return {impl.label: check(case, impl, ref) for impl in case.impls if impl.check}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


_l2_flush_buffers: dict[int, torch.Tensor] = {}


def flush_l2(device: str) -> None:
    """Writes a buffer twice the size of the GPU's L2 cache, evicting whatever a previous
    call left there (an H200's 60 MiB L2 holds many benchmark inputs whole)."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    buf = _l2_flush_buffers.get(index)
    if buf is None:
        l2 = getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or 64 * 2**20
        buf = _l2_flush_buffers[index] = torch.empty(2 * l2 // 4, dtype=torch.float32, device=f"cuda:{index}")
    buf.fill_(1.0)


def copy_bandwidth(device: str, nbytes: int = 2**30) -> dict[str, float]:
    """The device's achievable memory bandwidth: a device-to-device copy of ``nbytes``
    (read once, written once), timed like a case. Also the nominal peak from the device's
    memory clock and bus width, where torch reports them."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    timing = time_impl(Impl("copy", lambda: dst.copy_(src)), device, min_time=0.2, max_reps=50)
    result = {"bytes": 2 * nbytes, "seconds": timing["median"], "gbps": 2 * nbytes / timing["median"] / 1e9}
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        # Double data rate: two transfers per clock.
        result["nominal_gbps"] = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    del src, dst
    return result


def time_impl(impl: Impl, device: str, min_time: float = 0.4, max_reps: int = 200,
              min_reps: int = 7, warmup: int = 3) -> dict[str, float]:
    """Median and spread of individually timed calls, in seconds."""
    if impl.repeats:
        (warmup, min_reps), min_time = impl.repeats, 0.0
    for _ in range(warmup):
        if impl.reset:
            impl.reset()
        impl.fn()
    _sync(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < min_reps or (spent < min_time and len(times) < max_reps):
        if impl.reset:
            impl.reset()
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            flush_l2(device)
            torch.cuda.synchronize()
            start.record()
            impl.fn()
            end.record()
            torch.cuda.synchronize()
            t = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            impl.fn()
            t = time.perf_counter() - t0
        times.append(t)
        spent += t
    times.sort()
    return {"median": statistics.median(times), "p10": times[len(times) // 10],
            "p90": times[(9 * len(times)) // 10], "reps": len(times)}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_freed_memory() -> None:
    """Hands the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing).

    A case's ``reset`` for CPU memory measurements: peak_extra_memory reads the growth of
    the resident set, and a call that reuses pages an earlier call freed (allocations under
    glibc's mmap threshold, up to 32 MiB, stay in the heap) would show less than it uses.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (AttributeError, OSError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def peak_extra_memory(impl: Impl, device: str) -> float | None:
    """Peak memory one call adds above what was live before it, in bytes.

    CUDA: the caching allocator's peak. CPU (Linux): the resident-set high-water mark,
    reset through /proc/self/clear_refs before the call.
    """
    if impl.reset:
        impl.reset()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        impl.fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _rss_kib("VmRSS")
    impl.fn()
    return float(max(0, _rss_kib("VmHWM") - before) * 1024)
