// CUDA kernels of the pairs family (LinkNet, NeurIPS'18, Sec. 3.4):
//   _union_boxes             union box of each (subject, object) pair (Sec. 3.4)
//   _union_boxes_backward    each coordinate's gradient to the box attaining the min/max
//   _pair_geometry           Eq. 17: b_o|s = ((x_o-x_s)/w_s, (y_o-y_s)/h_s, log(w_o/w_s), log(h_o/h_s))
//   _pair_geometry_backward  its gradient w.r.t. the boxes
//   _roi_align               RoIAlign (torchvision's semantics), optionally over the pairs' union
//                            boxes computed on the fly
//   _roi_align_backward      its gradient w.r.t. the features (both separable, below)
// The math (and the spec every backend matches) is sgg_kernels/reference/pairs.py.
// _pairwise_edge_fusion (Eq. 12-14) runs in Triton on CUDA (sgg_kernels/triton/pairs.py).
//
// Determinism: the forwards are deterministic. The three backwards accumulate with floating-point
// atomicAdd into a float32 (float64 for double) workspace, so they are NOT bitwise deterministic
// (the summation order varies from run to run), like torchvision's CUDA roi_align backward.
//
// Out-of-range indices (pairs outside [0, K), box_batch outside [0, B); possible only with
// set_checks(False)) are never read: that output is 0 and it contributes no gradient.
//
// RoIAlign is separable (the reference's (*)): per RoI out[r, c] = Ay[r] F[b, c] Ax[r]^T, and bin i
// of Ay touches only ~bin_h + 2 consecutive rows (Ax likewise). The kernels build Ay and Ax once
// per (RoI, channel block) in shared memory and contract directly over the taps (the section
// "Separable RoIAlign" below); the per-sample kernels remain as the fallback for shared-memory
// layouts above the device's limit. Floor and estimate at the benchmark sizes
// (sgg_kernels/bench/cases/pairs.py: map [4, 256, 64, 96] float32, 7 x 7, adaptive sampling, not
// aligned; floors from sgg_kernels/bench/floors.py, H100 datasheet; the counts below come from the
// cases' boxes through the reference's _roi_weights; nothing was measured on a GPU):
//   union_roi_align sgdet (P = 25,280): floor 1,234 MB and 114 GFLOP per pass (torchvision's
//     per-sample count: 55.6 M samples per channel, 4 multiply-adds each): 1.7 ms, FMA-bound.
//     Forward here: sum_r (sum_i Ly_i)(sum_j Lx_j + pw) = 73.7 M multiply-adds per channel, 18.9 G
//     in all (37.7 GFLOP, a third of the per-sample count: ~0.56 ms at 67 TFLOP/s), one load of F
//     per multiply-add (the x weights in registers; the per-sample kernel: 4 tap loads per sample,
//     57 G): ~2.5 ms if bound by L1 load issue (32 lanes / clk / SM). Each (RoI, channel) reads its
//     window: 50.1 M pixels per channel, 51 GB from L2 to the SMs if L1 keeps nothing across RoIs
//     (the map itself, 24 MB, stays L2-resident, so HBM moves ~ the floor's bytes; the output,
//     1.2 GB, is written once): ~10 ms at ~5 TB/s of L2, the likely bound. The lever left: blocks
//     over several RoIs of one image sharing a resident feature plane (the CPU kernel's chunks).
//     Backward: one atomicAdd per (RoI, channel, touched pixel), 12.8 G (the per-sample kernel: 4
//     per sample and channel, 57 G), 32 G multiply-adds; expect it bound by atomic throughput at L2.
//   union_roi_align paper (P = 2,400): floor 139 MB, 11.2 GFLOP (167 us); forward 1.85 G
//     multiply-adds, 5.0 GB of windows; backward 1.26 G atomics (per-sample: 5.6 G).
//   roi_align sgdet / paper (320 / 100 boxes): floor 39 / 29 MB, memory-bound (12 / 9 us); forward
//     93 M / 30 M multiply-adds, 184 / 61 MB of windows; backward 46 M / 15 M atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#include "cuda/common.cuh"

namespace sgg_kernels {
namespace {

// The RoI sample positions are computed with Rn<> (common.cuh): exactly the roundings of the
// reference and of torchvision's CPU kernel, one operation at a time, no FMA contraction.

// log / ceil in the accumulation type (never a silent float -> double promotion).
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
__device__ __forceinline__ float ceil_acc(float x) { return ceilf(x); }
__device__ __forceinline__ double ceil_acc(double x) { return ceil(x); }

// ---------------------------------------------------------------------------------------------
// Union boxes (Sec. 3.4): u = (min x1, min y1, max x2, max y2) of subject s and object o.
// Ties go to the subject; NaN propagates as torch.minimum/maximum do.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ T min_subject(T s, T o) {  // s on ties (s <= o), NaN if either is NaN
  return (static_cast<float>(s) <= static_cast<float>(o) || isnan(static_cast<float>(s))) ? s : o;
}
template <>
__device__ __forceinline__ double min_subject<double>(double s, double o) {
  return (s <= o || isnan(s)) ? s : o;
}
template <typename T>
__device__ __forceinline__ T max_subject(T s, T o) {  // s on ties (s >= o), NaN if either is NaN
  return (static_cast<float>(s) >= static_cast<float>(o) || isnan(static_cast<float>(s))) ? s : o;
}
template <>
__device__ __forceinline__ double max_subject<double>(double s, double o) {
  return (s >= o || isnan(s)) ? s : o;
}

// boxes [K, 4], pairs [P, 2], out [P, 4] (boxes' dtype). One thread per pair. The chosen
// coordinate is copied as is (min/max are exact, no arithmetic).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    union_boxes_kernel(const scalar_t* __restrict__ boxes, const int64_t* __restrict__ pairs, int64_t P, int64_t K,
                       scalar_t* __restrict__ out) {
  SGG_KERNEL_LOOP(p, P) {
    int64_t s, o;
    scalar_t* u = out + 4 * p;
    if (!read_pair(pairs, p, K, s, o)) {
      u[0] = u[1] = u[2] = u[3] = static_cast<scalar_t>(0);
      continue;
    }
    const scalar_t* bs = boxes + 4 * s;
    const scalar_t* bo = boxes + 4 * o;
    u[0] = min_subject(bs[0], bo[0]);
    u[1] = min_subject(bs[1], bo[1]);
    u[2] = max_subject(bs[2], bo[2]);
    u[3] = max_subject(bs[3], bo[3]);
  }
}

// grad [P, 4], ws [K, 4] (acc_t, zeroed). Coordinate c of pair p adds G[p, c] to the subject when
// it attains the min (c < 2: s <= o) / max (c >= 2: s >= o), else to the object (so a NaN
// comparison sends it to the object, as the reference's torch.where does).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    union_boxes_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ boxes,
                                const int64_t* __restrict__ pairs, int64_t P, int64_t K, acc_t* __restrict__ ws) {
  SGG_KERNEL_LOOP(p, P) {
    int64_t s, o;
    if (!read_pair(pairs, p, K, s, o)) continue;  // invalid pair: no gradient
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const acc_t vs = static_cast<acc_t>(boxes[4 * s + c]);
      const acc_t vo = static_cast<acc_t>(boxes[4 * o + c]);
      const bool to_subject = c < 2 ? (vs <= vo) : (vs >= vo);
      atomicAdd(ws + 4 * (to_subject ? s : o) + c, static_cast<acc_t>(grad[4 * p + c]));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// pair_geometry (LinkNet Eq. 17), box centres c = ((x1+x2)/2, (y1+y2)/2), sizes clamped:
//   w = max(x2 - x1, 1e-6), h = max(y2 - y1, 1e-6)
//   b_o|s = ((cx_o - cx_s) / w_s, (cy_o - cy_s) / h_s, log(w_o / w_s), log(h_o / h_s))
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct BoxGeom {
  acc_t cx, cy, w, h, w_raw, h_raw;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ BoxGeom<acc_t> box_geom(const scalar_t* __restrict__ b) {
  const acc_t eps = static_cast<acc_t>(1e-6);  // SIZE_EPS of the reference
  const acc_t x1 = static_cast<acc_t>(b[0]), y1 = static_cast<acc_t>(b[1]);
  const acc_t x2 = static_cast<acc_t>(b[2]), y2 = static_cast<acc_t>(b[3]);
  BoxGeom<acc_t> g;
  g.cx = (x1 + x2) / static_cast<acc_t>(2);
  g.cy = (y1 + y2) / static_cast<acc_t>(2);
  g.w_raw = x2 - x1;
  g.h_raw = y2 - y1;
  // clamp_min: NaN stays NaN (the comparison is false)
  g.w = g.w_raw < eps ? eps : g.w_raw;
  g.h = g.h_raw < eps ? eps : g.h_raw;
  return g;
}

// boxes [K, 4], pairs [P, 2], out [P, 4] (boxes' dtype). One thread per pair.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    pair_geometry_kernel(const scalar_t* __restrict__ boxes, const int64_t* __restrict__ pairs, int64_t P, int64_t K,
                         scalar_t* __restrict__ out) {
  SGG_KERNEL_LOOP(p, P) {
    int64_t s, o;
    scalar_t* r = out + 4 * p;
    if (!read_pair(pairs, p, K, s, o)) {
      r[0] = r[1] = r[2] = r[3] = static_cast<scalar_t>(0);
      continue;
    }
    const BoxGeom<acc_t> gs = box_geom<scalar_t, acc_t>(boxes + 4 * s);
    const BoxGeom<acc_t> go = box_geom<scalar_t, acc_t>(boxes + 4 * o);
    // Eq. 17
    r[0] = static_cast<scalar_t>((go.cx - gs.cx) / gs.w);
    r[1] = static_cast<scalar_t>((go.cy - gs.cy) / gs.h);
    r[2] = static_cast<scalar_t>(log_acc(go.w / gs.w));
    r[3] = static_cast<scalar_t>(log_acc(go.h / gs.h));
  }
}

// grad [P, 4], ws [K, 4] (acc_t, zeroed). Backward of Eq. 17 (reference docstring), G = grad[p]:
//   g_cx_o = G0/w_s, g_cx_s = -G0/w_s, g_w_s = -G0 (cx_o-cx_s)/w_s^2 - G2/w_s, g_w_o = G2/w_o
//   (y/h likewise with G1, G3); g_w = 0 where the raw size x2-x1 < 1e-6 (clamp_min's gradient
//   passes only where raw >= 1e-6); then d x1 = g_cx/2 - g_w, d x2 = g_cx/2 + g_w.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    pair_geometry_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ boxes,
                                  const int64_t* __restrict__ pairs, int64_t P, int64_t K, acc_t* __restrict__ ws) {
  SGG_KERNEL_LOOP(p, P) {
    int64_t s, o;
    if (!read_pair(pairs, p, K, s, o)) continue;  // invalid pair: no gradient
    const acc_t eps = static_cast<acc_t>(1e-6);
    const acc_t zero = static_cast<acc_t>(0);
    const acc_t two = static_cast<acc_t>(2);
    const acc_t G0 = static_cast<acc_t>(grad[4 * p]);
    const acc_t G1 = static_cast<acc_t>(grad[4 * p + 1]);
    const acc_t G2 = static_cast<acc_t>(grad[4 * p + 2]);
    const acc_t G3 = static_cast<acc_t>(grad[4 * p + 3]);
    const BoxGeom<acc_t> gs = box_geom<scalar_t, acc_t>(boxes + 4 * s);
    const BoxGeom<acc_t> go = box_geom<scalar_t, acc_t>(boxes + 4 * o);

    const acc_t g_cxo = G0 / gs.w;
    const acc_t g_cyo = G1 / gs.h;
    acc_t g_ws = -G0 * (go.cx - gs.cx) / (gs.w * gs.w) - G2 / gs.w;
    acc_t g_hs = -G1 * (go.cy - gs.cy) / (gs.h * gs.h) - G3 / gs.h;
    acc_t g_wo = G2 / go.w;
    acc_t g_ho = G3 / go.h;
    // clamp_min's gradient mask (NaN raw sizes fail the test: no gradient, as torch.where)
    if (!(gs.w_raw >= eps)) g_ws = zero;
    if (!(gs.h_raw >= eps)) g_hs = zero;
    if (!(go.w_raw >= eps)) g_wo = zero;
    if (!(go.h_raw >= eps)) g_ho = zero;

    // subject: g_cx = -g_cxo, object: g_cx = g_cxo; chain rule through c = (x1+x2)/2, w = x2-x1
    acc_t* d_s = ws + 4 * s;
    atomicAdd(d_s + 0, -g_cxo / two - g_ws);
    atomicAdd(d_s + 1, -g_cyo / two - g_hs);
    atomicAdd(d_s + 2, -g_cxo / two + g_ws);
    atomicAdd(d_s + 3, -g_cyo / two + g_hs);
    acc_t* d_o = ws + 4 * o;
    atomicAdd(d_o + 0, g_cxo / two - g_wo);
    atomicAdd(d_o + 1, g_cyo / two - g_ho);
    atomicAdd(d_o + 2, g_cxo / two + g_wo);
    atomicAdd(d_o + 3, g_cyo / two + g_ho);
  }
}

// ---------------------------------------------------------------------------------------------
// RoIAlign, torchvision's semantics. For RoI r (box (x1, y1, x2, y2), image b):
//   offset = 0.5 if aligned else 0; start = x1 * scale - offset; extent = x2 * scale - offset - start,
//   clamped to >= 1 unless aligned; bin = extent / pooled; n = sampling_ratio if > 0 else
//   ceil(extent / pooled), clamped to [0, kMaxSamplesPerBinDim] (NaN: 0); count = max(n_h n_w, 1).
//   Sample i of bin p: start + p*bin + (i+0.5)*bin/n.
//   out[r, d, ph, pw] = 1/count * sum_{iy, ix} bilinear(f[b, d], y_iy, x_ix)
// (with pairs, the RoI is the union box (Sec. 3.4) of the pair, in the subject's image).
// ---------------------------------------------------------------------------------------------

// The RoI of output row r: its box (acc_t, the boxes' dtype) and image; false when invalid.
template <typename acc_t>
__device__ __forceinline__ bool read_roi(const acc_t* __restrict__ boxes, const int64_t* __restrict__ box_batch,
                                         const int64_t* __restrict__ pairs, int64_t r, int64_t K, int64_t B,
                                         acc_t& x1, acc_t& y1, acc_t& x2, acc_t& y2, int64_t& b) {
  if (pairs != nullptr) {
    int64_t s, o;
    if (!read_pair(pairs, r, K, s, o)) return false;
    const acc_t* bs = boxes + 4 * s;
    const acc_t* bo = boxes + 4 * o;
    x1 = min_subject(bs[0], bo[0]);
    y1 = min_subject(bs[1], bo[1]);
    x2 = max_subject(bs[2], bo[2]);
    y2 = max_subject(bs[3], bo[3]);
    b = box_batch[s];  // the subject's image
  } else {
    const acc_t* box = boxes + 4 * r;
    x1 = box[0];
    y1 = box[1];
    x2 = box[2];
    y2 = box[3];
    b = box_batch[r];
  }
  return b >= 0 && b < B;
}

// The cap on the samples per bin and axis: sgg_kernels.reference.pairs.MAX_SAMPLES_PER_BIN_DIM (the
// same constant in csrc/cpu/pairs.cpp). The op layer rejects RoIs above it while value checks are
// on; here it bounds the work whatever the boxes (checks off, or a direct call of the private op).
constexpr int64_t kMaxSamplesPerBinDim = 512;

// One axis of a RoI: start, bin size and the number n of samples per bin (0: no samples).
template <typename acc_t>
struct RoiAxis {
  acc_t start, bin;
  int64_t n;
};

template <typename acc_t>
__device__ __forceinline__ RoiAxis<acc_t> roi_axis(acc_t lo, acc_t hi, acc_t scale, acc_t offset, bool aligned,
                                                   int64_t pooled, int64_t sampling_ratio) {
  using R = Rn<acc_t>;
  RoiAxis<acc_t> a;
  a.start = R::sub(R::mul(lo, scale), offset);
  const acc_t end = R::sub(R::mul(hi, scale), offset);
  acc_t extent = R::sub(end, a.start);
  if (!aligned && extent < static_cast<acc_t>(1)) extent = static_cast<acc_t>(1);  // malformed RoIs -> 1x1
  a.bin = R::div(extent, static_cast<acc_t>(pooled));
  if (sampling_ratio > 0) {
    a.n = sampling_ratio < kMaxSamplesPerBinDim ? sampling_ratio : kMaxSamplesPerBinDim;
  } else {
    // adaptive: ceil(extent / pooled), clamped to [0, kMaxSamplesPerBinDim] as the reference's
    // samples_per_bin: NaN (a non-finite box) and <= 0 (aligned, x2 < x1) give no samples, +inf the cap.
    const acc_t c = ceil_acc(a.bin);
    a.n = !(c >= static_cast<acc_t>(1)) ? 0
          : (c >= static_cast<acc_t>(kMaxSamplesPerBinDim) ? kMaxSamplesPerBinDim : static_cast<int64_t>(c));
  }
  return a;
}

// Sample i of bin p: start + p*bin + (i + 0.5)*bin/n, rounded op by op like the reference.
template <typename acc_t>
__device__ __forceinline__ acc_t sample_pos(const RoiAxis<acc_t>& a, int64_t p, int64_t i) {
  using R = Rn<acc_t>;
  const acc_t base = R::add(a.start, R::mul(static_cast<acc_t>(p), a.bin));
  const acc_t step = R::div(R::mul(static_cast<acc_t>(i) + static_cast<acc_t>(0.5), a.bin), static_cast<acc_t>(a.n));
  return R::add(base, step);
}

// Bilinear taps along one axis of length size (> 0), torchvision's bilinear_interpolate: false when
// the sample reads 0 (pos < -1 or pos > size; written negated so that NaN also reads 0, as the
// reference's (pos >= -1) & (pos <= size)). Otherwise the coordinate is clamped at 0, and at the
// last row/column both taps are size-1 with weights (1, 0).
template <typename acc_t>
__device__ __forceinline__ bool axis_taps(acc_t pos, int64_t size, int64_t& low, int64_t& high, acc_t& w_low,
                                          acc_t& w_high) {
  if (!(pos >= static_cast<acc_t>(-1) && pos <= static_cast<acc_t>(size))) return false;
  if (pos <= static_cast<acc_t>(0)) pos = static_cast<acc_t>(0);
  low = static_cast<int64_t>(pos);  // pos in [0, size]: truncation = floor
  if (low >= size - 1) {
    low = high = size - 1;
    pos = static_cast<acc_t>(low);
  } else {
    high = low + 1;
  }
  const acc_t frac = pos - static_cast<acc_t>(low);
  w_high = frac;
  w_low = static_cast<acc_t>(1) - frac;
  return true;
}

// features [B, D, H, W] (H, W > 0), boxes [K, 4] acc_t, box_batch [K], pairs [P, 2] or null;
// out [R, D, ph, pw]. The fallback forward: one thread per output element, pw fastest (coalesced
// stores; neighbouring threads read neighbouring pixels of one channel plane).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    roi_align_sample_kernel(const scalar_t* __restrict__ features, const acc_t* __restrict__ boxes,
                            const int64_t* __restrict__ box_batch, const int64_t* __restrict__ pairs, int64_t N,
                            int64_t K, int64_t B, int64_t D, int64_t H, int64_t W, int64_t pooled_h,
                            int64_t pooled_w, acc_t scale, int64_t sampling_ratio, bool aligned,
                            scalar_t* __restrict__ out) {
  SGG_KERNEL_LOOP(idx, N) {
    const int64_t pw = idx % pooled_w;
    const int64_t ph = (idx / pooled_w) % pooled_h;
    const int64_t d = (idx / (pooled_w * pooled_h)) % D;
    const int64_t r = idx / (pooled_w * pooled_h * D);

    acc_t x1, y1, x2, y2;
    int64_t b;
    if (!read_roi(boxes, box_batch, pairs, r, K, B, x1, y1, x2, y2, b)) {
      out[idx] = static_cast<scalar_t>(0);  // invalid RoI: zero output
      continue;
    }
    const acc_t offset = aligned ? static_cast<acc_t>(0.5) : static_cast<acc_t>(0);
    const RoiAxis<acc_t> ay = roi_axis(y1, y2, scale, offset, aligned, pooled_h, sampling_ratio);
    const RoiAxis<acc_t> ax = roi_axis(x1, x2, scale, offset, aligned, pooled_w, sampling_ratio);

    const scalar_t* f = features + (b * D + d) * H * W;
    acc_t sum = static_cast<acc_t>(0);
    for (int64_t iy = 0; iy < ay.n; ++iy) {
      int64_t yl, yh;
      acc_t wyl, wyh;
      if (!axis_taps(sample_pos(ay, ph, iy), H, yl, yh, wyl, wyh)) continue;  // the whole row reads 0
      const scalar_t* row_l = f + yl * W;
      const scalar_t* row_h = f + yh * W;
      for (int64_t ix = 0; ix < ax.n; ++ix) {
        int64_t xl, xh;
        acc_t wxl, wxh;
        if (!axis_taps(sample_pos(ax, pw, ix), W, xl, xh, wxl, wxh)) continue;
        sum += wyl * wxl * static_cast<acc_t>(row_l[xl]) + wyl * wxh * static_cast<acc_t>(row_l[xh]) +
               wyh * wxl * static_cast<acc_t>(row_h[xl]) + wyh * wxh * static_cast<acc_t>(row_h[xh]);
      }
    }
    // count = max(n_h n_w, 1); with no samples (n_h or n_w = 0) the sum is 0 and so is the output.
    const int64_t cnt = ay.n * ax.n;
    const acc_t count = static_cast<acc_t>(cnt > 1 ? cnt : 1);
    out[idx] = static_cast<scalar_t>(sum / count);
  }
}

// grad [R, D, ph, pw]; ws [B, D, H, W] acc_t, zeroed (H, W > 0). The fallback backward: one thread
// per grad element, grad f[b] = sum_{r in b} Ay[r]^T (G[r] / count) Ax[r], scattered sample by
// sample with atomicAdd (float32 / float64 atomics only: half/bf16 never use 16-bit atomics).
// NOT bitwise deterministic (float atomics), like torchvision's CUDA roi_align backward.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    roi_align_sample_backward_kernel(const scalar_t* __restrict__ grad, const acc_t* __restrict__ boxes,
                                     const int64_t* __restrict__ box_batch, const int64_t* __restrict__ pairs,
                                     int64_t N, int64_t K, int64_t B, int64_t D, int64_t H, int64_t W,
                                     int64_t pooled_h, int64_t pooled_w, acc_t scale, int64_t sampling_ratio,
                                     bool aligned, acc_t* __restrict__ ws) {
  SGG_KERNEL_LOOP(idx, N) {
    const int64_t pw = idx % pooled_w;
    const int64_t ph = (idx / pooled_w) % pooled_h;
    const int64_t d = (idx / (pooled_w * pooled_h)) % D;
    const int64_t r = idx / (pooled_w * pooled_h * D);

    acc_t x1, y1, x2, y2;
    int64_t b;
    if (!read_roi(boxes, box_batch, pairs, r, K, B, x1, y1, x2, y2, b)) continue;  // no gradient
    const acc_t offset = aligned ? static_cast<acc_t>(0.5) : static_cast<acc_t>(0);
    const RoiAxis<acc_t> ay = roi_axis(y1, y2, scale, offset, aligned, pooled_h, sampling_ratio);
    const RoiAxis<acc_t> ax = roi_axis(x1, x2, scale, offset, aligned, pooled_w, sampling_ratio);
    const int64_t cnt = ay.n * ax.n;
    const acc_t count = static_cast<acc_t>(cnt > 1 ? cnt : 1);
    const acc_t g = static_cast<acc_t>(grad[idx]) / count;
    if (g == static_cast<acc_t>(0)) continue;  // adds exactly nothing (the workspace starts at +0)

    acc_t* fw = ws + (b * D + d) * H * W;
    for (int64_t iy = 0; iy < ay.n; ++iy) {
      int64_t yl, yh;
      acc_t wyl, wyh;
      if (!axis_taps(sample_pos(ay, ph, iy), H, yl, yh, wyl, wyh)) continue;
      acc_t* row_l = fw + yl * W;
      acc_t* row_h = fw + yh * W;
      const acc_t gyl = g * wyl;
      const acc_t gyh = g * wyh;
      for (int64_t ix = 0; ix < ax.n; ++ix) {
        int64_t xl, xh;
        acc_t wxl, wxh;
        if (!axis_taps(sample_pos(ax, pw, ix), W, xl, xh, wxl, wxh)) continue;
        atomicAdd(row_l + xl, gyl * wxl);
        atomicAdd(row_l + xh, gyl * wxh);
        atomicAdd(row_h + xl, gyh * wxl);
        atomicAdd(row_h + xh, gyh * wxh);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Separable RoIAlign (the kernels used; the per-sample kernels above are the fallback for
// layouts that do not fit in shared memory). Per RoI the output is (*) of the reference,
//   out[r, c] = Ay[r] F[b, c] Ax[r]^T,   Ay [ph, H], Ax [pw, W]  (1/count folded into Ay),
// and bin i of Ay is nonzero only on a short contiguous range of rows [ylo[i], yhi[i]] (its n_h
// samples' two taps: about bin_h + 2 rows), likewise Ax. One block per (RoI, channel block):
//   1. the block builds Ay and Ax once in shared memory (one thread per bin, its samples in
//      order: the same positions, roundings and clamping as the per-sample kernels, and the same
//      per-pixel summation order as the CPU kernel), amortised over the block's channels;
//   2. forward: one thread per output (c, i, j), directly over the taps,
//        out = sum_{y in [ylo_i, yhi_i]} Ay[i, y] sum_{x in [xlo_j, xhi_j]} Ax[j, x] F[c, y, x]
//      (the x weights of bin j in registers when it spans <= kSepRegTaps columns);
//   3. backward: grad F[b, c, y, x] += sum_{i in I(y)} Ay[i, y] sum_{j in J(x)} G[c, i, j] Ax[j, x]
//      over the pixels (y, x) some bin touches (I(y), J(x): the bins touching row y / column x,
//      a compacted list built once per RoI), G[r, channel block] staged in shared memory: one
//      atomicAdd per (RoI, channel, touched pixel) instead of 4 per (sample, channel).
// Why direct taps and not the two GEMM-like passes T = F Ax^T, Ay T: with the adaptive
// sampling of the benchmark cases a bin spans ~bin + 2 pixels per axis, so the direct form costs
// (sum_i Ly_i)(sum_j Lx_j + pw) multiply-adds per (RoI, channel) and needs no temporary; the two
// passes cost span_y (sum_j Lx_j) + (sum_i Ly_i) pw, 14 % fewer at sgdet (63.6 M vs 73.7 M per
// channel), but hold T [span_y, pw] per channel (a 64-row union box: 448 values per channel, x 37
// channels) in shared memory and add a barrier between the passes. A dense
// tensor-core contraction of the window (~7 H' W' multiply-adds per (RoI, channel)) would be ~4x
// the direct tap count.
// Shared memory (dynamic, sized by the host from ph, pw, H, W): wy [ph*H], wx [pw*W] in acc_t
// (the dense rows of Ay / Ax, zero outside each bin's range), the ranges [2 (ph + pw)] ints; the
// backward adds G [cb * ph * pw] acc_t and the compacted rows / columns with their bin ranges
// [3 (H + W) + 2] ints. At the benchmark sizes (7 x 7, H = 64, W = 96, float32, cb = 37): 4.6 KB
// forward, 9.3 KB backward. Above the device's opt-in limit the host falls back to the per-sample kernels.
constexpr int kSepOutputs = 2048;  // outputs (c, i, j) per block: sets the channels per block cb
constexpr int kSepRegTaps = 16;    // bin widths (pixels) whose x weights stay in registers (float; 8 double)
constexpr int kSepPixelBins = 4;   // backward: bins per axis touching a pixel, weights in registers
static_assert(kThreads >= 64, "roi_align_backward_kernel compacts rows and columns with warps 0 and 1");

// Pointers into the dynamic shared memory of the separable kernels.
template <typename acc_t>
struct SepTaps {
  acc_t* wy;   // [ph * H]: wy[i * H + y] = Ay[i, y] / count, 0 outside [ylo[i], yhi[i]]
  acc_t* wx;   // [pw * W]: wx[j * W + x] = Ax[j, x]
  acc_t* g;    // [cb * ph * pw] (backward): G[r, c0 + c, i, j]
  int* ylo;    // [ph], inclusive ranges; ylo > yhi: the bin reads nothing (no valid sample)
  int* yhi;
  int* xlo;    // [pw]
  int* xhi;
  int* rows;   // [H] (backward): the rows some bin touches, ascending
  int* row_a;  // [H]: I(rows[k]) = [row_a[k], row_b[k]]
  int* row_b;
  int* cols;   // [W], col_a, col_b [W]: likewise for the columns
  int* col_a;
  int* col_b;
  int* counts;  // [2]: number of rows, columns
};

// The bytes of that layout (host and device agree on it): the acc_t arrays first (8-byte
// aligned), then the ints.
__host__ __device__ inline int64_t sep_smem_bytes(bool backward, int64_t ph, int64_t pw, int64_t H, int64_t W,
                                                  int64_t cb, int64_t acc_size) {
  const int64_t accs = ph * H + pw * W + (backward ? cb * ph * pw : 0);
  const int64_t ints = 2 * (ph + pw) + (backward ? 3 * (H + W) + 2 : 0);
  return accs * acc_size + ints * static_cast<int64_t>(sizeof(int));
}

template <typename acc_t>
__device__ __forceinline__ SepTaps<acc_t> sep_layout(unsigned char* smem, bool backward, int ph, int pw, int H,
                                                     int W, int cb) {
  SepTaps<acc_t> t;
  t.wy = reinterpret_cast<acc_t*>(smem);
  t.wx = t.wy + ph * H;
  t.g = t.wx + pw * W;
  int* q = reinterpret_cast<int*>(t.g + (backward ? cb * ph * pw : 0));
  t.ylo = q;
  t.yhi = t.ylo + ph;
  t.xlo = t.yhi + ph;
  t.xhi = t.xlo + pw;
  t.rows = t.xhi + pw;
  t.row_a = t.rows + H;
  t.row_b = t.row_a + H;
  t.cols = t.row_b + H;
  t.col_a = t.cols + W;
  t.col_b = t.col_a + W;
  t.counts = t.col_b + W;
  return t;
}

// Bin p of one axis: w (= its dense row, zeroed) += the two taps of each of its a.n samples, in
// sample order (exactly the per-sample kernels' sample_pos and axis_taps), then scaled by `scale`
// (1/count for y, 1 for x: one reciprocal per RoI, no divide per weight); [lo, hi] the pixels
// touched (lo > hi: none). Sequential over the samples: deterministic, and the per-pixel sums in
// the CPU kernel's order. (The IEEE divide inside sample_pos stays: it decides floor() and must
// round as the reference's; it runs once per sample and RoI, not per channel.) Returns (lo, hi).
template <typename acc_t>
__device__ __forceinline__ int2 build_bin_inline(const RoiAxis<acc_t>& a, int p, int size, acc_t* __restrict__ w,
                                                 acc_t scale) {
  int l = size, h = -1;
  for (int64_t i = 0; i < a.n; ++i) {
    int64_t tl, th;
    acc_t wl, wh;
    if (!axis_taps(sample_pos(a, p, i), size, tl, th, wl, wh)) continue;
    w[tl] += wl;
    w[th] += wh;
    l = min(l, static_cast<int>(tl));
    h = max(h, static_cast<int>(th));
  }
  if (scale != static_cast<acc_t>(1)) {
    for (int y = l; y <= h; ++y) w[y] *= scale;
  }
  return make_int2(l, h);
}

// build_bin for double, not inlined: inlined, the double divide's slow path made ptxas spill in the
// double forward (112 B, sm_80). Arguments and result by value: a call with reference outputs needs a
// stack frame. float stays inlined: across the call, sm_90's ABI spilled the float forward (36 B).
template <typename acc_t>
__device__ __noinline__ int2 build_bin_call(const RoiAxis<acc_t> a, int p, int size, acc_t* __restrict__ w,
                                            acc_t scale) {
  return build_bin_inline(a, p, size, w, scale);
}

template <typename acc_t>
__device__ __forceinline__ int2 build_bin(const RoiAxis<acc_t>& a, int p, int size, acc_t* __restrict__ w,
                                          acc_t scale) {
  if constexpr (sizeof(acc_t) > 4) {
    return build_bin_call(a, p, size, w, scale);
  } else {
    return build_bin_inline(a, p, size, w, scale);
  }
}

// Builds the taps of RoI r in shared memory (every thread of the block calls it; it ends with a
// barrier). Returns false (block-uniform) for an invalid RoI: nothing is built, the RoI reads 0.
template <typename acc_t>
__device__ bool build_sep_taps(const acc_t* __restrict__ boxes, const int64_t* __restrict__ box_batch,
                               const int64_t* __restrict__ pairs, int64_t r, int64_t K, int64_t B, int ph, int pw,
                               int H, int W, acc_t scale, int64_t sampling_ratio, bool aligned,
                               const SepTaps<acc_t>& t, int64_t& b) {
  acc_t x1, y1, x2, y2;
  if (!read_roi(boxes, box_batch, pairs, r, K, B, x1, y1, x2, y2, b)) return false;  // same for every thread
  const acc_t offset = aligned ? static_cast<acc_t>(0.5) : static_cast<acc_t>(0);
  const RoiAxis<acc_t> ay = roi_axis(y1, y2, scale, offset, aligned, static_cast<int64_t>(ph), sampling_ratio);
  const RoiAxis<acc_t> ax = roi_axis(x1, x2, scale, offset, aligned, static_cast<int64_t>(pw), sampling_ratio);
  const int64_t cnt = ay.n * ax.n;
  const acc_t inv_count = static_cast<acc_t>(1) / static_cast<acc_t>(cnt > 1 ? cnt : 1);
  const int dense = ph * H + pw * W;  // wy and wx are contiguous
  for (int k = threadIdx.x; k < dense; k += blockDim.x) t.wy[k] = static_cast<acc_t>(0);
  __syncthreads();
  for (int q = threadIdx.x; q < ph + pw; q += blockDim.x) {
    if (q < ph) {
      const int2 range = build_bin(ay, q, H, t.wy + q * H, inv_count);
      t.ylo[q] = range.x;
      t.yhi[q] = range.y;
    } else {
      const int2 range = build_bin(ax, q - ph, W, t.wx + (q - ph) * W, static_cast<acc_t>(1));
      t.xlo[q - ph] = range.x;
      t.xhi[q - ph] = range.y;
    }
  }
  __syncthreads();
  return true;
}

// build_sep_taps as one call (not inlined), its layout recomputed inside from the dynamic shared
// memory: the tap building holds the IEEE divides (and their slow-path calls); inlined into the
// kernels, the values live across those calls (the shared-memory pointers above all) spilled under
// the call ABI (sm_90 float forward: 36 B). Returns the RoI's image, or -1 for an invalid RoI.
template <typename acc_t>
__device__ __noinline__ int64_t build_sep_taps_call(const acc_t* __restrict__ boxes,
                                                    const int64_t* __restrict__ box_batch,
                                                    const int64_t* __restrict__ pairs, int64_t r, int64_t K,
                                                    int64_t B, int ph, int pw, int H, int W, int cb, bool backward,
                                                    acc_t scale, int64_t sampling_ratio, bool aligned) {
  extern __shared__ __align__(16) unsigned char sep_smem[];
  const SepTaps<acc_t> t = sep_layout<acc_t>(sep_smem, backward, ph, pw, H, W, cb);
  int64_t b = -1;
  return build_sep_taps(boxes, box_batch, pairs, r, K, B, ph, pw, H, W, scale, sampling_ratio, aligned, t, b) ? b
                                                                                                              : -1;
}

// The pixels of one axis that some bin touches, ascending, with the range of bins touching each
// ([a, b]: every bin touching it lies in it; bins inside that do not touch it have weight 0 there),
// compacted by one warp with ballots (deterministic). Called by all 32 lanes of one warp.
__device__ __forceinline__ void compact_axis(const int* __restrict__ lo, const int* __restrict__ hi, int pooled,
                                             int* __restrict__ list, int* __restrict__ ia, int* __restrict__ ib,
                                             int* __restrict__ count) {
  const int lane = threadIdx.x & 31;
  int span_lo = INT32_MAX, span_hi = -1;
  for (int p = 0; p < pooled; ++p) {
    if (lo[p] <= hi[p]) {
      span_lo = min(span_lo, lo[p]);
      span_hi = max(span_hi, hi[p]);
    }
  }
  int n = 0;
  for (int base = span_lo; base <= span_hi; base += 32) {  // warp-uniform trip count
    const int y = base + lane;
    int a = pooled, bb = -1;
    if (y <= span_hi) {
      for (int p = 0; p < pooled; ++p) {
        if (lo[p] <= y && y <= hi[p]) {
          a = min(a, p);
          bb = max(bb, p);
        }
      }
    }
    const bool touched = a <= bb;
    const unsigned int m = __ballot_sync(0xffffffffu, touched);
    if (touched) {
      const int pos = n + __popc(m & ((1u << lane) - 1u));
      list[pos] = y;
      ia[pos] = a;
      ib[pos] = bb;
    }
    n += __popc(m);
  }
  if (lane == 0) *count = n;
}

// features [B, D, H, W] (H, W > 0), boxes [K, 4] acc_t, box_batch [K], pairs [P, 2] or null;
// out [R, D, ph, pw]. Grid (RoIs, channel blocks of cb), both grid-strided; one thread per output
// of the block's cb x ph x pw (coalesced stores, pw fastest). Deterministic.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    roi_align_kernel(const scalar_t* __restrict__ features, const acc_t* __restrict__ boxes,
                     const int64_t* __restrict__ box_batch, const int64_t* __restrict__ pairs, int64_t R, int64_t K,
                     int64_t B, int64_t D, int H, int W, int ph, int pw, int cb, acc_t scale, int64_t sampling_ratio,
                     bool aligned, scalar_t* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char sep_smem[];
  const SepTaps<acc_t> t = sep_layout<acc_t>(sep_smem, false, ph, pw, H, W, cb);
  // 16 float / 8 double x weights in registers (the same register budget)
  constexpr int kRegTaps = sizeof(acc_t) > 4 ? kSepRegTaps / 2 : kSepRegTaps;
  const int bins = ph * pw;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const int64_t b =
        build_sep_taps_call(boxes, box_batch, pairs, r, K, B, ph, pw, H, W, cb, false, scale, sampling_ratio, aligned);
    const bool valid = b >= 0;
    for (int64_t c0 = static_cast<int64_t>(blockIdx.y) * cb; c0 < D; c0 += static_cast<int64_t>(gridDim.y) * cb) {
      const int nc = static_cast<int>(D - c0 < cb ? D - c0 : cb);
      scalar_t* o = out + (r * D + c0) * bins;
      const int items = nc * bins;
      if (!valid) {  // invalid RoI: zero output
        for (int k = threadIdx.x; k < items; k += blockDim.x) o[k] = static_cast<scalar_t>(0);
        continue;
      }
      for (int k = threadIdx.x; k < items; k += blockDim.x) {
        // int32 index math, once per output (not per tap)
        const int c = k / bins;
        const int bin = k - c * bins;
        const int i = bin / pw;
        const int j = bin - i * pw;
        const scalar_t* f = features + (b * D + c0 + c) * H * W;
        const int y0 = t.ylo[i], y1 = t.yhi[i];
        const int x0 = t.xlo[j], x1 = t.xhi[j];
        const acc_t* wyi = t.wy + i * H;
        const acc_t* wxj = t.wx + j * W + x0;
        const int nx = x1 - x0 + 1;  // <= 0: the bin reads nothing
        acc_t sum = static_cast<acc_t>(0);
        if (nx > 0 && nx <= kRegTaps) {
          acc_t wr[kRegTaps];  // the bin's x weights, in registers for all its rows
#pragma unroll
          for (int q = 0; q < kRegTaps; ++q) wr[q] = q < nx ? wxj[q] : static_cast<acc_t>(0);
          for (int y = y0; y <= y1; ++y) {
            const scalar_t* row = f + static_cast<int64_t>(y) * W + x0;
            acc_t s = static_cast<acc_t>(0);
#pragma unroll
            for (int q = 0; q < kRegTaps; ++q) {
              if (q < nx) s += wr[q] * static_cast<acc_t>(row[q]);
            }
            sum += wyi[y] * s;
          }
        } else if (nx > 0) {
          for (int y = y0; y <= y1; ++y) {
            const scalar_t* row = f + static_cast<int64_t>(y) * W + x0;
            acc_t s = static_cast<acc_t>(0);
            for (int q = 0; q < nx; ++q) s += wxj[q] * static_cast<acc_t>(row[q]);
            sum += wyi[y] * s;
          }
        }
        o[k] = static_cast<scalar_t>(sum);  // 1/count is in wy; no sample (n = 0): 0
      }
    }
    __syncthreads();  // the next RoI rebuilds the taps
  }
}

// grad [R, D, ph, pw]; ws [B, D, H, W] acc_t, zeroed (H, W > 0). Grid (RoIs, channel blocks of
// cb). Per RoI: taps, then the touched rows / columns compacted (warps 0 and 1); per channel
// block: G staged in shared memory, then one thread per (touched pixel, channel slice) adds
//   sum_{i in I(y)} Ay[i, y] sum_{j in J(x)} G[c, i, j] Ax[j, x]
// with one atomicAdd per (RoI, channel, pixel) (float32 / float64 atomics only: half/bf16 never
// use 16-bit atomics; exact zeros are skipped, they add nothing to a workspace that starts at +0).
// NOT bitwise deterministic (float atomics across RoIs), like torchvision's CUDA backward.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    roi_align_backward_kernel(const scalar_t* __restrict__ grad, const acc_t* __restrict__ boxes,
                              const int64_t* __restrict__ box_batch, const int64_t* __restrict__ pairs, int64_t R,
                              int64_t K, int64_t B, int64_t D, int H, int W, int ph, int pw, int cb, acc_t scale,
                              int64_t sampling_ratio, bool aligned, acc_t* __restrict__ ws) {
  extern __shared__ __align__(16) unsigned char sep_smem[];
  const SepTaps<acc_t> t = sep_layout<acc_t>(sep_smem, true, ph, pw, H, W, cb);
  const int bins = ph * pw;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const int64_t b =
        build_sep_taps_call(boxes, box_batch, pairs, r, K, B, ph, pw, H, W, cb, true, scale, sampling_ratio, aligned);
    if (b >= 0) {
      if (warp == 0) compact_axis(t.ylo, t.yhi, ph, t.rows, t.row_a, t.row_b, t.counts);
      if (warp == 1) compact_axis(t.xlo, t.xhi, pw, t.cols, t.col_a, t.col_b, t.counts + 1);
      __syncthreads();
      const int nrows = t.counts[0], ncols = t.counts[1];
      const int npix = nrows * ncols;  // <= H * W (< 2^31, checked by the host)
      for (int64_t c0 = static_cast<int64_t>(blockIdx.y) * cb; c0 < D && npix > 0;
           c0 += static_cast<int64_t>(gridDim.y) * cb) {
        const int nc = static_cast<int>(D - c0 < cb ? D - c0 : cb);
        const scalar_t* gr = grad + (r * D + c0) * bins;
        for (int k = threadIdx.x; k < nc * bins; k += blockDim.x) t.g[k] = static_cast<acc_t>(gr[k]);
        __syncthreads();
        // threads over (pixel, channel slice): all threads busy also for small RoIs; the pixel's
        // index math and bin ranges are computed once for its channels.
        int slices = static_cast<int>(blockDim.x) / npix;
        slices = slices < 1 ? 1 : (slices > nc ? nc : slices);
        acc_t* wsb = ws + (b * D + c0) * H * W;
        for (int k = threadIdx.x; k < npix * slices; k += blockDim.x) {
          const int slice = k / npix;
          const int pix = k - slice * npix;
          const int ry = pix / ncols;
          const int cx = pix - ry * ncols;
          const int y = t.rows[ry], x = t.cols[cx];
          const int ia = t.row_a[ry], ib = t.row_b[ry];
          const int ja = t.col_a[cx], jb = t.col_b[cx];
          const int ni = ib - ia + 1, nj = jb - ja + 1;  // >= 1 (a touched pixel)
          acc_t* dst = wsb + static_cast<int64_t>(y) * W + x;
          if (ni <= kSepPixelBins && nj <= kSepPixelBins) {
            // the pixel's Ay / Ax weights in registers for all its channels: per channel only the
            // ni x nj grad values are loaded (from shared memory)
            acc_t wyr[kSepPixelBins], wxr[kSepPixelBins];
#pragma unroll
            for (int q = 0; q < kSepPixelBins; ++q) {
              wyr[q] = q < ni ? t.wy[(ia + q) * H + y] : static_cast<acc_t>(0);
              wxr[q] = q < nj ? t.wx[(ja + q) * W + x] : static_cast<acc_t>(0);
            }
            for (int c = slice; c < nc; c += slices) {
              const acc_t* gc = t.g + c * bins + ia * pw + ja;
              acc_t v = static_cast<acc_t>(0);
#pragma unroll
              for (int qi = 0; qi < kSepPixelBins; ++qi) {
                if (qi < ni) {
                  acc_t s = static_cast<acc_t>(0);
#pragma unroll
                  for (int qj = 0; qj < kSepPixelBins; ++qj) {
                    if (qj < nj) s += gc[qi * pw + qj] * wxr[qj];
                  }
                  v += wyr[qi] * s;
                }
              }
              if (v != static_cast<acc_t>(0)) atomicAdd(dst + static_cast<int64_t>(c) * H * W, v);
            }
          } else {  // bins narrower than a pixel: many bins touch it
            for (int c = slice; c < nc; c += slices) {
              const acc_t* gc = t.g + c * bins;
              acc_t v = static_cast<acc_t>(0);
              for (int i = ia; i <= ib; ++i) {
                acc_t s = static_cast<acc_t>(0);
                for (int j = ja; j <= jb; ++j) s += gc[i * pw + j] * t.wx[j * W + x];
                v += t.wy[i * H + y] * s;
              }
              if (v != static_cast<acc_t>(0)) atomicAdd(dst + static_cast<int64_t>(c) * H * W, v);
            }
          }
        }
        __syncthreads();  // g is restaged for the next channel block
      }
    }
    __syncthreads();  // the next RoI rebuilds the taps
  }
}

// ---------------------------------------------------------------------------------------------
// Host wrappers
// ---------------------------------------------------------------------------------------------
void check_boxes_pairs(const char* op, const at::Tensor& boxes, const at::Tensor& pairs) {
  TORCH_CHECK(boxes.is_cuda(), op, ": boxes must be a CUDA tensor, got one on ", boxes.device());
  TORCH_CHECK(pairs.device() == boxes.device(), op, ": pairs is on ", pairs.device(), " but boxes is on ",
              boxes.device());
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, op, ": boxes must have shape [K, 4] (x1, y1, x2, y2), got ",
              boxes.sizes());
  TORCH_CHECK(pairs.dim() == 2 && pairs.size(1) == 2, op, ": pairs must have shape [P, 2] (subject, object), got ",
              pairs.sizes());
  TORCH_CHECK(pairs.scalar_type() == at::kLong, op, ": pairs must be int64, got ", pairs.scalar_type());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), op, ": boxes must be floating, got ", boxes.scalar_type());
}

void check_pair_grad(const char* op, const at::Tensor& grad, const at::Tensor& boxes, const at::Tensor& pairs) {
  TORCH_CHECK(grad.device() == boxes.device(), op, ": grad is on ", grad.device(), " but boxes is on ",
              boxes.device());
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == pairs.size(0) && grad.size(1) == 4, op,
              ": grad must have shape [P, 4] = [", pairs.size(0), ", 4], got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == boxes.scalar_type(), op, ": grad is ", grad.scalar_type(), " but boxes is ",
              boxes.scalar_type(), "; pass one dtype");
}

at::Tensor union_boxes_cuda(const at::Tensor& boxes, const at::Tensor& pairs) {
  check_boxes_pairs("union_boxes", boxes, pairs);
  const int64_t K = boxes.size(0);
  const int64_t P = pairs.size(0);
  c10::cuda::CUDAGuard device_guard(boxes.device());
  at::Tensor out = at::empty({P, 4}, boxes.options());
  if (P == 0) return out;
  const at::Tensor bx = boxes.contiguous();
  const at::Tensor pr = pairs.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bx.scalar_type(), "union_boxes_cuda", [&] {
    union_boxes_kernel<scalar_t><<<grid_for(P), kThreads, 0, stream>>>(
        bx.data_ptr<scalar_t>(), pr.data_ptr<int64_t>(), P, K, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// The host side of the box backwards (union_boxes, pair_geometry): one thread per pair adds its
// contributions into a [K, 4] float/double workspace with atomics (not bitwise deterministic),
// then cast to the boxes' dtype. launch(grad, boxes, pairs, P, K, ws, stream) starts the kernel.
template <typename Launch>
at::Tensor box_backward_cuda(const char* op, const at::Tensor& grad, const at::Tensor& boxes, const at::Tensor& pairs,
                             const Launch& launch) {
  check_boxes_pairs(op, boxes, pairs);
  check_pair_grad(op, grad, boxes, pairs);
  const int64_t K = boxes.size(0);
  const int64_t P = pairs.size(0);
  c10::cuda::CUDAGuard device_guard(boxes.device());
  const at::ScalarType acc_type = at::toOpMathType(boxes.scalar_type());
  at::Tensor ws = at::zeros({K, 4}, boxes.options().dtype(acc_type));
  if (P == 0 || K == 0) return ws.to(boxes.scalar_type());  // no (valid) pair: zero gradient
  const at::Tensor g = grad.contiguous();
  const at::Tensor bx = boxes.contiguous();
  const at::Tensor pr = pairs.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bx.scalar_type(), "box_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(g.data_ptr<scalar_t>(), bx.data_ptr<scalar_t>(), pr.data_ptr<int64_t>(), P, K, ws.data_ptr<acc_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return ws.to(boxes.scalar_type());
}

at::Tensor union_boxes_backward_cuda(const at::Tensor& grad, const at::Tensor& boxes, const at::Tensor& pairs) {
  return box_backward_cuda("union_boxes_backward", grad, boxes, pairs,
                           [](auto* g, auto* b, const int64_t* pr, int64_t P, int64_t K, auto* ws, cudaStream_t stream) {
                             using scalar_t = std::remove_pointer_t<decltype(g)>;
                             using acc_t = std::remove_pointer_t<decltype(ws)>;
                             union_boxes_backward_kernel<scalar_t, acc_t><<<grid_for(P), kThreads, 0, stream>>>(
                                 g, b, pr, P, K, ws);
                           });
}

at::Tensor pair_geometry_cuda(const at::Tensor& boxes, const at::Tensor& pairs) {
  check_boxes_pairs("pair_geometry", boxes, pairs);
  const int64_t K = boxes.size(0);
  const int64_t P = pairs.size(0);
  c10::cuda::CUDAGuard device_guard(boxes.device());
  at::Tensor out = at::empty({P, 4}, boxes.options());
  if (P == 0) return out;
  const at::Tensor bx = boxes.contiguous();
  const at::Tensor pr = pairs.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bx.scalar_type(), "pair_geometry_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    pair_geometry_kernel<scalar_t, acc_t><<<grid_for(P), kThreads, 0, stream>>>(
        bx.data_ptr<scalar_t>(), pr.data_ptr<int64_t>(), P, K, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor pair_geometry_backward_cuda(const at::Tensor& grad, const at::Tensor& boxes, const at::Tensor& pairs) {
  return box_backward_cuda("pair_geometry_backward", grad, boxes, pairs,
                           [](auto* g, auto* b, const int64_t* pr, int64_t P, int64_t K, auto* ws, cudaStream_t stream) {
                             using scalar_t = std::remove_pointer_t<decltype(g)>;
                             using acc_t = std::remove_pointer_t<decltype(ws)>;
                             pair_geometry_backward_kernel<scalar_t, acc_t><<<grid_for(P), kThreads, 0, stream>>>(
                                 g, b, pr, P, K, ws);
                           });
}

// Checks shared by roi_align and its backward; returns R, the number of RoIs (K, or P with pairs).
int64_t check_roi_inputs(const char* op, const at::Tensor& data, const char* data_name, const at::Tensor& boxes,
                         const at::Tensor& box_batch, const std::optional<at::Tensor>& pairs) {
  TORCH_CHECK(data.is_cuda(), op, ": ", data_name, " must be a CUDA tensor, got one on ", data.device());
  TORCH_CHECK(boxes.device() == data.device(), op, ": boxes is on ", boxes.device(), " but ", data_name, " is on ",
              data.device());
  TORCH_CHECK(box_batch.device() == data.device(), op, ": box_batch is on ", box_batch.device(), " but ", data_name,
              " is on ", data.device());
  TORCH_CHECK(data.dim() == 4, op, ": ", data_name, " must be 4-D, got ", data.sizes());
  TORCH_CHECK(at::isFloatingType(data.scalar_type()), op, ": ", data_name, " must be floating, got ",
              data.scalar_type());
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, op, ": boxes must have shape [K, 4] (x1, y1, x2, y2), got ",
              boxes.sizes());
  const at::ScalarType box_type = at::toOpMathType(data.scalar_type());
  TORCH_CHECK(boxes.scalar_type() == box_type, op, ": boxes must be ", box_type, " for ", data.scalar_type(), " ",
              data_name, " (float64 for float64, else float32), got ", boxes.scalar_type());
  TORCH_CHECK(box_batch.dim() == 1 && box_batch.size(0) == boxes.size(0), op,
              ": box_batch must have shape [K] = [", boxes.size(0), "], got ", box_batch.sizes());
  TORCH_CHECK(box_batch.scalar_type() == at::kLong, op, ": box_batch must be int64, got ", box_batch.scalar_type());
  if (!pairs.has_value()) return boxes.size(0);
  const at::Tensor& pr = *pairs;
  TORCH_CHECK(pr.device() == data.device(), op, ": pairs is on ", pr.device(), " but ", data_name, " is on ",
              data.device());
  TORCH_CHECK(pr.dim() == 2 && pr.size(1) == 2, op, ": pairs must have shape [P, 2] (subject, object), got ",
              pr.sizes());
  TORCH_CHECK(pr.scalar_type() == at::kLong, op, ": pairs must be int64, got ", pr.scalar_type());
  return pr.size(0);
}

// The launch of the separable kernels: cb channels per block (about kSepOutputs outputs, the D
// channels split evenly), grid (RoIs, channel blocks) capped at the grid limits (the kernels
// grid-stride over both), and the dynamic shared memory; usable false when the layout exceeds the
// device's opt-in shared memory or the kernels' int32 in-block indices (the per-sample fallback).
struct SepLaunch {
  bool usable = false;
  int cb = 1;
  dim3 grid;
  int64_t smem = 0;
};

SepLaunch sep_launch(bool backward, int64_t R, int64_t D, int64_t H, int64_t W, int64_t ph, int64_t pw,
                     int64_t acc_size) {
  SepLaunch l;
  const int64_t bins = ph * pw;
  int64_t cb = std::max<int64_t>(1, std::min<int64_t>(D, kSepOutputs / std::max<int64_t>(bins, 1)));
  const int64_t blocks_c = (D + cb - 1) / cb;
  cb = (D + blocks_c - 1) / blocks_c;  // balanced: the last block is not a sliver
  const int64_t kInt = std::numeric_limits<int32_t>::max();
  if (H > kInt / std::max<int64_t>(W, 1) || cb * bins > kInt || ph * H + pw * W > kInt ||
      ph + pw > kInt / 2) {
    return l;
  }
  l.smem = sep_smem_bytes(backward, ph, pw, H, W, cb, acc_size);
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (l.smem > optin) return l;
  l.usable = true;
  l.cb = static_cast<int>(cb);
  l.grid = dim3(static_cast<unsigned int>(std::min<int64_t>(R, kInt)),
                static_cast<unsigned int>(std::min<int64_t>(blocks_c, 65535)));
  return l;
}

// Opts the kernel in to more than 48 KB of dynamic shared memory when the layout needs it.
template <typename Kernel>
void allow_smem(Kernel kernel, int64_t smem) {
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
}

at::Tensor roi_align_cuda(const at::Tensor& features, const at::Tensor& boxes, const at::Tensor& box_batch,
                          const std::optional<at::Tensor>& pairs, int64_t pooled_h, int64_t pooled_w,
                          double spatial_scale, int64_t sampling_ratio, bool aligned) {
  const int64_t R = check_roi_inputs("roi_align", features, "features", boxes, box_batch, pairs);
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, "roi_align: pooled_h and pooled_w must be positive, got ", pooled_h,
              " and ", pooled_w);
  const int64_t B = features.size(0);
  const int64_t D = features.size(1);
  const int64_t H = features.size(2);
  const int64_t W = features.size(3);
  const int64_t K = boxes.size(0);

  c10::cuda::CUDAGuard device_guard(features.device());
  at::Tensor out = at::empty({R, D, pooled_h, pooled_w}, features.options());
  const int64_t N = out.numel();
  if (N == 0) return out;                           // R = 0 or D = 0
  if (B == 0 || H == 0 || W == 0) return out.zero_();  // nothing to sample (every RoI reads 0)

  const at::Tensor f = features.contiguous();
  const at::Tensor bx = boxes.contiguous();
  const at::Tensor bb = box_batch.contiguous();
  const at::Tensor pr = pairs.has_value() ? pairs->contiguous() : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "roi_align_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* prp = pr.defined() ? pr.data_ptr<int64_t>() : nullptr;
    const SepLaunch l = sep_launch(false, R, D, H, W, pooled_h, pooled_w, sizeof(acc_t));
    if (l.usable) {
      auto kernel = roi_align_kernel<scalar_t, acc_t>;
      allow_smem(kernel, l.smem);
      kernel<<<l.grid, kThreads, static_cast<size_t>(l.smem), stream>>>(
          f.data_ptr<scalar_t>(), bx.data_ptr<acc_t>(), bb.data_ptr<int64_t>(), prp, R, K, B, D,
          static_cast<int>(H), static_cast<int>(W), static_cast<int>(pooled_h), static_cast<int>(pooled_w), l.cb,
          static_cast<acc_t>(spatial_scale), sampling_ratio, aligned, out.data_ptr<scalar_t>());
    } else {  // the layout does not fit in shared memory: per-sample kernel
      roi_align_sample_kernel<scalar_t, acc_t><<<grid_for(N), kThreads, 0, stream>>>(
          f.data_ptr<scalar_t>(), bx.data_ptr<acc_t>(), bb.data_ptr<int64_t>(), prp, N, K, B, D, H, W, pooled_h,
          pooled_w, static_cast<acc_t>(spatial_scale), sampling_ratio, aligned, out.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& boxes, const at::Tensor& box_batch,
                                   const std::optional<at::Tensor>& pairs, int64_t B, int64_t H, int64_t W,
                                   double spatial_scale, int64_t sampling_ratio, bool aligned) {
  const int64_t R = check_roi_inputs("roi_align_backward", grad, "grad", boxes, box_batch, pairs);
  TORCH_CHECK(grad.size(0) == R, "roi_align_backward: grad must have shape [R, D, pooled_h, pooled_w] with R = ", R,
              pairs.has_value() ? " (P, the number of pairs)" : " (K, the number of boxes)", ", got ", grad.sizes());
  TORCH_CHECK(B >= 0 && H >= 0 && W >= 0, "roi_align_backward: B, H, W must be >= 0, got ", B, ", ", H, ", ", W);
  const int64_t D = grad.size(1);
  const int64_t pooled_h = grad.size(2);
  const int64_t pooled_w = grad.size(3);
  const int64_t K = boxes.size(0);

  c10::cuda::CUDAGuard device_guard(grad.device());
  const at::ScalarType acc_type = at::toOpMathType(grad.scalar_type());
  // float32 (float64) workspace: half/bf16 never use 16-bit atomics; cast to grad's dtype at the end.
  at::Tensor ws = at::zeros({B, D, H, W}, grad.options().dtype(acc_type));
  const int64_t N = grad.numel();
  if (ws.numel() == 0 || N == 0) return ws.to(grad.scalar_type());

  const at::Tensor g = grad.contiguous();
  const at::Tensor bx = boxes.contiguous();
  const at::Tensor bb = box_batch.contiguous();
  const at::Tensor pr = pairs.has_value() ? pairs->contiguous() : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "roi_align_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* prp = pr.defined() ? pr.data_ptr<int64_t>() : nullptr;
    const SepLaunch l = sep_launch(true, R, D, H, W, pooled_h, pooled_w, sizeof(acc_t));
    if (l.usable) {
      auto kernel = roi_align_backward_kernel<scalar_t, acc_t>;
      allow_smem(kernel, l.smem);
      kernel<<<l.grid, kThreads, static_cast<size_t>(l.smem), stream>>>(
          g.data_ptr<scalar_t>(), bx.data_ptr<acc_t>(), bb.data_ptr<int64_t>(), prp, R, K, B, D,
          static_cast<int>(H), static_cast<int>(W), static_cast<int>(pooled_h), static_cast<int>(pooled_w), l.cb,
          static_cast<acc_t>(spatial_scale), sampling_ratio, aligned, ws.data_ptr<acc_t>());
    } else {  // the layout does not fit in shared memory: per-sample kernel
      roi_align_sample_backward_kernel<scalar_t, acc_t><<<grid_for(N), kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), bx.data_ptr<acc_t>(), bb.data_ptr<int64_t>(), prp, N, K, B, D, H, W, pooled_h,
          pooled_w, static_cast<acc_t>(spatial_scale), sampling_ratio, aligned, ws.data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return ws.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(sgg_kernels, CUDA, m) {
  m.impl("_union_boxes", &union_boxes_cuda);
  m.impl("_union_boxes_backward", &union_boxes_backward_cuda);
  m.impl("_pair_geometry", &pair_geometry_cuda);
  m.impl("_pair_geometry_backward", &pair_geometry_backward_cuda);
  m.impl("_roi_align", &roi_align_cuda);
  m.impl("_roi_align_backward", &roi_align_backward_cuda);
}

}  // namespace sgg_kernels
