// CUDA kernels of the pairs family (LinkNet, NeurIPS'18, Sec. 3.4):
//   _union_boxes             union box of each (subject, object) pair (Sec. 3.4)
//   _union_boxes_backward    each coordinate's gradient to the box attaining the min/max
//   _pair_geometry           Eq. 17: b_o|s = ((x_o-x_s)/w_s, (y_o-y_s)/h_s, log(w_o/w_s), log(h_o/h_s))
//   _pair_geometry_backward  its gradient w.r.t. the boxes
//   _roi_align               RoIAlign (torchvision's semantics), optionally over the pairs' union
//                            boxes computed on the fly
//   _roi_align_backward      its gradient w.r.t. the features
// The math (and the spec every backend matches) is sgg_kernels/reference/pairs.py.
// _pairwise_edge_fusion (Eq. 12-14) runs in Triton on CUDA (sgg_kernels/triton/pairs.py).
//
// Determinism: the forwards are deterministic. The three backwards accumulate with floating-point
// atomicAdd into a float32 (float64 for double) workspace, so they are NOT bitwise deterministic
// (the summation order varies from run to run), like torchvision's CUDA roi_align backward.
//
// Out-of-range indices (pairs outside [0, K), box_batch outside [0, B); possible only with
// set_checks(False)) are never read: that output is 0 and it contributes no gradient.
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
// out [R, D, ph, pw]. One thread per output element, pw fastest (coalesced stores; neighbouring
// threads read neighbouring pixels of one channel plane).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    roi_align_kernel(const scalar_t* __restrict__ features, const acc_t* __restrict__ boxes,
                     const int64_t* __restrict__ box_batch, const int64_t* __restrict__ pairs, int64_t N, int64_t K,
                     int64_t B, int64_t D, int64_t H, int64_t W, int64_t pooled_h, int64_t pooled_w, acc_t scale,
                     int64_t sampling_ratio, bool aligned, scalar_t* __restrict__ out) {
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

// grad [R, D, ph, pw]; ws [B, D, H, W] acc_t, zeroed (H, W > 0). One thread per grad element:
// grad f[b] = sum_{r in b} Ay[r]^T (G[r] / count) Ax[r], scattered sample by sample with
// atomicAdd (float32 / float64 atomics only: half/bf16 never use 16-bit atomics).
// NOT bitwise deterministic (float atomics), like torchvision's CUDA roi_align backward.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    roi_align_backward_kernel(const scalar_t* __restrict__ grad, const acc_t* __restrict__ boxes,
                              const int64_t* __restrict__ box_batch, const int64_t* __restrict__ pairs, int64_t N,
                              int64_t K, int64_t B, int64_t D, int64_t H, int64_t W, int64_t pooled_h,
                              int64_t pooled_w, acc_t scale, int64_t sampling_ratio, bool aligned,
                              acc_t* __restrict__ ws) {
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
    roi_align_kernel<scalar_t, acc_t><<<grid_for(N), kThreads, 0, stream>>>(
        f.data_ptr<scalar_t>(), bx.data_ptr<acc_t>(), bb.data_ptr<int64_t>(),
        pr.defined() ? pr.data_ptr<int64_t>() : nullptr, N, K, B, D, H, W, pooled_h, pooled_w,
        static_cast<acc_t>(spatial_scale), sampling_ratio, aligned, out.data_ptr<scalar_t>());
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
    roi_align_backward_kernel<scalar_t, acc_t><<<grid_for(N), kThreads, 0, stream>>>(
        g.data_ptr<scalar_t>(), bx.data_ptr<acc_t>(), bb.data_ptr<int64_t>(),
        pr.defined() ? pr.data_ptr<int64_t>() : nullptr, N, K, B, D, H, W, pooled_h, pooled_w,
        static_cast<acc_t>(spatial_scale), sampling_ratio, aligned, ws.data_ptr<acc_t>());
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
