// CPU kernels of the gradient penalty's fused pieces.
//
// Work is split into the (sample, chunk) tasks of gradient_penalty.h; torch::stable::parallel_for hands
// tasks to threads, each reduction's partial lands in its task's slot and a sample's slots
// are combined in chunk order, so results are bit-identical whatever the thread count.

#include <ganops/checks.h>
#include <ganops/dispatch.h>
#include <ganops/lanes.h>
#include <ganops/registration.h>

#include <vector>

#include "gradient_penalty/gradient_penalty.h"

namespace ganops::gradient_penalty {
namespace {

// Below this many elements per thread, splitting costs more than it saves.
constexpr int64_t kMinElementsPerThread = 32768;

// Runs task(b) for every (sample, chunk) piece b, in parallel.
template <typename F>
void for_each_task(const SampleChunks& s, F&& task) {
  const int64_t per_task = s.sample_numel < kChunkSize ? s.sample_numel : kChunkSize;
  torch::stable::parallel_for(0, s.total_chunks(), ceil_div(kMinElementsPerThread, per_task), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) task(b);
  });
}

// The inverse loss scale as a host value (a CPU tensor: reading it costs no synchronisation).
template <typename Acc>
Acc inv_scale_value(const std::optional<Tensor>& inv_scale, const Tensor& grads) {
  check_inv_scale(inv_scale, grads);
  return inv_scale.has_value() ? as_contiguous(*inv_scale).const_data_ptr<Acc>()[0] : Acc(1);
}

Tensor interpolate_cpu(const Tensor& real, const Tensor& fake, const Tensor& alpha) {
  const SampleChunks s = check_interpolate_inputs(real, fake, alpha, DeviceType::CPU);
  const Tensor r = as_contiguous(real), f = as_contiguous(fake), a = as_contiguous(alpha);
  Tensor out = empty(r.sizes(), r);
  GANOPS_DISPATCH_FLOATING_TYPES(r.scalar_type(), "interpolate_cpu", [&] {
    using Acc = acc_t<scalar_t>;
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_each_task(s, [&](int64_t t) {
      const Acc w = Acc(ap[s.sample(t)]);
      const int64_t o = s.offset(t), n = s.length(t);
      for (int64_t j = o; j < o + n; ++j) op[j] = static_cast<scalar_t>(interpolate_value(Acc(rp[j]), Acc(fp[j]), w));
    });
  });
  return out;
}
GANOPS_KERNEL(CPU, "interpolate", interpolate_cpu)

std::tuple<Tensor, Tensor, Tensor> interpolate_backward_cpu(const Tensor& grad,
                                                                         const Tensor& real,
                                                                         const Tensor& fake,
                                                                         const Tensor& alpha, bool need_real,
                                                                         bool need_fake, bool need_alpha) {
  const SampleChunks s = check_interpolate_backward_inputs(grad, real, fake, alpha, DeviceType::CPU);
  const Tensor g = as_contiguous(grad), r = as_contiguous(real), f = as_contiguous(fake), a = as_contiguous(alpha);
  Tensor grad_real = need_real ? empty(g.sizes(), g) : empty({0}, g);
  Tensor grad_fake = need_fake ? empty(g.sizes(), g) : empty({0}, g);
  Tensor grad_alpha = empty({need_alpha ? a.size(0) : 0}, a);
  GANOPS_DISPATCH_FLOATING_TYPES(g.scalar_type(), "interpolate_backward_cpu", [&] {
    using Acc = acc_t<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    scalar_t* grp = need_real ? grad_real.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gfp = need_fake ? grad_fake.mutable_data_ptr<scalar_t>() : nullptr;
    std::vector<Acc> partials(need_alpha ? s.total_chunks() : 0);
    for_each_task(s, [&](int64_t t) {
      const Acc w = Acc(ap[s.sample(t)]);
      const int64_t o = s.offset(t), n = s.length(t);
      if (grp != nullptr) {
        for (int64_t j = o; j < o + n; ++j) grp[j] = static_cast<scalar_t>(w * Acc(gp[j]));
      }
      if (gfp != nullptr) {
        for (int64_t j = o; j < o + n; ++j) gfp[j] = static_cast<scalar_t>((Acc(1) - w) * Acc(gp[j]));
      }
      if (need_alpha) {
        partials[t] = lane_reduce<Acc>(
            n, [&](int64_t j) { return alpha_grad_term(Acc(gp[o + j]), Acc(rp[o + j]), Acc(fp[o + j])); }, Plus{});
      }
    });
    if (need_alpha) {
      scalar_t* gap = grad_alpha.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < s.n_samples; ++i) {
        gap[i] = static_cast<scalar_t>(combine_chunks(partials.data() + i * s.n_chunks, s.n_chunks));
      }
    }
  });
  return {grad_real, grad_fake, grad_alpha};
}
GANOPS_KERNEL(CPU, "interpolate_backward", interpolate_backward_cpu)

std::tuple<Tensor, Tensor> gradient_norm_penalty_cpu(const Tensor& grads,
                                                             const std::optional<Tensor>& inv_scale,
                                                             double center, bool one_sided, double weight) {
  const SampleChunks s = check_samples(grads, "grads", DeviceType::CPU);
  const Tensor g = as_contiguous(grads);
  Tensor sumsq = empty({s.n_samples}, options(g).dtype(acc_dtype(g.scalar_type())));
  Tensor penalty = empty({}, options(g));
  GANOPS_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gradient_norm_penalty_cpu", [&] {
    using Acc = acc_t<scalar_t>;
    const Acc scale = inv_scale_value<Acc>(inv_scale, g);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    std::vector<Acc> partials(s.total_chunks());
    for_each_task(s, [&](int64_t t) {
      const scalar_t* x = gp + s.offset(t);
      partials[t] = lane_reduce<Acc>(s.length(t), [&](int64_t j) { return unscaled_square(Acc(x[j]), scale); }, Plus{});
    });
    // One "thread" over all samples: every sample's chunks in order, then the samples in order.
    const Acc total = finish_thread<Acc>(partials.data(), s.n_samples, s.n_chunks, 0, 1, Acc(center), one_sided,
                                         sumsq.mutable_data_ptr<Acc>());
    penalty.mutable_data_ptr<scalar_t>()[0] = static_cast<scalar_t>(penalty_value(total, Acc(weight), s.n_samples));
  });
  return {penalty, sumsq};
}
GANOPS_KERNEL(CPU, "gradient_norm_penalty", gradient_norm_penalty_cpu)

Tensor gradient_norm_penalty_backward_cpu(const Tensor& grad_penalty, const Tensor& grads,
                                              const Tensor& sumsq, const std::optional<Tensor>& inv_scale,
                                              double center, bool one_sided, double weight) {
  const SampleChunks s = check_penalty_backward_inputs(grad_penalty, grads, sumsq, DeviceType::CPU);
  const Tensor g = as_contiguous(grads);
  const Tensor ss = as_contiguous(sumsq);
  Tensor out = empty(g.sizes(), g);
  double go = 0;
  GANOPS_DISPATCH_FLOATING_TYPES(grad_penalty.scalar_type(), "grad_penalty_value", [&] {
    go = static_cast<double>(as_contiguous(grad_penalty).const_data_ptr<scalar_t>()[0]);
  });
  GANOPS_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gradient_norm_penalty_backward_cpu", [&] {
    using Acc = acc_t<scalar_t>;
    const Acc scale = inv_scale_value<Acc>(inv_scale, g);
    const Acc* ssp = ss.const_data_ptr<Acc>();
    std::vector<Acc> factor(s.n_samples);
    for (int64_t i = 0; i < s.n_samples; ++i) {
      factor[i] = penalty_grad_scale(Acc(go), ssp[i], scale, Acc(center), one_sided, Acc(weight), s.n_samples);
    }
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_each_task(s, [&](int64_t t) {
      const Acc k = factor[s.sample(t)];
      const int64_t o = s.offset(t), n = s.length(t);
      for (int64_t j = o; j < o + n; ++j) op[j] = static_cast<scalar_t>(k * Acc(gp[j]));
    });
  });
  return out;
}
GANOPS_KERNEL(CPU, "gradient_norm_penalty_backward", gradient_norm_penalty_backward_cpu)

}  // namespace

}  // namespace ganops::gradient_penalty
