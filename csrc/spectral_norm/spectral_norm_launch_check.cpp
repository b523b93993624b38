// The CUDA launches of spectral_norm_cuda.cu run on the CPU, block by block and thread by
// thread (ganops/launch_emulation.h), for one power iteration, the scale and the backward: a
// test op for CPU tensors.

#include <ganops/tensor.h>
#include <ganops/dispatch.h>
#include <ganops/launch_emulation.h>

#include <tuple>
#include <vector>

#include "spectral_norm/spectral_norm.h"

namespace ganops::spectral_norm {
namespace {

using LaunchCheck = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The launches of one matrix-vector product over the stored matrix s, block by block and
// thread by thread: row dots (row_dot_kernel) or column sums (col_partial_kernel over
// (column block, row chunk)), then combine_kernel. Writes out, returns the chunks' sums of
// squares; visit(k) counts each weight element read.
template <typename T, typename Acc>
std::vector<Acc> emulate_product(const T* w, MatrixShape s, const T* x, bool by_rows, Acc* out,
                                 const Coverage& visits) {
  std::vector<Acc> partials;
  int64_t n = s.rows, n_row_chunks = 1;
  if (by_rows) {
    for (int64_t i = 0; i < s.rows; ++i) {
      out[i] = emulate_block<kThreads, Acc>([&](int tid) {
        for_each_row_element(s, i, tid, kThreads, [&](int64_t, int64_t k) { visits.visit(k); });
        return row_dot_thread<T, Acc>(w, x, s, i, tid, kThreads);
      });
    }
  } else {
    n = s.cols();
    n_row_chunks = row_chunks(s.rows);
    partials.resize(n_row_chunks * n);
    for (int64_t bx = 0; bx < ceil_div(n, kThreads); ++bx) {
      for (int64_t r = 0; r < n_row_chunks; ++r) {
        for (int tid = 0; tid < kThreads; ++tid) {
          const int64_t j = bx * kThreads + tid;
          if (j >= n) continue;
          partials[r * n + j] = col_partial_thread<T, Acc>(w, x, s, j, r);
          for_each_chunk_row(s, r, [&](int64_t i) { visits.visit(s.column_offset(j) + i * s.inner); });
        }
      }
    }
  }
  const Acc* source = by_rows ? out : partials.data();
  std::vector<Acc> sum_sq(ceil_div(n, kChunkSize));
  for (int64_t c = 0; c < static_cast<int64_t>(sum_sq.size()); ++c) {
    sum_sq[c] = emulate_block<kThreads, Acc>(
        [&](int tid) { return combine_thread(source, n_row_chunks, n, out, c, tid, kThreads); });
  }
  return sum_sq;
}

// normalize_kernel's blocks: out = x / max(|x|, eps); returns |x|^2 as every block adds it.
template <typename T, typename Acc>
Acc emulate_normalize(const Acc* x, int64_t n, const std::vector<Acc>& sum_sq, double eps, T* out) {
  const int64_t n_chunks = static_cast<int64_t>(sum_sq.size());
  Acc ss = Acc(0);
  for (int64_t c = 0; c < n_chunks; ++c) {
    ss = emulate_block<kThreads, Acc>([&](int tid) { return sum_thread(sum_sq.data(), n_chunks, tid, kThreads); });
    const Acc denom = clamped_norm(ss, eps);
    emulate_block<kThreads, Acc>([&](int tid) {
      normalize_thread(x, n, denom, out, c, tid, kThreads);
      return Acc(0);
    });
  }
  return ss;
}

template <typename T>
LaunchCheck launch_check_impl(const Tensor& w, const Tensor& u_in, const Tensor& v_in,
                              const Tensor& g, MatrixShape s, double eps) {
  using Acc = acc_t<T>;
  const int64_t n = s.numel();
  const int64_t cols = s.cols();
  const Coverage visits({4, n});
  const Coverage mat_vec_visits = visits, mat_t_vec_visits = visits.from(n), scale_visits = visits.from(2 * n),
                 dot_visits = visits.from(3 * n);
  Tensor u = ganops::clone(u_in);
  Tensor v = ganops::clone(v_in);
  const T* wp = w.const_data_ptr<T>();
  const T* gp = g.const_data_ptr<T>();
  T* up = u.mutable_data_ptr<T>();
  T* vp = v.mutable_data_ptr<T>();

  // W v, then u; W^T u, then v and sigma: row dots and column sums of the stored matrix,
  // swapped when it is stored transposed.
  const MatrixShape stored = stored_shape(s);
  const bool transposed = stored_transposed(s);
  std::vector<Acc> w_v(s.rows), wt_u(cols);
  const std::vector<Acc> w_v_sum_sq = emulate_product<T, Acc>(wp, stored, vp, !transposed, w_v.data(), mat_vec_visits);
  emulate_normalize(w_v.data(), s.rows, w_v_sum_sq, eps, up);
  const std::vector<Acc> wt_u_sum_sq =
      emulate_product<T, Acc>(wp, stored, up, transposed, wt_u.data(), mat_t_vec_visits);
  const Acc ss = emulate_normalize(wt_u.data(), cols, wt_u_sum_sq, eps, vp);
  const Acc sigma = sigma_from_sum_sq(ss, eps);

  // scale_kernel and the backward's grad_dot_kernel, a chunk per block; grad_finish_kernel,
  // one block; grad_weight_kernel.
  const int64_t n_chunks = ceil_div(n, kChunkSize);
  Tensor scaled = empty(w.sizes(), w);
  Tensor grad_w = empty(w.sizes(), w);
  T* sp = scaled.mutable_data_ptr<T>();
  T* dp = grad_w.mutable_data_ptr<T>();
  const Acc inv = Acc(1) / sigma;
  std::vector<Acc> chunk_partials(n_chunks);
  for (int64_t c = 0; c < n_chunks; ++c) {
    chunk_partials[c] = emulate_block<kThreads, Acc>([&](int tid) {
      for_each_chunk_element(n, c, tid, kThreads, [&](int64_t k) {
        sp[k] = static_cast<T>(Acc(wp[k]) * inv);
        scale_visits.visit(k);
        dot_visits.visit(k);
      });
      return grad_dot_thread<T, Acc>(gp, wp, n, c, tid, kThreads);
    });
  }
  const Acc grad_dot_weight = emulate_block<kThreads, Acc>(
      [&](int tid) { return sum_thread(chunk_partials.data(), n_chunks, tid, kThreads); });
  const Acc coef = outer_coefficient(grad_dot_weight, sigma, Acc(0));
  for (int64_t k = 0; k < n; ++k) dp[k] = grad_weight_element<T, Acc>(gp, up, vp, s, k, inv, coef);

  Tensor sigma_out = empty({}, options(w).dtype(acc_dtype(w.scalar_type())));
  sigma_out.mutable_data_ptr<Acc>()[0] = sigma;
  return {visits.counts(), u, v, sigma_out, scaled, grad_w};
}

LaunchCheck cuda_launch_check(const Tensor& weight, const Tensor& u, const Tensor& v,
                              const Tensor& grad, int64_t dim, double eps) {
  const MatrixShape s = check_weight_u_v(weight, u, v, dim);
  check_like(weight, "weight", grad, "grad");
  return GANOPS_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "spectral_norm_launch_check", [&] {
    return launch_check_impl<scalar_t>(as_contiguous(weight), as_contiguous(u), as_contiguous(v), as_contiguous(grad), s,
                                       eps);
  });
}

// Runs the CUDA kernels' per-thread functions for every block and thread of the launches
// the CUDA host code would choose, for one power iteration, the scale and the backward
// with gradient `grad`. Returns (visits [4, numel]: times each element was read by the
// launches of W v, of W^T u, of the scale and of the backward's dot product; u, v, sigma,
// W / sigma, dW).
GANOPS_LAUNCH_CHECK_OP("_spectral_norm_cuda_launch_check", "(Tensor weight, Tensor u, Tensor v, Tensor grad, int dim, "
                       "float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
                       cuda_launch_check)

}  // namespace

}  // namespace ganops::spectral_norm
