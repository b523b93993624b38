"""Global gradient-norm clipping: a drop-in for torch.nn.utils.clip_grad_norm_ (and for
clip_grad_value_).

    total = (Σ_k ‖g_k‖_p^p)^(1/p)    (max_k ‖g_k‖_∞ for p = inf)
    g_k  ← g_k · min(max_norm / (total + 1e-6), 1)

The kernels are multi-tensor: one pass reads every gradient once into per-chunk partials
(a fixed number of launches however many tensors there are), the coefficient is computed
on the device, and a second pass scales the gradients in place, so nothing waits on the
host unless ``error_if_nonfinite`` asks for a check. Where torch is weak: half-precision
gradients accumulate in float32 and their norm comes back in float32 (the result dtype is
float64 if any gradient is float64, else float32); gradients of mixed dtypes and devices
are fine in one call.

Registered ops (ganops._library): ``multi_tensor_norm``, ``multi_tensor_scale_``,
``clip_grad_norm_`` (both in one call) and ``multi_tensor_clamp_``, each with a CPU, a CUDA and
a Triton kernel; the ``torch`` backend is the reference below. DTensor gradients (FSDP2) go
through ganops._distributed.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Iterable

import torch

from ganops import _distributed, _library
from ganops._checks import FLOAT_DTYPES, acc_dtype, check_number, check_tensor
from ganops._distributed import is_dtensor


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------

def _check_norm_type(norm_type) -> float:
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise TypeError(f"norm_type must be a positive number or 'inf', got {norm_type!r}") from None
    if not p > 0:
        raise ValueError(f"norm_type must be positive (1, 2, inf or any p > 0), got {norm_type!r}")
    return p


def _tensor_list(tensors, name: str) -> list[torch.Tensor]:
    """A single tensor or an iterable of tensors, as a list; anything else is a TypeError."""
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if not isinstance(tensors, Iterable):
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got {type(tensors).__name__}")
    out = list(tensors)
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    return out


def _check_grads(grads: list[torch.Tensor], name: str) -> None:
    for i, g in enumerate(grads):
        check_tensor(g, f"{name}[{i}]", what="gradients")


def _grads_of(parameters, warn_empty_generator: bool = False) -> list[torch.Tensor]:
    """The gradients of a tensor or an iterable of tensors, skipping those without one.

    With ``warn_empty_generator``, an exhausted (or empty) generator gets the warning
    torch.nn.utils.clip_grad_norm_ gives: passing ``model.parameters()`` a second time is a
    common mistake that would otherwise clip nothing silently.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    elif not isinstance(parameters, Iterable):
        raise TypeError(f"parameters must be a tensor or an iterable of tensors, got "
                        f"{type(parameters).__name__}")
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if warn_empty_generator and is_generator and not parameters:
            # stacklevel 3: the caller of the public function, past this helper.
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                          stacklevel=3)
    # One attribute read per parameter: with thousands of parameters this loop is a large
    # part of a call, so the per-element type check runs only if it fails.
    grads = []
    try:
        for p in parameters:
            g = p.grad
            if g is not None:
                grads.append(g)
    except AttributeError:
        _tensor_list(parameters, "parameters")
        raise
    return grads


def _result_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ---------------------------------------------------------------------------------------
# The reference (the `torch` backend)
# ---------------------------------------------------------------------------------------

def multi_tensor_norm_reference(tensors: list[torch.Tensor], norm_type: float, per_tensor: bool,
                                foreach: bool | None = None):
    """Pure-PyTorch multi-tensor norm on one device: (total, per-tensor norms or empty).

    Accumulates half types in float32, like the kernels; an empty tensor's norm is 0.
    """
    out_dtype = _result_dtype(tensors)
    norms = torch.zeros(len(tensors), dtype=out_dtype, device=tensors[0].device)
    nonempty = [k for k, t in enumerate(tensors) if t.numel() > 0]
    use_foreach = foreach if foreach is not None else tensors[0].device.type == "cuda"
    for dtype in FLOAT_DTYPES:
        idx = [k for k in nonempty if tensors[k].dtype == dtype]
        if not idx:
            continue
        acc = acc_dtype(dtype)
        group = [tensors[k] for k in idx]
        if use_foreach:
            group_norms = torch._foreach_norm(group, norm_type, dtype=acc)
        else:
            group_norms = [torch.linalg.vector_norm(t, norm_type, dtype=acc) for t in group]
        norms[idx] = torch.stack(group_norms).to(out_dtype)
    total = torch.linalg.vector_norm(norms, norm_type)
    return total, (norms if per_tensor else norms.new_empty(0))


def multi_tensor_scale_reference_(tensors: list[torch.Tensor], total_norm: torch.Tensor,
                                  max_norm: float) -> None:
    """Pure-PyTorch in-place scale by min(max_norm / (total_norm + 1e-6), 1). Like the
    kernels, it checks every tensor before it changes any."""
    _check_grads(tensors, "tensors")
    _scale_checked_(tensors, total_norm, max_norm)


def _scale_checked_(tensors: list[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for t in tensors:
        t.mul_(_to_device(coef, t.device))


def multi_tensor_clamp_reference_(tensors: list[torch.Tensor], clip_value: float,
                                  foreach: bool | None = None) -> None:
    """Pure-PyTorch in-place clamp to [-clip_value, clip_value], as clip_grad_value_ does it:
    the lower bound first, then the upper one (NaN stays NaN). Like the kernels, it checks
    every tensor before it changes any."""
    _check_grads(tensors, "parameters' gradients")
    use_foreach = foreach if foreach is not None else tensors[0].device.type == "cuda"
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, group in by_dtype.items():
        # torch refuses a bound past the dtype's range; clamping by it changes nothing
        # finite, as clamping by inf does (the kernels' answer).
        c = math.inf if abs(clip_value) > torch.finfo(dtype).max else abs(clip_value)
        c = math.copysign(c, clip_value)
        if use_foreach:
            torch._foreach_clamp_min_(group, -c)
            torch._foreach_clamp_max_(group, c)
        else:
            for t in group:
                t.clamp_(min=-c, max=c)


def clip_grad_norm_reference_(grads: list[torch.Tensor], max_norm: float, norm_type: float,
                              foreach: bool | None = None) -> torch.Tensor:
    """Pure-PyTorch clip of gradients on one device: the norm, then the scale; returns the norm."""
    _check_grads(grads, "parameters' gradients")
    total, _ = multi_tensor_norm_reference(grads, norm_type, False, foreach)
    _scale_checked_(grads, total, max_norm)  # checked once, above
    return total


# ---------------------------------------------------------------------------------------
# Registered ops
# ---------------------------------------------------------------------------------------

def _grads_examples(device, dtype):
    """Gradient sets: small tensors, one spanning several chunks, a non-contiguous one, an
    empty one and a float32 one beside the dtype under test; one past the CPU kernels'
    threshold for a second thread; a single element."""
    def make(*shape):
        return torch.randn(shape, device=device, dtype=dtype)
    return [[make(3, 4), make(40000), make(6, 5).t(), make(0), torch.randn(7, device=device)],
            [make(300000), make(20000, 3)], [make(1)]]


def _norm_fake(tensors, norm_type, per_tensor):
    dtype = _result_dtype(tensors)
    like = tensors[0]
    return like.new_empty((), dtype=dtype), like.new_empty((len(tensors) if per_tensor else 0,), dtype=dtype)


MULTI_TENSOR_NORM = _library.define(
    "multi_tensor_norm", "(Tensor[] tensors, float norm_type, bool per_tensor) -> (Tensor, Tensor)",
    fake=_norm_fake, reference=multi_tensor_norm_reference, triton="clip_grad_norm.multi_tensor_norm",
    examples=lambda device, dtype: [(ts, p, per) for ts in _grads_examples(device, dtype)
                                    for p, per in [(2.0, True), (1.0, False), (math.inf, True), (3.5, True)]])

MULTI_TENSOR_SCALE = _library.define(
    "multi_tensor_scale_", "(Tensor(a!)[] tensors, Tensor total_norm, float max_norm) -> ()",
    fake=lambda tensors, total_norm, max_norm: None,
    reference=multi_tensor_scale_reference_, triton="clip_grad_norm.multi_tensor_scale_",
    examples=lambda device, dtype: [(ts, torch.full((), total, device=device), max_norm)
                                    for ts in _grads_examples(device, dtype)
                                    for total, max_norm in [(50.0, 1.0), (0.5, 1.0)]])

CLIP_GRAD_NORM = _library.define(
    "clip_grad_norm_", "(Tensor(a!)[] grads, float max_norm, float norm_type) -> Tensor",
    fake=lambda grads, max_norm, norm_type: grads[0].new_empty((), dtype=_result_dtype(grads)),
    reference=clip_grad_norm_reference_, triton="clip_grad_norm.clip_grad_norm_",
    examples=lambda device, dtype: [(ts, 1.0, p) for ts in _grads_examples(device, dtype) for p in (2.0, math.inf)])

MULTI_TENSOR_CLAMP = _library.define(
    "multi_tensor_clamp_", "(Tensor(a!)[] tensors, float clip_value) -> ()",
    fake=lambda tensors, clip_value: None,
    reference=multi_tensor_clamp_reference_, triton="clip_grad_norm.multi_tensor_clamp_",
    examples=lambda device, dtype: [(ts, c) for ts in _grads_examples(device, dtype) for c in (0.5, -0.25)])


# ---------------------------------------------------------------------------------------
# Dispatch: one call per device, each served by its backend
# ---------------------------------------------------------------------------------------

def _by_device(tensors: list[torch.Tensor]) -> dict[torch.device, list[int]]:
    groups: dict[torch.device, list[int]] = {}
    for k, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(k)
    return groups


def _device_norm(tensors, norm_type, per_tensor, backend, foreach):
    return _library.call(MULTI_TENSOR_NORM, backend, tensors[0].device, tensors, norm_type, per_tensor,
                         foreach=foreach)


def _to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on ``device`` (and in ``dtype``), without a host synchronisation where none is needed.

    Between GPUs, and from the host to a GPU, the copy is stream-ordered before every later
    kernel on the destination, so it need not block. A copy from a GPU to the host must
    block: the CPU kernels read the value as soon as the copy returns, and a non-blocking
    copy would let them read it before it has arrived.
    """
    if device.type == "cpu" and t.device.type != "cpu":
        return t.to(device, dtype)
    return t.to(device, dtype, non_blocking=True)


def _device_scale_(tensors, total_norm, max_norm, backend):
    device = tensors[0].device
    _library.call(MULTI_TENSOR_SCALE, backend, device, tensors, _to_device(total_norm, device), max_norm)


def _norms(tensors, norm_type, per_tensor, backend, foreach):
    """(total, per-tensor norms) over tensors on any mix of devices; both on tensors[0]'s device."""
    groups = _by_device(tensors)
    if len(groups) == 1:
        return _device_norm(tensors, norm_type, per_tensor, backend, foreach)
    first = tensors[0].device
    dtype = _result_dtype(tensors)
    totals, pieces = [], []
    for idx in groups.values():
        total, per = _device_norm([tensors[k] for k in idx], norm_type, per_tensor, backend, foreach)
        totals.append(_to_device(total, first, dtype))
        pieces.append(_to_device(per, first, dtype))
    total = torch.linalg.vector_norm(torch.stack(totals), norm_type)
    if not per_tensor:
        return total, total.new_empty(0)
    # The norms arrive device group by device group; put each back at its tensor's place
    # with one slice copy per run of consecutive tensors on one device (an index tensor
    # would need a host-to-device copy of the permutation).
    order = [k for idx in groups.values() for k in idx]
    flat = torch.cat(pieces)
    per = torch.empty(len(tensors), dtype=dtype, device=first)
    start = 0
    for end in range(1, len(order) + 1):
        if end == len(order) or order[end] != order[end - 1] + 1:
            per[order[start]:order[end - 1] + 1] = flat[start:end]
            start = end
    return total, per


def _global_norms(tensors, norm_type, per_tensor, backend, foreach, name):
    """(total, per-tensor norms, mesh) of plain tensors (mesh None) or of DTensor shards."""
    if is_dtensor(tensors[0]):
        return _distributed.dtensor_norms(
            tensors, norm_type, lambda local: _norms(local, norm_type, True, backend, foreach)[1])
    _check_grads(tensors, name)
    total, per = _norms(tensors, norm_type, per_tensor, backend, foreach)
    return total, per, None


def _raise_if_nonfinite(total: torch.Tensor, norm_type: float) -> None:
    # The one host synchronisation, and only when the caller asked for the check. The
    # wording is torch.nn.utils.clip_grad_norm_'s: code and tests match on it.
    if not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
            f"so it cannot be clipped. To disable this error and scale the gradients by the "
            f"non-finite norm anyway, set `error_if_nonfinite=False`")


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def get_total_norm(tensors, norm_type: float | str = 2.0, error_if_nonfinite: bool = False,
                   foreach: bool | None = None, *, backend: str | None = None) -> torch.Tensor:
    """The norm of all ``tensors`` together, as if concatenated into one vector.

    Like torch.nn.utils.get_total_norm; the result is a 0-dim float32 tensor (float64 if any
    tensor is float64) on the first tensor's device. ``foreach`` only affects the ``torch``
    backend: the compiled and Triton kernels are always multi-tensor.
    """
    tensors = _tensor_list(tensors, "tensors")
    p = _check_norm_type(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    total, _, mesh = _global_norms(tensors, p, False, backend, foreach, "tensors")
    if error_if_nonfinite:
        _raise_if_nonfinite(total, p)
    return total if mesh is None else _distributed.replicated(total, mesh)


def clip_grads_with_norm_(parameters, max_norm: float, total_norm: torch.Tensor,
                          foreach: bool | None = None, *, backend: str | None = None) -> None:
    """Scales the gradients of ``parameters`` in place by min(max_norm / (total_norm + 1e-6), 1).

    Like torch.nn.utils.clip_grads_with_norm_; the coefficient is computed on the device.
    """
    grads = _grads_of(parameters)
    max_norm = check_number(max_norm, "max_norm", minimum=0.0, finite=False)
    if not isinstance(total_norm, torch.Tensor):
        raise TypeError(f"total_norm must be a tensor, got {type(total_norm).__name__}")
    if not grads:
        return
    if is_dtensor(total_norm):
        total_norm = total_norm.full_tensor()
    if total_norm.dtype not in (torch.float32, torch.float64):
        total_norm = total_norm.float()
    _scale_all_(grads, total_norm, max_norm, backend)


# What _fused answers when the gradients span several devices.
_SEVERAL_DEVICES = object()


def _fused(op, backend, grads, *args, **reference_options):
    """``op(grads, *args)`` on the backend that serves: one call over every gradient;
    _SEVERAL_DEVICES where the gradients span several devices (the caller then goes device
    by device).

    The ops check every gradient before they touch any (dense, floating, one device) and
    raise; checking here instead would cost a Python pass over thousands of gradients on
    every call. On a RuntimeError, _check_grads says what is wrong in the caller's terms, with
    the message every backend gives.
    """
    try:
        with torch.no_grad():
            return _library.call(op, backend, grads[0].device, grads, *args, **reference_options)
    except RuntimeError:
        _check_grads(grads, "parameters' gradients")
        if len(_by_device(grads)) == 1:
            raise
        return _SEVERAL_DEVICES


def _scale_all_(grads, total_norm, max_norm, backend):
    """Scales gradients (plain or DTensor, on any devices) by the clip coefficient of total_norm."""
    grads = [_distributed.local(g) for g in grads]
    _check_grads(grads, "parameters' gradients")
    with torch.no_grad():
        for idx in _by_device(grads).values():
            _device_scale_([grads[k] for k in idx], total_norm, max_norm, backend)


def clip_grad_norm_(parameters, max_norm: float, norm_type: float | str = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None, *,
                    backend: str | None = None) -> torch.Tensor:
    """Clips the gradient norm of ``parameters`` in place; returns the norm before clipping.

    A drop-in for torch.nn.utils.clip_grad_norm_: ``parameters`` is a tensor or an iterable
    of tensors (those without ``.grad`` are skipped); the norm is taken over all gradients
    together; the gradients are multiplied by min(max_norm / (total + 1e-6), 1). With
    ``error_if_nonfinite=True`` a NaN or infinite norm raises RuntimeError (this check is the
    only host synchronisation). ``backend`` picks the implementation (see ganops.use_backend).
    """
    grads = _grads_of(parameters, warn_empty_generator=True)
    max_norm = check_number(max_norm, "max_norm", minimum=0.0, finite=False)
    p = _check_norm_type(norm_type)
    if not grads:
        return torch.tensor(0.0)
    if not error_if_nonfinite and not is_dtensor(grads[0]):
        total = _fused(CLIP_GRAD_NORM, backend, grads, max_norm, p, foreach=foreach)
        if total is not _SEVERAL_DEVICES:
            return total
    with torch.no_grad():
        total, _, mesh = _global_norms(grads, p, False, backend, foreach, "parameters' gradients")
        if error_if_nonfinite:
            _raise_if_nonfinite(total, p)
        _scale_all_(grads, total, max_norm, backend)
    return total if mesh is None else _distributed.replicated(total, mesh)


def grad_norm(parameters, norm_type: float | str = 2.0, per_tensor: bool = False, *,
              backend: str | None = None):
    """The total gradient norm of ``parameters``, and with ``per_tensor=True`` every gradient's norm.

    Both come from the same single pass and stay on the device, so logging them every step
    costs no synchronisation per parameter. Returns ``total`` or ``(total, norms)``, where
    ``norms[i]`` is the norm of the i-th parameter that has a gradient (parameters without
    ``.grad`` are skipped, as in clip_grad_norm_).
    """
    grads = _grads_of(parameters)
    p = _check_norm_type(norm_type)
    if not grads:
        total = torch.tensor(0.0)
        return (total, torch.zeros(0)) if per_tensor else total
    with torch.no_grad():
        total, per, _ = _global_norms(grads, p, per_tensor, backend, None, "parameters' gradients")
    return (total, per) if per_tensor else total


def clip_grad_value_(parameters, clip_value: float, foreach: bool | None = None, *,
                     backend: str | None = None) -> None:
    """Clamps the gradients of ``parameters`` in place to [-clip_value, clip_value].

    A drop-in for torch.nn.utils.clip_grad_value_: ``parameters`` is a tensor or an iterable
    of tensors (those without ``.grad`` are skipped), NaN stays NaN, and a negative
    ``clip_value`` sets every gradient to it, as torch's clamp_min-then-clamp_max does.
    One multi-tensor kernel per grad dtype on the ``cpp`` and ``triton`` backends;
    ``foreach`` only affects the ``torch`` backend. Returns None.
    """
    grads = _grads_of(parameters)
    clip_value = check_number(clip_value, "clip_value", finite=False)
    if not grads:
        return
    if is_dtensor(grads[0]):
        grads = [_distributed.local(g) for g in grads]  # an elementwise clamp of each shard is the clamp
    if _fused(MULTI_TENSOR_CLAMP, backend, grads, clip_value, foreach=foreach) is _SEVERAL_DEVICES:
        with torch.no_grad():
            for idx in _by_device(grads).values():
                device_grads = [grads[k] for k in idx]
                _library.call(MULTI_TENSOR_CLAMP, backend, device_grads[0].device, device_grads, clip_value,
                              foreach=foreach)
