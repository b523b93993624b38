"""What the Triton kernels of every op share: the accumulation dtype (ganops._checks' rule),
correctly rounded division and square root, exact float64 scalar arguments, and the launch
device guard.

- Triton lowers ``x / y`` on float32 to the approximate ``div.full.f32`` (2 ulp) and
  ``tl.sqrt`` to ``sqrt.approx.f32``; the C++ kernels divide and take square roots
  correctly rounded, so the Triton kernels use ``div_rn`` / ``sqrt_rn`` below wherever
  the C++ ones are exact. Triton's ``tl.div_rn``/``tl.sqrt_rn`` accept float32 only;
  float64's ``/`` and ``tl.sqrt`` are already IEEE-exact.
- A Python float reaches a kernel as a float32 (the interpreter ignores a ``tl.float64``
  annotation), so a float64 scalar (eps, center, weight) would be rounded, and one beyond
  float32's range would become inf. ``split_float`` passes it as three float32 pieces and
  a power of two, which ``join_float`` reassembles exactly in float64.
- Triton launches on the current CUDA device and its current stream; ``on_device`` makes
  the tensors' device current around every launch, as the C++ launchers' CUDAGuard does.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from ganops._checks import acc_dtype  # noqa: F401  (the kernels' rule is the package's: imported here)


def acc_tl(dtype: torch.dtype):
    """The accumulation dtype (ganops._checks.acc_dtype) as a Triton type."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


@triton.jit
def div_rn(x, y):
    """x / y correctly rounded, like the C++ kernels' division."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def sqrt_rn(x):
    """sqrt(x) correctly rounded, like the C++ kernels' ::sqrt."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


def split_float(value: float) -> tuple[float, float, float, int]:
    """(hi, mid, lo, e) with value == (hi + mid + lo) * 2**e exactly, each piece a float32.

    frexp's mantissa has 53 bits: hi takes the top 24, mid the next 24, lo the last 5, so
    none is rounded when Triton passes it as a float32 and their float64 sum is exact. A
    non-finite value travels in hi alone: splitting inf would give inf - inf = NaN.
    """
    value = float(value)
    if not math.isfinite(value):
        return value, 0.0, 0.0, 0
    m, e = math.frexp(value)
    hi = _f32(m)
    mid = _f32(m - hi)
    lo = m - hi - mid
    return hi, mid, lo, e


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


@triton.jit
def _pow2(e):
    """2**e as a float64 for -1022 <= e <= 1023, built from its bits: exact."""
    return ((e + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)


@triton.jit
def join_float(hi, mid, lo, e, ACC: tl.constexpr):
    """The float64 value split_float split, rounded once to ACC (as the C++ Acc(value))."""
    m = tl.cast(hi, tl.float64) + tl.cast(mid, tl.float64) + tl.cast(lo, tl.float64)
    e = tl.cast(e, tl.int32)
    # Two factors keep each power of two normal for every e frexp gives a float64 (down
    # to -1073 for the smallest subnormal).
    half = e // 2
    return tl.cast(m * _pow2(half) * _pow2(e - half), ACC)


def on_device(fn):
    """Runs a launcher with its first tensor argument's device current (CUDA tensors only):
    Triton launches on the current device, and tensors on another device would be read
    through the wrong context and stream."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        guard = torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return fn(*args, **kwargs)

    wrapper.guards_device = True
    return wrapper
