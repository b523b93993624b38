// CUDA kernels of the gradient penalty's fused pieces.
//
// One block per (sample, chunk) of gradient_penalty.h, numbered b = sample * n_chunks + chunk
// on a 1-D grid (a 2-D grid would cap the batch at 65535). Reductions write one partial per
// block and a finishing kernel combines each sample's partials in chunk order: deterministic,
// and the penalty, its backward factor and the inverse loss scale stay in device memory, so
// nothing waits on the host.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <ganops/checks.h>
#include <ganops/dispatch.h>

#include "gradient_penalty/gradient_penalty.h"

namespace ganops::gradient_penalty {
namespace {

// A sum over the block (ganops/block.h's tree order).
template <typename Acc>
__device__ Acc block_sum(Acc value) {
  return block_reduce<kThreads>(value, Plus{});
}

// The block's sample, its chunk's first element and the chunk's length.
struct BlockChunk {
  int64_t sample;
  int64_t offset;
  int64_t length;
};

__device__ BlockChunk block_chunk(int64_t sample_numel, int64_t n_chunks) {
  const int64_t b = blockIdx.x;
  const int64_t c = b % n_chunks;
  return {b / n_chunks, (b / n_chunks) * sample_numel + c * kChunkSize, chunk_length(sample_numel, c)};
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    interpolate_kernel(const T* real, const T* fake, const T* alpha, T* out, int64_t sample_numel, int64_t n_chunks) {
  using Acc = acc_t<T>;
  const BlockChunk bc = block_chunk(sample_numel, n_chunks);
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
                                T* grad_fake, acc_t<T>* alpha_partials, int64_t sample_numel, int64_t n_chunks) {
  using Acc = acc_t<T>;
  const BlockChunk bc = block_chunk(sample_numel, n_chunks);
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
    const Acc total = block_sum(partial);
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
    sumsq_partial_kernel(const T* grads, const acc_t<T>* inv_scale, acc_t<T>* partials, int64_t sample_numel,
                         int64_t n_chunks) {
  using Acc = acc_t<T>;
  const BlockChunk bc = block_chunk(sample_numel, n_chunks);
  const Acc s = inv_scale != nullptr ? *inv_scale : Acc(1);
  const Acc partial = thread_sum<Acc>(bc.length, threadIdx.x, kThreads, [&](int64_t j) {
    return unscaled_square(static_cast<Acc>(grads[bc.offset + j]), s);
  });
  const Acc total = block_sum(partial);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    penalty_finish_kernel(const acc_t<T>* partials, int64_t n_samples, int64_t n_chunks, double center,
                          bool one_sided, double weight, acc_t<T>* sumsq, T* penalty) {
  using Acc = acc_t<T>;
  const Acc local =
      finish_thread<Acc>(partials, n_samples, n_chunks, threadIdx.x, kThreads, Acc(center), one_sided, sumsq);
  const Acc total = block_sum(local);
  if (threadIdx.x == 0) *penalty = static_cast<T>(penalty_value(total, Acc(weight), n_samples));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    penalty_backward_kernel(const acc_t<T>* grad_penalty, const T* grads, const acc_t<T>* sumsq,
                            const acc_t<T>* inv_scale, double center, bool one_sided, double weight,
                            int64_t n_samples, T* out, int64_t sample_numel, int64_t n_chunks) {
  using Acc = acc_t<T>;
  const BlockChunk bc = block_chunk(sample_numel, n_chunks);
  const Acc s = inv_scale != nullptr ? *inv_scale : Acc(1);
  const Acc k =
      penalty_grad_scale(*grad_penalty, sumsq[bc.sample], s, Acc(center), one_sided, Acc(weight), n_samples);
  for_each_thread_element(bc.length, threadIdx.x, kThreads, [&](int64_t j) {
    const int64_t e = bc.offset + j;
    out[e] = static_cast<T>(k * static_cast<Acc>(grads[e]));
  });
}

c10::ScalarType acc_dtype(c10::ScalarType t) { return t == c10::kDouble ? c10::kDouble : c10::kFloat; }

struct Split {
  int64_t n_samples;
  int64_t sample_numel;
  int64_t n_chunks;
  int64_t blocks() const { return n_samples * n_chunks; }
};

Split split_of(const at::Tensor& t, std::string_view name) {
  check_float(t, name);
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor here, got ", t.device());
  TORCH_CHECK(t.dim() >= 1 && t.size(0) > 0 && t.numel() > 0, name,
              " must have a batch dimension and at least one element per sample, got shape ", t.sizes());
  const int64_t n = t.size(0);
  const int64_t m = t.numel() / n;
  return {n, m, chunks_per_sample(m)};
}

// The inverse scale on the device, or an undefined tensor without one.
at::Tensor inv_scale_tensor(const std::optional<at::Tensor>& inv_scale, const at::Tensor& grads) {
  if (!inv_scale.has_value()) return at::Tensor();
  const at::Tensor& s = *inv_scale;
  TORCH_CHECK(s.numel() == 1, "inv_scale must hold one value, got shape ", s.sizes());
  TORCH_CHECK(s.scalar_type() == acc_dtype(grads.scalar_type()), "inv_scale must be ",
              acc_dtype(grads.scalar_type()), " for ", grads.scalar_type(), " grads, got ", s.scalar_type());
  check_same_device(s, "inv_scale", grads, "grads");
  return s.contiguous();
}

at::Tensor interpolate_cuda(const at::Tensor& real, const at::Tensor& fake, const at::Tensor& alpha) {
  const Split s = split_of(real, "real");
  check_like(real, "real", fake, "fake");
  check_alpha(alpha, real);
  c10::cuda::CUDAGuard guard(real.device());
  const at::Tensor r = real.contiguous(), f = fake.contiguous(), a = alpha.contiguous();
  at::Tensor out = at::empty_like(r);
  auto stream = c10::cuda::getCurrentCUDAStream();
  GANOPS_DISPATCH_FLOATING_TYPES(r.scalar_type(), "interpolate_cuda", [&] {
    interpolate_kernel<scalar_t><<<s.blocks(), kThreads, 0, stream>>>(
        r.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), s.sample_numel, s.n_chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> interpolate_backward_cuda(const at::Tensor& grad,
                                                                          const at::Tensor& real,
                                                                          const at::Tensor& fake,
                                                                          const at::Tensor& alpha, bool need_real,
                                                                          bool need_fake, bool need_alpha) {
  const Split s = split_of(real, "real");
  check_like(real, "real", fake, "fake");
  check_like(grad, "grad", real, "real");
  check_alpha(alpha, real);
  c10::cuda::CUDAGuard guard(real.device());
  const at::Tensor g = grad.contiguous(), r = real.contiguous(), f = fake.contiguous(), a = alpha.contiguous();
  at::Tensor grad_real = need_real ? at::empty_like(g) : g.new_empty({0});
  at::Tensor grad_fake = need_fake ? at::empty_like(g) : g.new_empty({0});
  at::Tensor grad_alpha = a.new_empty({need_alpha ? s.n_samples : 0});
  at::Tensor partials = g.new_empty({need_alpha ? s.blocks() : 0}, g.options().dtype(acc_dtype(g.scalar_type())));
  auto stream = c10::cuda::getCurrentCUDAStream();
  GANOPS_DISPATCH_FLOATING_TYPES(g.scalar_type(), "interpolate_backward_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    interpolate_backward_kernel<scalar_t><<<s.blocks(), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(),
        a.const_data_ptr<scalar_t>(), need_real ? grad_real.data_ptr<scalar_t>() : nullptr,
        need_fake ? grad_fake.data_ptr<scalar_t>() : nullptr, need_alpha ? partials.data_ptr<Acc>() : nullptr,
        s.sample_numel, s.n_chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_alpha) {
      alpha_finish_kernel<scalar_t><<<ceil_div(s.n_samples, kThreads), kThreads, 0, stream>>>(
          partials.const_data_ptr<Acc>(), s.n_samples, s.n_chunks, grad_alpha.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_real, grad_fake, grad_alpha};
}

std::tuple<at::Tensor, at::Tensor> gradient_norm_penalty_cuda(const at::Tensor& grads,
                                                              const std::optional<at::Tensor>& inv_scale,
                                                              double center, bool one_sided, double weight) {
  const Split s = split_of(grads, "grads");
  c10::cuda::CUDAGuard guard(grads.device());
  const at::Tensor g = grads.contiguous();
  const at::Tensor scale = inv_scale_tensor(inv_scale, g);
  const auto acc_opts = g.options().dtype(acc_dtype(g.scalar_type()));
  at::Tensor partials = at::empty({s.blocks()}, acc_opts);
  at::Tensor sumsq = at::empty({s.n_samples}, acc_opts);
  at::Tensor penalty = at::empty({}, g.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  GANOPS_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gradient_norm_penalty_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    sumsq_partial_kernel<scalar_t><<<s.blocks(), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), scale.defined() ? scale.const_data_ptr<Acc>() : nullptr,
        partials.data_ptr<Acc>(), s.sample_numel, s.n_chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    penalty_finish_kernel<scalar_t><<<1, kThreads, 0, stream>>>(partials.const_data_ptr<Acc>(), s.n_samples,
                                                                 s.n_chunks, center, one_sided, weight,
                                                                 sumsq.data_ptr<Acc>(), penalty.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {penalty, sumsq};
}

at::Tensor gradient_norm_penalty_backward_cuda(const at::Tensor& grad_penalty, const at::Tensor& grads,
                                               const at::Tensor& sumsq, const std::optional<at::Tensor>& inv_scale,
                                               double center, bool one_sided, double weight) {
  const Split s = split_of(grads, "grads");
  TORCH_CHECK(grad_penalty.numel() == 1, "grad_penalty must hold one value, got shape ", grad_penalty.sizes());
  check_float(grad_penalty, "grad_penalty");
  check_same_device(grad_penalty, "grad_penalty", grads, "grads");
  TORCH_CHECK(sumsq.dim() == 1 && sumsq.size(0) == s.n_samples, "sumsq must have shape (", s.n_samples,
              ",), got ", sumsq.sizes());
  TORCH_CHECK(sumsq.scalar_type() == acc_dtype(grads.scalar_type()), "sumsq must be ",
              acc_dtype(grads.scalar_type()), ", got ", sumsq.scalar_type());
  check_same_device(sumsq, "sumsq", grads, "grads");
  c10::cuda::CUDAGuard guard(grads.device());
  const at::Tensor g = grads.contiguous();
  const at::Tensor ss = sumsq.contiguous();
  // In the accumulation dtype, as the CPU and Triton kernels read it: rounding a float32
  // ∂loss/∂penalty to half first would change the gradient.
  const at::Tensor go = grad_penalty.to(acc_dtype(g.scalar_type())).contiguous();
  const at::Tensor scale = inv_scale_tensor(inv_scale, g);
  at::Tensor out = at::empty_like(g);
  auto stream = c10::cuda::getCurrentCUDAStream();
  GANOPS_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gradient_norm_penalty_backward_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    penalty_backward_kernel<scalar_t><<<s.blocks(), kThreads, 0, stream>>>(
        go.const_data_ptr<Acc>(), g.const_data_ptr<scalar_t>(), ss.const_data_ptr<Acc>(),
        scale.defined() ? scale.const_data_ptr<Acc>() : nullptr, center, one_sided, weight, s.n_samples,
        out.data_ptr<scalar_t>(), s.sample_numel, s.n_chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ganops, CUDA, m) {
  m.impl("interpolate", &interpolate_cuda);
  m.impl("interpolate_backward", &interpolate_backward_cuda);
  m.impl("gradient_norm_penalty", &gradient_norm_penalty_cuda);
  m.impl("gradient_norm_penalty_backward", &gradient_norm_penalty_backward_cuda);
}

}  // namespace ganops::gradient_penalty
