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

Registered ops: ``ganops::multi_tensor_norm`` / ``ganops::multi_tensor_scale_`` /
``ganops::multi_tensor_clamp_`` (cpp: CPU and CUDA kernels) and their Triton twins
``ganops::multi_tensor_norm_triton`` / ``ganops::multi_tensor_scale_triton_`` /
``ganops::multi_tensor_clamp_triton_``. The ``torch`` backend is the reference below.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Iterable

import torch

from ganops import _backend, _ext
from ganops._checks import check_number
from ganops._dtensor import is_dtensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
        if g.layout != torch.strided:
            raise TypeError(f"{name}[{i}] is a {g.layout} tensor; ganops supports dense gradients only")
        if g.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}[{i}] has dtype {g.dtype}; ganops supports float16, bfloat16, "
                            f"float32 and float64 gradients")


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
    for dtype in _FLOAT_DTYPES:
        idx = [k for k in nonempty if tensors[k].dtype == dtype]
        if not idx:
            continue
        acc = torch.float64 if dtype == torch.float64 else torch.float32
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
    """Pure-PyTorch in-place scale by min(max_norm / (total_norm + 1e-6), 1)."""
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for t in tensors:
        t.mul_(_to_device(coef, t.device))


def multi_tensor_clamp_reference_(tensors: list[torch.Tensor], clip_value: float,
                                  foreach: bool | None = None) -> None:
    """Pure-PyTorch in-place clamp to [-clip_value, clip_value], as clip_grad_value_ does it:
    the lower bound first, then the upper one (NaN stays NaN)."""
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


# ---------------------------------------------------------------------------------------
# Registered ops: fake impls for the compiled ops, Triton ops around their launchers
# ---------------------------------------------------------------------------------------

def _norm_fake(tensors, norm_type, per_tensor):
    dtype = _result_dtype(tensors)
    like = tensors[0]
    return like.new_empty((), dtype=dtype), like.new_empty((len(tensors) if per_tensor else 0,), dtype=dtype)


def _scale_fake(tensors, total_norm, max_norm):
    return None


def _clamp_fake(tensors, clip_value):
    return None


if _ext.load():
    torch.library.register_fake("ganops::multi_tensor_norm")(_norm_fake)
    torch.library.register_fake("ganops::multi_tensor_scale_")(_scale_fake)
    torch.library.register_fake("ganops::multi_tensor_clamp_")(_clamp_fake)


@torch.library.custom_op("ganops::multi_tensor_norm_triton", mutates_args=())
def _multi_tensor_norm_triton(tensors: list[torch.Tensor], norm_type: float,
                              per_tensor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from ganops.triton_kernels import clip_grad_norm as kernels
    return kernels.multi_tensor_norm(tensors, norm_type, per_tensor)


@torch.library.custom_op("ganops::multi_tensor_scale_triton_", mutates_args=("tensors",))
def _multi_tensor_scale_triton_(tensors: list[torch.Tensor], total_norm: torch.Tensor,
                                max_norm: float) -> None:
    from ganops.triton_kernels import clip_grad_norm as kernels
    kernels.multi_tensor_scale_(tensors, total_norm, max_norm)


@torch.library.custom_op("ganops::clip_grad_norm_triton_", mutates_args=("grads",))
def _clip_grad_norm_triton_(grads: list[torch.Tensor], max_norm: float, norm_type: float) -> torch.Tensor:
    from ganops.triton_kernels import clip_grad_norm as kernels
    return kernels.clip_grad_norm_(grads, max_norm, norm_type)


@torch.library.custom_op("ganops::multi_tensor_clamp_triton_", mutates_args=("tensors",))
def _multi_tensor_clamp_triton_(tensors: list[torch.Tensor], clip_value: float) -> None:
    from ganops.triton_kernels import clip_grad_norm as kernels
    kernels.multi_tensor_clamp_(tensors, clip_value)


def _clip_fake(grads, max_norm, norm_type):
    return grads[0].new_empty((), dtype=_result_dtype(grads))


_multi_tensor_norm_triton.register_fake(_norm_fake)
_multi_tensor_scale_triton_.register_fake(_scale_fake)
_clip_grad_norm_triton_.register_fake(_clip_fake)
_multi_tensor_clamp_triton_.register_fake(_clamp_fake)
if _ext.load():
    torch.library.register_fake("ganops::clip_grad_norm_")(_clip_fake)


# ---------------------------------------------------------------------------------------
# Dispatch: one call per device, each served by its backend
# ---------------------------------------------------------------------------------------

def _by_device(tensors: list[torch.Tensor]) -> dict[torch.device, list[int]]:
    groups: dict[torch.device, list[int]] = {}
    for k, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(k)
    return groups


def _device_norm(tensors, norm_type, per_tensor, backend, foreach):
    name = _backend.resolve(backend, tensors[0].device)
    if name == "cpp":
        return torch.ops.ganops.multi_tensor_norm(tensors, norm_type, per_tensor)
    if name == "triton":
        return torch.ops.ganops.multi_tensor_norm_triton(tensors, norm_type, per_tensor)
    return multi_tensor_norm_reference(tensors, norm_type, per_tensor, foreach)


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
    name = _backend.resolve(backend, tensors[0].device)
    total_norm = _to_device(total_norm, tensors[0].device)
    if name == "cpp":
        torch.ops.ganops.multi_tensor_scale_(tensors, total_norm, max_norm)
    elif name == "triton":
        torch.ops.ganops.multi_tensor_scale_triton_(tensors, total_norm, max_norm)
    else:
        multi_tensor_scale_reference_(tensors, total_norm, max_norm)


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


# ---------------------------------------------------------------------------------------
# Sharded gradients (DTensor, as FSDP2's fully_shard makes them)
# ---------------------------------------------------------------------------------------

def _dtensor_norms(grads, norm_type, backend, foreach):
    """(total, per-tensor norms, mesh) of DTensor gradients, as plain tensors holding the
    global values on every rank.

    Each rank takes the norms of its local shards with the kernels, raises them to the p-th
    power, and sums (max for inf) the entries of tensors sharded along a mesh dimension over
    that dimension's process group: one all-reduce of one small vector per mesh dimension,
    on the device, with no host synchronisation. Replicated tensors are counted once.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    mesh = grads[0].device_mesh
    for i, g in enumerate(grads):
        if not isinstance(g, DTensor):
            raise TypeError(f"parameters' gradients mix DTensors and plain tensors (gradient {i} is a "
                            f"plain tensor); shard every parameter, or none")
        if g.device_mesh != mesh:
            raise ValueError(f"gradient {i} lives on another device mesh than gradient 0; "
                             f"ganops clips gradients of one mesh per call")
        if any(pl.is_partial() for pl in g.placements):
            raise NotImplementedError(f"gradient {i} has a Partial placement; reduce it first "
                                      f"(FSDP2 gradients are Shard or Replicate)")
    _, per = _norms([g.to_local() for g in grads], norm_type, True, backend, foreach)
    inf = norm_type == math.inf
    powers = per if inf else per.pow(norm_type)
    for dim in range(mesh.ndim):
        sharded = [g.placements[dim].is_shard() for g in grads]
        if not any(sharded):
            continue
        mask = torch.tensor(sharded)
        mask = mask.pin_memory().to(per.device, non_blocking=True) if per.is_cuda else mask.to(per.device)
        partial = torch.where(mask, powers, torch.zeros_like(powers))
        dist.all_reduce(partial, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM,
                        group=mesh.get_group(dim))
        powers = torch.where(mask, partial, powers)
    if inf:
        return powers.max(), powers, mesh
    return powers.sum().pow(1.0 / norm_type), powers.pow(1.0 / norm_type), mesh


def _global_norms(tensors, norm_type, per_tensor, backend, foreach, name):
    """(total, per-tensor norms, mesh) of plain tensors (mesh None) or of DTensor shards."""
    if is_dtensor(tensors[0]):
        return _dtensor_norms(tensors, norm_type, backend, foreach)
    _check_grads(tensors, name)
    total, per = _norms(tensors, norm_type, per_tensor, backend, foreach)
    return total, per, None


def _replicated(total: torch.Tensor, mesh):
    from torch.distributed.tensor import DTensor, Replicate
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


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
    return total if mesh is None else _replicated(total, mesh)


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


def _fused(op, grads, *args):
    """``op(grads, *args)``: one compiled or Triton call over every gradient;
    _SEVERAL_DEVICES where the gradients span several devices (the caller then goes device
    by device).

    The kernels check every gradient before they touch any (dense, floating, one device)
    and raise RuntimeError; checking here instead would cost a Python pass over thousands of
    gradients on every call. On their refusal, _check_grads says what is wrong in the
    caller's terms, with the message the `torch` backend gives.
    """
    try:
        with torch.no_grad():
            return op(grads, *args)
    except RuntimeError:
        _check_grads(grads, "parameters' gradients")
        if len(_by_device(grads)) == 1:
            raise
        return _SEVERAL_DEVICES


def _scale_all_(grads, total_norm, max_norm, backend):
    """Scales gradients (plain or DTensor, on any devices) by the clip coefficient of total_norm."""
    grads = [_local(g) for g in grads]
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
    name = _backend.resolve(backend, grads[0].device)
    if name != "torch" and not error_if_nonfinite and not is_dtensor(grads[0]):
        fused = torch.ops.ganops.clip_grad_norm_ if name == "cpp" else torch.ops.ganops.clip_grad_norm_triton_
        total = _fused(fused, grads, max_norm, p)
        if total is not _SEVERAL_DEVICES:
            return total
    with torch.no_grad():
        total, _, mesh = _global_norms(grads, p, False, backend, foreach, "parameters' gradients")
        if error_if_nonfinite:
            _raise_if_nonfinite(total, p)
        _scale_all_(grads, total, max_norm, backend)
    return total if mesh is None else _replicated(total, mesh)


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
        grads = [_local(g) for g in grads]  # an elementwise clamp of each shard is the clamp
    name = _backend.resolve(backend, grads[0].device)
    if name != "torch":
        fused = torch.ops.ganops.multi_tensor_clamp_ if name == "cpp" else torch.ops.ganops.multi_tensor_clamp_triton_
        if _fused(fused, grads, clip_value) is _SEVERAL_DEVICES:
            for idx in _by_device(grads).values():
                _device_clamp_([grads[k] for k in idx], clip_value, backend, foreach)
        return
    _check_grads(grads, "parameters' gradients")
    with torch.no_grad():
        for idx in _by_device(grads).values():
            _device_clamp_([grads[k] for k in idx], clip_value, backend, foreach)


def _device_clamp_(tensors, clip_value, backend, foreach):
    name = _backend.resolve(backend, tensors[0].device)
    with torch.no_grad():
        if name == "cpp":
            torch.ops.ganops.multi_tensor_clamp_(tensors, clip_value)
        elif name == "triton":
            torch.ops.ganops.multi_tensor_clamp_triton_(tensors, clip_value)
        else:
            multi_tensor_clamp_reference_(tensors, clip_value, foreach)
