// CPU kernels of spectral normalization.
//
// W x runs row by row (at::parallel_for over rows, each row one vectorised dot product);
// W^T x runs over blocks of columns, each block accumulating every row in order into a
// small array that stays in L1. Every output element is made by one task in a fixed order,
// and the norms are sequential, so results are bit-identical whatever the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <ganops/checks.h>
#include <ganops/dispatch.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "spectral_norm/spectral_norm.h"

namespace ganops::spectral_norm {
namespace {

// Elements per parallel task, below which a task is not worth a thread (64x48 runs inline).
constexpr int64_t kGrainElements = 32768;
// Columns per W^T x task: 512 float accumulators (2 KiB) stay in L1 while rows stream by.
constexpr int64_t kColBlock = 512;
// Independent accumulators of the dot products: 8 vectors hide the add latency (16 scalar
// lanes, the first try, ran 2x slower than torch.mv on 512x4608 float32).
constexpr int kVecAccs = 8;

#define GANOPS_ALWAYS_INLINE inline __attribute__((always_inline))

// 32-byte vectors (GCC/Clang vector extensions): one AVX register, or two SSE registers on
// the baseline ISA. The reduction order is fixed by the code, not by the compiler.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
};
template <typename T>
using vec_t = typename Vec<T>::type;

template <typename T>
GANOPS_ALWAYS_INLINE vec_t<T> load_vec(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// a . b for float and double: kVecAccs vector accumulators over the bulk, one over the
// remaining whole vectors, a scalar over the tail, combined pairwise in a fixed order.
template <typename T>
GANOPS_ALWAYS_INLINE T dot_vectorized(const T* a, const T* b, int64_t n) {
  constexpr int W = sizeof(vec_t<T>) / sizeof(T);
  vec_t<T> acc[kVecAccs] = {};
  int64_t k = 0;
  for (; k + W * kVecAccs <= n; k += W * kVecAccs) {
    for (int l = 0; l < kVecAccs; ++l) acc[l] += load_vec(a + k + l * W) * load_vec(b + k + l * W);
  }
  for (; k + W <= n; k += W) acc[0] += load_vec(a + k) * load_vec(b + k);
  for (int w = kVecAccs / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  T lanes[W];
  std::memcpy(lanes, &acc[0], sizeof(lanes));
  for (int w = W / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  }
  T tail = T(0);
  for (; k < n; ++k) tail += a[k] * b[k];
  return lanes[0] + tail;
}

// a . b for half types, converted and accumulated in float over 16 lanes.
template <typename T, typename Acc>
GANOPS_ALWAYS_INLINE Acc dot_converted(const T* a, const T* b, int64_t n) {
  constexpr int L = 16;
  Acc lanes[L] = {};
  int64_t k = 0;
  for (; k + L <= n; k += L) {
    for (int l = 0; l < L; ++l) lanes[l] += Acc(a[k + l]) * Acc(b[k + l]);
  }
  for (; k < n; ++k) lanes[0] += Acc(a[k]) * Acc(b[k]);
  for (int w = L / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  }
  return lanes[0];
}

template <typename T, typename Acc>
GANOPS_ALWAYS_INLINE Acc dot_body(const T* a, const T* b, int64_t n) {
  if constexpr (std::is_same_v<T, Acc>) {
    return dot_vectorized<T>(a, b, n);
  } else {
    return dot_converted<T, Acc>(a, b, n);
  }
}

// t[i] = (W x)[i] for rows [begin, end): row i is the segments (a, i) of `inner` contiguous
// elements, a = 0 .. outer - 1.
template <typename T, typename Acc>
GANOPS_ALWAYS_INLINE void mat_vec_rows_body(const T* w, const T* x, MatrixShape s, int64_t begin, int64_t end,
                                            Acc* t) {
  for (int64_t i = begin; i < end; ++i) {
    Acc acc = Acc(0);
    for (int64_t a = 0; a < s.outer; ++a) {
      acc += dot_body<T, Acc>(w + (a * s.rows + i) * s.inner, x + a * s.inner, s.inner);
    }
    t[i] = acc;
  }
}

// out[0 .. len) = (W^T x)[a * inner + b0 ...], every row added in row order. Four rows per
// sweep over the accumulators (written as four sequential additions, so the order and the
// result are those of one row at a time) cut the accumulator traffic fourfold.
template <typename T, typename Acc>
GANOPS_ALWAYS_INLINE void mat_t_vec_block_body(const T* w, const T* x, MatrixShape s, int64_t a, int64_t b0,
                                               int64_t len, Acc* out) {
  Acc acc[kColBlock];
  for (int64_t b = 0; b < len; ++b) acc[b] = Acc(0);
  const int64_t stride = s.inner;
  const T* base = w + a * s.rows * s.inner + b0;
  int64_t i = 0;
  for (; i + 4 <= s.rows; i += 4) {
    const Acc x0 = Acc(x[i]), x1 = Acc(x[i + 1]), x2 = Acc(x[i + 2]), x3 = Acc(x[i + 3]);
    const T* r0 = base + i * stride;
    const T* r1 = r0 + stride;
    const T* r2 = r1 + stride;
    const T* r3 = r2 + stride;
    for (int64_t b = 0; b < len; ++b) {
      acc[b] = (((acc[b] + x0 * Acc(r0[b])) + x1 * Acc(r1[b])) + x2 * Acc(r2[b])) + x3 * Acc(r3[b]);
    }
  }
  for (; i < s.rows; ++i) {
    const Acc xi = Acc(x[i]);
    const T* row = base + i * stride;
    for (int64_t b = 0; b < len; ++b) acc[b] = acc[b] + xi * Acc(row[b]);
  }
  for (int64_t b = 0; b < len; ++b) out[b] = acc[b];
}

template <typename T, typename Acc>
GANOPS_ALWAYS_INLINE void scale_range_body(const T* w, int64_t n, Acc inv, T* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<T>(Acc(w[k]) * inv);
}

// dW = G / sigma - coef u v^T over segments [begin, end), segment (a, i) = a * rows + i.
template <typename T, typename Acc>
GANOPS_ALWAYS_INLINE void grad_segments_body(const T* g, const T* u, const T* v, MatrixShape s, int64_t begin,
                                             int64_t end, Acc inv, Acc coef, T* out) {
  for (int64_t seg = begin; seg < end; ++seg) {
    const Acc cu = coef * Acc(u[seg % s.rows]);
    const T* vs = v + (seg / s.rows) * s.inner;
    const int64_t k0 = seg * s.inner;
    for (int64_t b = 0; b < s.inner; ++b) out[k0 + b] = static_cast<T>(Acc(g[k0 + b]) * inv - cu * Acc(vs[b]));
  }
}

// The leaf kernels, compiled once for the baseline ISA and once for AVX + FMA (picked at run
// time): torch's own elementwise kernels on this class of CPU are baseline, but its BLAS
// matrix-vector products use AVX, and so must ours to keep up.
#define GANOPS_SPECTRAL_NORM_LEAVES(ATTR)                                                                      \
  template <typename T, typename Acc>                                                                         \
  ATTR Acc dot(const T* a, const T* b, int64_t n) {                                                           \
    return dot_body<T, Acc>(a, b, n);                                                                         \
  }                                                                                                           \
  template <typename T, typename Acc>                                                                         \
  ATTR void mat_vec_rows(const T* w, const T* x, MatrixShape s, int64_t begin, int64_t end, Acc* t) {         \
    mat_vec_rows_body<T, Acc>(w, x, s, begin, end, t);                                                        \
  }                                                                                                           \
  template <typename T, typename Acc>                                                                         \
  ATTR void mat_t_vec_block(const T* w, const T* x, MatrixShape s, int64_t a, int64_t b0, int64_t len,        \
                            Acc* out) {                                                                       \
    mat_t_vec_block_body<T, Acc>(w, x, s, a, b0, len, out);                                                   \
  }                                                                                                           \
  template <typename T, typename Acc>                                                                         \
  ATTR void scale_range(const T* w, int64_t n, Acc inv, T* out) {                                             \
    scale_range_body<T, Acc>(w, n, inv, out);                                                                 \
  }                                                                                                           \
  template <typename T, typename Acc>                                                                         \
  ATTR void grad_segments(const T* g, const T* u, const T* v, MatrixShape s, int64_t begin, int64_t end,      \
                          Acc inv, Acc coef, T* out) {                                                        \
    grad_segments_body<T, Acc>(g, u, v, s, begin, end, inv, coef, out);                                       \
  }

namespace baseline {
GANOPS_SPECTRAL_NORM_LEAVES()
}  // namespace baseline
namespace avx_fma {
GANOPS_SPECTRAL_NORM_LEAVES(__attribute__((target("avx,fma"))))
}  // namespace avx_fma

bool cpu_has_avx_fma() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma");
  return has;
}

// The leaves for one dtype, for this CPU.
template <typename T, typename Acc>
struct Leaves {
  decltype(&baseline::dot<T, Acc>) dot;
  decltype(&baseline::mat_vec_rows<T, Acc>) mat_vec_rows;
  decltype(&baseline::mat_t_vec_block<T, Acc>) mat_t_vec_block;
  decltype(&baseline::scale_range<T, Acc>) scale_range;
  decltype(&baseline::grad_segments<T, Acc>) grad_segments;

  static const Leaves& get() {
    static const Leaves leaves = cpu_has_avx_fma()
        ? Leaves{avx_fma::dot<T, Acc>, avx_fma::mat_vec_rows<T, Acc>, avx_fma::mat_t_vec_block<T, Acc>,
                 avx_fma::scale_range<T, Acc>, avx_fma::grad_segments<T, Acc>}
        : Leaves{baseline::dot<T, Acc>, baseline::mat_vec_rows<T, Acc>, baseline::mat_t_vec_block<T, Acc>,
                 baseline::scale_range<T, Acc>, baseline::grad_segments<T, Acc>};
    return leaves;
  }
};

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

template <typename Acc>
Acc sum_sq(const Acc* x, int64_t n) {
  return Leaves<Acc, Acc>::get().dot(x, x, n);
}

// t = W x, parallel over rows.
template <typename T, typename Acc>
void mat_vec(const T* w, const T* x, MatrixShape s, Acc* t) {
  const auto& leaves = Leaves<T, Acc>::get();
  at::parallel_for(0, s.rows, grain_for(s.cols()),
                   [&](int64_t begin, int64_t end) { leaves.mat_vec_rows(w, x, s, begin, end, t); });
}

// t = W^T x, one task per (a, block of kColBlock columns of segment a).
template <typename T, typename Acc>
void mat_t_vec(const T* w, const T* x, MatrixShape s, Acc* t) {
  const auto& leaves = Leaves<T, Acc>::get();
  const int64_t blocks = ceil_div(s.inner, kColBlock);
  at::parallel_for(0, s.outer * blocks, grain_for(s.rows * kColBlock), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t a = task / blocks;
      const int64_t b0 = (task % blocks) * kColBlock;
      leaves.mat_t_vec_block(w, x, s, a, b0, std::min(kColBlock, s.inner - b0), t + a * s.inner + b0);
    }
  });
}

// out = t / max(|t|, eps), as torch.nn.functional.normalize; returns |t|^2.
template <typename T, typename Acc>
Acc normalize_into(const Acc* t, int64_t n, double eps, T* out) {
  const Acc ss = sum_sq(t, n);
  const Acc denom = clamped_norm(ss, eps);
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<T>(t[k] / denom);
  return ss;
}

template <typename T>
at::Tensor sigma_impl(const at::Tensor& w, at::Tensor& u, at::Tensor& v, MatrixShape s, int64_t n_iter,
                      double eps) {
  using Acc = acc_t<T>;
  const T* wp = w.const_data_ptr<T>();
  T* up = u.data_ptr<T>();
  T* vp = v.data_ptr<T>();
  std::vector<Acc> t(s.rows);
  Acc sigma;
  if (n_iter == 0) {
    mat_vec<T, Acc>(wp, vp, s, t.data());
    std::vector<Acc> uu(up, up + s.rows);
    sigma = Leaves<Acc, Acc>::get().dot(uu.data(), t.data(), s.rows);
  } else {
    std::vector<Acc> c(s.cols());
    Acc ss = Acc(0);
    for (int64_t it = 0; it < n_iter; ++it) {
      mat_vec<T, Acc>(wp, vp, s, t.data());
      normalize_into<T, Acc>(t.data(), s.rows, eps, up);
      mat_t_vec<T, Acc>(wp, up, s, c.data());
      ss = normalize_into<T, Acc>(c.data(), s.cols(), eps, vp);
    }
    sigma = sigma_from_sum_sq(ss, eps);
  }
  at::Tensor out = at::empty({}, w.options().dtype(sigma_dtype(w.scalar_type())));
  out.data_ptr<Acc>()[0] = sigma;
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_norm_forward_cpu(
    const at::Tensor& weight, at::Tensor& u, at::Tensor& v, int64_t dim, int64_t n_power_iterations, double eps) {
  const MatrixShape s = check_weight_u_v(weight, u, v, dim);
  TORCH_CHECK(n_power_iterations >= 0, "n_power_iterations must be >= 0, got ", n_power_iterations);
  const at::Tensor w = weight.contiguous();
  at::Tensor uc = u.contiguous();
  at::Tensor vc = v.contiguous();
  at::Tensor sigma;
  at::Tensor out = at::empty_like(w);
  GANOPS_DISPATCH_FLOATING_TYPES(w.scalar_type(), "spectral_norm_forward_cpu", [&] {
    using Acc = acc_t<scalar_t>;
    sigma = sigma_impl<scalar_t>(w, uc, vc, s, n_power_iterations, eps);
    const Acc inv = Acc(1) / sigma.const_data_ptr<Acc>()[0];
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const auto& leaves = Leaves<scalar_t, Acc>::get();
    at::parallel_for(0, s.numel(), kGrainElements,
                     [&](int64_t begin, int64_t end) { leaves.scale_range(wp + begin, end - begin, inv, op + begin); });
  });
  return forward_result(u, uc, v, vc, out, sigma);
}

at::Tensor spectral_norm_backward_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& grad_sigma,
                                            const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                            const at::Tensor& sigma, int64_t dim) {
  const MatrixShape s = check_backward_inputs(grad, grad_sigma, weight, u, v, sigma, dim);
  const bool has_grad_sigma = grad_sigma.has_value() && grad_sigma->defined();
  const at::Tensor w = weight.contiguous();
  const at::Tensor g = grad.contiguous();
  const at::Tensor uc = u.contiguous();
  const at::Tensor vc = v.contiguous();
  at::Tensor out = at::empty_like(w);
  const int64_t n = w.numel();
  GANOPS_DISPATCH_FLOATING_TYPES(w.scalar_type(), "spectral_norm_backward_cpu", [&] {
    using T = scalar_t;
    using Acc = acc_t<T>;
    const T* wp = w.const_data_ptr<T>();
    const T* gp = g.const_data_ptr<T>();
    const T* up = uc.const_data_ptr<T>();
    const T* vp = vc.const_data_ptr<T>();
    T* op = out.data_ptr<T>();
    // Pass 1: <G, W>, chunk partials combined in chunk order.
    const auto& leaves = Leaves<T, Acc>::get();
    const int64_t n_chunks = ceil_div(n, kChunkSize);
    std::vector<Acc> partials(n_chunks);
    at::parallel_for(0, n_chunks, grain_for(kChunkSize), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t k0 = c * kChunkSize;
        partials[c] = leaves.dot(gp + k0, wp + k0, std::min(kChunkSize, n - k0));
      }
    });
    Acc gw = Acc(0);
    for (const Acc p : partials) gw += p;
    const Acc sig = sigma.const_data_ptr<Acc>()[0];
    const Acc coef = outer_coefficient(gw, sig, has_grad_sigma ? grad_sigma->const_data_ptr<Acc>()[0] : Acc(0));
    const Acc inv = Acc(1) / sig;
    // Pass 2: dW = G / sigma - coef u v^T, segment (a, i) by segment.
    at::parallel_for(0, s.outer * s.rows, grain_for(s.inner), [&](int64_t begin, int64_t end) {
      leaves.grad_segments(gp, up, vp, s, begin, end, inv, coef, op);
    });
  });
  return out;
}

// Emulates the CUDA launches of spectral_norm_cuda.cu block by block and thread by thread.
template <typename Acc>
Acc emulate_block_sum(std::vector<Acc>& values) {
  return emulate_block_reduce(values.data(), kThreads, Plus{});
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> launch_check_impl(
    const at::Tensor& w, const at::Tensor& u_in, const at::Tensor& v_in, const at::Tensor& g, MatrixShape s,
    double eps) {
  using Acc = acc_t<T>;
  const int64_t n = s.numel();
  const int64_t cols = s.cols();
  at::Tensor visits = at::zeros({4, n}, at::TensorOptions().dtype(c10::kInt));
  int32_t* row_visits = visits.data_ptr<int32_t>();
  int32_t* col_visits = row_visits + n;
  int32_t* scale_visits = col_visits + n;
  int32_t* dot_visits = scale_visits + n;
  at::Tensor u = u_in.clone();
  at::Tensor v = v_in.clone();
  const T* wp = w.const_data_ptr<T>();
  const T* gp = g.const_data_ptr<T>();
  T* up = u.data_ptr<T>();
  T* vp = v.data_ptr<T>();
  std::vector<Acc> block(kThreads);

  // row_dot_kernel: block i per row; then the one-block normalising kernel.
  std::vector<Acc> t(s.rows);
  for (int64_t i = 0; i < s.rows; ++i) {
    for (int tid = 0; tid < kThreads; ++tid) {
      block[tid] = row_dot_thread<T, Acc>(wp, vp, s, i, tid, kThreads);
      for_each_row_element(s, tid, kThreads, [&](int64_t j) { ++row_visits[s.offset(i, j)]; });
    }
    t[i] = emulate_block_sum(block);
  }
  for (int tid = 0; tid < kThreads; ++tid) block[tid] = sum_sq_thread(t.data(), s.rows, tid, kThreads);
  const Acc u_denom = clamped_norm(emulate_block_sum(block), eps);
  for (int64_t i = 0; i < s.rows; ++i) up[i] = static_cast<T>(t[i] / u_denom);

  // col_partial_kernel over (column block, row chunk); then the one-block finishing kernel.
  const int64_t n_row_chunks = row_chunks(s.rows);
  std::vector<Acc> partials(n_row_chunks * cols);
  for (int64_t bx = 0; bx < ceil_div(cols, kThreads); ++bx) {
    for (int64_t r = 0; r < n_row_chunks; ++r) {
      for (int tid = 0; tid < kThreads; ++tid) {
        const int64_t j = bx * kThreads + tid;
        if (j >= cols) continue;
        partials[r * cols + j] = col_partial_thread<T, Acc>(wp, up, s, j, r);
        for_each_chunk_row(s, r, [&](int64_t i) { ++col_visits[s.offset(i, j)]; });
      }
    }
  }
  for (int tid = 0; tid < kThreads; ++tid) {
    for (int64_t j = tid; j < cols; j += kThreads) {
      partials[j] = combine_col_partials(partials.data(), cols, n_row_chunks, j);
    }
    block[tid] = sum_sq_thread(partials.data(), cols, tid, kThreads);
  }
  const Acc ss = emulate_block_sum(block);
  const Acc v_denom = clamped_norm(ss, eps);
  for (int64_t j = 0; j < cols; ++j) vp[j] = static_cast<T>(partials[j] / v_denom);
  const Acc sigma = sigma_from_sum_sq(ss, eps);

  // scale_kernel and the backward's grad_dot / finish / grad_weight kernels: chunk per block.
  const int64_t n_chunks = ceil_div(n, kChunkSize);
  at::Tensor scaled = at::empty_like(w);
  at::Tensor grad_w = at::empty_like(w);
  T* sp = scaled.data_ptr<T>();
  T* dp = grad_w.data_ptr<T>();
  const Acc inv = Acc(1) / sigma;
  std::vector<Acc> chunk_partials(n_chunks);
  for (int64_t c = 0; c < n_chunks; ++c) {
    for (int tid = 0; tid < kThreads; ++tid) {
      for_each_chunk_element(n, c, tid, kThreads, [&](int64_t k) {
        sp[k] = static_cast<T>(Acc(wp[k]) * inv);
        ++scale_visits[k];
      });
      block[tid] = grad_dot_thread<T, Acc>(gp, wp, n, c, tid, kThreads);
      for_each_chunk_element(n, c, tid, kThreads, [&](int64_t k) { ++dot_visits[k]; });
    }
    chunk_partials[c] = emulate_block_sum(block);
  }
  for (int tid = 0; tid < kThreads; ++tid) block[tid] = sum_thread(chunk_partials.data(), n_chunks, tid, kThreads);
  const Acc coef = outer_coefficient(emulate_block_sum(block), sigma, Acc(0));
  for (int64_t k = 0; k < n; ++k) dp[k] = grad_weight_element<T, Acc>(gp, up, vp, s, k, inv, coef);

  at::Tensor sigma_out = at::empty({}, w.options().dtype(sigma_dtype(w.scalar_type())));
  sigma_out.data_ptr<Acc>()[0] = sigma;
  return {visits, u, v, sigma_out, scaled, grad_w};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_launch_check(
    const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, const at::Tensor& grad, int64_t dim,
    double eps) {
  const MatrixShape s = check_weight_u_v(weight, u, v, dim);
  TORCH_CHECK(grad.sizes() == weight.sizes() && grad.scalar_type() == weight.scalar_type(),
              "grad must match weight's shape and dtype");
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  GANOPS_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "spectral_norm_launch_check", [&] {
    out = launch_check_impl<scalar_t>(weight.contiguous(), u.contiguous(), v.contiguous(), grad.contiguous(), s,
                                      eps);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ganops, CPU, m) {
  m.impl("spectral_norm_forward_", &spectral_norm_forward_cpu);
  m.impl("spectral_norm_backward", &spectral_norm_backward_cpu);
  m.impl("_spectral_norm_cuda_launch_check", &cuda_launch_check);
}

}  // namespace ganops::spectral_norm
