"""Triton kernels of the minibatch-discrimination similarity behind ganops.minibatch_similarity.

Parallel in structure to csrc/minibatch_discrimination/minibatch_discrimination_cuda.cu:
each program owns BLOCK consecutive (i, b) rows of the flattened N·B rows (a CUDA thread
owns one), loops over every j, reduces over c in registers and accumulates only its own
outputs. Nothing of size N×N is stored; the backward passes recompute the similarities.
Formulas in csrc/minibatch_discrimination/minibatch_discrimination.h.

Columns come in tiles of at most MAX_BLOCK_C: a [BLOCK, next_pow2(C)] tile spills registers
from C = 128 on and stops compiling past 2^20 elements. With C <= MAX_BLOCK_C (the usual
kernel_dims of 3 to 16) the program's own rows stay in registers across the j loop, as
before; beyond it each distance is summed over the column tiles, and the backward passes,
whose outputs are per column, give each column tile its own program (a 1-D grid of
(row block, column tile) pairs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_tl, on_device

BLOCK = 64
# 64 x 64 tiles: 32 values per thread and tile at 4 warps, the widest that stays in registers.
MAX_BLOCK_C = 64


@triton.jit
def _sign(x):
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


@triton.jit
def _rows(N, B, n_col_tiles, BLOCK: tl.constexpr):
    """This program's flat rows (int64: N·B may pass 2^31), their (i, b), validity, and its
    column tile."""
    p = tl.program_id(0).to(tl.int64)
    rows = (p // n_col_tiles) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < tl.cast(N, tl.int64) * B
    return rows, valid, rows // B, rows % B, p % n_col_tiles


@triton.jit
def _tile(ptr, r, c0, C, valid, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """ptr[r, c0 : c0 + BLOCK_C] of an (N·B, C) tensor, zero outside."""
    cols = c0 + tl.arange(0, BLOCK_C)
    mask = valid[:, None] & (cols[None, :] < C)
    return tl.load(ptr + r[:, None] * C + cols[None, :], mask=mask, other=0).to(ACC)


@triton.jit
def _store_tile(ptr, r, c0, C, valid, x, BLOCK_C: tl.constexpr):
    cols = c0 + tl.arange(0, BLOCK_C)
    mask = valid[:, None] & (cols[None, :] < C)
    tl.store(ptr + r[:, None] * C + cols[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _l1(m_ptr, ri, rj, C, valid, ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """‖M[ri] − M[rj]‖₁ per row, summed over every column tile."""
    d = tl.zeros([BLOCK], ACC)
    for c0 in range(0, C, BLOCK_C):
        d += tl.sum(tl.abs(_tile(m_ptr, ri, c0, C, valid, ACC, BLOCK_C) - _tile(m_ptr, rj, c0, C, valid, ACC,
                                                                                  BLOCK_C)), axis=1)
    return d


@triton.jit
def _l1_and_q(m_ptr, h_ptr, ri, rj, C, valid, ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """(‖M[ri] − M[rj]‖₁, Σ_c (h[ri] − h[rj]) sign(M[ri] − M[rj])) per row, over every column tile."""
    d = tl.zeros([BLOCK], ACC)
    q = tl.zeros([BLOCK], ACC)
    for c0 in range(0, C, BLOCK_C):
        diff = _tile(m_ptr, ri, c0, C, valid, ACC, BLOCK_C) - _tile(m_ptr, rj, c0, C, valid, ACC, BLOCK_C)
        dh = _tile(h_ptr, ri, c0, C, valid, ACC, BLOCK_C) - _tile(h_ptr, rj, c0, C, valid, ACC, BLOCK_C)
        d += tl.sum(tl.abs(diff), axis=1)
        q += tl.sum(dh * _sign(diff), axis=1)
    return d, q


@triton.jit
def _similarity_kernel(m_ptr, out_ptr, N, B, C, EXCLUDE_SELF: tl.constexpr, ACC: tl.constexpr,
                       BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, ONE_TILE: tl.constexpr):
    rows, valid, i, b, _ = _rows(N, B, 1, BLOCK)
    mi = _tile(m_ptr, rows, 0, C, valid, ACC, BLOCK_C)
    o = tl.zeros([BLOCK], ACC)
    for j in range(0, N):
        rj = b + tl.cast(j, tl.int64) * B
        if ONE_TILE:
            d = tl.sum(tl.abs(mi - _tile(m_ptr, rj, 0, C, valid, ACC, BLOCK_C)), axis=1)
        else:
            d = _l1(m_ptr, rows, rj, C, valid, ACC, BLOCK, BLOCK_C)
        k = tl.exp(-d)
        if EXCLUDE_SELF:
            k = tl.where(i == j, 0.0, k)
        o += k
    tl.store(out_ptr + rows, o.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _similarity_backward_kernel(grad_ptr, m_ptr, out_ptr, N, B, C, n_col_tiles, ACC: tl.constexpr,
                                BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, ONE_TILE: tl.constexpr):
    rows, valid, i, b, tile = _rows(N, B, n_col_tiles, BLOCK)
    c0 = tile * BLOCK_C
    mi = _tile(m_ptr, rows, c0, C, valid, ACC, BLOCK_C)
    gi = tl.load(grad_ptr + rows, mask=valid, other=0).to(ACC)
    acc = tl.zeros([BLOCK, BLOCK_C], ACC)
    for j in range(0, N):
        rj = b + tl.cast(j, tl.int64) * B
        gj = tl.load(grad_ptr + rj, mask=valid, other=0).to(ACC)
        diff = mi - _tile(m_ptr, rj, c0, C, valid, ACC, BLOCK_C)
        if ONE_TILE:
            d = tl.sum(tl.abs(diff), axis=1)
        else:
            d = _l1(m_ptr, rows, rj, C, valid, ACC, BLOCK, BLOCK_C)
        w = -(gi + gj) * tl.exp(-d)
        # The j = i term is zero; leaving it out keeps an infinite entry's NaN self-difference out.
        w = tl.where(i == j, 0.0, w)
        acc += w[:, None] * _sign(diff)
    _store_tile(out_ptr, rows, c0, C, valid, acc, BLOCK_C)


@triton.jit
def _similarity_double_backward_kernel(h_ptr, grad_ptr, m_ptr, d_grad_ptr, d_m_ptr, N, B, C, n_col_tiles,
                                       ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                                       ONE_TILE: tl.constexpr):
    rows, valid, i, b, tile = _rows(N, B, n_col_tiles, BLOCK)
    c0 = tile * BLOCK_C
    mi = _tile(m_ptr, rows, c0, C, valid, ACC, BLOCK_C)
    hi = _tile(h_ptr, rows, c0, C, valid, ACC, BLOCK_C)
    gi = tl.load(grad_ptr + rows, mask=valid, other=0).to(ACC)
    dg = tl.zeros([BLOCK], ACC)
    acc = tl.zeros([BLOCK, BLOCK_C], ACC)
    for j in range(0, N):
        rj = b + tl.cast(j, tl.int64) * B
        gj = tl.load(grad_ptr + rj, mask=valid, other=0).to(ACC)
        diff = mi - _tile(m_ptr, rj, c0, C, valid, ACC, BLOCK_C)
        s = _sign(diff)
        if ONE_TILE:
            d = tl.sum(tl.abs(diff), axis=1)
            q = tl.sum((hi - _tile(h_ptr, rj, c0, C, valid, ACC, BLOCK_C)) * s, axis=1)
        else:
            d, q = _l1_and_q(m_ptr, h_ptr, rows, rj, C, valid, ACC, BLOCK, BLOCK_C)
        kq = tl.exp(-d) * q
        kq = tl.where(i == j, 0.0, kq)
        dg -= kq
        acc += ((gi + gj) * kq)[:, None] * s
    # Every column tile's program has the same d/dg; the first one writes it.
    tl.store(d_grad_ptr + rows, dg.to(d_grad_ptr.dtype.element_ty), mask=valid & (tile == 0))
    _store_tile(d_m_ptr, rows, c0, C, valid, acc, BLOCK_C)


def block_c(C: int) -> int:
    """The column tile: C rounded up to a power of two, at most MAX_BLOCK_C."""
    return min(triton.next_power_of_2(max(C, 1)), MAX_BLOCK_C)


def _launch_args(M: torch.Tensor, per_column: bool):
    """(N, B, C, accumulation type, grid, column tiles, block constexprs); with per_column
    each column tile gets its own programs."""
    N, B, C = M.shape
    bc = block_c(C)
    # At least one tile: with C = 0 the backward passes still write d/dg (zeros).
    n_col_tiles = max(triton.cdiv(C, bc), 1) if per_column else 1
    grid = (triton.cdiv(N * B, BLOCK) * n_col_tiles,)
    return N, B, C, acc_tl(M.dtype), grid, n_col_tiles, dict(BLOCK=BLOCK, BLOCK_C=bc, ONE_TILE=C <= bc)


@on_device
def minibatch_discrimination(M: torch.Tensor, exclude_self: bool) -> torch.Tensor:
    """o (N, B) in M's dtype for M (N, B, C)."""
    M = M.contiguous()
    N, B, C, acc, grid, _, blocks = _launch_args(M, per_column=False)
    out = torch.empty((N, B), dtype=M.dtype, device=M.device)
    if N * B > 0:
        _similarity_kernel[grid](M, out, N, B, C, EXCLUDE_SELF=exclude_self, ACC=acc, **blocks)
    return out


@on_device
def minibatch_discrimination_backward(grad: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """dM (N, B, C) for the gradient ``grad`` (N, B) of o."""
    M, grad = M.contiguous(), grad.contiguous()
    N, B, C, acc, grid, n_col_tiles, blocks = _launch_args(M, per_column=True)
    out = torch.empty_like(M)
    if N * B > 0:
        _similarity_backward_kernel[grid](grad, M, out, N, B, C, n_col_tiles, ACC=acc, **blocks)
    return out


@on_device
def minibatch_discrimination_double_backward(grad_grad_M: torch.Tensor, grad: torch.Tensor, M: torch.Tensor):
    """(d/d grad, d/d M) of <grad_grad_M, minibatch_discrimination_backward(grad, M)>."""
    M, grad, h = M.contiguous(), grad.contiguous(), grad_grad_M.contiguous()
    N, B, C, acc, grid, n_col_tiles, blocks = _launch_args(M, per_column=True)
    d_grad = torch.empty_like(grad)
    d_M = torch.empty_like(M)
    if N * B > 0:
        _similarity_double_backward_kernel[grid](h, grad, M, d_grad, d_M, N, B, C, n_col_tiles, ACC=acc, **blocks)
    return d_grad, d_M
