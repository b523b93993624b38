// The CUDA launches of spectral_norm_cuda.cu run on the CPU, block by block and thread by
// thread (ganops/launch_emulation.h), for one power iteration, the scale and the backward: a
// test op for CPU tensors.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <ganops/dispatch.h>
#include <ganops/launch_emulation.h>

#include <tuple>
#include <vector>

#include "spectral_norm/spectral_norm.h"

namespace ganops::spectral_norm {
namespace {

using LaunchCheck = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename T>
LaunchCheck launch_check_impl(const at::Tensor& w, const at::Tensor& u_in, const at::Tensor& v_in,
                              const at::Tensor& g, MatrixShape s, double eps) {
  using Acc = acc_t<T>;
  const int64_t n = s.numel();
  const int64_t cols = s.cols();
  const Coverage visits({4, n});
  const Coverage row_visits = visits, col_visits = visits.from(n), scale_visits = visits.from(2 * n),
                 dot_visits = visits.from(3 * n);
  at::Tensor u = u_in.clone();
  at::Tensor v = v_in.clone();
  const T* wp = w.const_data_ptr<T>();
  const T* gp = g.const_data_ptr<T>();
  T* up = u.data_ptr<T>();
  T* vp = v.data_ptr<T>();

  // row_dot_kernel: block i per row; then normalize_rows_kernel, one block.
  std::vector<Acc> t(s.rows);
  for (int64_t i = 0; i < s.rows; ++i) {
    t[i] = emulate_block<kThreads, Acc>([&](int tid) {
      for_each_row_element(s, tid, kThreads, [&](int64_t j) { row_visits.visit(s.offset(i, j)); });
      return row_dot_thread<T, Acc>(wp, vp, s, i, tid, kThreads);
    });
  }
  const Acc u_denom = clamped_norm(
      emulate_block<kThreads, Acc>([&](int tid) { return sum_sq_thread(t.data(), s.rows, tid, kThreads); }), eps);
  for (int64_t i = 0; i < s.rows; ++i) up[i] = static_cast<T>(t[i] / u_denom);

  // col_partial_kernel over (column block, row chunk), one partial per thread; then
  // finish_cols_kernel, one block.
  const int64_t n_row_chunks = row_chunks(s.rows);
  std::vector<Acc> partials(n_row_chunks * cols);
  for (int64_t bx = 0; bx < ceil_div(cols, kThreads); ++bx) {
    for (int64_t r = 0; r < n_row_chunks; ++r) {
      for (int tid = 0; tid < kThreads; ++tid) {
        const int64_t j = bx * kThreads + tid;
        if (j >= cols) continue;
        partials[r * cols + j] = col_partial_thread<T, Acc>(wp, up, s, j, r);
        for_each_chunk_row(s, r, [&](int64_t i) { col_visits.visit(s.offset(i, j)); });
      }
    }
  }
  const Acc ss = emulate_block<kThreads, Acc>([&](int tid) {
    for (int64_t j = tid; j < cols; j += kThreads) {
      partials[j] = combine_col_partials(partials.data(), cols, n_row_chunks, j);
    }
    return sum_sq_thread(partials.data(), cols, tid, kThreads);
  });
  const Acc v_denom = clamped_norm(ss, eps);
  for (int64_t j = 0; j < cols; ++j) vp[j] = static_cast<T>(partials[j] / v_denom);
  const Acc sigma = sigma_from_sum_sq(ss, eps);

  // scale_kernel and the backward's grad_dot_kernel, a chunk per block; grad_finish_kernel,
  // one block; grad_weight_kernel.
  const int64_t n_chunks = ceil_div(n, kChunkSize);
  at::Tensor scaled = at::empty_like(w);
  at::Tensor grad_w = at::empty_like(w);
  T* sp = scaled.data_ptr<T>();
  T* dp = grad_w.data_ptr<T>();
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

  at::Tensor sigma_out = at::empty({}, w.options().dtype(acc_dtype(w.scalar_type())));
  sigma_out.data_ptr<Acc>()[0] = sigma;
  return {visits.counts(), u, v, sigma_out, scaled, grad_w};
}

LaunchCheck cuda_launch_check(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                              const at::Tensor& grad, int64_t dim, double eps) {
  const MatrixShape s = check_weight_u_v(weight, u, v, dim);
  check_like(weight, "weight", grad, "grad");
  return GANOPS_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "spectral_norm_launch_check", [&] {
    return launch_check_impl<scalar_t>(weight.contiguous(), u.contiguous(), v.contiguous(), grad.contiguous(), s,
                                       eps);
  });
}

// Runs the CUDA kernels' per-thread functions for every block and thread of the launches
// the CUDA host code would choose, for one power iteration, the scale and the backward
// with gradient `grad`. Returns (visits [4, numel]: times each element was read by the
// row-dot, column-partial, scale and backward-dot launches; u, v, sigma, W / sigma, dW).
GANOPS_LAUNCH_CHECK_OP("_spectral_norm_cuda_launch_check(Tensor weight, Tensor u, Tensor v, Tensor grad, int dim, "
                       "float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
                       cuda_launch_check)

}  // namespace

}  // namespace ganops::spectral_norm
