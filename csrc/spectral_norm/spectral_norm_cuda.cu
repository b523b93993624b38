// CUDA kernels of spectral normalization.
//
// One power iteration is four launches: row_dot_kernel (t = W v, a block per row),
// normalize_rows_kernel (one block: u = t / max(|t|, eps)), col_partial_kernel (W^T u as
// row-chunk partials per column, no atomics) and finish_cols_kernel (one block: combine the
// partials in chunk order, v = s / max(|s|, eps), sigma = |s|^2 / max(|s|, eps)). Every sum
// has a fixed order, so results are deterministic. The scale and the backward read sigma
// and the backward's coefficient from device memory: nothing waits on the host.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <ganops/checks.h>
#include <ganops/dispatch.h>
#include <ganops/registration.h>

#include "spectral_norm/spectral_norm.h"

namespace ganops::spectral_norm {
namespace {

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) row_dot_kernel(const T* w, const T* x, MatrixShape s, Acc* t) {
  const int64_t i = blockIdx.x;
  const Acc sum = block_sum<kThreads>(row_dot_thread<T, Acc>(w, x, s, i, threadIdx.x, kThreads));
  if (threadIdx.x == 0) t[i] = sum;
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) normalize_rows_kernel(const Acc* t, int64_t rows, double eps, T* u) {
  const Acc denom = clamped_norm(block_sum<kThreads>(sum_sq_thread(t, rows, threadIdx.x, kThreads)), eps);
  for (int64_t i = threadIdx.x; i < rows; i += kThreads) u[i] = static_cast<T>(t[i] / denom);
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) col_partial_kernel(const T* w, const T* x, MatrixShape s, Acc* partials) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t r = blockIdx.y;
  if (j < s.cols()) partials[r * s.cols() + j] = col_partial_thread<T, Acc>(w, x, s, j, r);
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    finish_cols_kernel(Acc* partials, int64_t cols, int64_t n_row_chunks, double eps, T* v, Acc* sigma) {
  // Thread tid owns columns tid, tid + kThreads, ...: it reads their partials before it
  // overwrites row 0 with the combined value, so no other thread's data is touched.
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    partials[j] = combine_col_partials(partials, cols, n_row_chunks, j);
  }
  const Acc ss = block_sum<kThreads>(sum_sq_thread(partials, cols, threadIdx.x, kThreads));
  const Acc denom = clamped_norm(ss, eps);
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) v[j] = static_cast<T>(partials[j] / denom);
  if (threadIdx.x == 0) *sigma = sigma_from_sum_sq(ss, eps);
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) eval_sigma_kernel(const T* u, const Acc* t, int64_t rows, Acc* sigma) {
  const Acc dot = block_sum<kThreads>(dot_thread(u, t, rows, threadIdx.x, kThreads));
  if (threadIdx.x == 0) *sigma = dot;
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) scale_kernel(const T* w, int64_t numel, const Acc* sigma, T* out) {
  const Acc inv = Acc(1) / *sigma;
  for_each_chunk_element(numel, blockIdx.x, threadIdx.x, kThreads,
                         [&](int64_t k) { out[k] = static_cast<T>(Acc(w[k]) * inv); });
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) grad_dot_kernel(const T* g, const T* w, int64_t numel, Acc* partials) {
  const Acc sum = block_sum<kThreads>(grad_dot_thread<T, Acc>(g, w, numel, blockIdx.x, threadIdx.x, kThreads));
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    grad_finish_kernel(const Acc* partials, int64_t n_chunks, const Acc* sigma, const Acc* grad_sigma, Acc* coef) {
  const Acc dot = block_sum<kThreads>(sum_thread(partials, n_chunks, threadIdx.x, kThreads));
  if (threadIdx.x == 0) *coef = outer_coefficient(dot, *sigma, grad_sigma != nullptr ? *grad_sigma : Acc(0));
}

// Index is uint32_t below 2^32 elements; the int64_t instantiation (larger weights only)
// keeps 8 bytes on the stack at sm_80 around the 64-bit division call (tests/test_cuda_build.py).
template <typename T, typename Acc, typename Index>
__global__ void __launch_bounds__(kThreads)
    grad_weight_kernel(const T* g, const T* u, const T* v, MatrixShape s, const Acc* sigma, const Acc* coef, T* out) {
  const Acc inv = Acc(1) / *sigma;
  const Acc c = *coef;
  for_each_chunk_element(s.numel(), blockIdx.x, threadIdx.x, kThreads,
                         [&](int64_t k) { out[k] = grad_weight_element<T, Acc, Index>(g, u, v, s, k, inv, c); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_norm_forward_cuda(
    const at::Tensor& weight, at::Tensor& u, at::Tensor& v, int64_t dim, int64_t n_power_iterations, double eps) {
  ForwardInputs in = forward_inputs(weight, u, v, dim, n_power_iterations);
  const MatrixShape s = in.s;
  TORCH_CHECK(row_chunks(s.rows) <= 65535, "spectral_norm (CUDA): size(dim) must be at most ",
              65535 * kRowsPerChunk, ", got ", s.rows);
  c10::cuda::CUDAGuard guard(weight.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto acc_opts = in.w.options().dtype(acc_dtype(in.w.scalar_type()));
  at::Tensor sigma = at::empty({}, acc_opts);
  at::Tensor t = at::empty({s.rows}, acc_opts);
  at::Tensor out = at::empty_like(in.w);
  GANOPS_DISPATCH_FLOATING_TYPES(in.w.scalar_type(), "spectral_norm_forward_cuda", [&] {
    using T = scalar_t;
    using Acc = acc_t<T>;
    const T* wp = in.w.const_data_ptr<T>();
    T* up = in.u.data_ptr<T>();
    T* vp = in.v.data_ptr<T>();
    Acc* tp = t.data_ptr<Acc>();
    Acc* sp = sigma.data_ptr<Acc>();
    if (n_power_iterations == 0) {
      row_dot_kernel<T, Acc><<<s.rows, kThreads, 0, stream>>>(wp, vp, s, tp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      eval_sigma_kernel<T, Acc><<<1, kThreads, 0, stream>>>(up, tp, s.rows, sp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t n_row_chunks = row_chunks(s.rows);
    at::Tensor partials = at::empty({n_power_iterations > 0 ? n_row_chunks * s.cols() : 0}, acc_opts);
    Acc* pp = partials.data_ptr<Acc>();
    const dim3 col_grid(static_cast<unsigned>(ceil_div(s.cols(), kThreads)), static_cast<unsigned>(n_row_chunks));
    for (int64_t it = 0; it < n_power_iterations; ++it) {
      row_dot_kernel<T, Acc><<<s.rows, kThreads, 0, stream>>>(wp, vp, s, tp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      normalize_rows_kernel<T, Acc><<<1, kThreads, 0, stream>>>(tp, s.rows, eps, up);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      col_partial_kernel<T, Acc><<<col_grid, kThreads, 0, stream>>>(wp, up, s, pp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      finish_cols_kernel<T, Acc><<<1, kThreads, 0, stream>>>(pp, s.cols(), n_row_chunks, eps, vp, sp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    scale_kernel<T, Acc><<<ceil_div(s.numel(), kChunkSize), kThreads, 0, stream>>>(wp, s.numel(), sp,
                                                                                 out.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return forward_result(u, in.u, v, in.v, out, sigma);
}
GANOPS_KERNEL(CUDA, "spectral_norm_forward_", spectral_norm_forward_cuda)

at::Tensor spectral_norm_backward_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& grad_sigma,
                                             const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                             const at::Tensor& sigma, int64_t dim) {
  const BackwardInputs in = backward_inputs(grad, grad_sigma, weight, u, v, sigma, dim);
  const MatrixShape s = in.s;
  c10::cuda::CUDAGuard guard(weight.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty_like(in.w);
  const int64_t n = in.w.numel();
  const int64_t n_chunks = ceil_div(n, kChunkSize);
  const auto acc_opts = in.w.options().dtype(acc_dtype(in.w.scalar_type()));
  at::Tensor partials = at::empty({n_chunks + 1}, acc_opts);
  GANOPS_DISPATCH_FLOATING_TYPES(in.w.scalar_type(), "spectral_norm_backward_cuda", [&] {
    using T = scalar_t;
    using Acc = acc_t<T>;
    Acc* pp = partials.data_ptr<Acc>();
    Acc* coef = pp + n_chunks;
    grad_dot_kernel<T, Acc><<<n_chunks, kThreads, 0, stream>>>(in.g.const_data_ptr<T>(), in.w.const_data_ptr<T>(), n,
                                                                pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_finish_kernel<Acc><<<1, kThreads, 0, stream>>>(
        pp, n_chunks, sigma.const_data_ptr<Acc>(), in.has_grad_sigma ? grad_sigma->const_data_ptr<Acc>() : nullptr,
        coef);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto launch = [&](auto index_type) {
      using Index = decltype(index_type);
      grad_weight_kernel<T, Acc, Index><<<n_chunks, kThreads, 0, stream>>>(
          in.g.const_data_ptr<T>(), in.u.const_data_ptr<T>(), in.v.const_data_ptr<T>(), s,
          sigma.const_data_ptr<Acc>(), coef, out.data_ptr<T>());
    };
    if (n <= int64_t(UINT32_MAX)) {
      launch(uint32_t{});
    } else {
      launch(int64_t{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}
GANOPS_KERNEL(CUDA, "spectral_norm_backward", spectral_norm_backward_cuda)

}  // namespace

}  // namespace ganops::spectral_norm
