// Shared by every op: host/device qualifiers, the accumulation type (for kernels and for the
// host code that allocates their buffers) and small arithmetic helpers. Input checks are in
// checks.h.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define GANOPS_HD __host__ __device__ __forceinline__
#else
#define GANOPS_HD inline
#endif

// Header-only parts of torch (stable ABI): the half types and ScalarType.
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

namespace ganops {

// Half types accumulate in float; float in float; double in double.
template <typename T> struct AccType { using type = T; };
template <> struct AccType<c10::Half> { using type = float; };
template <> struct AccType<c10::BFloat16> { using type = float; };
template <typename T> using acc_t = typename AccType<T>::type;

// acc_t on the host, for a dtype: float64 stays float64, every other float accumulates in
// float32. Partial sums, sigma and sumsq are allocated in it, so their bytes are the Acc the
// kernels write.
inline c10::ScalarType acc_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

// Ceil division for 64-bit sizes.
GANOPS_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// NaN-propagating max: std::fmax and fmaxf drop NaN, which would hide a NaN gradient.
template <typename T>
GANOPS_HD T nan_max(T a, T b) { return (a != a || a > b) ? a : b; }

}  // namespace ganops
