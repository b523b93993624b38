// The CUDA launches of minibatch_stddev_cuda.cu run on the CPU, block by block and thread by
// thread (ganops/launch_emulation.h), with the grids the CUDA host code chooses and the
// per-thread functions of minibatch_stddev.h: the forward's stats, finish and output kernels,
// and the backward's stat-gradient and backward kernels. A test op for CPU tensors.

#include <ganops/tensor.h>
#include <ganops/dispatch.h>
#include <ganops/launch_emulation.h>

#include <tuple>
#include <vector>

#include "minibatch_stddev/minibatch_stddev.h"

namespace ganops::minibatch_stddev {
namespace {

using LaunchCheck = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

template <typename T>
LaunchCheck launch_check_impl(const Tensor& x, const Tensor& grad, const Layout& l) {
  using Acc = acc_t<T>;
  const T* xp = x.const_data_ptr<T>();
  const T* gp = grad.const_data_ptr<T>();

  // stats_kernel: a block per (j, f, chunk).
  const Coverage stats_visits({x.numel()});
  const auto visit_x = [&](int64_t k) { stats_visits.visit(k); };
  std::vector<Acc> partials(l.tasks());
  for (int64_t b = 0; b < l.tasks(); ++b) {
    partials[b] = emulate_block<kThreads, Acc>(
        [&](int tid) { return stats_thread_sum<Acc>(xp, l, b, tid, kThreads, visit_x); });
  }
  // finish_kernel: a thread per (j, f).
  std::vector<Acc> stat(l.stats());
  for (int64_t jf = 0; jf < l.stats(); ++jf) stat[jf] = finish_stat(partials.data(), l, jf);
  // output_kernel: a block per kOutputChunk output elements.
  Tensor out = empty({l.samples(), x.size(1) + l.F, x.size(2), x.size(3)}, options(x));
  const int64_t total = out.numel();
  const Coverage out_visits({total});
  for (int64_t b = 0; b < ceil_div(total, kOutputChunk); ++b) {
    for (int tid = 0; tid < kThreads; ++tid) {
      output_thread(xp, stat.data(), out.mutable_data_ptr<T>(), l, total, b, tid, kThreads,
                    [&](int64_t k) { out_visits.visit(k); });
    }
  }

  // stat_grad_kernel: a block per (j, f).
  const Coverage grad_visits({grad.numel()});
  const auto visit_grad = [&](int64_t i) { grad_visits.visit(i); };
  std::vector<Acc> k(l.stats());
  for (int64_t jf = 0; jf < l.stats(); ++jf) {
    const Acc sum = emulate_block<kThreads, Acc>(
        [&](int tid) { return stat_grad_thread_sum<Acc>(gp, l, jf, tid, kThreads, visit_grad); });
    k[jf] = stat_grad_coefficient(sum, l.L);
  }
  // backward_kernel: the forward's split.
  Tensor grad_x = empty(x.sizes(), x);
  const Coverage backward_visits({x.numel()});
  for (int64_t b = 0; b < l.tasks(); ++b) {
    for (int tid = 0; tid < kThreads; ++tid) {
      backward_thread(gp, xp, k.data(), grad_x.mutable_data_ptr<T>(), l, b, tid, kThreads,
                      [&](int64_t i) { backward_visits.visit(i); });
    }
  }
  return {stats_visits.counts(), out_visits.counts(), out, grad_visits.counts(), backward_visits.counts(), grad_x};
}

LaunchCheck cuda_launch_check(const Tensor& x, const Tensor& grad, int64_t group_size, int64_t num_channels) {
  const Layout l = check_input(x, group_size, num_channels, DeviceType::CPU);
  check_grad(grad, x, num_channels);
  return GANOPS_DISPATCH_FLOATING_TYPES(x.scalar_type(), "minibatch_stddev_launch_check", [&] {
    return launch_check_impl<scalar_t>(as_contiguous(x), as_contiguous(grad), l);
  });
}

// Runs the CUDA kernels' per-thread functions for every block and thread of the launches the
// CUDA host code would choose. Returns (times each element of x the stats kernel read, times
// each output element was written, the output, times each element of grad the stat-gradient
// kernel read, times each element of ∂x was written, ∂x); counts are flat.
GANOPS_LAUNCH_CHECK_OP("_minibatch_stddev_cuda_launch_check", "(Tensor x, Tensor grad, int group_size, int num_channels) "
                       "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
                       cuda_launch_check)

}  // namespace

}  // namespace ganops::minibatch_stddev
