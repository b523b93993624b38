// Run-time ISA dispatch for the CPU kernels: one build runs on any x86-64 CPU, and the hot
// loops still use the vector units of the CPU at hand.
//
// The idiom: a kernel writes its loop once, as a lambda, and calls
//   run_for_best_isa<Isa::kAvx512, Isa::kAvx2>([&] { ...loop... });
// which runs the lambda compiled for the first listed ISA this CPU has (list the best first),
// else for the baseline. Each ISA's entry point is `flatten`: every call in it, the lambda's
// and everything the lambda calls, is inlined, so all of the loop is compiled for that ISA.
//
// Numbers: GCC contracts a * b + c into one FMA where the target has FMA (avx,fma; AVX-512),
// since C++ defaults to -ffp-contract=fast. A file whose every ISA must round alike puts
// `#pragma GCC optimize("fp-contract=off")` before its first #include: the entry points here
// are templates, and a template takes the options in force where it is defined, that is
// where this header is first included.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#define GANOPS_X86_ISA_DISPATCH 1
#define GANOPS_COMPILE_FOR(TARGET) __attribute__((target(TARGET), flatten))
#else
#define GANOPS_COMPILE_FOR(TARGET) __attribute__((flatten))
#endif

namespace ganops {

enum class Isa {
  kBaseline,  // what the compiler targets by default (x86-64: SSE2)
  kAvxFma,    // AVX and FMA
  kAvx2,      // AVX2
  kAvx512,    // AVX-512 F, DQ, VL and BW
};

// Whether this CPU runs code compiled for isa (asked once per ISA).
inline bool cpu_has(Isa isa) {
#ifdef GANOPS_X86_ISA_DISPATCH
  static const bool avx_fma = __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma");
  static const bool avx2 = __builtin_cpu_supports("avx2");
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  switch (isa) {
    case Isa::kBaseline: return true;
    case Isa::kAvxFma: return avx_fma;
    case Isa::kAvx2: return avx2;
    case Isa::kAvx512: return avx512;
  }
  return false;
#else
  return isa == Isa::kBaseline;
#endif
}

// CompiledFor<isa>::run(body) runs body() with all of it compiled for isa.
template <Isa isa>
struct CompiledFor;

template <>
struct CompiledFor<Isa::kBaseline> {
  template <typename Body>
  __attribute__((flatten)) static decltype(auto) run(Body& body) { return body(); }
};

template <>
struct CompiledFor<Isa::kAvxFma> {
  template <typename Body>
  GANOPS_COMPILE_FOR("avx,fma") static decltype(auto) run(Body& body) { return body(); }
};

template <>
struct CompiledFor<Isa::kAvx2> {
  template <typename Body>
  GANOPS_COMPILE_FOR("avx2") static decltype(auto) run(Body& body) { return body(); }
};

// prefer-vector-width=512: GCC otherwise keeps to 256-bit vectors on AVX-512 targets.
template <>
struct CompiledFor<Isa::kAvx512> {
  template <typename Body>
  GANOPS_COMPILE_FOR("avx512f,avx512dq,avx512vl,avx512bw,prefer-vector-width=512") static decltype(auto) run(
      Body& body) {
    return body();
  }
};

// Runs body() compiled for the first of kCandidates this CPU has, else for the baseline.
template <typename Body>
decltype(auto) run_for_best_isa(Body&& body) {
  return CompiledFor<Isa::kBaseline>::run(body);
}

template <Isa kFirst, Isa... kRest, typename Body>
decltype(auto) run_for_best_isa(Body&& body) {
  if (cpu_has(kFirst)) return CompiledFor<kFirst>::run(body);
  return run_for_best_isa<kRest...>(body);
}

}  // namespace ganops
