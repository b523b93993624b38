// CUDA kernels of scaled-dot-product attention, to second order.
//
// A block of kThreads per query row (row-side) or key row (column-side), the block programs of
// scaled_dot_product_attention.h: forward = lse_kernel then out_kernel (row-side); backward =
// row_delta_kernel (D), backward_query_kernel (dQ, row-side), backward_key_kernel (dK, dV,
// column-side); double backward = row_stats_kernel (D, gD, R), double_backward_query_kernel
// (grad of dO and Q, row-side), double_backward_key_kernel (grad of K and V, column-side).
// Accumulation in registers and shared memory in float (double for double); each output
// element has one writer. Every intermediate stays in device memory: no host
// synchronisation, and a launch sequence a CUDA graph can capture.

#include <ganops/checks.h>
#include <ganops/cuda.h>
#include <ganops/dispatch.h>
#include <ganops/registration.h>

#include <limits>
#include <tuple>

#include "scaled_dot_product_attention/scaled_dot_product_attention.h"

namespace ganops::scaled_dot_product_attention {
namespace {

// The block programs' Block on the GPU: each thread runs its own part of a phase, then the
// block synchronises. (Host and device, as the block programs are; it only runs on the device.)
struct DeviceBlock {
  template <typename F>
  __host__ __device__ void run(F&& f) const {
#if defined(__CUDA_ARCH__)
    f(static_cast<int>(threadIdx.x));
    __syncthreads();
#endif
  }
};

struct NoVisit {
  __host__ __device__ void operator()(int64_t) const {}
};

template <typename T>
using Ops = Operands<T, acc_t<T>>;

template <typename T>
__global__ void __launch_bounds__(kThreads) lse_kernel(Ops<T> o, acc_t<T>* lse) {
  __shared__ SharedTile<acc_t<T>> shared;
  forward_lse_block(DeviceBlock{}, shared, o, blockIdx.x, lse, NoVisit{});
}

template <typename T>
__global__ void __launch_bounds__(kThreads) out_kernel(Ops<T> o, T* out) {
  __shared__ SharedTile<acc_t<T>> shared;
  forward_out_block(DeviceBlock{}, shared, o, blockIdx.x, out, NoVisit{});
}

template <typename T>
__global__ void __launch_bounds__(kThreads) row_delta_kernel(Ops<T> o, acc_t<T>* delta) {
  __shared__ SharedTile<acc_t<T>> shared;
  row_delta_block(DeviceBlock{}, shared, o, blockIdx.x, delta, NoVisit{});
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_query_kernel(Ops<T> o, const acc_t<T>* delta, T* grad_q) {
  __shared__ SharedTile<acc_t<T>> shared;
  backward_query_block(DeviceBlock{}, shared, o, delta, blockIdx.x, grad_q, NoVisit{});
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_key_kernel(Ops<T> o, const acc_t<T>* delta, T* grad_k, T* grad_v) {
  __shared__ SharedTile<acc_t<T>> shared;
  backward_key_block(DeviceBlock{}, shared, o, delta, blockIdx.x, grad_k, grad_v, NoVisit{}, NoVisit{});
}

template <typename T>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(Ops<T> o, acc_t<T>* stats) {
  __shared__ SharedTile<acc_t<T>> shared;
  row_stats_block(DeviceBlock{}, shared, o, blockIdx.x, stats, NoVisit{});
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    double_backward_query_kernel(Ops<T> o, const acc_t<T>* stats, T* grad_grad_out, T* grad_q) {
  __shared__ SharedTile<acc_t<T>> shared;
  double_backward_query_block(DeviceBlock{}, shared, o, stats, blockIdx.x, grad_grad_out, grad_q, NoVisit{},
                              NoVisit{});
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    double_backward_key_kernel(Ops<T> o, const acc_t<T>* stats, T* grad_k, T* grad_v) {
  __shared__ SharedTile<acc_t<T>> shared;
  double_backward_key_block(DeviceBlock{}, shared, o, stats, blockIdx.x, grad_k, grad_v, NoVisit{}, NoVisit{});
}

// A 1-D grid of `blocks` rows (B · L query rows or B · S key rows).
unsigned int grid(int64_t blocks, const char* what) {
  STD_TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "scaled_dot_product_attention: ", what, " = ", blocks,
              " exceeds the CUDA grid's 2^31 - 1 blocks");
  return static_cast<unsigned int>(blocks);
}

std::tuple<Tensor, Tensor> scaled_dot_product_attention_cuda(const Tensor& query, const Tensor& key,
                                                                      const Tensor& value, double scale,
                                                                      bool is_causal) {
  const Sizes n = check_inputs(query, key, value, is_causal, DeviceType::CUDA);
  CudaDeviceGuard guard(query);
  const Tensor q = as_contiguous(query), k = as_contiguous(key), v = as_contiguous(value);
  Tensor out = empty({n.B, n.L, n.Ev}, options(q));
  Tensor lse = empty({n.B, n.L}, options(q).dtype(acc_dtype(q.scalar_type())));
  if (n.B * n.L == 0) return {out, lse};
  const unsigned int rows = grid(n.B * n.L, "B * L");
  const cudaStream_t stream = current_stream(query);
  GANOPS_DISPATCH_FLOATING_TYPES(q.scalar_type(), "scaled_dot_product_attention_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    Ops<scalar_t> o = make_operands<scalar_t>(n, scale, q, k, v);
    lse_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(o, lse.mutable_data_ptr<Acc>());
    GANOPS_CUDA_LAUNCH_CHECK();
    o.lse = lse.const_data_ptr<Acc>();
    out_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(o, out.mutable_data_ptr<scalar_t>());
    GANOPS_CUDA_LAUNCH_CHECK();
  });
  return {out, lse};
}
GANOPS_KERNEL(CUDA, "scaled_dot_product_attention", scaled_dot_product_attention_cuda)

std::tuple<Tensor, Tensor, Tensor> scaled_dot_product_attention_backward_cuda(
    const Tensor& grad_out, const Tensor& query, const Tensor& key, const Tensor& value,
    const Tensor& out, const Tensor& logsumexp, double scale, bool is_causal) {
  const Sizes n = check_inputs(query, key, value, is_causal, DeviceType::CUDA);
  check_saved(grad_out, out, logsumexp, query, n);
  CudaDeviceGuard guard(query);
  const Tensor q = as_contiguous(query), k = as_contiguous(key), v = as_contiguous(value);
  const Tensor go = as_contiguous(grad_out), o_saved = as_contiguous(out), lse = as_contiguous(logsumexp);
  Tensor grad_q = empty(q.sizes(), q), grad_k = empty(k.sizes(), k), grad_v = empty(v.sizes(), v);
  // No query row: nothing flows to the keys (the column-side kernel would write these zeros).
  if (n.B * n.L == 0) return {grad_q, ganops::zero_(grad_k), ganops::zero_(grad_v)};
  Tensor delta = empty({n.B, n.L}, options(lse));
  const cudaStream_t stream = current_stream(query);
  GANOPS_DISPATCH_FLOATING_TYPES(q.scalar_type(), "scaled_dot_product_attention_backward_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    const Ops<scalar_t> o = make_operands<scalar_t>(n, scale, q, k, v, go, o_saved, lse);
    const unsigned int rows = grid(n.B * n.L, "B * L");
    row_delta_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(o, delta.mutable_data_ptr<Acc>());
    GANOPS_CUDA_LAUNCH_CHECK();
    backward_query_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(o, delta.const_data_ptr<Acc>(),
                                                                    grad_q.mutable_data_ptr<scalar_t>());
    GANOPS_CUDA_LAUNCH_CHECK();
    if (n.S > 0) {
      backward_key_kernel<scalar_t><<<grid(n.B * n.S, "B * S"), kThreads, 0, stream>>>(
          o, delta.const_data_ptr<Acc>(), grad_k.mutable_data_ptr<scalar_t>(), grad_v.mutable_data_ptr<scalar_t>());
      GANOPS_CUDA_LAUNCH_CHECK();
    }
  });
  return {grad_q, grad_k, grad_v};
}
GANOPS_KERNEL(CUDA, "scaled_dot_product_attention_backward", scaled_dot_product_attention_backward_cuda)

std::tuple<Tensor, Tensor, Tensor, Tensor> scaled_dot_product_attention_double_backward_cuda(
    const std::optional<Tensor>& grad_grad_query, const std::optional<Tensor>& grad_grad_key,
    const std::optional<Tensor>& grad_grad_value, const Tensor& grad_out, const Tensor& query,
    const Tensor& key, const Tensor& value, const Tensor& out, const Tensor& logsumexp, double scale,
    bool is_causal) {
  const Sizes n = check_inputs(query, key, value, is_causal, DeviceType::CUDA);
  check_saved(grad_out, out, logsumexp, query, n);
  const std::array<Tensor, 3> cotangents =
      check_cotangents(grad_grad_query, grad_grad_key, grad_grad_value, query, n);
  CudaDeviceGuard guard(query);
  const Tensor q = as_contiguous(query), k = as_contiguous(key), v = as_contiguous(value);
  const Tensor go = as_contiguous(grad_out), o_saved = as_contiguous(out), lse = as_contiguous(logsumexp);
  Tensor grad_grad_out = empty(go.sizes(), go);
  Tensor grad_q = empty(q.sizes(), q), grad_k = empty(k.sizes(), k), grad_v = empty(v.sizes(), v);
  if (n.B * n.L == 0) return {grad_grad_out, grad_q, ganops::zero_(grad_k), ganops::zero_(grad_v)};
  Tensor stats = empty({3, n.B, n.L}, options(lse));
  const cudaStream_t stream = current_stream(query);
  GANOPS_DISPATCH_FLOATING_TYPES(q.scalar_type(), "scaled_dot_product_attention_double_backward_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    const Ops<scalar_t> o = make_operands<scalar_t>(n, scale, q, k, v, go, o_saved, lse, cotangents);
    const unsigned int rows = grid(n.B * n.L, "B * L");
    row_stats_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(o, stats.mutable_data_ptr<Acc>());
    GANOPS_CUDA_LAUNCH_CHECK();
    double_backward_query_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(
        o, stats.const_data_ptr<Acc>(), grad_grad_out.mutable_data_ptr<scalar_t>(), grad_q.mutable_data_ptr<scalar_t>());
    GANOPS_CUDA_LAUNCH_CHECK();
    if (n.S > 0) {
      double_backward_key_kernel<scalar_t><<<grid(n.B * n.S, "B * S"), kThreads, 0, stream>>>(
          o, stats.const_data_ptr<Acc>(), grad_k.mutable_data_ptr<scalar_t>(), grad_v.mutable_data_ptr<scalar_t>());
      GANOPS_CUDA_LAUNCH_CHECK();
    }
  });
  return {grad_grad_out, grad_q, grad_k, grad_v};
}
GANOPS_KERNEL(CUDA, "scaled_dot_product_attention_double_backward", scaled_dot_product_attention_double_backward_cuda)

}  // namespace

}  // namespace ganops::scaled_dot_product_attention
