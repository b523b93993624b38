"""Triton kernels of spectral normalization behind ganops.spectral_norm.

Parallel in structure to csrc/spectral_norm/spectral_norm_cuda.cu: the weight is read in
place as the matrix torch builds with weight.permute(dim, ...).flatten(1), matrix element
(i, j = a * inner + b) at offset (a * rows + i) * inner + b. One power iteration is four
launches: a program per row for t = W v, one program for u = t / max(|t|, eps), a program
per (column block, row chunk) for partials of W^T u, and one program that combines them in
chunk order into v and sigma = |W^T u|^2 / max(|W^T u|, eps). No atomics: every sum has a
fixed order. The scale and the backward are chunk-per-program passes reading sigma and the
backward's coefficient from device memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, div_rn, join_float, on_device, split_float, sqrt_rn

# The work split, written here only: setup.py passes each entry to the C++ and CUDA kernels
# as GANOPS_SPECTRAL_NORM_<NAME> (spectral_norm.h's kRowsPerChunk and kChunkSize).
WORK_SPLIT = {"ROWS_PER_CHUNK": 64, "CHUNK_SIZE": 4096}
ROWS_PER_CHUNK = WORK_SPLIT["ROWS_PER_CHUNK"]
CHUNK_SIZE = WORK_SPLIT["CHUNK_SIZE"]
BLOCK = 256


@triton.jit
def _offsets(i, j, rows, inner):
    return ((j // inner) * rows + i) * inner + j % inner


@triton.jit
def _row_dot_kernel(w_ptr, x_ptr, t_ptr, rows, inner, cols, BLOCK: tl.constexpr):
    acc_ty = t_ptr.dtype.element_ty
    i = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], acc_ty)
    for start in range(0, cols, BLOCK):
        j = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < cols
        w = tl.load(w_ptr + _offsets(i, j, rows, inner), mask=mask, other=0).to(acc_ty)
        x = tl.load(x_ptr + j, mask=mask, other=0).to(acc_ty)
        acc += w * x
    tl.store(t_ptr + i, tl.sum(acc, 0))


@triton.jit
def _clamped_norm(sum_sq, eps):
    """spectral_norm.h's clamped_norm: sqrt(sum_sq) clamped below at eps; a NaN norm stays NaN."""
    norm = sqrt_rn(sum_sq)
    return tl.where((norm > eps) | (norm != norm), norm, eps)


@triton.jit
def _normalize_kernel(t_ptr, n, out_ptr, eps_hi, eps_mid, eps_lo, eps_e, BLOCK: tl.constexpr):
    """out = t / max(|t|, eps), one program."""
    acc_ty = t_ptr.dtype.element_ty
    eps = join_float(eps_hi, eps_mid, eps_lo, eps_e, acc_ty)
    acc = tl.zeros([BLOCK], acc_ty)
    for start in range(0, n, BLOCK):
        k = start + tl.arange(0, BLOCK)
        x = tl.load(t_ptr + k, mask=k < n, other=0)
        acc += x * x
    denom = _clamped_norm(tl.sum(acc, 0), eps)
    for start in range(0, n, BLOCK):
        k = start + tl.arange(0, BLOCK)
        x = tl.load(t_ptr + k, mask=k < n, other=0)
        tl.store(out_ptr + k, div_rn(x, denom).to(out_ptr.dtype.element_ty), mask=k < n)


@triton.jit
def _col_partial_kernel(w_ptr, x_ptr, partials_ptr, rows, inner, cols, n_col_blocks, ROWS_PER_CHUNK: tl.constexpr,
                        BLOCK: tl.constexpr):
    """Program p: column block p % n_col_blocks, row chunk p // n_col_blocks (a 1-D grid:
    grid axis 1 would stop at 65535 row chunks, 4.2 M rows)."""
    acc_ty = partials_ptr.dtype.element_ty
    p = tl.program_id(0).to(tl.int64)
    j = (p % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    r = p // n_col_blocks
    mask = j < cols
    acc = tl.zeros([BLOCK], acc_ty)
    end = tl.minimum(r * ROWS_PER_CHUNK + ROWS_PER_CHUNK, rows)
    for i in range(r * ROWS_PER_CHUNK, end):
        w = tl.load(w_ptr + _offsets(i, j, rows, inner), mask=mask, other=0).to(acc_ty)
        acc += w * tl.load(x_ptr + i).to(acc_ty)
    tl.store(partials_ptr + r * cols + j, acc, mask=mask)


@triton.jit
def _combined_cols(partials_ptr, j, mask, cols, n_row_chunks, acc_ty: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.zeros([BLOCK], acc_ty)
    for r in range(0, n_row_chunks):
        s += tl.load(partials_ptr + r * cols + j, mask=mask, other=0)
    return s


@triton.jit
def _finish_cols_kernel(partials_ptr, cols, n_row_chunks, v_ptr, sigma_ptr, eps_hi, eps_mid, eps_lo, eps_e,
                        BLOCK: tl.constexpr):
    """v = s / max(|s|, eps) and sigma = |s|^2 / max(|s|, eps), s = the partials combined in
    chunk order; one program. s is recomputed in the second loop rather than stored, so no
    program reads what another lane wrote."""
    acc_ty = partials_ptr.dtype.element_ty
    eps = join_float(eps_hi, eps_mid, eps_lo, eps_e, acc_ty)
    acc = tl.zeros([BLOCK], acc_ty)
    for start in range(0, cols, BLOCK):
        j = start + tl.arange(0, BLOCK)
        s = _combined_cols(partials_ptr, j, j < cols, cols, n_row_chunks, acc_ty, BLOCK)
        acc += s * s
    ss = tl.sum(acc, 0)
    denom = _clamped_norm(ss, eps)
    for start in range(0, cols, BLOCK):
        j = start + tl.arange(0, BLOCK)
        s = _combined_cols(partials_ptr, j, j < cols, cols, n_row_chunks, acc_ty, BLOCK)
        tl.store(v_ptr + j, div_rn(s, denom).to(v_ptr.dtype.element_ty), mask=j < cols)
    tl.store(sigma_ptr, div_rn(ss, denom))


@triton.jit
def _dot_kernel(x_ptr, y_ptr, n, out_ptr, BLOCK: tl.constexpr):
    """out = x . y, one program (eval mode's sigma = u . W v)."""
    acc_ty = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], acc_ty)
    for start in range(0, n, BLOCK):
        k = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + k, mask=k < n, other=0).to(acc_ty) * tl.load(y_ptr + k, mask=k < n, other=0)
    tl.store(out_ptr, tl.sum(acc, 0))


@triton.jit
def _scale_kernel(w_ptr, numel, sigma_ptr, out_ptr, CHUNK: tl.constexpr):
    sigma = tl.load(sigma_ptr)
    inv = div_rn(tl.full([], 1.0, sigma.dtype), sigma)
    k = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    w = tl.load(w_ptr + k, mask=k < numel, other=0).to(inv.dtype)
    tl.store(out_ptr + k, (w * inv).to(out_ptr.dtype.element_ty), mask=k < numel)


@triton.jit
def _grad_dot_kernel(g_ptr, w_ptr, numel, partials_ptr, CHUNK: tl.constexpr):
    acc_ty = partials_ptr.dtype.element_ty
    k = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    g = tl.load(g_ptr + k, mask=k < numel, other=0).to(acc_ty)
    w = tl.load(w_ptr + k, mask=k < numel, other=0).to(acc_ty)
    tl.store(partials_ptr + tl.program_id(0), tl.sum(g * w, 0))


@triton.jit
def _grad_finish_kernel(partials_ptr, n_chunks, sigma_ptr, grad_sigma_ptr, coef_ptr,
                        HAS_GRAD_SIGMA: tl.constexpr, BLOCK: tl.constexpr):
    """coef = <G, W> / sigma^2 - grad_sigma, one program."""
    acc_ty = partials_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], acc_ty)
    for start in range(0, n_chunks, BLOCK):
        c = start + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + c, mask=c < n_chunks, other=0)
    sigma = tl.load(sigma_ptr)
    coef = div_rn(tl.sum(acc, 0), sigma * sigma)
    if HAS_GRAD_SIGMA:
        coef -= tl.load(grad_sigma_ptr)
    tl.store(coef_ptr, coef)


@triton.jit
def _grad_weight_kernel(g_ptr, u_ptr, v_ptr, rows, inner, numel, sigma_ptr, coef_ptr, out_ptr,
                        CHUNK: tl.constexpr):
    """dW = G / sigma - coef u v^T, element k at row (k / inner) % rows, column
    (k / (rows * inner)) * inner + k % inner."""
    sigma = tl.load(sigma_ptr)
    inv = div_rn(tl.full([], 1.0, sigma.dtype), sigma)
    coef = tl.load(coef_ptr)
    acc_ty = inv.dtype
    k = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = k < numel
    g = tl.load(g_ptr + k, mask=mask, other=0).to(acc_ty)
    u = tl.load(u_ptr + (k // inner) % rows, mask=mask, other=0).to(acc_ty)
    v = tl.load(v_ptr + (k // (rows * inner)) * inner + k % inner, mask=mask, other=0).to(acc_ty)
    tl.store(out_ptr + k, (g * inv - coef * u * v).to(out_ptr.dtype.element_ty), mask=mask)


def matrix_shape(weight: torch.Tensor, dim: int) -> tuple[int, int, int]:
    """(outer, rows, inner) of spectral_norm.h's MatrixShape."""
    outer = 1
    for size in weight.shape[:dim]:
        outer *= size
    inner = 1
    for size in weight.shape[dim + 1:]:
        inner *= size
    return outer, weight.shape[dim], inner


# CUDA's limit on grid axis 0 (axes 1 and 2 stop at 65535).
MAX_GRID_X = 2**31 - 1


def col_partial_grid(rows: int, cols: int) -> tuple[int, tuple[int]]:
    """(column blocks, the 1-D grid) of _col_partial_kernel: every (column block, row chunk)
    pair on axis 0."""
    n_col_blocks = triton.cdiv(cols, BLOCK)
    programs = n_col_blocks * triton.cdiv(rows, ROWS_PER_CHUNK)
    if programs > MAX_GRID_X:
        raise ValueError(f"spectral_norm (Triton): a {rows} x {cols} weight matrix needs {programs} column-partial "
                         f"programs, more than CUDA's grid limit {MAX_GRID_X}")
    return n_col_blocks, (programs,)


@on_device
def spectral_norm_forward_(weight, u, v, dim: int, n_power_iterations: int, eps: float):
    """(weight / sigma, sigma, u copy, v copy) after n_power_iterations in place on u, v
    (0: eval mode, sigma = u^T W v)."""
    w = weight.contiguous()
    outer, rows, inner = matrix_shape(w, dim)
    cols = outer * inner
    uc, vc = u.contiguous(), v.contiguous()
    acc = acc_dtype(w.dtype)
    sigma = torch.empty((), dtype=acc, device=w.device)
    t = torch.empty(rows, dtype=acc, device=w.device)
    if n_power_iterations == 0:
        _row_dot_kernel[(rows,)](w, vc, t, rows, inner, cols, BLOCK=BLOCK)
        _dot_kernel[(1,)](uc, t, rows, sigma, BLOCK=BLOCK)
    else:
        n_row_chunks = triton.cdiv(rows, ROWS_PER_CHUNK)
        partials = torch.empty(n_row_chunks * cols, dtype=acc, device=w.device)
        n_col_blocks, grid = col_partial_grid(rows, cols)
        eps_args = split_float(eps)
        for _ in range(n_power_iterations):
            _row_dot_kernel[(rows,)](w, vc, t, rows, inner, cols, BLOCK=BLOCK)
            _normalize_kernel[(1,)](t, rows, uc, *eps_args, BLOCK=BLOCK)
            _col_partial_kernel[grid](w, uc, partials, rows, inner, cols, n_col_blocks, ROWS_PER_CHUNK=ROWS_PER_CHUNK,
                                      BLOCK=BLOCK)
            _finish_cols_kernel[(1,)](partials, cols, n_row_chunks, vc, sigma, *eps_args, BLOCK=BLOCK)
    out = torch.empty_like(w)
    _scale_kernel[(triton.cdiv(w.numel(), CHUNK_SIZE),)](w, w.numel(), sigma, out, CHUNK=CHUNK_SIZE)
    if uc is not u:
        u.copy_(uc)
    if vc is not v:
        v.copy_(vc)
    return out, sigma, uc.clone(), vc.clone()


@on_device
def spectral_norm_backward(grad, grad_sigma, weight, u, v, sigma, dim: int):
    """dW = (G - <G, W / sigma> u v^T) / sigma + grad_sigma u v^T."""
    w, g = weight.contiguous(), grad.contiguous()
    _, rows, inner = matrix_shape(w, dim)
    numel = w.numel()
    n_chunks = triton.cdiv(numel, CHUNK_SIZE)
    partials = torch.empty(n_chunks + 1, dtype=sigma.dtype, device=w.device)
    coef = partials[n_chunks:]
    _grad_dot_kernel[(n_chunks,)](g, w, numel, partials, CHUNK=CHUNK_SIZE)
    has_grad_sigma = grad_sigma is not None
    _grad_finish_kernel[(1,)](partials, n_chunks, sigma, grad_sigma if has_grad_sigma else sigma, coef,
                              HAS_GRAD_SIGMA=has_grad_sigma, BLOCK=BLOCK)
    out = torch.empty_like(w)
    _grad_weight_kernel[(n_chunks,)](g, u.contiguous(), v.contiguous(), rows, inner, numel, sigma, coef, out,
                                     CHUNK=CHUNK_SIZE)
    return out
