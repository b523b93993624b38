// What a CUDA block of scaled-dot-product attention does, shared by the CUDA kernels
// (scaled_dot_product_attention_cuda.cu) and their CPU launch check, which replays every block
// of the real launches thread by thread (scaled_dot_product_attention_launch_check.cpp).
//
// q (B, L, E), k (B, S, E), v (B, S, Ev), contiguous; S = scale · Q Kᵀ, key j masked for query
// i where j > i when causal; P = exp(S − lse) row by row, O = P V. Given dO, D_i = Σ_c dO_ic O_ic:
//     dS = P ∘ (dO Vᵀ − D),  dQ = scale · dS K,  dK = scale · dSᵀ Q,  dV = Pᵀ dO.
// Given cotangents gQ, gK, gV of dQ, dK, dV (absent: zero), H = scale · (gQ Kᵀ + Q gKᵀ),
// gD_i = −Σ_j P_ij H_ij, g_dP = P ∘ (H + gD), g_S = P ∘ (g_P − R) with
// g_P = dO gVᵀ + H ∘ (dP − D) + gD ∘ dP and R_i = Σ_j P_ij g_P_ij:
//     grad of dO = P gV + g_dP V,  grad of Q = scale · (dS gK + g_S K),
//     grad of K = scale · (dSᵀ gQ + g_Sᵀ Q),  grad of V = g_dPᵀ dO.
//
// Work split: a block of kThreads threads per query row (b, i) ("row-side": out, lse, D, dQ,
// the row statistics (D, gD, R), grad of dO and of Q) or per key row (b, j) ("column-side":
// dK, dV, grad of K and of V), so every output element has one writer and nothing is summed
// across blocks (deterministic, no atomics). A row-side block walks its row's unmasked keys in
// tiles of kThreads: thread t computes the pair terms of key j0 + t into shared memory, then
// each thread adds the tile into the output column it owns (a pass per kThreads columns). A
// column-side block does the same over the queries that see its key. Row statistics are
// per-thread partial sums over keys t, t + kThreads, ... combined in block.h's tree order
// (block_tree). No L × S tensor exists; per-thread state is a few scalars. Indices are 64-bit.
// Simple over fast (not yet run on a GPU): every block reads its partners' rows of K and V (or
// Q and dO) from global memory (L2) itself, with no tile shared between query rows.
//
// A block program takes a Block whose run(f) calls f(tid) for every thread and then
// synchronises the block: the CUDA kernel's Block runs its own thread and __syncthreads(), the
// launch check's runs f for tid = 0 .. kThreads−1 in turn. A phase writes only its own
// thread's slots of shared memory and reads slots written before the last barrier, so the two
// agree.
#pragma once

#include <ganops/block.h>
#include <ganops/checks.h>
#include <ganops/common.h>

#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <string_view>
#include <utility>

namespace ganops::scaled_dot_product_attention {

constexpr int kThreads = 128;

// The sizes, and which keys a query sees.
struct Sizes {
  int64_t B, L, S, E, Ev;
  bool causal;

  // Query i sees keys [0, key_end(i)); key j is seen by queries [query_begin(j), L).
  GANOPS_HD int64_t key_end(int64_t i) const { return causal && i + 1 < S ? i + 1 : S; }
  GANOPS_HD int64_t query_begin(int64_t j) const { return causal ? (j < L ? j : L) : 0; }
  GANOPS_HD int64_t width() const { return E > Ev ? E : Ev; }
};

template <typename Acc>
GANOPS_HD Acc exponential(Acc x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

template <typename Acc>
GANOPS_HD Acc logarithm(Acc x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

// Σ_e a_e b_e over n elements, in Acc.
template <typename Acc, typename T>
GANOPS_HD Acc dot(const T* a, const T* b, int64_t n) {
  Acc sum = Acc(0);
  for (int64_t e = 0; e < n; ++e) sum += static_cast<Acc>(a[e]) * static_cast<Acc>(b[e]);
  return sum;
}

// What the kernels read: the inputs, the forward's logsumexp, and the cotangents of the
// backward's outputs (nullptr: zero, or not needed by the kernel).
template <typename T, typename Acc>
struct Operands {
  const T* q;
  const T* k;
  const T* v;
  const T* grad_out;
  const T* out;
  const T* gq;
  const T* gk;
  const T* gv;
  const Acc* lse;
  Sizes n;
  Acc scale;

  // Row i (or j) of batch b of a (B, rows, width) tensor.
  GANOPS_HD const T* q_row(int64_t b, int64_t i) const { return q + (b * n.L + i) * n.E; }
  GANOPS_HD const T* k_row(int64_t b, int64_t j) const { return k + (b * n.S + j) * n.E; }
  GANOPS_HD const T* v_row(int64_t b, int64_t j) const { return v + (b * n.S + j) * n.Ev; }
  GANOPS_HD const T* grad_out_row(int64_t b, int64_t i) const { return grad_out + (b * n.L + i) * n.Ev; }
  GANOPS_HD const T* out_row(int64_t b, int64_t i) const { return out + (b * n.L + i) * n.Ev; }
  GANOPS_HD const T* gq_row(int64_t b, int64_t i) const { return gq + (b * n.L + i) * n.E; }
  GANOPS_HD const T* gk_row(int64_t b, int64_t j) const { return gk + (b * n.S + j) * n.E; }
  GANOPS_HD const T* gv_row(int64_t b, int64_t j) const { return gv + (b * n.S + j) * n.Ev; }

  GANOPS_HD Acc score(int64_t b, int64_t i, int64_t j) const { return scale * dot<Acc>(q_row(b, i), k_row(b, j), n.E); }
  // P_ij from the saved logsumexp: exp's argument is ≤ 0 up to rounding.
  GANOPS_HD Acc probability(int64_t b, int64_t i, int64_t j) const {
    return exponential(score(b, i, j) - lse[b * n.L + i]);
  }
};

// The first-order terms of an unmasked pair: P_ij and dS_ij = P_ij (dP_ij − D_i).
template <typename Acc>
struct FirstOrder {
  Acc p, grad_s;
};

template <typename T, typename Acc>
GANOPS_HD FirstOrder<Acc> first_order(const Operands<T, Acc>& o, int64_t b, int64_t i, int64_t j, Acc delta) {
  const Acc p = o.probability(b, i, j);
  return {p, p * (dot<Acc>(o.grad_out_row(b, i), o.v_row(b, j), o.n.Ev) - delta)};
}

// A query row's statistics for the double backward: D, gD and R.
template <typename Acc>
struct RowStats {
  Acc delta, grad_delta, r;
};

// P, dP, H and dO gVᵀ + H ∘ (dP − D) (g_P without its gD term) of an unmasked pair.
template <typename Acc>
struct PairTerms {
  Acc p, grad_p, h, partial;
};

template <typename T, typename Acc>
GANOPS_HD PairTerms<Acc> pair_terms(const Operands<T, Acc>& o, int64_t b, int64_t i, int64_t j, Acc delta) {
  const Acc p = o.probability(b, i, j);
  const Acc grad_p = dot<Acc>(o.grad_out_row(b, i), o.v_row(b, j), o.n.Ev);
  Acc h = Acc(0);
  if (o.gq != nullptr) h += dot<Acc>(o.gq_row(b, i), o.k_row(b, j), o.n.E);
  if (o.gk != nullptr) h += dot<Acc>(o.q_row(b, i), o.gk_row(b, j), o.n.E);
  h *= o.scale;
  Acc partial = h * (grad_p - delta);
  if (o.gv != nullptr) partial += dot<Acc>(o.grad_out_row(b, i), o.gv_row(b, j), o.n.Ev);
  return {p, grad_p, h, partial};
}

// dS, g_dP and g_S of an unmasked pair (and its P).
template <typename Acc>
struct SecondOrder {
  Acc p, grad_s, grad_grad_p, grad_grad_s;
};

template <typename T, typename Acc>
GANOPS_HD SecondOrder<Acc> second_order(const Operands<T, Acc>& o, int64_t b, int64_t i, int64_t j,
                                        const RowStats<Acc>& st) {
  const PairTerms<Acc> t = pair_terms(o, b, i, j, st.delta);
  return {t.p, t.p * (t.grad_p - st.delta), t.p * (t.h + st.grad_delta),
          t.p * (t.partial + st.grad_delta * t.grad_p - st.r)};
}

// A block's shared memory: the terms of the current tile, one slot per thread, and each
// thread's column sums.
template <typename Acc>
struct SharedTile {
  Acc term[4][kThreads];
  Acc acc[2][kThreads];
};

// block.h's reduction tree over the shared slots: combine(dst, src) folds slot src into dst.
template <typename Block, typename Combine>
GANOPS_HD void block_tree(const Block& block, Combine&& combine) {
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    block.run([&](int tid) {
      if (tid < stride) combine(tid, tid + stride);
    });
  }
}

// A value of slot 0 read by every thread, behind a barrier so that later phases may reuse it.
template <typename Acc, typename Block>
GANOPS_HD Acc block_broadcast(const Block& block, const Acc* slots) {
  Acc value = Acc(0);
  block.run([&](int) { value = slots[0]; });
  return value;
}

// Σ_c a_c b_c over a row of `width` elements: thread t takes c = t, t + kThreads, ...
template <typename Acc, typename T, typename Block>
GANOPS_HD Acc block_row_dot(const Block& block, SharedTile<Acc>& sh, const T* a, const T* b, int64_t width) {
  block.run([&](int tid) {
    Acc sum = Acc(0);
    for_each_thread_element(width, tid, kThreads,
                            [&](int64_t c) { sum += static_cast<Acc>(a[c]) * static_cast<Acc>(b[c]); });
    sh.term[0][tid] = sum;
  });
  block_tree(block, [&](int dst, int src) { sh.term[0][dst] += sh.term[0][src]; });
  return block_broadcast(block, sh.term[0]);
}

// The tiled sum of a row-side (column-side) block over its partners [begin, end), keys
// (queries): per pass of kThreads output columns, terms(tid, partner) fills the tile's
// shared slots for partner begin + tid of the tile, then accumulate(tid, column, first, count)
// adds the tile's `count` partners from `first` on into the thread's column sums, and
// finish(tid, column) writes the thread's columns.
template <typename Acc, typename Block, typename Terms, typename Accumulate, typename Finish>
GANOPS_HD void tiled_sum(const Block& block, SharedTile<Acc>& sh, int64_t begin, int64_t end, int64_t width,
                         Terms&& terms, Accumulate&& accumulate, Finish&& finish) {
  for (int64_t c0 = 0; c0 < width; c0 += kThreads) {
    block.run([&](int tid) {
      sh.acc[0][tid] = Acc(0);
      sh.acc[1][tid] = Acc(0);
    });
    for (int64_t first = begin; first < end; first += kThreads) {
      const int64_t count = end - first < kThreads ? end - first : kThreads;
      block.run([&](int tid) {
        if (tid < count) terms(tid, first + tid);
      });
      block.run([&](int tid) { accumulate(tid, c0 + tid, first, count); });
    }
    block.run([&](int tid) { finish(tid, c0 + tid); });
  }
}

// A tiled_sum's finish for two outputs of one row: column c of `scaled` (width E) gets
// scale · acc[0], column c of `plain` (width Ev; nullptr: none) gets acc[1].
template <typename T, typename Acc, typename VisitScaled, typename VisitPlain>
GANOPS_HD void write_row_columns(const SharedTile<Acc>& sh, int tid, int64_t c, int64_t row, const Sizes& n, Acc scale,
                                 T* scaled, T* plain, VisitScaled&& visit_scaled, VisitPlain&& visit_plain) {
  if (c < n.E) {
    scaled[row * n.E + c] = static_cast<T>(scale * sh.acc[0][tid]);
    visit_scaled(row * n.E + c);
  }
  if (plain != nullptr && c < n.Ev) {
    plain[row * n.Ev + c] = static_cast<T>(sh.acc[1][tid]);
    visit_plain(row * n.Ev + c);
  }
}

// ---------------------------------------------------------------------------------------
// Forward: lse, then out
// ---------------------------------------------------------------------------------------

// A running (max, Σ exp(x − max)) of scores: the online softmax's state.
template <typename Acc>
struct MaxSum {
  Acc max, sum;

  GANOPS_HD void add(Acc x) {
    // A −inf score adds exp(−inf) = 0 (and would make exp(−inf − (−inf)) = NaN below).
    if (x == -std::numeric_limits<Acc>::infinity()) return;
    if (x > max) {
      sum = sum * exponential(max - x) + Acc(1);
      max = x;
    } else {
      sum += exponential(x - max);
    }
  }
  GANOPS_HD void merge(const MaxSum& other) {
    if (other.sum == Acc(0)) return;
    if (sum == Acc(0)) {
      *this = other;
      return;
    }
    const Acc m = nan_max(max, other.max);
    sum = sum * exponential(max - m) + other.sum * exponential(other.max - m);
    max = m;
  }
  // log Σ exp over what was added, as torch.logsumexp: −inf for nothing (S = 0, or every
  // score −inf), +inf where a score is +inf, NaN passed on.
  GANOPS_HD Acc log_sum_exp() const {
    constexpr Acc inf = std::numeric_limits<Acc>::infinity();
    if (max == inf) return inf;
    if (sum == Acc(0)) return -inf;
    return max + logarithm(sum);
  }
};

// The lse kernel's block for query row `row` = b · L + i; visit(k) gets each lse element written.
template <typename T, typename Acc, typename Block, typename Visit>
GANOPS_HD void forward_lse_block(const Block& block, SharedTile<Acc>& sh, const Operands<T, Acc>& o, int64_t row,
                                 Acc* lse, Visit&& visit) {
  const int64_t b = row / o.n.L, i = row - b * o.n.L;
  block.run([&](int tid) {
    MaxSum<Acc> state{-std::numeric_limits<Acc>::infinity(), Acc(0)};
    for_each_thread_element(o.n.key_end(i), tid, kThreads, [&](int64_t j) { state.add(o.score(b, i, j)); });
    sh.term[0][tid] = state.max;
    sh.term[1][tid] = state.sum;
  });
  block_tree(block, [&](int dst, int src) {
    MaxSum<Acc> state{sh.term[0][dst], sh.term[1][dst]};
    state.merge({sh.term[0][src], sh.term[1][src]});
    sh.term[0][dst] = state.max;
    sh.term[1][dst] = state.sum;
  });
  block.run([&](int tid) {
    if (tid == 0) {
      lse[row] = MaxSum<Acc>{sh.term[0][0], sh.term[1][0]}.log_sum_exp();
      visit(row);
    }
  });
}

// The out kernel's block: out_ic = Σ_j P_ij v_jc, o.lse the lse kernel's.
template <typename T, typename Acc, typename Block, typename Visit>
GANOPS_HD void forward_out_block(const Block& block, SharedTile<Acc>& sh, const Operands<T, Acc>& o, int64_t row,
                                 T* out, Visit&& visit) {
  const int64_t b = row / o.n.L, i = row - b * o.n.L;
  tiled_sum(
      block, sh, 0, o.n.key_end(i), o.n.Ev, [&](int tid, int64_t j) { sh.term[0][tid] = o.probability(b, i, j); },
      [&](int tid, int64_t c, int64_t first, int64_t count) {
        if (c >= o.n.Ev) return;
        Acc sum = sh.acc[0][tid];
        for (int64_t t = 0; t < count; ++t) sum += sh.term[0][t] * static_cast<Acc>(o.v_row(b, first + t)[c]);
        sh.acc[0][tid] = sum;
      },
      [&](int tid, int64_t c) {
        if (c >= o.n.Ev) return;
        out[row * o.n.Ev + c] = static_cast<T>(sh.acc[0][tid]);
        visit(row * o.n.Ev + c);
      });
}

// ---------------------------------------------------------------------------------------
// Backward: D, then dQ (row-side) and dK, dV (column-side)
// ---------------------------------------------------------------------------------------

// delta[row] = D_i = Σ_c dO_ic O_ic.
template <typename T, typename Acc, typename Block, typename Visit>
GANOPS_HD void row_delta_block(const Block& block, SharedTile<Acc>& sh, const Operands<T, Acc>& o, int64_t row,
                               Acc* delta, Visit&& visit) {
  const int64_t b = row / o.n.L, i = row - b * o.n.L;
  const Acc d = block_row_dot(block, sh, o.grad_out_row(b, i), o.out_row(b, i), o.n.Ev);
  block.run([&](int tid) {
    if (tid == 0) {
      delta[row] = d;
      visit(row);
    }
  });
}

// dQ of query row `row`: scale · Σ_j dS_ij k_j.
template <typename T, typename Acc, typename Block, typename Visit>
GANOPS_HD void backward_query_block(const Block& block, SharedTile<Acc>& sh, const Operands<T, Acc>& o,
                                    const Acc* delta, int64_t row, T* grad_q, Visit&& visit) {
  const int64_t b = row / o.n.L, i = row - b * o.n.L;
  tiled_sum(
      block, sh, 0, o.n.key_end(i), o.n.E,
      [&](int tid, int64_t j) { sh.term[0][tid] = first_order(o, b, i, j, delta[row]).grad_s; },
      [&](int tid, int64_t c, int64_t first, int64_t count) {
        if (c >= o.n.E) return;
        Acc sum = sh.acc[0][tid];
        for (int64_t t = 0; t < count; ++t) sum += sh.term[0][t] * static_cast<Acc>(o.k_row(b, first + t)[c]);
        sh.acc[0][tid] = sum;
      },
      [&](int tid, int64_t c) {
        write_row_columns(sh, tid, c, row, o.n, o.scale, grad_q, static_cast<T*>(nullptr), visit, visit);
      });
}

// dK and dV of key row `key` = b · S + j: scale · Σ_i dS_ij q_i and Σ_i P_ij dO_i.
template <typename T, typename Acc, typename Block, typename VisitK, typename VisitV>
GANOPS_HD void backward_key_block(const Block& block, SharedTile<Acc>& sh, const Operands<T, Acc>& o,
                                  const Acc* delta, int64_t key, T* grad_k, T* grad_v, VisitK&& visit_k,
                                  VisitV&& visit_v) {
  const int64_t b = key / o.n.S, j = key - b * o.n.S;
  tiled_sum(
      block, sh, o.n.query_begin(j), o.n.L, o.n.width(),
      [&](int tid, int64_t i) {
        const FirstOrder<Acc> f = first_order(o, b, i, j, delta[b * o.n.L + i]);
        sh.term[0][tid] = f.p;
        sh.term[1][tid] = f.grad_s;
      },
      [&](int tid, int64_t c, int64_t first, int64_t count) {
        Acc sum_k = sh.acc[0][tid], sum_v = sh.acc[1][tid];
        for (int64_t t = 0; t < count; ++t) {
          if (c < o.n.E) sum_k += sh.term[1][t] * static_cast<Acc>(o.q_row(b, first + t)[c]);
          if (c < o.n.Ev) sum_v += sh.term[0][t] * static_cast<Acc>(o.grad_out_row(b, first + t)[c]);
        }
        sh.acc[0][tid] = sum_k;
        sh.acc[1][tid] = sum_v;
      },
      [&](int tid, int64_t c) { write_row_columns(sh, tid, c, key, o.n, o.scale, grad_k, grad_v, visit_k, visit_v); });
}

// ---------------------------------------------------------------------------------------
// Double backward: row statistics, then grad of dO and Q (row-side) and of K and V
// (column-side). stats is (3, B, L): D, gD, R.
// ---------------------------------------------------------------------------------------

template <typename Acc>
GANOPS_HD RowStats<Acc> load_row_stats(const Acc* stats, const Sizes& n, int64_t row) {
  const int64_t rows = n.B * n.L;
  return {stats[row], stats[rows + row], stats[2 * rows + row]};
}

// D_i, gD_i = −Σ_j P_ij H_ij and R_i = Σ_j P_ij (dO gVᵀ + H ∘ (dP − D))_ij + gD_i D_i.
template <typename T, typename Acc, typename Block, typename Visit>
GANOPS_HD void row_stats_block(const Block& block, SharedTile<Acc>& sh, const Operands<T, Acc>& o, int64_t row,
                               Acc* stats, Visit&& visit) {
  const int64_t b = row / o.n.L, i = row - b * o.n.L;
  const Acc delta = block_row_dot(block, sh, o.grad_out_row(b, i), o.out_row(b, i), o.n.Ev);
  block.run([&](int tid) {
    Acc grad_delta = Acc(0), partial = Acc(0);
    for_each_thread_element(o.n.key_end(i), tid, kThreads, [&](int64_t j) {
      const PairTerms<Acc> t = pair_terms(o, b, i, j, delta);
      grad_delta -= t.p * t.h;
      partial += t.p * t.partial;
    });
    sh.term[0][tid] = grad_delta;
    sh.term[1][tid] = partial;
  });
  block_tree(block, [&](int dst, int src) {
    sh.term[0][dst] += sh.term[0][src];
    sh.term[1][dst] += sh.term[1][src];
  });
  block.run([&](int tid) {
    if (tid != 0) return;
    const int64_t rows = o.n.B * o.n.L;
    stats[row] = delta;
    stats[rows + row] = sh.term[0][0];
    stats[2 * rows + row] = sh.term[1][0] + sh.term[0][0] * delta;
    visit(row);
    visit(rows + row);
    visit(2 * rows + row);
  });
}

// Grad of dO = Σ_j (P_ij gv_j + g_dP_ij v_j) and grad of Q = scale · Σ_j (dS_ij gk_j + g_S_ij k_j).
template <typename T, typename Acc, typename Block, typename VisitOut, typename VisitQ>
GANOPS_HD void double_backward_query_block(const Block& block, SharedTile<Acc>& sh, const Operands<T, Acc>& o,
                                           const Acc* stats, int64_t row, T* grad_grad_out, T* grad_q,
                                           VisitOut&& visit_grad_out, VisitQ&& visit_q) {
  const int64_t b = row / o.n.L, i = row - b * o.n.L;
  const RowStats<Acc> st = load_row_stats(stats, o.n, row);
  tiled_sum(
      block, sh, 0, o.n.key_end(i), o.n.width(),
      [&](int tid, int64_t j) {
        const SecondOrder<Acc> s = second_order(o, b, i, j, st);
        sh.term[0][tid] = s.p;
        sh.term[1][tid] = s.grad_s;
        sh.term[2][tid] = s.grad_grad_p;
        sh.term[3][tid] = s.grad_grad_s;
      },
      [&](int tid, int64_t c, int64_t first, int64_t count) {
        Acc sum_q = sh.acc[0][tid], sum_out = sh.acc[1][tid];
        for (int64_t t = 0; t < count; ++t) {
          const int64_t j = first + t;
          if (c < o.n.E) {
            sum_q += sh.term[3][t] * static_cast<Acc>(o.k_row(b, j)[c]);
            if (o.gk != nullptr) sum_q += sh.term[1][t] * static_cast<Acc>(o.gk_row(b, j)[c]);
          }
          if (c < o.n.Ev) {
            sum_out += sh.term[2][t] * static_cast<Acc>(o.v_row(b, j)[c]);
            if (o.gv != nullptr) sum_out += sh.term[0][t] * static_cast<Acc>(o.gv_row(b, j)[c]);
          }
        }
        sh.acc[0][tid] = sum_q;
        sh.acc[1][tid] = sum_out;
      },
      [&](int tid, int64_t c) {
        write_row_columns(sh, tid, c, row, o.n, o.scale, grad_q, grad_grad_out, visit_q, visit_grad_out);
      });
}

// Grad of K = scale · Σ_i (dS_ij gq_i + g_S_ij q_i) and grad of V = Σ_i g_dP_ij dO_i.
template <typename T, typename Acc, typename Block, typename VisitK, typename VisitV>
GANOPS_HD void double_backward_key_block(const Block& block, SharedTile<Acc>& sh, const Operands<T, Acc>& o,
                                         const Acc* stats, int64_t key, T* grad_k, T* grad_v, VisitK&& visit_k,
                                         VisitV&& visit_v) {
  const int64_t b = key / o.n.S, j = key - b * o.n.S;
  tiled_sum(
      block, sh, o.n.query_begin(j), o.n.L, o.n.width(),
      [&](int tid, int64_t i) {
        const SecondOrder<Acc> s = second_order(o, b, i, j, load_row_stats(stats, o.n, b * o.n.L + i));
        sh.term[1][tid] = s.grad_s;
        sh.term[2][tid] = s.grad_grad_p;
        sh.term[3][tid] = s.grad_grad_s;
      },
      [&](int tid, int64_t c, int64_t first, int64_t count) {
        Acc sum_k = sh.acc[0][tid], sum_v = sh.acc[1][tid];
        for (int64_t t = 0; t < count; ++t) {
          const int64_t i = first + t;
          if (c < o.n.E) {
            sum_k += sh.term[3][t] * static_cast<Acc>(o.q_row(b, i)[c]);
            if (o.gq != nullptr) sum_k += sh.term[1][t] * static_cast<Acc>(o.gq_row(b, i)[c]);
          }
          if (c < o.n.Ev) sum_v += sh.term[2][t] * static_cast<Acc>(o.grad_out_row(b, i)[c]);
        }
        sh.acc[0][tid] = sum_k;
        sh.acc[1][tid] = sum_v;
      },
      [&](int tid, int64_t c) { write_row_columns(sh, tid, c, key, o.n, o.scale, grad_k, grad_v, visit_k, visit_v); });
}

// ---------------------------------------------------------------------------------------
// Host side, shared by the CUDA launchers and the launch check
// ---------------------------------------------------------------------------------------

// query (B, L, E), key (B, S, E), value (B, S, Ev) of one float dtype on `device`.
inline Sizes check_inputs(const Tensor& query, const Tensor& key, const Tensor& value, bool is_causal,
                          DeviceType device) {
  check_float(query, "query");
  STD_TORCH_CHECK(query.device().type() == device, "query must be a ", device_type_text(device, true), " tensor here, got ", device_text(query));
  check_dim(query, 3, "query");
  check_dim(key, 3, "key");
  check_dim(value, 3, "value");
  STD_TORCH_CHECK(key.size(0) == query.size(0) && key.size(2) == query.size(2),
              "key must be (B, S, E) with query's B and E, got query ", shape_text(query), " and key ", shape_text(key));
  STD_TORCH_CHECK(value.size(0) == query.size(0) && value.size(1) == key.size(1),
              "value must be (B, S, Ev) with query's B and key's S, got key ", shape_text(key), " and value ",
              shape_text(value));
  for (const auto& [t, name] : {std::pair{&key, "key"}, std::pair{&value, "value"}}) {
    STD_TORCH_CHECK(t->scalar_type() == query.scalar_type(), name, " must have query's dtype ", query.scalar_type(),
                ", got ", t->scalar_type());
    check_same_device(*t, name, query, "query");
  }
  return {query.size(0), query.size(1), key.size(1), query.size(2), value.size(2), is_causal};
}

// t has the given shape, query's device, and query's dtype (acc: the accumulation dtype).
inline void check_operand(const Tensor& t, std::string_view name, IntArrayRef shape,
                          const Tensor& query, bool acc = false) {
  STD_TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape_text(shape), ", got ", shape_text(t));
  const c10::ScalarType dtype = acc ? acc_dtype(query.scalar_type()) : query.scalar_type();
  STD_TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  check_same_device(t, name, query, "query");
}

// The backward's operands beyond the inputs: grad_out and out (B, L, Ev), logsumexp (B, L).
inline void check_saved(const Tensor& grad_out, const Tensor& out, const Tensor& logsumexp,
                        const Tensor& query, const Sizes& n) {
  check_operand(grad_out, "grad_out", {n.B, n.L, n.Ev}, query);
  check_operand(out, "out", {n.B, n.L, n.Ev}, query);
  check_operand(logsumexp, "logsumexp", {n.B, n.L}, query, /*acc=*/true);
}

// The double backward's cotangents, contiguous, or undefined where absent.
inline std::array<Tensor, 3> check_cotangents(const std::optional<Tensor>& grad_grad_query,
                                                  const std::optional<Tensor>& grad_grad_key,
                                                  const std::optional<Tensor>& grad_grad_value,
                                                  const Tensor& query, const Sizes& n) {
  std::array<Tensor, 3> out;
  const std::array<const std::optional<Tensor>*, 3> given{&grad_grad_query, &grad_grad_key, &grad_grad_value};
  const std::array<const char*, 3> names{"grad_grad_query", "grad_grad_key", "grad_grad_value"};
  const std::array<std::array<int64_t, 3>, 3> shapes{{{n.B, n.L, n.E}, {n.B, n.S, n.E}, {n.B, n.S, n.Ev}}};
  for (int t = 0; t < 3; ++t) {
    if (!given[t]->has_value() || !(*given[t])->defined()) continue;
    check_operand(**given[t], names[t], shapes[t], query);
    out[t] = as_contiguous(**given[t]);
  }
  return out;
}

template <typename T>
const T* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// The kernels' operands from contiguous tensors; undefined ones become nullptr.
template <typename T>
Operands<T, acc_t<T>> make_operands(const Sizes& n, double scale, const Tensor& q, const Tensor& k,
                                    const Tensor& v, const Tensor& grad_out = {}, const Tensor& out = {},
                                    const Tensor& lse = {}, const std::array<Tensor, 3>& cotangents = {}) {
  using Acc = acc_t<T>;
  return {data_or_null<T>(q),
          data_or_null<T>(k),
          data_or_null<T>(v),
          data_or_null<T>(grad_out),
          data_or_null<T>(out),
          data_or_null<T>(cotangents[0]),
          data_or_null<T>(cotangents[1]),
          data_or_null<T>(cotangents[2]),
          data_or_null<Acc>(lse),
          n,
          // With E = 0 every score is an empty sum, 0 whatever the scale (torch's math path);
          // the default scale 1/√E is then inf, and inf · 0 would make it NaN.
          static_cast<Acc>(n.E == 0 ? 0.0 : scale)};
}

}  // namespace ganops::scaled_dot_product_attention
