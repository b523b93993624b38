"""Triton kernels of scaled-dot-product attention (ganops.scaled_dot_product_attention), to
second order.

q (B, L, E), k (B, S, E), v (B, S, Ev); S = scale · Q Kᵀ (key j masked for query i where
j > i when is_causal), P = softmax_rows(S) = exp(S − lse), O = P V. The passes of
csrc/scaled_dot_product_attention/scaled_dot_product_attention_cuda.cu, each either row-side (a
program per (b, query block), looping over key blocks; CUDA: a block per query row) or
column-side (a program per (b, key block), looping over query blocks; CUDA: a block per key
row), so each output element is written by one program and no atomics are needed
(deterministic). b is the grid's first axis, whose limit is 2^31 − 1 (the second's is 65535).
Unlike CUDA's, the forward is one pass (an online softmax, where CUDA computes lse first). No
tile larger than BLOCK_M × BLOCK_N is ever formed; the tiles of P are recomputed from the saved
logsumexp.

- forward: row-side, online softmax; stores O and lse.
- backward: the row statistic D_i = Σ_c dO_ic O_ic, then dK, dV column-side and dQ row-side:
      dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − D), dQ = scale · dS K, dK = scale · dSᵀ Q.
- double backward, given the cotangents gQ, gK, gV of dQ, dK, dV (None: zero):
      H = scale · (gQ Kᵀ + Q gKᵀ), gD_i = −Σ_j P_ij H_ij, g_dP = P ∘ (H + gD),
      g_P = dO gVᵀ + H ∘ (dP − D) + gD ∘ dP, g_S = P ∘ (g_P − R), R_i = Σ_j P_ij g_P_ij,
  a row-stats pass (D, gD and R, the last as Σ_j P (dO gVᵀ + H ∘ (dP − D)) + gD · D), then
      grad of dO = P gV + g_dP V and grad of Q = scale · (dS gK + g_S K) row-side,
      grad of K = scale · (dSᵀ gQ + g_Sᵀ Q) and grad of V = g_dPᵀ dO column-side.

Tiles are accumulated in the accumulation dtype (float32 for half types); E and Ev are padded
to powers of two (at least 16, tl.dot's minimum) with masked loads. Offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ganops._backend import triton_interpret

from ._common import acc_dtype as _acc_torch
from ._common import acc_tl as _acc
from ._common import div_rn, join_float, on_device, split_float

# Query rows and keys per tile. The double backward holds about twice the tiles of the others
# at once, so it takes smaller ones. float64 multiplies tiles without tl.dot (see _mm), whose
# BLOCK_M × BLOCK_N × E product wants small tiles.
BLOCK_M, BLOCK_N = 64, 64
DOUBLE_BACKWARD_BLOCK_M, DOUBLE_BACKWARD_BLOCK_N = 32, 32
FLOAT64_BLOCK = 16


def _blocks(dtype: torch.dtype, double_backward: bool = False) -> tuple[int, int]:
    if dtype == torch.float64:
        return FLOAT64_BLOCK, FLOAT64_BLOCK
    return (DOUBLE_BACKWARD_BLOCK_M, DOUBLE_BACKWARD_BLOCK_N) if double_backward else (BLOCK_M, BLOCK_N)


def _padded(n: int) -> int:
    """A head dimension padded to a power of two, at least tl.dot's 16."""
    return max(16, triton.next_power_of_2(n))


# ---------------------------------------------------------------------------------------
# Tile helpers
# ---------------------------------------------------------------------------------------

@triton.jit
def _mm(a, b, HALF_DOT: tl.constexpr):
    """a @ b in the accumulation dtype, for a tile loaded in the inputs' dtype and a tile that
    is loaded too or computed in the accumulation dtype. float64 multiplies and sums (which
    every backend compiles); float32 takes IEEE products (not TF32), as the C++ kernels do;
    half inputs with HALF_DOT take the tensor cores with float32 accumulation, the computed
    tile rounded to the inputs' dtype first, as flash attention does (the math backend in that
    dtype rounds every intermediate). Without HALF_DOT (bfloat16 on the interpreter, whose
    tl.dot reads bfloat16 wrongly) half tiles are multiplied in float32."""
    if a.dtype == tl.float64 or b.dtype == tl.float64:
        return tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    elif (a.dtype == tl.float32 and b.dtype == tl.float32) or not HALF_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a.to(b.dtype), b, out_dtype=tl.float32)
    else:
        return tl.dot(a, b.to(a.dtype), out_dtype=tl.float32)


@triton.jit
def _load_tile(ptr, base, rows, n_rows, WIDTH, WIDTH_P: tl.constexpr):
    """Rows `rows` (< n_rows) of a contiguous (n_rows, WIDTH) matrix at ptr + base (int64), its
    columns padded to WIDTH_P with zeros, in the tensor's dtype."""
    cols = tl.arange(0, WIDTH_P)
    offsets = base + rows[:, None].to(tl.int64) * WIDTH + cols[None, :]
    mask = (rows[:, None] < n_rows) & (cols[None, :] < WIDTH)
    return tl.load(ptr + offsets, mask=mask, other=0)


@triton.jit
def _store_tile(ptr, base, rows, n_rows, WIDTH, WIDTH_P: tl.constexpr, value):
    cols = tl.arange(0, WIDTH_P)
    offsets = base + rows[:, None].to(tl.int64) * WIDTH + cols[None, :]
    mask = (rows[:, None] < n_rows) & (cols[None, :] < WIDTH)
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _valid(rows, cols, L, S, IS_CAUSAL: tl.constexpr):
    """The (row, key) pairs of a tile that exist and are not masked."""
    valid = (rows[:, None] < L) & (cols[None, :] < S)
    if IS_CAUSAL:
        valid = valid & (cols[None, :] <= rows[:, None])
    return valid


@triton.jit
def _probabilities(q, k, lse, rows, cols, L, S, scale, IS_CAUSAL: tl.constexpr, HALF_DOT: tl.constexpr):
    """The tile of P = exp(scale · q kᵀ − lse), zero where masked (lse is the saved one, so
    exp's argument is ≤ 0 up to rounding)."""
    s = _mm(q, tl.trans(k), HALF_DOT) * scale
    return tl.where(_valid(rows, cols, L, S, IS_CAUSAL), tl.exp(s - lse[:, None]), 0)


@triton.jit
def _key_end(start_m, S, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """One past the last key a query block starting at start_m sees."""
    if IS_CAUSAL:
        return tl.minimum(S, start_m + BLOCK_M)
    else:
        return S


@triton.jit
def _query_start(start_n, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """The first query block (its first row) that sees a key block starting at start_n."""
    if IS_CAUSAL:
        return (start_n // BLOCK_M) * BLOCK_M
    else:
        return 0


@triton.jit
def _row_dot(a_ptr, b_ptr, base, rows, L, WIDTH, WIDTH_P: tl.constexpr, ACC: tl.constexpr):
    """Σ_c a_ic b_ic for rows `rows` of two contiguous (L, WIDTH) matrices."""
    a = _load_tile(a_ptr, base, rows, L, WIDTH, WIDTH_P).to(ACC)
    b = _load_tile(b_ptr, base, rows, L, WIDTH, WIDTH_P).to(ACC)
    return tl.sum(a * b, axis=1)


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------

@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, L, S, E, EV, s_hi, s_mid, s_lo, s_e,
                    IS_CAUSAL: tl.constexpr, ACC: tl.constexpr, HALF_DOT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, E_P: tl.constexpr, EV_P: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    scale = join_float(s_hi, s_mid, s_lo, s_e, ACC)
    q = _load_tile(q_ptr, b * L * E, rows, L, E, E_P)
    row_max = tl.full([BLOCK_M], float("-inf"), ACC)
    row_sum = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, EV_P], ACC)
    for start_n in range(0, _key_end(start_m, S, BLOCK_M, IS_CAUSAL), BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr, b * S * E, cols, S, E, E_P)
        v = _load_tile(v_ptr, b * S * EV, cols, S, EV, EV_P)
        s = tl.where(_valid(rows, cols, L, S, IS_CAUSAL), _mm(q, tl.trans(k), HALF_DOT) * scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        # A row with every key so far masked keeps max −inf; shifting by 0 instead keeps
        # exp(−inf − (−inf)) = NaN out of it.
        shift = tl.where(new_max == float("-inf"), 0, new_max)
        p = tl.exp(s - shift[:, None])
        rescale = tl.exp(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + _mm(p, v, HALF_DOT)
        row_max = new_max
    # The math backend's values where a row's sum is 0: out = 0 (acc = 0) for S = 0, an empty
    # sum; NaN (0 / 0) for keys whose scores are all −inf, as its softmax gives. lse is
    # torch.logsumexp's: −inf for a zero sum, +inf where a score is +inf, NaN passed on.
    empty = (rows >= L) | (S == 0)
    _store_tile(out_ptr, b * L * EV, rows, L, EV, EV_P, div_rn(acc, tl.where(empty, 1, row_sum)[:, None]))
    log_sum = tl.log(tl.where(row_sum == 0, 1, row_sum))
    lse = tl.where(row_max == float("inf"), row_max, tl.where(row_sum == 0, float("-inf"), row_max + log_sum))
    tl.store(lse_ptr + b * L + rows, lse, mask=rows < L)


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------

@triton.jit
def _row_delta_kernel(grad_out_ptr, out_ptr, delta_ptr, L, EV, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                      EV_P: tl.constexpr):
    """D_i = Σ_c dO_ic O_ic."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    delta = _row_dot(grad_out_ptr, out_ptr, b * L * EV, rows, L, EV, EV_P, ACC)
    tl.store(delta_ptr + b * L + rows, delta, mask=rows < L)


@triton.jit
def _backward_key_kernel(grad_out_ptr, q_ptr, k_ptr, v_ptr, lse_ptr, delta_ptr, grad_k_ptr, grad_v_ptr, L, S, E,
                         EV, s_hi, s_mid, s_lo, s_e, IS_CAUSAL: tl.constexpr, ACC: tl.constexpr, HALF_DOT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, E_P: tl.constexpr, EV_P: tl.constexpr):
    """dK and dV of a key block, over the query blocks that see it."""
    b = tl.program_id(0).to(tl.int64)
    start_n = tl.program_id(1) * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    scale = join_float(s_hi, s_mid, s_lo, s_e, ACC)
    k = _load_tile(k_ptr, b * S * E, cols, S, E, E_P)
    v = _load_tile(v_ptr, b * S * EV, cols, S, EV, EV_P)
    grad_k = tl.zeros([BLOCK_N, E_P], ACC)
    grad_v = tl.zeros([BLOCK_N, EV_P], ACC)
    for start_m in range(_query_start(start_n, BLOCK_M, IS_CAUSAL), L, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_ptr, b * L * E, rows, L, E, E_P)
        grad_out = _load_tile(grad_out_ptr, b * L * EV, rows, L, EV, EV_P)
        lse = tl.load(lse_ptr + b * L + rows, mask=rows < L, other=0)
        delta = tl.load(delta_ptr + b * L + rows, mask=rows < L, other=0)
        p = _probabilities(q, k, lse, rows, cols, L, S, scale, IS_CAUSAL, HALF_DOT)
        grad_v += _mm(tl.trans(p), grad_out, HALF_DOT)
        grad_s = p * (_mm(grad_out, tl.trans(v), HALF_DOT) - delta[:, None])
        grad_k += _mm(tl.trans(grad_s), q, HALF_DOT)
    _store_tile(grad_k_ptr, b * S * E, cols, S, E, E_P, grad_k * scale)
    _store_tile(grad_v_ptr, b * S * EV, cols, S, EV, EV_P, grad_v)


@triton.jit
def _backward_query_kernel(grad_out_ptr, q_ptr, k_ptr, v_ptr, lse_ptr, delta_ptr, grad_q_ptr, L, S, E, EV, s_hi,
                           s_mid, s_lo, s_e, IS_CAUSAL: tl.constexpr, ACC: tl.constexpr, HALF_DOT: tl.constexpr,
                           BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, E_P: tl.constexpr, EV_P: tl.constexpr):
    """dQ of a query block, over the key blocks it sees."""
    b = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    scale = join_float(s_hi, s_mid, s_lo, s_e, ACC)
    q = _load_tile(q_ptr, b * L * E, rows, L, E, E_P)
    grad_out = _load_tile(grad_out_ptr, b * L * EV, rows, L, EV, EV_P)
    lse = tl.load(lse_ptr + b * L + rows, mask=rows < L, other=0)
    delta = tl.load(delta_ptr + b * L + rows, mask=rows < L, other=0)
    grad_q = tl.zeros([BLOCK_M, E_P], ACC)
    for start_n in range(0, _key_end(start_m, S, BLOCK_M, IS_CAUSAL), BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr, b * S * E, cols, S, E, E_P)
        v = _load_tile(v_ptr, b * S * EV, cols, S, EV, EV_P)
        p = _probabilities(q, k, lse, rows, cols, L, S, scale, IS_CAUSAL, HALF_DOT)
        grad_s = p * (_mm(grad_out, tl.trans(v), HALF_DOT) - delta[:, None])
        grad_q += _mm(grad_s, k, HALF_DOT)
    _store_tile(grad_q_ptr, b * L * E, rows, L, E, E_P, grad_q * scale)


# ---------------------------------------------------------------------------------------
# Double backward
# ---------------------------------------------------------------------------------------

@triton.jit
def _load_optional(ptr, base, rows, n_rows, WIDTH, WIDTH_P: tl.constexpr, PRESENT: tl.constexpr):
    """_load_tile, or zeros for an absent (None) cotangent."""
    if PRESENT:
        return _load_tile(ptr, base, rows, n_rows, WIDTH, WIDTH_P)
    else:
        return tl.zeros([rows.shape[0], WIDTH_P], ptr.dtype.element_ty)


@triton.jit
def _second_order_tiles(q, gq, grad_out, lse, delta, k, gk, v, gv, rows, cols, L, S, scale,
                        IS_CAUSAL: tl.constexpr, HAS_GQ: tl.constexpr, HAS_GK: tl.constexpr, HAS_GV: tl.constexpr,
                        HALF_DOT: tl.constexpr):
    """The tiles of one (query block, key block) every double-backward pass needs: P, dP, H and
    the part of g_P that does not involve gD, dO gVᵀ + H ∘ (dP − D). Absent cotangents add nothing."""
    p = _probabilities(q, k, lse, rows, cols, L, S, scale, IS_CAUSAL, HALF_DOT)
    grad_p = _mm(grad_out, tl.trans(v), HALF_DOT)
    h = tl.zeros(p.shape, p.dtype)
    if HAS_GQ:
        h += _mm(gq, tl.trans(k), HALF_DOT)
    if HAS_GK:
        h += _mm(q, tl.trans(gk), HALF_DOT)
    h = h * scale
    partial = h * (grad_p - delta[:, None])
    if HAS_GV:
        partial += _mm(grad_out, tl.trans(gv), HALF_DOT)
    return p, grad_p, h, partial


@triton.jit
def _row_stats_kernel(grad_out_ptr, q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, gq_ptr, gk_ptr, gv_ptr, stats_ptr, L, S,
                      E, EV, s_hi, s_mid, s_lo, s_e, IS_CAUSAL: tl.constexpr, HAS_GQ: tl.constexpr,
                      HAS_GK: tl.constexpr, HAS_GV: tl.constexpr, ACC: tl.constexpr, HALF_DOT: tl.constexpr,
                      BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, E_P: tl.constexpr, EV_P: tl.constexpr):
    """(D, gD, R) of each query row, at stats[0 | 1 | 2, b, i]: D_i = Σ_c dO_ic O_ic,
    gD_i = −Σ_j P_ij H_ij, R_i = Σ_j P_ij (dO gVᵀ + H ∘ (dP − D))_ij + gD_i · D_i."""
    b = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    scale = join_float(s_hi, s_mid, s_lo, s_e, ACC)
    q = _load_tile(q_ptr, b * L * E, rows, L, E, E_P)
    gq = _load_optional(gq_ptr, b * L * E, rows, L, E, E_P, HAS_GQ)
    grad_out = _load_tile(grad_out_ptr, b * L * EV, rows, L, EV, EV_P)
    lse = tl.load(lse_ptr + b * L + rows, mask=rows < L, other=0)
    delta = _row_dot(grad_out_ptr, out_ptr, b * L * EV, rows, L, EV, EV_P, ACC)
    grad_delta = tl.zeros([BLOCK_M], ACC)
    partial_sum = tl.zeros([BLOCK_M], ACC)
    for start_n in range(0, _key_end(start_m, S, BLOCK_M, IS_CAUSAL), BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr, b * S * E, cols, S, E, E_P)
        v = _load_tile(v_ptr, b * S * EV, cols, S, EV, EV_P)
        gk = _load_optional(gk_ptr, b * S * E, cols, S, E, E_P, HAS_GK)
        gv = _load_optional(gv_ptr, b * S * EV, cols, S, EV, EV_P, HAS_GV)
        p, grad_p, h, partial = _second_order_tiles(q, gq, grad_out, lse, delta, k, gk, v, gv, rows, cols, L, S,
                                                    scale, IS_CAUSAL, HAS_GQ, HAS_GK, HAS_GV, HALF_DOT)
        grad_delta -= tl.sum(p * h, axis=1)
        partial_sum += tl.sum(p * partial, axis=1)
    mask = rows < L
    tl.store(stats_ptr + b * L + rows, delta, mask=mask)
    tl.store(stats_ptr + (tl.num_programs(0) + b) * L + rows, grad_delta, mask=mask)
    tl.store(stats_ptr + (2 * tl.num_programs(0) + b) * L + rows, partial_sum + grad_delta * delta, mask=mask)


@triton.jit
def _load_row_stats(stats_ptr, b, rows, L):
    """(D, gD, R) of rows `rows`, as _row_stats_kernel stored them."""
    mask = rows < L
    B = tl.num_programs(0)
    delta = tl.load(stats_ptr + b * L + rows, mask=mask, other=0)
    grad_delta = tl.load(stats_ptr + (B + b) * L + rows, mask=mask, other=0)
    r = tl.load(stats_ptr + (2 * B + b) * L + rows, mask=mask, other=0)
    return delta, grad_delta, r


@triton.jit
def _second_order_grads(p, grad_p, h, partial, delta, grad_delta, r):
    """(dS, g_dP, g_S) of a tile: dS = P ∘ (dP − D), g_dP = P ∘ (H + gD),
    g_S = P ∘ (dO gVᵀ + H ∘ (dP − D) + gD ∘ dP − R)."""
    grad_s = p * (grad_p - delta[:, None])
    grad_grad_p = p * (h + grad_delta[:, None])
    grad_grad_s = p * (partial + grad_delta[:, None] * grad_p - r[:, None])
    return grad_s, grad_grad_p, grad_grad_s


@triton.jit
def _double_backward_query_kernel(grad_out_ptr, q_ptr, k_ptr, v_ptr, lse_ptr, gq_ptr, gk_ptr, gv_ptr, stats_ptr,
                                  grad_grad_out_ptr, grad_q_ptr, L, S, E, EV, s_hi, s_mid, s_lo, s_e,
                                  IS_CAUSAL: tl.constexpr, HAS_GQ: tl.constexpr, HAS_GK: tl.constexpr,
                                  HAS_GV: tl.constexpr, ACC: tl.constexpr, HALF_DOT: tl.constexpr,
                                  BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, E_P: tl.constexpr, EV_P: tl.constexpr):
    """Grad of dO = P gV + g_dP V and grad of Q = scale · (dS gK + g_S K), a query block's rows."""
    b = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    scale = join_float(s_hi, s_mid, s_lo, s_e, ACC)
    q = _load_tile(q_ptr, b * L * E, rows, L, E, E_P)
    gq = _load_optional(gq_ptr, b * L * E, rows, L, E, E_P, HAS_GQ)
    grad_out = _load_tile(grad_out_ptr, b * L * EV, rows, L, EV, EV_P)
    lse = tl.load(lse_ptr + b * L + rows, mask=rows < L, other=0)
    delta, grad_delta, r = _load_row_stats(stats_ptr, b, rows, L)
    grad_grad_out = tl.zeros([BLOCK_M, EV_P], ACC)
    grad_q = tl.zeros([BLOCK_M, E_P], ACC)
    for start_n in range(0, _key_end(start_m, S, BLOCK_M, IS_CAUSAL), BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr, b * S * E, cols, S, E, E_P)
        v = _load_tile(v_ptr, b * S * EV, cols, S, EV, EV_P)
        gk = _load_optional(gk_ptr, b * S * E, cols, S, E, E_P, HAS_GK)
        gv = _load_optional(gv_ptr, b * S * EV, cols, S, EV, EV_P, HAS_GV)
        p, grad_p, h, partial = _second_order_tiles(q, gq, grad_out, lse, delta, k, gk, v, gv, rows, cols, L, S,
                                                    scale, IS_CAUSAL, HAS_GQ, HAS_GK, HAS_GV, HALF_DOT)
        grad_s, grad_grad_p, grad_grad_s = _second_order_grads(p, grad_p, h, partial, delta, grad_delta, r)
        grad_grad_out += _mm(grad_grad_p, v, HALF_DOT)
        if HAS_GV:
            grad_grad_out += _mm(p, gv, HALF_DOT)
        grad_q += _mm(grad_grad_s, k, HALF_DOT)
        if HAS_GK:
            grad_q += _mm(grad_s, gk, HALF_DOT)
    _store_tile(grad_grad_out_ptr, b * L * EV, rows, L, EV, EV_P, grad_grad_out)
    _store_tile(grad_q_ptr, b * L * E, rows, L, E, E_P, grad_q * scale)


@triton.jit
def _double_backward_key_kernel(grad_out_ptr, q_ptr, k_ptr, v_ptr, lse_ptr, gq_ptr, gk_ptr, gv_ptr, stats_ptr,
                                grad_k_ptr, grad_v_ptr, L, S, E, EV, s_hi, s_mid, s_lo, s_e,
                                IS_CAUSAL: tl.constexpr, HAS_GQ: tl.constexpr, HAS_GK: tl.constexpr,
                                HAS_GV: tl.constexpr, ACC: tl.constexpr, HALF_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, E_P: tl.constexpr, EV_P: tl.constexpr):
    """Grad of K = scale · (dSᵀ gQ + g_Sᵀ Q) and grad of V = g_dPᵀ dO, a key block's rows."""
    b = tl.program_id(0).to(tl.int64)
    start_n = tl.program_id(1) * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    scale = join_float(s_hi, s_mid, s_lo, s_e, ACC)
    k = _load_tile(k_ptr, b * S * E, cols, S, E, E_P)
    v = _load_tile(v_ptr, b * S * EV, cols, S, EV, EV_P)
    gk = _load_optional(gk_ptr, b * S * E, cols, S, E, E_P, HAS_GK)
    gv = _load_optional(gv_ptr, b * S * EV, cols, S, EV, EV_P, HAS_GV)
    grad_k = tl.zeros([BLOCK_N, E_P], ACC)
    grad_v = tl.zeros([BLOCK_N, EV_P], ACC)
    for start_m in range(_query_start(start_n, BLOCK_M, IS_CAUSAL), L, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_ptr, b * L * E, rows, L, E, E_P)
        gq = _load_optional(gq_ptr, b * L * E, rows, L, E, E_P, HAS_GQ)
        grad_out = _load_tile(grad_out_ptr, b * L * EV, rows, L, EV, EV_P)
        lse = tl.load(lse_ptr + b * L + rows, mask=rows < L, other=0)
        delta, grad_delta, r = _load_row_stats(stats_ptr, b, rows, L)
        p, grad_p, h, partial = _second_order_tiles(q, gq, grad_out, lse, delta, k, gk, v, gv, rows, cols, L, S,
                                                    scale, IS_CAUSAL, HAS_GQ, HAS_GK, HAS_GV, HALF_DOT)
        grad_s, grad_grad_p, grad_grad_s = _second_order_grads(p, grad_p, h, partial, delta, grad_delta, r)
        grad_v += _mm(tl.trans(grad_grad_p), grad_out, HALF_DOT)
        grad_k += _mm(tl.trans(grad_grad_s), q, HALF_DOT)
        if HAS_GQ:
            grad_k += _mm(tl.trans(grad_s), gq, HALF_DOT)
    _store_tile(grad_k_ptr, b * S * E, cols, S, E, E_P, grad_k * scale)
    _store_tile(grad_v_ptr, b * S * EV, cols, S, EV, EV_P, grad_v)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

def _sizes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(B, L, S, E, Ev), checked."""
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        raise ValueError(f"query, key and value must be 3-D (B, L, E), (B, S, E), (B, S, Ev), got shapes "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    B, L, E = query.shape
    S, Ev = key.shape[1], value.shape[2]
    if key.shape[0] != B or key.shape[2] != E:
        raise ValueError(f"key must be (B, S, E) with query's B and E, got query {tuple(query.shape)} and key "
                         f"{tuple(key.shape)}")
    if value.shape[0] != B or value.shape[1] != key.shape[1]:
        raise ValueError(f"value must be (B, S, Ev) with query's B and key's S, got key {tuple(key.shape)} and value "
                         f"{tuple(value.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype or t.device != query.device:
            raise ValueError(f"{name} must have query's dtype {query.dtype} and device {query.device}, got "
                             f"{t.dtype} on {t.device}")
    return B, L, S, E, Ev


def _check_like(name: str, t: torch.Tensor, shape: tuple, like: torch.Tensor, dtype: torch.dtype = None) -> None:
    dtype = like.dtype if dtype is None else dtype
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != like.device:
        raise ValueError(f"{name} must be {tuple(shape)} {dtype} on {like.device}, got {tuple(t.shape)} {t.dtype} "
                         f"on {t.device}")


def _score_scale(scale: float, E: int) -> tuple:
    """The scale as the kernels take it (split_float's pieces). With E = 0 every score is an empty
    sum, 0 whatever the scale, as torch's math path gives; the default scale 1/√E is then inf,
    and inf · 0 would make it NaN."""
    return split_float(0.0 if E == 0 else scale)


def _launch_config(dtype: torch.dtype, E: int, Ev: int, double_backward: bool = False) -> dict:
    block_m, block_n = _blocks(dtype, double_backward)
    half_dot = not (dtype == torch.bfloat16 and triton_interpret())
    return dict(ACC=_acc(dtype), HALF_DOT=half_dot, BLOCK_M=block_m, BLOCK_N=block_n, E_P=_padded(E),
                EV_P=_padded(Ev))


@on_device
def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                                 is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, L, Ev) in query's dtype, logsumexp (B, L) in the accumulation dtype)."""
    B, L, S, E, Ev = _sizes(query, key, value)
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    out = q.new_empty((B, L, Ev))
    lse = q.new_empty((B, L), dtype=_acc_torch(q.dtype))
    if B * L == 0:
        return out, lse
    config = _launch_config(q.dtype, E, Ev)
    _forward_kernel[(B, triton.cdiv(L, config["BLOCK_M"]))](q, k, v, out, lse, L, S, E, Ev, *_score_scale(scale, E),
                                                            IS_CAUSAL=bool(is_causal), **config)
    return out, lse


@on_device
def scaled_dot_product_attention_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                          value: torch.Tensor, out: torch.Tensor, logsumexp: torch.Tensor,
                                          scale: float, is_causal: bool
                                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_query, grad_key, grad_value) given grad_out = ∂loss/∂out."""
    B, L, S, E, Ev = _sizes(query, key, value)
    _check_like("grad_out", grad_out, (B, L, Ev), query)
    _check_like("out", out, (B, L, Ev), query)
    _check_like("logsumexp", logsumexp, (B, L), query, _acc_torch(query.dtype))
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), logsumexp.contiguous()
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    config = _launch_config(q.dtype, E, Ev)
    common = (L, S, E, Ev, *_score_scale(scale, E))
    delta = q.new_empty((B, L), dtype=_acc_torch(q.dtype))
    if B * L > 0:
        grid = (B, triton.cdiv(L, config["BLOCK_M"]))
        _row_delta_kernel[grid](grad_out, out, delta, L, Ev, ACC=config["ACC"], BLOCK_M=config["BLOCK_M"],
                                EV_P=config["EV_P"])
        _backward_query_kernel[grid](grad_out, q, k, v, lse, delta, grad_q, *common, IS_CAUSAL=bool(is_causal),
                                     **config)
    if B * S > 0:
        _backward_key_kernel[(B, triton.cdiv(S, config["BLOCK_N"]))](
            grad_out, q, k, v, lse, delta, grad_k, grad_v, *common, IS_CAUSAL=bool(is_causal), **config)
    return grad_q, grad_k, grad_v


@on_device
def scaled_dot_product_attention_double_backward(grad_grad_query: torch.Tensor | None,
                                                 grad_grad_key: torch.Tensor | None,
                                                 grad_grad_value: torch.Tensor | None, grad_out: torch.Tensor,
                                                 query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                                 out: torch.Tensor, logsumexp: torch.Tensor, scale: float,
                                                 is_causal: bool
                                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad of grad_out, grad of query, grad of key, grad of value) given the cotangents of
    the backward's (grad_query, grad_key, grad_value), None meaning zero; total derivatives
    (out and logsumexp are functions of query, key and value)."""
    B, L, S, E, Ev = _sizes(query, key, value)
    _check_like("grad_out", grad_out, (B, L, Ev), query)
    _check_like("out", out, (B, L, Ev), query)
    _check_like("logsumexp", logsumexp, (B, L), query, _acc_torch(query.dtype))
    cotangents = []
    for name, t, like in (("grad_grad_query", grad_grad_query, query), ("grad_grad_key", grad_grad_key, key),
                          ("grad_grad_value", grad_grad_value, value)):
        if t is not None:
            _check_like(name, t, like.shape, query)
            t = t.contiguous()
        cotangents.append(t)
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), logsumexp.contiguous()
    grad_grad_out = torch.empty_like(grad_out)
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # An absent cotangent is not read: the kernels get query in its place and a flag.
    gq, gk, gv = (t if t is not None else q for t in cotangents)
    flags = dict(IS_CAUSAL=bool(is_causal), HAS_GQ=cotangents[0] is not None, HAS_GK=cotangents[1] is not None,
                 HAS_GV=cotangents[2] is not None)
    config = _launch_config(q.dtype, E, Ev, double_backward=True)
    common = (L, S, E, Ev, *_score_scale(scale, E))
    stats = q.new_empty((3, B, L), dtype=_acc_torch(q.dtype))
    if B * L > 0:
        grid = (B, triton.cdiv(L, config["BLOCK_M"]))
        _row_stats_kernel[grid](grad_out, q, k, v, out, lse, gq, gk, gv, stats, *common, **flags, **config)
        _double_backward_query_kernel[grid](grad_out, q, k, v, lse, gq, gk, gv, stats, grad_grad_out, grad_q,
                                            *common, **flags, **config)
    if B * S > 0:
        _double_backward_key_kernel[(B, triton.cdiv(S, config["BLOCK_N"]))](
            grad_out, q, k, v, lse, gq, gk, gv, stats, grad_k, grad_v, *common, **flags, **config)
    return grad_grad_out, grad_q, grad_k, grad_v
