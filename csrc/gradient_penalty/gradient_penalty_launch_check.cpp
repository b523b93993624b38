// The CUDA launches of gradient_penalty_cuda.cu run on the CPU, block by block and thread by
// thread (ganops/launch_emulation.h): the penalty's partial and finishing kernels, and the
// per-sample Σ grads · (real − fake) of interpolate's backward. A test op for CPU tensors.

#include <ganops/tensor.h>
#include <ganops/dispatch.h>
#include <ganops/grid.h>
#include <ganops/launch_emulation.h>

#include <tuple>
#include <vector>

#include "gradient_penalty/gradient_penalty.h"

namespace ganops::gradient_penalty {
namespace {

using LaunchCheck = std::tuple<Tensor, Tensor, Tensor, Tensor>;

template <typename T>
LaunchCheck launch_check_impl(const Tensor& g, const Tensor& r, const Tensor& f, const SampleChunks& s,
                              double center, bool one_sided, double weight) {
  using Acc = acc_t<T>;
  const Coverage visits({g.numel()});
  const T* gp = g.const_data_ptr<T>();
  const T* rp = r.const_data_ptr<T>();
  const T* fp = f.const_data_ptr<T>();

  // sumsq_partial_kernel (no inv_scale) and interpolate_backward_kernel's alpha partials: a
  // block per (sample, chunk).
  std::vector<Acc> sq_partials(s.total_chunks()), alpha_partials(s.total_chunks());
  for (int64_t b = 0; b < s.total_chunks(); ++b) {
    const int64_t o = s.offset(b), n = s.length(b);
    sq_partials[b] = emulate_block<kThreads, Acc>([&](int tid) {
      for_each_thread_element(n, tid, kThreads, [&](int64_t j) { visits.visit(o + j); });
      return thread_sum<Acc>(n, tid, kThreads,
                             [&](int64_t j) { return unscaled_square(Acc(gp[o + j]), Acc(1)); });
    });
    alpha_partials[b] = emulate_block<kThreads, Acc>([&](int tid) {
      return thread_sum<Acc>(n, tid, kThreads, [&](int64_t j) {
        return alpha_grad_term(Acc(gp[o + j]), Acc(rp[o + j]), Acc(fp[o + j]));
      });
    });
  }

  // penalty_finish_kernel: one block.
  Tensor sumsq = empty({s.n_samples}, options(g).dtype(acc_dtype(g.scalar_type())));
  const Acc total = emulate_block<kThreads, Acc>([&](int tid) {
    return finish_thread<Acc>(sq_partials.data(), s.n_samples, s.n_chunks, tid, kThreads, Acc(center), one_sided,
                              sumsq.mutable_data_ptr<Acc>());
  });
  Tensor penalty = empty({}, options(g));
  penalty.mutable_data_ptr<T>()[0] = static_cast<T>(penalty_value(total, Acc(weight), s.n_samples));

  // alpha_finish_kernel: a thread per sample.
  Tensor grad_alpha = empty({s.n_samples}, options(g));
  for (int64_t i = 0; i < s.n_samples; ++i) {
    grad_alpha.mutable_data_ptr<T>()[i] = static_cast<T>(combine_chunks(alpha_partials.data() + i * s.n_chunks, s.n_chunks));
  }
  return {visits.counts(), sumsq, penalty, grad_alpha};
}

LaunchCheck cuda_launch_check(const Tensor& grads, const Tensor& real, const Tensor& fake,
                              double center, bool one_sided, double weight) {
  const SampleChunks s = check_samples(grads, "grads", DeviceType::CPU);
  check_like(grads, "grads", real, "real");
  check_like(grads, "grads", fake, "fake");
  // The CUDA host code's check, before anything is made contiguous: a test passes an
  // expanded tensor too large to exist.
  grid_x(s.total_chunks(), "gradient_norm_penalty");
  return GANOPS_DISPATCH_FLOATING_TYPES(grads.scalar_type(), "gradient_penalty_launch_check", [&] {
    return launch_check_impl<scalar_t>(as_contiguous(grads), as_contiguous(real), as_contiguous(fake), s, center,
                                       one_sided, weight);
  });
}

// Runs the CUDA kernels' per-thread functions for every block and thread of the launches
// the CUDA host code would choose. Returns (times each element was visited, per-sample
// sum of squares, penalty, per-sample Σ grads * (real - fake)).
GANOPS_LAUNCH_CHECK_OP("_gradient_penalty_cuda_launch_check", "(Tensor grads, Tensor real, Tensor fake, float center, "
                       "bool one_sided, float weight) -> (Tensor, Tensor, Tensor, Tensor)",
                       cuda_launch_check)

}  // namespace

}  // namespace ganops::gradient_penalty
