// Device helpers shared by the CUDA kernels of every family (csrc/cuda/*.cu). Everything here sits
// in an anonymous namespace: each .cu file is its own translation unit (no relocatable device
// code), so each gets its own copy and nothing clashes at link time.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace sgg_kernels {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops cover any size; this many blocks keeps every SM of an H100/H200 busy.
constexpr int64_t kMaxBlocks = 65536;

inline unsigned int grid_for(int64_t n) {  // n > 0, one thread per item
  return static_cast<unsigned int>(std::min((n + kThreads - 1) / kThreads, kMaxBlocks));
}

// Grid-stride loop with an int64 index (P * D * ph * pw can exceed 2^31).
#define SGG_KERNEL_LOOP(i, n)                                                                       \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);           \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// Correctly rounded arithmetic without FMA contraction, for sample positions that decide floor()
// and inside/validity tests: computed with exactly the roundings of the reference, one operation
// at a time.
template <typename T>
struct Rn;

template <>
struct Rn<float> {
  static __device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
  static __device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
  static __device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
  static __device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
};

template <>
struct Rn<double> {
  static __device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
  static __device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
  static __device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
  static __device__ __forceinline__ double div(double a, double b) { return __ddiv_rn(a, b); }
};

// Reads pair p; true (and s, o set) when both indices lie in [0, K).
__device__ __forceinline__ bool read_pair(const int64_t* __restrict__ pairs, int64_t p, int64_t K, int64_t& s,
                                          int64_t& o) {
  s = pairs[2 * p];
  o = pairs[2 * p + 1];
  return s >= 0 && s < K && o >= 0 && o < K;
}

// First index in [lo, hi) of the sorted a with a[i] >= v.
__device__ __forceinline__ int64_t lower_bound(const int64_t* __restrict__ a, int64_t lo, int64_t hi, int64_t v) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a[mid] < v) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

}  // namespace
}  // namespace sgg_kernels
