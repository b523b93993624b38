// CPU kernels of scaled-dot-product attention: the forward, its backward and the backward's
// backward, each tile by tile, none keeping anything of size L × S (the formulas are in
// ganops/ops/scaled_dot_product_attention.py).
//
// Everything runs in the accumulation type Acc (float for half types, a template parameter,
// so the loops are typed): q, k, v and the other inputs are converted once (O(T) memory), and
// each tile's products are matrix products on tile views (torch::stable::matmul: BLAS,
// single-threaded inside parallel_for), its elementwise steps (mask, exp, row max and sums,
// the online-softmax rescale, the accumulation of products into the outputs) plain loops over
// the contiguous Acc buffers, in place in the products' own results where they can be. The
// stable ABI has no op with a Scalar argument (no addmm_ with alpha, no masked_fill_), and
// one loop over a tile replaces the several ops, each with its own pass and allocation, that
// a step took in ATen.
//
// Work splits, fixed whatever the thread count, so the results are bit-identical:
// - the forward takes one task per (b, query-row tile), with an online softmax over the key
//   tiles in order;
// - the backward and the double backward take one task per b, which walks the key tiles in
//   order and, for each, the query-row tiles in order: every tile of P is recomputed once
//   per pass, and each output row tile sums its tiles' products in ascending tile order (no
//   atomics, no reduction whose order depends on the split). One task per (b, key tile)
//   for dK, dV and another per (b, query tile) for dQ would recompute every tile twice.
//
// The kernels run below autograd (the dispatcher's CPU kernel), so the stable ops they call
// record nothing and need no grad-mode guard.

// Before the includes, so that isa.h's entry points are compiled under it too: no FP
// operation traps (torch runs with FP exceptions masked), so GCC may compute both arms of a
// select, and the tiles' loops vectorise (tile_exp). It changes no value.
#pragma GCC optimize("no-trapping-math")

#include <ganops/checks.h>
#include <ganops/common.h>
#include <ganops/dispatch.h>
#include <ganops/isa.h>
#include <ganops/lanes.h>
#include <ganops/registration.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace ganops::scaled_dot_product_attention {
namespace {

// Rows and keys per tile. Each op on a tile (a matmul through the dispatcher) costs a few
// microseconds whatever its size, so tiles are large; a 128 × 512 float tile (256 KiB) still
// stays in L2. Forward+backward at (4, 4, 1024, 64), float32, one process alternating with
// torch's own CPU kernel (flash), when the elementwise steps were ATen ops: 128 × 128 tiles
// 0.64× its speed, 128 × 512 with scale folded into Q 0.84-0.94× (2 threads, a loaded
// machine), 0.87× on one thread. A fused loop for exp(S − max) and the row sum whose
// exp GCC vectorised for AVX-512 but not for AVX2 (which that CPU ran) fell to 0.49×: the
// exp here (tile_exp) is written so that GCC vectorises it for every ISA, and the loops are
// compiled for AVX2 and AVX-512 and picked at run time (ganops/isa.h). Against the ATen
// steps, (4, 1024, 64) float32 on one thread of that kind of machine (AVX2, loaded, best of
// 7, three alternating runs): the forward 0.65-0.9× their time (causal 0.4-0.7×), the
// backward 0.95-1.07×, the double backward 0.7-0.9×.
constexpr int64_t kRowTile = 128;
constexpr int64_t kKeyTile = 512;

struct Sizes {
  int64_t B, L, S, E, Ev;
  int64_t row_tiles() const { return ceil_div(L, kRowTile); }
  int64_t key_tiles() const { return ceil_div(S, kKeyTile); }
};

Sizes check_inputs(const Tensor& query, const Tensor& key, const Tensor& value) {
  check_float(query, "query");
  check_dim(query, 3, "query");
  check_dim(key, 3, "key");
  check_dim(value, 3, "value");
  STD_TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
                  "query, key and value must have the same dtype, got ", query.scalar_type(), ", ",
                  key.scalar_type(), " and ", value.scalar_type());
  STD_TORCH_CHECK(key.size(0) == query.size(0) && value.size(0) == query.size(0) && key.size(2) == query.size(2) &&
                      value.size(1) == key.size(1),
                  "query (B, L, E), key (B, S, E) and value (B, S, Ev) do not match, got ", shape_text(query), ", ",
                  shape_text(key), " and ", shape_text(value));
  return {query.size(0), query.size(1), key.size(1), query.size(2), value.size(2)};
}

Tensor in_acc(const Tensor& t) { return as_contiguous(to_dtype(t, acc_dtype(t.scalar_type()))); }

// Runs body() compiled for the best ISA this CPU has: the tiles' elementwise loops.
template <typename Body>
void vectorised(Body&& body) {
  run_for_best_isa<Isa::kAvx512, Isa::kAvx2>(body);
}

// exp(x) as a loop over a tile can take it: std::exp is a library call per element, which GCC
// leaves scalar (no -ffast-math, so no vector math library), and the tiles' exps would then
// cost several times their matrix products. Here x = n ln 2 + r with |r| ≤ ln 2 / 2 (ln 2 in
// two parts, so r is exact), e^r a polynomial, 2^n made from n's bits: integer shifts and
// adds and a select, all of which vectorise on every ISA. float: Cephes' expf polynomial
// (about 1 ulp); double: the Taylor series to r¹³ (truncation below 1e-17). Arguments here
// are S − max or S − lse, ≤ 0 up to rounding; below the point where 2^n would leave the
// normal range the result is 0 (the true value is below 1e-37 or 1e-307), above it inf.
// NaN stays NaN; −inf gives 0 (the causal mask's exp(−inf)). The loops vectorise on AVX2
// and SSE2 only under -fno-trapping-math (the pragma at the top): otherwise GCC may not run the
// polynomial for elements that the range's selects discard, so it branches around it.
inline float tile_exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kRound = 0x1.8p23f;  // adding it rounds to an integer, kept in the low bits
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float t = x * kLog2e + kRound;
  const float n = t - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * (r * r) + r) + 1.0f;
  // t's bits are those of kRound plus n; shifted into the exponent field, kRound's vanish.
  const float two_n = std::bit_cast<float>((std::bit_cast<uint32_t>(t) << 23) + (uint32_t{127} << 23));
  return x < -87.0f ? 0.0f : (x > 88.0f ? std::numeric_limits<float>::infinity() : p * two_n);
}

inline double tile_exp(double x) {
  constexpr double kLog2e = 1.4426950408889634074;
  constexpr double kRound = 0x1.8p52;
  constexpr double kLn2Hi = 6.93145751953125e-1, kLn2Lo = 1.42860682030941723212e-6;
  const double t = x * kLog2e + kRound;
  const double n = t - kRound;
  const double r = (x - n * kLn2Hi) - n * kLn2Lo;
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = (p * (r * r) + r) + 1.0;
  const double two_n = std::bit_cast<double>((std::bit_cast<uint64_t>(t) << 52) + (uint64_t{1023} << 52));
  return x < -708.0 ? 0.0 : (x > 709.0 ? std::numeric_limits<double>::infinity() : p * two_n);
}

// Σ_c term(c) for c < n, in lanes (ganops/lanes.h) so that the loop vectorises.
template <typename Acc, typename Term>
inline Acc row_sum(int64_t n, Term&& term) {
  return lane_reduce<Acc>(n, term, [](Acc a, Acc b) { return a + b; });
}

// max_c p[c] for c < n (−inf for none), in lanes like row_sum (a max is exact, so the order
// changes nothing but the speed). NaN is skipped rather than propagated as amax does: the
// propagating forms (nan_max) stay scalar, and it changes no result, since a NaN score still
// makes exp(S − max), and so its row's sum, out and lse, NaN.
template <typename Acc>
inline Acc row_max(const Acc* p, int64_t n) {
  constexpr int kLanes = 16;
  const auto max = [](Acc a, Acc b) { return b > a ? b : a; };
  Acc lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<Acc>::infinity();
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] = max(lanes[l], p[c + l]);
  }
  for (; c < n; ++c) lanes[0] = max(lanes[0], p[c]);
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) lanes[l] = max(lanes[l], lanes[l + w]);
  }
  return lanes[0];
}

// A 2-D tensor's elements, for the tile loops: every tile and matrix product here is
// contiguous (products are new tensors; row blocks of contiguous tensors are contiguous).
template <typename Acc>
Acc* data(const Tensor& t) {
  return t.mutable_data_ptr<Acc>();
}

// dst[x] += m[x] over m's elements: a product added into a row block of an output, whose
// rows are contiguous, so dst is the block's first element.
template <typename Acc>
void add_into(Acc* dst, const Tensor& m) {
  const Acc* src = data<Acc>(m);
  const int64_t count = m.numel();
  vectorised([&] {
    for (int64_t x = 0; x < count; ++x) dst[x] += src[x];
  });
}

// dst[x] += alpha · m[x]: what addmm_ with alpha did.
template <typename Acc>
void add_into(Acc* dst, const Tensor& m, Acc alpha) {
  const Acc* src = data<Acc>(m);
  const int64_t count = m.numel();
  vectorised([&] {
    for (int64_t x = 0; x < count; ++x) dst[x] += alpha * src[x];
  });
}

// scale · Q, in the accumulation type: the scores tiles are then one matrix product with no
// pass to scale them, and dK = dSᵀ (scale · Q) needs no scale either. A new tensor: in_acc
// returns query itself when it is Acc and contiguous. The scale is rounded to Acc first, as
// ATen's mul by a Scalar does.
template <typename Acc>
Tensor scaled_query(const Tensor& query, double scale) {
  const Tensor q = in_acc(query);
  Tensor qs = empty(q.sizes(), q);
  const Acc* src = data<Acc>(q);
  Acc* dst = data<Acc>(qs);
  const int64_t count = q.numel();
  const Acc s = static_cast<Acc>(scale);
  vectorised([&] {
    for (int64_t x = 0; x < count; ++x) dst[x] = src[x] * s;
  });
  return qs;
}

// Rows [r0, r0 + rows) of a 2-D tensor, and its transpose. (stable narrow takes a mutable
// reference; the copy is a handle's.)
Tensor rows_of(Tensor t, int64_t r0, int64_t rows) { return narrow(t, 0, r0, rows); }
Tensor transposed(const Tensor& t) { return torch::stable::transpose(t, 0, 1); }

// Batch b of a (B, ·, ·) tensor, as a 2-D view (undefined for an undefined t).
Tensor batch_of(const Tensor& t, int64_t b) { return t.defined() ? torch::stable::select(t, 0, b) : Tensor(); }

// Query-row tile rows [i0, i0 + rows) sees keys [0, key_end): all of them, or up to the last
// row's diagonal when causal.
int64_t key_end(const Sizes& n, int64_t i0, int64_t rows, bool is_causal) {
  return is_causal ? std::min(n.S, i0 + rows) : n.S;
}

// The first query-row tile whose rows see key j0 (key tile j0 is masked for earlier ones).
int64_t first_row_tile(int64_t j0, bool is_causal) { return is_causal ? j0 / kRowTile : 0; }

// How many of the tile's keys j0, ..., j0 + cols − 1 query i sees: all, or when causal those
// with j ≤ i (top-left aligned), which may be none of them.
inline int64_t visible_keys(int64_t i, int64_t j0, int64_t cols, bool is_causal) {
  return is_causal ? std::clamp<int64_t>(i - j0 + 1, 0, cols) : cols;
}

// The scores tile (scale · q_rows) k_colsᵀ, rows × cols, contiguous. The causal mask is not
// written into it: each loop over it takes its rows' visible_keys, and where a row's masked
// entries would have given exp(−inf) = 0 it writes 0.
Tensor scores(const Tensor& qs_rows, const Tensor& k_cols) { return torch::stable::matmul(qs_rows, transposed(k_cols)); }

// P = exp(S − lse) of the tile, from the forward's lse (lse_rows: the tile's rows' values),
// in place in the scores tile; masked entries are 0.
template <typename Acc>
Tensor probabilities(const Tensor& qs_rows, const Tensor& k_cols, const Acc* lse_rows, bool is_causal,
                     int64_t i0, int64_t j0) {
  Tensor s = scores(qs_rows, k_cols);
  const int64_t rows = s.size(0), cols = s.size(1);
  Acc* p = data<Acc>(s);
  vectorised([&] {
    for (int64_t r = 0; r < rows; ++r) {
      Acc* pr = p + r * cols;
      const int64_t visible = visible_keys(i0 + r, j0, cols, is_causal);
      const Acc l = lse_rows[r];
      for (int64_t c = 0; c < visible; ++c) pr[c] = tile_exp(pr[c] - l);
      for (int64_t c = visible; c < cols; ++c) pr[c] = Acc(0);
    }
  });
  return s;
}

// D_i = Σ_c dO_ic O_ic for the L rows of one batch (do_b, out_b: its (L, Ev) blocks).
template <typename Acc>
void row_deltas(const Acc* do_b, const Acc* out_b, const Sizes& n, Acc* delta) {
  vectorised([&] {
    for (int64_t i = 0; i < n.L; ++i) {
      const Acc* x = do_b + i * n.Ev;
      const Acc* y = out_b + i * n.Ev;
      delta[i] = row_sum<Acc>(n.Ev, [&](int64_t c) { return x[c] * y[c]; });
    }
  });
}

template <typename Body>
void for_each_task(int64_t tasks, const Body& body) {
  if (tasks <= 0) return;
  torch::stable::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) body(t);
  });
}

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------

template <typename Acc>
std::tuple<Tensor, Tensor> forward(const Sizes& n, const Tensor& query, const Tensor& key, const Tensor& value,
                                   double scale, bool is_causal) {
  const Tensor qs = scaled_query<Acc>(query, scale), k = in_acc(key), v = in_acc(value);
  Tensor out = zeros({n.B, n.L, n.Ev}, qs);
  Tensor lse = full({n.B, n.L}, -std::numeric_limits<double>::infinity(), qs);
  if (n.S == 0) return {to_dtype(out, query.scalar_type()), lse};
  Acc* const out_data = data<Acc>(out);
  Acc* const lse_data = data<Acc>(lse);
  for_each_task(n.B * n.row_tiles(), [&](int64_t task) {
    const int64_t b = task / n.row_tiles(), i0 = task % n.row_tiles() * kRowTile;
    const int64_t rows = std::min(kRowTile, n.L - i0);
    const Tensor qs_rows = rows_of(batch_of(qs, b), i0, rows), kb = batch_of(k, b), vb = batch_of(v, b);
    Acc* const o = out_data + (b * n.L + i0) * n.Ev;  // the task's rows × Ev block of out
    std::vector<Acc> m(rows, -std::numeric_limits<Acc>::infinity()), sum(rows, Acc(0)), rescale(rows);
    // Online softmax: the first tile holds key 0, which every row sees, so m is finite from
    // then on and exp(old max − new max) is 0 for the first tile's zeros.
    for (int64_t j0 = 0; j0 < key_end(n, i0, rows, is_causal); j0 += kKeyTile) {
      const int64_t cols = std::min(kKeyTile, n.S - j0);
      Tensor p = scores(qs_rows, rows_of(kb, j0, cols));
      Acc* const pd = data<Acc>(p);
      // Row by row: new max = max(m, the row's visible scores), P = exp(S − new max) (0 where
      // masked), rescale = exp(m − new max), sum = sum · rescale + Σ P.
      vectorised([&] {
        for (int64_t r = 0; r < rows; ++r) {
          Acc* const pr = pd + r * cols;
          const int64_t visible = visible_keys(i0 + r, j0, cols, is_causal);
          const Acc new_max = nan_max(m[r], row_max(pr, visible));
          for (int64_t c = 0; c < visible; ++c) pr[c] = tile_exp(pr[c] - new_max);
          for (int64_t c = visible; c < cols; ++c) pr[c] = Acc(0);
          rescale[r] = std::exp(m[r] - new_max);
          sum[r] = sum[r] * rescale[r] + row_sum<Acc>(cols, [&](int64_t c) { return pr[c]; });
          m[r] = new_max;
        }
      });
      // O = O · rescale + P V
      const Tensor pv = torch::stable::matmul(p, rows_of(vb, j0, cols));
      const Acc* const pvd = data<Acc>(pv);
      vectorised([&] {
        for (int64_t r = 0; r < rows; ++r) {
          Acc* const orow = o + r * n.Ev;
          const Acc* const pvrow = pvd + r * n.Ev;
          const Acc f = rescale[r];
          for (int64_t c = 0; c < n.Ev; ++c) orow[c] = orow[c] * f + pvrow[c];
        }
      });
    }
    for (int64_t r = 0; r < rows; ++r) {
      Acc* const orow = o + r * n.Ev;
      for (int64_t c = 0; c < n.Ev; ++c) orow[c] /= sum[r];
      lse_data[b * n.L + i0 + r] = m[r] + std::log(sum[r]);
    }
  });
  return {to_dtype(out, query.scalar_type()), lse};
}

std::tuple<Tensor, Tensor> scaled_dot_product_attention_cpu(const Tensor& query, const Tensor& key,
                                                            const Tensor& value, double scale, bool is_causal) {
  const Sizes n = check_inputs(query, key, value);
  std::tuple<Tensor, Tensor> result;
  GANOPS_DISPATCH_FLOAT_DOUBLE(acc_dtype(query.scalar_type()), "scaled_dot_product_attention_cpu", [&] {
    result = forward<scalar_t>(n, query, key, value, scale, is_causal);
  });
  return result;
}
GANOPS_KERNEL(CPU, "scaled_dot_product_attention", scaled_dot_product_attention_cpu)

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------

// The backward inputs beyond q, k, v, checked and in the accumulation type.
struct Saved {
  Tensor grad_out, out, lse;
};

Saved check_saved(const Sizes& n, const Tensor& query, const Tensor& grad_out, const Tensor& out,
                  const Tensor& logsumexp) {
  check_like(out, "out", grad_out, "grad_out");
  STD_TORCH_CHECK(out.dim() == 3 && out.size(0) == n.B && out.size(1) == n.L && out.size(2) == n.Ev,
                  "out must be (B, L, Ev) = (", n.B, ", ", n.L, ", ", n.Ev, "), got ", shape_text(out));
  STD_TORCH_CHECK(out.scalar_type() == query.scalar_type(), "out must have query's dtype ", query.scalar_type(),
                  ", got ", out.scalar_type());
  STD_TORCH_CHECK(logsumexp.scalar_type() == acc_dtype(query.scalar_type()), "logsumexp must have dtype ",
                  acc_dtype(query.scalar_type()), ", got ", logsumexp.scalar_type());
  STD_TORCH_CHECK(logsumexp.dim() == 2 && logsumexp.size(0) == n.B && logsumexp.size(1) == n.L,
                  "logsumexp must be (B, L) = (", n.B, ", ", n.L, "), got ", shape_text(logsumexp));
  return {in_acc(grad_out), in_acc(out), as_contiguous(logsumexp)};
}

template <typename Acc>
std::tuple<Tensor, Tensor, Tensor> backward(const Sizes& n, const Saved& saved, const Tensor& query,
                                            const Tensor& key, const Tensor& value, double scale, bool is_causal) {
  const Tensor qs = scaled_query<Acc>(query, scale), k = in_acc(key), v = in_acc(value);
  Tensor grad_q = zeros_like(qs), grad_k = zeros_like(k), grad_v = zeros_like(v);
  const Acc* const do_data = data<Acc>(saved.grad_out);
  const Acc* const out_data = data<Acc>(saved.out);
  const Acc* const lse_data = data<Acc>(saved.lse);
  Acc* const dq_data = data<Acc>(grad_q);
  Acc* const dk_data = data<Acc>(grad_k);
  Acc* const dv_data = data<Acc>(grad_v);
  const Acc scale_acc = static_cast<Acc>(scale);
  for_each_task(n.L > 0 ? n.B : 0, [&](int64_t b) {
    const Tensor qb = batch_of(qs, b), kb = batch_of(k, b), vb = batch_of(v, b), dob = batch_of(saved.grad_out, b);
    const Acc* const lseb = lse_data + b * n.L;
    Acc* const dq = dq_data + b * n.L * n.E;
    Acc* const dk = dk_data + b * n.S * n.E;
    Acc* const dv = dv_data + b * n.S * n.Ev;
    std::vector<Acc> D(n.L);
    row_deltas(do_data + b * n.L * n.Ev, out_data + b * n.L * n.Ev, n, D.data());
    for (int64_t j0 = 0; j0 < n.S; j0 += kKeyTile) {
      const int64_t cols = std::min(kKeyTile, n.S - j0);
      const Tensor k_cols = rows_of(kb, j0, cols), v_cols = rows_of(vb, j0, cols);
      for (int64_t i0 = first_row_tile(j0, is_causal) * kRowTile; i0 < n.L; i0 += kRowTile) {
        const int64_t rows = std::min(kRowTile, n.L - i0);
        const Tensor qs_rows = rows_of(qb, i0, rows), do_rows = rows_of(dob, i0, rows);
        const Tensor p = probabilities<Acc>(qs_rows, k_cols, lseb + i0, is_causal, i0, j0);
        // dV += Pᵀ dO
        add_into(dv + j0 * n.Ev, torch::stable::matmul(transposed(p), do_rows));
        // dS = P ∘ (dO Vᵀ − D), in place in dO Vᵀ.
        const Tensor ds = torch::stable::matmul(do_rows, transposed(v_cols));
        Acc* const dsd = data<Acc>(ds);
        const Acc* const pd = data<Acc>(p);
        vectorised([&] {
          for (int64_t r = 0; r < rows; ++r) {
            const Acc d = D[i0 + r];
            for (int64_t c = 0; c < cols; ++c) dsd[r * cols + c] = (dsd[r * cols + c] - d) * pd[r * cols + c];
          }
        });
        // dK += dSᵀ (scale · Q), dQ += scale · dS K
        add_into(dk + j0 * n.E, torch::stable::matmul(transposed(ds), qs_rows));
        add_into(dq + i0 * n.E, torch::stable::matmul(ds, k_cols), scale_acc);
      }
    }
  });
  return {to_dtype(grad_q, query.scalar_type()), to_dtype(grad_k, key.scalar_type()),
          to_dtype(grad_v, value.scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor> scaled_dot_product_attention_backward_cpu(
    const Tensor& grad_out, const Tensor& query, const Tensor& key, const Tensor& value, const Tensor& out,
    const Tensor& logsumexp, double scale, bool is_causal) {
  const Sizes n = check_inputs(query, key, value);
  const Saved saved = check_saved(n, query, grad_out, out, logsumexp);
  std::tuple<Tensor, Tensor, Tensor> result;
  GANOPS_DISPATCH_FLOAT_DOUBLE(acc_dtype(query.scalar_type()), "scaled_dot_product_attention_backward_cpu", [&] {
    result = backward<scalar_t>(n, saved, query, key, value, scale, is_causal);
  });
  return result;
}
GANOPS_KERNEL(CPU, "scaled_dot_product_attention_backward", scaled_dot_product_attention_backward_cpu)

// ---------------------------------------------------------------------------------------
// Double backward
// ---------------------------------------------------------------------------------------

// A cotangent in the accumulation type, or an undefined tensor where it is None.
Tensor optional_in_acc(const std::optional<Tensor>& t, const Tensor& like, const char* name, const char* like_name) {
  if (!t.has_value()) return Tensor();
  check_like(like, like_name, *t, name);
  return in_acc(*t);
}

// The second-order terms of one tile, in place, from P (in p), dP = dO Vᵀ (in dp), H (in h,
// kHasH) and dO gVᵀ (in x, kHasGv), with D, gD and R of the tile's rows:
//     g_P = dO gVᵀ + H ∘ (dP − D) + gD ∘ dP,  g_S = P ∘ (g_P − R)      → p
//     dS = P ∘ (dP − D)                                                  → dp
//     g_dP = P ∘ (H + gD)                                                → h
// Templated on which terms exist, so that the loop has no branch.
template <bool kHasH, bool kHasGv, typename Acc>
void second_order_tile(Acc* p, Acc* dp, Acc* h, const Acc* x, int64_t rows, int64_t cols, const Acc* D,
                       const Acc* gD, const Acc* R) {
  for (int64_t r = 0; r < rows; ++r) {
    const Acc d = D[r], gd = gD[r], rr = R[r];
    for (int64_t e = r * cols; e < (r + 1) * cols; ++e) {
      const Acc pe = p[e], dpe = dp[e], dp_minus_d = dpe - d;
      Acc g_p;
      if constexpr (kHasH) {
        const Acc he = h[e];
        const Acc h_terms = he * dp_minus_d + dpe * gd;
        if constexpr (kHasGv) {
          g_p = x[e] + h_terms;
        } else {
          g_p = h_terms;
        }
        h[e] = (he + gd) * pe;
      } else {
        g_p = x[e];
      }
      dp[e] = dp_minus_d * pe;
      p[e] = (g_p - rr) * pe;
    }
  }
}

template <typename Acc>
std::tuple<Tensor, Tensor, Tensor, Tensor> double_backward(const Sizes& n, const Saved& saved, const Tensor& gq,
                                                           const Tensor& gk, const Tensor& gv, const Tensor& query,
                                                           const Tensor& key, const Tensor& value, double scale,
                                                           bool is_causal) {
  const Tensor qs = scaled_query<Acc>(query, scale), k = in_acc(key), v = in_acc(value);
  Tensor grad_do = zeros_like(saved.grad_out);
  Tensor grad_q = zeros_like(qs), grad_k = zeros_like(k), grad_v = zeros_like(v);
  const bool has_gq = gq.defined(), has_gk = gk.defined(), has_gv = gv.defined();
  const bool has_h = has_gq || has_gk;
  const Acc* const do_data = data<Acc>(saved.grad_out);
  const Acc* const out_data = data<Acc>(saved.out);
  const Acc* const lse_data = data<Acc>(saved.lse);
  Acc* const gdo_data = data<Acc>(grad_do);
  Acc* const gq_data = data<Acc>(grad_q);
  Acc* const gk_data = data<Acc>(grad_k);
  Acc* const gv_data = data<Acc>(grad_v);
  const Acc scale_acc = static_cast<Acc>(scale);
  for_each_task((n.L > 0 && (has_h || has_gv)) ? n.B : 0, [&](int64_t b) {
    const Tensor qb = batch_of(qs, b), kb = batch_of(k, b), vb = batch_of(v, b), dob = batch_of(saved.grad_out, b);
    const Tensor gqb = batch_of(gq, b), gkb = batch_of(gk, b), gvb = batch_of(gv, b);
    const Acc* const lseb = lse_data + b * n.L;
    std::vector<Acc> D(n.L);
    row_deltas(do_data + b * n.L * n.Ev, out_data + b * n.L * n.Ev, n, D.data());
    // H = (scale · Q) gKᵀ + scale · gQ Kᵀ, the cotangent of dS, on one tile (undefined when
    // both are None).
    auto h_tile = [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
      Tensor h;
      if (has_gk) h = torch::stable::matmul(rows_of(qb, i0, rows), transposed(rows_of(gkb, j0, cols)));
      if (has_gq) {
        const Tensor gq_k = torch::stable::matmul(rows_of(gqb, i0, rows), transposed(rows_of(kb, j0, cols)));
        if (h.defined()) {
          add_into(data<Acc>(h), gq_k, scale_acc);
        } else {
          h = gq_k;
          Acc* const hd = data<Acc>(h);
          const int64_t count = rows * cols;
          vectorised([&] {
            for (int64_t e = 0; e < count; ++e) hd[e] *= scale_acc;
          });
        }
      }
      return h;
    };
    // dO gVᵀ on one tile (undefined when gV is None).
    auto do_gv_tile = [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
      return has_gv ? torch::stable::matmul(rows_of(dob, i0, rows), transposed(rows_of(gvb, j0, cols))) : Tensor();
    };
    // Row statistics over every key: C = Σ_j P H, G = Σ_j P H dP, A = Σ_j P (dO gVᵀ); then
    // gD = −C and R = A + G − 2 C D.
    std::vector<Acc> C(n.L, Acc(0)), G(n.L, Acc(0)), A(n.L, Acc(0));
    for (int64_t i0 = 0; i0 < n.L; i0 += kRowTile) {
      const int64_t rows = std::min(kRowTile, n.L - i0);
      const Tensor qs_rows = rows_of(qb, i0, rows), do_rows = rows_of(dob, i0, rows);
      for (int64_t j0 = 0; j0 < key_end(n, i0, rows, is_causal); j0 += kKeyTile) {
        const int64_t cols = std::min(kKeyTile, n.S - j0);
        const Tensor p = probabilities<Acc>(qs_rows, rows_of(kb, j0, cols), lseb + i0, is_causal, i0, j0);
        const Acc* const pd = data<Acc>(p);
        if (has_h) {
          const Tensor h = h_tile(i0, rows, j0, cols);
          const Tensor dp = torch::stable::matmul(do_rows, transposed(rows_of(vb, j0, cols)));
          const Acc* const hd = data<Acc>(h);
          const Acc* const dpd = data<Acc>(dp);
          vectorised([&] {
            for (int64_t r = 0; r < rows; ++r) {
              const Acc *pr = pd + r * cols, *hr = hd + r * cols, *dpr = dpd + r * cols;
              C[i0 + r] += row_sum<Acc>(cols, [&](int64_t c) { return hr[c] * pr[c]; });
              G[i0 + r] += row_sum<Acc>(cols, [&](int64_t c) { return hr[c] * pr[c] * dpr[c]; });
            }
          });
        }
        if (has_gv) {
          const Tensor x = do_gv_tile(i0, rows, j0, cols);
          const Acc* const xd = data<Acc>(x);
          vectorised([&] {
            for (int64_t r = 0; r < rows; ++r) {
              const Acc *pr = pd + r * cols, *xr = xd + r * cols;
              A[i0 + r] += row_sum<Acc>(cols, [&](int64_t c) { return xr[c] * pr[c]; });
            }
          });
        }
      }
    }
    std::vector<Acc> gD(n.L), R(n.L);
    for (int64_t i = 0; i < n.L; ++i) {
      gD[i] = -C[i];
      R[i] = (A[i] + G[i]) - Acc(2) * (C[i] * D[i]);
    }
    for (int64_t j0 = 0; j0 < n.S; j0 += kKeyTile) {
      const int64_t cols = std::min(kKeyTile, n.S - j0);
      const Tensor k_cols = rows_of(kb, j0, cols), v_cols = rows_of(vb, j0, cols);
      Acc* const gk_out = gk_data + (b * n.S + j0) * n.E;
      Acc* const gv_out = gv_data + (b * n.S + j0) * n.Ev;
      for (int64_t i0 = first_row_tile(j0, is_causal) * kRowTile; i0 < n.L; i0 += kRowTile) {
        const int64_t rows = std::min(kRowTile, n.L - i0);
        const Tensor qs_rows = rows_of(qb, i0, rows), do_rows = rows_of(dob, i0, rows);
        Acc* const gdo_rows = gdo_data + (b * n.L + i0) * n.Ev;
        Acc* const gq_out = gq_data + (b * n.L + i0) * n.E;
        const Tensor p = probabilities<Acc>(qs_rows, k_cols, lseb + i0, is_causal, i0, j0);
        const Tensor dp = torch::stable::matmul(do_rows, transposed(v_cols));
        const Tensor h = has_h ? h_tile(i0, rows, j0, cols) : Tensor();
        const Tensor x = do_gv_tile(i0, rows, j0, cols);
        // P gV, taken before P's buffer becomes g_S.
        const Tensor p_gv = has_gv ? torch::stable::matmul(p, rows_of(gvb, j0, cols)) : Tensor();
        Acc* const pd = data<Acc>(p);
        Acc* const dpd = data<Acc>(dp);
        Acc* const hd = has_h ? data<Acc>(h) : nullptr;
        const Acc* const xd = has_gv ? data<Acc>(x) : nullptr;
        const Acc *Dr = D.data() + i0, *gDr = gD.data() + i0, *Rr = R.data() + i0;
        vectorised([&] {
          if (has_h && has_gv) {
            second_order_tile<true, true>(pd, dpd, hd, xd, rows, cols, Dr, gDr, Rr);
          } else if (has_h) {
            second_order_tile<true, false>(pd, dpd, hd, xd, rows, cols, Dr, gDr, Rr);
          } else {
            second_order_tile<false, true>(pd, dpd, hd, xd, rows, cols, Dr, gDr, Rr);
          }
        });
        const Tensor& g_s = p;
        const Tensor& ds = dp;
        if (has_h) {
          const Tensor& g_dp = h;
          // grad of dO += g_dP V, grad of V += g_dPᵀ dO
          add_into(gdo_rows, torch::stable::matmul(g_dp, v_cols));
          add_into(gv_out, torch::stable::matmul(transposed(g_dp), do_rows));
        }
        if (has_gv) add_into(gdo_rows, p_gv);  // grad of dO += P gV
        // grad of Q += scale · g_S K, grad of K += g_Sᵀ (scale · Q)
        add_into(gq_out, torch::stable::matmul(g_s, k_cols), scale_acc);
        add_into(gk_out, torch::stable::matmul(transposed(g_s), qs_rows));
        // grad of Q += scale · dS gK, grad of K += scale · dSᵀ gQ
        if (has_gk) add_into(gq_out, torch::stable::matmul(ds, rows_of(gkb, j0, cols)), scale_acc);
        if (has_gq) add_into(gk_out, torch::stable::matmul(transposed(ds), rows_of(gqb, i0, rows)), scale_acc);
      }
    }
  });
  // grad_out has query's dtype (check_saved), so grad of dO does too.
  return {to_dtype(grad_do, query.scalar_type()), to_dtype(grad_q, query.scalar_type()), to_dtype(grad_k, key.scalar_type()),
          to_dtype(grad_v, value.scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> scaled_dot_product_attention_double_backward_cpu(
    const std::optional<Tensor>& grad_grad_query, const std::optional<Tensor>& grad_grad_key,
    const std::optional<Tensor>& grad_grad_value, const Tensor& grad_out, const Tensor& query, const Tensor& key,
    const Tensor& value, const Tensor& out, const Tensor& logsumexp, double scale, bool is_causal) {
  const Sizes n = check_inputs(query, key, value);
  const Saved saved = check_saved(n, query, grad_out, out, logsumexp);
  const Tensor gq = optional_in_acc(grad_grad_query, query, "grad_grad_query", "query");
  const Tensor gk = optional_in_acc(grad_grad_key, key, "grad_grad_key", "key");
  const Tensor gv = optional_in_acc(grad_grad_value, value, "grad_grad_value", "value");
  std::tuple<Tensor, Tensor, Tensor, Tensor> result;
  GANOPS_DISPATCH_FLOAT_DOUBLE(acc_dtype(query.scalar_type()), "scaled_dot_product_attention_double_backward_cpu",
                               [&] {
                                 result = double_backward<scalar_t>(n, saved, gq, gk, gv, query, key, value, scale,
                                                                    is_causal);
                               });
  return result;
}
GANOPS_KERNEL(CPU, "scaled_dot_product_attention_double_backward", scaled_dot_product_attention_double_backward_cpu)

}  // namespace
}  // namespace ganops::scaled_dot_product_attention
