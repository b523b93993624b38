// CPU kernels of the gradient penalty's fused pieces.
//
// Work is split into the (sample, chunk) tasks of gradient_penalty.h; at::parallel_for hands
// tasks to threads, each reduction's partial lands in its task's slot and a sample's slots
// are combined in chunk order, so results are bit-identical whatever the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <ganops/checks.h>
#include <ganops/dispatch.h>

#include <vector>

#include "gradient_penalty/gradient_penalty.h"

namespace ganops::gradient_penalty {
namespace {

// Below this many elements per thread, splitting costs more than it saves.
constexpr int64_t kMinElementsPerThread = 32768;

// A (N, M) view of a contiguous tensor and its (sample, chunk) task split.
struct Split {
  int64_t n_samples;
  int64_t sample_numel;
  int64_t n_chunks;  // per sample

  int64_t tasks() const { return n_samples * n_chunks; }
  int64_t offset(int64_t task) const { return (task / n_chunks) * sample_numel + (task % n_chunks) * kChunkSize; }
  int64_t length(int64_t task) const { return chunk_length(sample_numel, task % n_chunks); }
  int64_t grain() const {
    const int64_t per_task = sample_numel < kChunkSize ? sample_numel : kChunkSize;
    return ceil_div(kMinElementsPerThread, per_task);
  }
};

Split split_of(const at::Tensor& t) {
  const int64_t n = t.size(0);
  const int64_t m = t.numel() / n;
  return {n, m, chunks_per_sample(m)};
}

// Runs task(t) for every (sample, chunk) task, in parallel.
template <typename F>
void for_each_task(const Split& s, F&& task) {
  at::parallel_for(0, s.tasks(), s.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) task(t);
  });
}

// Σ term(i) over i < n, in 16 independent lanes so the compiler can vectorise the loop
// without reassociating one accumulator; the lanes are combined in a fixed tree.
template <typename Acc, typename Term>
Acc lanes_sum(int64_t n, Term&& term) {
  constexpr int L = 16;
  Acc lanes[L];
  for (int l = 0; l < L; ++l) lanes[l] = Acc(0);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int l = 0; l < L; ++l) lanes[l] += term(i + l);
  }
  for (; i < n; ++i) lanes[0] += term(i);
  for (int w = L / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  }
  return lanes[0];
}

c10::ScalarType acc_dtype(c10::ScalarType t) { return t == c10::kDouble ? c10::kDouble : c10::kFloat; }

void check_samples(const at::Tensor& t, std::string_view name) {
  check_float(t, name);
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor here, got ", t.device());
  TORCH_CHECK(t.dim() >= 1 && t.size(0) > 0 && t.numel() > 0, name,
              " must have a batch dimension and at least one element per sample, got shape ", t.sizes());
}

// The inverse loss scale as a host value (a CPU tensor: reading it costs no synchronisation).
template <typename Acc>
Acc inv_scale_value(const std::optional<at::Tensor>& inv_scale, const at::Tensor& grads) {
  if (!inv_scale.has_value()) return Acc(1);
  const at::Tensor& s = *inv_scale;
  TORCH_CHECK(s.numel() == 1, "inv_scale must hold one value, got shape ", s.sizes());
  TORCH_CHECK(s.scalar_type() == acc_dtype(grads.scalar_type()), "inv_scale must be ",
              acc_dtype(grads.scalar_type()), " for ", grads.scalar_type(), " grads, got ", s.scalar_type());
  check_same_device(s, "inv_scale", grads, "grads");
  return s.contiguous().const_data_ptr<Acc>()[0];
}

at::Tensor interpolate_cpu(const at::Tensor& real, const at::Tensor& fake, const at::Tensor& alpha) {
  check_samples(real, "real");
  check_like(real, "real", fake, "fake");
  check_alpha(alpha, real);
  const at::Tensor r = real.contiguous(), f = fake.contiguous(), a = alpha.contiguous();
  at::Tensor out = at::empty_like(r);
  const Split s = split_of(r);
  GANOPS_DISPATCH_FLOATING_TYPES(r.scalar_type(), "interpolate_cpu", [&] {
    using Acc = acc_t<scalar_t>;
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_each_task(s, [&](int64_t t) {
      const Acc w = Acc(ap[t / s.n_chunks]);
      const int64_t o = s.offset(t), n = s.length(t);
      for (int64_t j = o; j < o + n; ++j) op[j] = static_cast<scalar_t>(interpolate_value(Acc(rp[j]), Acc(fp[j]), w));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> interpolate_backward_cpu(const at::Tensor& grad,
                                                                         const at::Tensor& real,
                                                                         const at::Tensor& fake,
                                                                         const at::Tensor& alpha, bool need_real,
                                                                         bool need_fake, bool need_alpha) {
  check_samples(real, "real");
  check_like(real, "real", fake, "fake");
  check_like(grad, "grad", real, "real");
  check_alpha(alpha, real);
  const at::Tensor g = grad.contiguous(), r = real.contiguous(), f = fake.contiguous(), a = alpha.contiguous();
  at::Tensor grad_real = need_real ? at::empty_like(g) : g.new_empty({0});
  at::Tensor grad_fake = need_fake ? at::empty_like(g) : g.new_empty({0});
  at::Tensor grad_alpha = a.new_empty({need_alpha ? a.size(0) : 0});
  const Split s = split_of(g);
  GANOPS_DISPATCH_FLOATING_TYPES(g.scalar_type(), "interpolate_backward_cpu", [&] {
    using Acc = acc_t<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    scalar_t* grp = need_real ? grad_real.data_ptr<scalar_t>() : nullptr;
    scalar_t* gfp = need_fake ? grad_fake.data_ptr<scalar_t>() : nullptr;
    std::vector<Acc> partials(need_alpha ? s.tasks() : 0);
    for_each_task(s, [&](int64_t t) {
      const Acc w = Acc(ap[t / s.n_chunks]);
      const int64_t o = s.offset(t), n = s.length(t);
      if (grp != nullptr) {
        for (int64_t j = o; j < o + n; ++j) grp[j] = static_cast<scalar_t>(w * Acc(gp[j]));
      }
      if (gfp != nullptr) {
        for (int64_t j = o; j < o + n; ++j) gfp[j] = static_cast<scalar_t>((Acc(1) - w) * Acc(gp[j]));
      }
      if (need_alpha) {
        partials[t] = lanes_sum<Acc>(n, [&](int64_t j) { return alpha_grad_term(Acc(gp[o + j]), Acc(rp[o + j]), Acc(fp[o + j])); });
      }
    });
    if (need_alpha) {
      scalar_t* gap = grad_alpha.data_ptr<scalar_t>();
      for (int64_t i = 0; i < s.n_samples; ++i) {
        gap[i] = static_cast<scalar_t>(combine_chunks(partials.data() + i * s.n_chunks, s.n_chunks));
      }
    }
  });
  return {grad_real, grad_fake, grad_alpha};
}

std::tuple<at::Tensor, at::Tensor> gradient_norm_penalty_cpu(const at::Tensor& grads,
                                                             const std::optional<at::Tensor>& inv_scale,
                                                             double center, bool one_sided, double weight) {
  check_samples(grads, "grads");
  const at::Tensor g = grads.contiguous();
  const Split s = split_of(g);
  at::Tensor sumsq = at::empty({s.n_samples}, g.options().dtype(acc_dtype(g.scalar_type())));
  at::Tensor penalty = at::empty({}, g.options());
  GANOPS_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gradient_norm_penalty_cpu", [&] {
    using Acc = acc_t<scalar_t>;
    const Acc scale = inv_scale_value<Acc>(inv_scale, g);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    std::vector<Acc> partials(s.tasks());
    for_each_task(s, [&](int64_t t) {
      const scalar_t* x = gp + s.offset(t);
      partials[t] = lanes_sum<Acc>(s.length(t), [&](int64_t j) { return unscaled_square(Acc(x[j]), scale); });
    });
    // One "thread" over all samples: every sample's chunks in order, then the samples in order.
    const Acc total = finish_thread<Acc>(partials.data(), s.n_samples, s.n_chunks, 0, 1, Acc(center), one_sided,
                                         sumsq.data_ptr<Acc>());
    penalty.data_ptr<scalar_t>()[0] = static_cast<scalar_t>(penalty_value(total, Acc(weight), s.n_samples));
  });
  return {penalty, sumsq};
}

at::Tensor gradient_norm_penalty_backward_cpu(const at::Tensor& grad_penalty, const at::Tensor& grads,
                                              const at::Tensor& sumsq, const std::optional<at::Tensor>& inv_scale,
                                              double center, bool one_sided, double weight) {
  check_samples(grads, "grads");
  TORCH_CHECK(grad_penalty.numel() == 1, "grad_penalty must hold one value, got shape ", grad_penalty.sizes());
  check_same_device(grad_penalty, "grad_penalty", grads, "grads");
  TORCH_CHECK(sumsq.dim() == 1 && sumsq.size(0) == grads.size(0), "sumsq must have shape (", grads.size(0),
              ",), got ", sumsq.sizes());
  TORCH_CHECK(sumsq.scalar_type() == acc_dtype(grads.scalar_type()), "sumsq must be ",
              acc_dtype(grads.scalar_type()), ", got ", sumsq.scalar_type());
  check_same_device(sumsq, "sumsq", grads, "grads");
  check_float(grad_penalty, "grad_penalty");
  const at::Tensor g = grads.contiguous();
  const at::Tensor ss = sumsq.contiguous();
  at::Tensor out = at::empty_like(g);
  const Split s = split_of(g);
  double go = 0;
  GANOPS_DISPATCH_FLOATING_TYPES(grad_penalty.scalar_type(), "grad_penalty_value", [&] {
    go = static_cast<double>(grad_penalty.contiguous().const_data_ptr<scalar_t>()[0]);
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
    scalar_t* op = out.data_ptr<scalar_t>();
    for_each_task(s, [&](int64_t t) {
      const Acc k = factor[t / s.n_chunks];
      const int64_t o = s.offset(t), n = s.length(t);
      for (int64_t j = o; j < o + n; ++j) op[j] = static_cast<scalar_t>(k * Acc(gp[j]));
    });
  });
  return out;
}

// Emulates the CUDA launches (gradient_penalty_cuda.cu) block by block and thread by thread,
// with the same grid, per-thread functions and reduction order: the penalty's partial and
// finishing kernels, and the per-sample Σ grads * (real - fake) of interpolate's backward.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> launch_check_impl(const at::Tensor& g,
                                                                             const at::Tensor& r,
                                                                             const at::Tensor& f, double center,
                                                                             bool one_sided, double weight) {
  using Acc = acc_t<scalar_t>;
  const Split s = split_of(g);
  at::Tensor visits = at::zeros({g.numel()}, g.options().dtype(c10::kInt));
  int32_t* vp = visits.data_ptr<int32_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const scalar_t* rp = r.const_data_ptr<scalar_t>();
  const scalar_t* fp = f.const_data_ptr<scalar_t>();
  std::vector<Acc> sq_partials(s.tasks()), alpha_partials(s.tasks());
  std::vector<Acc> block(kThreads);
  auto tree_reduce = [&] { return emulate_block_reduce(block.data(), kThreads, Plus{}); };
  for (int64_t b = 0; b < s.tasks(); ++b) {
    const int64_t o = s.offset(b), n = s.length(b);
    for (int tid = 0; tid < kThreads; ++tid) {
      block[tid] = thread_sum<Acc>(n, tid, kThreads, [&](int64_t j) { return unscaled_square(Acc(gp[o + j]), Acc(1)); });
      for_each_thread_element(n, tid, kThreads, [&](int64_t j) { ++vp[o + j]; });
    }
    sq_partials[b] = tree_reduce();
    for (int tid = 0; tid < kThreads; ++tid) {
      block[tid] = thread_sum<Acc>(n, tid, kThreads,
                                   [&](int64_t j) { return alpha_grad_term(Acc(gp[o + j]), Acc(rp[o + j]), Acc(fp[o + j])); });
    }
    alpha_partials[b] = tree_reduce();
  }
  const auto acc_opts = g.options().dtype(acc_dtype(g.scalar_type()));
  at::Tensor sumsq = at::empty({s.n_samples}, acc_opts);
  for (int tid = 0; tid < kThreads; ++tid) {
    block[tid] = finish_thread<Acc>(sq_partials.data(), s.n_samples, s.n_chunks, tid, kThreads, Acc(center),
                                    one_sided, sumsq.data_ptr<Acc>());
  }
  at::Tensor penalty = at::empty({}, g.options());
  penalty.data_ptr<scalar_t>()[0] = static_cast<scalar_t>(penalty_value(tree_reduce(), Acc(weight), s.n_samples));
  at::Tensor grad_alpha = at::empty({s.n_samples}, g.options());
  for (int64_t i = 0; i < s.n_samples; ++i) {
    grad_alpha.data_ptr<scalar_t>()[i] =
        static_cast<scalar_t>(combine_chunks(alpha_partials.data() + i * s.n_chunks, s.n_chunks));
  }
  return {visits, sumsq, penalty, grad_alpha};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_launch_check(const at::Tensor& grads,
                                                                             const at::Tensor& real,
                                                                             const at::Tensor& fake, double center,
                                                                             bool one_sided, double weight) {
  check_samples(grads, "grads");
  check_like(grads, "grads", real, "real");
  check_like(grads, "grads", fake, "fake");
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  GANOPS_DISPATCH_FLOATING_TYPES(grads.scalar_type(), "gradient_penalty_launch_check", [&] {
    out = launch_check_impl<scalar_t>(grads.contiguous(), real.contiguous(), fake.contiguous(), center, one_sided,
                                      weight);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ganops, CPU, m) {
  m.impl("interpolate", &interpolate_cpu);
  m.impl("interpolate_backward", &interpolate_backward_cpu);
  m.impl("gradient_norm_penalty", &gradient_norm_penalty_cpu);
  m.impl("gradient_norm_penalty_backward", &gradient_norm_penalty_backward_cpu);
  m.impl("_gradient_penalty_cuda_launch_check", &cuda_launch_check);
}

}  // namespace ganops::gradient_penalty
