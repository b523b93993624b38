"""Triton kernels of spectral normalization behind ganops.spectral_norm.

Parallel in structure to csrc/spectral_norm/spectral_norm_cuda.cu: the weight is read in
place as the matrix torch builds with weight.permute(dim, ...).flatten(1), matrix element
(i, j = a * inner + b) at offset (a * rows + i) * inner + b: slab a of the weight holds the
rows x inner block (a, :, :). A matrix-vector product is one of two passes over the weight:

- row dots: a program per row, t[i] = sum over (a, b) of w[a, i, b] x[a, b];
- column sums: a program per (tile of columns, chunk of rows) writes partials of
  sum_i w[a, i, b] x[i], which a combining pass adds in chunk order.

Tiles are BLOCK_A slabs x BLOCK_B columns of a slab (BLOCK_B the next power of two of inner,
up to BLOCK), so the offsets need no division. A weight with inner = 1 and several slabs (a
2-D weight read with dim = 1, as the hook API does) is the matrix stored transposed: its
W v runs as column sums and W^T u as row dots of the stored (outer, rows) matrix, so both
products read the weight in its own memory order, as for dim = 0.

Normalising a vector is two chunk-per-program passes: sums of squares per chunk (fused with
the combining of column partials), then every program adds those few sums in chunk order
(the same in each) and scales its chunk; sigma = |W^T u|^2 / max(|W^T u|, eps) comes from the
second. No atomics: every sum has a fixed order. The scale and the backward are
chunk-per-program passes reading sigma and the backward's coefficient from device memory.
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
def _tile_offsets(a, b, i, rows, inner):
    """Offsets of w[a, i, b] for a tile of slabs a (int64, a column) and columns b (a row)."""
    return (a[:, None] * rows + i) * inner + b[None, :]


@triton.jit
def _row_dot_kernel(w_ptr, x_ptr, t_ptr, outer, rows, inner, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """t[i] = row i . x, a program per row, slab by slab in memory order."""
    acc_ty = t_ptr.dtype.element_ty
    i = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_A, BLOCK_B], acc_ty)
    for a0 in range(0, outer, BLOCK_A):
        a = a0 + tl.arange(0, BLOCK_A).to(tl.int64)
        for b0 in range(0, inner, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            mask = (a[:, None] < outer) & (b[None, :] < inner)
            w = tl.load(w_ptr + _tile_offsets(a, b, i, rows, inner), mask=mask, other=0).to(acc_ty)
            x = tl.load(x_ptr + (a[:, None] * inner + b[None, :]), mask=mask, other=0).to(acc_ty)
            acc += w * x
    tl.store(t_ptr + i, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _clamped_norm(sum_sq, eps):
    """spectral_norm.h's clamped_norm: sqrt(sum_sq) clamped below at eps; a NaN norm stays NaN."""
    norm = sqrt_rn(sum_sq)
    return tl.where((norm > eps) | (norm != norm), norm, eps)


@triton.jit
def _col_partial_kernel(w_ptr, x_ptr, partials_ptr, outer, rows, inner, n_a_tiles, n_b_tiles,
                        ROWS_PER_CHUNK: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """Program p: column tile p % (n_a_tiles * n_b_tiles), row chunk p // (that): partials of
    sum_i w[a, i, b] x[i] over the chunk's rows, in row order (a 1-D grid: grid axis 1 would
    stop at 65535 row chunks, 4.2 M rows)."""
    acc_ty = partials_ptr.dtype.element_ty
    p = tl.program_id(0).to(tl.int64)
    n_tiles = tl.cast(n_a_tiles, tl.int64) * n_b_tiles
    tile = p % n_tiles
    r = p // n_tiles
    a = (tile // n_b_tiles) * BLOCK_A + tl.arange(0, BLOCK_A).to(tl.int64)
    b = (tile % n_b_tiles) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = (a[:, None] < outer) & (b[None, :] < inner)
    acc = tl.zeros([BLOCK_A, BLOCK_B], acc_ty)
    first = r * ROWS_PER_CHUNK
    for di in range(0, tl.minimum(ROWS_PER_CHUNK, rows - first)):
        i = first + di
        w = tl.load(w_ptr + _tile_offsets(a, b, i, rows, inner), mask=mask, other=0).to(acc_ty)
        acc += w * tl.load(x_ptr + i).to(acc_ty)
    cols = tl.cast(outer, tl.int64) * inner
    tl.store(partials_ptr + (r * cols + a[:, None] * inner + b[None, :]), acc, mask=mask)


@triton.jit
def _combine_sum_sq_kernel(partials_ptr, n_row_chunks, n, out_ptr, sum_sq_ptr, CHUNK: tl.constexpr,
                           BLOCK: tl.constexpr):
    """Program c, chunk c of the vector: out = the row-chunk partials added in chunk order
    (n_row_chunks = 1 with out = partials: the vector as it is), and sum_sq[c] = its chunk's
    sum of squares."""
    acc_ty = partials_ptr.dtype.element_ty
    c = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], acc_ty)
    for start in range(0, CHUNK, BLOCK):
        j = c * CHUNK + start + tl.arange(0, BLOCK)
        mask = j < n
        s = tl.zeros([BLOCK], acc_ty)
        for r in range(0, n_row_chunks):
            s += tl.load(partials_ptr + r * tl.cast(n, tl.int64) + j, mask=mask, other=0)
        tl.store(out_ptr + j, s, mask=mask)
        acc += s * s
    tl.store(sum_sq_ptr + c, tl.sum(acc, 0))


@triton.jit
def _normalize_kernel(x_ptr, n, sum_sq_ptr, n_chunks, out_ptr, sigma_ptr, eps_hi, eps_mid, eps_lo, eps_e,
                      WRITE_SIGMA: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """out = x / max(|x|, eps) over chunk c = this program; |x|^2 is the chunks' sums of
    squares added in chunk order, alike in every program. WRITE_SIGMA: program 0 also writes
    sigma = |x|^2 / max(|x|, eps)."""
    acc_ty = x_ptr.dtype.element_ty
    eps = join_float(eps_hi, eps_mid, eps_lo, eps_e, acc_ty)
    acc = tl.zeros([BLOCK], acc_ty)
    for start in range(0, n_chunks, BLOCK):
        q = start + tl.arange(0, BLOCK).to(tl.int64)
        acc += tl.load(sum_sq_ptr + q, mask=q < n_chunks, other=0)
    ss = tl.sum(acc, 0)
    denom = _clamped_norm(ss, eps)
    c = tl.program_id(0).to(tl.int64)
    for start in range(0, CHUNK, BLOCK):
        j = c * CHUNK + start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + j, mask=j < n, other=0)
        tl.store(out_ptr + j, div_rn(x, denom).to(out_ptr.dtype.element_ty), mask=j < n)
    if WRITE_SIGMA:
        if tl.program_id(0) == 0:
            tl.store(sigma_ptr, div_rn(ss, denom))


@triton.jit
def _dot_kernel(x_ptr, y_ptr, n, out_ptr, BLOCK: tl.constexpr):
    """out = x . y, one program (eval mode's sigma = u . W v)."""
    acc_ty = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], acc_ty)
    for start in range(0, n, BLOCK):
        k = start + tl.arange(0, BLOCK).to(tl.int64)
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
    c = tl.program_id(0).to(tl.int64)
    k = c * CHUNK + tl.arange(0, CHUNK)
    g = tl.load(g_ptr + k, mask=k < numel, other=0).to(acc_ty)
    w = tl.load(w_ptr + k, mask=k < numel, other=0).to(acc_ty)
    tl.store(partials_ptr + c, tl.sum(g * w, 0))


@triton.jit
def _grad_finish_kernel(partials_ptr, n_chunks, sigma_ptr, grad_sigma_ptr, coef_ptr,
                        HAS_GRAD_SIGMA: tl.constexpr, BLOCK: tl.constexpr):
    """coef = <G, W> / sigma^2 - grad_sigma, one program."""
    acc_ty = partials_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], acc_ty)
    for start in range(0, n_chunks, BLOCK):
        c = start + tl.arange(0, BLOCK).to(tl.int64)
        acc += tl.load(partials_ptr + c, mask=c < n_chunks, other=0)
    sigma = tl.load(sigma_ptr)
    coef = div_rn(tl.sum(acc, 0), sigma * sigma)
    if HAS_GRAD_SIGMA:
        coef -= tl.load(grad_sigma_ptr)
    tl.store(coef_ptr, coef)


@triton.jit
def _grad_weight_kernel(g_ptr, u_ptr, v_ptr, outer, rows, inner, n_i_tiles, n_b_tiles, sigma_ptr, coef_ptr, out_ptr,
                        BLOCK_A: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_B: tl.constexpr):
    """dW = G / sigma - coef u v^T over a (slabs a, rows i, columns b) tile of the weight,
    element w[a, i, b] at row i and column a * inner + b: the program's index is split once,
    no element needs a division."""
    sigma = tl.load(sigma_ptr)
    inv = div_rn(tl.full([], 1.0, sigma.dtype), sigma)
    coef = tl.load(coef_ptr)
    acc_ty = inv.dtype
    p = tl.program_id(0).to(tl.int64)
    b_tile = p % n_b_tiles
    q = p // n_b_tiles
    a = ((q // n_i_tiles) * BLOCK_A + tl.arange(0, BLOCK_A).to(tl.int64))[:, None, None]
    i = ((q % n_i_tiles) * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64))[None, :, None]
    b = (b_tile * BLOCK_B + tl.arange(0, BLOCK_B))[None, None, :]
    mask = (a < outer) & (i < rows) & (b < inner)
    k = (a * rows + i) * inner + b
    g = tl.load(g_ptr + k, mask=mask, other=0).to(acc_ty)
    u = tl.load(u_ptr + i, mask=i < rows, other=0).to(acc_ty)
    v = tl.load(v_ptr + (a * inner + b), mask=(a < outer) & (b < inner), other=0).to(acc_ty)
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


def stored_transposed(outer: int, inner: int) -> bool:
    """Whether the matrix is stored transposed (inner = 1, several slabs): its rows are then
    the weight's columns, and the two products swap passes."""
    return inner == 1 and outer > 1


# CUDA's limit on grid axis 0 (axes 1 and 2 stop at 65535).
MAX_GRID_X = 2**31 - 1


def _check_grid(programs: int, what: str, shape) -> tuple[int]:
    if programs > MAX_GRID_X:
        raise ValueError(f"spectral_norm (Triton): a weight of (outer, rows, inner) {shape} needs {programs} {what} "
                         f"programs, more than CUDA's grid limit {MAX_GRID_X}")
    return (programs,)


def slab_tile(inner: int, size: int = BLOCK) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_B): a tile of `size` lanes, BLOCK_B columns of a slab (the next power
    of two of inner, at most `size`) by BLOCK_A slabs."""
    block_b = min(size, triton.next_power_of_2(inner))
    return size // block_b, block_b


def col_partial_grid(shape: tuple[int, int, int]) -> tuple[int, int, tuple[int]]:
    """(slab tiles, column tiles, the 1-D grid) of _col_partial_kernel: every (column tile,
    row chunk) pair on axis 0."""
    outer, rows, inner = shape
    block_a, block_b = slab_tile(inner)
    n_a_tiles, n_b_tiles = triton.cdiv(outer, block_a), triton.cdiv(inner, block_b)
    programs = n_a_tiles * n_b_tiles * triton.cdiv(rows, ROWS_PER_CHUNK)
    return n_a_tiles, n_b_tiles, _check_grid(programs, "column-partial", shape)


def _row_dots(w, shape, x, out, sum_sq):
    """out = W x for W of (outer, rows, inner) `shape` (a program per row), and its chunks'
    sums of squares."""
    outer, rows, inner = shape
    block_a, block_b = slab_tile(inner)
    _row_dot_kernel[(rows,)](w, x, out, outer, rows, inner, BLOCK_A=block_a, BLOCK_B=block_b)
    _combine_sum_sq_kernel[(triton.cdiv(rows, CHUNK_SIZE),)](out, 1, rows, out, sum_sq, CHUNK=CHUNK_SIZE, BLOCK=BLOCK)


def _col_sums(w, shape, x, out, sum_sq):
    """out = W^T x for W of (outer, rows, inner) `shape`, and its chunks' sums of squares."""
    outer, rows, inner = shape
    cols = outer * inner
    n_a_tiles, n_b_tiles, grid = col_partial_grid(shape)
    block_a, block_b = slab_tile(inner)
    partials = torch.empty(triton.cdiv(rows, ROWS_PER_CHUNK) * cols, dtype=out.dtype, device=out.device)
    _col_partial_kernel[grid](w, x, partials, outer, rows, inner, n_a_tiles, n_b_tiles, ROWS_PER_CHUNK=ROWS_PER_CHUNK,
                              BLOCK_A=block_a, BLOCK_B=block_b)
    _combine_sum_sq_kernel[(triton.cdiv(cols, CHUNK_SIZE),)](partials, triton.cdiv(rows, ROWS_PER_CHUNK), cols, out,
                                                            sum_sq, CHUNK=CHUNK_SIZE, BLOCK=BLOCK)


def _normalize(x, sum_sq, out, eps_args, sigma=None):
    """out = x / max(|x|, eps) (and sigma = |x|^2 / max(|x|, eps)), chunk sums in sum_sq."""
    n_chunks = triton.cdiv(x.numel(), CHUNK_SIZE)
    _normalize_kernel[(n_chunks,)](x, x.numel(), sum_sq, n_chunks, out, sigma if sigma is not None else x,
                                   *eps_args, WRITE_SIGMA=sigma is not None, CHUNK=CHUNK_SIZE, BLOCK=BLOCK)


class _Products:
    """W x and W^T x of the weight as stored: W's own passes, or, stored transposed, the
    stored matrix's passes swapped."""

    def __init__(self, w, dim):
        self.w = w
        outer, rows, inner = self.shape = matrix_shape(w, dim)
        self.transposed = stored_transposed(outer, inner)
        self.stored = (1, outer, rows) if self.transposed else self.shape

    def mat_vec(self, x, out, sum_sq):
        """out = W x with its chunks' sums of squares."""
        if self.transposed:
            _col_sums(self.w, self.stored, x, out, sum_sq)
        else:
            _row_dots(self.w, self.shape, x, out, sum_sq)

    def mat_t_vec(self, x, out, sum_sq):
        """out = W^T x with its chunks' sums of squares."""
        if self.transposed:
            _row_dots(self.w, self.stored, x, out, sum_sq)
        else:
            _col_sums(self.w, self.shape, x, out, sum_sq)


@on_device
def spectral_norm_forward_(weight, u, v, dim: int, n_power_iterations: int, eps: float):
    """(weight / sigma, sigma, u copy, v copy) after n_power_iterations in place on u, v
    (0: eval mode, sigma = u^T W v)."""
    w = weight.contiguous()
    products = _Products(w, dim)
    rows, cols = u.numel(), v.numel()
    uc, vc = u.contiguous(), v.contiguous()
    acc = acc_dtype(w.dtype)
    sigma = torch.empty((), dtype=acc, device=w.device)
    t = torch.empty(rows, dtype=acc, device=w.device)
    t_sum_sq = torch.empty(triton.cdiv(rows, CHUNK_SIZE), dtype=acc, device=w.device)
    if n_power_iterations == 0:
        products.mat_vec(vc, t, t_sum_sq)
        _dot_kernel[(1,)](uc, t, rows, sigma, BLOCK=BLOCK)
    else:
        c = torch.empty(cols, dtype=acc, device=w.device)
        c_sum_sq = torch.empty(triton.cdiv(cols, CHUNK_SIZE), dtype=acc, device=w.device)
        eps_args = split_float(eps)
        for _ in range(n_power_iterations):
            products.mat_vec(vc, t, t_sum_sq)
            _normalize(t, t_sum_sq, uc, eps_args)
            products.mat_t_vec(uc, c, c_sum_sq)
            _normalize(c, c_sum_sq, vc, eps_args, sigma)
    out = torch.empty_like(w)
    _scale_kernel[(triton.cdiv(w.numel(), CHUNK_SIZE),)](w, w.numel(), sigma, out, CHUNK=CHUNK_SIZE)
    if uc is not u:
        u.copy_(uc)
    if vc is not v:
        v.copy_(vc)
    return out, sigma, uc.clone(), vc.clone()


def grad_weight_grid(shape: tuple[int, int, int]) -> tuple[tuple[int, int, int], int, int, tuple[int]]:
    """((BLOCK_A, BLOCK_I, BLOCK_B), row tiles, column tiles, the 1-D grid) of
    _grad_weight_kernel: tiles of CHUNK_SIZE elements, as many columns of a slab as fit, then
    rows, then slabs."""
    outer, rows, inner = shape
    block_b = min(CHUNK_SIZE, triton.next_power_of_2(inner))
    block_i = min(CHUNK_SIZE // block_b, triton.next_power_of_2(rows))
    block_a = CHUNK_SIZE // (block_b * block_i)
    n_i_tiles, n_b_tiles = triton.cdiv(rows, block_i), triton.cdiv(inner, block_b)
    programs = triton.cdiv(outer, block_a) * n_i_tiles * n_b_tiles
    return (block_a, block_i, block_b), n_i_tiles, n_b_tiles, _check_grid(programs, "gradient", shape)


@on_device
def spectral_norm_backward(grad, grad_sigma, weight, u, v, sigma, dim: int):
    """dW = (G - <G, W / sigma> u v^T) / sigma + grad_sigma u v^T."""
    w, g = weight.contiguous(), grad.contiguous()
    shape = matrix_shape(w, dim)
    numel = w.numel()
    n_chunks = triton.cdiv(numel, CHUNK_SIZE)
    partials = torch.empty(n_chunks + 1, dtype=sigma.dtype, device=w.device)
    coef = partials[n_chunks:]
    _grad_dot_kernel[(n_chunks,)](g, w, numel, partials, CHUNK=CHUNK_SIZE)
    has_grad_sigma = grad_sigma is not None
    _grad_finish_kernel[(1,)](partials, n_chunks, sigma, grad_sigma if has_grad_sigma else sigma, coef,
                              HAS_GRAD_SIGMA=has_grad_sigma, BLOCK=BLOCK)
    out = torch.empty_like(w)
    (block_a, block_i, block_b), n_i_tiles, n_b_tiles, grid = grad_weight_grid(shape)
    _grad_weight_kernel[grid](g, u.contiguous(), v.contiguous(), *shape, n_i_tiles, n_b_tiles, sigma, coef, out,
                              BLOCK_A=block_a, BLOCK_I=block_i, BLOCK_B=block_b)
    return out
