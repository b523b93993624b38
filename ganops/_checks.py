"""Argument checks shared by the ops' Python entry points; every error names the argument."""

from __future__ import annotations

import math

import torch


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
