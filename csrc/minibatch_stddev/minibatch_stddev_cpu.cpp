// CPU kernels of minibatch standard deviation.
//
// The forward makes one pass over x for the statistics (a task per (j, f, chunk) of
// minibatch_stddev.h, each chunk's Σ σ in its own slot, a (j, f)'s slots combined in chunk
// order) and one to write the output (a task per run of samples). The backward sums grad's
// stat channels per (j, f) (a small pass over F / (C + F) of grad), then makes one pass over
// x and grad's first C channels. Results are bit-identical whatever the thread count.
//
// Columns are taken kTile at a time, with the loops over a tile innermost so they vectorise;
// every column's μ and σ are computed in column_stats' order, so a tile's values are the
// ones the CUDA kernels' per-column functions give. On x86-64 the tasks are also compiled for
// AVX2 and AVX-512 and picked at run time (ganops/isa.h), every version with the same
// separately rounded operations (no FMA contraction), so they give the same bits.

// Before the includes, so that isa.h's entry points are compiled under it too.
#pragma GCC optimize("fp-contract=off")


#include <ganops/checks.h>
#include <ganops/dispatch.h>
#include <ganops/isa.h>
#include <ganops/lanes.h>
#include <ganops/registration.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "minibatch_stddev/minibatch_stddev.h"

namespace ganops::minibatch_stddev {
namespace {

// Below this many elements per thread, splitting costs more than it saves.
constexpr int64_t kMinElementsPerThread = 32768;
// Columns per tile: 32 float32 lanes are two AVX-512 or four AVX2 vectors per loop.
constexpr int kTile = 32;

// Runs task(b) for b in [0, n), in parallel, compiled for the best ISA this CPU has;
// `per_task` elements of work per task set how many tasks a thread takes at the least.
template <typename F>
void for_each_task(int64_t n, int64_t per_task, F&& task) {
  const int64_t grain = ceil_div(kMinElementsPerThread, std::max<int64_t>(per_task, 1));
  torch::stable::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    run_for_best_isa<Isa::kAvx512, Isa::kAvx2>([&] {
      for (int64_t b = begin; b < end; ++b) task(b);
    });
  });
}

// v[i] = sqrt(v[i]) for the kTile values of a tile, correctly rounded as std::sqrt. GCC keeps
// std::sqrt scalar (it may set errno, and setup.py compiles without -fno-math-errno): scalar
// square roots took two thirds of the stats pass; SSE2's take four floats or two doubles at a
// time, with the same IEEE rounding.
template <typename Acc>
inline void tile_sqrt(Acc* v) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<Acc, float>) {
    for (int i = 0; i < kTile; i += 4) _mm_storeu_ps(v + i, _mm_sqrt_ps(_mm_loadu_ps(v + i)));
  } else {
    for (int i = 0; i < kTile; i += 2) _mm_storeu_pd(v + i, _mm_sqrt_pd(_mm_loadu_pd(v + i)));
  }
#else
  for (int i = 0; i < kTile; ++i) v[i] = std::sqrt(v[i]);
#endif
}

// μ and σ of the kTile columns e0, ..., e0 + kTile − 1 of jf, in column_stats' order.
template <typename Acc, typename T>
inline void tile_stats(const T* x, const Layout& l, int64_t jf, int64_t e0, Acc* mean, Acc* std) {
  Acc sum[kTile] = {};
  for (int64_t g = 0; g < l.G; ++g) {
    const T* row = x + l.x_index(g, jf, e0);
    for (int i = 0; i < kTile; ++i) sum[i] += static_cast<Acc>(row[i]);
  }
  for (int i = 0; i < kTile; ++i) mean[i] = group_mean(sum[i], l.G);
  Acc sum_sq[kTile] = {};
  for (int64_t g = 0; g < l.G; ++g) {
    const T* row = x + l.x_index(g, jf, e0);
    for (int i = 0; i < kTile; ++i) {
      const Acc d = static_cast<Acc>(row[i]) - mean[i];
      sum_sq[i] += d * d;
    }
  }
  for (int i = 0; i < kTile; ++i) std[i] = group_variance_eps(sum_sq[i], l.G);
  tile_sqrt(std);
}

template <typename Acc, typename T>
ColumnStats<Acc> one_column_stats(const T* x, const Layout& l, int64_t jf, int64_t e) {
  return column_stats<Acc>(l.G, [&](int64_t g) { return static_cast<Acc>(x[l.x_index(g, jf, e)]); });
}

// Task b's Σ σ: column e0 + i of each whole tile in lane i, the tail's columns in lane 0, the
// lanes combined in a fixed tree.
template <typename Acc, typename T>
Acc stats_partial(const T* x, const Layout& l, int64_t b) {
  const int64_t jf = l.task_stat(b), start = l.task_start(b), length = l.task_length(b);
  Acc lanes[kTile] = {};
  Acc mean[kTile], std[kTile];
  int64_t i = 0;
  for (; i + kTile <= length; i += kTile) {
    tile_stats(x, l, jf, start + i, mean, std);
    for (int t = 0; t < kTile; ++t) lanes[t] += std[t];
  }
  for (; i < length; ++i) lanes[0] += one_column_stats<Acc>(x, l, jf, start + i).std;
  for (int w = kTile / 2; w > 0; w /= 2) {
    for (int t = 0; t < w; ++t) lanes[t] += lanes[t + w];
  }
  return lanes[0];
}

Tensor minibatch_stddev_cpu(const Tensor& x, int64_t group_size, int64_t num_channels) {
  const Layout l = check_input(x, group_size, num_channels, DeviceType::CPU);
  const Tensor xc = as_contiguous(x);
  Tensor out = empty({x.size(0), x.size(1) + num_channels, x.size(2), x.size(3)}, options(xc));
  GANOPS_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "minibatch_stddev_cpu", [&] {
    using Acc = acc_t<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    std::vector<Acc> partials(l.tasks());
    for_each_task(l.tasks(), std::min(l.L, kChunkSize) * l.G,
                  [&](int64_t b) { partials[b] = stats_partial<Acc>(xp, l, b); });
    std::vector<scalar_t> stat(l.stats());
    for (int64_t jf = 0; jf < l.stats(); ++jf) stat[jf] = static_cast<scalar_t>(finish_stat(partials.data(), l, jf));
    const int64_t cs = l.x_sample_numel(), per_sample = l.out_sample_numel();
    for_each_task(l.samples(), per_sample, [&](int64_t n) {
      std::copy(xp + n * cs, xp + (n + 1) * cs, op + n * per_sample);
      for (int64_t f = 0; f < l.F; ++f) {
        scalar_t* dst = op + n * per_sample + cs + f * l.S;
        std::fill(dst, dst + l.S, stat[(n % l.M) * l.F + f]);
      }
    });
  });
  return out;
}
GANOPS_KERNEL(CPU, "minibatch_stddev", minibatch_stddev_cpu)

Tensor minibatch_stddev_backward_cpu(const Tensor& grad, const Tensor& x, int64_t group_size,
                                         int64_t num_channels) {
  const Layout l = check_input(x, group_size, num_channels, DeviceType::CPU);
  check_grad(grad, x, num_channels);
  const Tensor xc = as_contiguous(x), gc = as_contiguous(grad);
  Tensor grad_x = empty(xc.sizes(), xc);
  GANOPS_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "minibatch_stddev_backward_cpu", [&] {
    using Acc = acc_t<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    // k[jf] = Σ_g Σ_s grad[g · M + j, C + f, s] / L: each sample's H · W values in lanes,
    // the samples in order.
    std::vector<Acc> k(l.stats());
    for_each_task(l.stats(), l.G * l.S, [&](int64_t jf) {
      Acc acc = Acc(0);
      for (int64_t g = 0; g < l.G; ++g) {
        const scalar_t* row = gp + l.stat_channel_index(g, jf, 0);
        acc += lane_reduce<Acc>(l.S, [&](int64_t s) { return static_cast<Acc>(row[s]); }, Plus{});
      }
      k[jf] = stat_grad_coefficient(acc, l.L);
    });
    for_each_task(l.tasks(), 2 * std::min(l.L, kChunkSize) * l.G, [&](int64_t b) {
      const int64_t jf = l.task_stat(b), start = l.task_start(b), length = l.task_length(b);
      Acc mean[kTile], std[kTile], scale[kTile];
      int64_t i = 0;
      for (; i + kTile <= length; i += kTile) {
        const int64_t e0 = start + i;
        tile_stats(xp, l, jf, e0, mean, std);
        for (int t = 0; t < kTile; ++t) scale[t] = column_grad_scale(k[jf], ColumnStats<Acc>{mean[t], std[t]}, l.G);
        for (int64_t g = 0; g < l.G; ++g) {
          const scalar_t* xr = xp + l.x_index(g, jf, e0);
          const scalar_t* gr = gp + l.out_index(g, jf, e0);
          scalar_t* dst = gxp + l.x_index(g, jf, e0);
          for (int t = 0; t < kTile; ++t) {
            dst[t] = static_cast<scalar_t>(
                x_grad(static_cast<Acc>(gr[t]), static_cast<Acc>(xr[t]), mean[t], scale[t]));
          }
        }
      }
      for (; i < length; ++i) {
        const int64_t e = start + i;
        const ColumnStats<Acc> s = one_column_stats<Acc>(xp, l, jf, e);
        const Acc sc = column_grad_scale(k[jf], s, l.G);
        for (int64_t g = 0; g < l.G; ++g) {
          const int64_t xi = l.x_index(g, jf, e);
          gxp[xi] = static_cast<scalar_t>(
              x_grad(static_cast<Acc>(gp[l.out_index(g, jf, e)]), static_cast<Acc>(xp[xi]), s.mean, sc));
        }
      }
    });
  });
  return grad_x;
}
GANOPS_KERNEL(CPU, "minibatch_stddev_backward", minibatch_stddev_backward_cpu)

}  // namespace

}  // namespace ganops::minibatch_stddev
