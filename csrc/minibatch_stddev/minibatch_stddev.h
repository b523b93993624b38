// Math and work split shared by the CPU and CUDA kernels of minibatch standard deviation
// (StyleGAN2's MinibatchStdLayer).
//
// x (N, C, H, W) is viewed as (G, M, F, L): G the group size, M = N / G groups, F stat
// channels and L = (C / F) · H · W "columns" per (group, stat channel). Sample g · M + j is
// member g of group j, so column (j, f, e) holds the G values
//     x[g · M + j, f · C/F + e / (H·W), e % (H·W)],  g = 0 .. G−1,
// at x_index(g, jf, e) with jf = j · F + f. Per column, two passes over its G values:
//     μ = Σ_g y_g / G,   σ = sqrt(Σ_g (y_g − μ)² / G + 1e-8),
// and stat[j, f] = Σ_e σ(j, f, e) / L. The output is cat([x, stat[n % M, f] over H, W], 1).
//
// Backward, with ∂stat[j, f] = Σ_{g, h, w} grad[g · M + j, C + f, h, w] and k = ∂stat / L:
//     ∂x[column value g] = grad[.., :C][same element] + k · (y_g − μ) / (G · σ)
// (the mean's term vanishes: Σ_g (y_g − μ) = 0).
//
// Work split: each (j, f)'s L columns are cut into chunks of kChunkSize; task (CUDA block,
// Triton program, CPU task) b = jf · n_chunks + q handles chunk q of (j, f). The forward puts
// each chunk's Σ σ in its own slot and combines a (j, f)'s slots in chunk order, so results
// do not depend on the thread count or the launch. Indices are 64-bit.
#pragma once

#include <ganops/block.h>
#include <ganops/checks.h>
#include <ganops/common.h>

#include <cmath>

namespace ganops::minibatch_stddev {

constexpr int kThreads = 256;
// Columns per chunk, 2048: 8 per thread at kThreads. (64, 512, 4, 4) with G = 4 (StyleGAN's
// last critic block) splits into 64 tasks and (32, 256, 8, 8) into 64: enough for every CPU
// core. Output elements per block of the CUDA output kernel, 4096: 16 per thread. Written
// once, as WORK_SPLIT in triton_kernels/minibatch_stddev.py; setup.py passes them in.
#if !defined(GANOPS_MINIBATCH_STDDEV_CHUNK_SIZE) || !defined(GANOPS_MINIBATCH_STDDEV_OUTPUT_CHUNK)
#error "GANOPS_MINIBATCH_STDDEV_* undefined: setup.py reads them from triton_kernels/minibatch_stddev.py"
#endif
constexpr int64_t kChunkSize = GANOPS_MINIBATCH_STDDEV_CHUNK_SIZE;
constexpr int64_t kOutputChunk = GANOPS_MINIBATCH_STDDEV_OUTPUT_CHUNK;
// StyleGAN2's epsilon under the square root.
constexpr double kEpsilon = 1e-8;

// x viewed as (G, M, F, L), and the split of each (j, f)'s columns into chunks.
struct Layout {
  int64_t G;         // group size (samples per group)
  int64_t M;         // groups: N / G
  int64_t F;         // stat channels
  int64_t L;         // columns per (j, f): C / F · H · W
  int64_t S;         // H · W
  int64_t n_chunks;  // chunks per (j, f)

  GANOPS_HD int64_t stats() const { return M * F; }
  GANOPS_HD int64_t tasks() const { return M * F * n_chunks; }
  GANOPS_HD int64_t samples() const { return G * M; }
  // C · H · W, and (C + F) · H · W: one sample of x, one of the output (and of grad).
  GANOPS_HD int64_t x_sample_numel() const { return F * L; }
  GANOPS_HD int64_t out_sample_numel() const { return F * L + F * S; }

  // Element (g, jf, e) of x: sample g · M + j, offset f · L + e within it.
  GANOPS_HD int64_t x_index(int64_t g, int64_t jf, int64_t e) const { return (g * M * F + jf) * L + e; }
  // The same element of an output-shaped tensor (the output, or grad): its first C channels.
  GANOPS_HD int64_t out_index(int64_t g, int64_t jf, int64_t e) const {
    const int64_t j = jf / F, f = jf - j * F;
    return (g * M + j) * out_sample_numel() + f * L + e;
  }
  // Pixel s of stat channel f of sample g · M + j in an output-shaped tensor.
  GANOPS_HD int64_t stat_channel_index(int64_t g, int64_t jf, int64_t s) const {
    const int64_t j = jf / F, f = jf - j * F;
    return (g * M + j) * out_sample_numel() + F * L + f * S + s;
  }

  // Task b's (j, f), its chunk's first column and the chunk's length.
  GANOPS_HD int64_t task_stat(int64_t b) const { return b / n_chunks; }
  GANOPS_HD int64_t task_start(int64_t b) const { return (b % n_chunks) * kChunkSize; }
  GANOPS_HD int64_t task_length(int64_t b) const {
    const int64_t rest = L - task_start(b);
    return rest < kChunkSize ? rest : kChunkSize;
  }
};

GANOPS_HD Layout make_layout(int64_t n, int64_t c, int64_t h, int64_t w, int64_t group_size, int64_t num_channels) {
  const int64_t S = h * w;
  const int64_t L = c / num_channels * S;
  return {group_size, n / group_size, num_channels, L, S, ceil_div(L, kChunkSize)};
}

// The statistics of one column.
template <typename Acc>
struct ColumnStats {
  Acc mean;
  Acc std;
};

template <typename Acc>
GANOPS_HD Acc group_mean(Acc sum, int64_t G) { return sum / Acc(G); }

// The correctly rounded square root in Acc. On the host std::sqrt: the global ::sqrt takes a
// float through double, and sqrtsd is slower than sqrtss ((64, 512, 4, 4) forward, one thread:
// 0.77 ms with ::sqrt, 0.65 ms with std::sqrt).
template <typename Acc>
GANOPS_HD Acc square_root(Acc v) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(v);
#else
  return std::sqrt(v);
#endif
}

// Σ (y − μ)² / G + 1e-8: StyleGAN's variance (divisor G) and epsilon, under the square root.
template <typename Acc>
GANOPS_HD Acc group_variance_eps(Acc sum_sq, int64_t G) { return sum_sq / Acc(G) + Acc(kEpsilon); }

template <typename Acc>
GANOPS_HD Acc group_std(Acc sum_sq, int64_t G) { return square_root(group_variance_eps(sum_sq, G)); }

// μ and σ of the column whose value g is load(g) (in Acc): Σ in g order, then Σ (y − μ)².
template <typename Acc, typename Load>
GANOPS_HD ColumnStats<Acc> column_stats(int64_t G, Load&& load) {
  Acc sum = Acc(0);
  for (int64_t g = 0; g < G; ++g) sum += load(g);
  const Acc mean = group_mean(sum, G);
  Acc sum_sq = Acc(0);
  for (int64_t g = 0; g < G; ++g) {
    const Acc d = load(g) - mean;
    sum_sq += d * d;
  }
  return {mean, group_std(sum_sq, G)};
}

// The stats kernel's per-thread work: Σ σ over the columns tid, tid + nthreads, ... of task b;
// visit(k) is called with each element of x the thread reads.
template <typename Acc, typename T, typename Visit>
GANOPS_HD Acc stats_thread_sum(const T* x, const Layout& l, int64_t b, int tid, int nthreads, Visit&& visit) {
  const int64_t jf = l.task_stat(b), start = l.task_start(b);
  Acc acc = Acc(0);
  for_each_thread_element(l.task_length(b), tid, nthreads, [&](int64_t i) {
    const int64_t e = start + i;
    acc += column_stats<Acc>(l.G, [&](int64_t g) { return static_cast<Acc>(x[l.x_index(g, jf, e)]); }).std;
    for (int64_t g = 0; g < l.G; ++g) visit(l.x_index(g, jf, e));
  });
  return acc;
}

// stat[jf] = Σ_q partials[jf · n_chunks + q] / L, the chunks in order.
template <typename Acc>
GANOPS_HD Acc finish_stat(const Acc* partials, const Layout& l, int64_t jf) {
  Acc acc = Acc(0);
  for (int64_t q = 0; q < l.n_chunks; ++q) acc += partials[jf * l.n_chunks + q];
  return acc / Acc(l.L);
}

// Output element o (flat index into (N, C + F, H, W)): x's value, or its group's stat.
template <typename T, typename Acc>
GANOPS_HD T output_value(const T* x, const Acc* stat, const Layout& l, int64_t o) {
  const int64_t per_sample = l.out_sample_numel();
  const int64_t n = o / per_sample;
  const int64_t r = o - n * per_sample;
  const int64_t cs = l.x_sample_numel();
  if (r < cs) return x[n * cs + r];
  return static_cast<T>(stat[(n % l.M) * l.F + (r - cs) / l.S]);
}

// The output kernel's per-thread work: block b writes output elements [b · kOutputChunk,
// (b + 1) · kOutputChunk) of `total`, thread tid those at tid, tid + nthreads, ...
template <typename T, typename Acc, typename Visit>
GANOPS_HD void output_thread(const T* x, const Acc* stat, T* out, const Layout& l, int64_t total, int64_t b, int tid,
                             int nthreads, Visit&& visit) {
  const int64_t offset = b * kOutputChunk;
  const int64_t rest = total - offset;
  for_each_thread_element(rest < kOutputChunk ? rest : kOutputChunk, tid, nthreads, [&](int64_t i) {
    out[offset + i] = output_value(x, stat, l, offset + i);
    visit(offset + i);
  });
}

// The backward's first kernel, per thread: its part of Σ over (g, s) of grad's stat channel f
// in group j, elements t = g · S + s visited as tid, tid + nthreads, ...; visit(k) is called
// with each element of grad it reads.
template <typename Acc, typename T, typename Visit>
GANOPS_HD Acc stat_grad_thread_sum(const T* grad, const Layout& l, int64_t jf, int tid, int nthreads, Visit&& visit) {
  Acc acc = Acc(0);
  for_each_thread_element(l.G * l.S, tid, nthreads, [&](int64_t t) {
    const int64_t g = t / l.S;
    const int64_t k = l.stat_channel_index(g, jf, t - g * l.S);
    acc += static_cast<Acc>(grad[k]);
    visit(k);
  });
  return acc;
}

// k = ∂stat / L: the stat is a mean over the L columns.
template <typename Acc>
GANOPS_HD Acc stat_grad_coefficient(Acc stat_grad, int64_t L) { return stat_grad / Acc(L); }

// ∂x of one column given its μ and σ: value g gets grad + k / (G · σ) · (y_g − μ).
template <typename Acc>
GANOPS_HD Acc column_grad_scale(Acc k, const ColumnStats<Acc>& s, int64_t G) { return k / (Acc(G) * s.std); }

template <typename Acc>
GANOPS_HD Acc x_grad(Acc grad, Acc y, Acc mean, Acc scale) { return grad + scale * (y - mean); }

// The backward kernel's per-thread work: ∂x of the columns tid, tid + nthreads, ... of task
// b; visit(k) is called with each element of x it writes.
template <typename Acc, typename T, typename Visit>
GANOPS_HD void backward_thread(const T* grad, const T* x, const Acc* coefficients, T* grad_x, const Layout& l,
                               int64_t b, int tid, int nthreads, Visit&& visit) {
  const int64_t jf = l.task_stat(b), start = l.task_start(b);
  const Acc k = coefficients[jf];
  for_each_thread_element(l.task_length(b), tid, nthreads, [&](int64_t i) {
    const int64_t e = start + i;
    const ColumnStats<Acc> s =
        column_stats<Acc>(l.G, [&](int64_t g) { return static_cast<Acc>(x[l.x_index(g, jf, e)]); });
    const Acc scale = column_grad_scale(k, s, l.G);
    for (int64_t g = 0; g < l.G; ++g) {
      const int64_t xi = l.x_index(g, jf, e);
      grad_x[xi] = static_cast<T>(
          x_grad(static_cast<Acc>(grad[l.out_index(g, jf, e)]), static_cast<Acc>(x[xi]), s.mean, scale));
      visit(xi);
    }
  });
}

// Host side, shared by the CPU and CUDA kernels: x is a non-empty (N, C, H, W) float tensor on
// `device`, group_size divides N and num_channels divides C (Python resolves group_size to
// min(group_size, N) first).
inline Layout check_input(const Tensor& x, int64_t group_size, int64_t num_channels, DeviceType device) {
  check_float(x, "x");
  STD_TORCH_CHECK(x.device().type() == device, "x must be a ", device_type_text(device, true), " tensor here, got ", device_text(x));
  STD_TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C, H, W), got shape ", shape_text(x));
  STD_TORCH_CHECK(x.numel() > 0, "x must have at least one element in each of N, C, H, W, got shape ", shape_text(x));
  STD_TORCH_CHECK(group_size >= 1 && group_size <= x.size(0) && x.size(0) % group_size == 0, "group_size ", group_size,
              " must divide the batch size N of x, shape ", shape_text(x));
  STD_TORCH_CHECK(num_channels >= 1 && x.size(1) % num_channels == 0, "num_channels ", num_channels,
              " must divide the channel count C of x, shape ", shape_text(x));
  return make_layout(x.size(0), x.size(1), x.size(2), x.size(3), group_size, num_channels);
}

// grad has the output's shape (N, C + F, H, W) and x's dtype and device.
inline void check_grad(const Tensor& grad, const Tensor& x, int64_t num_channels) {
  STD_TORCH_CHECK(grad.dim() == 4 && grad.size(0) == x.size(0) && grad.size(1) == x.size(1) + num_channels &&
                  grad.size(2) == x.size(2) && grad.size(3) == x.size(3),
              "grad must have the output's shape (N, C + num_channels, H, W) = (", x.size(0), ", ",
              x.size(1) + num_channels, ", ", x.size(2), ", ", x.size(3), "), got ", shape_text(grad));
  check_float(grad, "grad");
  STD_TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "grad must have x's dtype ", x.scalar_type(), ", got ",
              grad.scalar_type());
  check_same_device(grad, "grad", x, "x");
}

}  // namespace ganops::minibatch_stddev
