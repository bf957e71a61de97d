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
// Layout of the work: every kernel works on whole m x m planes held in shared memory (accumulation
// type: float for half/bfloat16/float, double for double):
//   union taps         union_taps_kernel: each pair's 4R resampling taps, once, into a [P, 4R]
//                      workspace the plane kernels copy into shared memory (union frame only)
//   forward            one block per (pair, channel) plane (2D grid: x pairs, y channels)
//   backward, masks    one block per (object k, channel): k's pairs in both roles are found in a CSR
//                      (a stable sort of the pairs' indices, built with ATen), each pair's g for that
//                      role is recomputed and conv_transpose(K_role, g) is accumulated in a
//                      shared-memory plane owned thread by thread, written once
//   backward, kernels  one block per (pair, role), looping over the channels; per (r, c) of the
//                      kernel a fixed-order block reduction; per-object kernels [K, d, d] are then
//                      the per-(pair, role) partials summed in CSR order
// Shared memory grows with m^2 (and R^2 in the union frame); above 48 KB the kernels opt in to
// more, and a size that does not fit the device's per-block opt-in limit is a clear error (at
// float32, d = 7, own frame: m up to ~115 on an H100; union frame with R = m: m up to ~85).
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



// The [d, d] kernel of a role (0 subject, 1 object) of pair p, whose object of that role is obj:
// kernels [P, 2, d, d] (per pair and role) or [K, d, d] (per object).
template <typename scalar_t>
__device__ __forceinline__ const scalar_t* role_kernel(const scalar_t* __restrict__ kernels, bool per_pair, int64_t p,
                                                       int role, int64_t obj, int64_t dd) {
  return kernels + (per_pair ? 2 * p + role : obj) * dd;
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
// Shared-memory layouts (byte offsets, 16-byte aligned), one function per kernel, used by both the
// host (size) and the kernel (carving). R = 0 in the own frame: no union buffers, no taps.
// ---------------------------------------------------------------------------------------------
__host__ __device__ inline int64_t take(int64_t& pos, int64_t bytes) {
  const int64_t at = pos;
  pos += (bytes + 15) / 16 * 16;
  return at;
}

struct FwdLayout {
  int64_t ms, mo, ks, ko, ss, so, taps, bytes;
};

template <typename acc_t>
__host__ __device__ inline FwdLayout fwd_layout(int64_t m, int64_t d, int64_t R) {
  const int64_t a = static_cast<int64_t>(sizeof(acc_t));
  FwdLayout L;
  int64_t pos = 0;
  L.ms = take(pos, m * m * a);  // subject's mask (channel c)
  L.mo = take(pos, m * m * a);  // object's mask
  L.ks = take(pos, d * d * a);  // K_s
  L.ko = take(pos, d * d * a);  // K_o
  L.ss = take(pos, m * m * a);  // S = K_s (*) m_s
  L.so = take(pos, m * m * a);  // O = K_o (*) m_o
  L.taps = take(pos, 4 * R * static_cast<int64_t>(sizeof(Tap<acc_t>)));
  L.bytes = pos;
  return L;
}

struct BwdLayout {
  int64_t self_m, other_m, other_s, ker_self, ker_other, gu, tt, g, acc, taps, bytes;
};

// Backward layouts. masks kernel: acc = the d masks plane [m, m], self_m unused;
// kernels kernel: acc = the partial sums [groups, d, d], ker_self unused.
template <typename acc_t>
__host__ __device__ inline BwdLayout bwd_layout(bool for_kernels, int64_t m, int64_t d, int64_t R, int64_t groups) {
  const int64_t a = static_cast<int64_t>(sizeof(acc_t));
  BwdLayout L;
  int64_t pos = 0;
  L.self_m = take(pos, for_kernels ? m * m * a : 0);   // this role's mask (channel c)
  L.other_m = take(pos, m * m * a);                     // the other role's mask
  L.other_s = take(pos, m * m * a);                     // ... smoothed
  L.ker_self = take(pos, for_kernels ? 0 : d * d * a);  // this role's kernel
  L.ker_other = take(pos, d * d * a);                   // the other role's kernel
  L.gu = take(pos, R * R * a);                          // G . A_other(other)
  L.tt = take(pos, R * m * a);                          // gu wx
  L.g = take(pos, m * m * a);                           // g for this role
  L.acc = take(pos, (for_kernels ? groups * d * d : m * m) * a);
  L.taps = take(pos, 4 * R * static_cast<int64_t>(sizeof(Tap<acc_t>)));
  L.bytes = pos;
  return L;
}

// ---------------------------------------------------------------------------------------------
// Forward (Eq. 6). masks [K, C, m, m], pairs [P, 2], kernels [P, 2, d, d] or [K, d, d], all_taps
// [P, 4R] (union_taps_kernel) or null (R = 0), out [P, C, R, R] or [P, C, m, m]. One block per
// (p, c) plane.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    pair_mask_conv_kernel(const scalar_t* __restrict__ masks, const int64_t* __restrict__ pairs,
                          const scalar_t* __restrict__ kernels, bool per_pair,
                          const Tap<acc_t>* __restrict__ all_taps, int64_t P, int64_t K, int64_t C, int m, int d,
                          int R, scalar_t* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem[];
  const FwdLayout L = fwd_layout<acc_t>(m, d, R);
  acc_t* ms = reinterpret_cast<acc_t*>(smem + L.ms);
  acc_t* mo = reinterpret_cast<acc_t*>(smem + L.mo);
  acc_t* ks = reinterpret_cast<acc_t*>(smem + L.ks);
  acc_t* ko = reinterpret_cast<acc_t*>(smem + L.ko);
  acc_t* ss = reinterpret_cast<acc_t*>(smem + L.ss);
  acc_t* so = reinterpret_cast<acc_t*>(smem + L.so);
  Tap<acc_t>* taps = reinterpret_cast<Tap<acc_t>*>(smem + L.taps);
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
    load_plane(ms, masks + (s * C + c) * mm, mm);
    load_plane(mo, masks + (o * C + c) * mm, mm);
    load_plane(ks, role_kernel(kernels, per_pair, p, 0, s, dd), dd);
    load_plane(ko, role_kernel(kernels, per_pair, p, 1, o, dd), dd);
    load_taps(taps, all_taps, p, R);
    __syncthreads();
    smooth(ss, ms, ks, m, d);  // S = K_s (*) m_s
    smooth(so, mo, ko, m, d);  // O = K_o (*) m_o
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
// Backward, d masks. One block per (object k, channel c):
//   d m[k] = sum_{p: s_p = k} K_s (*)^T g_S + sum_{p: o_p = k} K_o (*)^T g_O
// keys [2P] sorted (stable): role * (K + 1) + index (K for an invalid pair), perm [2P] the source
// position role * P + p. Pairs are summed subject role first, each role in ascending p.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    pair_mask_conv_backward_masks_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ masks,
                                         const int64_t* __restrict__ pairs, const scalar_t* __restrict__ kernels,
                                         bool per_pair, const Tap<acc_t>* __restrict__ all_taps,
                                         const int64_t* __restrict__ keys, const int64_t* __restrict__ perm,
                                         int64_t P, int64_t K, int64_t C, int m, int d, int R,
                                         scalar_t* __restrict__ d_masks) {
  extern __shared__ __align__(16) unsigned char smem[];
  const BwdLayout L = bwd_layout<acc_t>(false, m, d, R, 0);
  acc_t* other_m = reinterpret_cast<acc_t*>(smem + L.other_m);
  acc_t* other_s = reinterpret_cast<acc_t*>(smem + L.other_s);
  acc_t* ker_self = reinterpret_cast<acc_t*>(smem + L.ker_self);
  acc_t* ker_other = reinterpret_cast<acc_t*>(smem + L.ker_other);
  acc_t* gu = reinterpret_cast<acc_t*>(smem + L.gu);
  acc_t* tt = reinterpret_cast<acc_t*>(smem + L.tt);
  acc_t* g = reinterpret_cast<acc_t*>(smem + L.g);
  acc_t* dm = reinterpret_cast<acc_t*>(smem + L.acc);
  Tap<acc_t>* taps = reinterpret_cast<Tap<acc_t>*>(smem + L.taps);
  const int mm = m * m;
  const int dd = d * d;
  const int64_t out_hw = R > 0 ? static_cast<int64_t>(R) * R : mm;
  const int64_t N = 2 * P;

  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {  // block-uniform (2D grid: x objects, y channels)
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    SGG_BLOCK_LOOP(q, mm) { dm[q] = static_cast<acc_t>(0); }  // thread-owned
    for (int role = 0; role < 2; ++role) {
      const int64_t key = role * (K + 1) + k;
      const int64_t begin = lower_bound(keys, 0, N, key);
      const int64_t end = lower_bound(keys, begin, N, key + 1);
      for (int64_t e = begin; e < end; ++e) {
        const int64_t p = perm[e] - role * P;
        int64_t s, o;
        if (!read_pair(pairs, p, K, s, o)) continue;  // never (invalid pairs have key K); uniform
        const int64_t other = role == 0 ? o : s;
        load_plane(other_m, masks + (other * C + c) * mm, mm);
        load_plane(ker_self, role_kernel(kernels, per_pair, p, role, k, dd), dd);
        load_plane(ker_other, role_kernel(kernels, per_pair, p, 1 - role, other, dd), dd);
        load_taps(taps, all_taps, p, R);
        __syncthreads();
        smooth(other_s, other_m, ker_other, m, d);
        __syncthreads();
        role_grad(grad + (p * C + c) * out_hw, other_s, taps, role, m, R, gu, tt, g);
        __syncthreads();
        conv_transpose_add(dm, g, ker_self, m, d);
        __syncthreads();  // shared memory is reused by the next pair
      }
    }
    scalar_t* dst = d_masks + (k * C + c) * mm;
    SGG_BLOCK_LOOP(q, mm) { dst[q] = static_cast<scalar_t>(dm[q]); }
  }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, d kernels. One block per (pair, role), ws [P, 2, d, d] (acc_t):
//   d K_role[r][c] = sum_{channel, y, x} g_role[y][x] m_role[y + r - h][x + c - h]  (0 outside)
// Work item w in [0, groups * d * d): entry e = w % (d*d), pixel group grp = w / (d*d) summing the
// pixels q = grp, grp + groups, ...; w is owned by thread w mod blockDim.x across the channels, then
// the groups are added in order (a deterministic block reduction).
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    pair_mask_conv_backward_kernels_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ masks,
                                           const int64_t* __restrict__ pairs, const scalar_t* __restrict__ kernels,
                                           bool per_pair, const Tap<acc_t>* __restrict__ all_taps, int64_t P, int64_t K,
                                           int64_t C, int m, int d, int R, int groups, acc_t* __restrict__ ws) {
  extern __shared__ __align__(16) unsigned char smem[];
  const BwdLayout L = bwd_layout<acc_t>(true, m, d, R, groups);
  acc_t* self_m = reinterpret_cast<acc_t*>(smem + L.self_m);
  acc_t* other_m = reinterpret_cast<acc_t*>(smem + L.other_m);
  acc_t* other_s = reinterpret_cast<acc_t*>(smem + L.other_s);
  acc_t* ker_other = reinterpret_cast<acc_t*>(smem + L.ker_other);
  acc_t* gu = reinterpret_cast<acc_t*>(smem + L.gu);
  acc_t* tt = reinterpret_cast<acc_t*>(smem + L.tt);
  acc_t* g = reinterpret_cast<acc_t*>(smem + L.g);
  acc_t* part = reinterpret_cast<acc_t*>(smem + L.acc);
  Tap<acc_t>* taps = reinterpret_cast<Tap<acc_t>*>(smem + L.taps);
  const int mm = m * m;
  const int dd = d * d;
  const int h = d / 2;
  const int64_t out_hw = R > 0 ? static_cast<int64_t>(R) * R : mm;

  for (int64_t item = blockIdx.x; item < 2 * P; item += gridDim.x) {  // block-uniform
    const int64_t p = item / 2;
    const int role = static_cast<int>(item % 2);
    acc_t* dst = ws + item * dd;
    int64_t s, o;
    if (!read_pair(pairs, p, K, s, o)) {  // invalid pair: no gradient (no shared memory touched)
      SGG_BLOCK_LOOP(e, dd) { dst[e] = static_cast<acc_t>(0); }
      continue;
    }
    const int64_t self = role == 0 ? s : o;
    const int64_t other = role == 0 ? o : s;
    load_plane(ker_other, role_kernel(kernels, per_pair, p, 1 - role, other, dd), dd);
    load_taps(taps, all_taps, p, R);
    SGG_BLOCK_LOOP(w, groups * dd) { part[w] = static_cast<acc_t>(0); }  // thread-owned
    for (int64_t c = 0; c < C; ++c) {
      load_plane(self_m, masks + (self * C + c) * mm, mm);
      load_plane(other_m, masks + (other * C + c) * mm, mm);
      __syncthreads();
      smooth(other_s, other_m, ker_other, m, d);
      __syncthreads();
      role_grad(grad + (p * C + c) * out_hw, other_s, taps, role, m, R, gu, tt, g);
      __syncthreads();
      // item w = grp * dd + e, e = r * d + kc: pixel group grp sums the pixels grp, grp + groups, ...
      for_each_cell(groups, dd, [&](int w, int grp, int e) {
        const int r = e / d;
        const int kc = e - r * d;
        const int gy = groups / m, gx = groups - gy * m;  // the pixel step, as (rows, columns)
        int y = grp / m, x = grp - (grp / m) * m;
        acc_t sum = static_cast<acc_t>(0);
        for (int q = grp; q < mm; q += groups) {
          const int yy = y + r - h;
          const int xx = x + kc - h;
          if (yy >= 0 && yy < m && xx >= 0 && xx < m) sum += g[q] * self_m[yy * m + xx];
          y += gy;
          x += gx;
          if (x >= m) {
            x -= m;
            ++y;
          }
        }
        part[w] += sum;
      });
      __syncthreads();  // shared memory is reused by the next channel
    }
    __syncthreads();  // part complete (also when C = 0)
    SGG_BLOCK_LOOP(e, dd) {
      acc_t total = static_cast<acc_t>(0);
      for (int grp = 0; grp < groups; ++grp) total += part[grp * dd + e];
      dst[e] = total;
    }
    __syncthreads();  // part is reset by the next item
  }
}

// Per-object kernels: d K[k] = sum_{p: s_p = k} ws[p, 0] + sum_{p: o_p = k} ws[p, 1], in CSR order
// (subject role first, ascending p). out [K, d, d]; one thread per (k, entry).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    kernel_grad_per_object_kernel(const acc_t* __restrict__ ws, const int64_t* __restrict__ keys,
                                  const int64_t* __restrict__ perm, int64_t P, int64_t K, int64_t dd,
                                  scalar_t* __restrict__ out) {
  SGG_KERNEL_LOOP(idx, K * dd) {
    const int64_t k = idx / dd;
    const int64_t e = idx % dd;
    acc_t total = static_cast<acc_t>(0);
    for (int64_t role = 0; role < 2; ++role) {
      const int64_t key = role * (K + 1) + k;
      const int64_t begin = lower_bound(keys, 0, 2 * P, key);
      const int64_t end = lower_bound(keys, begin, 2 * P, key + 1);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t p = perm[i] - role * P;
        total += ws[(2 * p + role) * dd + e];
      }
    }
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
    const int64_t bytes = fwd_layout<acc_t>(a.m, a.d, a.R).bytes;
    prepare_smem(op, pair_mask_conv_kernel<scalar_t, acc_t>, bytes, mk, a);
    at::Tensor taps_ws;
    const Tap<acc_t>* taps = union_taps<acc_t>(taps_ws, bx, pr, a, stream);
    pair_mask_conv_kernel<scalar_t, acc_t><<<plane_grid(a.P, a.C), kThreads, bytes, stream>>>(
        mk.data_ptr<scalar_t>(), pr.data_ptr<int64_t>(), kn.data_ptr<scalar_t>(), a.per_pair,
        taps, a.P, a.K, a.C, static_cast<int>(a.m), static_cast<int>(a.d),
        static_cast<int>(a.R), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pair_mask_conv_backward_cuda(const at::Tensor& grad, const at::Tensor& masks,
                                                                const at::Tensor& pairs, const at::Tensor& kernels,
                                                                const std::optional<at::Tensor>& boxes,
                                                                int64_t out_size, bool need_masks, bool need_kernels) {
  const char* op = "pair_mask_conv_backward";
  const MaskArgs a = check_mask_inputs(op, c10::DeviceType::CUDA, masks, pairs, kernels, boxes, out_size);
  const int64_t side = check_mask_grad(op, grad, masks, a);
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
  if (run_masks || (run_kernels && !a.per_pair)) std::tie(keys, perm) = pair_csr(pr, a.K);
  const int64_t dd = a.d * a.d;
  const int64_t groups = std::max<int64_t>(1, kThreads / dd);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mk.scalar_type(), "pair_mask_conv_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor taps_ws;
    const Tap<acc_t>* taps = union_taps<acc_t>(taps_ws, bx, pr, a, stream);
    const int m = static_cast<int>(a.m), d = static_cast<int>(a.d), R = static_cast<int>(a.R);
    if (run_masks) {
      const int64_t bytes = bwd_layout<acc_t>(false, a.m, a.d, a.R, 0).bytes;
      prepare_smem(op, pair_mask_conv_backward_masks_kernel<scalar_t, acc_t>, bytes, mk, a);
      pair_mask_conv_backward_masks_kernel<scalar_t, acc_t><<<plane_grid(a.K, a.C), kThreads, bytes, stream>>>(
          g.data_ptr<scalar_t>(), mk.data_ptr<scalar_t>(), pr.data_ptr<int64_t>(), kn.data_ptr<scalar_t>(),
          a.per_pair, taps, keys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), a.P, a.K, a.C, m, d, R,
          d_masks.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (run_kernels) {
      // per (pair, role) partial sums in the accumulation type
      at::Tensor ws = at::empty({a.P, 2, a.d, a.d}, mk.options().dtype(at::toOpMathType(mk.scalar_type())));
      const int64_t bytes = bwd_layout<acc_t>(true, a.m, a.d, a.R, groups).bytes;
      prepare_smem(op, pair_mask_conv_backward_kernels_kernel<scalar_t, acc_t>, bytes, mk, a);
      pair_mask_conv_backward_kernels_kernel<scalar_t, acc_t><<<blocks_for(2 * a.P), kThreads, bytes, stream>>>(
          g.data_ptr<scalar_t>(), mk.data_ptr<scalar_t>(), pr.data_ptr<int64_t>(), kn.data_ptr<scalar_t>(),
          a.per_pair, taps, a.P, a.K, a.C, m, d, R, static_cast<int>(groups), ws.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (a.per_pair) {
        d_kernels.copy_(ws);  // [P, 2, d, d], cast to the masks' dtype
      } else {
        kernel_grad_per_object_kernel<scalar_t, acc_t><<<grid_for(a.K * dd), kThreads, 0, stream>>>(
            ws.data_ptr<acc_t>(), keys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), a.P, a.K, dd,
            d_kernels.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return {d_masks, d_kernels};
}

}  // namespace

TORCH_LIBRARY_IMPL(sgg_kernels, CUDA, m) {
  m.impl("_pair_mask_conv", &pair_mask_conv_cuda);
  m.impl("_pair_mask_conv_backward", &pair_mask_conv_backward_cuda);
}

}  // namespace sgg_kernels
