// CUDA kernels of the masks family (segmentation-grounded SGG, ICCV'21, Sec. 2.5, Eq. 6):
//   _pair_mask_conv           Eq. 6: out_p = A_s(K_s (*) m_s) . A_o(K_o (*) m_o) per class channel,
//                             (*) the cross-correlation of F.conv2d (zero padding d//2), A the
//                             resampling into the pair's union box (the identity in the own frames)
//   _pair_mask_conv_backward  its gradients w.r.t. the masks and the kernels (boxes get none)
// The math (and the spec every backend matches) is sgg_kernels/reference/masks.py
// (pair_mask_conv, pair_mask_conv_backward and the module docstring).
//
// Frames: boxes None and out_size 0: the own frames, out [P, C, m, m] = S . O. boxes [K, 4] and
// out_size R > 0: the union frame, out [P, C, R, R] = A_s(S) . A_o(O), A(x) = wy x wx^T with the
// separable bilinear weights wy, wx [R, m] of the reference's _union_weights (at most two taps per
// output row / column, stored as (lo, hi, w_lo, w_hi); a weight is 0 outside the own box).
//
// Floor (sgg_kernels/bench/floors.py, pair_mask_conv_floor; e bytes per element, T = the valid taps
// of one zero-padded d x d correlation of an m x m plane, 184^2 = 33,856 at m = 28, d = 7; N_s the
// smoothed planes: 2 P C with kernels [P, 2, d, d], K C with kernels [K, d, d]):
//   bytes fwd   masks K C m^2 e + pairs 16 P + kernels (+ boxes 16 K) + out P C side^2 e
//   bytes bwd   grad out + masks + pairs + kernels (+ boxes) read, d masks + d kernels written
//   FLOPs fwd   2 T N_s (smoothing) + P C side^2 (product) (+ 8 (m R + R^2) P C, the resampling)
//   FLOPs bwd   2 T N_s (recompute) + 4 T N_s (conv_transpose and the kernel-gradient correlation,
//               once per smoothed plane) + 2 P C side^2 (the two role gradients) + 2 P C m^2 (their
//               sums over pairs, into d masks or into each object's gradient) (+ resampling x 2)
// At the bench's paper size (K = 100, P = 256, C = 150, 28 x 28, d = 7, float32, kernels per pair
// and role, own frame): 159.7 MB / 5.23 GFLOP forward, 204.6 MB / 15.7 GFLOP backward: FMA-bound
// (~78 us forward at an H100's ~67 TFLOP/s of FP32 FMA vs ~50 us of memory; ~313 us fwd+bwd).
// With per-object kernels N_s = K C instead of 2 P C (5.1x fewer planes at paper, 12.8x at sgdet):
// 1.05 GFLOP forward, 3.2 backward at paper: memory-bound (~50 us forward, the output write;
// ~114 us fwd+bwd). sgdet: 625 / 2,502 us per pair (FMA), 333 / 710 us per object (memory).
//
// Layout of the work (accumulation type: float for half/bfloat16/float, double for double):
//   convolutions       correlate_strips<D>: the d x d taps in registers (templates for d = 3, 5, 7;
//                      a generic loop over taps in shared memory otherwise), each thread computing a
//                      strip of kStrip consecutive outputs along x from one register row of
//                      kStrip + d - 1 inputs per kernel row; the input is a zero-padded plane in
//                      shared memory (no bounds tests in the loop). conv_transpose2d is the same
//                      correlation of the zero-padded gradient with the flipped kernel.
//   union taps         union_taps_kernel: each pair's 4R resampling taps, once, into a [P, 4R]
//                      workspace the plane kernels copy into shared memory (union frame only)
//   per-pair kernels [P, 2, d, d] (the released code; every smoothed plane is distinct):
//     forward          one block per (pair, channel) plane (2D grid: x pairs, y channels)
//     backward, masks  one block per (object k, channel): k's pairs in both roles are found in a CSR
//                      (a stable sort of the pairs' indices, built with ATen), each pair's g for that
//                      role is recomputed and conv_transpose(K_role, g) is accumulated in a
//                      shared-memory plane owned strip by strip, written once
//     backward, kernels one block per ((pair, role), channel split): the channels are split over
//                      CTAs (splits chosen from the sizes alone), each CTA's partial [d, d] a
//                      fixed-order block reduction, the splits then summed in order
//   per-object kernels [K, d, d] (the paper's text): the smoothing depends on the object alone (also
//                      in the union frame: masks are smoothed in their own box frames, then resampled
//                      per pair), so it is done once per object:
//     smoothing        smooth_objects_kernel: S [K, C, m, m] (acc_t workspace) for every object in a
//                      valid pair, one block per (object, channel)
//     forward          pair_product_kernel: out = S[s] . S[o] (or their resamplings), from the workspace
//     backward         object_backward_kernel, one block per (object k, channel): g[k] = the sum of
//                      k's role gradients over its pairs (CSR order), then ONE conv_transpose
//                      (d masks) and ONE kernel-gradient correlation (a per-(k, channel) partial) per
//                      object plane; kernel_grad_finish_kernel sums the partials over the channels
// Shared memory grows with m^2 (and R^2 in the union frame); above 48 KB the kernels opt in to
// more, and a size that does not fit the device's per-block opt-in limit is a clear error.
//
// Determinism: everything here is deterministic (no atomics; every sum has a fixed order).
// Numerics: the union-frame sample positions are computed op by op without FMA contraction in the
// accumulation type (float32 for half/bfloat16, from float32 boxes, as the reference's _frames);
// half/bfloat16 accumulate in float32.
//
// Out-of-range pairs (an index outside [0, K); possible only with set_checks(False)) are never read:
// their output is 0 and they contribute nothing to any gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "cuda/common.cuh"
#include "masks_common.h"

namespace sgg_kernels {
namespace {

using masks_common::check_mask_grad;
using masks_common::check_mask_inputs;
using masks_common::MaskArgs;

// The plane kernels declare __launch_bounds__(kThreads, 1): their occupancy is set by shared memory
// (whole m x m planes per block), and without the explicit minimum ptxas capped the backward
// kernels at 48-64 registers and spilled.
constexpr int64_t kDefaultSmem = 48 * 1024;  // dynamic shared memory without an opt-in
constexpr int64_t kMaxSide = 1 << 15;        // m, d, R above this cannot fit shared memory anyway

inline unsigned int blocks_for(int64_t n) {  // n > 0, one block per item
  return static_cast<unsigned int>(std::min(n, kMaxBlocks));
}


// Block-stride loop over the items of one block's plane (int: every plane fits shared memory).
#define SGG_BLOCK_LOOP(q, n) for (int q = static_cast<int>(threadIdx.x); q < (n); q += static_cast<int>(blockDim.x))

// The same loop over the cells of a rows x cols plane, calling f(q, y, x) for q = y * cols + x (item q
// still on thread q mod blockDim.x). (y, x) advance by additions: the divisions happen once per call.
// (A division per item multiplies the division sites, and ptxas then outlines them into a subroutine
// whose calling convention spills registers.)
template <typename F>
__device__ __forceinline__ void for_each_cell(int rows, int cols, const F& f) {
  const int step = static_cast<int>(blockDim.x);
  const int dy = step / cols, dx = step - dy * cols;
  int y = static_cast<int>(threadIdx.x) / cols;
  int x = static_cast<int>(threadIdx.x) - y * cols;
  for (int q = static_cast<int>(threadIdx.x); q < rows * cols; q += step) {
    f(q, y, x);
    y += dy;
    x += dx;
    if (x >= cols) {
      x -= cols;
      ++y;
    }
  }
}

// The union-frame sample positions decide floor() and the inside-the-box tests: they are computed
// with Rn<> (common.cuh), exactly the roundings of the reference, one operation at a time.
__device__ __forceinline__ float floor_acc(float x) { return floorf(x); }
__device__ __forceinline__ double floor_acc(double x) { return floor(x); }

// torch.minimum / torch.maximum: NaN if either is NaN.
template <typename T>
__device__ __forceinline__ T min_nan(T a, T b) {
  return isnan(a) ? a : (isnan(b) ? b : (b < a ? b : a));
}
template <typename T>
__device__ __forceinline__ T max_nan(T a, T b) {
  return isnan(a) ? a : (isnan(b) ? b : (b > a ? b : a));
}



// ---------------------------------------------------------------------------------------------
// Union-frame resampling weights (reference: _union_weights). One Tap per output row i (axis y) or
// column j (axis x) of the R x R union grid, for one role's own box b in the union box U:
//   pos = U.lo + ((i + 0.5) / R) * max(U.hi - U.lo, 1e-6)
//   f   = (pos - b.lo) / max(b.hi - b.lo, 1e-6) * m - 0.5, clamped to [0, m - 1]
//   lo  = floor(f), hi = min(lo + 1, m - 1), weights (1 - frac, frac), times [b.lo <= pos <= b.hi]
//   and f not NaN (a non-finite box: weights 0, index 0)
// (when lo = hi = m - 1, frac = 0: the weights add up on that one row/column, like scatter_add_).
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct Tap {
  int lo, hi;
  acc_t wlo, whi;
};

template <typename acc_t>
__device__ __forceinline__ Tap<acc_t> axis_tap(acc_t u1, acc_t u2, acc_t b1, acc_t b2, int i, int R, int m) {
  using F = Rn<acc_t>;
  const acc_t eps = static_cast<acc_t>(1e-6);  // BOX_EPS of the reference
  const acc_t one = static_cast<acc_t>(1);
  const acc_t half = static_cast<acc_t>(0.5);
  const acc_t zero = static_cast<acc_t>(0);
  const acc_t top = static_cast<acc_t>(m - 1);
  const acc_t step = F::div(F::add(static_cast<acc_t>(i), half), static_cast<acc_t>(R));
  acc_t uw = F::sub(u2, u1);
  uw = uw < eps ? eps : uw;  // clamp_min: NaN stays NaN
  const acc_t pos = F::add(u1, F::mul(step, uw));
  acc_t bw = F::sub(b2, b1);
  bw = bw < eps ? eps : bw;
  acc_t f = F::sub(F::mul(F::div(F::sub(pos, b1), bw), static_cast<acc_t>(m)), half);
  // A NaN coordinate (a non-finite box) reads nothing, like a position outside the box (f == f is
  // false for NaN): weight 0 at index 0.
  const acc_t inside = (pos >= b1 && pos <= b2 && f == f) ? one : zero;
  f = f > zero ? f : zero;  // torch.clamp(0, m - 1) from below; NaN -> 0 (its weights are 0 anyway)
  f = f > top ? top : f;
  acc_t lo_f = floor_acc(f);
  lo_f = lo_f > top ? top : lo_f;
  const acc_t frac = F::sub(f, lo_f);
  Tap<acc_t> t;
  t.lo = lo_f >= zero ? static_cast<int>(lo_f) : 0;  // (f >= 0 and not NaN: never out of bounds)
  t.lo = t.lo > m - 1 ? m - 1 : t.lo;
  t.hi = t.lo + 1 < m - 1 ? t.lo + 1 : m - 1;
  t.wlo = F::sub(one, frac) * inside;
  t.whi = frac * inside;
  return t;
}

// The 4R taps of pair (s, o): taps[(role * 2 + axis) * R + i], role 0 subject / 1 object, axis 0 y
// (rows, box coordinates 1 and 3) / 1 x (columns, coordinates 0 and 2). Box coordinates are read
// as given (acc_t: float32, or float64 for float64 masks), as the reference's _frames reads them.
// Computed once per pair by union_taps_kernel into a [P, 4R] workspace, so the plane kernels hold
// no floating-point division (whose slow path is a subroutine call that spills registers).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    union_taps_kernel(const acc_t* __restrict__ boxes, const int64_t* __restrict__ pairs, int64_t P, int64_t K, int m,
                      int R, Tap<acc_t>* __restrict__ taps) {
  SGG_KERNEL_LOOP(p, P) {
    int64_t s, o;
    if (!read_pair(pairs, p, K, s, o)) continue;  // invalid pair: its taps are never read
    Tap<acc_t>* dst = taps + p * 4 * R;
    for (int t = 0; t < 4 * R; ++t) {
      const int role = t / (2 * R);
      const int axis = (t / R) % 2;
      const int i = t % R;
      const int c1 = axis == 0 ? 1 : 0;
      const acc_t s1 = boxes[4 * s + c1];
      const acc_t s2 = boxes[4 * s + c1 + 2];
      const acc_t o1 = boxes[4 * o + c1];
      const acc_t o2 = boxes[4 * o + c1 + 2];
      const acc_t u1 = min_nan(s1, o1);  // union box U = (min x1, min y1, max x2, max y2)
      const acc_t u2 = max_nan(s2, o2);
      dst[t] = role == 0 ? axis_tap(u1, u2, s1, s2, i, R, m) : axis_tap(u1, u2, o1, o2, i, R, m);
    }
  }
}

// The block's copy of pair p's 4R taps (R = 0: none).
template <typename acc_t>
__device__ __forceinline__ void load_taps(Tap<acc_t>* __restrict__ dst, const Tap<acc_t>* __restrict__ all_taps,
                                          int64_t p, int R) {
  if (R == 0) return;
  const Tap<acc_t>* src = all_taps + p * 4 * R;
  SGG_BLOCK_LOOP(t, 4 * R) { dst[t] = src[t]; }
}

// A(X)[i][j] = sum_{y, x} wy[i][y] X[y][x] wx[j][x] at one output pixel: the (at most) 2 x 2 taps.
template <typename acc_t>
__device__ __forceinline__ acc_t resample_at(const Tap<acc_t>& ty, const Tap<acc_t>& tx, const acc_t* __restrict__ X,
                                             int m) {
  const acc_t* rl = X + ty.lo * m;
  const acc_t* rh = X + ty.hi * m;
  return ty.wlo * (tx.wlo * rl[tx.lo] + tx.whi * rl[tx.hi]) + ty.whi * (tx.wlo * rh[tx.lo] + tx.whi * rh[tx.hi]);
}

// ---------------------------------------------------------------------------------------------
// Block-wide plane helpers. Every thread of the block calls them; they end without a barrier (the
// caller syncs before the results are read by other threads). Item q of a loop is always handled
// by thread q mod blockDim.x, so a plane written and read only by SGG_BLOCK_LOOP is thread-owned.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_plane(acc_t* __restrict__ dst, const scalar_t* __restrict__ src, int n) {
  SGG_BLOCK_LOOP(q, n) { dst[q] = static_cast<acc_t>(src[q]); }
}

// Eq. 6's smoothing, F.conv2d with zero padding h = d // 2 (cross-correlation):
//   dst[y][x] = sum_{r, c} K[r][c] src[y + r - h][x + c - h]
template <typename acc_t>
__device__ __forceinline__ void smooth(acc_t* __restrict__ dst, const acc_t* __restrict__ src,
                                       const acc_t* __restrict__ ker, int m, int d) {
  const int h = d / 2;
  for_each_cell(m, m, [&](int q, int y, int x) {
    const int r0 = max(0, h - y), r1 = min(d - 1, m - 1 + h - y);
    const int c0 = max(0, h - x), c1 = min(d - 1, m - 1 + h - x);
    acc_t sum = static_cast<acc_t>(0);
    for (int r = r0; r <= r1; ++r) {
      const int base = (y + r - h) * m + x - h;  // + kc lies in the row y + r - h
      for (int kc = c0; kc <= c1; ++kc) sum += ker[r * d + kc] * src[base + kc];
    }
    dst[q] = sum;
  });
}

// Its adjoint, F.conv_transpose2d with padding h, accumulated (thread-owned dst):
//   dst[y'][x'] += sum_{r, c} K[r][c] g[y' - r + h][x' - c + h]
template <typename acc_t>
__device__ __forceinline__ void conv_transpose_add(acc_t* __restrict__ dst, const acc_t* __restrict__ g,
                                                   const acc_t* __restrict__ ker, int m, int d) {
  const int h = d / 2;
  for_each_cell(m, m, [&](int q, int y, int x) {
    const int r0 = max(0, y + h - (m - 1)), r1 = min(d - 1, y + h);
    const int c0 = max(0, x + h - (m - 1)), c1 = min(d - 1, x + h);
    acc_t sum = static_cast<acc_t>(0);
    for (int r = r0; r <= r1; ++r) {
      const int base = (y - r + h) * m + x + h;  // - kc lies in the row y - r + h
      for (int kc = c0; kc <= c1; ++kc) sum += ker[r * d + kc] * g[base - kc];
    }
    dst[q] += sum;
  });
}

// The gradient of one role's smoothed plane (Eq. 6 backward, reference pair_mask_conv_backward):
//   own frame:   g_S = G . O                   (g_O = G . S)
//   union frame: g_S = A_s^T(G . A_o(O)) = wy_s^T (G . A_o(O)) wx_s   (g_O likewise)
// G: the grad plane (global, R x R or m x m); other_s: the other role's smoothed plane (shared,
// ready). The union frame goes separably without atomics: gu = G . A_other(other) [R, R], then
// T[i][x] = sum_j gu[i][j] wx[j][x] [R, m], then g[y][x] = sum_i wy[i][y] T[i][x] [m, m], each
// output owned by one thread that gathers over the taps touching it. Syncs inside (block-uniform).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void role_grad(const scalar_t* __restrict__ G, const acc_t* __restrict__ other_s,
                                          const Tap<acc_t>* __restrict__ taps, int role, int m, int R,
                                          acc_t* __restrict__ gu, acc_t* __restrict__ tt, acc_t* __restrict__ g) {
  if (R == 0) {
    SGG_BLOCK_LOOP(q, m * m) { g[q] = static_cast<acc_t>(G[q]) * other_s[q]; }
    return;
  }
  const int other = 1 - role;
  const Tap<acc_t>* oy = taps + (2 * other) * R;
  const Tap<acc_t>* ox = taps + (2 * other + 1) * R;
  const Tap<acc_t>* ry = taps + (2 * role) * R;
  const Tap<acc_t>* rx = taps + (2 * role + 1) * R;
  for_each_cell(R, R, [&](int q, int i, int j) {
    gu[q] = static_cast<acc_t>(G[q]) * resample_at(oy[i], ox[j], other_s, m);
  });
  __syncthreads();
  for_each_cell(R, m, [&](int q, int i, int x) {  // T = gu wx
    const acc_t* gi = gu + i * R;
    acc_t sum = static_cast<acc_t>(0);
    for (int j = 0; j < R; ++j) {
      const Tap<acc_t> t = rx[j];
      if (t.lo == x) sum += gi[j] * t.wlo;
      if (t.hi == x) sum += gi[j] * t.whi;
    }
    tt[q] = sum;
  });
  __syncthreads();
  for_each_cell(m, m, [&](int q, int y, int x) {  // g = wy^T T
    acc_t sum = static_cast<acc_t>(0);
    for (int i = 0; i < R; ++i) {
      const Tap<acc_t> t = ry[i];
      if (t.lo == y) sum += t.wlo * tt[i * m + x];
      if (t.hi == y) sum += t.whi * tt[i * m + x];
    }
    g[q] = sum;
  });
}


// ---------------------------------------------------------------------------------------------
// Convolutions on zero-padded planes. A padded plane holds an m x m plane at offset (h, h),
// h = d // 2, zeros around it: rows m + 2h, row stride ps = strips * kStrip + 2h (strips = the
// kStrip-wide strips of a row), so the last strip may read and compute past column m - 1 (zeros
// read, results dropped) without a bounds test.
// ---------------------------------------------------------------------------------------------
constexpr int kStrip = 4;  // consecutive outputs along x per thread (inputs reused in registers)

struct PadGeo {
  int m, d, h, strips, ps, rows;
};

__host__ __device__ inline PadGeo pad_geo(int m, int d) {
  PadGeo g;
  g.m = m;
  g.d = d;
  g.h = d / 2;
  g.strips = (m + kStrip - 1) / kStrip;
  g.ps = g.strips * kStrip + 2 * g.h;
  g.rows = m + 2 * g.h;
  return g;
}

// Every cell of a padded plane from a dense m x m plane src (global or shared, any dtype).
template <typename src_t, typename acc_t>
__device__ __forceinline__ void load_padded(acc_t* __restrict__ dst, const src_t* __restrict__ src, const PadGeo& g) {
  for_each_cell(g.rows, g.ps, [&](int q, int y, int x) {
    const int yy = y - g.h, xx = x - g.h;
    dst[q] = (yy >= 0 && yy < g.m && xx >= 0 && xx < g.m) ? static_cast<acc_t>(src[yy * g.m + xx])
                                                          : static_cast<acc_t>(0);
  });
}

// A [d, d] kernel into shared memory as acc_t; flipped (K[d-1-r][d-1-c]) for conv_transpose2d.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_kernel(acc_t* __restrict__ dst, const scalar_t* __restrict__ src, int dd,
                                            bool flip) {
  SGG_BLOCK_LOOP(e, dd) { dst[e] = static_cast<acc_t>(src[flip ? dd - 1 - e : e]); }
}

// dst[y][x] (=, or += with kAdd) sum_{r, c} K[r][c] pad[y + r][x + c] over the m x m outputs:
// F.conv2d's cross-correlation with zero padding h (Eq. 6's smoothing) from a padded plane, or, with
// the flipped kernel on the padded gradient, F.conv_transpose2d. Work item (y, strip) computes the
// kStrip outputs x0 .. x0 + kStrip - 1 of row y: per kernel row one register row of kStrip + D - 1
// inputs, D x kStrip multiply-adds from it. D > 0: the D x D taps in registers (fully unrolled);
// D = 0: any d, taps read from shared memory. Item q = y * strips + strip stays on thread q mod
// blockDim.x (for_each_cell), so with kAdd a dst in shared memory is thread-owned.
template <int D, bool kAdd, typename acc_t, typename out_t>
__device__ __forceinline__ void correlate_strips(out_t* __restrict__ dst, const acc_t* __restrict__ pad,
                                                 const acc_t* __restrict__ ker, const PadGeo& g) {
  const int m = g.m, ps = g.ps;
  if constexpr (D > 0) {
    acc_t k[D * D];
#pragma unroll
    for (int e = 0; e < D * D; ++e) k[e] = ker[e];
    for_each_cell(m, g.strips, [&](int q, int y, int sx) {
      const int x0 = sx * kStrip;
      acc_t acc[kStrip];
#pragma unroll
      for (int s = 0; s < kStrip; ++s) acc[s] = static_cast<acc_t>(0);
#pragma unroll
      for (int r = 0; r < D; ++r) {
        const acc_t* row = pad + (y + r) * ps + x0;
        acc_t in[kStrip + D - 1];
#pragma unroll
        for (int i = 0; i < kStrip + D - 1; ++i) in[i] = row[i];
#pragma unroll
        for (int c = 0; c < D; ++c) {
#pragma unroll
          for (int s = 0; s < kStrip; ++s) acc[s] += k[r * D + c] * in[s + c];
        }
      }
      out_t* out = dst + y * m + x0;
#pragma unroll
      for (int s = 0; s < kStrip; ++s) {
        if (x0 + s < m) {
          if constexpr (kAdd) {
            out[s] += acc[s];
          } else {
            out[s] = static_cast<out_t>(acc[s]);
          }
        }
      }
    });
  } else {
    const int d = g.d;
    for_each_cell(m, g.strips, [&](int q, int y, int sx) {
      const int x0 = sx * kStrip;
      acc_t acc[kStrip];
#pragma unroll
      for (int s = 0; s < kStrip; ++s) acc[s] = static_cast<acc_t>(0);
      for (int r = 0; r < d; ++r) {
        const acc_t* row = pad + (y + r) * ps + x0;
        for (int c = 0; c < d; ++c) {
          const acc_t kv = ker[r * d + c];
#pragma unroll
          for (int s = 0; s < kStrip; ++s) acc[s] += kv * row[s + c];
        }
      }
      out_t* out = dst + y * m + x0;
#pragma unroll
      for (int s = 0; s < kStrip; ++s) {
        if (x0 + s < m) {
          if constexpr (kAdd) {
            out[s] += acc[s];
          } else {
            out[s] = static_cast<out_t>(acc[s]);
          }
        }
      }
    });
  }
}

// The kernel gradient's per-thread partial sums, added to part [groups, d, d] (shared, thread-owned):
//   part[grp][r][c] += sum_{q = grp, grp + groups, ...} g[q] mpad[y_q + r][x_q + c]
// g dense m x m, mpad the role's own mask, padded (zero outside the mask: no bounds test). Work
// item w = grp * dd + e stays on thread w mod blockDim.x.
template <typename acc_t>
__device__ __forceinline__ void kernel_grad_accumulate(acc_t* __restrict__ part, const acc_t* __restrict__ g,
                                                       const acc_t* __restrict__ mpad, const PadGeo& pg,
                                                       int groups) {
  const int m = pg.m, d = pg.d, ps = pg.ps, mm = m * m;
  const int dd = d * d;
  for_each_cell(groups, dd, [&](int w, int grp, int e) {
    const int r = e / d;
    const int kc = e - r * d;
    const int gy = groups / m, gx = groups - gy * m;  // the pixel step, as (rows, columns)
    int y = grp / m, x = grp - (grp / m) * m;
    acc_t sum = static_cast<acc_t>(0);
    for (int q = grp; q < mm; q += groups) {
      sum += g[q] * mpad[(y + r) * ps + x + kc];
      y += gy;
      x += gx;
      if (x >= m) {
        x -= m;
        ++y;
      }
    }
    part[w] += sum;
  });
}

// The [d, d] partial of a block: sum over the groups in order, into dst (global, acc_t). Syncs first.
template <typename acc_t>
__device__ __forceinline__ void kernel_grad_store(acc_t* __restrict__ dst, const acc_t* __restrict__ part, int dd,
                                                  int groups) {
  __syncthreads();  // part complete
  SGG_BLOCK_LOOP(e, dd) {
    acc_t total = static_cast<acc_t>(0);
    for (int grp = 0; grp < groups; ++grp) total += part[grp * dd + e];
    dst[e] = total;
  }
}

// ---------------------------------------------------------------------------------------------
// Shared-memory layouts (byte offsets, 16-byte aligned), one per kernel, used by both the host
// (size) and the kernel (carving). R = 0 in the own frame: no union buffers, no taps.
// ---------------------------------------------------------------------------------------------
__host__ __device__ inline int64_t take(int64_t& pos, int64_t bytes) {
  const int64_t at = pos;
  pos += (bytes + 15) / 16 * 16;
  return at;
}

__host__ __device__ inline int64_t padded_cells(int64_t m, int64_t d) {
  const PadGeo g = pad_geo(static_cast<int>(m), static_cast<int>(d));
  return static_cast<int64_t>(g.rows) * g.ps;
}

// Every kernel's buffers; a kernel's layout takes only the ones it uses (the others get 0 bytes).
struct Layout {
  int64_t pad_a, pad_b, ker_a, ker_b, dense_a, dense_b, gu, tt, g, acc, taps, bytes;
};

enum class Use { kForward, kSmooth, kProduct, kBwdMasks, kBwdKernels, kBwdObject };

template <typename acc_t>
__host__ __device__ inline Layout layout(Use u, int64_t m, int64_t d, int64_t R, int64_t groups) {
  const int64_t a = static_cast<int64_t>(sizeof(acc_t));
  const int64_t mm = m * m * a, pc = padded_cells(m, d) * a, dd = d * d * a;
  const bool fwd = u == Use::kForward, smooth = u == Use::kSmooth, prod = u == Use::kProduct;
  const bool bm = u == Use::kBwdMasks, bk = u == Use::kBwdKernels, bo = u == Use::kBwdObject;
  Layout L;
  int64_t pos = 0;
  // pad_a: forward subject / smoothed object mask / backward other role's mask / object: the gradient
  L.pad_a = take(pos, (fwd || smooth || bm || bk || bo) ? pc : 0);
  // pad_b: forward object / backward kernels and object: this role's own mask
  L.pad_b = take(pos, (fwd || bk || bo) ? pc : 0);
  L.ker_a = take(pos, prod ? 0 : dd);          // subject's / the smoothing / the other role's / flipped
  L.ker_b = take(pos, (fwd || bm) ? dd : 0);   // forward object's / backward this role's, flipped
  // dense_a: forward S / backward other role's smoothed plane
  L.dense_a = take(pos, (fwd || bm || bk || (bo && R > 0)) ? mm : 0);
  L.dense_b = take(pos, fwd ? mm : 0);          // forward O
  const bool grads = bm || bk || bo;
  L.gu = take(pos, grads ? R * R * a : 0);      // G . A_other(other)
  L.tt = take(pos, grads ? R * m * a : 0);      // gu wx
  L.g = take(pos, grads ? mm : 0);              // this role's g (object: the sum over k's pairs)
  // acc: backward masks: the d masks plane [m, m]; kernels / object: the partials [groups, d, d]
  L.acc = take(pos, bm ? mm : ((bk || bo) ? groups * d * d * a : 0));
  L.taps = take(pos, (smooth ? 0 : 4 * R) * static_cast<int64_t>(sizeof(Tap<acc_t>)));
  L.bytes = pos;
  return L;
}

#define SGG_SMEM(T, off) reinterpret_cast<T*>(smem + (off))

// ---------------------------------------------------------------------------------------------
// Forward with per-pair kernels (Eq. 6). masks [K, C, m, m], pairs [P, 2], kernels [P, 2, d, d],
// all_taps [P, 4R] (union_taps_kernel) or null (R = 0), out [P, C, R, R] or [P, C, m, m]. One block
// per (p, c) plane.
// ---------------------------------------------------------------------------------------------
template <int D, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    pair_mask_conv_kernel(const scalar_t* __restrict__ masks, const int64_t* __restrict__ pairs,
                          const scalar_t* __restrict__ kernels, const Tap<acc_t>* __restrict__ all_taps, int64_t P,
                          int64_t K, int64_t C, int m, int d, int R, scalar_t* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout L = layout<acc_t>(Use::kForward, m, d, R, 0);
  acc_t* ms = SGG_SMEM(acc_t, L.pad_a);
  acc_t* mo = SGG_SMEM(acc_t, L.pad_b);
  acc_t* ks = SGG_SMEM(acc_t, L.ker_a);
  acc_t* ko = SGG_SMEM(acc_t, L.ker_b);
  acc_t* ss = SGG_SMEM(acc_t, L.dense_a);
  acc_t* so = SGG_SMEM(acc_t, L.dense_b);
  Tap<acc_t>* taps = SGG_SMEM(Tap<acc_t>, L.taps);
  const PadGeo pg = pad_geo(m, d);
  const int mm = m * m;
  const int dd = d * d;
  const int out_hw = R > 0 ? R * R : mm;

  // p, c, s, o are block-uniform: every __syncthreads below is reached by the whole block. A 2D grid
  // (x: pairs, y: channels) needs no 64-bit division (a subroutine call that spills registers).
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    for (int64_t p = blockIdx.x; p < P; p += gridDim.x) {
      scalar_t* dst = out + (p * C + c) * out_hw;
      int64_t s, o;
      if (!read_pair(pairs, p, K, s, o)) {  // invalid pair: output 0 (no shared memory touched)
        SGG_BLOCK_LOOP(q, out_hw) { dst[q] = static_cast<scalar_t>(0); }
        continue;
      }
      load_padded(ms, masks + (s * C + c) * mm, pg);
      load_padded(mo, masks + (o * C + c) * mm, pg);
      load_kernel(ks, kernels + (2 * p) * dd, dd, false);
      load_kernel(ko, kernels + (2 * p + 1) * dd, dd, false);
      load_taps(taps, all_taps, p, R);
      __syncthreads();
      correlate_strips<D, false>(ss, ms, ks, pg);  // S = K_s (*) m_s
      correlate_strips<D, false>(so, mo, ko, pg);  // O = K_o (*) m_o
      __syncthreads();
      if (R == 0) {
        SGG_BLOCK_LOOP(q, mm) { dst[q] = static_cast<scalar_t>(ss[q] * so[q]); }  // S . O
      } else {
        const Tap<acc_t>* sy = taps;
        const Tap<acc_t>* sx = taps + R;
        const Tap<acc_t>* oy = taps + 2 * R;
        const Tap<acc_t>* ox = taps + 3 * R;
        for_each_cell(R, R, [&](int q, int i, int j) {  // A_s(S) . A_o(O)
          dst[q] = static_cast<scalar_t>(resample_at(sy[i], sx[j], ss, m) * resample_at(oy[i], ox[j], so, m));
        });
      }
      __syncthreads();  // shared memory is reused by the next plane
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Per-object kernels [K, d, d]: S[k, c] = K_k (*) m[k, c] once per object in a valid pair (used[k]),
// into the acc_t workspace ws [K, C, m, m]. One block per (k, c) plane; unused objects' planes are
// never written nor read.
// ---------------------------------------------------------------------------------------------
template <int D, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    smooth_objects_kernel(const scalar_t* __restrict__ masks, const scalar_t* __restrict__ kernels,
                          const uint8_t* __restrict__ used, int64_t K, int64_t C, int m, int d,
                          acc_t* __restrict__ ws) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout L = layout<acc_t>(Use::kSmooth, m, d, 0, 0);
  acc_t* pad = SGG_SMEM(acc_t, L.pad_a);
  acc_t* ker = SGG_SMEM(acc_t, L.ker_a);
  const PadGeo pg = pad_geo(m, d);
  const int mm = m * m;
  const int dd = d * d;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
      if (!used[k]) continue;  // block-uniform
      load_padded(pad, masks + (k * C + c) * mm, pg);
      load_kernel(ker, kernels + k * dd, dd, false);
      __syncthreads();
      correlate_strips<D, false>(ws + (k * C + c) * mm, pad, ker, pg);
      __syncthreads();
    }
  }
}

// Forward with per-object kernels: out = S[s, c] . S[o, c] (own frame) or A_s(S) . A_o(O) (union),
// the smoothed planes read from the workspace (L2-resident: each is read by every pair of its object).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    pair_product_kernel(const acc_t* __restrict__ ws, const int64_t* __restrict__ pairs,
                        const Tap<acc_t>* __restrict__ all_taps, int64_t P, int64_t K, int64_t C, int m, int R,
                        scalar_t* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout L = layout<acc_t>(Use::kProduct, m, 0, R, 0);
  Tap<acc_t>* taps = SGG_SMEM(Tap<acc_t>, L.taps);
  const int mm = m * m;
  const int out_hw = R > 0 ? R * R : mm;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    for (int64_t p = blockIdx.x; p < P; p += gridDim.x) {
      scalar_t* dst = out + (p * C + c) * out_hw;
      int64_t s, o;
      if (!read_pair(pairs, p, K, s, o)) {
        SGG_BLOCK_LOOP(q, out_hw) { dst[q] = static_cast<scalar_t>(0); }
        continue;
      }
      const acc_t* S = ws + (s * C + c) * mm;
      const acc_t* O = ws + (o * C + c) * mm;
      if (R == 0) {
        SGG_BLOCK_LOOP(q, mm) { dst[q] = static_cast<scalar_t>(S[q] * O[q]); }
        continue;
      }
      load_taps(taps, all_taps, p, R);
      __syncthreads();
      const Tap<acc_t>* sy = taps;
      const Tap<acc_t>* sx = taps + R;
      const Tap<acc_t>* oy = taps + 2 * R;
      const Tap<acc_t>* ox = taps + 3 * R;
      for_each_cell(R, R, [&](int q, int i, int j) {
        dst[q] = static_cast<scalar_t>(resample_at(sy[i], sx[j], S, m) * resample_at(oy[i], ox[j], O, m));
      });
      __syncthreads();  // taps are reused by the next plane
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward with per-pair kernels, d masks. One block per (object k, channel c):
//   d m[k] = sum_{p: s_p = k} K_s (*)^T g_S + sum_{p: o_p = k} K_o (*)^T g_O
// keys [2P] sorted (stable): role * (K + 1) + index (K for an invalid pair), perm [2P] the source
// position role * P + p. Pairs are summed subject role first, each role in ascending p.
// ---------------------------------------------------------------------------------------------
template <int D, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    pair_mask_conv_backward_masks_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ masks,
                                         const int64_t* __restrict__ pairs, const scalar_t* __restrict__ kernels,
                                         const Tap<acc_t>* __restrict__ all_taps, const int64_t* __restrict__ keys,
                                         const int64_t* __restrict__ perm, int64_t P, int64_t K, int64_t C, int m,
                                         int d, int R, scalar_t* __restrict__ d_masks) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout L = layout<acc_t>(Use::kBwdMasks, m, d, R, 0);
  acc_t* pad = SGG_SMEM(acc_t, L.pad_a);  // the other role's mask, then this role's g (padded)
  acc_t* ker_other = SGG_SMEM(acc_t, L.ker_a);
  acc_t* ker_flip = SGG_SMEM(acc_t, L.ker_b);
  acc_t* other_s = SGG_SMEM(acc_t, L.dense_a);
  acc_t* gu = SGG_SMEM(acc_t, L.gu);
  acc_t* tt = SGG_SMEM(acc_t, L.tt);
  acc_t* g = SGG_SMEM(acc_t, L.g);
  acc_t* dm = SGG_SMEM(acc_t, L.acc);
  Tap<acc_t>* taps = SGG_SMEM(Tap<acc_t>, L.taps);
  const PadGeo pg = pad_geo(m, d);
  const int mm = m * m;
  const int dd = d * d;
  const int64_t out_hw = R > 0 ? static_cast<int64_t>(R) * R : mm;
  const int64_t N = 2 * P;

  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {  // block-uniform (2D grid: x objects, y channels)
    for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
      // dm is owned strip by strip (correlate_strips' item mapping): zeroed with the same mapping
      for_each_cell(m, pg.strips, [&](int, int y, int sx) {
        for (int s = 0; s < kStrip && sx * kStrip + s < m; ++s) dm[y * m + sx * kStrip + s] = static_cast<acc_t>(0);
      });
      for (int role = 0; role < 2; ++role) {
        const int64_t key = role * (K + 1) + k;
        const int64_t begin = lower_bound(keys, 0, N, key);
        const int64_t end = lower_bound(keys, begin, N, key + 1);
        for (int64_t e = begin; e < end; ++e) {
          const int64_t p = perm[e] - role * P;
          int64_t s, o;
          if (!read_pair(pairs, p, K, s, o)) continue;  // never (invalid pairs have key K); uniform
          const int64_t other = role == 0 ? o : s;
          load_padded(pad, masks + (other * C + c) * mm, pg);
          load_kernel(ker_flip, kernels + (2 * p + role) * dd, dd, true);
          load_kernel(ker_other, kernels + (2 * p + 1 - role) * dd, dd, false);
          load_taps(taps, all_taps, p, R);
          __syncthreads();
          correlate_strips<D, false>(other_s, pad, ker_other, pg);
          __syncthreads();
          role_grad(grad + (p * C + c) * out_hw, other_s, taps, role, m, R, gu, tt, g);
          __syncthreads();
          load_padded(pad, g, pg);
          __syncthreads();
          correlate_strips<D, true>(dm, pad, ker_flip, pg);  // += K_role (*)^T g
          __syncthreads();  // shared memory is reused by the next pair
        }
      }
      scalar_t* dst = d_masks + (k * C + c) * mm;
      for_each_cell(m, pg.strips, [&](int, int y, int sx) {  // the owner writes (no sync needed)
        for (int s = 0; s < kStrip && sx * kStrip + s < m; ++s) {
          dst[y * m + sx * kStrip + s] = static_cast<scalar_t>(dm[y * m + sx * kStrip + s]);
        }
      });
      __syncthreads();  // dm is reset by the next plane (same owners, but keep the planes apart)
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward with per-pair kernels, d kernels. Block (item, split) for item = (pair, role) in
// [0, 2P) and split in [0, splits): the channels c = split, split + splits, ...;
// parts [2P, splits, d, d] (acc_t):
//   d K_role[r][c] = sum_{channel, y, x} g_role[y][x] m_role[y + r - h][x + c - h]  (0 outside)
// Work item w in [0, groups * d * d) of kernel_grad_accumulate is owned by thread w mod blockDim.x
// across the channels, then the groups are added in order (a deterministic block reduction);
// kernel_grad_finish_kernel adds the splits in order.
// ---------------------------------------------------------------------------------------------
template <int D, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    pair_mask_conv_backward_kernels_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ masks,
                                           const int64_t* __restrict__ pairs, const scalar_t* __restrict__ kernels,
                                           const Tap<acc_t>* __restrict__ all_taps, int64_t P, int64_t K, int64_t C,
                                           int m, int d, int R, int groups, int splits, acc_t* __restrict__ parts) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout L = layout<acc_t>(Use::kBwdKernels, m, d, R, groups);
  acc_t* other_pad = SGG_SMEM(acc_t, L.pad_a);
  acc_t* self_pad = SGG_SMEM(acc_t, L.pad_b);
  acc_t* ker_other = SGG_SMEM(acc_t, L.ker_a);
  acc_t* other_s = SGG_SMEM(acc_t, L.dense_a);
  acc_t* gu = SGG_SMEM(acc_t, L.gu);
  acc_t* tt = SGG_SMEM(acc_t, L.tt);
  acc_t* g = SGG_SMEM(acc_t, L.g);
  acc_t* part = SGG_SMEM(acc_t, L.acc);
  Tap<acc_t>* taps = SGG_SMEM(Tap<acc_t>, L.taps);
  const PadGeo pg = pad_geo(m, d);
  const int mm = m * m;
  const int dd = d * d;
  const int64_t out_hw = R > 0 ? static_cast<int64_t>(R) * R : mm;

  for (int64_t split = blockIdx.y; split < splits; split += gridDim.y) {  // block-uniform
    for (int64_t item = blockIdx.x; item < 2 * P; item += gridDim.x) {
      const int64_t p = item / 2;
      const int role = static_cast<int>(item % 2);
      acc_t* dst = parts + (item * splits + split) * dd;
      int64_t s, o;
      if (!read_pair(pairs, p, K, s, o)) {  // invalid pair: no gradient (no shared memory touched)
        SGG_BLOCK_LOOP(e, dd) { dst[e] = static_cast<acc_t>(0); }
        continue;
      }
      const int64_t self = role == 0 ? s : o;
      const int64_t other = role == 0 ? o : s;
      load_kernel(ker_other, kernels + (2 * p + 1 - role) * dd, dd, false);
      load_taps(taps, all_taps, p, R);
      SGG_BLOCK_LOOP(w, groups * dd) { part[w] = static_cast<acc_t>(0); }  // thread-owned
      for (int64_t c = split; c < C; c += splits) {
        load_padded(self_pad, masks + (self * C + c) * mm, pg);
        load_padded(other_pad, masks + (other * C + c) * mm, pg);
        __syncthreads();
        correlate_strips<D, false>(other_s, other_pad, ker_other, pg);
        __syncthreads();
        role_grad(grad + (p * C + c) * out_hw, other_s, taps, role, m, R, gu, tt, g);
        __syncthreads();
        kernel_grad_accumulate(part, g, self_pad, pg, groups);
        __syncthreads();  // shared memory is reused by the next channel
      }
      kernel_grad_store(dst, part, dd, groups);
      __syncthreads();  // part is reset by the next item
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward with per-object kernels. One block per (object k, channel c), k in a valid pair:
//   g[k] = sum_{p: s_p = k} g_S + sum_{p: o_p = k} g_O    (CSR order: subject role first, ascending p)
//   d m[k, c] = K_k (*)^T g[k]        d K_k += corr(m[k, c], g[k])  (partial [K, C, d, d])
// g_S = G . O (own frame; O = S[o, c] from the workspace) or A_s^T(G . A_o(O)) (union frame).
// Unused objects get zero planes and partials.
// ---------------------------------------------------------------------------------------------
template <int D, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    object_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ masks,
                           const int64_t* __restrict__ pairs, const scalar_t* __restrict__ kernels,
                           const acc_t* __restrict__ ws, const Tap<acc_t>* __restrict__ all_taps,
                           const int64_t* __restrict__ keys, const int64_t* __restrict__ perm, int64_t P, int64_t K,
                           int64_t C, int m, int d, int R, int groups, bool need_masks, bool need_kernels,
                           scalar_t* __restrict__ d_masks, acc_t* __restrict__ parts) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout L = layout<acc_t>(Use::kBwdObject, m, d, R, groups);
  acc_t* gpad = SGG_SMEM(acc_t, L.pad_a);
  acc_t* self_pad = SGG_SMEM(acc_t, L.pad_b);
  acc_t* ker_flip = SGG_SMEM(acc_t, L.ker_a);
  acc_t* other_s = SGG_SMEM(acc_t, L.dense_a);
  acc_t* gu = SGG_SMEM(acc_t, L.gu);
  acc_t* tt = SGG_SMEM(acc_t, L.tt);
  acc_t* gk = SGG_SMEM(acc_t, L.g);
  acc_t* part = SGG_SMEM(acc_t, L.acc);
  Tap<acc_t>* taps = SGG_SMEM(Tap<acc_t>, L.taps);
  // the union frame's per-pair g: role_grad writes a whole plane; it goes into gpad's storage (free
  // until g[k] is padded), then is added to gk
  acc_t* g = gpad;
  const PadGeo pg = pad_geo(m, d);
  const int mm = m * m;
  const int dd = d * d;
  const int64_t out_hw = R > 0 ? static_cast<int64_t>(R) * R : mm;
  const int64_t N = 2 * P;

  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {  // block-uniform
    for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
      const int64_t plane = k * C + c;
      const int64_t b0 = lower_bound(keys, 0, N, k);
      const int64_t b1 = lower_bound(keys, b0, N, k + 1);
      const int64_t o0 = lower_bound(keys, b1, N, (K + 1) + k);
      const int64_t o1 = lower_bound(keys, o0, N, (K + 1) + k + 1);
      if (b0 == b1 && o0 == o1) {  // in no valid pair: zero gradients
        if (need_masks) SGG_BLOCK_LOOP(q, mm) { d_masks[plane * mm + q] = static_cast<scalar_t>(0); }
        if (need_kernels) SGG_BLOCK_LOOP(e, dd) { parts[plane * dd + e] = static_cast<acc_t>(0); }
        continue;
      }
      SGG_BLOCK_LOOP(q, mm) { gk[q] = static_cast<acc_t>(0); }  // thread-owned
      for (int role = 0; role < 2; ++role) {
        const int64_t begin = role == 0 ? b0 : o0;
        const int64_t end = role == 0 ? b1 : o1;
        for (int64_t e = begin; e < end; ++e) {
          const int64_t p = perm[e] - role * P;
          int64_t s, o;
          if (!read_pair(pairs, p, K, s, o)) continue;  // never; uniform
          const int64_t other = role == 0 ? o : s;
          const acc_t* O = ws + (other * C + c) * mm;
          const scalar_t* G = grad + (p * C + c) * out_hw;
          if (R == 0) {
            SGG_BLOCK_LOOP(q, mm) { gk[q] += static_cast<acc_t>(G[q]) * O[q]; }  // thread-owned
            continue;
          }
          load_taps(taps, all_taps, p, R);
          SGG_BLOCK_LOOP(q, mm) { other_s[q] = O[q]; }
          __syncthreads();
          role_grad(G, other_s, taps, role, m, R, gu, tt, g);
          __syncthreads();
          SGG_BLOCK_LOOP(q, mm) { gk[q] += g[q]; }  // thread-owned
          __syncthreads();  // g, taps, other_s are reused by the next pair
        }
      }
      __syncthreads();  // gk complete
      load_padded(gpad, gk, pg);
      load_kernel(ker_flip, kernels + k * dd, dd, true);
      if (need_kernels) {
        load_padded(self_pad, masks + plane * mm, pg);
        SGG_BLOCK_LOOP(w, groups * dd) { part[w] = static_cast<acc_t>(0); }
      }
      __syncthreads();
      if (need_masks) correlate_strips<D, false>(d_masks + plane * mm, gpad, ker_flip, pg);
      if (need_kernels) {
        kernel_grad_accumulate(part, gk, self_pad, pg, groups);
        kernel_grad_store(parts + plane * dd, part, dd, groups);
      }
      __syncthreads();  // shared memory is reused by the next plane
    }
  }
}

// d K[row] = sum_{j < n} parts[row, j] in order: per pair and role, n = the channel splits; per
// object, n = C (the (object, channel) partials). out [rows, d, d]; one thread per (row, entry).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    kernel_grad_finish_kernel(const acc_t* __restrict__ parts, int64_t rows, int64_t n, int64_t dd,
                              scalar_t* __restrict__ out) {
  SGG_KERNEL_LOOP(idx, rows * dd) {
    const int64_t row = idx / dd;
    const int64_t e = idx % dd;
    acc_t total = static_cast<acc_t>(0);
    for (int64_t j = 0; j < n; ++j) total += parts[(row * n + j) * dd + e];
    out[idx] = static_cast<scalar_t>(total);
  }
}

// ---------------------------------------------------------------------------------------------
// Host wrappers
// ---------------------------------------------------------------------------------------------

// Fails clearly when a block's shared memory exceeds the device's opt-in limit, and opts in above
// the default 48 KB. m, d, R were bounded by kMaxSide (no int64 overflow in the layout).
template <typename Kernel>
void prepare_smem(const char* op, Kernel* kernel, int64_t bytes, const at::Tensor& masks, const MaskArgs& a) {
  int optin = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, static_cast<int>(masks.get_device())));
  TORCH_CHECK(bytes <= optin, op, ": masks of size m = ", a.m, " with kernels of size d = ", a.d,
              a.R > 0 ? " and out_size R = " : "", a.R > 0 ? std::to_string(a.R) : std::string(), " need ", bytes,
              " bytes of shared memory per block (", masks.scalar_type(), "), more than this GPU's limit of ", optin,
              "; use smaller masks (or out_size), or the reference backend");
  if (bytes > kDefaultSmem) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

void check_sides(const char* op, const MaskArgs& a) {
  TORCH_CHECK(a.m <= kMaxSide && a.d <= kMaxSide && a.R <= kMaxSide, op, ": m = ", a.m, ", d = ", a.d,
              ", out_size = ", a.R, " are too large for the CUDA kernels (shared memory)");
}

// f(std::integral_constant<int, D>{}) with D = d for the specialised sizes 3, 5, 7, else D = 0 (the
// generic taps-in-shared-memory loop).
template <typename F>
void with_kernel_size(int64_t d, const F& f) {
  switch (d) {
    case 3:
      f(std::integral_constant<int, 3>{});
      break;
    case 5:
      f(std::integral_constant<int, 5>{});
      break;
    case 7:
      f(std::integral_constant<int, 7>{});
      break;
    default:
      f(std::integral_constant<int, 0>{});
  }
}

// The CSR of the pairs by object and role: keys [2P] = role * (K + 1) + index (K for an invalid
// pair), stably sorted, and perm [2P] the position role * P + p of each sorted key.
std::tuple<at::Tensor, at::Tensor> pair_csr(const at::Tensor& pairs, int64_t K) {
  const at::Tensor valid = pairs.ge(0).logical_and_(pairs.lt(K)).all(1);  // [P]
  const at::Tensor ks = at::where(valid, pairs.select(1, 0), at::Scalar(K));
  const at::Tensor ko = at::where(valid, pairs.select(1, 1), at::Scalar(K)).add_(K + 1);
  const at::Tensor keys = at::cat({ks, ko});
  auto sorted = at::sort(keys, std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
  return {std::get<0>(sorted).contiguous(), std::get<1>(sorted).contiguous()};
}

// used [K (+1)] uint8: 1 for the objects in at least one valid pair (whose planes the per-object kernels
// smooth), 0 otherwise.
at::Tensor used_objects(const at::Tensor& pairs, int64_t K) {
  // invalid pairs mark a spare slot K (no data-dependent shapes: no sync)
  const at::Tensor valid = pairs.ge(0).logical_and_(pairs.lt(K)).all(1, /*keepdim=*/true);  // [P, 1]
  const at::Tensor idx = at::where(valid, pairs, at::Scalar(K)).reshape({-1});
  at::Tensor used = at::zeros({K + 1}, pairs.options().dtype(at::kByte));
  if (idx.numel() > 0) used.index_fill_(0, idx, 1);
  return used;  // [K + 1]; the kernels read the first K
}

// One block per (row, channel) plane, x over the rows (pairs or objects), y over the channels; about
// kMaxBlocks blocks at most (the kernels loop over the rest). rows, C > 0.
inline dim3 plane_grid(int64_t rows, int64_t C) {
  const int64_t y = std::min<int64_t>(C, 65535);
  const int64_t x = std::min<int64_t>(rows, std::max<int64_t>(1, kMaxBlocks / y));
  return dim3(static_cast<unsigned int>(x), static_cast<unsigned int>(y));
}

// Union frame: the [P, 4R] taps of every pair (union_taps_kernel) in the byte workspace ws; the own
// frames (R = 0): null.
template <typename acc_t>
const Tap<acc_t>* union_taps(at::Tensor& ws, const at::Tensor& boxes, const at::Tensor& pairs, const MaskArgs& a,
                             cudaStream_t stream) {
  if (a.R == 0) return nullptr;
  ws = at::empty({a.P * 4 * a.R * static_cast<int64_t>(sizeof(Tap<acc_t>))}, pairs.options().dtype(at::kByte));
  Tap<acc_t>* taps = reinterpret_cast<Tap<acc_t>*>(ws.data_ptr<uint8_t>());
  union_taps_kernel<acc_t><<<grid_for(a.P), kThreads, 0, stream>>>(
      boxes.data_ptr<acc_t>(), pairs.data_ptr<int64_t>(), a.P, a.K, static_cast<int>(a.m), static_cast<int>(a.R), taps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return taps;
}

// Per-object kernels: the [K, C, m, m] acc_t workspace of smoothed planes (smooth_objects_kernel).
template <typename scalar_t, typename acc_t>
at::Tensor smooth_objects(const char* op, const at::Tensor& mk, const at::Tensor& pr, const at::Tensor& kn,
                          const MaskArgs& a, cudaStream_t stream) {
  at::Tensor ws = at::empty({a.K, a.C, a.m, a.m}, mk.options().dtype(at::toOpMathType(mk.scalar_type())));
  const at::Tensor used = used_objects(pr, a.K);
  const int64_t bytes = layout<acc_t>(Use::kSmooth, a.m, a.d, 0, 0).bytes;
  with_kernel_size(a.d, [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    prepare_smem(op, smooth_objects_kernel<D, scalar_t, acc_t>, bytes, mk, a);
    smooth_objects_kernel<D, scalar_t, acc_t><<<plane_grid(a.K, a.C), kThreads, bytes, stream>>>(
        mk.data_ptr<scalar_t>(), kn.data_ptr<scalar_t>(), used.data_ptr<uint8_t>(), a.K, a.C,
        static_cast<int>(a.m), static_cast<int>(a.d), ws.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return ws;
}

at::Tensor pair_mask_conv_cuda(const at::Tensor& masks, const at::Tensor& pairs, const at::Tensor& kernels,
                               const std::optional<at::Tensor>& boxes, int64_t out_size) {
  const char* op = "pair_mask_conv";
  const MaskArgs a = check_mask_inputs(op, c10::DeviceType::CUDA, masks, pairs, kernels, boxes, out_size);
  c10::cuda::CUDAGuard device_guard(masks.device());
  const int64_t side = a.R > 0 ? a.R : a.m;
  at::Tensor out = at::empty({a.P, a.C, side, side}, masks.options());
  if (out.numel() == 0) return out;                      // P = 0, C = 0, or an empty frame
  if (a.K == 0 || a.m == 0) return out.zero_();          // every pair invalid / nothing to resample
  check_sides(op, a);

  const at::Tensor mk = masks.contiguous();
  const at::Tensor pr = pairs.contiguous();
  const at::Tensor kn = kernels.contiguous();
  const at::Tensor bx = boxes.has_value() ? boxes->contiguous() : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mk.scalar_type(), "pair_mask_conv_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor taps_ws;
    const Tap<acc_t>* taps = union_taps<acc_t>(taps_ws, bx, pr, a, stream);
    const int m = static_cast<int>(a.m), d = static_cast<int>(a.d), R = static_cast<int>(a.R);
    if (!a.per_pair) {  // each object's smoothing once, then the products
      const at::Tensor ws = smooth_objects<scalar_t, acc_t>(op, mk, pr, kn, a, stream);
      const int64_t bytes = layout<acc_t>(Use::kProduct, a.m, a.d, a.R, 0).bytes;
      prepare_smem(op, pair_product_kernel<scalar_t, acc_t>, bytes, mk, a);
      pair_product_kernel<scalar_t, acc_t><<<plane_grid(a.P, a.C), kThreads, bytes, stream>>>(
          ws.data_ptr<acc_t>(), pr.data_ptr<int64_t>(), taps, a.P, a.K, a.C, m, R, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t bytes = layout<acc_t>(Use::kForward, a.m, a.d, a.R, 0).bytes;
    with_kernel_size(a.d, [&](auto dc) {
      constexpr int D = decltype(dc)::value;
      prepare_smem(op, pair_mask_conv_kernel<D, scalar_t, acc_t>, bytes, mk, a);
      pair_mask_conv_kernel<D, scalar_t, acc_t><<<plane_grid(a.P, a.C), kThreads, bytes, stream>>>(
          mk.data_ptr<scalar_t>(), pr.data_ptr<int64_t>(), kn.data_ptr<scalar_t>(), taps, a.P, a.K, a.C, m, d, R,
          out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pair_mask_conv_backward_cuda(const at::Tensor& grad, const at::Tensor& masks,
                                                                const at::Tensor& pairs, const at::Tensor& kernels,
                                                                const std::optional<at::Tensor>& boxes,
                                                                int64_t out_size, bool need_masks, bool need_kernels) {
  const char* op = "pair_mask_conv_backward";
  const MaskArgs a = check_mask_inputs(op, c10::DeviceType::CUDA, masks, pairs, kernels, boxes, out_size);
  check_mask_grad(op, grad, masks, a);
  c10::cuda::CUDAGuard device_guard(masks.device());

  at::Tensor d_masks = at::empty({0}, masks.options());
  at::Tensor d_kernels = at::empty({0}, masks.options());
  // Which launches are needed; the others are zeros (no pair, no channel or empty masks).
  const bool work = a.P > 0 && a.K > 0 && a.C > 0 && a.m > 0;
  bool run_masks = false, run_kernels = false;
  if (need_masks) {
    d_masks = at::empty({a.K, a.C, a.m, a.m}, masks.options());
    if (d_masks.numel() > 0) {
      run_masks = work;
      if (!work) d_masks.zero_();
    }
  }
  if (need_kernels) {
    d_kernels = a.per_pair ? at::empty({a.P, 2, a.d, a.d}, masks.options()) : at::empty({a.K, a.d, a.d}, masks.options());
    if (d_kernels.numel() > 0) {
      run_kernels = work;
      if (!work) d_kernels.zero_();
    }
  }
  if (!run_masks && !run_kernels) return {d_masks, d_kernels};
  check_sides(op, a);

  const at::Tensor g = grad.contiguous();
  const at::Tensor mk = masks.contiguous();
  const at::Tensor pr = pairs.contiguous();
  const at::Tensor kn = kernels.contiguous();
  const at::Tensor bx = boxes.has_value() ? boxes->contiguous() : at::Tensor();
  at::Tensor keys, perm;
  if (run_masks || !a.per_pair) std::tie(keys, perm) = pair_csr(pr, a.K);
  const int64_t dd = a.d * a.d;
  const int64_t groups = std::max<int64_t>(1, kThreads / dd);
  const at::ScalarType acc_type = at::toOpMathType(mk.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mk.scalar_type(), "pair_mask_conv_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor taps_ws;
    const Tap<acc_t>* taps = union_taps<acc_t>(taps_ws, bx, pr, a, stream);
    const int m = static_cast<int>(a.m), d = static_cast<int>(a.d), R = static_cast<int>(a.R);
    if (!a.per_pair) {  // per-object kernels: one conv_transpose and one kernel correlation per object plane
      const at::Tensor ws = smooth_objects<scalar_t, acc_t>(op, mk, pr, kn, a, stream);
      at::Tensor parts = run_kernels ? at::empty({a.K, a.C, a.d, a.d}, mk.options().dtype(acc_type)) : at::Tensor();
      const int64_t bytes = layout<acc_t>(Use::kBwdObject, a.m, a.d, a.R, groups).bytes;
      with_kernel_size(a.d, [&](auto dc) {
        constexpr int D = decltype(dc)::value;
        prepare_smem(op, object_backward_kernel<D, scalar_t, acc_t>, bytes, mk, a);
        object_backward_kernel<D, scalar_t, acc_t><<<plane_grid(a.K, a.C), kThreads, bytes, stream>>>(
            g.data_ptr<scalar_t>(), mk.data_ptr<scalar_t>(), pr.data_ptr<int64_t>(), kn.data_ptr<scalar_t>(),
            ws.data_ptr<acc_t>(), taps, keys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), a.P, a.K, a.C, m, d, R,
            static_cast<int>(groups), run_masks, run_kernels, run_masks ? d_masks.data_ptr<scalar_t>() : nullptr,
            run_kernels ? parts.data_ptr<acc_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      if (run_kernels) {
        kernel_grad_finish_kernel<scalar_t, acc_t><<<grid_for(a.K * dd), kThreads, 0, stream>>>(
            parts.data_ptr<acc_t>(), a.K, a.C, dd, d_kernels.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return;
    }
    with_kernel_size(a.d, [&](auto dc) {
      constexpr int D = decltype(dc)::value;
      if (run_masks) {
        const int64_t bytes = layout<acc_t>(Use::kBwdMasks, a.m, a.d, a.R, 0).bytes;
        prepare_smem(op, pair_mask_conv_backward_masks_kernel<D, scalar_t, acc_t>, bytes, mk, a);
        pair_mask_conv_backward_masks_kernel<D, scalar_t, acc_t><<<plane_grid(a.K, a.C), kThreads, bytes, stream>>>(
            g.data_ptr<scalar_t>(), mk.data_ptr<scalar_t>(), pr.data_ptr<int64_t>(), kn.data_ptr<scalar_t>(), taps,
            keys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), a.P, a.K, a.C, m, d, R,
            d_masks.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (run_kernels) {
        // The channels split over CTAs: about 2 waves of 132 SMs of (pair, role, split) blocks, from
        // the sizes alone (so the partial sums, hence the bits, do not depend on the device).
        const int64_t splits = std::min<int64_t>(a.C, std::max<int64_t>(1, (264 + 2 * a.P - 1) / (2 * a.P)));
        at::Tensor parts = at::empty({2 * a.P, splits, a.d, a.d}, mk.options().dtype(acc_type));
        const int64_t bytes = layout<acc_t>(Use::kBwdKernels, a.m, a.d, a.R, groups).bytes;
        prepare_smem(op, pair_mask_conv_backward_kernels_kernel<D, scalar_t, acc_t>, bytes, mk, a);
        const dim3 grid(blocks_for(2 * a.P), static_cast<unsigned int>(std::min<int64_t>(splits, 65535)));
        pair_mask_conv_backward_kernels_kernel<D, scalar_t, acc_t><<<grid, kThreads, bytes, stream>>>(
            g.data_ptr<scalar_t>(), mk.data_ptr<scalar_t>(), pr.data_ptr<int64_t>(), kn.data_ptr<scalar_t>(), taps,
            a.P, a.K, a.C, m, d, R, static_cast<int>(groups), static_cast<int>(splits), parts.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        kernel_grad_finish_kernel<scalar_t, acc_t><<<grid_for(2 * a.P * dd), kThreads, 0, stream>>>(
            parts.data_ptr<acc_t>(), 2 * a.P, splits, dd, d_kernels.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {d_masks, d_kernels};
}

}  // namespace

TORCH_LIBRARY_IMPL(sgg_kernels, CUDA, m) {
  m.impl("_pair_mask_conv", &pair_mask_conv_cuda);
  m.impl("_pair_mask_conv_backward", &pair_mask_conv_backward_cuda);
}

}  // namespace sgg_kernels
