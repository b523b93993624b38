// Math and per-thread work of the minibatch-discrimination similarity, shared by the CUDA
// kernels and the CPU test of their launch (minibatch_discrimination_launch_check.cpp); the
// CPU kernels use the same formulas on a lane-packed layout (minibatch_discrimination_cpu.cpp).
//
// With M of shape (N, B, C), row (i, b) is the C-vector M[i, b, :]; for a pair (i, j):
//   D[i,j,b] = Σ_c |M[i,b,c] − M[j,b,c]|,   K = exp(−D),   S[c] = sign(M[i,b,c] − M[j,b,c]).
// forward          o[i,b]    = Σ_j K                       (j = i left out if exclude_self)
// backward         dM[i,b,c] = −Σ_j (g[i,b] + g[j,b]) K S[c]
// double backward  with h the gradient flowing into dM and Q = Σ_c (h[i,b,c] − h[j,b,c]) S[c]:
//                  dg[i,b]   = −Σ_j K Q
//                  dM[i,b,c] =  Σ_j (g[i,b] + g[j,b]) K Q S[c]
// (sign' = 0 almost everywhere, so only K is differentiated in the double backward.) The j = i
// term of both backward passes is zero (S = 0), so it is skipped: an infinite entry of M,
// whose difference with itself is NaN, then does not poison its own row.
//
// CUDA work split: one thread per (i, b) row, kThreads threads per block over the N·B rows
// in row-major order; the thread loops over every j and keeps the C-reduction in registers,
// and its own output row too where C <= kRegisterC (written once at the end, not read and
// written in global memory for every j), so no two threads write one element. Memory stays
// O(N·B·C): neither the N×N×B×C differences nor the N×N×B similarities exist.
#pragma once

#include <ganops/checks.h>
#include <ganops/common.h>

#include <cmath>
#include <string_view>

namespace ganops::minibatch_discrimination {

constexpr int kThreads = 256;

// sign(x), 0 for 0 and NaN; written without selects so CPU loops using it vectorise.
template <typename Acc>
GANOPS_HD Acc sign_of(Acc x) {
  return static_cast<Acc>(x > Acc(0)) - static_cast<Acc>(x < Acc(0));
}

// The (i, b) row a thread of the CUDA launch owns; valid is false past the last row.
struct RowIndex {
  int64_t i;
  int64_t b;
  bool valid;
};

GANOPS_HD int64_t num_blocks(int64_t N, int64_t B) { return ceil_div(N * B, kThreads); }

GANOPS_HD RowIndex thread_row(int64_t block, int tid, int64_t N, int64_t B) {
  const int64_t flat = block * kThreads + tid;
  return {B > 0 ? flat / B : 0, B > 0 ? flat % B : 0, flat < N * B};
}

// D[i,j,b] for rows mi = M[i,b,:] and mj = M[j,b,:], summed over c in order.
template <typename T, typename Acc>
GANOPS_HD Acc l1_distance(const T* mi, const T* mj, int64_t C) {
  Acc d = Acc(0);
  for (int64_t c = 0; c < C; ++c) {
    const Acc diff = static_cast<Acc>(mi[c]) - static_cast<Acc>(mj[c]);
    d += diff < Acc(0) ? -diff : diff;
  }
  return d;
}

// o[i,b]. M is contiguous (N, B, C).
template <typename T, typename Acc>
GANOPS_HD Acc similarity_row(const T* M, int64_t N, int64_t B, int64_t C, int64_t i, int64_t b,
                             bool exclude_self) {
  const T* mi = M + (i * B + b) * C;
  Acc o = Acc(0);
  for (int64_t j = 0; j < N; ++j) {
    if (exclude_self && j == i) continue;
    o += ::exp(-l1_distance<T, Acc>(mi, M + (j * B + b) * C, C));
  }
  return o;
}

// Rows of up to kRegisterC values accumulate in registers across the loop over j (loops of a
// constant trip count, which the compiler unrolls, index the array) and are
// added to the output once; wider rows accumulate in place in the (zeroed) output. Both add
// the same terms in the same order from zero, so the results are the same bits.
constexpr int kRegisterC = 16;

// Adds Σ_{j != i} weight(j) · sign(M[i,b,c] − M[j,b,c]) into out[c] for every c, j in order.
// weight(j) is called once per j, in order (the double backward also sums its dg there).
template <typename T, typename Acc, typename Weight>
GANOPS_HD void add_weighted_signs(const T* M, int64_t N, int64_t B, int64_t C, int64_t i, int64_t b,
                                  Weight&& weight, Acc* out) {
  const T* mi = M + (i * B + b) * C;
  if (C <= kRegisterC) {
    Acc acc[kRegisterC];
    for (int c = 0; c < kRegisterC; ++c) acc[c] = Acc(0);
    for (int64_t j = 0; j < N; ++j) {
      if (j == i) continue;
      const T* mj = M + (j * B + b) * C;
      const Acc w = weight(j);
      for (int c = 0; c < kRegisterC; ++c) {
        if (c < C) acc[c] += w * sign_of(static_cast<Acc>(mi[c]) - static_cast<Acc>(mj[c]));
      }
    }
    for (int c = 0; c < kRegisterC; ++c) {
      if (c < C) out[c] += acc[c];
    }
    return;
  }
  for (int64_t j = 0; j < N; ++j) {
    if (j == i) continue;
    const T* mj = M + (j * B + b) * C;
    const Acc w = weight(j);
    for (int64_t c = 0; c < C; ++c) out[c] += w * sign_of(static_cast<Acc>(mi[c]) - static_cast<Acc>(mj[c]));
  }
}

// Adds dM[i,b,:] into out (C values of this thread's own row, zero on entry).
template <typename T, typename Acc>
GANOPS_HD void similarity_backward_row(const T* grad, const T* M, int64_t N, int64_t B, int64_t C,
                                       int64_t i, int64_t b, Acc* out) {
  const T* mi = M + (i * B + b) * C;
  const Acc gi = static_cast<Acc>(grad[i * B + b]);
  add_weighted_signs<T, Acc>(M, N, B, C, i, b, [&](int64_t j) {
    return -(gi + static_cast<Acc>(grad[j * B + b])) * ::exp(-l1_distance<T, Acc>(mi, M + (j * B + b) * C, C));
  }, out);
}

// Returns dg[i,b] and adds dM[i,b,:] into out_M (zero on entry); h is the gradient flowing
// into the backward's output, contiguous (N, B, C) like M.
template <typename T, typename Acc>
GANOPS_HD Acc similarity_double_backward_row(const T* h, const T* grad, const T* M, int64_t N,
                                             int64_t B, int64_t C, int64_t i, int64_t b, Acc* out_M) {
  const int64_t row_i = (i * B + b) * C;
  const Acc gi = static_cast<Acc>(grad[i * B + b]);
  Acc dg = Acc(0);
  add_weighted_signs<T, Acc>(M, N, B, C, i, b, [&](int64_t j) {
    const int64_t row_j = (j * B + b) * C;
    Acc d = Acc(0);
    Acc q = Acc(0);
    for (int64_t c = 0; c < C; ++c) {
      const Acc diff = static_cast<Acc>(M[row_i + c]) - static_cast<Acc>(M[row_j + c]);
      d += diff < Acc(0) ? -diff : diff;
      q += (static_cast<Acc>(h[row_i + c]) - static_cast<Acc>(h[row_j + c])) * sign_of(diff);
    }
    const Acc kq = ::exp(-d) * q;
    dg -= kq;
    return (gi + static_cast<Acc>(grad[j * B + b])) * kq;
  }, out_M);
  return dg;
}

// Host-side checks shared by the CPU and CUDA entry points (Python checks first, naming the
// caller's arguments; these guard direct torch.ops calls).
inline void check_M(const Tensor& M, DeviceType device) {
  check_dim(M, 3, "M");
  check_float(M, "M");
  STD_TORCH_CHECK(M.device().type() == device, "M must be a ", device_type_text(device, true),
              " tensor here, got ", device_text(M));
  STD_TORCH_CHECK(M.size(0) > 0, "M must hold at least one sample (N = M.size(0) >= 1), got shape ", shape_text(M));
}

inline void check_like(const Tensor& x, std::string_view name, const Tensor& M, IntArrayRef sizes) {
  STD_TORCH_CHECK(x.sizes() == sizes, name, " must have shape ", shape_text(sizes), ", got ", shape_text(x));
  STD_TORCH_CHECK(x.scalar_type() == M.scalar_type(), name, " must have M's dtype ", M.scalar_type(), ", got ",
              x.scalar_type());
  check_same_device(x, name, M, "M");
}

}  // namespace ganops::minibatch_discrimination
