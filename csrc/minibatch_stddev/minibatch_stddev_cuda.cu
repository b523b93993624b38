// CUDA kernels of minibatch standard deviation.
//
// Forward: stats_kernel, a block per (j, f, chunk) of minibatch_stddev.h on a 1-D grid, a
// thread per column, writes each block's Σ σ to its own slot; finish_kernel, a thread per
// (j, f), combines a (j, f)'s slots in chunk order into the stat; output_kernel writes
// cat([x, stat]) element by element. Backward: stat_grad_kernel, a block per (j, f), sums
// grad's stat channel into k = ∂stat / L; backward_kernel, with the forward's split, writes ∂x
// column by column. Every intermediate stays in device memory: no host synchronisation, and
// a launch sequence a CUDA graph can capture.

#include <ganops/checks.h>
#include <ganops/cuda.h>
#include <ganops/dispatch.h>
#include <ganops/registration.h>

#include <limits>

#include "minibatch_stddev/minibatch_stddev.h"

namespace ganops::minibatch_stddev {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) stats_kernel(const T* x, acc_t<T>* partials, Layout l) {
  using Acc = acc_t<T>;
  const Acc partial = stats_thread_sum<Acc>(x, l, blockIdx.x, threadIdx.x, kThreads, [](int64_t) {});
  const Acc total = block_reduce<kThreads>(partial, Plus{});
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) finish_kernel(const acc_t<T>* partials, acc_t<T>* stat, Layout l) {
  const int64_t jf = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (jf < l.stats()) stat[jf] = finish_stat(partials, l, jf);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    output_kernel(const T* x, const acc_t<T>* stat, T* out, Layout l, int64_t total) {
  output_thread(x, stat, out, l, total, blockIdx.x, threadIdx.x, kThreads, [](int64_t) {});
}

template <typename T>
__global__ void __launch_bounds__(kThreads) stat_grad_kernel(const T* grad, acc_t<T>* k, Layout l) {
  using Acc = acc_t<T>;
  const Acc partial = stat_grad_thread_sum<Acc>(grad, l, blockIdx.x, threadIdx.x, kThreads, [](int64_t) {});
  const Acc total = block_reduce<kThreads>(partial, Plus{});
  if (threadIdx.x == 0) k[blockIdx.x] = stat_grad_coefficient(total, l.L);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* grad, const T* x, const acc_t<T>* k, T* grad_x, Layout l) {
  backward_thread(grad, x, k, grad_x, l, blockIdx.x, threadIdx.x, kThreads, [](int64_t) {});
}

unsigned int grid(int64_t blocks) {
  STD_TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "minibatch_stddev: input too large (", blocks,
              " blocks)");
  return static_cast<unsigned int>(blocks);
}

Tensor minibatch_stddev_cuda(const Tensor& x, int64_t group_size, int64_t num_channels) {
  const Layout l = check_input(x, group_size, num_channels, DeviceType::CUDA);
  CudaDeviceGuard guard(x);
  const Tensor xc = as_contiguous(x);
  Tensor out = empty({x.size(0), x.size(1) + num_channels, x.size(2), x.size(3)}, options(xc));
  const auto acc_opts = options(xc).dtype(acc_dtype(xc.scalar_type()));
  Tensor partials = empty({l.tasks()}, acc_opts);
  Tensor stat = empty({l.stats()}, acc_opts);
  const int64_t total = out.numel();
  const cudaStream_t stream = current_stream(x);
  GANOPS_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "minibatch_stddev_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    stats_kernel<scalar_t><<<grid(l.tasks()), kThreads, 0, stream>>>(xc.const_data_ptr<scalar_t>(),
                                                                      partials.mutable_data_ptr<Acc>(), l);
    GANOPS_CUDA_LAUNCH_CHECK();
    finish_kernel<scalar_t><<<grid(ceil_div(l.stats(), kThreads)), kThreads, 0, stream>>>(
        partials.const_data_ptr<Acc>(), stat.mutable_data_ptr<Acc>(), l);
    GANOPS_CUDA_LAUNCH_CHECK();
    output_kernel<scalar_t><<<grid(ceil_div(total, kOutputChunk)), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), stat.const_data_ptr<Acc>(), out.mutable_data_ptr<scalar_t>(), l, total);
    GANOPS_CUDA_LAUNCH_CHECK();
  });
  return out;
}
GANOPS_KERNEL(CUDA, "minibatch_stddev", minibatch_stddev_cuda)

Tensor minibatch_stddev_backward_cuda(const Tensor& grad, const Tensor& x, int64_t group_size,
                                          int64_t num_channels) {
  const Layout l = check_input(x, group_size, num_channels, DeviceType::CUDA);
  check_grad(grad, x, num_channels);
  CudaDeviceGuard guard(x);
  const Tensor xc = as_contiguous(x), gc = as_contiguous(grad);
  Tensor grad_x = empty(xc.sizes(), xc);
  Tensor k = empty({l.stats()}, options(xc).dtype(acc_dtype(xc.scalar_type())));
  const cudaStream_t stream = current_stream(x);
  GANOPS_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "minibatch_stddev_backward_cuda", [&] {
    using Acc = acc_t<scalar_t>;
    stat_grad_kernel<scalar_t><<<grid(l.stats()), kThreads, 0, stream>>>(gc.const_data_ptr<scalar_t>(),
                                                                          k.mutable_data_ptr<Acc>(), l);
    GANOPS_CUDA_LAUNCH_CHECK();
    backward_kernel<scalar_t><<<grid(l.tasks()), kThreads, 0, stream>>>(
        gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), k.const_data_ptr<Acc>(),
        grad_x.mutable_data_ptr<scalar_t>(), l);
    GANOPS_CUDA_LAUNCH_CHECK();
  });
  return grad_x;
}
GANOPS_KERNEL(CUDA, "minibatch_stddev_backward", minibatch_stddev_backward_cuda)

}  // namespace

}  // namespace ganops::minibatch_stddev
