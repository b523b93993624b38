// Math and work split shared by the CPU and CUDA kernels of the gradient penalty.
//
// Every tensor here is viewed as (N, M): N samples of M = numel / N elements. Each sample is
// cut into chunks of kChunkSize elements; chunk c of sample i covers elements
// [c * kChunkSize, min((c + 1) * kChunkSize, M)) of that sample. One CUDA block (one Triton
// program, one CPU task) handles one (sample, chunk). Per-sample reductions put each chunk's
// partial in its own slot and combine a sample's slots in chunk order, so results do not
// depend on the thread count or the launch.
//
//   interpolate:  x̂[i, j] = α_i · real[i, j] + (1 − α_i) · fake[i, j]
//   backward:     ∂real = α_i · g,  ∂fake = (1 − α_i) · g,  ∂α_i = Σ_j g[i, j] (real − fake)[i, j]
//   penalty:      n_i = ‖s · grads[i]‖₂ (s the inverse loss scale, 1 without a scaler)
//                 P = weight / N · Σ_i h(n_i),  h(n) = (n − center)²  or  max(0, n − center)²
//   backward:     ∂P/∂grads[i] = ∂P · weight / N · h'(n_i) / n_i · s² · grads[i]
#pragma once

#include <ganops/block.h>
#include <ganops/checks.h>
#include <ganops/common.h>

#include <cmath>
#include <optional>
#include <string_view>

namespace ganops::gradient_penalty {

constexpr int kThreads = 256;
// Elements per chunk, 16384: 64 per thread at kThreads, and a (64, 3, 64, 64) gradient
// splits into 64 CPU tasks, enough to keep every core busy. Written once, as WORK_SPLIT in
// triton_kernels/gradient_penalty.py; setup.py passes it in (see its docstring).
#ifndef GANOPS_GRADIENT_PENALTY_CHUNK_SIZE
#error "GANOPS_GRADIENT_PENALTY_CHUNK_SIZE undefined: setup.py reads it from triton_kernels/gradient_penalty.py"
#endif
constexpr int64_t kChunkSize = GANOPS_GRADIENT_PENALTY_CHUNK_SIZE;

// A tensor viewed as (N, M) and cut into its (sample, chunk) pieces, numbered
// b = sample * n_chunks + chunk: CUDA block b, CPU task b.
struct SampleChunks {
  int64_t n_samples;     // N
  int64_t sample_numel;  // M
  int64_t n_chunks;      // per sample

  GANOPS_HD int64_t total_chunks() const { return n_samples * n_chunks; }
  GANOPS_HD int64_t sample(int64_t b) const { return b / n_chunks; }
  // Piece b's first element in the tensor, and its length.
  GANOPS_HD int64_t offset(int64_t b) const { return sample(b) * sample_numel + (b % n_chunks) * kChunkSize; }
  GANOPS_HD int64_t length(int64_t b) const {
    const int64_t rest = sample_numel - (b % n_chunks) * kChunkSize;
    return rest < kChunkSize ? rest : kChunkSize;
  }
};

// The sum one thread makes of term(i) over its elements of a chunk.
template <typename Acc, typename Term>
GANOPS_HD Acc thread_sum(int64_t chunk_len, int tid, int nthreads, Term&& term) {
  Acc acc = Acc(0);
  for_each_thread_element(chunk_len, tid, nthreads, [&](int64_t i) { acc += term(i); });
  return acc;
}

// One sample's total from its chunk partials, in chunk order.
template <typename Acc>
GANOPS_HD Acc combine_chunks(const Acc* partials, int64_t n_chunks) {
  Acc acc = Acc(0);
  for (int64_t c = 0; c < n_chunks; ++c) acc += partials[c];
  return acc;
}

// One element's term of the sum of squares of the unscaled gradient: (s · g)².
template <typename Acc>
GANOPS_HD Acc unscaled_square(Acc g, Acc inv_scale) {
  const Acc v = inv_scale * g;
  return v * v;
}

// One element's term of ∂α_i: g · (real − fake).
template <typename Acc>
GANOPS_HD Acc alpha_grad_term(Acc g, Acc real, Acc fake) {
  return g * (real - fake);
}

template <typename Acc>
GANOPS_HD Acc interpolate_value(Acc real, Acc fake, Acc alpha) {
  return alpha * real + (Acc(1) - alpha) * fake;
}

// h(n) from the sum of squares n² of the unscaled gradient. With center 0 (R1), h is n²
// itself, taken from the sum of squares without a square root and its rounding.
// A NaN norm fails `d < 0` and stays NaN: a non-finite gradient is never hidden.
template <typename Acc>
GANOPS_HD Acc penalty_term(Acc sumsq, Acc center, bool one_sided) {
  if (center == Acc(0)) return sumsq;
  Acc d = ::sqrt(sumsq) - center;
  if (one_sided && d < Acc(0)) d = Acc(0);
  return d * d;
}

// h'(n) / n, so that ∂h/∂g = (h'(n) / n) · g. At n = 0 the gradient g is the zero vector
// and so is ∂h/∂g, whatever the undefined direction g / n: the factor is 0, never NaN.
// An infinite n gives inf / inf = NaN, so a non-finite gradient stays visible.
template <typename Acc>
GANOPS_HD Acc penalty_factor(Acc sumsq, Acc center, bool one_sided) {
  if (center == Acc(0)) return Acc(2);
  const Acc n = ::sqrt(sumsq);
  Acc d = n - center;
  if (one_sided && d < Acc(0)) d = Acc(0);
  return n == Acc(0) ? Acc(0) : Acc(2) * d / n;
}

// weight · mean_i h(n_i), from Σ_i h(n_i): the order of the canonical `mean() * weight`.
template <typename Acc>
GANOPS_HD Acc penalty_value(Acc total, Acc weight, int64_t n_samples) {
  return total / Acc(n_samples) * weight;
}

// The factor every element of sample i is multiplied by in the penalty's backward:
// ∂P · weight / N · h'(n_i) / n_i · s².
template <typename Acc>
GANOPS_HD Acc penalty_grad_scale(Acc grad_penalty, Acc sumsq, Acc inv_scale, Acc center, bool one_sided,
                                 Acc weight, int64_t n_samples) {
  return grad_penalty * (weight / Acc(n_samples)) * penalty_factor(sumsq, center, one_sided) * inv_scale *
         inv_scale;
}

// The finishing step's per-thread work: thread tid combines, in chunk order, the partials of
// samples tid, tid + nthreads, ..., writes each sample's sum of squares, and returns the sum
// of their penalty terms for the block's tree reduction.
template <typename Acc>
GANOPS_HD Acc finish_thread(const Acc* partials, int64_t n_samples, int64_t n_chunks, int tid, int nthreads,
                            Acc center, bool one_sided, Acc* sumsq) {
  Acc local = Acc(0);
  for (int64_t i = tid; i < n_samples; i += nthreads) {
    const Acc ss = combine_chunks(partials + i * n_chunks, n_chunks);
    sumsq[i] = ss;
    local += penalty_term(ss, center, one_sided);
  }
  return local;
}

// Host side, the checks of the CPU and CUDA kernels (Python checks first, naming the public
// arguments; these guard direct torch.ops calls).

// t holds samples on a device of type `device`; returns its (sample, chunk) split.
inline SampleChunks check_samples(const Tensor& t, std::string_view name, DeviceType device) {
  check_float(t, name);
  STD_TORCH_CHECK(t.device().type() == device, name, " must be a ", device_type_text(device), " tensor here, got ",
              device_text(t));
  STD_TORCH_CHECK(t.dim() >= 1 && t.size(0) > 0 && t.numel() > 0, name,
              " must have a batch dimension and at least one element per sample, got shape ", shape_text(t));
  const int64_t n = t.size(0);
  const int64_t m = t.numel() / n;
  return {n, m, ceil_div(m, kChunkSize)};
}

// The inverse loss scale, when given: one value in the accumulation dtype on grads' device.
inline void check_inv_scale(const std::optional<Tensor>& inv_scale, const Tensor& grads) {
  if (!inv_scale.has_value()) return;
  const Tensor& s = *inv_scale;
  STD_TORCH_CHECK(s.numel() == 1, "inv_scale must hold one value, got shape ", shape_text(s));
  STD_TORCH_CHECK(s.scalar_type() == acc_dtype(grads.scalar_type()), "inv_scale must be ",
              acc_dtype(grads.scalar_type()), " for ", grads.scalar_type(), " grads, got ", s.scalar_type());
  check_same_device(s, "inv_scale", grads, "grads");
}

// gradient_norm_penalty_backward's inputs besides inv_scale; returns grads' split.
inline SampleChunks check_penalty_backward_inputs(const Tensor& grad_penalty, const Tensor& grads,
                                                  const Tensor& sumsq, DeviceType device) {
  const SampleChunks s = check_samples(grads, "grads", device);
  STD_TORCH_CHECK(grad_penalty.numel() == 1, "grad_penalty must hold one value, got shape ", shape_text(grad_penalty));
  check_float(grad_penalty, "grad_penalty");
  check_same_device(grad_penalty, "grad_penalty", grads, "grads");
  STD_TORCH_CHECK(sumsq.dim() == 1 && sumsq.size(0) == s.n_samples, "sumsq must have shape (", s.n_samples,
              ",), got ", shape_text(sumsq));
  STD_TORCH_CHECK(sumsq.scalar_type() == acc_dtype(grads.scalar_type()), "sumsq must be ",
              acc_dtype(grads.scalar_type()), ", got ", sumsq.scalar_type());
  check_same_device(sumsq, "sumsq", grads, "grads");
  return s;
}

// interpolate's inputs: real and fake alike, alpha one value per sample. Returns real's split.
inline SampleChunks check_interpolate_inputs(const Tensor& real, const Tensor& fake, const Tensor& alpha,
                                             DeviceType device) {
  const SampleChunks s = check_samples(real, "real", device);
  check_like(real, "real", fake, "fake");
  STD_TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) == real.size(0), "alpha must have shape (", real.size(0),
              ",), got ", shape_text(alpha));
  STD_TORCH_CHECK(alpha.scalar_type() == real.scalar_type(), "alpha must have real's dtype ", real.scalar_type(),
              ", got ", alpha.scalar_type());
  check_same_device(alpha, "alpha", real, "real");
  return s;
}

// interpolate_backward's inputs: interpolate's, and grad like real.
inline SampleChunks check_interpolate_backward_inputs(const Tensor& grad, const Tensor& real,
                                                      const Tensor& fake, const Tensor& alpha,
                                                      DeviceType device) {
  const SampleChunks s = check_interpolate_inputs(real, fake, alpha, device);
  check_like(grad, "grad", real, "real");
  return s;
}

}  // namespace ganops::gradient_penalty
