"""The rules every op's Python entry point shares: which dtypes the kernels take, the dtype
they accumulate in, and argument checks whose errors name the argument."""

from __future__ import annotations

import math

import torch

# The dtypes every kernel takes.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 for float64, float32 for every other float (half
    types lose too much in an 8- or 11-bit mantissa). The C++ kernels' acc_t and the Triton
    kernels follow the same rule."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_number(value, name: str, *, minimum: float | None = None, finite: bool = True) -> float:
    """``value`` as a float: a Python number (not a tensor or a bool), never NaN, finite
    unless ``finite=False``, and at least ``minimum`` when given."""
    if isinstance(value, (torch.Tensor, bool)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(x) or (finite and math.isinf(x)) or (minimum is not None and x < minimum):
        what = "finite" if finite else "a number (not NaN)"
        bound = f" and >= {minimum:g}" if minimum is not None else ""
        raise ValueError(f"{name} must be {what}{bound}, got {value!r}")
    return x


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_tensor(t, name: str, *, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES, what: str = "tensors") -> None:
    """``t`` is a dense (strided) tensor of one of ``dtypes``; ``what`` names the kind of
    tensor in the layout error ("gradients", "weights")."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} is a {t.layout} tensor; ganops supports dense {what} only")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; ganops supports {_dtype_names(dtypes)} {what}")


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
