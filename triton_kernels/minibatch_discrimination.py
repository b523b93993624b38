"""Triton kernels of the minibatch-discrimination similarity behind ganops.minibatch_similarity.

Parallel in structure to csrc/minibatch_discrimination/minibatch_discrimination_cuda.cu:
each program owns BLOCK consecutive (i, b) rows of the flattened N·B rows (a CUDA thread
owns one), holds its rows M[i, b, :] as a [BLOCK, BLOCK_C] tile, loops over every j,
reduces over c in registers and accumulates only its own outputs. Nothing of size N×N is
stored; the backward passes recompute the similarities. Formulas in
csrc/minibatch_discrimination/minibatch_discrimination.h.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 64


@triton.jit
def _sign(x):
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


@triton.jit
def _rows(N, B, C, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's flat rows, their (i, b), the column offsets and the tile mask."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < N * B
    i = rows // B
    b = rows % B
    cols = tl.arange(0, BLOCK_C)
    mask = valid[:, None] & (cols[None, :] < C)
    return rows, valid, i, b, cols, mask


@triton.jit
def _similarity_kernel(m_ptr, out_ptr, N, B, C, EXCLUDE_SELF: tl.constexpr, ACC: tl.constexpr,
                       BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, valid, i, b, cols, mask = _rows(N, B, C, BLOCK, BLOCK_C)
    mi = tl.load(m_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0).to(ACC)
    o = tl.zeros([BLOCK], ACC)
    for j in range(0, N):
        mj = tl.load(m_ptr + (j * B + b)[:, None] * C + cols[None, :], mask=mask, other=0).to(ACC)
        k = tl.exp(-tl.sum(tl.abs(mi - mj), axis=1))
        if EXCLUDE_SELF:
            k = tl.where(i == j, 0.0, k)
        o += k
    tl.store(out_ptr + rows, o.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _similarity_backward_kernel(grad_ptr, m_ptr, out_ptr, N, B, C, ACC: tl.constexpr,
                                BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, valid, i, b, cols, mask = _rows(N, B, C, BLOCK, BLOCK_C)
    mi = tl.load(m_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0).to(ACC)
    gi = tl.load(grad_ptr + rows, mask=valid, other=0).to(ACC)
    acc = tl.zeros([BLOCK, BLOCK_C], ACC)
    for j in range(0, N):
        rj = j * B + b
        mj = tl.load(m_ptr + rj[:, None] * C + cols[None, :], mask=mask, other=0).to(ACC)
        gj = tl.load(grad_ptr + rj, mask=valid, other=0).to(ACC)
        diff = mi - mj
        w = -(gi + gj) * tl.exp(-tl.sum(tl.abs(diff), axis=1))
        # The j = i term is zero; leaving it out keeps an infinite entry's NaN self-difference out.
        w = tl.where(i == j, 0.0, w)
        acc += w[:, None] * _sign(diff)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _similarity_double_backward_kernel(h_ptr, grad_ptr, m_ptr, d_grad_ptr, d_m_ptr, N, B, C,
                                       ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, valid, i, b, cols, mask = _rows(N, B, C, BLOCK, BLOCK_C)
    tile_i = rows[:, None] * C + cols[None, :]
    mi = tl.load(m_ptr + tile_i, mask=mask, other=0).to(ACC)
    hi = tl.load(h_ptr + tile_i, mask=mask, other=0).to(ACC)
    gi = tl.load(grad_ptr + rows, mask=valid, other=0).to(ACC)
    dg = tl.zeros([BLOCK], ACC)
    acc = tl.zeros([BLOCK, BLOCK_C], ACC)
    for j in range(0, N):
        rj = j * B + b
        tile_j = rj[:, None] * C + cols[None, :]
        mj = tl.load(m_ptr + tile_j, mask=mask, other=0).to(ACC)
        hj = tl.load(h_ptr + tile_j, mask=mask, other=0).to(ACC)
        gj = tl.load(grad_ptr + rj, mask=valid, other=0).to(ACC)
        diff = mi - mj
        s = _sign(diff)
        kq = tl.exp(-tl.sum(tl.abs(diff), axis=1)) * tl.sum((hi - hj) * s, axis=1)
        kq = tl.where(i == j, 0.0, kq)
        dg -= kq
        acc += ((gi + gj) * kq)[:, None] * s
    tl.store(d_grad_ptr + rows, dg.to(d_grad_ptr.dtype.element_ty), mask=valid)
    tl.store(d_m_ptr + tile_i, acc.to(d_m_ptr.dtype.element_ty), mask=mask)


def _launch_args(M: torch.Tensor):
    N, B, C = M.shape
    acc = tl.float64 if M.dtype == torch.float64 else tl.float32
    grid = (triton.cdiv(N * B, BLOCK),)
    return N, B, C, acc, grid, dict(BLOCK=BLOCK, BLOCK_C=triton.next_power_of_2(max(C, 1)))


def similarity(M: torch.Tensor, exclude_self: bool) -> torch.Tensor:
    """o (N, B) in M's dtype for M (N, B, C)."""
    M = M.contiguous()
    N, B, C, acc, grid, blocks = _launch_args(M)
    out = torch.empty((N, B), dtype=M.dtype, device=M.device)
    if N * B > 0:
        _similarity_kernel[grid](M, out, N, B, C, EXCLUDE_SELF=exclude_self, ACC=acc, **blocks)
    return out


def similarity_backward(grad: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """dM (N, B, C) for the gradient ``grad`` (N, B) of o."""
    M, grad = M.contiguous(), grad.contiguous()
    N, B, C, acc, grid, blocks = _launch_args(M)
    out = torch.empty_like(M)
    if N * B > 0:
        _similarity_backward_kernel[grid](grad, M, out, N, B, C, ACC=acc, **blocks)
    return out


def similarity_double_backward(grad_grad_M: torch.Tensor, grad: torch.Tensor, M: torch.Tensor):
    """(d/d grad, d/d M) of <grad_grad_M, similarity_backward(grad, M)>."""
    M, grad, h = M.contiguous(), grad.contiguous(), grad_grad_M.contiguous()
    N, B, C, acc, grid, blocks = _launch_args(M)
    d_grad = torch.empty_like(grad)
    d_M = torch.empty_like(M)
    if N * B > 0:
        _similarity_double_backward_kernel[grid](h, grad, M, d_grad, d_M, N, B, C, ACC=acc, **blocks)
    return d_grad, d_M
