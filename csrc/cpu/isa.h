// Function-level instruction-set dispatch of the CPU kernels (masks, pairs). The extension's flags
// target the baseline (SSE2 of -march=x86-64); simd_dispatch(f) runs f with every call inside it
// inlined (flatten) into a copy compiled for the best instruction set this CPU has: AVX-512, AVX2 +
// FMA, or the baseline. Plain loops over contiguous ranges inside f vectorize at that width under
// -O3. Every variant sums in the same order; the AVX2 / AVX-512 ones may fuse multiply-adds (one
// rounding fewer), so the last bits can differ between machines, never between runs or thread
// counts on one machine. Keep computations whose rounding must match a reference (sample positions)
// outside f.
#pragma once

namespace sgg_kernels {
namespace simd {

template <typename F>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"), flatten)) void run_avx512(const F& f) {
  f();
}
template <typename F>
__attribute__((target("avx2,fma"), flatten)) void run_avx2(const F& f) {
  f();
}
template <typename F>
__attribute__((flatten)) void run_baseline(const F& f) {
  f();
}

enum class Isa { kBaseline, kAvx2, kAvx512 };
inline Isa cpu_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return isa;
}

// f() with every call inside it inlined and compiled for the CPU's best instruction set.
template <typename F>
inline void simd_dispatch(const F& f) {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      run_avx512(f);
      break;
    case Isa::kAvx2:
      run_avx2(f);
      break;
    default:
      run_baseline(f);
  }
}

}  // namespace simd
}  // namespace sgg_kernels
