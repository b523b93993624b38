// CUDA kernels of the gradient penalty's fused pieces.
//
// One block per (sample, chunk) of gradient_penalty.h, numbered b = sample * n_chunks + chunk
// on a 1-D grid (a 2-D grid would cap the batch at 65535). Reductions write one partial per
// block and a finishing kernel combines each sample's partials in chunk order: deterministic,
// and the penalty, its backward factor and the inverse loss scale stay in device memory, so
// nothing waits on the host.

#include <ganops/checks.h>
#include <ganops/cuda.h>
#include <ganops/dispatch.h>
#include <ganops/grid.h>
#include <ganops/registration.h>

#include "gradient_penalty/gradient_penalty.h"

namespace ganops::gradient_penalty {
namespace {

// The block's piece of the (sample, chunk) split: its sample, first element and length.
struct BlockChunk {
  int64_t sample;
  int64_t offset;
  int64_t length;
};

__device__ BlockChunk block_chunk(const SampleChunks& s) {
  const int64_t b = blockIdx.x;
  return {s.sample(b), s.offset(b), s.length(b)};
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    interpolate_kernel(const T* real, const T* fake, const T* alpha, T* out, SampleChunks s) {
  using Acc = acc_t<T>;
  const BlockChunk bc = block_chunk(s);
  const Acc w = static_cast<Acc>(alpha[bc.sample]);
  for_each_thread_element(bc.length, threadIdx.x, kThreads, [&](int64_t j) {
    const int64_t e = bc.offset + j;
    out[e] = static_cast<T>(interpolate_value(static_cast<Acc>(real[e]), static_cast<Acc>(fake[e]), w));
  });
}

// grad_real / grad_fake are written when non-null; alpha_partials, when non-null, gets the
// block's Σ grad · (real − fake).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    interpolate_backward_kernel(const T* grad, const T* real, const T* fake, const T* alpha, T* grad_real,
                                T* grad_fake, acc_t<T>* alpha_partials, SampleChunks s) {
  using Acc = acc_t<T>;
  const BlockChunk bc = block_chunk(s);
  const Acc w = static_cast<Acc>(alpha[bc.sample]);
  for_each_thread_element(bc.length, threadIdx.x, kThreads, [&](int64_t j) {
    const int64_t e = bc.offset + j;
    const Acc g = static_cast<Acc>(grad[e]);
    if (grad_real != nullptr) grad_real[e] = static_cast<T>(w * g);
    if (grad_fake != nullptr) grad_fake[e] = static_cast<T>((Acc(1) - w) * g);
  });
  if (alpha_partials != nullptr) {
    const Acc partial = thread_sum<Acc>(bc.length, threadIdx.x, kThreads, [&](int64_t j) {
      const int64_t e = bc.offset + j;
      return alpha_grad_term(static_cast<Acc>(grad[e]), static_cast<Acc>(real[e]), static_cast<Acc>(fake[e]));
    });
    const Acc total = block_sum<kThreads>(partial);
    if (threadIdx.x == 0) alpha_partials[blockIdx.x] = total;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    alpha_finish_kernel(const acc_t<T>* partials, int64_t n_samples, int64_t n_chunks, T* grad_alpha) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n_samples) grad_alpha[i] = static_cast<T>(combine_chunks(partials + i * n_chunks, n_chunks));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sumsq_partial_kernel(const T* grads, const acc_t<T>* inv_scale, acc_t<T>* partials, SampleChunks s) {
  using Acc = acc_t<T>;
  const BlockChunk bc = block_chunk(s);
  const Acc scale = inv_scale != nullptr ? *inv_scale : Acc(1);
  const Acc partial = thread_sum<Acc>(bc.length, threadIdx.x, kThreads, [&](int64_t j) {
    return unscaled_square(static_cast<Acc>(grads[bc.offset + j]), scale);
  });
  const Acc total = block_sum<kThreads>(partial);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    penalty_finish_kernel(const acc_t<T>* partials, int64_t n_samples, int64_t n_chunks, double center,
                          bool one_sided, double weight, acc_t<T>* sumsq, T* penalty) {
  using Acc = acc_t<T>;
  const Acc local =
      finish_thread<Acc>(partials, n_samples, n_chunks, threadIdx.x, kThreads, Acc(center), one_sided, sumsq);
  const Acc total = block_sum<kThreads>(local);
  if (threadIdx.x == 0) *penalty = static_cast<T>(penalty_value(total, Acc(weight), n_samples));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    penalty_backward_kernel(const acc_t<T>* grad_penalty, const T* grads, const acc_t<T>* sumsq,
                            const acc_t<T>* inv_scale, double center, bool one_sided, double weight,
                            T* out, SampleChunks s) {
  using Acc = acc_t<T>;
  const BlockChunk bc = block_chunk(s);
  const Acc scale = inv_scale != nullptr ? *inv_scale : Acc(1);
  const Acc k =
      penalty_grad_scale(*grad_penalty, sumsq[bc.sample], scale, Acc(center), one_sided, Acc(weight), s.n_samples);
  for_each_thread_element(bc.length, threadIdx.x, kThreads, [&](int64_t j) {
    const int64_t e = bc.offset + j;
    out[e] = static_cast<T>(k * static_cast<Acc>(grads[e]));
  });
}

// The inverse scale on the device, or an undefined tensor without one.
Tensor inv_scale_tensor(const std::optional<Tensor>& inv_scale, const Tensor& grads) {
  check_inv_scale(inv_scale, grads);
  return inv_scale.has_value() ? as_contiguous(*inv_scale) : Tensor();
}

Tensor interpolate_cuda(const Tensor& real, const Tensor& fake, const Tensor& alpha) {
  const SampleChunks s = check_interpolate_inputs(real, fake, alpha, DeviceType::CUDA);
  const unsigned int blocks = grid_x(s.total_chunks(), "interpolate");
  CudaDeviceGuard guard(real);
  const Tensor r = as_contiguous(real), f = as_contiguous(fake), a = as_contiguous(alpha);
  Tensor out = empty(r.sizes(), r);
  const cudaStream_t stream = current_stream(real);
  GANOPS_DISPATCH_FLOATING_TYPES(r.scalar_type(), "interpolate_cuda", [&] {
    interpolate_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        r.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), s);
    GANOPS_CUDA_LAUNCH_CHECK();
  });
  return out;
}
GANOPS_KERNEL(CUDA, "interpolate", interpolate_cuda)

std::tuple<Tensor, Tensor, Tensor> interpolate_backward_cuda(const Tensor& grad,
                                                                          const Tensor& real,
                                                                          const Tensor& fake,
                                                                          const Tensor& alpha, bool need_real,
                                                                          bool need_fake, bool need_alpha) {
  const SampleChunks s = check_interpolate_backward_inputs(grad, real, fake, alpha, DeviceType::CUDA);
  const unsigned int blocks = grid_x(s.total_chunks(), "interpolate_backward");
  CudaDeviceGuard guard(real);
  const Tensor g = as_contiguous(grad), r = as_contiguous(real), f = as_contiguous(fake), a = as_contiguous(alpha);
  Tensor grad_real = need_real ? empty(g.sizes(), g) : empty({0}, g);
  Tensor grad_fake = need_fake ? empty(g.sizes(), g) : empty({0}, g);
  Tensor grad_alpha = empty({need_alpha ? s.n_samples : 0}, a);
  Tensor partials = empty({need_alpha ? s.total_chunks() : 0}, options(g).dtype(acc_dtype(g.scalar_type())));
  const cudaStream_t stream = current_stream(real);
  GANOPS_DISPATCH_FLOATING_TYPES(g.scalar_type(), "interpolate_backward_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    interpolate_backward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(),
        a.const_data_ptr<scalar_t>(), need_real ? grad_real.mutable_data_ptr<scalar_t>() : nullptr,
        need_fake ? grad_fake.mutable_data_ptr<scalar_t>() : nullptr, need_alpha ? partials.mutable_data_ptr<Acc>() : nullptr,
        s);
    GANOPS_CUDA_LAUNCH_CHECK();
    if (need_alpha) {
      alpha_finish_kernel<scalar_t><<<ceil_div(s.n_samples, kThreads), kThreads, 0, stream>>>(
          partials.const_data_ptr<Acc>(), s.n_samples, s.n_chunks, grad_alpha.mutable_data_ptr<scalar_t>());
      GANOPS_CUDA_LAUNCH_CHECK();
    }
  });
  return {grad_real, grad_fake, grad_alpha};
}
GANOPS_KERNEL(CUDA, "interpolate_backward", interpolate_backward_cuda)

std::tuple<Tensor, Tensor> gradient_norm_penalty_cuda(const Tensor& grads,
                                                              const std::optional<Tensor>& inv_scale,
                                                              double center, bool one_sided, double weight) {
  const SampleChunks s = check_samples(grads, "grads", DeviceType::CUDA);
  const unsigned int blocks = grid_x(s.total_chunks(), "gradient_norm_penalty");
  CudaDeviceGuard guard(grads);
  const Tensor g = as_contiguous(grads);
  const Tensor scale = inv_scale_tensor(inv_scale, g);
  const auto acc_opts = options(g).dtype(acc_dtype(g.scalar_type()));
  Tensor partials = empty({s.total_chunks()}, acc_opts);
  Tensor sumsq = empty({s.n_samples}, acc_opts);
  Tensor penalty = empty({}, options(g));
  const cudaStream_t stream = current_stream(grads);
  GANOPS_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gradient_norm_penalty_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    sumsq_partial_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), scale.defined() ? scale.const_data_ptr<Acc>() : nullptr,
        partials.mutable_data_ptr<Acc>(), s);
    GANOPS_CUDA_LAUNCH_CHECK();
    penalty_finish_kernel<scalar_t><<<1, kThreads, 0, stream>>>(partials.const_data_ptr<Acc>(), s.n_samples,
                                                                 s.n_chunks, center, one_sided, weight,
                                                                 sumsq.mutable_data_ptr<Acc>(), penalty.mutable_data_ptr<scalar_t>());
    GANOPS_CUDA_LAUNCH_CHECK();
  });
  return {penalty, sumsq};
}
GANOPS_KERNEL(CUDA, "gradient_norm_penalty", gradient_norm_penalty_cuda)

Tensor gradient_norm_penalty_backward_cuda(const Tensor& grad_penalty, const Tensor& grads,
                                               const Tensor& sumsq, const std::optional<Tensor>& inv_scale,
                                               double center, bool one_sided, double weight) {
  const SampleChunks s = check_penalty_backward_inputs(grad_penalty, grads, sumsq, DeviceType::CUDA);
  const unsigned int blocks = grid_x(s.total_chunks(), "gradient_norm_penalty_backward");
  CudaDeviceGuard guard(grads);
  const Tensor g = as_contiguous(grads);
  const Tensor ss = as_contiguous(sumsq);
  // In the accumulation dtype, as the CPU and Triton kernels read it: rounding a float32
  // ∂loss/∂penalty to half first would change the gradient.
  const Tensor go = as_contiguous(to_dtype(grad_penalty, acc_dtype(g.scalar_type())));
  const Tensor scale = inv_scale_tensor(inv_scale, g);
  Tensor out = empty(g.sizes(), g);
  const cudaStream_t stream = current_stream(grads);
  GANOPS_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gradient_norm_penalty_backward_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    penalty_backward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        go.const_data_ptr<Acc>(), g.const_data_ptr<scalar_t>(), ss.const_data_ptr<Acc>(),
        scale.defined() ? scale.const_data_ptr<Acc>() : nullptr, center, one_sided, weight, out.mutable_data_ptr<scalar_t>(),
        s);
    GANOPS_CUDA_LAUNCH_CHECK();
  });
  return out;
}
GANOPS_KERNEL(CUDA, "gradient_norm_penalty_backward", gradient_norm_penalty_backward_cuda)

}  // namespace

}  // namespace ganops::gradient_penalty
