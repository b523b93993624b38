"""Triton kernels of the multi-tensor norm, scale and clamp behind ganops.clip_grad_norm_
and ganops.clip_grad_value_.

Parallel in structure to csrc/clip_grad_norm/clip_grad_norm_cuda.cu: the same chunk
tables (one int64 buffer of data pointers, per-tensor chunk ranges and per-chunk
tensor/offset/length), one program per chunk for the partials, a two-stage finish that
combines them in a fixed order (one program per tensor over its chunks, then one program
over the tensors), and in-place kernels (scale, clamp) that walk the same chunks. Launches:
one per grad dtype for the partials, two finishing (the second also computes the clip
coefficient once, for clip_grad_norm_); one per dtype for the scale or the clamp.

Float arguments reach a compiled Triton kernel as float32, so the float64 numbers (p, 1/p,
max_norm, clip_value) travel as the int64 bit patterns of doubles and are reinterpreted on
the device (``_f64``): nothing is rounded on the way in.
"""

from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl

from ._common import acc_tl

# The work split, written here only: setup.py passes each entry to the C++ and CUDA kernels
# as GANOPS_CLIP_GRAD_NORM_<NAME> (clip_grad_norm.h's kChunkSize), so the tables are the same.
WORK_SPLIT = {"CHUNK_SIZE": 16384}
CHUNK_SIZE = WORK_SPLIT["CHUNK_SIZE"]
BLOCK = 1024
FINISH_BLOCK = 256

L1, L2, LINF, LP = 0, 1, 2, 3

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

# Doubles at or past this round to infinity in float32 (2^128 - 2^103, half an ulp past
# float32's largest value).
_FLOAT32_OVERFLOW = 3.4028235677973366e38


def norm_kind(norm_type: float) -> int:
    if norm_type == float("inf"):
        return LINF
    return {1.0: L1, 2.0: L2}.get(norm_type, LP)


def _bits(x: float, dtype: torch.dtype) -> int:
    """The int64 bit pattern of the double x, for a kernel that computes in ``dtype``.

    For float32 kernels a magnitude past float32's range is sent as infinity, which is what
    the device's float64-to-float32 conversion would give anyway; done here it keeps the
    interpreter's numpy cast from warning about the overflow.
    """
    if dtype != torch.float64 and abs(x) >= _FLOAT32_OVERFLOW:
        x = float("inf") if x > 0 else float("-inf")
    return struct.unpack("<q", struct.pack("<d", x))[0]


@triton.jit
def _f64(bits):
    # Small bit patterns arrive as int32: widen (non-negative or sign-extended, the same
    # 64 bits), then reinterpret as a double.
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _chunk(table_ptr, n_tensors, n_chunks, c, DTYPE: tl.constexpr):
    """Chunk c of the tables: (pointer to its first element, its length)."""
    k = tl.load(table_ptr + 3 * n_tensors + c)
    offset = tl.load(table_ptr + 3 * n_tensors + n_chunks + c)
    length = tl.load(table_ptr + 3 * n_tensors + 2 * n_chunks + c)
    return tl.load(table_ptr + k).to(tl.pointer_type(DTYPE)) + offset, length


@triton.jit
def _pow_nonneg(a, e):
    # a^e for a >= 0 (or NaN) and e > 0, as exp2(e log2 a). Zero is kept out of log2 and
    # gives 0; NaN and inf go through log2 and come out NaN and inf, as pow gives them.
    zero = a == 0
    return tl.where(zero, 0.0, tl.exp2(e * tl.log2(tl.where(zero, 1.0, a))))


@triton.jit
def _norm_term(x, KIND: tl.constexpr, P):
    ax = tl.abs(x)
    if KIND == 1:
        return x * x
    elif KIND == 3:
        return _pow_nonneg(ax, P)
    else:
        return ax


@triton.jit
def _nan_max(a, b):
    return tl.where((a != a) | (a > b), a, b)


@triton.jit
def _combine(a, b, KIND: tl.constexpr):
    if KIND == 2:
        return _nan_max(a, b)
    else:
        return a + b


@triton.jit
def _reduce(values, KIND: tl.constexpr):
    if KIND == 2:
        return tl.reduce(values, 0, _nan_max)
    else:
        return tl.sum(values, 0)


@triton.jit
def _finish(total, KIND: tl.constexpr, INV_P):
    if KIND == 1:
        # tl.sqrt is approximate in float32; sqrt_rn rounds correctly (float32 only).
        if total.dtype == tl.float32:
            return tl.sqrt_rn(total)
        else:
            return tl.sqrt(total)
    elif KIND == 3:
        return _pow_nonneg(total, INV_P)
    else:
        return total


@triton.jit
def _chunk_partial_kernel(table_ptr, n_tensors, n_chunks, first_chunk, partials_ptr, p_bits,
                          KIND: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
                          BLOCK: tl.constexpr):
    c = first_chunk + tl.program_id(0)
    chunk, length = _chunk(table_ptr, n_tensors, n_chunks, c, DTYPE)
    p = _f64(p_bits).to(ACC)
    acc = tl.zeros([BLOCK], ACC)
    for start in range(0, length, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        x = tl.load(chunk + idx, mask=idx < length, other=0).to(ACC)
        acc = _combine(acc, _norm_term(x, KIND, p), KIND)
    tl.store(partials_ptr + c, _reduce(acc, KIND).to(partials_ptr.dtype.element_ty))


@triton.jit
def _tensor_finish_kernel(table_ptr, n_tensors, partials_ptr, sums_ptr, per_tensor_ptr, inv_p_bits,
                          KIND: tl.constexpr, PER_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
    """The finish's first stage: program k combines tensor k's chunk partials (lane i takes
    chunks i, i + BLOCK, ..., then the lanes are reduced) into sums[k]."""
    out_ty = partials_ptr.dtype.element_ty
    k = tl.program_id(0)
    first = tl.load(table_ptr + n_tensors + k)
    count = tl.load(table_ptr + 2 * n_tensors + k)
    acc = tl.zeros([BLOCK], out_ty)
    for start in range(0, count, BLOCK):
        j = start + tl.arange(0, BLOCK)
        acc = _combine(acc, tl.load(partials_ptr + first + j, mask=j < count, other=0), KIND)
    tensor_sum = _reduce(acc, KIND)
    tl.store(sums_ptr + k, tensor_sum)
    if PER_TENSOR:
        tl.store(per_tensor_ptr + k, _finish(tensor_sum, KIND, _f64(inv_p_bits).to(out_ty)))


@triton.jit
def _clip_coefficient(total, max_norm_bits):
    max_norm = _f64(max_norm_bits).to(total.dtype)
    # torch.nn.utils.clip_grads_with_norm_'s coefficient, in the norm's dtype; correctly
    # rounded division in float32 (the plain '/' is approximate there). A NaN coefficient
    # stays NaN through the clamp, as torch.clamp leaves it; max_norm = inf gives inf, then 1.
    if total.dtype == tl.float32:
        coef = tl.div_rn(max_norm, total + 1e-6)
    else:
        coef = max_norm / (total + 1e-6)
    return tl.where(coef > 1, 1, coef).to(total.dtype)


@triton.jit
def _total_finish_kernel(sums_ptr, n_tensors, total_ptr, coef_ptr, inv_p_bits, max_norm_bits, KIND: tl.constexpr,
                         CLIP: tl.constexpr, BLOCK: tl.constexpr):
    """The second stage, one program: the tensor sums combined into the total norm, and,
    when clipping, its clip coefficient, computed here once for every scale program."""
    out_ty = sums_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], out_ty)
    for start in range(0, n_tensors, BLOCK):
        k = start + tl.arange(0, BLOCK)
        acc = _combine(acc, tl.load(sums_ptr + k, mask=k < n_tensors, other=0), KIND)
    total = _finish(_reduce(acc, KIND), KIND, _f64(inv_p_bits).to(out_ty))
    tl.store(total_ptr, total)
    if CLIP:
        tl.store(coef_ptr, _clip_coefficient(total, max_norm_bits))


@triton.jit
def _coefficient_kernel(total_ptr, coef_ptr, max_norm_bits):
    """The clip coefficient of a norm given by the caller (multi_tensor_scale_), once."""
    tl.store(coef_ptr, _clip_coefficient(tl.load(total_ptr), max_norm_bits))


@triton.jit
def _chunk_scale_kernel(table_ptr, n_tensors, n_chunks, first_chunk, coef_ptr,
                        DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    coef = tl.load(coef_ptr)
    # Multiplying by exactly 1 changes no value: leave the chunk unread and unwritten.
    if coef != 1:
        chunk, length = _chunk(table_ptr, n_tensors, n_chunks, first_chunk + tl.program_id(0), DTYPE)
        scale = coef.to(ACC)
        for start in range(0, length, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            mask = idx < length
            x = tl.load(chunk + idx, mask=mask, other=0).to(ACC)
            tl.store(chunk + idx, (x * scale).to(DTYPE), mask=mask)


@triton.jit
def _chunk_clamp_kernel(table_ptr, n_tensors, n_chunks, first_chunk, lo_bits, hi_bits,
                        DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    lo = _f64(lo_bits).to(ACC)
    hi = _f64(hi_bits).to(ACC)
    chunk, length = _chunk(table_ptr, n_tensors, n_chunks, first_chunk + tl.program_id(0), DTYPE)
    for start in range(0, length, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < length
        x = tl.load(chunk + idx, mask=mask, other=0).to(ACC)
        # clamp_min then clamp_max, as torch.nn.utils.clip_grad_value_: NaN fails both
        # comparisons and stays NaN; with hi < lo everything becomes hi, as in torch.
        x = tl.where(x < lo, lo, x)
        x = tl.where(x > hi, hi, x)
        tl.store(chunk + idx, x.to(DTYPE), mask=mask)


# ---------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------

_GROUP_ORDER = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _on(device: torch.device):
    """The tensors' device made current around a launch: Triton launches on the current
    device and its current stream, whatever device the pointers belong to."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _group_by_dtype(tensors: list[torch.Tensor], device: torch.device) -> dict:
    """{dtype: [k, ...]}, after the checks the compiled kernels make, with their messages;
    raises before anything is launched. One pass: it runs on every call."""
    groups: dict[torch.dtype, list[int]] = {}
    for k, t in enumerate(tensors):
        if t.layout != torch.strided:
            raise RuntimeError(f"gradients must be dense (strided) tensors, got {t.layout}")
        dtype = t.dtype
        if dtype not in _TL_DTYPES:
            raise RuntimeError(f"every gradient must be float16, bfloat16, float32 or float64, got {dtype}")
        if t.device != device:
            raise RuntimeError(f"gradients must all be on one device, got {device} and {t.device}")
        groups.setdefault(dtype, []).append(k)
    return groups


# Values per launch of _upload_kernel, each as two int32 halves (32 parameters).
UPLOAD_VALUES = 16
_HALF = 1 << 31


@triton.jit
def _put(table_ptr, offset, count, i: tl.constexpr, hi, lo):
    # value = hi * 2^31 + lo, both halves non-negative int32 (table values are below 2^62).
    if i < count:
        tl.store(table_ptr + offset + i, (hi.to(tl.int64) << 31) | lo.to(tl.int64))


# Every half is an int32 whatever its value, and none is specialised (on being 1 or a
# multiple of 16): one compiled kernel serves every table.
@triton.jit(do_not_specialize=["offset", "count", "h0", "l0", "h1", "l1", "h2", "l2", "h3", "l3", "h4", "l4", "h5", "l5", "h6", "l6", "h7", "l7", "h8", "l8", "h9", "l9", "h10", "l10", "h11", "l11", "h12", "l12", "h13", "l13", "h14", "l14", "h15", "l15"])
def _upload_kernel(table_ptr, offset, count, h0, l0, h1, l1, h2, l2, h3, l3, h4, l4, h5, l5, h6, l6, h7, l7, h8, l8, h9, l9, h10, l10, h11, l11, h12, l12, h13, l13, h14, l14, h15, l15):
    _put(table_ptr, offset, count, 0, h0, l0)
    _put(table_ptr, offset, count, 1, h1, l1)
    _put(table_ptr, offset, count, 2, h2, l2)
    _put(table_ptr, offset, count, 3, h3, l3)
    _put(table_ptr, offset, count, 4, h4, l4)
    _put(table_ptr, offset, count, 5, h5, l5)
    _put(table_ptr, offset, count, 6, h6, l6)
    _put(table_ptr, offset, count, 7, h7, l7)
    _put(table_ptr, offset, count, 8, h8, l8)
    _put(table_ptr, offset, count, 9, h9, l9)
    _put(table_ptr, offset, count, 10, h10, l10)
    _put(table_ptr, offset, count, 11, h11, l11)
    _put(table_ptr, offset, count, 12, h12, l12)
    _put(table_ptr, offset, count, 13, h13, l13)
    _put(table_ptr, offset, count, 14, h14, l14)
    _put(table_ptr, offset, count, 15, h15, l15)


def _uploaded(values: list[int], device: torch.device) -> torch.Tensor:
    """The table on the device, its values carried in kernel parameters (UPLOAD_VALUES per
    launch) rather than copied from host memory.

    For CUDA-graph capture: a captured host-to-device copy becomes a node that reads its
    host buffer at every replay, long after the call freed it (and pinning inside a capture
    is not safe on every torch the package supports); kernel parameters are stored with
    the graph's nodes, so nothing outlives the graph and nothing needs keeping. The table
    itself comes from the graph's memory pool, as every temporary of a captured call does.
    """
    table = torch.empty(max(len(values), 1), dtype=torch.int64, device=device)
    with _on(device):
        for offset in range(0, len(values), UPLOAD_VALUES):
            part = values[offset:offset + UPLOAD_VALUES]
            halves = [h for v in part for h in divmod(v, _HALF)]
            halves += [0] * (2 * UPLOAD_VALUES - len(halves))
            _upload_kernel[(1,)](table, offset, len(part), *halves)
    return table


# Devices on which _upload_kernel has run once eagerly: compiled and loaded before any
# capture needs it (loading a module inside a capture is not allowed), as the warm-up calls
# a capture requires do for every other kernel.
_UPLOAD_LOADED: set[torch.device] = set()


def _table_on_device(values: list[int], device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64, device=device)
    if torch.cuda.is_current_stream_capturing():
        return _uploaded(values, device)
    if device not in _UPLOAD_LOADED:
        _uploaded([0], device)
        _UPLOAD_LOADED.add(device)
    # Eagerly: one copy from pinned staging, whose block the caching host allocator keeps
    # until the copy recorded on it has run.
    return torch.tensor(values, dtype=torch.int64).pin_memory().to(device, non_blocking=True)


def _tables(tensors: list[torch.Tensor], device: torch.device, by_dtype: dict):
    """The chunk tables of clip_grad_norm.h's build_tables, chunks numbered dtype by dtype;
    ``by_dtype`` is _group_by_dtype's answer for these tensors.

    Returns (table on device, n_chunks, [(dtype, first_chunk, count)]).
    """
    n = len(tensors)
    ptrs, first, counts = [0] * n, [0] * n, [0] * n
    chunk_tensor, chunk_offset, chunk_len, groups = [], [], [], []
    for dtype in _GROUP_ORDER:
        group_first = len(chunk_tensor)
        for k in by_dtype.get(dtype, ()):
            t = tensors[k]
            numel = t.numel()
            ptrs[k], first[k] = t.data_ptr(), len(chunk_tensor)
            counts[k] = -(-numel // CHUNK_SIZE)
            for offset in range(0, numel, CHUNK_SIZE):
                chunk_tensor.append(k)
                chunk_offset.append(offset)
                chunk_len.append(min(CHUNK_SIZE, numel - offset))
        if len(chunk_tensor) > group_first:
            groups.append((dtype, group_first, len(chunk_tensor) - group_first))
    table = _table_on_device(ptrs + first + counts + chunk_tensor + chunk_offset + chunk_len, device)
    return table, len(chunk_tensor), groups


class _Work:
    """The tensors of one call, checked (before anything is copied or launched), made
    contiguous, and laid out in one device table that every kernel of the call shares."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.device = tensors[0].device
        by_dtype = _group_by_dtype(tensors, self.device)
        self.tensors = tensors
        self.work = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        self.out_dtype = torch.float64 if torch.float64 in by_dtype else torch.float32
        self.table, self.n_chunks, self.groups = _tables(self.work, self.device, by_dtype)

    def write_back(self) -> None:
        """Non-contiguous tensors were updated in contiguous copies: copy those back."""
        for t, w in zip(self.tensors, self.work):
            if w is not t:
                t.copy_(w)




def _norm(w: _Work, norm_type: float, per_tensor: bool, max_norm: float | None = None):
    """(total, per-tensor norms, clip coefficient for max_norm or None)."""
    device, out_dtype, n = w.device, w.out_dtype, len(w.work)
    kind = norm_kind(norm_type)
    partials = torch.empty(max(w.n_chunks, 1), dtype=out_dtype, device=device)
    sums = torch.empty(n, dtype=out_dtype, device=device)
    total = torch.empty((), dtype=out_dtype, device=device)
    per = torch.empty(n if per_tensor else 0, dtype=out_dtype, device=device)
    clip = max_norm is not None
    coef = torch.empty((), dtype=out_dtype, device=device) if clip else None
    inv_p = 1.0 / norm_type  # as the C++ kernels: the reciprocal in double, then rounded
    with _on(device):
        for dtype, first, count in w.groups:
            _chunk_partial_kernel[(count,)](w.table, n, w.n_chunks, first, partials, _bits(norm_type, dtype),
                                            KIND=kind, DTYPE=_TL_DTYPES[dtype], ACC=acc_tl(dtype),
                                            BLOCK=BLOCK)
        inv_p_bits = _bits(inv_p, out_dtype)
        _tensor_finish_kernel[(n,)](w.table, n, partials, sums, per if per_tensor else sums, inv_p_bits,
                                    KIND=kind, PER_TENSOR=per_tensor, BLOCK=FINISH_BLOCK)
        _total_finish_kernel[(1,)](sums, n, total, coef if clip else total, inv_p_bits,
                                   _bits(max_norm if clip else 0.0, out_dtype), KIND=kind, CLIP=clip,
                                   BLOCK=FINISH_BLOCK)
    return total, per, coef


def _scale_(w: _Work, coef: torch.Tensor) -> None:
    with _on(w.device):
        for dtype, first, count in w.groups:
            _chunk_scale_kernel[(count,)](w.table, len(w.work), w.n_chunks, first, coef,
                                          DTYPE=_TL_DTYPES[dtype], ACC=acc_tl(dtype), BLOCK=BLOCK)


def multi_tensor_norm(tensors: list[torch.Tensor], norm_type: float, per_tensor: bool):
    """(total norm, per-tensor norms or an empty tensor); float64 if any input is, else float32."""
    total, per, _ = _norm(_Work(tensors), norm_type, per_tensor)
    return total, per


def multi_tensor_scale_(tensors: list[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scales every tensor in place by min(max_norm / (total_norm + 1e-6), 1)."""
    w = _Work(tensors)
    coef = torch.empty((), dtype=total_norm.dtype, device=w.device)
    with _on(w.device):
        _coefficient_kernel[(1,)](total_norm, coef, _bits(max_norm, total_norm.dtype))
    _scale_(w, coef)
    w.write_back()


def clip_grad_norm_(grads: list[torch.Tensor], max_norm: float, norm_type: float) -> torch.Tensor:
    """The norm and its clip coefficient, then the scale, over one table: returns the norm
    before clipping."""
    w = _Work(grads)
    total, _, coef = _norm(w, norm_type, False, max_norm)
    _scale_(w, coef)
    w.write_back()
    return total


def _rounded(x: float, dtype: torch.dtype) -> float:
    """x rounded to nearest in dtype (inf past its range), as a Python float."""
    return float(torch.tensor(x, dtype=torch.float64).to(dtype))


def multi_tensor_clamp_(tensors: list[torch.Tensor], clip_value: float) -> None:
    """Clamps every tensor in place to [-clip_value, clip_value] (NaN stays NaN)."""
    w = _Work(tensors)
    with _on(w.device):
        for dtype, first, count in w.groups:
            # The bounds are rounded to the gradients' dtype here, correctly: a clamped
            # element is then the bound exactly, whatever rounding the kernel's final
            # conversion uses (the interpreter truncates to bfloat16). Comparing with the
            # rounded bound clamps the same elements as comparing with the exact one.
            _chunk_clamp_kernel[(count,)](w.table, len(w.work), w.n_chunks, first,
                                          _bits(_rounded(-clip_value, dtype), dtype),
                                          _bits(_rounded(clip_value, dtype), dtype), DTYPE=_TL_DTYPES[dtype],
                                          ACC=acc_tl(dtype), BLOCK=BLOCK)
    w.write_back()
