// CPU kernels of scaled-dot-product attention: the forward, its backward and the backward's
// backward, each tile by tile, none keeping anything of size L × S (the formulas are in
// ganops/ops/scaled_dot_product_attention.py).
//
// Everything runs in the accumulation type (float for half types): q, k, v and the other
// inputs are converted once (O(T) memory), and each tile's products are ATen matrix products
// on tile views (BLAS, single-threaded inside at::parallel_for), its elementwise steps ATen's
// vectorised ops on the tile.
//
// Work splits, fixed whatever the thread count, so the results are bit-identical:
// - the forward takes one task per (b, query-row tile), with an online softmax over the key
//   tiles in order;
// - the backward and the double backward take one task per b, which walks the key tiles in
//   order and, for each, the query-row tiles in order: every tile of P is recomputed once
//   per pass, and each output row tile sums its tiles' products in ascending tile order (no
//   atomics, no reduction whose order depends on the split). One task per (b, key tile)
//   for dK, dV and another per (b, query tile) for dQ would recompute every tile twice.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/full.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <ganops/checks.h>
#include <ganops/common.h>
#include <ganops/registration.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

namespace ganops::scaled_dot_product_attention {
namespace {

// Rows and keys per tile. Each ATen op on a tile costs a few microseconds whatever its size,
// so tiles are large; a 128 × 512 float tile (256 KiB) still stays in L2. Forward+backward at
// (4, 4, 1024, 64), float32, one process alternating with torch's own CPU kernel (flash):
// 128 × 128 tiles 0.64× its speed, 128 × 512 with scale folded into Q 0.84-0.94× (2 threads,
// a loaded machine), 0.87× on one thread. A fused loop for exp(S − max) and the row sum (a
// polynomial exp GCC vectorises for AVX-512 but not for AVX2, which this AVX2-only CPU ran)
// fell to 0.49×: ATen's exp_ (Sleef, vectorised for every ISA) stays.
constexpr int64_t kRowTile = 128;
constexpr int64_t kKeyTile = 512;

struct Sizes {
  int64_t B, L, S, E, Ev;
  int64_t row_tiles() const { return ceil_div(L, kRowTile); }
  int64_t key_tiles() const { return ceil_div(S, kKeyTile); }
};

Sizes check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value) {
  check_float(query, "query");
  check_dim(query, 3, "query");
  check_dim(key, 3, "key");
  check_dim(value, 3, "value");
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
              "query, key and value must have the same dtype, got ", query.scalar_type(), ", ", key.scalar_type(),
              " and ", value.scalar_type());
  TORCH_CHECK(key.size(0) == query.size(0) && value.size(0) == query.size(0) && key.size(2) == query.size(2) &&
                  value.size(1) == key.size(1),
              "query (B, L, E), key (B, S, E) and value (B, S, Ev) do not match, got ", query.sizes(), ", ",
              key.sizes(), " and ", value.sizes());
  return {query.size(0), query.size(1), key.size(1), query.size(2), value.size(2)};
}

at::Tensor in_acc(const at::Tensor& t) { return t.to(acc_dtype(t.scalar_type())).contiguous(); }

// scale · Q, in the accumulation type: the scores tiles are then one matrix product with no
// pass to scale them, and dK = dSᵀ (scale · Q) needs no scale either.
at::Tensor scaled_query(const at::Tensor& query, double scale) { return in_acc(query).mul(scale); }

// Query-row tile rows [i0, i0 + rows) sees keys [0, key_end): all of them, or up to the last
// row's diagonal when causal.
int64_t key_end(const Sizes& n, int64_t i0, int64_t rows, bool is_causal) {
  return is_causal ? std::min(n.S, i0 + rows) : n.S;
}

// The first query-row tile whose rows see key j0 (key tile j0 is masked for earlier ones).
int64_t first_row_tile(int64_t j0, bool is_causal) { return is_causal ? j0 / kRowTile : 0; }

// The scores tile (scale · q_rows) k_colsᵀ, −inf where key j0 + c > query i0 + r when causal.
at::Tensor scores(const at::Tensor& qs_rows, const at::Tensor& k_cols, bool is_causal, int64_t i0, int64_t j0) {
  at::Tensor s = at::mm(qs_rows, k_cols.t());
  const int64_t rows = s.size(0), cols = s.size(1);
  if (is_causal && j0 + cols - 1 > i0) {
    const at::Tensor masked = at::ones({rows, cols}, s.options().dtype(at::kBool)).triu_(i0 - j0 + 1);
    s.masked_fill_(masked, -std::numeric_limits<double>::infinity());
  }
  return s;
}

// P = exp(S − lse) of the tile, from the forward's lse (masked entries give exp(−inf) = 0).
at::Tensor probabilities(const at::Tensor& qs_rows, const at::Tensor& k_cols, const at::Tensor& lse_rows,
                         bool is_causal, int64_t i0, int64_t j0) {
  return scores(qs_rows, k_cols, is_causal, i0, j0).sub_(lse_rows.unsqueeze(1)).exp_();
}

template <typename Body>
void for_each_task(int64_t tasks, Body&& body) {
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;
    for (int64_t t = begin; t < end; ++t) body(t);
  });
}

std::tuple<at::Tensor, at::Tensor> scaled_dot_product_attention_cpu(const at::Tensor& query, const at::Tensor& key,
                                                                    const at::Tensor& value, double scale,
                                                                    bool is_causal) {
  const Sizes n = check_inputs(query, key, value);
  const at::Tensor qs = scaled_query(query, scale), k = in_acc(key), v = in_acc(value);
  at::Tensor out = at::zeros({n.B, n.L, n.Ev}, qs.options());
  at::Tensor lse = at::full({n.B, n.L}, -std::numeric_limits<double>::infinity(), qs.options());
  if (n.S > 0) {
    for_each_task(n.B * n.row_tiles(), [&](int64_t task) {
      const int64_t b = task / n.row_tiles(), i0 = task % n.row_tiles() * kRowTile;
      const int64_t rows = std::min(kRowTile, n.L - i0);
      const at::Tensor qs_rows = qs[b].narrow(0, i0, rows);
      at::Tensor o = out[b].narrow(0, i0, rows);
      at::Tensor row_max = at::full({rows}, -std::numeric_limits<double>::infinity(), qs.options());
      at::Tensor row_sum = at::zeros({rows}, qs.options());
      // Online softmax: the first tile holds key 0, which every row sees, so row_max is
      // finite from then on and exp(old max − new max) is 0 for the first tile's zeros.
      for (int64_t j0 = 0; j0 < key_end(n, i0, rows, is_causal); j0 += kKeyTile) {
        const int64_t cols = std::min(kKeyTile, n.S - j0);
        at::Tensor p = scores(qs_rows, k[b].narrow(0, j0, cols), is_causal, i0, j0);
        const at::Tensor new_max = at::maximum(row_max, p.amax(1));
        p.sub_(new_max.unsqueeze(1)).exp_();
        const at::Tensor rescale = (row_max - new_max).exp_();
        row_sum.mul_(rescale).add_(p.sum(1));
        o.mul_(rescale.unsqueeze(1)).addmm_(p, v[b].narrow(0, j0, cols));
        row_max = new_max;
      }
      o.div_(row_sum.unsqueeze(1));
      lse[b].narrow(0, i0, rows).copy_(row_max + row_sum.log());
    });
  }
  return {out.to(query.scalar_type()), lse};
}
GANOPS_KERNEL(CPU, "scaled_dot_product_attention", scaled_dot_product_attention_cpu)

// The backward inputs beyond q, k, v, checked and in the accumulation type.
struct Saved {
  at::Tensor grad_out, out, lse;
};

Saved check_saved(const Sizes& n, const at::Tensor& query, const at::Tensor& grad_out, const at::Tensor& out,
                  const at::Tensor& logsumexp) {
  check_like(out, "out", grad_out, "grad_out");
  TORCH_CHECK(out.dim() == 3 && out.size(0) == n.B && out.size(1) == n.L && out.size(2) == n.Ev,
              "out must be (B, L, Ev) = (", n.B, ", ", n.L, ", ", n.Ev, "), got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == query.scalar_type(), "out must have query's dtype ", query.scalar_type(),
              ", got ", out.scalar_type());
  TORCH_CHECK(logsumexp.scalar_type() == acc_dtype(query.scalar_type()), "logsumexp must have dtype ",
              acc_dtype(query.scalar_type()), ", got ", logsumexp.scalar_type());
  TORCH_CHECK(logsumexp.dim() == 2 && logsumexp.size(0) == n.B && logsumexp.size(1) == n.L,
              "logsumexp must be (B, L) = (", n.B, ", ", n.L, "), got ", logsumexp.sizes());
  return {in_acc(grad_out), in_acc(out), logsumexp.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scaled_dot_product_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& logsumexp, double scale, bool is_causal) {
  const Sizes n = check_inputs(query, key, value);
  const Saved saved = check_saved(n, query, grad_out, out, logsumexp);
  const at::Tensor qs = scaled_query(query, scale), k = in_acc(key), v = in_acc(value);
  at::Tensor grad_q = at::zeros_like(qs), grad_k = at::zeros_like(k), grad_v = at::zeros_like(v);
  for_each_task(n.L > 0 ? n.B : 0, [&](int64_t b) {
    const at::Tensor qb = qs[b], kb = k[b], vb = v[b], dob = saved.grad_out[b], lseb = saved.lse[b];
    const at::Tensor D = (dob * saved.out[b]).sum(1);
    for (int64_t j0 = 0; j0 < n.S; j0 += kKeyTile) {
      const int64_t cols = std::min(kKeyTile, n.S - j0);
      const at::Tensor k_cols = kb.narrow(0, j0, cols), v_cols = vb.narrow(0, j0, cols);
      at::Tensor dk_cols = grad_k[b].narrow(0, j0, cols), dv_cols = grad_v[b].narrow(0, j0, cols);
      for (int64_t i0 = first_row_tile(j0, is_causal) * kRowTile; i0 < n.L; i0 += kRowTile) {
        const int64_t rows = std::min(kRowTile, n.L - i0);
        const at::Tensor qs_rows = qb.narrow(0, i0, rows), do_rows = dob.narrow(0, i0, rows);
        const at::Tensor p = probabilities(qs_rows, k_cols, lseb.narrow(0, i0, rows), is_causal, i0, j0);
        dv_cols.addmm_(p.t(), do_rows);
        // dS = P ∘ (dO Vᵀ − D)
        const at::Tensor ds = at::mm(do_rows, v_cols.t()).sub_(D.narrow(0, i0, rows).unsqueeze(1)).mul_(p);
        dk_cols.addmm_(ds.t(), qs_rows);
        grad_q[b].narrow(0, i0, rows).addmm_(ds, k_cols, 1, scale);
      }
    }
  });
  return {grad_q.to(query.scalar_type()), grad_k.to(key.scalar_type()), grad_v.to(value.scalar_type())};
}
GANOPS_KERNEL(CPU, "scaled_dot_product_attention_backward", scaled_dot_product_attention_backward_cpu)

std::optional<at::Tensor> optional_in_acc(const std::optional<at::Tensor>& t, const at::Tensor& like,
                                          const char* name, const char* like_name) {
  if (!t.has_value()) return std::nullopt;
  check_like(like, like_name, *t, name);
  return in_acc(*t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scaled_dot_product_attention_double_backward_cpu(
    const std::optional<at::Tensor>& grad_grad_query, const std::optional<at::Tensor>& grad_grad_key,
    const std::optional<at::Tensor>& grad_grad_value, const at::Tensor& grad_out, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const at::Tensor& out, const at::Tensor& logsumexp, double scale,
    bool is_causal) {
  const Sizes n = check_inputs(query, key, value);
  const Saved saved = check_saved(n, query, grad_out, out, logsumexp);
  const std::optional<at::Tensor> gq = optional_in_acc(grad_grad_query, query, "grad_grad_query", "query");
  const std::optional<at::Tensor> gk = optional_in_acc(grad_grad_key, key, "grad_grad_key", "key");
  const std::optional<at::Tensor> gv = optional_in_acc(grad_grad_value, value, "grad_grad_value", "value");
  const at::Tensor qs = scaled_query(query, scale), k = in_acc(key), v = in_acc(value);
  at::Tensor grad_do = at::zeros_like(saved.grad_out);
  at::Tensor grad_q = at::zeros_like(qs), grad_k = at::zeros_like(k), grad_v = at::zeros_like(v);
  const bool has_h = gq.has_value() || gk.has_value();
  for_each_task((n.L > 0 && (has_h || gv.has_value())) ? n.B : 0, [&](int64_t b) {
    const at::Tensor qb = qs[b], kb = k[b], vb = v[b], dob = saved.grad_out[b], lseb = saved.lse[b];
    const at::Tensor D = (dob * saved.out[b]).sum(1);
    // H = (scale · Q) gKᵀ + scale · gQ Kᵀ, the cotangent of dS, on one tile (undefined when
    // both are None).
    auto h_tile = [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
      at::Tensor h;
      if (gk) h = at::mm(qb.narrow(0, i0, rows), (*gk)[b].narrow(0, j0, cols).t());
      if (gq) {
        const at::Tensor gq_rows = (*gq)[b].narrow(0, i0, rows), k_cols = kb.narrow(0, j0, cols);
        h = h.defined() ? h.addmm_(gq_rows, k_cols.t(), 1, scale) : at::mm(gq_rows, k_cols.t()).mul_(scale);
      }
      return h;
    };
    // dO gVᵀ on one tile (undefined when gV is None).
    auto do_gv_tile = [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
      return gv ? at::mm(dob.narrow(0, i0, rows), (*gv)[b].narrow(0, j0, cols).t()) : at::Tensor();
    };
    // Row statistics over every key: C = Σ_j P H, G = Σ_j P H dP, A = Σ_j P (dO gVᵀ); then
    // gD = −C and R = A + G − 2 C D.
    at::Tensor C = at::zeros({n.L}, qs.options()), G = at::zeros({n.L}, qs.options()),
               A = at::zeros({n.L}, qs.options());
    for (int64_t i0 = 0; i0 < n.L; i0 += kRowTile) {
      const int64_t rows = std::min(kRowTile, n.L - i0);
      const at::Tensor qs_rows = qb.narrow(0, i0, rows), do_rows = dob.narrow(0, i0, rows);
      for (int64_t j0 = 0; j0 < key_end(n, i0, rows, is_causal); j0 += kKeyTile) {
        const int64_t cols = std::min(kKeyTile, n.S - j0);
        const at::Tensor p = probabilities(qs_rows, kb.narrow(0, j0, cols), lseb.narrow(0, i0, rows), is_causal, i0, j0);
        if (has_h) {
          const at::Tensor ph = h_tile(i0, rows, j0, cols).mul_(p);
          C.narrow(0, i0, rows).add_(ph.sum(1));
          G.narrow(0, i0, rows).add_(ph.mul_(at::mm(do_rows, vb.narrow(0, j0, cols).t())).sum(1));
        }
        if (gv) A.narrow(0, i0, rows).add_(do_gv_tile(i0, rows, j0, cols).mul_(p).sum(1));
      }
    }
    const at::Tensor gD = C.neg();
    const at::Tensor R = A.add_(G).sub_(C.mul_(D), 2);
    for (int64_t j0 = 0; j0 < n.S; j0 += kKeyTile) {
      const int64_t cols = std::min(kKeyTile, n.S - j0);
      const at::Tensor k_cols = kb.narrow(0, j0, cols), v_cols = vb.narrow(0, j0, cols);
      at::Tensor gk_out = grad_k[b].narrow(0, j0, cols), gv_out = grad_v[b].narrow(0, j0, cols);
      for (int64_t i0 = first_row_tile(j0, is_causal) * kRowTile; i0 < n.L; i0 += kRowTile) {
        const int64_t rows = std::min(kRowTile, n.L - i0);
        const at::Tensor qs_rows = qb.narrow(0, i0, rows), do_rows = dob.narrow(0, i0, rows);
        at::Tensor gdo_rows = grad_do[b].narrow(0, i0, rows), gq_out = grad_q[b].narrow(0, i0, rows);
        const at::Tensor p = probabilities(qs_rows, k_cols, lseb.narrow(0, i0, rows), is_causal, i0, j0);
        const at::Tensor dp = at::mm(do_rows, v_cols.t());
        const at::Tensor dp_minus_d = dp - D.narrow(0, i0, rows).unsqueeze(1);
        const at::Tensor gD_rows = gD.narrow(0, i0, rows).unsqueeze(1);
        // g_P = dO gVᵀ + H ∘ (dP − D) + gD ∘ dP, then g_S = P ∘ (g_P − R).
        at::Tensor g_p = do_gv_tile(i0, rows, j0, cols);
        if (has_h) {
          const at::Tensor h = h_tile(i0, rows, j0, cols);
          const at::Tensor h_terms = h * dp_minus_d + dp * gD_rows;
          g_p = g_p.defined() ? g_p.add_(h_terms) : h_terms;
          // g_dP = P ∘ (H + gD)
          const at::Tensor g_dp = h.add_(gD_rows).mul_(p);
          gdo_rows.addmm_(g_dp, v_cols);
          gv_out.addmm_(g_dp.t(), do_rows);
        }
        if (gv) gdo_rows.addmm_(p, (*gv)[b].narrow(0, j0, cols));
        const at::Tensor g_s = g_p.sub_(R.narrow(0, i0, rows).unsqueeze(1)).mul_(p);
        gq_out.addmm_(g_s, k_cols, 1, scale);
        gk_out.addmm_(g_s.t(), qs_rows);
        if (gk || gq) {
          const at::Tensor ds = dp_minus_d.mul(p);
          if (gk) gq_out.addmm_(ds, (*gk)[b].narrow(0, j0, cols), 1, scale);
          if (gq) gk_out.addmm_(ds.t(), (*gq)[b].narrow(0, i0, rows), 1, scale);
        }
      }
    }
  });
  return {grad_do.to(grad_out.scalar_type()), grad_q.to(query.scalar_type()), grad_k.to(key.scalar_type()),
          grad_v.to(value.scalar_type())};
}
GANOPS_KERNEL(CPU, "scaled_dot_product_attention_double_backward", scaled_dot_product_attention_double_backward_cpu)

}  // namespace
}  // namespace ganops::scaled_dot_product_attention
