// Shared by every op: host/device qualifiers, accumulation types and input checks.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define GANOPS_HD __host__ __device__ __forceinline__
#else
#define GANOPS_HD inline
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace ganops {

// Half types accumulate in float; float in float; double in double.
template <typename T> struct AccType { using type = T; };
template <> struct AccType<c10::Half> { using type = float; };
template <> struct AccType<c10::BFloat16> { using type = float; };
template <typename T> using acc_t = typename AccType<T>::type;

// Ceil division for 64-bit sizes.
GANOPS_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// NaN-propagating max: std::fmax and fmaxf drop NaN, which would hide a NaN gradient.
template <typename T>
GANOPS_HD T nan_max(T a, T b) { return (a != a || a > b) ? a : b; }

}  // namespace ganops
