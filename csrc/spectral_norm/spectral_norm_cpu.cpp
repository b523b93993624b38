// CPU kernels of spectral normalization.
//
// Both matrix-vector products read the stored matrix in its own memory order: W x as row dot
// products (torch::stable::parallel_for over rows, each a vectorised dot product; slab by slab when the
// weight has several), W^T x over blocks of columns, each block accumulating every row in
// order into a small array that stays in L1. A matrix stored transposed (spectral_norm.h:
// the hook API's dim = 1 view) swaps the two. Every output element is made by one task in a
// fixed order, and the norms are sequential, so results are bit-identical whatever the
// thread count.

#include <ganops/checks.h>
#include <ganops/dispatch.h>
#include <ganops/isa.h>
#include <ganops/lanes.h>
#include <ganops/registration.h>

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

// 32-byte vectors (GCC/Clang vector extensions): one AVX register, or two SSE registers on
// the baseline ISA. The reduction order is fixed by the code, not by the compiler.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
};
template <typename T>
using vec_t = typename Vec<T>::type;

// acc += a[0 .. W) * b[0 .. W) elementwise. Through a reference, not by value: a vector
// passed or returned by value changes the ABI between the baseline and AVX versions
// (GCC's -Wpsabi).
template <typename T>
inline void add_product(vec_t<T>& acc, const T* a, const T* b) {
  vec_t<T> x, y;
  std::memcpy(&x, a, sizeof(x));
  std::memcpy(&y, b, sizeof(y));
  acc += x * y;
}

// a . b for float and double: kVecAccs vector accumulators over the bulk, one over the
// remaining whole vectors, a scalar over the tail, combined pairwise in a fixed order.
template <typename T>
inline T dot_vectorized(const T* a, const T* b, int64_t n) {
  constexpr int W = sizeof(vec_t<T>) / sizeof(T);
  vec_t<T> acc[kVecAccs] = {};
  int64_t k = 0;
  for (; k + W * kVecAccs <= n; k += W * kVecAccs) {
    for (int l = 0; l < kVecAccs; ++l) add_product(acc[l], a + k + l * W, b + k + l * W);
  }
  for (; k + W <= n; k += W) add_product(acc[0], a + k, b + k);
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

// a . b: vectorised for float and double; half types converted and accumulated in float
// in ganops/lanes.h's lanes.
template <typename T, typename Acc>
inline Acc dot(const T* a, const T* b, int64_t n) {
  if constexpr (std::is_same_v<T, Acc>) {
    return dot_vectorized<T>(a, b, n);
  } else {
    return lane_reduce<Acc>(n, [&](int64_t k) { return Acc(a[k]) * Acc(b[k]); }, Plus{});
  }
}

// t[i] = (W x)[i] for rows [begin, end), slab by slab: slab a (the weight's a-th block of
// rows x inner elements) holds these rows as one contiguous run, so the weight streams in its
// own memory order (dim > 0 on a conv weight). Each t[i] adds its slabs' dot products in slab
// order, as a row-by-row loop would.
template <typename T, typename Acc>
inline void mat_vec_rows(const T* w, const T* x, MatrixShape s, int64_t begin, int64_t end, Acc* t) {
  for (int64_t i = begin; i < end; ++i) t[i] = Acc(0);
  for (int64_t a = 0; a < s.outer; ++a) {
    const T* slab = w + a * s.rows * s.inner;
    const T* xa = x + a * s.inner;
    for (int64_t i = begin; i < end; ++i) t[i] += dot<T, Acc>(slab + i * s.inner, xa, s.inner);
  }
}

// out[0 .. len) = (W^T x)[a * inner + b0 ...], every row added in row order. Four rows per
// sweep over the accumulators (written as four sequential additions, so the order and the
// result are those of one row at a time) cut the accumulator traffic fourfold.
template <typename T, typename Acc>
inline void mat_t_vec_block(const T* w, const T* x, MatrixShape s, int64_t a, int64_t b0, int64_t len,
                            Acc* out) {
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
inline void scale_range(const T* w, int64_t n, Acc inv, T* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<T>(Acc(w[k]) * inv);
}

// dW = G / sigma - coef u v^T over segments [begin, end), segment (a, i) = a * rows + i: one
// division per run of rows within a slab, none per element. With inner = 1 (stored
// transposed) a run is one vectorisable loop over its rows.
template <typename T, typename Acc>
inline void grad_segments(const T* g, const T* u, const T* v, MatrixShape s, int64_t begin, int64_t end,
                          Acc inv, Acc coef, T* out) {
  for (int64_t seg = begin; seg < end;) {
    const int64_t a = seg / s.rows, i0 = seg % s.rows;
    const int64_t i1 = std::min(s.rows, i0 + (end - seg));
    const T* va = v + a * s.inner;
    if (s.inner == 1) {
      const Acc v0 = Acc(va[0]);
      const int64_t k0 = a * s.rows;
      for (int64_t i = i0; i < i1; ++i) out[k0 + i] = static_cast<T>(Acc(g[k0 + i]) * inv - coef * Acc(u[i]) * v0);
    } else {
      for (int64_t i = i0; i < i1; ++i) {
        const Acc cu = coef * Acc(u[i]);
        const int64_t k0 = (a * s.rows + i) * s.inner;
        for (int64_t b = 0; b < s.inner; ++b) out[k0 + b] = static_cast<T>(Acc(g[k0 + b]) * inv - cu * Acc(va[b]));
      }
    }
    seg += i1 - i0;
  }
}

// The leaf loops above run compiled for AVX + FMA where the CPU has them, else for the
// baseline (ganops/isa.h): torch's own elementwise kernels on this class of CPU are baseline,
// but its BLAS matrix-vector products use AVX, and so must ours to keep up.
template <typename Leaf>
decltype(auto) run_leaf(Leaf&& leaf) {
  return run_for_best_isa<Isa::kAvxFma>(leaf);
}

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

template <typename Acc>
Acc sum_sq(const Acc* x, int64_t n) {
  return run_leaf([&] { return dot<Acc, Acc>(x, x, n); });
}

// Rows per W x task when the weight has several slabs (dim > 0): each task then reads runs of
// kRowBlock rows of every slab.
constexpr int64_t kRowBlock = 256;

// t = W x, a task per block of rows (a row per block for dim 0: one slab).
template <typename T, typename Acc>
void mat_vec(const T* w, const T* x, MatrixShape s, Acc* t) {
  const int64_t block = s.outer == 1 ? 1 : kRowBlock;
  torch::stable::parallel_for(0, ceil_div(s.rows, block), grain_for(block * s.cols()), [&](int64_t begin, int64_t end) {
    run_leaf([&] {
      for (int64_t b = begin; b < end; ++b) {
        mat_vec_rows<T, Acc>(w, x, s, b * block, std::min(s.rows, (b + 1) * block), t);
      }
    });
  });
}

// t = W^T x, one task per (a, block of kColBlock columns of slab a).
template <typename T, typename Acc>
void mat_t_vec(const T* w, const T* x, MatrixShape s, Acc* t) {
  const int64_t blocks = ceil_div(s.inner, kColBlock);
  torch::stable::parallel_for(0, s.outer * blocks, grain_for(s.rows * kColBlock), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t a = task / blocks;
      const int64_t b0 = (task % blocks) * kColBlock;
      const int64_t len = std::min(kColBlock, s.inner - b0);
      run_leaf([&] { mat_t_vec_block<T, Acc>(w, x, s, a, b0, len, t + a * s.inner + b0); });
    }
  });
}

// out = W x, or W^T x with `transpose`, as passes over the stored matrix: W's own, or for a
// matrix stored transposed the stored matrix's, swapped.
template <typename T, typename Acc>
void product(const T* w, const T* x, MatrixShape s, bool transpose, Acc* out) {
  if (transpose != stored_transposed(s)) {
    mat_t_vec<T, Acc>(w, x, stored_shape(s), out);
  } else {
    mat_vec<T, Acc>(w, x, stored_shape(s), out);
  }
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
Tensor sigma_impl(const Tensor& w, Tensor& u, Tensor& v, MatrixShape s, int64_t n_iter,
                      double eps) {
  using Acc = acc_t<T>;
  const T* wp = w.const_data_ptr<T>();
  T* up = u.mutable_data_ptr<T>();
  T* vp = v.mutable_data_ptr<T>();
  std::vector<Acc> t(s.rows);
  Acc sigma;
  if (n_iter == 0) {
    product<T, Acc>(wp, vp, s, false, t.data());
    std::vector<Acc> uu(up, up + s.rows);
    sigma = run_leaf([&] { return dot<Acc, Acc>(uu.data(), t.data(), s.rows); });
  } else {
    std::vector<Acc> c(s.cols());
    Acc ss = Acc(0);
    for (int64_t it = 0; it < n_iter; ++it) {
      product<T, Acc>(wp, vp, s, false, t.data());
      normalize_into<T, Acc>(t.data(), s.rows, eps, up);
      product<T, Acc>(wp, up, s, true, c.data());
      ss = normalize_into<T, Acc>(c.data(), s.cols(), eps, vp);
    }
    sigma = sigma_from_sum_sq(ss, eps);
  }
  Tensor out = empty({}, options(w).dtype(acc_dtype(w.scalar_type())));
  out.mutable_data_ptr<Acc>()[0] = sigma;
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> spectral_norm_forward_cpu(
    const Tensor& weight, Tensor& u, Tensor& v, int64_t dim, int64_t n_power_iterations, double eps) {
  ForwardInputs in = forward_inputs(weight, u, v, dim, n_power_iterations);
  const MatrixShape s = in.s;
  Tensor sigma;
  Tensor out = empty(in.w.sizes(), in.w);
  GANOPS_DISPATCH_FLOATING_TYPES(in.w.scalar_type(), "spectral_norm_forward_cpu", [&] {
    using Acc = acc_t<scalar_t>;
    sigma = sigma_impl<scalar_t>(in.w, in.u, in.v, s, n_power_iterations, eps);
    const Acc inv = Acc(1) / sigma.const_data_ptr<Acc>()[0];
    const scalar_t* wp = in.w.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, s.numel(), kGrainElements, [&](int64_t begin, int64_t end) {
      run_leaf([&] { scale_range<scalar_t, Acc>(wp + begin, end - begin, inv, op + begin); });
    });
  });
  return forward_result(u, in.u, v, in.v, out, sigma);
}
GANOPS_KERNEL(CPU, "spectral_norm_forward_", spectral_norm_forward_cpu)

Tensor spectral_norm_backward_cpu(const Tensor& grad, const std::optional<Tensor>& grad_sigma,
                                            const Tensor& weight, const Tensor& u, const Tensor& v,
                                            const Tensor& sigma, int64_t dim) {
  const BackwardInputs in = backward_inputs(grad, grad_sigma, weight, u, v, sigma, dim);
  const MatrixShape s = in.s;
  Tensor out = empty(in.w.sizes(), in.w);
  const int64_t n = in.w.numel();
  GANOPS_DISPATCH_FLOATING_TYPES(in.w.scalar_type(), "spectral_norm_backward_cpu", [&] {
    using T = scalar_t;
    using Acc = acc_t<T>;
    const T* wp = in.w.const_data_ptr<T>();
    const T* gp = in.g.const_data_ptr<T>();
    const T* up = in.u.const_data_ptr<T>();
    const T* vp = in.v.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    // Pass 1: <G, W>, chunk partials combined in chunk order.
    const int64_t n_chunks = ceil_div(n, kChunkSize);
    std::vector<Acc> partials(n_chunks);
    torch::stable::parallel_for(0, n_chunks, grain_for(kChunkSize), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t k0 = c * kChunkSize;
        partials[c] = run_leaf([&] { return dot<T, Acc>(gp + k0, wp + k0, std::min(kChunkSize, n - k0)); });
      }
    });
    Acc gw = Acc(0);
    for (const Acc p : partials) gw += p;
    const Acc sig = sigma.const_data_ptr<Acc>()[0];
    const Acc grad_sig = in.has_grad_sigma ? grad_sigma->const_data_ptr<Acc>()[0] : Acc(0);
    const Acc coef = outer_coefficient(gw, sig, grad_sig);
    const Acc inv = Acc(1) / sig;
    // Pass 2: dW = G / sigma - coef u v^T, segment (a, i) by segment.
    torch::stable::parallel_for(0, s.outer * s.rows, grain_for(s.inner), [&](int64_t begin, int64_t end) {
      run_leaf([&] { grad_segments<T, Acc>(gp, up, vp, s, begin, end, inv, coef, op); });
    });
  });
  return out;
}
GANOPS_KERNEL(CPU, "spectral_norm_backward", spectral_norm_backward_cpu)

}  // namespace

}  // namespace ganops::spectral_norm
