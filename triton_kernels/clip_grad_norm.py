"""Triton kernels of the multi-tensor norm and scale behind ganops.clip_grad_norm_.

Parallel in structure to csrc/clip_grad_norm/clip_grad_norm_cuda.cu: the same chunk
tables (one int64 buffer of data pointers, per-tensor chunk ranges and per-chunk
tensor/offset/length), one program per chunk for the partials, one finishing program that
combines them in a fixed order, and a scale kernel that reads the clip coefficient's
inputs from device memory. Launches: one per grad dtype for the partials, one finishing;
one per dtype for the scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Must match kChunkSize in csrc/clip_grad_norm/clip_grad_norm.h: the tables are the same.
CHUNK_SIZE = 16384
BLOCK = 1024
FINISH_BLOCK = 256

L1, L2, LINF, LP = 0, 1, 2, 3

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def norm_kind(norm_type: float) -> int:
    if norm_type == float("inf"):
        return LINF
    return {1.0: L1, 2.0: L2}.get(norm_type, LP)


@triton.jit
def _norm_term(x, KIND: tl.constexpr, P):
    ax = tl.abs(x)
    if KIND == 1:
        return x * x
    elif KIND == 3:
        # |x|^p for p > 0, as exp2(p log2|x|); zeros kept out of log2.
        positive = ax > 0
        return tl.where(positive, tl.exp2(P * tl.log2(tl.where(positive, ax, 1.0))), 0.0)
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
def _finish(total, KIND: tl.constexpr, P):
    if KIND == 1:
        # tl.sqrt is approximate in float32; sqrt_rn rounds correctly (float32 only).
        if total.dtype == tl.float32:
            return tl.sqrt_rn(total)
        else:
            return tl.sqrt(total)
    elif KIND == 3:
        positive = total > 0
        return tl.where(positive, tl.exp2(tl.log2(tl.where(positive, total, 1.0)) / P), 0.0)
    else:
        return total


@triton.jit
def _chunk_partial_kernel(table_ptr, n_tensors, n_chunks, first_chunk, partials_ptr, P,
                          KIND: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
                          BLOCK: tl.constexpr):
    c = first_chunk + tl.program_id(0)
    k = tl.load(table_ptr + 3 * n_tensors + c)
    offset = tl.load(table_ptr + 3 * n_tensors + n_chunks + c)
    length = tl.load(table_ptr + 3 * n_tensors + 2 * n_chunks + c)
    chunk = tl.load(table_ptr + k).to(tl.pointer_type(DTYPE)) + offset
    acc = tl.zeros([BLOCK], ACC)
    for start in range(0, length, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        x = tl.load(chunk + idx, mask=idx < length, other=0).to(ACC)
        acc = _combine(acc, _norm_term(x, KIND, P), KIND)
    tl.store(partials_ptr + c, _reduce(acc, KIND).to(partials_ptr.dtype.element_ty))


@triton.jit
def _finish_kernel(table_ptr, n_tensors, partials_ptr, per_tensor_ptr, total_ptr, P,
                   KIND: tl.constexpr, PER_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
    out_ty = partials_ptr.dtype.element_ty
    total = tl.zeros([BLOCK], out_ty)
    for start in range(0, n_tensors, BLOCK):
        k = start + tl.arange(0, BLOCK)
        in_range = k < n_tensors
        first = tl.load(table_ptr + n_tensors + k, mask=in_range, other=0)
        count = tl.load(table_ptr + 2 * n_tensors + k, mask=in_range, other=0)
        acc = tl.zeros([BLOCK], out_ty)
        for j in range(0, tl.max(count, 0)):
            part = tl.load(partials_ptr + first + j, mask=j < count, other=0)
            acc = _combine(acc, part, KIND)
        if PER_TENSOR:
            tl.store(per_tensor_ptr + k, _finish(acc, KIND, P), mask=in_range)
        total = _combine(total, acc, KIND)
    tl.store(total_ptr, _finish(_reduce(total, KIND), KIND, P))


@triton.jit
def _chunk_scale_kernel(table_ptr, n_tensors, n_chunks, first_chunk, total_ptr, max_norm_hi,
                        max_norm_lo, DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    total = tl.load(total_ptr)
    # Float arguments arrive as float32; hi + lo carries a float64 max_norm to ~48 bits.
    max_norm = tl.cast(max_norm_hi, total.dtype) + tl.cast(max_norm_lo, total.dtype)
    coef = max_norm / (total + 1e-6)
    coef = tl.where(coef > 1, 1, coef).to(total.dtype)
    # Multiplying by exactly 1 changes no value: leave the chunk unread and unwritten.
    if coef != 1:
        c = first_chunk + tl.program_id(0)
        k = tl.load(table_ptr + 3 * n_tensors + c)
        offset = tl.load(table_ptr + 3 * n_tensors + n_chunks + c)
        length = tl.load(table_ptr + 3 * n_tensors + 2 * n_chunks + c)
        chunk = tl.load(table_ptr + k).to(tl.pointer_type(DTYPE)) + offset
        scale = coef.to(ACC)
        for start in range(0, length, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            mask = idx < length
            x = tl.load(chunk + idx, mask=mask, other=0).to(ACC)
            tl.store(chunk + idx, (x * scale).to(DTYPE), mask=mask)


_GROUP_ORDER = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _tables(tensors: list[torch.Tensor], device: torch.device):
    """The chunk tables of clip_grad_norm.h's build_tables, chunks numbered dtype by dtype.

    Returns (table on device, n_chunks, [(dtype, first_chunk, count)]).
    """
    n = len(tensors)
    ptrs, first, counts = [0] * n, [0] * n, [0] * n
    chunk_tensor, chunk_offset, chunk_len, groups = [], [], [], []
    for dtype in _GROUP_ORDER:
        group_first = len(chunk_tensor)
        for k, t in enumerate(tensors):
            if t.dtype != dtype:
                continue
            numel = t.numel()
            ptrs[k], first[k] = t.data_ptr(), len(chunk_tensor)
            counts[k] = -(-numel // CHUNK_SIZE)
            for offset in range(0, numel, CHUNK_SIZE):
                chunk_tensor.append(k)
                chunk_offset.append(offset)
                chunk_len.append(min(CHUNK_SIZE, numel - offset))
        if len(chunk_tensor) > group_first:
            groups.append((dtype, group_first, len(chunk_tensor) - group_first))
    host = torch.tensor(ptrs + first + counts + chunk_tensor + chunk_offset + chunk_len, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True), len(chunk_tensor), groups


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def multi_tensor_norm(tensors: list[torch.Tensor], norm_type: float, per_tensor: bool):
    """(total norm, per-tensor norms or an empty tensor); float64 if any input is, else float32."""
    device = tensors[0].device
    tensors = [t.contiguous() for t in tensors]
    out_dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    table, n_chunks, groups = _tables(tensors, device)
    kind = norm_kind(norm_type)
    partials = torch.empty(max(n_chunks, 1), dtype=out_dtype, device=device)
    for dtype, first, count in groups:
        _chunk_partial_kernel[(count,)](table, len(tensors), n_chunks, first, partials, norm_type,
                                        KIND=kind, DTYPE=_TL_DTYPES[dtype], ACC=_acc_dtype(dtype),
                                        BLOCK=BLOCK)
    total = torch.empty((), dtype=out_dtype, device=device)
    per = torch.empty(len(tensors) if per_tensor else 0, dtype=out_dtype, device=device)
    _finish_kernel[(1,)](table, len(tensors), partials, per if per_tensor else total, total, norm_type,
                         KIND=kind, PER_TENSOR=per_tensor, BLOCK=FINISH_BLOCK)
    return total, per


def multi_tensor_scale_(tensors: list[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scales every tensor in place by min(max_norm / (total_norm + 1e-6), 1)."""
    device = tensors[0].device
    work = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    table, n_chunks, groups = _tables(work, device)
    max_norm_hi = float(torch.tensor(max_norm, dtype=torch.float32))
    max_norm_lo = max_norm - max_norm_hi
    for dtype, first, count in groups:
        _chunk_scale_kernel[(count,)](table, len(work), n_chunks, first, total_norm, max_norm_hi,
                                      max_norm_lo, DTYPE=_TL_DTYPES[dtype], ACC=_acc_dtype(dtype),
                                      BLOCK=BLOCK)
    for t, w in zip(tensors, work):
        if w is not t:
            t.copy_(w)
