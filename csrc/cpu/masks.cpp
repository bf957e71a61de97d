// CPU kernels of family masks (segmentation-grounded SGG, ICCV'21, Sec. 2.5, Eq. 6):
//   _pair_mask_conv           Eq. 6: out_p = A_s(K_s (*) m_s) . A_o(K_o (*) m_o) per class channel,
//                             (*) the cross-correlation of F.conv2d (zero padding d//2), A the
//                             bilinear resampling into the pair's union box (the identity in the
//                             objects' own frames)
//   _pair_mask_conv_backward  its gradients w.r.t. the masks and the kernels (boxes get none)
// Math, sampling and every backward formula: sgg_kernels/reference/masks.py (the spec, module
// docstring). The CUDA twin is csrc/cuda/masks.cu; both read each object's mask where it is: no
// per-pair gathered or smoothed [P, C, m, m] tensor exists, only thread-local m x m planes.
//
// Frames: boxes None and out_size 0: the own frames, out [P, C, m, m] = S . O. boxes [K, 4] and
// out_size R > 0: the union frame, out [P, C, R, R] = A_s(S) . A_o(O), A(x) = wy x wx^T with the
// separable bilinear weights of the reference's _union_weights (at most two taps per output row /
// column; a weight is 0 outside the object's own box).
//
// Work (union frame: each pair's 4R resampling taps are computed once, in parallel over the pairs):
//   per-object kernels [K, d, d] (the paper's text): each object's smoothing depends on it alone, also
//                      in the union frame (masks are smoothed in their own box frames, then resampled
//                      per pair), so S[k, c] = K_k (*) m[k, c] is computed once per object in a valid
//                      pair into a [K, C, m, m] acc_t workspace (smooth_objects: K C planes, not 2 P C)
//     forward          parallel over (pair, channel) planes: the product of two workspace planes
//     backward         parallel over (object, channel) planes: g[k] = the sum of k's role gradients
//                      over its pairs (CSR: subject role first, ascending p), then ONE conv_transpose
//                      (d masks) and ONE kernel-gradient correlation per plane; the (object, channel)
//                      kernel partials are summed over the channels in order
//   per-pair kernels [P, 2, d, d] (the released code: every smoothed plane distinct)
//     forward          parallel over (pair, channel) planes, both smoothings per plane
//     backward         parallel over (object, block of kChanBlock channels): channel by channel, k's
//                      pairs in both roles from the CSR; each pair's other smoothed plane and k's g are
//                      recomputed, conv_transpose(K_role, g) accumulated into k's plane (d masks) and
//                      the correlation of k's padded mask with g into the (pair, role, block) kernel
//                      partial, the blocks then summed in order (d kernels)
// Every convolution runs on zero-padded planes whose rows are padded to whole vectors (Planes), so
// the inner loops are branch-free: kVec outputs along x per vector, kRows rows of independent
// accumulators, the taps broadcast from the kernel (conv_transpose2d = the correlation of the padded
// gradient with the flipped kernel). Floor of the op (bytes, FLOPs, forward and backward): the top
// of csrc/cuda/masks.cu and sgg_kernels/bench/floors.py (pair_mask_conv_floor).
//
// Determinism: no atomics, every sum in a fixed order, results independent of the thread count.
// Numerics: half/bfloat16 accumulate in float32, float64 in float64. Union-frame sample positions
// are computed in that accumulation type from the boxes as given (float32, float64 for float64
// masks), one operation at a time, as the reference does (axis_tap; the vector loops below may use
// FMA where the instruction set has it: the same code for every thread count, so still deterministic).
// Out-of-range pairs (an index outside [0, K), possible only with set_checks(False)) are never read:
// their output is 0 and they contribute nothing to any gradient.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "cluster_common.h"
#include "isa.h"
#include "masks_common.h"

namespace sgg_kernels {
namespace masks_cpu {

using cluster_cpu::acc_type;
using cluster_cpu::grain_for;
using cluster_cpu::lane_sum;
using cluster_cpu::nan_max;
using cluster_cpu::nan_min;
using cluster_cpu::pair_at;
using masks_common::check_mask_grad;
using masks_common::check_mask_inputs;
using masks_common::MaskArgs;
using simd::simd_dispatch;

namespace {

constexpr double kBoxEps = 1e-6;  // BOX_EPS of the reference: box sizes clamped to at least this

// ---------------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------------



// ---------------------------------------------------------------------------------------------
// Union-frame resampling taps (reference: _union_weights). One Tap per output row i (axis y) or
// column j (axis x) of the R x R union grid, for one role's own box b inside the union box U:
//   pos = U.lo + ((i + 0.5) / R) * max(U.hi - U.lo, 1e-6)
//   f   = (pos - b.lo) / max(b.hi - b.lo, 1e-6) * m - 0.5, clamped to [0, m - 1]
//   lo  = floor(f), hi = min(lo + 1, m - 1), weights (1 - frac, frac), times [b.lo <= pos <= b.hi]
//   and f not NaN (a non-finite box: weights 0, index 0)
// (when lo = hi = m - 1, frac = 0: the weights add up on that one row / column, like scatter_add_).
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct Tap {
  int64_t lo, hi;
  acc_t wlo, whi;
};


template <typename acc_t>
Tap<acc_t> axis_tap(acc_t u1, acc_t u2, acc_t b1, acc_t b2, int64_t i, int64_t R, int64_t m) {
  const acc_t eps = static_cast<acc_t>(kBoxEps);
  const acc_t top = static_cast<acc_t>(m - 1);
  const acc_t step = (static_cast<acc_t>(i) + static_cast<acc_t>(0.5)) / static_cast<acc_t>(R);
  acc_t uw = u2 - u1;
  uw = uw < eps ? eps : uw;  // clamp_min: NaN stays NaN
  const acc_t pos = u1 + step * uw;
  acc_t bw = b2 - b1;
  bw = bw < eps ? eps : bw;
  acc_t f = (pos - b1) / bw * static_cast<acc_t>(m) - static_cast<acc_t>(0.5);
  // A NaN coordinate (a non-finite box) reads nothing, like a position outside the box (f == f is
  // false for NaN): weight 0 at index 0.
  const acc_t inside = (pos >= b1 && pos <= b2 && f == f) ? acc_t(1) : acc_t(0);
  f = f > acc_t(0) ? f : acc_t(0);  // torch.clamp(0, m - 1) from below; NaN -> 0 (its weights are 0 anyway)
  f = f > top ? top : f;
  acc_t lo_f = std::floor(f);
  lo_f = lo_f > top ? top : lo_f;
  const acc_t frac = f - lo_f;
  Tap<acc_t> t;
  t.lo = lo_f >= acc_t(0) ? static_cast<int64_t>(lo_f) : 0;  // (f >= 0 and not NaN: never out of bounds)
  t.lo = std::min<int64_t>(t.lo, m - 1);
  t.hi = std::min<int64_t>(t.lo + 1, m - 1);
  t.wlo = (acc_t(1) - frac) * inside;
  t.whi = frac * inside;
  return t;
}

// The 4R taps of pair (s, o): taps[(role * 2 + axis) * R + i], role 0 subject / 1 object, axis 0 y
// (rows, box coordinates 1 and 3) / 1 x (columns, coordinates 0 and 2).
template <typename acc_t>
void compute_taps(Tap<acc_t>* taps, const acc_t* boxes, int64_t s, int64_t o, int64_t m, int64_t R) {
  for (int role = 0; role < 2; ++role) {
    for (int axis = 0; axis < 2; ++axis) {
      const int c1 = axis == 0 ? 1 : 0;
      const acc_t s1 = boxes[4 * s + c1], s2 = boxes[4 * s + c1 + 2];
      const acc_t o1 = boxes[4 * o + c1], o2 = boxes[4 * o + c1 + 2];
      const acc_t u1 = nan_min(s1, o1), u2 = nan_max(s2, o2);  // the union box
      const acc_t b1 = role == 0 ? s1 : o1, b2 = role == 0 ? s2 : o2;
      Tap<acc_t>* t = taps + (2 * role + axis) * R;
      for (int64_t i = 0; i < R; ++i) {
        t[i] = axis_tap(u1, u2, b1, b2, i, R, m);
      }
    }
  }
}

// A(X)[i][j] = sum_{y, x} wy[i][y] X[y][x] wx[j][x] at one output pixel: the (at most) 2 x 2 taps.
template <typename acc_t>
inline acc_t resample_at(const Tap<acc_t>& ty, const Tap<acc_t>& tx, const acc_t* X, int64_t m) {
  const acc_t* rl = X + ty.lo * m;
  const acc_t* rh = X + ty.hi * m;
  return ty.wlo * (tx.wlo * rl[tx.lo] + tx.whi * rl[tx.hi]) + ty.whi * (tx.wlo * rh[tx.lo] + tx.whi * rh[tx.hi]);
}

// ---------------------------------------------------------------------------------------------
// Vector loops. The hot loops (the three convolutions) work on blocks of kVec consecutive outputs
// along x (one 512-bit register of acc_t) with several independent accumulators, and are compiled
// for the best instruction set this CPU has (simd_dispatch of isa.h: AVX-512, AVX2 + FMA or the baseline
// SSE2 of -march=x86-64); the extension's flags target the baseline only, and at SSE2 width the
// direct 7 x 7 convolution ran at ~0.4x the reference's oneDNN grouped conv2d. Every variant sums
// in the same order; the AVX2 / AVX-512 ones may fuse multiply-adds (one rounding fewer), so the
// last bits can differ between machines, never between runs or thread counts on one machine. The
// union-frame sample positions (pair_taps) are computed outside these regions, at the baseline.
// ---------------------------------------------------------------------------------------------
// One 64-byte vector of acc_t (GCC / Clang vector extensions: one zmm register under AVX-512, two
// ymm under AVX2, four xmm at the baseline), and its unaligned, may-alias view for loads from rows.
typedef float vec_f32 __attribute__((vector_size(64)));
typedef float vec_f32_u __attribute__((vector_size(64), aligned(4), may_alias));
typedef double vec_f64 __attribute__((vector_size(64)));
typedef double vec_f64_u __attribute__((vector_size(64), aligned(8), may_alias));
template <typename acc_t>
struct VecOf;
template <>
struct VecOf<float> {
  using type = vec_f32;
  using unaligned = vec_f32_u;
};
template <>
struct VecOf<double> {
  using type = vec_f64;
  using unaligned = vec_f64_u;
};
// The kVec values at p as a vector (a macro, not a function: a function passing 64-byte vectors
// would have a different ABI in the baseline and the AVX-512 builds).
#define SGG_VLOAD(acc_t, p) (*reinterpret_cast<const typename VecOf<acc_t>::unaligned*>(p))

template <typename acc_t>
constexpr int64_t kVec = 64 / static_cast<int64_t>(sizeof(acc_t));  // 16 floats / 8 doubles
constexpr int64_t kRows = 8;      // output rows per correlation step: independent accumulators, enough
                                  // to cover the FMA latency (4 cycles, 2 per cycle)
constexpr int64_t kTapCols = 4;   // kernel columns per kernel-gradient step (x 2 row parities)
constexpr int64_t kChanBlock = 8; // channels per backward work item with per-pair kernels (fixed: the
                                  // partial sums, hence the bits, do not depend on the thread count)

// ---------------------------------------------------------------------------------------------
// Plane geometry. A padded plane holds an m x m plane at offset (h, h), h = d // 2, zeros around
// it; its rows have stride ps = mr + dr >= m + 2h, mr = m rounded up to kVec and dr = d rounded up
// to kTapCols, so the vector loops may read whole blocks (and whole groups of kernel columns)
// past the mask's last column without leaving the plane: what they read there is zero, and the
// outputs they compute there are dropped.
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct Planes {
  int64_t m, d, h, R, mr, dr, ps, rows;
  explicit Planes(const MaskArgs& a)
      : m(a.m),
        d(a.d),
        h(a.d / 2),
        R(a.R),
        mr((a.m + kVec<acc_t> - 1) / kVec<acc_t> * kVec<acc_t>),
        dr((a.d + kTapCols - 1) / kTapCols * kTapCols),
        ps(mr + dr),
        rows(a.m + 2 * (a.d / 2)) {}
  int64_t padded() const { return rows * ps; }
  acc_t* interior(acc_t* pad) const { return pad + h * ps + h; }
};

// The interior of a padded plane from an m x m plane (in acc_t); the border must be zero and stays so.
template <typename src_t, typename acc_t>
inline void load_padded(acc_t* __restrict__ pad, const src_t* __restrict__ src, const Planes<acc_t>& g) {
  acc_t* in = g.interior(pad);
  for (int64_t y = 0; y < g.m; ++y) {
    for (int64_t x = 0; x < g.m; ++x) {
      in[y * g.ps + x] = static_cast<acc_t>(src[y * g.m + x]);
    }
  }
}

// A kernel in acc_t; flipped (K[d-1-r][d-1-c]) for the adjoint, conv_transpose2d = the correlation
// of the zero-padded gradient with the flipped kernel.
template <typename scalar_t, typename acc_t>
inline void load_kernel(acc_t* dst, const scalar_t* src, int64_t dd, bool flip) {
  for (int64_t e = 0; e < dd; ++e) {
    dst[e] = static_cast<acc_t>(src[flip ? dd - 1 - e : e]);
  }
}

// kNy output rows y0 .. y0 + kNy - 1 of the correlation of a padded plane with a d x d kernel:
//   out[y][x] (=, or += with kAdd) sum_{r, c} K[r][c] pad[y + r][x + c]
// one block of kVec columns at a time, the taps broadcast from the kernel, kNy independent
// accumulators (each input row is read by up to d of them).
template <int64_t kNy, bool kAdd, typename acc_t>
inline void correlate_rows(acc_t* __restrict__ dst, const acc_t* __restrict__ pad, const acc_t* __restrict__ ker,
                           const Planes<acc_t>& g, int64_t y0) {
  using vec = typename VecOf<acc_t>::type;
  constexpr int64_t V = kVec<acc_t>;
  const int64_t d = g.d, ps = g.ps, m = g.m;
  for (int64_t xb = 0; xb < g.mr; xb += V) {
    vec acc[kNy];
    for (int64_t j = 0; j < kNy; ++j) acc[j] = vec{};
    for (int64_t r = 0; r < d; ++r) {
      const acc_t* row = pad + (y0 + r) * ps + xb;
      for (int64_t c = 0; c < d; ++c) {
        const acc_t k = ker[r * d + c];
        for (int64_t j = 0; j < kNy; ++j) acc[j] += k * SGG_VLOAD(acc_t, row + j * ps + c);
      }
    }
    const int64_t n = std::min(V, m - xb);
    for (int64_t j = 0; j < kNy; ++j) {
      acc_t* out = dst + (y0 + j) * m + xb;
      for (int64_t i = 0; i < n; ++i) {
        if (kAdd) {
          out[i] += acc[j][i];
        } else {
          out[i] = acc[j][i];
        }
      }
    }
  }
}

// Eq. 6's smoothing, F.conv2d with zero padding h (cross-correlation), into a dense m x m plane:
//   dst[y][x] = sum_{r, c} K[r][c] pad[y + r][x + c];   with kAdd (and the flipped kernel on the
// padded gradient) the adjoint F.conv_transpose2d, accumulated.
template <bool kAdd, typename acc_t>
inline void correlate(acc_t* __restrict__ dst, const acc_t* __restrict__ pad, const acc_t* __restrict__ ker,
                      const Planes<acc_t>& g) {
  int64_t y = 0;
  for (; y + kRows <= g.m; y += kRows) correlate_rows<kRows, kAdd>(dst, pad, ker, g, y);
  for (; y + kRows / 2 <= g.m; y += kRows / 2) correlate_rows<kRows / 2, kAdd>(dst, pad, ker, g, y);
  for (; y < g.m; ++y) correlate_rows<1, kAdd>(dst, pad, ker, g, y);
}

// The kernel's gradient: dk[r][c] += sum_{y, x} gr[y][x] pad[y + r][x + c] (zero outside the mask,
// hence the padded mask), gr the interior of a padded gradient plane (zero in columns m .. mr - 1,
// so the lanes past the mask add 0 x pad: exact for finite masks). kTapCols kernel columns at a
// time, a kVec-wide accumulator per column and row parity (8 independent chains), reduced lane by
// lane in a fixed order.
template <typename acc_t>
inline void kernel_grad_add(acc_t* __restrict__ dk, const acc_t* __restrict__ pad, const acc_t* __restrict__ gr,
                            const Planes<acc_t>& g) {
  using vec = typename VecOf<acc_t>::type;
  constexpr int64_t V = kVec<acc_t>;
  const int64_t d = g.d, ps = g.ps, m = g.m;
  for (int64_t r = 0; r < d; ++r) {
    for (int64_t c0 = 0; c0 < d; c0 += kTapCols) {  // columns past d read zeros / are dropped
      vec acc[2][kTapCols];
      for (int64_t j = 0; j < kTapCols; ++j) acc[0][j] = acc[1][j] = vec{};
      int64_t y = 0;
      for (; y + 2 <= m; y += 2) {
        for (int64_t t = 0; t < 2; ++t) {
          const acc_t* grow = gr + (y + t) * ps;
          const acc_t* prow = pad + (y + t + r) * ps + c0;
          for (int64_t xb = 0; xb < g.mr; xb += V) {
            const vec gv = SGG_VLOAD(acc_t, grow + xb);
            for (int64_t j = 0; j < kTapCols; ++j) acc[t][j] += gv * SGG_VLOAD(acc_t, prow + xb + j);
          }
        }
      }
      for (; y < m; ++y) {
        const acc_t* grow = gr + y * ps;
        const acc_t* prow = pad + (y + r) * ps + c0;
        for (int64_t xb = 0; xb < g.mr; xb += V) {
          const vec gv = SGG_VLOAD(acc_t, grow + xb);
          for (int64_t j = 0; j < kTapCols; ++j) acc[0][j] += gv * SGG_VLOAD(acc_t, prow + xb + j);
        }
      }
      for (int64_t j = 0; j < kTapCols && c0 + j < d; ++j) {
        const vec both = acc[0][j] + acc[1][j];
        acc_t sum = 0;
        for (int64_t i = 0; i < V; ++i) sum += both[i];
        dk[r * d + c0 + j] += sum;
      }
    }
  }
}

// The gradient g of one role's smoothed plane (reference pair_mask_conv_backward), ADDED to gp,
// the interior of a padded plane (row stride ps):
//   own frame:   g_S = G . O                                 (g_O = G . S)
//   union frame: g_S = A_s^T(G . A_o(O)) = wy_s^T (G . A_o(O)) wx_s
// G: the grad plane (R x R or m x m), other_s: the other role's smoothed plane (dense m x m),
// taps: the pair's.
template <typename scalar_t, typename acc_t>
inline void role_grad_add(acc_t* __restrict__ gp, const scalar_t* __restrict__ G, const acc_t* __restrict__ other_s,
                          const Tap<acc_t>* taps, int role, const Planes<acc_t>& g) {
  const int64_t m = g.m, R = g.R, ps = g.ps;
  if (R == 0) {
    for (int64_t y = 0; y < m; ++y) {
      for (int64_t x = 0; x < m; ++x) {
        gp[y * ps + x] += static_cast<acc_t>(G[y * m + x]) * other_s[y * m + x];
      }
    }
    return;
  }
  const Tap<acc_t>* oy = taps + (2 * (1 - role)) * R;
  const Tap<acc_t>* ox = oy + R;
  const Tap<acc_t>* ry = taps + (2 * role) * R;
  const Tap<acc_t>* rx = ry + R;
  for (int64_t i = 0; i < R; ++i) {
    const Tap<acc_t>& ty = ry[i];
    acc_t* lo = gp + ty.lo * ps;
    acc_t* hi = gp + ty.hi * ps;
    for (int64_t j = 0; j < R; ++j) {
      const acc_t v = static_cast<acc_t>(G[i * R + j]) * resample_at(oy[i], ox[j], other_s, m);
      const Tap<acc_t>& tx = rx[j];
      lo[tx.lo] += ty.wlo * tx.wlo * v;
      lo[tx.hi] += ty.wlo * tx.whi * v;
      hi[tx.lo] += ty.whi * tx.wlo * v;
      hi[tx.hi] += ty.whi * tx.whi * v;
    }
  }
}

// Zero the interior (and the columns up to mr) of a padded plane: the border stays zero.
template <typename acc_t>
inline void clear_interior(acc_t* pad, const Planes<acc_t>& g) {
  acc_t* in = g.interior(pad);
  for (int64_t y = 0; y < g.m; ++y) std::fill(in + y * g.ps, in + y * g.ps + g.m, acc_t(0));
}

// out plane (R x R or m x m) = S . O in the own frame, A_s(S) . A_o(O) in the union frame; S, O dense.
template <typename scalar_t, typename acc_t>
inline void pair_product(scalar_t* __restrict__ dst, const acc_t* __restrict__ S, const acc_t* __restrict__ O,
                         const Tap<acc_t>* taps, const Planes<acc_t>& g) {
  const int64_t m = g.m, R = g.R;
  if (R == 0) {
    for (int64_t q = 0; q < m * m; ++q) dst[q] = static_cast<scalar_t>(S[q] * O[q]);
    return;
  }
  const Tap<acc_t>* sy = taps;
  const Tap<acc_t>* sx = sy + R;
  const Tap<acc_t>* oy = sy + 2 * R;
  const Tap<acc_t>* ox = sy + 3 * R;
  for (int64_t i = 0; i < R; ++i) {
    for (int64_t j = 0; j < R; ++j) {
      dst[i * R + j] = static_cast<scalar_t>(resample_at(sy[i], sx[j], S, m) * resample_at(oy[i], ox[j], O, m));
    }
  }
}

// CSR of the pairs by (role, object): for key = role * K + k, the pairs are
// pair_of[offset[key] .. offset[key + 1]) in ascending p. Invalid pairs are left out.
struct PairCsr {
  std::vector<int64_t> offset, pair_of;
  bool used(int64_t k, int64_t K) const {  // k is in at least one valid pair
    return offset[k + 1] > offset[k] || offset[K + k + 1] > offset[K + k];
  }
};

PairCsr pair_csr(const int64_t* pairs, int64_t P, int64_t K) {
  PairCsr csr;
  csr.offset.assign(2 * K + 1, 0);
  for (int64_t p = 0; p < P; ++p) {
    int64_t s, o;
    if (pair_at(pairs, p, K, s, o)) {
      ++csr.offset[s + 1];
      ++csr.offset[K + o + 1];
    }
  }
  for (int64_t key = 0; key < 2 * K; ++key) {
    csr.offset[key + 1] += csr.offset[key];
  }
  csr.pair_of.resize(csr.offset[2 * K]);
  std::vector<int64_t> next(csr.offset.begin(), csr.offset.end() - 1);
  for (int64_t p = 0; p < P; ++p) {
    int64_t s, o;
    if (pair_at(pairs, p, K, s, o)) {
      csr.pair_of[next[s]++] = p;
      csr.pair_of[next[K + o]++] = p;
    }
  }
  return csr;
}

// Union frame: the 4R taps of every valid pair, [P, 4R] (see compute_taps); the own frames: none.
template <typename acc_t>
std::vector<Tap<acc_t>> pair_taps(const acc_t* boxes, const int64_t* pairs, const MaskArgs& a) {
  std::vector<Tap<acc_t>> taps(a.R > 0 ? a.P * 4 * a.R : 0);
  if (a.R == 0) return taps;
  at::parallel_for(0, a.P, grain_for(16 * a.R), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      int64_t s, o;
      if (pair_at(pairs, p, a.K, s, o)) compute_taps(taps.data() + p * 4 * a.R, boxes, s, o, a.m, a.R);
    }
  });
  return taps;
}

// Per-object kernels: every used object's smoothed masks S[k, c] = K_k (*) m[k, c], once, into a dense
// [K, C, m, m] acc_t workspace (K*C planes instead of 2*P*C; unused objects' planes are not
// computed and never read). Parallel over the planes.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> smooth_objects(const scalar_t* mk, const scalar_t* kn, const PairCsr& csr, const MaskArgs& a,
                                  const Planes<acc_t>& geo) {
  const int64_t mm = a.m * a.m, dd = a.d * a.d;
  std::vector<acc_t> ws(a.K * a.C * mm);
  at::parallel_for(0, a.K * a.C, grain_for(2 * mm * dd), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> pad(geo.padded(), acc_t(0)), ker(dd);
    int64_t last_k = -1;
    simd_dispatch([&] {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t k = plane / a.C;
        if (!csr.used(k, a.K)) continue;
        if (k != last_k) {
          load_kernel(ker.data(), kn + k * dd, dd, false);
          last_k = k;
        }
        load_padded(pad.data(), mk + plane * mm, geo);
        correlate<false>(ws.data() + plane * mm, pad.data(), ker.data(), geo);
      }
    });
  });
  return ws;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Forward (Eq. 6)
// ---------------------------------------------------------------------------------------------
at::Tensor pair_mask_conv(const at::Tensor& masks_in, const at::Tensor& pairs_in, const at::Tensor& kernels_in,
                          const std::optional<at::Tensor>& boxes_in, int64_t out_size) {
  const MaskArgs a =
      check_mask_inputs("pair_mask_conv", c10::DeviceType::CPU, masks_in, pairs_in, kernels_in, boxes_in, out_size);
  const int64_t side = a.R > 0 ? a.R : a.m;
  at::Tensor out = at::empty({a.P, a.C, side, side}, masks_in.options());
  if (out.numel() == 0) {
    return out;  // P = 0, C = 0, or an empty frame
  }
  if (a.K == 0 || a.m == 0) {
    return out.zero_();  // every pair invalid / nothing to resample
  }
  const at::Tensor masks = masks_in.contiguous(), pairs = pairs_in.contiguous(), kernels = kernels_in.contiguous();
  const at::Tensor boxes = boxes_in.has_value() ? boxes_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, masks.scalar_type(), "pair_mask_conv_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const Planes<acc_t> geo(a);
    const scalar_t* mk = masks.const_data_ptr<scalar_t>();
    const scalar_t* kn = kernels.const_data_ptr<scalar_t>();
    const int64_t* pr = pairs.const_data_ptr<int64_t>();
    const std::vector<Tap<acc_t>> taps =
        pair_taps(boxes.defined() ? boxes.const_data_ptr<acc_t>() : nullptr, pr, a);
    scalar_t* dst_all = out.mutable_data_ptr<scalar_t>();
    const int64_t mm = a.m * a.m, dd = a.d * a.d, out_hw = side * side;
    // Per-object kernels: the smoothing depends on the object alone, also in the union frame (the
    // masks are smoothed in their own box frames, then resampled per pair): once per object.
    std::vector<acc_t> ws;
    if (!a.per_pair) ws = smooth_objects(mk, kn, pair_csr(pr, a.P, a.K), a, geo);
    const int64_t work = (a.per_pair ? 2 * mm * dd : 0) + 8 * out_hw;
    at::parallel_for(0, a.P * a.C, grain_for(work), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> pad_s, pad_o, sm_s, sm_o, ks, ko;
      if (a.per_pair) {
        pad_s.assign(geo.padded(), acc_t(0));
        pad_o.assign(geo.padded(), acc_t(0));
        sm_s.resize(mm);
        sm_o.resize(mm);
        ks.resize(dd);
        ko.resize(dd);
      }
      int64_t last_p = -1;
      simd_dispatch([&] {
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t p = plane / a.C, c = plane % a.C;
          scalar_t* dst = dst_all + plane * out_hw;
          int64_t s, o;
          if (!pair_at(pr, p, a.K, s, o)) {  // invalid pair: output 0
            std::fill(dst, dst + out_hw, scalar_t(0));
            continue;
          }
          const Tap<acc_t>* tp = a.R > 0 ? taps.data() + p * 4 * a.R : nullptr;
          if (!a.per_pair) {
            pair_product(dst, ws.data() + (s * a.C + c) * mm, ws.data() + (o * a.C + c) * mm, tp, geo);
            continue;
          }
          if (p != last_p) {  // the pair's kernels, once per run of its channels
            load_kernel(ks.data(), kn + (2 * p) * dd, dd, false);
            load_kernel(ko.data(), kn + (2 * p + 1) * dd, dd, false);
            last_p = p;
          }
          load_padded(pad_s.data(), mk + (s * a.C + c) * mm, geo);
          load_padded(pad_o.data(), mk + (o * a.C + c) * mm, geo);
          correlate<false>(sm_s.data(), pad_s.data(), ks.data(), geo);  // S = K_s (*) m_s
          correlate<false>(sm_o.data(), pad_o.data(), ko.data(), geo);  // O = K_o (*) m_o
          pair_product(dst, sm_s.data(), sm_o.data(), tp, geo);
        }
      });
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Backward
//   d m[k] = sum_{p: s_p = k} K_s (*)^T g_S + sum_{p: o_p = k} K_o (*)^T g_O     ((*)^T: conv_transpose2d)
//   d K_role[r][c] = sum_{channel, y, x} g_role[y][x] m_role[y + r - h][x + c - h]   (0 outside)
// Per-object kernels: K_s = K_k for every (pair, role) using k, so both sums are linear in
//   g[k] = sum_{p: s_p = k} g_S + sum_{p: o_p = k} g_O :
// d m[k] = K_k (*)^T g[k] and d K_k = corr(m[k], g[k]): one conv_transpose and one kernel-gradient
// correlation per object plane; the smoothed masks come from the workspace (smooth_objects). Parallel
// over the (object, channel) planes; g[k] sums k's (pair, role)s in CSR order (subject role first,
// ascending p); the per-plane kernel partials are summed over the channels in order.
// Per-pair kernels: every (pair, role) has its own kernel, nothing to share: parallel over (object,
// block of kChanBlock channels); k visits, channel by channel, every pair it is in (CSR), recomputes
// the other role's smoothed mask and k's g, adds conv_transpose(K_role, g) to k's mask gradient and
// the correlation to the (pair, role, channel block)'s kernel partial; the blocks' partials are then
// summed in order. A (pair, role) belongs to exactly one object, so every partial has one writer.
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> pair_mask_conv_backward(const at::Tensor& grad_in, const at::Tensor& masks_in,
                                                           const at::Tensor& pairs_in, const at::Tensor& kernels_in,
                                                           const std::optional<at::Tensor>& boxes_in,
                                                           int64_t out_size, bool need_masks, bool need_kernels) {
  const char* op = "pair_mask_conv_backward";
  const MaskArgs a = check_mask_inputs(op, c10::DeviceType::CPU, masks_in, pairs_in, kernels_in, boxes_in, out_size);
  const int64_t side = check_mask_grad(op, grad_in, masks_in, a);
  at::Tensor d_masks = at::empty({0}, masks_in.options());
  at::Tensor d_kernels = at::empty({0}, kernels_in.options());
  if (need_masks) d_masks = at::zeros(masks_in.sizes(), masks_in.options());
  if (need_kernels) d_kernels = at::zeros(kernels_in.sizes(), kernels_in.options());
  const bool work = a.P > 0 && a.K > 0 && a.C > 0 && a.m > 0;
  if (!work || !(need_masks || need_kernels)) {
    return {d_masks, d_kernels};  // zeros: no pair, no channel, or empty masks
  }
  const at::Tensor grad = grad_in.contiguous(), masks = masks_in.contiguous(), pairs = pairs_in.contiguous();
  const at::Tensor kernels = kernels_in.contiguous();
  const at::Tensor boxes = boxes_in.has_value() ? boxes_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, masks.scalar_type(), "pair_mask_conv_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const Planes<acc_t> geo(a);
    const scalar_t* gr = grad.const_data_ptr<scalar_t>();
    const scalar_t* mk = masks.const_data_ptr<scalar_t>();
    const scalar_t* kn = kernels.const_data_ptr<scalar_t>();
    const int64_t* pr = pairs.const_data_ptr<int64_t>();
    const int64_t mm = a.m * a.m, dd = a.d * a.d, out_hw = side * side;
    const std::vector<Tap<acc_t>> taps =
        pair_taps(boxes.defined() ? boxes.const_data_ptr<acc_t>() : nullptr, pr, a);
    const PairCsr csr = pair_csr(pr, a.P, a.K);
    scalar_t* dm_all = need_masks ? d_masks.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t per_object = std::max<int64_t>(1, static_cast<int64_t>(csr.pair_of.size()) / a.K);

    if (!a.per_pair) {
      const std::vector<acc_t> ws = smooth_objects(mk, kn, csr, a, geo);
      std::vector<acc_t> part(need_kernels ? a.K * a.C * dd : 0, acc_t(0));  // d K per (object, channel)
      at::parallel_for(0, a.K * a.C, grain_for(per_object * 4 * out_hw + 4 * mm * dd), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> gpad(geo.padded(), acc_t(0)), pad(geo.padded(), acc_t(0)), kf(dd), dm(mm);
        int64_t last_k = -1;
        simd_dispatch([&] {
          for (int64_t plane = begin; plane < end; ++plane) {
            const int64_t k = plane / a.C, c = plane % a.C;
            if (!csr.used(k, a.K)) continue;  // no pair: zero gradients (already)
            clear_interior(gpad.data(), geo);
            acc_t* gk = geo.interior(gpad.data());
            for (int role = 0; role < 2; ++role) {  // g[k] = sum of k's g_S and g_O, in CSR order
              const int64_t key = role * a.K + k;
              for (int64_t e = csr.offset[key]; e < csr.offset[key + 1]; ++e) {
                const int64_t p = csr.pair_of[e];
                const int64_t other = role == 0 ? pr[2 * p + 1] : pr[2 * p];
                role_grad_add(gk, gr + (p * a.C + c) * out_hw, ws.data() + (other * a.C + c) * mm,
                              a.R > 0 ? taps.data() + p * 4 * a.R : nullptr, role, geo);
              }
            }
            if (need_masks) {  // d m[k] = K_k (*)^T g[k]
              if (k != last_k) {
                load_kernel(kf.data(), kn + k * dd, dd, true);
                last_k = k;
              }
              correlate<false>(dm.data(), gpad.data(), kf.data(), geo);
              scalar_t* dst = dm_all + plane * mm;
              for (int64_t q = 0; q < mm; ++q) dst[q] = static_cast<scalar_t>(dm[q]);
            }
            if (need_kernels) {  // d K_k, this channel's share
              load_padded(pad.data(), mk + plane * mm, geo);
              kernel_grad_add(part.data() + plane * dd, pad.data(), gk, geo);
            }
          }
        });
      });
      if (need_kernels) {
        scalar_t* dk = d_kernels.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, a.K, grain_for(a.C * dd), [&](int64_t begin, int64_t end) {
          for (int64_t k = begin; k < end; ++k) {
            for (int64_t e = 0; e < dd; ++e) {
              acc_t sum = 0;
              for (int64_t c = 0; c < a.C; ++c) sum += part[(k * a.C + c) * dd + e];
              dk[k * dd + e] = static_cast<scalar_t>(sum);
            }
          }
        });
      }
      return;
    }

    // Per-pair kernels.
    const int64_t blocks = (a.C + kChanBlock - 1) / kChanBlock;
    std::vector<acc_t> part(need_kernels ? 2 * a.P * blocks * dd : 0, acc_t(0));  // d K per (pair, role, block)
    const int64_t cost = per_object * std::min(a.C, kChanBlock) * (6 * mm * dd + 4 * out_hw);
    at::parallel_for(0, a.K * blocks, grain_for(cost), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> pad_self(geo.padded(), acc_t(0)), pad_o(geo.padded(), acc_t(0));
      std::vector<acc_t> gpad(geo.padded(), acc_t(0)), sm_o(mm), kf(dd), ko(dd), dm(mm);
      simd_dispatch([&] {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t k = item / blocks, b = item % blocks;
          if (!csr.used(k, a.K)) continue;
          for (int64_t c = b * kChanBlock; c < std::min(a.C, (b + 1) * kChanBlock); ++c) {
            if (need_masks) std::fill(dm.begin(), dm.end(), acc_t(0));
            if (need_kernels) load_padded(pad_self.data(), mk + (k * a.C + c) * mm, geo);  // k's own mask
            for (int role = 0; role < 2; ++role) {
              const int64_t key = role * a.K + k;
              for (int64_t e = csr.offset[key]; e < csr.offset[key + 1]; ++e) {
                const int64_t p = csr.pair_of[e];
                const int64_t other = role == 0 ? pr[2 * p + 1] : pr[2 * p];  // valid: the CSR holds valid pairs
                load_kernel(ko.data(), kn + (2 * p + 1 - role) * dd, dd, false);
                load_padded(pad_o.data(), mk + (other * a.C + c) * mm, geo);
                correlate<false>(sm_o.data(), pad_o.data(), ko.data(), geo);  // the other role's smoothed mask
                clear_interior(gpad.data(), geo);
                acc_t* gk = geo.interior(gpad.data());
                role_grad_add(gk, gr + (p * a.C + c) * out_hw, sm_o.data(),
                              a.R > 0 ? taps.data() + p * 4 * a.R : nullptr, role, geo);  // g for k's role
                if (need_masks) {
                  load_kernel(kf.data(), kn + (2 * p + role) * dd, dd, true);
                  correlate<true>(dm.data(), gpad.data(), kf.data(), geo);
                }
                if (need_kernels) kernel_grad_add(part.data() + ((2 * p + role) * blocks + b) * dd, pad_self.data(), gk, geo);
              }
            }
            if (need_masks) {
              scalar_t* dst = dm_all + (k * a.C + c) * mm;
              for (int64_t q = 0; q < mm; ++q) dst[q] = static_cast<scalar_t>(dm[q]);
            }
          }
        }
      });
    });
    if (need_kernels) {  // invalid pairs' partials stayed 0
      scalar_t* dk = d_kernels.mutable_data_ptr<scalar_t>();
      for (int64_t pr_ = 0; pr_ < 2 * a.P; ++pr_) {
        for (int64_t e = 0; e < dd; ++e) {
          acc_t sum = 0;
          for (int64_t b = 0; b < blocks; ++b) sum += part[(pr_ * blocks + b) * dd + e];
          dk[pr_ * dd + e] = static_cast<scalar_t>(sum);
        }
      }
    }
  });
  return {d_masks, d_kernels};
}

}  // namespace masks_cpu

TORCH_LIBRARY_IMPL(sgg_kernels, CPU, m) {
  m.impl("_pair_mask_conv", &masks_cpu::pair_mask_conv);
  m.impl("_pair_mask_conv_backward", &masks_cpu::pair_mask_conv_backward);
}

}  // namespace sgg_kernels
