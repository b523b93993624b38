// CUDA kernels of the minibatch-discrimination similarity.
//
// One launch per pass, one thread per (i, b) row (minibatch_discrimination.h): the thread
// loops over every j, reduces over c in registers and accumulates only its own output row,
// so the sums are deterministic and nothing of size N×N is ever stored. The backward passes
// accumulate their C-vectors in a zeroed buffer of the accumulation type (float for half
// types), cast to M's dtype at the end. Indices are 64-bit.

#include <ganops/checks.h>
#include <ganops/cuda.h>
#include <ganops/dispatch.h>
#include <ganops/grid.h>
#include <ganops/registration.h>

#include "minibatch_discrimination/minibatch_discrimination.h"

namespace ganops::minibatch_discrimination {
namespace {

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    similarity_kernel(const T* M, int64_t N, int64_t B, int64_t C, bool exclude_self, T* out) {
  const RowIndex r = thread_row(blockIdx.x, threadIdx.x, N, B);
  if (!r.valid) return;
  out[r.i * B + r.b] = static_cast<T>(similarity_row<T, Acc>(M, N, B, C, r.i, r.b, exclude_self));
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    similarity_backward_kernel(const T* grad, const T* M, int64_t N, int64_t B, int64_t C, Acc* dM) {
  const RowIndex r = thread_row(blockIdx.x, threadIdx.x, N, B);
  if (!r.valid) return;
  similarity_backward_row<T, Acc>(grad, M, N, B, C, r.i, r.b, dM + (r.i * B + r.b) * C);
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    similarity_double_backward_kernel(const T* h, const T* grad, const T* M, int64_t N, int64_t B, int64_t C,
                                      T* d_grad, Acc* d_M) {
  const RowIndex r = thread_row(blockIdx.x, threadIdx.x, N, B);
  if (!r.valid) return;
  const int64_t row = r.i * B + r.b;
  d_grad[row] = static_cast<T>(similarity_double_backward_row<T, Acc>(h, grad, M, N, B, C, r.i, r.b, d_M + row * C));
}

Tensor minibatch_discrimination_cuda(const Tensor& M_in, bool exclude_self) {
  check_M(M_in, DeviceType::CUDA);
  const int64_t N = M_in.size(0), B = M_in.size(1), C = M_in.size(2);
  const unsigned int blocks = grid_x(num_blocks(N, B), "minibatch_discrimination");
  CudaDeviceGuard guard(M_in);
  const Tensor M = as_contiguous(M_in);
  Tensor out = empty({N, B}, options(M));
  if (N * B == 0) return out;
  GANOPS_DISPATCH_FLOATING_TYPES(M.scalar_type(), "minibatch_discrimination_cuda", [&] {
    similarity_kernel<scalar_t, acc_t<scalar_t>><<<blocks, kThreads, 0, current_stream(M_in)>>>(
        M.const_data_ptr<scalar_t>(), N, B, C, exclude_self, out.mutable_data_ptr<scalar_t>());
    GANOPS_CUDA_LAUNCH_CHECK();
  });
  return out;
}
GANOPS_KERNEL(CUDA, "minibatch_discrimination", minibatch_discrimination_cuda)

Tensor minibatch_discrimination_backward_cuda(const Tensor& grad_in, const Tensor& M_in) {
  check_M(M_in, DeviceType::CUDA);
  check_like(grad_in, "grad", M_in, {M_in.size(0), M_in.size(1)});
  const int64_t N = M_in.size(0), B = M_in.size(1), C = M_in.size(2);
  const unsigned int blocks = grid_x(num_blocks(N, B), "minibatch_discrimination_backward");
  CudaDeviceGuard guard(M_in);
  const Tensor M = as_contiguous(M_in), grad = as_contiguous(grad_in);
  Tensor out;
  GANOPS_DISPATCH_FLOATING_TYPES(M.scalar_type(), "minibatch_discrimination_backward_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    Tensor dM = zeros({N, B, C}, options(M).dtype(acc_dtype(M.scalar_type())));
    if (N * B > 0) {
      similarity_backward_kernel<scalar_t, Acc><<<blocks, kThreads, 0, current_stream(M_in)>>>(
          grad.const_data_ptr<scalar_t>(), M.const_data_ptr<scalar_t>(), N, B, C, dM.mutable_data_ptr<Acc>());
      GANOPS_CUDA_LAUNCH_CHECK();
    }
    out = to_dtype(dM, M.scalar_type());
  });
  return out;
}
GANOPS_KERNEL(CUDA, "minibatch_discrimination_backward", minibatch_discrimination_backward_cuda)

std::tuple<Tensor, Tensor> minibatch_discrimination_double_backward_cuda(const Tensor& h_in, const Tensor& grad_in,
                                                                   const Tensor& M_in) {
  check_M(M_in, DeviceType::CUDA);
  check_like(grad_in, "grad", M_in, {M_in.size(0), M_in.size(1)});
  check_like(h_in, "grad_grad_M", M_in, M_in.sizes());
  const int64_t N = M_in.size(0), B = M_in.size(1), C = M_in.size(2);
  const unsigned int blocks = grid_x(num_blocks(N, B), "minibatch_discrimination_double_backward");
  CudaDeviceGuard guard(M_in);
  const Tensor M = as_contiguous(M_in), grad = as_contiguous(grad_in), h = as_contiguous(h_in);
  Tensor d_grad = empty({N, B}, options(M));
  Tensor d_M;
  GANOPS_DISPATCH_FLOATING_TYPES(M.scalar_type(), "minibatch_discrimination_double_backward_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    Tensor acc = zeros({N, B, C}, options(M).dtype(acc_dtype(M.scalar_type())));
    if (N * B > 0) {
      similarity_double_backward_kernel<scalar_t, Acc>
          <<<blocks, kThreads, 0, current_stream(M_in)>>>(
              h.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), M.const_data_ptr<scalar_t>(), N, B, C,
              d_grad.mutable_data_ptr<scalar_t>(), acc.mutable_data_ptr<Acc>());
      GANOPS_CUDA_LAUNCH_CHECK();
    }
    d_M = to_dtype(acc, M.scalar_type());
  });
  return {d_grad, d_M};
}
GANOPS_KERNEL(CUDA, "minibatch_discrimination_double_backward", minibatch_discrimination_double_backward_cuda)

}  // namespace

}  // namespace ganops::minibatch_discrimination
