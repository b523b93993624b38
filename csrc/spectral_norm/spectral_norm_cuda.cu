// CUDA kernels of spectral normalization.
//
// One power iteration is two matrix-vector products, each a pass over the stored matrix
// (row_dot_kernel, a block per row, or col_partial_kernel, row-chunk partials per column, no
// atomics) and combine_kernel (partials added in chunk order, and each chunk's sum of
// squares), then normalize_kernel (every block adds those sums in one order and scales its
// chunk; block 0 writes sigma = |s|^2 / max(|s|, eps)). A matrix stored transposed swaps the
// two passes (spectral_norm.h). Every sum has a fixed order, so results are deterministic.
// The scale and the backward read sigma and the backward's coefficient from device memory:
// nothing waits on the host.

#include <ganops/checks.h>
#include <ganops/cuda.h>
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
__global__ void __launch_bounds__(kThreads) col_partial_kernel(const T* w, const T* x, MatrixShape s, Acc* partials) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t r = blockIdx.y;
  if (j < s.cols()) partials[r * s.cols() + j] = col_partial_thread<T, Acc>(w, x, s, j, r);
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const Acc* partials, int64_t n_row_chunks, int64_t n, Acc* out, Acc* sum_sq) {
  const Acc ss = block_sum<kThreads>(combine_thread(partials, n_row_chunks, n, out, blockIdx.x, threadIdx.x, kThreads));
  if (threadIdx.x == 0) sum_sq[blockIdx.x] = ss;
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    normalize_kernel(const Acc* x, int64_t n, const Acc* sum_sq, int64_t n_chunks, double eps, T* out, Acc* sigma) {
  const Acc ss = block_sum<kThreads>(sum_thread(sum_sq, n_chunks, threadIdx.x, kThreads));
  normalize_thread(x, n, clamped_norm(ss, eps), out, blockIdx.x, threadIdx.x, kThreads);
  if (sigma != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *sigma = sigma_from_sum_sq(ss, eps);
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

// out = the stored matrix s times x (row dots), and out's chunk sums of squares.
template <typename T, typename Acc>
void row_dots(const T* w, MatrixShape s, const T* x, Acc* out, Acc* sum_sq, cudaStream_t stream) {
  row_dot_kernel<T, Acc><<<s.rows, kThreads, 0, stream>>>(w, x, s, out);
  GANOPS_CUDA_LAUNCH_CHECK();
  combine_kernel<Acc><<<ceil_div(s.rows, kChunkSize), kThreads, 0, stream>>>(out, 1, s.rows, out, sum_sq);
  GANOPS_CUDA_LAUNCH_CHECK();
}

// out = the stored matrix s transposed times x (column sums), and out's chunk sums of squares.
template <typename T, typename Acc>
void col_sums(const T* w, MatrixShape s, const T* x, Acc* partials, Acc* out, Acc* sum_sq, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(s.cols(), kThreads)), static_cast<unsigned>(row_chunks(s.rows)));
  col_partial_kernel<T, Acc><<<grid, kThreads, 0, stream>>>(w, x, s, partials);
  GANOPS_CUDA_LAUNCH_CHECK();
  combine_kernel<Acc><<<ceil_div(s.cols(), kChunkSize), kThreads, 0, stream>>>(partials, row_chunks(s.rows),
                                                                             s.cols(), out, sum_sq);
  GANOPS_CUDA_LAUNCH_CHECK();
}

// out = x / max(|x|, eps) (and *sigma = |x|^2 / max(|x|, eps) unless sigma is null).
template <typename T, typename Acc>
void normalize(const Acc* x, int64_t n, const Acc* sum_sq, double eps, T* out, Acc* sigma, cudaStream_t stream) {
  const int64_t n_chunks = ceil_div(n, kChunkSize);
  normalize_kernel<T, Acc><<<n_chunks, kThreads, 0, stream>>>(x, n, sum_sq, n_chunks, eps, out, sigma);
  GANOPS_CUDA_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> spectral_norm_forward_cuda(
    const Tensor& weight, Tensor& u, Tensor& v, int64_t dim, int64_t n_power_iterations, double eps) {
  ForwardInputs in = forward_inputs(weight, u, v, dim, n_power_iterations);
  const MatrixShape s = in.s;
  const MatrixShape stored = stored_shape(s);
  const bool transposed = stored_transposed(s);
  STD_TORCH_CHECK(row_chunks(stored.rows) <= 65535, "spectral_norm (CUDA): the weight's ",
              transposed ? "column count (numel / size(dim))" : "size(dim)", " must be at most ",
              65535 * kRowsPerChunk, ", got ", stored.rows);
  CudaDeviceGuard guard(weight);
  const cudaStream_t stream = current_stream(weight);
  const auto acc_opts = options(in.w).dtype(acc_dtype(in.w.scalar_type()));
  Tensor sigma = empty({}, acc_opts);
  // t = W v and s = W^T u, their chunk sums of squares, and the column partials.
  Tensor t = empty({s.rows}, acc_opts);
  Tensor t_sum_sq = empty({ceil_div(s.rows, kChunkSize)}, acc_opts);
  Tensor c = empty({n_power_iterations > 0 ? s.cols() : 0}, acc_opts);
  Tensor c_sum_sq = empty({ceil_div(s.cols(), kChunkSize)}, acc_opts);
  // Column sums run in every iteration, and in eval mode for a matrix stored transposed.
  const bool sums_columns = n_power_iterations > 0 || transposed;
  Tensor partials = empty({sums_columns ? row_chunks(stored.rows) * stored.cols() : 0}, acc_opts);
  Tensor out = empty(in.w.sizes(), in.w);
  GANOPS_DISPATCH_FLOATING_TYPES(in.w.scalar_type(), "spectral_norm_forward_cuda", [&] {
    using T = scalar_t;
    using Acc = acc_t<T>;
    const T* wp = in.w.const_data_ptr<T>();
    T* up = in.u.mutable_data_ptr<T>();
    T* vp = in.v.mutable_data_ptr<T>();
    Acc* tp = t.mutable_data_ptr<Acc>();
    Acc* cp = c.mutable_data_ptr<Acc>();
    Acc* sp = sigma.mutable_data_ptr<Acc>();
    Acc* pp = partials.mutable_data_ptr<Acc>();
    Acc* t_ss = t_sum_sq.mutable_data_ptr<Acc>();
    Acc* c_ss = c_sum_sq.mutable_data_ptr<Acc>();
    // W v and W^T u, each read in the stored matrix's own memory order.
    auto mat_vec = [&](const T* x) {
      if (transposed) {
        col_sums<T, Acc>(wp, stored, x, pp, tp, t_ss, stream);
      } else {
        row_dots<T, Acc>(wp, s, x, tp, t_ss, stream);
      }
    };
    auto mat_t_vec = [&](const T* x) {
      if (transposed) {
        row_dots<T, Acc>(wp, stored, x, cp, c_ss, stream);
      } else {
        col_sums<T, Acc>(wp, s, x, pp, cp, c_ss, stream);
      }
    };
    if (n_power_iterations == 0) {
      mat_vec(vp);
      eval_sigma_kernel<T, Acc><<<1, kThreads, 0, stream>>>(up, tp, s.rows, sp);
      GANOPS_CUDA_LAUNCH_CHECK();
    }
    for (int64_t it = 0; it < n_power_iterations; ++it) {
      mat_vec(vp);
      normalize<T, Acc>(tp, s.rows, t_ss, eps, up, nullptr, stream);
      mat_t_vec(up);
      normalize<T, Acc>(cp, s.cols(), c_ss, eps, vp, sp, stream);
    }
    scale_kernel<T, Acc><<<ceil_div(s.numel(), kChunkSize), kThreads, 0, stream>>>(wp, s.numel(), sp,
                                                                                 out.mutable_data_ptr<T>());
    GANOPS_CUDA_LAUNCH_CHECK();
  });
  return forward_result(u, in.u, v, in.v, out, sigma);
}
GANOPS_KERNEL(CUDA, "spectral_norm_forward_", spectral_norm_forward_cuda)

Tensor spectral_norm_backward_cuda(const Tensor& grad, const std::optional<Tensor>& grad_sigma,
                                             const Tensor& weight, const Tensor& u, const Tensor& v,
                                             const Tensor& sigma, int64_t dim) {
  const BackwardInputs in = backward_inputs(grad, grad_sigma, weight, u, v, sigma, dim);
  const MatrixShape s = in.s;
  CudaDeviceGuard guard(weight);
  const cudaStream_t stream = current_stream(weight);
  Tensor out = empty(in.w.sizes(), in.w);
  const int64_t n = in.w.numel();
  const int64_t n_chunks = ceil_div(n, kChunkSize);
  const auto acc_opts = options(in.w).dtype(acc_dtype(in.w.scalar_type()));
  Tensor partials = empty({n_chunks + 1}, acc_opts);
  GANOPS_DISPATCH_FLOATING_TYPES(in.w.scalar_type(), "spectral_norm_backward_cuda", [&] {
    using T = scalar_t;
    using Acc = acc_t<T>;
    Acc* pp = partials.mutable_data_ptr<Acc>();
    Acc* coef = pp + n_chunks;
    grad_dot_kernel<T, Acc><<<n_chunks, kThreads, 0, stream>>>(in.g.const_data_ptr<T>(), in.w.const_data_ptr<T>(), n,
                                                                pp);
    GANOPS_CUDA_LAUNCH_CHECK();
    grad_finish_kernel<Acc><<<1, kThreads, 0, stream>>>(
        pp, n_chunks, sigma.const_data_ptr<Acc>(), in.has_grad_sigma ? grad_sigma->const_data_ptr<Acc>() : nullptr,
        coef);
    GANOPS_CUDA_LAUNCH_CHECK();
    auto launch = [&](auto index_type) {
      using Index = decltype(index_type);
      grad_weight_kernel<T, Acc, Index><<<n_chunks, kThreads, 0, stream>>>(
          in.g.const_data_ptr<T>(), in.u.const_data_ptr<T>(), in.v.const_data_ptr<T>(), s,
          sigma.const_data_ptr<Acc>(), coef, out.mutable_data_ptr<T>());
    };
    if (n <= int64_t(UINT32_MAX)) {
      launch(uint32_t{});
    } else {
      launch(int64_t{});
    }
    GANOPS_CUDA_LAUNCH_CHECK();
  });
  return out;
}
GANOPS_KERNEL(CUDA, "spectral_norm_backward", spectral_norm_backward_cuda)

}  // namespace

}  // namespace ganops::spectral_norm
