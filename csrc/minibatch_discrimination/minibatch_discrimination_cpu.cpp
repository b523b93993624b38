// CPU kernels of the minibatch-discrimination similarity (formulas in
// minibatch_discrimination.h).
//
// Inputs are first packed, in the accumulation type, as P[t][n][c][l] = X[n, t·L + l, c]
// (L = kLanes, zero past B): for a tile t of L values of b, every pair (i, j) then reads two
// contiguous C×L blocks, and the loops over l vectorise with no gather. K, Q and the pair
// weights are symmetric in (i, j) and S is antisymmetric, so each unordered pair i < j is
// computed once and added to both rows. Determinism comes from a fixed split (see Blocking):
// each task (part, tile) sums its pairs in a fixed order into its own accumulators, and the
// parts are summed in part order, so results are bit-identical whatever the thread count.
// Extra memory: the packed copies and up to kMaxBlocks / 2 partial sums, O(N·B·C).
//
// On x86-64 the task loop is also compiled for AVX2 and for AVX-512 and picked at run time
// (ganops/isa.h); every version does the same IEEE operations (no FMA contraction), so they
// give the same bits.

// GCC contracts a·b + c into an FMA when the target has one (AVX-512 does): keep every kernel
// version to the same separately rounded operations. Before the includes, so that isa.h's
// entry points, templates defined there, are compiled under it too.
#pragma GCC optimize("fp-contract=off")


#include <ganops/checks.h>
#include <ganops/dispatch.h>
#include <ganops/isa.h>
#include <ganops/registration.h>

#include "minibatch_discrimination/minibatch_discrimination.h"

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace ganops::minibatch_discrimination {
namespace {

// 16 lanes: two AVX2 vectors of float, four of double, and one cache line of float per row.
constexpr int64_t kLanes = 16;

// exp(−d) for d >= 0 in plain arithmetic the compiler vectorises (libm's exp does not without
// -ffast-math): −d = n·ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), exp(r) by its
// Taylor polynomial, 2^n built in the exponent bits. Degree 7 (float) and 13 (double) keep
// the error within 1e-7 and 2e-16 relative (measured over [0, 720]). For d past 87 / 708
// the result is 0 (true value under 2e-38 / 4e-308); NaN stays NaN. The range checks are
// integer masks on the bits, not branches: GCC will not if-convert floating-point selects
// (they may trap) and the loop would stay scalar.
template <typename Acc> struct ExpParams;
template <> struct ExpParams<float> {
  using Bits = int32_t;
  static constexpr int kDegree = 7;
  static constexpr int kMantissa = 23;
  static constexpr Bits kBias = 127;
  static constexpr float kRound = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
  static constexpr float kMaxArg = 87.0f;
  static constexpr float kLn2Hi = 0.693359375f;
  static constexpr float kLn2Lo = -2.12194440e-4f;
};
template <> struct ExpParams<double> {
  using Bits = int64_t;
  static constexpr int kDegree = 13;
  static constexpr int kMantissa = 52;
  static constexpr Bits kBias = 1023;
  static constexpr double kRound = 6755399441055744.0;  // 1.5·2^52
  static constexpr double kMaxArg = 708.0;
  static constexpr double kLn2Hi = 6.93147180369123816490e-01;
  static constexpr double kLn2Lo = 1.90821492927058770002e-10;
};

template <typename Acc>
inline Acc exp_neg(Acc d) {
  using P = ExpParams<Acc>;
  using Bits = typename P::Bits;
  constexpr Bits kAbs = std::numeric_limits<Bits>::max();
  constexpr Bits kMax = std::bit_cast<Bits>(P::kMaxArg);
  constexpr Bits kInf = std::bit_cast<Bits>(std::numeric_limits<Acc>::infinity());
  // On |d|'s bits integer order is numeric order; NaN sorts above infinity.
  const Bits u = std::bit_cast<Bits>(d) & kAbs;
  const Bits in_range = -Bits(u <= kMax);
  const Bits nan = -Bits(u > kInf);
  const Acc x = -std::bit_cast<Acc>((u & in_range) | (kMax & ~in_range));
  // t's low mantissa bits hold n = round(x / ln2) in two's complement.
  const Acc t = x * Acc(1.4426950408889634074) + P::kRound;
  const Acc n = t - P::kRound;
  const Acc r = (x - n * P::kLn2Hi) - n * P::kLn2Lo;
  constexpr auto inv_fact = [] {
    std::array<Acc, P::kDegree + 1> c{};
    c[0] = Acc(1);
    for (int k = 1; k <= P::kDegree; ++k) c[k] = c[k - 1] / Acc(k);
    return c;
  }();
  Acc p = inv_fact[P::kDegree];
  for (int k = P::kDegree - 1; k >= 0; --k) p = p * r + inv_fact[k];
  // n + bias lands in the exponent field; the higher bits of t shift out.
  const Acc scale = std::bit_cast<Acc>(static_cast<Bits>((std::bit_cast<Bits>(t) + P::kBias) << P::kMantissa));
  return std::bit_cast<Acc>((std::bit_cast<Bits>(p * scale) & in_range) | (u & nan));
}

// Packs X (sizes N, B, C; any strides) into P[t][n][c][l] in the accumulation type.
template <typename T, typename Acc>
std::vector<Acc> pack(const T* x, int64_t N, int64_t B, int64_t C, int64_t sn, int64_t sb, int64_t sc) {
  const int64_t tiles = ceil_div(B, kLanes);
  std::vector<Acc> out(static_cast<size_t>(tiles * N * C * kLanes), Acc(0));
  torch::stable::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t b = 0; b < B; ++b) {
        Acc* dst = out.data() + ((b / kLanes) * N + n) * C * kLanes + b % kLanes;
        for (int64_t c = 0; c < C; ++c) dst[c * kLanes] = static_cast<Acc>(x[n * sn + b * sb + c * sc]);
      }
    }
  });
  return out;
}

template <typename T, typename Acc>
std::vector<Acc> pack(const Tensor& X) {
  if (X.dim() == 2) {
    return pack<T, Acc>(X.const_data_ptr<T>(), X.size(0), X.size(1), 1, X.stride(0), X.stride(1), 0);
  }
  return pack<T, Acc>(X.const_data_ptr<T>(), X.size(0), X.size(1), X.size(2), X.stride(0), X.stride(1),
                      X.stride(2));
}

// The inverse of pack into a new contiguous tensor of sizes (N, B) or (N, B, C) and dtype T.
template <typename T, typename Acc>
Tensor unpack(const Acc* P, IntArrayRef sizes, const Options& options) {
  Tensor out = empty(sizes, options);
  const int64_t N = sizes[0], B = sizes[1], C = sizes.size() == 3 ? sizes[2] : 1;
  T* y = out.mutable_data_ptr<T>();
  torch::stable::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t b = 0; b < B; ++b) {
        const Acc* src = P + ((b / kLanes) * N + n) * C * kLanes + b % kLanes;
        for (int64_t c = 0; c < C; ++c) y[(n * B + b) * C + c] = static_cast<T>(src[c * kLanes]);
      }
    }
  });
  return out;
}

enum class Mode { kForward, kBackward, kDoubleBackward };

// Packed operands of one kernel call and its per-part accumulators: row is (parts, tiles, N, L),
// o or dg; dM is (parts, tiles, N, C, L), dM.
template <typename Acc>
struct Args {
  const Acc* M;
  const Acc* grad;
  const Acc* h;
  Acc* row;
  Acc* dM;
  int64_t N, C, tiles;
  bool exclude_self;
};

// One pair i < j of tile t: K, Q and the weight w are symmetric in (i, j) and S antisymmetric,
// so the pair adds to both rows at once. ri/rj are the rows' L accumulators of o or dg, ai/aj
// their C×L accumulators of dM.
template <Mode mode, typename Acc>
inline void pair(const Args<Acc>& a, int64_t t, int64_t i, int64_t j, Acc* __restrict ri, Acc* __restrict rj,
                 Acc* __restrict ai, Acc* __restrict aj) {
  constexpr int64_t L = kLanes;
  const int64_t C = a.C;
  const Acc* mi = a.M + (t * a.N + i) * C * L;
  const Acc* mj = a.M + (t * a.N + j) * C * L;
  Acc d[L] = {};
  Acc q[L] = {};
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t l = 0; l < L; ++l) {
      const Acc diff = mi[c * L + l] - mj[c * L + l];
      d[l] += std::abs(diff);
      if constexpr (mode == Mode::kDoubleBackward) {
        const Acc* hi = a.h + (t * a.N + i) * C * L;
        const Acc* hj = a.h + (t * a.N + j) * C * L;
        q[l] += (hi[c * L + l] - hj[c * L + l]) * sign_of(diff);
      }
    }
  }
  Acc w[L];
  for (int64_t l = 0; l < L; ++l) {
    const Acc k = exp_neg(d[l]);
    if constexpr (mode == Mode::kForward) {
      ri[l] += k;
      rj[l] += k;
    } else {
      const Acc gij = a.grad[(t * a.N + i) * L + l] + a.grad[(t * a.N + j) * L + l];
      if constexpr (mode == Mode::kBackward) {
        w[l] = -gij * k;
      } else {
        const Acc kq = k * q[l];
        ri[l] -= kq;
        rj[l] -= kq;
        w[l] = gij * kq;
      }
    }
  }
  if constexpr (mode != Mode::kForward) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t l = 0; l < L; ++l) {
        const Acc ws = w[l] * sign_of(mi[c * L + l] - mj[c * L + l]);
        ai[c * L + l] += ws;
        aj[c * L + l] -= ws;
      }
    }
  }
}

// Row blocks: the pairs (i, j), i < j, are grouped by i's block; part p owns blocks p and
// blocks − 1 − p, so every part does about the same number of pairs. The number of parts
// depends on N only, never on the thread count, and each part of each tile has its own
// accumulators, summed in part order afterwards: the results are bit-identical whatever the
// thread count. At most kMaxBlocks / 2 parts bound the extra memory to that many copies of dM.
constexpr int64_t kBlock = 32;
constexpr int64_t kMaxBlocks = 16;

struct Blocking {
  int64_t rows;    // rows per block
  int64_t blocks;  // ceil(N / rows)
  int64_t parts;   // ceil(blocks / 2)
};

inline Blocking blocking(int64_t N) {
  const int64_t rows = std::max(kBlock, ceil_div(N, kMaxBlocks));
  const int64_t blocks = ceil_div(N, rows);
  return {rows, blocks, ceil_div(blocks, 2)};
}

// Task (p, t): zeroes its accumulators, then runs every pair whose i lies in part p's blocks.
// The j loop goes by kBlock rows so the j side of M and of the accumulators stays in cache.
template <Mode mode, typename Acc>
inline void run_task(const Args<Acc>& a, const Blocking& bl, int64_t p, int64_t t) {
  constexpr int64_t L = kLanes;
  const int64_t N = a.N, C = a.C;
  const int64_t slot = p * a.tiles + t;
  Acc* row = mode == Mode::kBackward ? nullptr : a.row + slot * N * L;
  Acc* dM = mode == Mode::kForward ? nullptr : a.dM + slot * N * C * L;
  if (row) std::fill(row, row + N * L, Acc(0));
  if (dM) std::fill(dM, dM + N * C * L, Acc(0));
  const int64_t owned[2] = {p, bl.blocks - 1 - p};
  for (int64_t k = 0; k < (owned[0] == owned[1] ? 1 : 2); ++k) {
    const int64_t i0 = owned[k] * bl.rows, i1 = std::min(N, i0 + bl.rows);
    if (mode == Mode::kForward && !a.exclude_self) {
      // The self term, exp(−Σ_c |M_i − M_i|): 1, or NaN where M_i is not finite.
      for (int64_t i = i0; i < i1; ++i) {
        const Acc* mi = a.M + (t * N + i) * C * L;
        Acc d[L] = {};
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t l = 0; l < L; ++l) d[l] += std::abs(mi[c * L + l] - mi[c * L + l]);
        }
        for (int64_t l = 0; l < L; ++l) row[i * L + l] += exp_neg(d[l]);
      }
    }
    for (int64_t j0 = i0; j0 < N; j0 += kBlock) {
      const int64_t j1 = std::min(N, j0 + kBlock);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = std::max(j0, i + 1); j < j1; ++j) {
          pair<mode, Acc>(a, t, i, j, row ? row + i * L : nullptr, row ? row + j * L : nullptr,
                          dM ? dM + i * C * L : nullptr, dM ? dM + j * C * L : nullptr);
        }
      }
    }
  }
}

// Sums the parts of x (parts × size) into the first, in part order.
template <typename Acc>
void sum_parts(Acc* x, int64_t parts, int64_t size) {
  torch::stable::parallel_for(0, size, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t p = 1; p < parts; ++p) {
      const Acc* src = x + p * size;
      for (int64_t e = begin; e < end; ++e) x[e] += src[e];
    }
  });
}

// Runs every task, then leaves the totals in the first part of a.row and a.dM.
template <Mode mode, typename Acc>
void run(const Args<Acc>& a, const Blocking& bl) {
  torch::stable::parallel_for(0, bl.parts * a.tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      // One row of a tile is one 512-bit vector of float.
      run_for_best_isa<Isa::kAvx512, Isa::kAvx2>([&] { run_task<mode, Acc>(a, bl, task / a.tiles, task % a.tiles); });
    }
  });
  if (mode != Mode::kBackward) sum_parts(a.row, bl.parts, a.tiles * a.N * kLanes);
  if (mode != Mode::kForward) sum_parts(a.dM, bl.parts, a.tiles * a.N * a.C * kLanes);
}

// A call's sizes, M (N, B, C), and its work split: tiles of kLanes values of b, parts of
// row blocks.
struct Problem {
  int64_t N, B, C, tiles;
  Blocking bl;
};

Problem problem_of(const Tensor& M) {
  check_M(M, DeviceType::CPU);
  const int64_t N = M.size(0), B = M.size(1), C = M.size(2);
  return {N, B, C, ceil_div(B, kLanes), blocking(N)};
}

Tensor minibatch_discrimination_cpu(const Tensor& M, bool exclude_self) {
  const Problem p = problem_of(M);
  return GANOPS_DISPATCH_FLOATING_TYPES(M.scalar_type(), "minibatch_discrimination_cpu", [&] {
    using Acc = acc_t<scalar_t>;
    const std::vector<Acc> Mp = pack<scalar_t, Acc>(M);
    std::vector<Acc> o(static_cast<size_t>(p.bl.parts * p.tiles * p.N * kLanes));
    run<Mode::kForward, Acc>({Mp.data(), nullptr, nullptr, o.data(), nullptr, p.N, p.C, p.tiles, exclude_self}, p.bl);
    return unpack<scalar_t, Acc>(o.data(), {p.N, p.B}, options(M));
  });
}
GANOPS_KERNEL(CPU, "minibatch_discrimination", minibatch_discrimination_cpu)

Tensor minibatch_discrimination_backward_cpu(const Tensor& grad, const Tensor& M) {
  const Problem p = problem_of(M);
  check_like(grad, "grad", M, {p.N, p.B});
  return GANOPS_DISPATCH_FLOATING_TYPES(M.scalar_type(), "minibatch_discrimination_backward_cpu", [&] {
    using Acc = acc_t<scalar_t>;
    const std::vector<Acc> Mp = pack<scalar_t, Acc>(M);
    const std::vector<Acc> gp = pack<scalar_t, Acc>(grad);
    std::vector<Acc> dM(static_cast<size_t>(p.bl.parts) * Mp.size());
    run<Mode::kBackward, Acc>({Mp.data(), gp.data(), nullptr, nullptr, dM.data(), p.N, p.C, p.tiles, false}, p.bl);
    return unpack<scalar_t, Acc>(dM.data(), M.sizes(), options(M));
  });
}
GANOPS_KERNEL(CPU, "minibatch_discrimination_backward", minibatch_discrimination_backward_cpu)

std::tuple<Tensor, Tensor> minibatch_discrimination_double_backward_cpu(const Tensor& grad_grad_M,
                                                                  const Tensor& grad, const Tensor& M) {
  const Problem p = problem_of(M);
  check_like(grad, "grad", M, {p.N, p.B});
  check_like(grad_grad_M, "grad_grad_M", M, M.sizes());
  Tensor d_grad, d_M;
  GANOPS_DISPATCH_FLOATING_TYPES(M.scalar_type(), "minibatch_discrimination_double_backward_cpu", [&] {
    using Acc = acc_t<scalar_t>;
    const std::vector<Acc> Mp = pack<scalar_t, Acc>(M);
    const std::vector<Acc> gp = pack<scalar_t, Acc>(grad);
    const std::vector<Acc> hp = pack<scalar_t, Acc>(grad_grad_M);
    std::vector<Acc> dg(static_cast<size_t>(p.bl.parts) * gp.size());
    std::vector<Acc> dM(static_cast<size_t>(p.bl.parts) * Mp.size());
    run<Mode::kDoubleBackward, Acc>(
        {Mp.data(), gp.data(), hp.data(), dg.data(), dM.data(), p.N, p.C, p.tiles, false}, p.bl);
    d_grad = unpack<scalar_t, Acc>(dg.data(), grad.sizes(), options(M));
    d_M = unpack<scalar_t, Acc>(dM.data(), M.sizes(), options(M));
  });
  return {d_grad, d_M};
}
GANOPS_KERNEL(CPU, "minibatch_discrimination_double_backward", minibatch_discrimination_double_backward_cpu)

}  // namespace

}  // namespace ganops::minibatch_discrimination
