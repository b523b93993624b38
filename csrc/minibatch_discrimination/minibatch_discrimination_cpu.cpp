// CPU kernels of the minibatch-discrimination similarity (formulas in
// minibatch_discrimination.h).
//
// Inputs are first packed, in the accumulation type, as P[t][n][c][l] = X[n, t·L + l, c]
// (L = kLanes, zero past B): for a row i and a tile t of L values of b, every pair (i, j)
// then reads two contiguous C×L blocks, and the loops over l vectorise with no gather. A task
// is one (t, i): it loops over every j in order, reduces over c into L distances, takes the L
// exponentials with one vectorised exp, and accumulates its own output row only. Tasks are
// independent and each sums in a fixed order, so results are bit-identical whatever the
// thread count. Extra memory: the packed copies, O(N·B·C).
//
// On x86-64 the task loop is also compiled for AVX2 and picked at run time; both versions do
// the same IEEE operations (no FMA contraction), so they give the same bits.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <ganops/checks.h>
#include <ganops/dispatch.h>

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
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
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
std::vector<Acc> pack(const at::Tensor& X) {
  if (X.dim() == 2) {
    return pack<T, Acc>(X.const_data_ptr<T>(), X.size(0), X.size(1), 1, X.stride(0), X.stride(1), 0);
  }
  return pack<T, Acc>(X.const_data_ptr<T>(), X.size(0), X.size(1), X.size(2), X.stride(0), X.stride(1),
                      X.stride(2));
}

// The inverse of pack into a new contiguous tensor of sizes (N, B) or (N, B, C) and dtype T.
template <typename T, typename Acc>
at::Tensor unpack(const std::vector<Acc>& P, at::IntArrayRef sizes, at::TensorOptions options) {
  at::Tensor out = at::empty(sizes, options);
  const int64_t N = sizes[0], B = sizes[1], C = sizes.size() == 3 ? sizes[2] : 1;
  T* y = out.data_ptr<T>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t b = 0; b < B; ++b) {
        const Acc* src = P.data() + ((b / kLanes) * N + n) * C * kLanes + b % kLanes;
        for (int64_t c = 0; c < C; ++c) y[(n * B + b) * C + c] = static_cast<T>(src[c * kLanes]);
      }
    }
  });
  return out;
}

enum class Mode { kForward, kBackward, kDoubleBackward };

// Packed operands and outputs of one kernel call. out_row is (tiles, N, L): o or dg;
// out_M is (tiles, N, C, L), zero on entry: dM.
template <typename Acc>
struct Args {
  const Acc* M;
  const Acc* grad;
  const Acc* h;
  Acc* out_row;
  Acc* out_M;
  int64_t N, C;
  bool exclude_self;
};

// Tasks [begin, end), task = t·N + i. scratch holds one pair's C×L differences.
template <Mode mode, typename Acc>
inline void run_tasks(const Args<Acc>& a, int64_t begin, int64_t end, Acc* __restrict scratch) {
  constexpr int64_t L = kLanes;
  const int64_t N = a.N, C = a.C;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t t = task / N, i = task % N;
    const Acc* mi = a.M + task * C * L;
    const Acc* mt = a.M + t * N * C * L;
    Acc row[L] = {};
    Acc gi[L] = {};
    const Acc* ht = nullptr;
    Acc* __restrict acc_M = nullptr;
    if constexpr (mode != Mode::kForward) {
      for (int64_t l = 0; l < L; ++l) gi[l] = a.grad[task * L + l];
      acc_M = a.out_M + task * C * L;
    }
    if constexpr (mode == Mode::kDoubleBackward) ht = a.h + t * N * C * L;
    for (int64_t j = 0; j < N; ++j) {
      // The self term is 1 in the forward and 0 in both backward passes.
      if (j == i && (mode != Mode::kForward || a.exclude_self)) continue;
      const Acc* mj = mt + j * C * L;
      Acc d[L] = {};
      Acc q[L] = {};
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t l = 0; l < L; ++l) {
          const Acc diff = mi[c * L + l] - mj[c * L + l];
          d[l] += std::abs(diff);
          if constexpr (mode != Mode::kForward) scratch[c * L + l] = diff;
          if constexpr (mode == Mode::kDoubleBackward) {
            q[l] += (ht[i * C * L + c * L + l] - ht[j * C * L + c * L + l]) * sign_of(diff);
          }
        }
      }
      Acc w[L];
      for (int64_t l = 0; l < L; ++l) {
        const Acc k = exp_neg(d[l]);
        if constexpr (mode == Mode::kForward) {
          row[l] += k;
        } else if constexpr (mode == Mode::kBackward) {
          w[l] = -(gi[l] + a.grad[(t * N + j) * L + l]) * k;
        } else {
          const Acc kq = k * q[l];
          row[l] -= kq;
          w[l] = (gi[l] + a.grad[(t * N + j) * L + l]) * kq;
        }
      }
      if constexpr (mode != Mode::kForward) {
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t l = 0; l < L; ++l) acc_M[c * L + l] += w[l] * sign_of(scratch[c * L + l]);
        }
      }
    }
    if constexpr (mode != Mode::kBackward) {
      for (int64_t l = 0; l < L; ++l) a.out_row[task * L + l] = row[l];
    }
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
#define GANOPS_MBD_AVX2 1
// The same loop compiled for AVX2; flatten inlines run_tasks so all of it gets the target.
template <Mode mode, typename Acc>
__attribute__((target("avx2"), flatten)) void run_tasks_avx2(const Args<Acc>& a, int64_t begin, int64_t end,
                                                             Acc* scratch) {
  run_tasks<mode, Acc>(a, begin, end, scratch);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

template <Mode mode, typename Acc>
void run(const Args<Acc>& a, int64_t tiles) {
  const int64_t tasks = tiles * a.N;
  // About 64K pair-lane operations per chunk of tasks keeps scheduling overhead small.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, a.N * std::max<int64_t>(a.C, 1)));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<Acc> scratch(static_cast<size_t>(std::max<int64_t>(a.C, 1) * kLanes));
#ifdef GANOPS_MBD_AVX2
    if (cpu_has_avx2()) {
      run_tasks_avx2<mode, Acc>(a, begin, end, scratch.data());
      return;
    }
#endif
    run_tasks<mode, Acc>(a, begin, end, scratch.data());
  });
}

at::Tensor similarity_cpu(const at::Tensor& M, bool exclude_self) {
  check_M(M, c10::DeviceType::CPU);
  const int64_t N = M.size(0), B = M.size(1), C = M.size(2);
  at::Tensor out;
  GANOPS_DISPATCH_FLOATING_TYPES(M.scalar_type(), "minibatch_similarity_cpu", [&] {
    using Acc = acc_t<scalar_t>;
    const std::vector<Acc> Mp = pack<scalar_t, Acc>(M);
    std::vector<Acc> o(static_cast<size_t>(ceil_div(B, kLanes) * N * kLanes));
    run<Mode::kForward, Acc>({Mp.data(), nullptr, nullptr, o.data(), nullptr, N, C, exclude_self},
                             ceil_div(B, kLanes));
    out = unpack<scalar_t, Acc>(o, {N, B}, M.options());
  });
  return out;
}

at::Tensor similarity_backward_cpu(const at::Tensor& grad, const at::Tensor& M) {
  check_M(M, c10::DeviceType::CPU);
  const int64_t N = M.size(0), B = M.size(1), C = M.size(2);
  check_like(grad, "grad", M, {N, B});
  at::Tensor out;
  GANOPS_DISPATCH_FLOATING_TYPES(M.scalar_type(), "minibatch_similarity_backward_cpu", [&] {
    using Acc = acc_t<scalar_t>;
    const std::vector<Acc> Mp = pack<scalar_t, Acc>(M);
    const std::vector<Acc> gp = pack<scalar_t, Acc>(grad);
    std::vector<Acc> dM(Mp.size(), Acc(0));
    run<Mode::kBackward, Acc>({Mp.data(), gp.data(), nullptr, nullptr, dM.data(), N, C, false},
                              ceil_div(B, kLanes));
    out = unpack<scalar_t, Acc>(dM, M.sizes(), M.options());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> similarity_double_backward_cpu(const at::Tensor& grad_grad_M,
                                                                  const at::Tensor& grad, const at::Tensor& M) {
  check_M(M, c10::DeviceType::CPU);
  const int64_t N = M.size(0), B = M.size(1), C = M.size(2);
  check_like(grad, "grad", M, {N, B});
  check_like(grad_grad_M, "grad_grad_M", M, M.sizes());
  at::Tensor d_grad, d_M;
  GANOPS_DISPATCH_FLOATING_TYPES(M.scalar_type(), "minibatch_similarity_double_backward_cpu", [&] {
    using Acc = acc_t<scalar_t>;
    const std::vector<Acc> Mp = pack<scalar_t, Acc>(M);
    const std::vector<Acc> gp = pack<scalar_t, Acc>(grad);
    const std::vector<Acc> hp = pack<scalar_t, Acc>(grad_grad_M);
    std::vector<Acc> dg(gp.size());
    std::vector<Acc> dM(Mp.size(), Acc(0));
    run<Mode::kDoubleBackward, Acc>({Mp.data(), gp.data(), hp.data(), dg.data(), dM.data(), N, C, false},
                                    ceil_div(B, kLanes));
    d_grad = unpack<scalar_t, Acc>(dg, grad.sizes(), M.options());
    d_M = unpack<scalar_t, Acc>(dM, M.sizes(), M.options());
  });
  return {d_grad, d_M};
}

// Emulates the CUDA launch (minibatch_discrimination_cuda.cu) block by block and thread by
// thread, with the same row mapping and per-thread functions.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_launch_check(
    const at::Tensor& M_in, const at::Tensor& grad_in, const at::Tensor& h_in, bool exclude_self) {
  check_M(M_in, c10::DeviceType::CPU);
  const int64_t N = M_in.size(0), B = M_in.size(1), C = M_in.size(2);
  check_like(grad_in, "grad", M_in, {N, B});
  check_like(h_in, "grad_grad_M", M_in, M_in.sizes());
  const at::Tensor M = M_in.contiguous(), grad = grad_in.contiguous(), h = h_in.contiguous();
  at::Tensor coverage = at::zeros({N, B}, at::TensorOptions().dtype(c10::kInt));
  at::Tensor o, dM, dg, dM2;
  GANOPS_DISPATCH_FLOATING_TYPES(M.scalar_type(), "minibatch_similarity_launch_check", [&] {
    using Acc = acc_t<scalar_t>;
    const auto acc_opts = M.options().dtype(c10::CppTypeToScalarType<Acc>::value);
    o = at::zeros({N, B}, acc_opts);
    dM = at::zeros({N, B, C}, acc_opts);
    dg = at::zeros({N, B}, acc_opts);
    dM2 = at::zeros({N, B, C}, acc_opts);
    const scalar_t* m = M.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    for (int64_t block = 0; block < num_blocks(N, B); ++block) {
      for (int tid = 0; tid < kThreads; ++tid) {
        const RowIndex r = thread_row(block, tid, N, B);
        if (!r.valid) continue;
        const int64_t row = r.i * B + r.b;
        ++coverage.data_ptr<int32_t>()[row];
        o.data_ptr<Acc>()[row] = similarity_row<scalar_t, Acc>(m, N, B, C, r.i, r.b, exclude_self);
        similarity_backward_row<scalar_t, Acc>(g, m, N, B, C, r.i, r.b, dM.data_ptr<Acc>() + row * C);
        dg.data_ptr<Acc>()[row] = similarity_double_backward_row<scalar_t, Acc>(
            h.const_data_ptr<scalar_t>(), g, m, N, B, C, r.i, r.b, dM2.data_ptr<Acc>() + row * C);
      }
    }
  });
  const auto dtype = M.scalar_type();
  return {coverage, o.to(dtype), dM.to(dtype), dg.to(dtype), dM2.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ganops, CPU, m) {
  m.impl("minibatch_similarity", &similarity_cpu);
  m.impl("minibatch_similarity_backward", &similarity_backward_cpu);
  m.impl("minibatch_similarity_double_backward", &similarity_double_backward_cpu);
  m.impl("_minibatch_similarity_cuda_launch_check", &cuda_launch_check);
}

}  // namespace ganops::minibatch_discrimination
