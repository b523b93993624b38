"""Triton kernels of minibatch standard deviation (ganops.minibatch_stddev).

Parallel in structure to csrc/minibatch_stddev/minibatch_stddev_cuda.cu: x viewed as
(G, M, F, L) (G the group size, M = N / G groups, F stat channels, L = C / F · H · W columns
per (group, stat channel)); a program per (j, f, chunk) numbered b = (j · F + f) · n_chunks + q
on a 1-D grid, a lane per column, each column's mean and σ in two passes over its G values;
per-program partial sums combined in chunk order by a finishing program per (j, f); an
output program per OUTPUT_BLOCK elements. The backward sums grad's stat channels per (j, f),
then writes ∂x with the forward's split.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype as _acc_torch
from ._common import acc_tl as _acc
from ._common import div_rn, join_float, on_device, split_float, sqrt_rn

# The work split the CUDA kernels share (setup.py passes it to csrc/minibatch_stddev/
# minibatch_stddev.h): columns per (j, f, chunk) program, output elements per output program.
WORK_SPLIT = {"CHUNK_SIZE": 2048, "OUTPUT_CHUNK": 4096}
CHUNK_SIZE = WORK_SPLIT["CHUNK_SIZE"]
OUTPUT_BLOCK = WORK_SPLIT["OUTPUT_CHUNK"]
# Lanes per program, one per CUDA thread of a block (kThreads).
BLOCK = 256
FINISH_BLOCK = 256
# StyleGAN2's epsilon under the square root, as float32 pieces that join_float makes exact in
# float64 (a Python float reaches a kernel as a float32: 1e-8 would be off by 6e-17).
EPSILON = split_float(1e-8)


def _layout(x: torch.Tensor, group_size: int, num_channels: int) -> tuple[int, int, int, int, int]:
    """(G, M, F, L, S) of x, checked as the C++ kernels check it."""
    if x.dim() != 4 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if not (1 <= group_size <= n and n % group_size == 0):
        raise ValueError(f"group_size {group_size} must divide the batch size N of x, shape {tuple(x.shape)}")
    if not (num_channels >= 1 and c % num_channels == 0):
        raise ValueError(f"num_channels {num_channels} must divide the channel count C of x, shape {tuple(x.shape)}")
    return group_size, n // group_size, num_channels, c // num_channels * h * w, h * w


@triton.jit
def _column_stats(x_ptr, column, mask, G, group_stride, eps, ACC: tl.constexpr):
    """(μ, σ) of the columns at x_ptr + column, value g at + g · group_stride (int64): Σ in g
    order, then Σ (y − μ)², as column_stats in the C++ header."""
    total = tl.zeros(column.shape, ACC)
    for g in range(0, G):
        total += tl.load(x_ptr + g * group_stride + column, mask=mask, other=0).to(ACC)
    mean = div_rn(total, tl.cast(G, ACC))
    sum_sq = tl.zeros(column.shape, ACC)
    for g in range(0, G):
        d = tl.load(x_ptr + g * group_stride + column, mask=mask, other=0).to(ACC) - mean
        sum_sq += d * d
    return mean, sqrt_rn(div_rn(sum_sq, tl.cast(G, ACC)) + eps)


@triton.jit
def _task(L, n_chunks, CHUNK: tl.constexpr):
    """This program's (j, f) as jf, its chunk's first column and the chunk's length."""
    b = tl.program_id(0).to(tl.int64)
    jf = b // n_chunks
    start = (b % n_chunks) * CHUNK
    return jf, start, tl.minimum(L - start, CHUNK)


@triton.jit
def _stats_kernel(x_ptr, partials_ptr, G, MF, L, n_chunks, e_hi, e_mid, e_lo, e_e, ACC: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    jf, start, length = _task(L, n_chunks, CHUNK)
    eps = join_float(e_hi, e_mid, e_lo, e_e, ACC)
    group_stride = tl.cast(MF, tl.int64) * L
    acc = tl.zeros([BLOCK], ACC)
    for i in range(0, length, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        mask = idx < length
        _, std = _column_stats(x_ptr, jf * L + start + idx, mask, G, group_stride, eps, ACC)
        acc += tl.where(mask, std, 0)
    tl.store(partials_ptr + tl.program_id(0).to(tl.int64), tl.sum(acc, 0))


@triton.jit
def _finish_kernel(partials_ptr, stat_ptr, MF, L, n_chunks, ACC: tl.constexpr, BLOCK: tl.constexpr):
    jf = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = jf < MF
    acc = tl.zeros([BLOCK], ACC)
    for q in range(0, n_chunks):
        acc += tl.load(partials_ptr + (jf * n_chunks + q), mask=mask, other=0)
    tl.store(stat_ptr + jf, div_rn(acc, tl.cast(L, ACC)), mask=mask)


@triton.jit
def _output_kernel(x_ptr, stat_ptr, out_ptr, total, M, F, L, S, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = o < total
    x_numel = tl.cast(F, tl.int64) * L
    per_sample = x_numel + tl.cast(F, tl.int64) * S
    n = o // per_sample
    r = o - n * per_sample
    from_x = r < x_numel
    xv = tl.load(x_ptr + (n * x_numel + r), mask=mask & from_x, other=0)
    sv = tl.load(stat_ptr + ((n % M) * F + (r - x_numel) // S), mask=mask & (r >= x_numel), other=0)
    tl.store(out_ptr + o, tl.where(from_x, xv, sv.to(out_ptr.dtype.element_ty)), mask=mask)


@triton.jit
def _stat_grad_kernel(grad_ptr, k_ptr, G, M, F, L, S, ACC: tl.constexpr, BLOCK: tl.constexpr):
    jf = tl.program_id(0).to(tl.int64)
    j = jf // F
    f = jf - j * F
    x_numel = tl.cast(F, tl.int64) * L
    per_sample = x_numel + tl.cast(F, tl.int64) * S
    group_numel = tl.cast(G, tl.int64) * S
    acc = tl.zeros([BLOCK], ACC)
    for i in range(0, group_numel, BLOCK):
        t = i + tl.arange(0, BLOCK).to(tl.int64)
        g = t // S
        acc += tl.load(grad_ptr + ((g * M + j) * per_sample + x_numel + f * S + (t - g * S)), mask=t < group_numel,
                       other=0).to(ACC)
    tl.store(k_ptr + jf, div_rn(tl.sum(acc, 0), tl.cast(L, ACC)))


@triton.jit
def _backward_kernel(grad_ptr, x_ptr, k_ptr, grad_x_ptr, G, M, F, L, S, n_chunks, e_hi, e_mid, e_lo, e_e,
                     ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    jf, start, length = _task(L, n_chunks, CHUNK)
    eps = join_float(e_hi, e_mid, e_lo, e_e, ACC)
    j = jf // F
    f = jf - j * F
    per_sample = tl.cast(F, tl.int64) * (L + S)
    group_stride = tl.cast(M, tl.int64) * F * L
    k = tl.load(k_ptr + jf)
    for i in range(0, length, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        mask = idx < length
        column = jf * L + start + idx
        mean, std = _column_stats(x_ptr, column, mask, G, group_stride, eps, ACC)
        scale = div_rn(k, tl.cast(G, ACC) * std)
        for g in range(0, G):
            y = tl.load(x_ptr + g * group_stride + column, mask=mask, other=0).to(ACC)
            go = tl.load(grad_ptr + ((tl.cast(g, tl.int64) * M + j) * per_sample + f * L + start + idx), mask=mask,
                         other=0).to(ACC)
            tl.store(grad_x_ptr + g * group_stride + column, (go + scale * (y - mean)).to(grad_x_ptr.dtype.element_ty),
                     mask=mask)


@on_device
def minibatch_stddev(x: torch.Tensor, group_size: int, num_channels: int) -> torch.Tensor:
    """cat([x, per-group stat], 1), (N, C + F, H, W); group_size divides N."""
    G, M, F, L, S = _layout(x, group_size, num_channels)
    x = x.contiguous()
    n, c, h, w = x.shape
    n_chunks = triton.cdiv(L, CHUNK_SIZE)
    acc = _acc(x.dtype)
    partials = x.new_empty(M * F * n_chunks, dtype=_acc_torch(x.dtype))
    stat = x.new_empty(M * F, dtype=_acc_torch(x.dtype))
    out = x.new_empty((n, c + F, h, w))
    _stats_kernel[(M * F * n_chunks,)](x, partials, G, M * F, L, n_chunks, *EPSILON, ACC=acc, CHUNK=CHUNK_SIZE,
                                       BLOCK=BLOCK)
    _finish_kernel[(triton.cdiv(M * F, FINISH_BLOCK),)](partials, stat, M * F, L, n_chunks, ACC=acc,
                                                         BLOCK=FINISH_BLOCK)
    _output_kernel[(triton.cdiv(out.numel(), OUTPUT_BLOCK),)](x, stat, out, out.numel(), M, F, L, S,
                                                              BLOCK=OUTPUT_BLOCK)
    return out


@on_device
def minibatch_stddev_backward(grad: torch.Tensor, x: torch.Tensor, group_size: int, num_channels: int) -> torch.Tensor:
    """∂x given grad = ∂loss/∂output, (N, C + F, H, W)."""
    G, M, F, L, S = _layout(x, group_size, num_channels)
    n, c, h, w = x.shape
    if tuple(grad.shape) != (n, c + F, h, w):
        raise ValueError(f"grad must have the output's shape {(n, c + F, h, w)}, got {tuple(grad.shape)}")
    if grad.dtype != x.dtype or grad.device != x.device:
        raise ValueError(f"grad must have x's dtype {x.dtype} and device {x.device}, got {grad.dtype} on {grad.device}")
    x, grad = x.contiguous(), grad.contiguous()
    n_chunks = triton.cdiv(L, CHUNK_SIZE)
    acc = _acc(x.dtype)
    k = x.new_empty(M * F, dtype=_acc_torch(x.dtype))
    grad_x = torch.empty_like(x)
    _stat_grad_kernel[(M * F,)](grad, k, G, M, F, L, S, ACC=acc, BLOCK=BLOCK)
    _backward_kernel[(M * F * n_chunks,)](grad, x, k, grad_x, G, M, F, L, S, n_chunks, *EPSILON, ACC=acc,
                                          CHUNK=CHUNK_SIZE, BLOCK=BLOCK)
    return grad_x
