// CPU kernels of family pairs (LinkNet, NeurIPS'18, Sec. 3.4): union boxes, the pair geometry of
// Eq. 17, RoIAlign over boxes or over the pairs' union boxes (torchvision's semantics), and the
// pairwise edge fusion of Eq. 12-14, each with its backward; registered at the end of this file.
// Math and every backward formula: sgg_kernels/reference/pairs.py (the spec, module docstring).
//
// Every kernel: any float dtype in (accumulation in at::opmath_type: float, or double for double),
// outputs in the input dtype; at::parallel_for over independent outputs; deterministic (no atomics,
// results independent of the thread count); out-of-range indices (pairs outside [0, K), box_batch
// outside [0, B)) are never read and contribute nothing: the pair's / RoI's output row is zero and
// it adds nothing to any gradient, as the reference's _pair_rows / _split_index masking.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cluster_common.h"
#include "isa.h"

namespace sgg_kernels {
namespace pairs_cpu {

using cluster_cpu::acc_dtype;
using cluster_cpu::acc_type;
using cluster_cpu::grain_for;
using cluster_cpu::in_range;
using cluster_cpu::nan_max;
using cluster_cpu::nan_min;
using cluster_cpu::pair_at;
using simd::simd_dispatch;

namespace {

// pair_geometry: widths and heights are clamped to at least this (the reference's SIZE_EPS).
constexpr double kSizeEps = 1e-6;

void check_pairs(const char* op, const at::Tensor& pairs) {
  TORCH_CHECK(pairs.dim() == 2 && pairs.size(1) == 2 && pairs.scalar_type() == at::kLong, op,
              ": pairs must be int64 [P, 2] (subject, object), got ", pairs.scalar_type(), " ", pairs.sizes());
}

void check_boxes(const char* op, const at::Tensor& boxes) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4 && at::isFloatingType(boxes.scalar_type()), op,
              ": boxes must be a float tensor [K, 4] (x1, y1, x2, y2), got ", boxes.scalar_type(), " ",
              boxes.sizes());
}

// u = (min(x1_s, x1_o), min(y1_s, y1_o), max(x2_s, x2_o), max(y2_s, y2_o)) of boxes rows bs, bo.
template <typename T, typename B>
inline void union_box(const B* bs, const B* bo, T* u) {
  u[0] = nan_min(static_cast<T>(bs[0]), static_cast<T>(bo[0]));
  u[1] = nan_min(static_cast<T>(bs[1]), static_cast<T>(bo[1]));
  u[2] = nan_max(static_cast<T>(bs[2]), static_cast<T>(bo[2]));
  u[3] = nan_max(static_cast<T>(bs[3]), static_cast<T>(bo[3]));
}

// The scaffold of the box backwards (union_boxes, pair_geometry): d boxes [K, 4] in the boxes'
// dtype, accumulated in acc by contribution(pass, s, o, bs, bo, G, sum) for every valid pair
// (bs/bo: the boxes' rows, G: the pair's grad row in acc, sum: [K, 4] in acc). Serial (tiny work),
// in the reference's order: pass 0 (the subjects) over the pairs in order, then pass 1 (the
// objects), as its two index_adds.
template <typename Contribution>
at::Tensor box_backward(const char* op, const at::Tensor& grad_in, const at::Tensor& boxes_in,
                        const at::Tensor& pairs_in, const Contribution& contribution) {
  check_boxes(op, boxes_in);
  check_pairs(op, pairs_in);
  const int64_t K = boxes_in.size(0), P = pairs_in.size(0);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == P && grad_in.size(1) == 4, op, ": grad must be [P, 4] = [", P,
              ", 4], got ", grad_in.sizes());
  at::Tensor out = at::empty({K, 4}, boxes_in.options());
  if (K == 0) {
    return out;
  }
  const at::Tensor boxes = boxes_in.contiguous(), pairs = pairs_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "box_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor grad = grad_in.to(acc_dtype<scalar_t>()).contiguous();
    const acc_t* g = grad.const_data_ptr<acc_t>();
    const scalar_t* b = boxes.const_data_ptr<scalar_t>();
    const int64_t* pr = pairs.const_data_ptr<int64_t>();
    std::vector<acc_t> sum(4 * K, acc_t(0));
    for (int pass = 0; pass < 2; ++pass) {  // 0: to the subjects, 1: to the objects
      for (int64_t p = 0; p < P; ++p) {
        int64_t s, o;
        if (pair_at(pr, p, K, s, o)) {
          contribution(pass, s, o, b + 4 * s, b + 4 * o, g + 4 * p, sum.data());
        }
      }
    }
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < 4 * K; ++i) {
      dst[i] = static_cast<scalar_t>(sum[i]);
    }
  });
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// union_boxes
// ---------------------------------------------------------------------------------------------

// The smallest box holding both boxes of each pair, [P, 4] in the boxes' dtype (min/max are exact).
at::Tensor union_boxes(const at::Tensor& boxes_in, const at::Tensor& pairs_in) {
  check_boxes("union_boxes", boxes_in);
  check_pairs("union_boxes", pairs_in);
  const int64_t K = boxes_in.size(0), P = pairs_in.size(0);
  at::Tensor out = at::empty({P, 4}, boxes_in.options());
  if (P == 0) {
    return out;
  }
  const at::Tensor boxes = boxes_in.contiguous(), pairs = pairs_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "union_boxes", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* b = boxes.const_data_ptr<scalar_t>();
    const int64_t* pr = pairs.const_data_ptr<int64_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, P, grain_for(8), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        int64_t s, ob;
        acc_t u[4] = {0, 0, 0, 0};
        if (pair_at(pr, p, K, s, ob)) {
          union_box(b + 4 * s, b + 4 * ob, u);
        }
        for (int c = 0; c < 4; ++c) {
          o[4 * p + c] = static_cast<scalar_t>(u[c]);
        }
      }
    });
  });
  return out;
}

// d boxes of union_boxes: each coordinate's gradient goes to the box attaining the min/max (the
// subject on ties), summed over pairs (box_backward's order).
at::Tensor union_boxes_backward(const at::Tensor& grad_in, const at::Tensor& boxes_in, const at::Tensor& pairs_in) {
  return box_backward("union_boxes_backward", grad_in, boxes_in, pairs_in,
                      [](int pass, int64_t s, int64_t o, const auto* bs, const auto* bo, const auto* G, auto* sum) {
                        using acc_t = std::remove_const_t<std::remove_pointer_t<decltype(G)>>;
                        for (int c = 0; c < 4; ++c) {
                          const acc_t vs = static_cast<acc_t>(bs[c]), vo = static_cast<acc_t>(bo[c]);
                          const bool to_subject = c < 2 ? vs <= vo : vs >= vo;
                          if (to_subject == (pass == 0)) {
                            sum[4 * (pass == 0 ? s : o) + c] += G[c];
                          }
                        }
                      });
}

// ---------------------------------------------------------------------------------------------
// pair_geometry (Eq. 17)
// ---------------------------------------------------------------------------------------------
namespace {

// Centre, clamped size and raw size of a box along one axis (x: lo=x1, hi=x2).
template <typename T>
struct AxisGeom {
  T c, w, w_raw;
};

template <typename T, typename B>
inline AxisGeom<T> axis_geom(B lo_in, B hi_in) {
  const T lo = static_cast<T>(lo_in), hi = static_cast<T>(hi_in);
  const T w_raw = hi - lo;
  return {(lo + hi) / T(2), std::max(w_raw, static_cast<T>(kSizeEps)), w_raw};  // NaN w_raw stays NaN
}

}  // namespace

// Eq. 17: b_o|s = ((cx_o - cx_s) / w_s, (cy_o - cy_s) / h_s, log(w_o / w_s), log(h_o / h_s)),
// with box centres and sizes clamped to >= 1e-6; computed in acc, [P, 4] in the boxes' dtype.
at::Tensor pair_geometry(const at::Tensor& boxes_in, const at::Tensor& pairs_in) {
  check_boxes("pair_geometry", boxes_in);
  check_pairs("pair_geometry", pairs_in);
  const int64_t K = boxes_in.size(0), P = pairs_in.size(0);
  at::Tensor out = at::empty({P, 4}, boxes_in.options());
  if (P == 0) {
    return out;
  }
  const at::Tensor boxes = boxes_in.contiguous(), pairs = pairs_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "pair_geometry", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* b = boxes.const_data_ptr<scalar_t>();
    const int64_t* pr = pairs.const_data_ptr<int64_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, P, grain_for(32), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        int64_t s, o;
        acc_t v[4] = {0, 0, 0, 0};
        if (pair_at(pr, p, K, s, o)) {
          const scalar_t* bs = b + 4 * s;
          const scalar_t* bo = b + 4 * o;
          const AxisGeom<acc_t> xs = axis_geom<acc_t>(bs[0], bs[2]), ys = axis_geom<acc_t>(bs[1], bs[3]);
          const AxisGeom<acc_t> xo = axis_geom<acc_t>(bo[0], bo[2]), yo = axis_geom<acc_t>(bo[1], bo[3]);
          v[0] = (xo.c - xs.c) / xs.w;
          v[1] = (yo.c - ys.c) / ys.w;
          v[2] = std::log(xo.w / xs.w);
          v[3] = std::log(yo.w / ys.w);
        }
        for (int c = 0; c < 4; ++c) {
          dst[4 * p + c] = static_cast<scalar_t>(v[c]);
        }
      }
    });
  });
  return out;
}

// d boxes of Eq. 17 (formulas in the reference's module docstring), G = grad [P, 4]:
//   g_cx_o = G0/w_s, g_cx_s = -G0/w_s, g_w_s = -G0 (cx_o-cx_s)/w_s^2 - G2/w_s, g_w_o = G2/w_o (y/h
//   likewise), g_w = 0 where the raw size < 1e-6 (the clamp); d x1 = g_cx/2 - g_w, d x2 = g_cx/2 + g_w.
at::Tensor pair_geometry_backward(const at::Tensor& grad_in, const at::Tensor& boxes_in, const at::Tensor& pairs_in) {
  return box_backward(
      "pair_geometry_backward", grad_in, boxes_in, pairs_in,
      [](int pass, int64_t s, int64_t o, const auto* bs, const auto* bo, const auto* G, auto* sum) {
        using acc_t = std::remove_const_t<std::remove_pointer_t<decltype(G)>>;
        const acc_t eps = static_cast<acc_t>(kSizeEps);
        // box_grad of the reference: chain rule through c = (x1 + x2) / 2, w = x2 - x1.
        auto add = [&](int64_t k, acc_t g_cx, acc_t g_cy, acc_t g_w, acc_t g_h) {
          acc_t* d = sum + 4 * k;
          d[0] += g_cx / 2 - g_w;
          d[1] += g_cy / 2 - g_h;
          d[2] += g_cx / 2 + g_w;
          d[3] += g_cy / 2 + g_h;
        };
        const AxisGeom<acc_t> xs = axis_geom<acc_t>(bs[0], bs[2]), ys = axis_geom<acc_t>(bs[1], bs[3]);
        const AxisGeom<acc_t> xo = axis_geom<acc_t>(bo[0], bo[2]), yo = axis_geom<acc_t>(bo[1], bo[3]);
        const acc_t g_cxo = G[0] / xs.w, g_cyo = G[1] / ys.w;
        if (pass == 0) {
          acc_t g_ws = -G[0] * (xo.c - xs.c) / (xs.w * xs.w) - G[2] / xs.w;
          acc_t g_hs = -G[1] * (yo.c - ys.c) / (ys.w * ys.w) - G[3] / ys.w;
          g_ws = xs.w_raw >= eps ? g_ws : acc_t(0);  // clamp_min's gradient
          g_hs = ys.w_raw >= eps ? g_hs : acc_t(0);
          add(s, -g_cxo, -g_cyo, g_ws, g_hs);
        } else {
          const acc_t g_wo = xo.w_raw >= eps ? G[2] / xo.w : acc_t(0);
          const acc_t g_ho = yo.w_raw >= eps ? G[3] / yo.w : acc_t(0);
          add(o, g_cxo, g_cyo, g_wo, g_ho);
        }
      });
}

// ---------------------------------------------------------------------------------------------
// roi_align / union_roi_align (torchvision's semantics)
// ---------------------------------------------------------------------------------------------
namespace {

// The samples of one RoI along one axis, summed per bin: bin p touches pixels
// [lo[p], lo[p] + len[p]) with weights w[off[p] + j] (the reference's A[r, p, :] restricted to the
// pixels it touches). span: [span_lo, span_hi), the pixels any bin touches (empty: equal).
template <typename T>
struct AxisBins {
  std::vector<int64_t> lo, len, off;
  std::vector<T> w;
  int64_t n = 0;  // samples per bin (sampling_ratio, or ceil(extent / pooled))
  int64_t span_lo = 0, span_hi = 0;
};

// The weights of one RoI: image `batch` (-1: an invalid RoI, which contributes nothing); the y
// weights already divided by count = max(n_h n_w, 1), as the reference folds 1/count into Ay.
template <typename T>
struct RoiWeights {
  int64_t batch = -1;
  AxisBins<T> y, x;
  bool empty() const {
    return batch < 0 || y.span_lo == y.span_hi || x.span_lo == x.span_hi;
  }
};

// Sample i of bin p (torchvision's bilinear_interpolate along one axis): false when it reads 0
// (pos < -1, pos > size, NaN); else the two pixels and the weight `frac` of the high one.
template <typename T>
inline bool axis_sample(T start, T bin, T nn, int64_t p, int64_t i, int64_t size, int64_t& low, int64_t& high,
                        T& frac) {
  T pos = start + static_cast<T>(p) * bin + (static_cast<T>(i) + T(0.5)) * bin / nn;
  if (!(pos >= T(-1) && pos <= static_cast<T>(size))) {
    return false;
  }
  if (pos < T(0)) {
    pos = T(0);
  }
  low = static_cast<int64_t>(std::floor(pos));
  if (low >= size - 1) {
    low = high = size - 1;
    pos = static_cast<T>(low);
  } else {
    high = low + 1;
  }
  frac = pos - static_cast<T>(low);
  return true;
}

// The cap on the samples per bin and axis: sgg_kernels.reference.pairs.MAX_SAMPLES_PER_BIN_DIM (the
// same constant in csrc/cuda/pairs.cu). The op layer rejects RoIs above it while value checks are
// on; here it bounds the work whatever the boxes (checks off, or a direct call of the private op).
constexpr int64_t kMaxSamplesPerBinDim = 512;

// The reference's samples_per_bin: sampling_ratio if > 0, else ceil(extent / pooled); clamped to
// [0, kMaxSamplesPerBinDim], NaN (a non-finite box) -> 0, no sample.
template <typename T>
inline int64_t samples_per_bin(T extent, int64_t pooled, int64_t sampling_ratio) {
  if (sampling_ratio > 0) {
    return std::min(sampling_ratio, kMaxSamplesPerBinDim);
  }
  const T q = std::ceil(extent / static_cast<T>(pooled));
  if (!(q >= T(1))) {  // <= 0 (aligned, x2 < x1) or NaN
    return 0;
  }
  return q >= static_cast<T>(kMaxSamplesPerBinDim) ? kMaxSamplesPerBinDim : static_cast<int64_t>(q);
}

// The reference's _axis_weights for one RoI: bin = extent / pooled, n samples per bin at
// start + p bin + (i + 0.5) bin / n.
template <typename T>
void axis_bins(T start, T extent, int64_t pooled, int64_t size, int64_t sampling_ratio, AxisBins<T>& a) {
  a.lo.assign(pooled, 0);
  a.len.assign(pooled, 0);
  a.off.assign(pooled, 0);
  a.w.clear();
  a.span_lo = a.span_hi = 0;
  const T bin = extent / static_cast<T>(pooled);
  const int64_t n = samples_per_bin(extent, pooled, sampling_ratio);
  a.n = n;
  if (n <= 0 || size <= 0) {
    return;
  }
  const T nn = static_cast<T>(n);
  int64_t span_lo = size, span_hi = 0;
  for (int64_t p = 0; p < pooled; ++p) {
    int64_t first = size, last = -1, low, high;
    T frac;
    for (int64_t i = 0; i < n; ++i) {
      if (axis_sample(start, bin, nn, p, i, size, low, high, frac)) {
        first = std::min(first, low);
        last = std::max(last, high);
      }
    }
    if (last < 0) {
      continue;
    }
    const int64_t off = static_cast<int64_t>(a.w.size());
    a.lo[p] = first;
    a.len[p] = last - first + 1;
    a.off[p] = off;
    a.w.resize(off + a.len[p], T(0));
    T* w = a.w.data() + off - first;
    for (int64_t i = 0; i < n; ++i) {
      if (axis_sample(start, bin, nn, p, i, size, low, high, frac)) {
        w[low] += T(1) - frac;
        w[high] += frac;
      }
    }
    span_lo = std::min(span_lo, first);
    span_hi = std::max(span_hi, last + 1);
  }
  if (span_lo < span_hi) {
    a.span_lo = span_lo;
    a.span_hi = span_hi;
  }
}

// The RoIs r < R with image_of(r) >= 0 grouped by image, each image's in index order:
// order[start[b] .. start[b + 1]) (the deterministic per-image order of the backward passes).
template <typename ImageOf>
void image_order(int64_t R, int64_t B, const ImageOf& image_of, std::vector<int64_t>& start,
                 std::vector<int64_t>& order) {
  start.assign(B + 1, 0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t b = image_of(r);
    if (b >= 0) {
      ++start[b + 1];
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    start[b + 1] += start[b];
  }
  order.resize(start[B]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t b = image_of(r);
    if (b >= 0) {
      order[fill[b]++] = r;
    }
  }
}

// RoIs per task of the RoIAlign forward (small enough to keep many tasks for ~100 RoIs).
constexpr int64_t kRoiChunk = 16;

// acc[l] = sum_{j < rows} w[j] src[j * stride + l] for l < kLanes, rows summed in order.
template <int kLanes, typename acc_t, typename src_t>
inline void weighted_block(const acc_t* w, int64_t rows, const src_t* src, int64_t stride, acc_t* dst) {
  acc_t acc[kLanes] = {};
  for (int64_t j = 0; j < rows; ++j, src += stride) {
    const acc_t a = w[j];
    for (int l = 0; l < kLanes; ++l) {
      acc[l] += a * static_cast<acc_t>(src[l]);
    }
  }
  for (int l = 0; l < kLanes; ++l) {
    dst[l] = acc[l];
  }
}

// dst[x] = sum_{j < rows} w[j] src[j * stride + x] for x < n, rows summed in order. Blocks of
// columns stay in registers over all rows; 16 columns give the multiply-adds of one row enough
// independent accumulators to hide the add latency.
template <typename acc_t, typename src_t>
inline void weighted_rows(const acc_t* w, int64_t rows, const src_t* src, int64_t stride, int64_t n, acc_t* dst) {
  int64_t x = 0;
  for (; x + 16 <= n; x += 16) {
    weighted_block<16>(w, rows, src + x, stride, dst + x);
  }
  for (; x + 4 <= n; x += 4) {
    weighted_block<4>(w, rows, src + x, stride, dst + x);
  }
  for (; x < n; ++x) {
    weighted_block<1>(w, rows, src + x, stride, dst + x);
  }
}

struct RoiParams {
  int64_t B, H, W, pooled_h, pooled_w, sampling_ratio;
  double spatial_scale;
  bool aligned;
};

// RoI r: box r (image box_batch[r]), or with pairs the union box of pair r in its subject's image.
template <typename T>
void roi_weights(int64_t r, const T* boxes, const int64_t* box_batch, const int64_t* pairs, int64_t K,
                 const RoiParams& prm, RoiWeights<T>& out) {
  out.batch = -1;
  T box[4];
  int64_t b;
  if (pairs == nullptr) {
    b = box_batch[r];
    for (int c = 0; c < 4; ++c) {
      box[c] = boxes[4 * r + c];
    }
  } else {
    int64_t s, o;
    if (!pair_at(pairs, r, K, s, o)) {
      return;
    }
    b = box_batch[s];
    union_box(boxes + 4 * s, boxes + 4 * o, box);
  }
  if (!in_range(b, prm.B)) {
    return;
  }
  const T scale = static_cast<T>(prm.spatial_scale);
  const T offset = prm.aligned ? T(0.5) : T(0);
  const T x0 = box[0] * scale - offset, y0 = box[1] * scale - offset;
  T ext_w = (box[2] * scale - offset) - x0, ext_h = (box[3] * scale - offset) - y0;
  if (!prm.aligned) {  // torchvision: force malformed RoIs to be 1x1
    ext_w = std::max(ext_w, T(1));
    ext_h = std::max(ext_h, T(1));
  }
  axis_bins(y0, ext_h, prm.pooled_h, prm.H, prm.sampling_ratio, out.y);
  axis_bins(x0, ext_w, prm.pooled_w, prm.W, prm.sampling_ratio, out.x);
  const T count = static_cast<T>(std::max<int64_t>(out.y.n * out.x.n, 1));
  for (T& w : out.y.w) {
    w /= count;
  }
  out.batch = b;
}

void check_roi_args(const char* op, const at::Tensor& boxes, const at::Tensor& box_batch,
                    const std::optional<at::Tensor>& pairs, int64_t pooled_h, int64_t pooled_w) {
  check_boxes(op, boxes);
  TORCH_CHECK(box_batch.dim() == 1 && box_batch.size(0) == boxes.size(0) && box_batch.scalar_type() == at::kLong,
              op, ": box_batch must be int64 [K] with K = ", boxes.size(0), " (the boxes), got ",
              box_batch.scalar_type(), " ", box_batch.sizes());
  if (pairs.has_value()) {
    check_pairs(op, *pairs);
  }
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, op, ": pooled_h and pooled_w must be positive, got ", pooled_h, ", ",
              pooled_w);
}

}  // namespace

// RoIAlign, [B, D, H, W] -> [R, D, ph, pw], R = K boxes or the P pairs' union boxes. Parallel over
// chunks of RoIs; per RoI the separable weights Ay, Ax are built once, then per channel (*) of the
// reference: comb[x] = sum_y Ay[p, y] f[y, x] over the RoI's columns, out[p, q] = sum_x Ax[q, x] comb[x].
at::Tensor roi_align(const at::Tensor& features_in, const at::Tensor& boxes_in, const at::Tensor& box_batch_in,
                     const std::optional<at::Tensor>& pairs_in, int64_t pooled_h, int64_t pooled_w,
                     double spatial_scale, int64_t sampling_ratio, bool aligned) {
  TORCH_CHECK(features_in.dim() == 4, "roi_align: features must be [B, D, H, W], got ", features_in.sizes());
  check_roi_args("roi_align", boxes_in, box_batch_in, pairs_in, pooled_h, pooled_w);
  const int64_t B = features_in.size(0), D = features_in.size(1), H = features_in.size(2), W = features_in.size(3);
  const int64_t K = boxes_in.size(0);
  const int64_t R = pairs_in.has_value() ? pairs_in->size(0) : K;
  at::Tensor out = at::empty({R, D, pooled_h, pooled_w}, features_in.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor features = features_in.contiguous(), box_batch = box_batch_in.contiguous();
  const at::Tensor pairs = pairs_in.has_value() ? pairs_in->contiguous() : at::Tensor();
  const RoiParams prm{B, H, W, pooled_h, pooled_w, sampling_ratio, spatial_scale, aligned};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "roi_align", [&] {
    using acc_t = acc_type<scalar_t>;
    // Coordinates in the boxes' dtype as the op layer passes them (float32; float64 for float64).
    const at::Tensor boxes = boxes_in.to(acc_dtype<scalar_t>()).contiguous();
    const acc_t* bx = boxes.const_data_ptr<acc_t>();
    const int64_t* bb = box_batch.const_data_ptr<int64_t>();
    const int64_t* pr = pairs.defined() ? pairs.const_data_ptr<int64_t>() : nullptr;
    const scalar_t* f = features.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t bins = pooled_h * pooled_w;
    constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
    // out[r, d] of one RoI and channel from plane_bd = f[b, d] ([H, W], acc_t): per bin row p,
    // comb[x] = sum_y Ay[p, y] f[y, x], then out[p, q] = sum_x Ax[q, x] comb[x].
    auto pool = [&](const RoiWeights<acc_t>& rw, const acc_t* plane_bd, acc_t* cb, scalar_t* o) {
      const int64_t xs = rw.x.span_lo, nx = rw.x.span_hi - xs;
      const acc_t* plane = plane_bd + xs;
      for (int64_t p = 0; p < pooled_h; ++p) {
        scalar_t* oq = o + p * pooled_w;
        const int64_t ny = rw.y.len[p];
        if (ny == 0) {
          std::fill(oq, oq + pooled_w, scalar_t(0));
          continue;
        }
        weighted_rows(rw.y.w.data() + rw.y.off[p], ny, plane + rw.y.lo[p] * W, W, nx, cb);
        for (int64_t q = 0; q < pooled_w; ++q) {
          const acc_t* wx = rw.x.w.data() + rw.x.off[q];
          const acc_t* c = cb + (rw.x.lo[q] - xs);
          acc_t sum = 0;
          for (int64_t j = 0; j < rw.x.len[q]; ++j) {
            sum += wx[j] * c[j];
          }
          oq[q] = static_cast<scalar_t>(sum);
        }
      }
    };
    // Parallel over chunks of kRoiChunk consecutive RoIs (usually of one image); within a chunk the
    // channel loop is outside the RoI loop, so each feature plane is read from cache by all of them.
    const int64_t chunks = (R + kRoiChunk - 1) / kRoiChunk;
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<RoiWeights<acc_t>> rws(kRoiChunk);
      std::vector<acc_t> comb(W);
      // half/bfloat16: the plane (b, d) converted to acc_t once for all the chunk's RoIs in image b.
      std::vector<acc_t> plane_buf(kSame ? 0 : H * W);
      int64_t cached = -1;
      auto plane_of = [&](int64_t b, int64_t d) -> const acc_t* {
        const scalar_t* src = f + (b * D + d) * H * W;
        if constexpr (kSame) {  // (not a template: the cast keeps the other branch well-typed)
          return reinterpret_cast<const acc_t*>(src);
        } else {
          if (cached != b * D + d) {
            for (int64_t i = 0; i < H * W; ++i) {
              plane_buf[i] = static_cast<acc_t>(src[i]);
            }
            cached = b * D + d;
          }
          return plane_buf.data();
        }
      };
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t r0 = chunk * kRoiChunk, n = std::min(kRoiChunk, R - r0);
        for (int64_t i = 0; i < n; ++i) {
          roi_weights(r0 + i, bx, bb, pr, K, prm, rws[i]);
          if (rws[i].empty()) {
            scalar_t* o = dst + (r0 + i) * D * bins;
            std::fill(o, o + D * bins, scalar_t(0));
          }
        }
        for (int64_t d = 0; d < D; ++d) {
          for (int64_t i = 0; i < n; ++i) {
            if (!rws[i].empty()) {
              pool(rws[i], plane_of(rws[i].batch, d), comb.data(), dst + ((r0 + i) * D + d) * bins);
            }
          }
        }
      }
    });
  });
  return out;
}

// d features of RoIAlign: grad f[b] = sum_{r in b} Ay[r]^T G[r] Ax[r] (boxes get no gradient).
// Deterministic without atomics: parallel over (image b, channel d) planes; each plane adds the
// RoIs of image b in index order: tmp[p, x] = sum_q G[r, d, p, q] Ax[q, x], then
// plane[y, x] += Ay[p, y] tmp[p, x].
at::Tensor roi_align_backward(const at::Tensor& grad_in, const at::Tensor& boxes_in, const at::Tensor& box_batch_in,
                              const std::optional<at::Tensor>& pairs_in, int64_t B, int64_t H, int64_t W,
                              double spatial_scale, int64_t sampling_ratio, bool aligned) {
  TORCH_CHECK(grad_in.dim() == 4, "roi_align_backward: grad must be [R, D, pooled_h, pooled_w], got ",
              grad_in.sizes());
  const int64_t R = grad_in.size(0), D = grad_in.size(1), pooled_h = grad_in.size(2), pooled_w = grad_in.size(3);
  check_roi_args("roi_align_backward", boxes_in, box_batch_in, pairs_in, std::max<int64_t>(pooled_h, 1),
                 std::max<int64_t>(pooled_w, 1));
  TORCH_CHECK(B >= 0 && H >= 0 && W >= 0, "roi_align_backward: B, H, W must be >= 0, got ", B, ", ", H, ", ", W);
  const int64_t K = boxes_in.size(0);
  const int64_t R_want = pairs_in.has_value() ? pairs_in->size(0) : K;
  TORCH_CHECK(R == R_want, "roi_align_backward: grad has ", R, " RoIs but there are ", R_want,
              pairs_in.has_value() ? " pairs" : " boxes");
  at::Tensor out = at::zeros({B, D, H, W}, grad_in.options());
  if (out.numel() == 0 || R == 0 || pooled_h == 0 || pooled_w == 0) {
    return out;
  }
  const at::Tensor grad = grad_in.contiguous(), box_batch = box_batch_in.contiguous();
  const at::Tensor pairs = pairs_in.has_value() ? pairs_in->contiguous() : at::Tensor();
  const RoiParams prm{B, H, W, pooled_h, pooled_w, sampling_ratio, spatial_scale, aligned};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
    const at::Tensor boxes = boxes_in.to(acc_dtype<scalar_t>()).contiguous();
    const acc_t* bx = boxes.const_data_ptr<acc_t>();
    const int64_t* bb = box_batch.const_data_ptr<int64_t>();
    const int64_t* pr = pairs.defined() ? pairs.const_data_ptr<int64_t>() : nullptr;
    std::vector<RoiWeights<acc_t>> rois(R);
    at::parallel_for(0, R, grain_for(64 * (pooled_h + pooled_w)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        roi_weights(r, bx, bb, pr, K, prm, rois[r]);
      }
    });
    // The non-empty RoIs of each image, in index order: order[start[b] .. start[b + 1]).
    std::vector<int64_t> start, order;
    image_order(R, B, [&](int64_t r) { return rois[r].empty() ? int64_t(-1) : rois[r].batch; }, start, order);
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t bins = pooled_h * pooled_w;
    at::parallel_for(0, B * D, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> plane_buf(kSame ? 0 : H * W), tmp;
      for (int64_t bd = begin; bd < end; ++bd) {
        const int64_t b = bd / D, d = bd % D;
        if (start[b] == start[b + 1]) {
          continue;  // already zero
        }
        acc_t* plane;
        if constexpr (kSame) {  // (not a template: the cast keeps the dead branch well-typed)
          plane = reinterpret_cast<acc_t*>(dst + bd * H * W);
        } else {
          plane = plane_buf.data();
          std::fill(plane_buf.begin(), plane_buf.end(), acc_t(0));
        }
        for (int64_t k = start[b]; k < start[b + 1]; ++k) {
          const int64_t r = order[k];
          const RoiWeights<acc_t>& rw = rois[r];
          const scalar_t* gr = g + (r * D + d) * bins;
          const int64_t xs = rw.x.span_lo, nx = rw.x.span_hi - xs;
          tmp.resize(nx);
          acc_t* t = tmp.data();
          for (int64_t p = 0; p < pooled_h; ++p) {
            const int64_t ny = rw.y.len[p];
            if (ny == 0) {
              continue;
            }
            std::fill(t, t + nx, acc_t(0));
            for (int64_t q = 0; q < pooled_w; ++q) {
              const acc_t gq = static_cast<acc_t>(gr[p * pooled_w + q]);
              const acc_t* wx = rw.x.w.data() + rw.x.off[q];
              acc_t* tq = t + (rw.x.lo[q] - xs);
              for (int64_t j = 0; j < rw.x.len[q]; ++j) {
                tq[j] += gq * wx[j];
              }
            }
            const acc_t* wy = rw.y.w.data() + rw.y.off[p];
            acc_t* row = plane + rw.y.lo[p] * W + xs;
            for (int64_t j = 0; j < ny; ++j, row += W) {
              const acc_t a = wy[j];
              for (int64_t x = 0; x < nx; ++x) {
                row[x] += a * t[x];
              }
            }
          }
        }
        if constexpr (!kSame) {
          scalar_t* o = dst + bd * H * W;
          for (int64_t i = 0; i < H * W; ++i) {
            o[i] = static_cast<scalar_t>(plane[i]);
          }
        }
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// union_tap_pool: one tap (dy, dx) of a 3x3 conv (zero padding 1) over the pairs' union-box
// RoIAlign summed over the FPN levels (the reference's union_tap_pool)
// ---------------------------------------------------------------------------------------------
namespace {

// Channels of the forward's narrow blocks (the tail of C below one 1 KiB block of 16 vectors).
constexpr int64_t kTapLanes = 16;
// Pairs per forward chunk: the channel-block loop is outside the pair loop within a chunk.
constexpr int64_t kTapPairChunk = 64;

// The taps of source bin (si, sj) of one RoI at one level: visit(y, x, Ay[si, y] Ax[sj, x]) for the
// pixels the bin touches, rows then columns in order; none for an empty RoI or a bin outside the
// pooled grid (the zero padding of the shift).
template <typename T, typename Visit>
inline void bin_taps(const RoiWeights<T>& rw, int64_t si, int64_t sj, int64_t pooled, const Visit& visit) {
  if (rw.empty() || !in_range(si, pooled) || !in_range(sj, pooled)) {
    return;
  }
  const int64_t ny = rw.y.len[si], nx = rw.x.len[sj], y0 = rw.y.lo[si], x0 = rw.x.lo[sj];
  const T* wy = rw.y.w.data() + rw.y.off[si];
  const T* wx = rw.x.w.data() + rw.x.off[sj];
  for (int64_t j = 0; j < ny; ++j) {
    for (int64_t k = 0; k < nx; ++k) {
      visit(y0 + j, x0 + k, wy[j] * wx[k]);
    }
  }
}

// One 64-byte vector of T (GCC / Clang vector extensions: one zmm register under AVX-512, two ymm
// under AVX2, four xmm at the baseline) and its unaligned, may-alias view for loads from the maps.
template <typename T>
struct TapVec;
template <>
struct TapVec<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef float unaligned __attribute__((vector_size(64), aligned(4), may_alias));
};
template <>
struct TapVec<double> {
  typedef double type __attribute__((vector_size(64)));
  typedef double unaligned __attribute__((vector_size(64), aligned(8), may_alias));
};

// a += w src[0 .. lanes of A): A is T (one channel) or TapVec<T>::type (64 bytes of channels).
template <typename A, typename T>
inline void madd(A& a, T w, const T* src) {
  if constexpr (std::is_same_v<A, T>) {
    a += w * *src;
  } else {
    a += w * *reinterpret_cast<const typename TapVec<T>::unaligned*>(src);
  }
}

// dst[l * stride] (channel c0 + l, l < kN lanes of A) = sum over the levels, the rows j and columns
// k of source bin (si, sj) of (Ay_l[j] Ax_l[k]) maps_l[b, y0 + j, x0 + k, c0 + l]. Rows j go to four
// independent partial sums by j % 4 (covering the FMA latency), summed in a fixed order at the end.
template <typename A, int kN, typename T>
inline void bin_sum(const RoiWeights<T>* rws, const T* const* base, const RoiParams* prm, int64_t L, int64_t b,
                    int64_t C, int64_t c0, int64_t si, int64_t sj, T* dst, int64_t stride) {
  constexpr int kPer = static_cast<int>(sizeof(A) / sizeof(T));  // channels per A
  A a0[kN] = {}, a1[kN] = {}, a2[kN] = {}, a3[kN] = {};
  for (int64_t l = 0; l < L; ++l) {
    const RoiWeights<T>& rw = rws[l];
    if (rw.empty()) {
      continue;
    }
    const int64_t W = prm[l].W, ny = rw.y.len[si], nx = rw.x.len[sj];
    const T* wy = rw.y.w.data() + rw.y.off[si];
    const T* wx = rw.x.w.data() + rw.x.off[sj];
    const T* m = base[l] + ((b * prm[l].H + rw.y.lo[si]) * W + rw.x.lo[sj]) * C + c0;
    auto add_row = [&](A* acc, int64_t j) {
      const T* row = m + j * W * C;
      for (int64_t k = 0; k < nx; ++k) {
        const T w = wy[j] * wx[k];
        for (int v = 0; v < kN; ++v) {
          madd(acc[v], w, row + k * C + v * kPer);
        }
      }
    };
    if constexpr (kN >= 8) {  // enough independent accumulators already: one partial sum
      for (int64_t j = 0; j < ny; ++j) {
        add_row(a0, j);
      }
      continue;
    }
    for (int64_t j = 0; j < ny; j += 4) {
      add_row(a0, j);
      if (j + 1 < ny) {
        add_row(a1, j + 1);
      }
      if (j + 2 < ny) {
        add_row(a2, j + 2);
      }
      if (j + 3 < ny) {
        add_row(a3, j + 3);
      }
    }
  }
  for (int v = 0; v < kN; ++v) {
    const A sum = (a0[v] + a1[v]) + (a2[v] + a3[v]);
    T lanes[kPer];
    std::memcpy(lanes, &sum, sizeof(A));
    for (int i = 0; i < kPer; ++i) {
      dst[(v * kPer + i) * stride] = lanes[i];
    }
  }
}

// y[c] += a x[c] for c < kN 64-byte vectors of T.
template <int kN, typename T>
inline void axpy_block(T a, const T* x, T* y) {
  using U = typename TapVec<T>::unaligned;
  constexpr int kPer = static_cast<int>(64 / sizeof(T));
  for (int v = 0; v < kN; ++v) {
    *reinterpret_cast<U*>(y + v * kPer) += a * *reinterpret_cast<const U*>(x + v * kPer);
  }
}

// y[c] += a x[c] for c < n.
template <typename T>
inline void axpy(int64_t n, T a, const T* __restrict x, T* __restrict y) {
  for (int64_t c = 0; c < n; ++c) {
    y[c] += a * x[c];
  }
}

void check_tap_dtype(const char* op, at::ScalarType dt) {
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": only float32 and float64 are supported, got ", dt);
}

void check_tap_levels(const char* op, size_t L, size_t n, const char* what) {
  TORCH_CHECK(n == L, op, ": ", what, " must have one entry per level (", L, "), got ", n);
}

}  // namespace

// out[p, :, i, j] = sum_l RoIAlign_l(union box p, scales[l])[:, i + dy, j + dx] (0 where that bin
// is outside the grid), [P, C, pooled, pooled]; maps[l] channels-last [B, H_l, W_l, C]. Parallel over
// chunks of kTapPairChunk pairs; per pair the L RoiWeights once, then per block of channels (16
// 64-byte vectors, 256 floats / 128 doubles, held in registers; the tail in kTapLanes blocks, then
// single channels), per pair and bin, acc = sum over the levels and the bin's taps of
// Ay_l[y] Ax_l[x] maps_l[b, y, x, block] (bin_sum), written to out[p, block, i, j].
at::Tensor union_tap_pool(at::TensorList maps, const at::Tensor& boxes_in, const at::Tensor& box_batch_in,
                          const at::Tensor& pairs_in, int64_t pooled, at::ArrayRef<double> scales,
                          int64_t sampling_ratio, bool aligned, int64_t dy, int64_t dx) {
  const char* op = "union_tap_pool";
  TORCH_CHECK(!maps.empty(), op, ": maps must hold at least one level");
  const int64_t L = static_cast<int64_t>(maps.size());
  check_tap_levels(op, L, scales.size(), "scales");
  check_roi_args(op, boxes_in, box_batch_in, pairs_in, pooled, pooled);
  const at::ScalarType dt = maps[0].scalar_type();
  check_tap_dtype(op, dt);
  TORCH_CHECK(maps[0].dim() == 4, op, ": maps[0] must be channels-last [B, H, W, C], got ", maps[0].sizes());
  const int64_t B = maps[0].size(0), C = maps[0].size(3);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& m = maps[l];
    TORCH_CHECK(m.dim() == 4 && m.size(0) == B && m.size(3) == C, op, ": maps[", l, "] must be [B, H, W, C] with B = ",
                B, ", C = ", C, " (as maps[0]), got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == dt, op, ": maps[", l, "] is ", m.scalar_type(), " but maps[0] is ", dt);
    TORCH_CHECK(m.is_contiguous(), op, ": maps[", l, "] must be a contiguous channels-last [B, H, W, C] tensor ",
                "(x.permute(0, 2, 3, 1).contiguous() of a [B, C, H, W] map), got strides ", m.strides());
  }
  const int64_t K = boxes_in.size(0), P = pairs_in.size(0), bins = pooled * pooled;
  at::Tensor out = at::empty({P, C, pooled, pooled}, maps[0].options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor box_batch = box_batch_in.contiguous(), pairs = pairs_in.contiguous();
  std::vector<RoiParams> prm(L);
  for (int64_t l = 0; l < L; ++l) {
    prm[l] = {B, maps[l].size(1), maps[l].size(2), pooled, pooled, sampling_ratio, scales[l], aligned};
  }
  AT_DISPATCH_FLOATING_TYPES(dt, "union_tap_pool", [&] {
    using T = scalar_t;
    const at::Tensor boxes = boxes_in.to(dt).contiguous();
    const T* bx = boxes.const_data_ptr<T>();
    const int64_t* bb = box_batch.const_data_ptr<int64_t>();
    const int64_t* pr = pairs.const_data_ptr<int64_t>();
    std::vector<const T*> base(L);
    for (int64_t l = 0; l < L; ++l) {
      base[l] = maps[l].const_data_ptr<T>();
    }
    T* dst = out.mutable_data_ptr<T>();
    using V = typename TapVec<T>::type;
    constexpr int kFwdVecs = 16, kTapVecs = static_cast<int>(kTapLanes * sizeof(T) / sizeof(V));
    constexpr int64_t kFwdLanes = kFwdVecs * static_cast<int64_t>(sizeof(V) / sizeof(T));
    const int64_t chunks = (P + kTapPairChunk - 1) / kTapPairChunk;
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<RoiWeights<T>> rws(kTapPairChunk * L);  // pair i of the chunk, level l: rws[i * L + l]
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t p0 = chunk * kTapPairChunk, n = std::min(kTapPairChunk, P - p0);
        for (int64_t i = 0; i < n; ++i) {
          for (int64_t l = 0; l < L; ++l) {
            roi_weights(p0 + i, bx, bb, pr, K, prm[l], rws[i * L + l]);
          }
          if (rws[i * L].batch < 0) {  // the same at every level (one B)
            T* o = dst + (p0 + i) * C * bins;
            std::fill(o, o + C * bins, T(0));
          }
        }
        simd_dispatch([&] {
          for (int64_t c0 = 0, cw = 0; c0 < C; c0 += cw) {
            cw = C - c0 >= kFwdLanes ? kFwdLanes : std::min(kTapLanes, C - c0);
            for (int64_t i = 0; i < n; ++i) {
              const RoiWeights<T>* rw = rws.data() + i * L;
              const int64_t b = rw[0].batch;
              if (b < 0) {
                continue;
              }
              T* o = dst + ((p0 + i) * C + c0) * bins;
              for (int64_t q = 0; q < bins; ++q) {
                const int64_t si = q / pooled + dy, sj = q % pooled + dx;
                if (!in_range(si, pooled) || !in_range(sj, pooled)) {
                  for (int64_t c = 0; c < cw; ++c) {
                    o[c * bins + q] = T(0);
                  }
                } else if (cw == kFwdLanes) {
                  bin_sum<V, kFwdVecs>(rw, base.data(), prm.data(), L, b, C, c0, si, sj, o + q, bins);
                } else if (cw == kTapLanes) {
                  bin_sum<V, kTapVecs>(rw, base.data(), prm.data(), L, b, C, c0, si, sj, o + q, bins);
                } else {
                  for (int64_t c = 0; c < cw; ++c) {
                    bin_sum<T, 1>(rw, base.data(), prm.data(), L, b, C, c0 + c, si, sj, o + c * bins + q, bins);
                  }
                }
              }
            }
          }
        });
      }
    });
  });
  return out;
}

// d maps of union_tap_pool, channels-last [B, heights[l], widths[l], C] per level:
//   d maps_l[b, y, x, :] = sum_{p in b} sum_{(i, j): (i + dy, j + dx) in the grid}
//                          Ay_l[p][i + dy, y] Ax_l[p][j + dx, x] grad[p, :, i, j].
// Deterministic without atomics: parallel over (level, image, block of 8 64-byte vectors of channels);
// each task owns d maps_l[b, :, :, block] and adds the pairs of image b in index order, each pair's
// grad block first transposed to [bins, block] so that every tap is a contiguous axpy.
std::vector<at::Tensor> union_tap_pool_backward(const at::Tensor& grad_in, const at::Tensor& boxes_in,
                                                const at::Tensor& box_batch_in, const at::Tensor& pairs_in, int64_t B,
                                                at::IntArrayRef heights, at::IntArrayRef widths,
                                                at::ArrayRef<double> scales, int64_t sampling_ratio, bool aligned,
                                                int64_t dy, int64_t dx) {
  const char* op = "union_tap_pool_backward";
  const int64_t L = static_cast<int64_t>(heights.size());
  TORCH_CHECK(L > 0, op, ": heights must hold at least one level");
  check_tap_levels(op, L, widths.size(), "widths");
  check_tap_levels(op, L, scales.size(), "scales");
  check_tap_dtype(op, grad_in.scalar_type());
  check_pairs(op, pairs_in);
  const int64_t P = pairs_in.size(0);
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.size(0) == P && grad_in.size(2) > 0 && grad_in.size(2) == grad_in.size(3),
              op, ": grad must be [P, C, pooled, pooled] with P = ", P, " (the pairs) and pooled > 0, got ",
              grad_in.sizes());
  const int64_t C = grad_in.size(1), pooled = grad_in.size(2), bins = pooled * pooled;
  check_roi_args(op, boxes_in, box_batch_in, pairs_in, pooled, pooled);
  TORCH_CHECK(B >= 0, op, ": B must be >= 0, got ", B);
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(heights[l] >= 0 && widths[l] >= 0, op, ": heights and widths must be >= 0, got ", heights, ", ",
                widths);
  }
  const at::ScalarType dt = grad_in.scalar_type();
  std::vector<at::Tensor> out(L);
  std::vector<RoiParams> prm(L);
  for (int64_t l = 0; l < L; ++l) {
    out[l] = at::zeros({B, heights[l], widths[l], C}, grad_in.options());
    prm[l] = {B, heights[l], widths[l], pooled, pooled, sampling_ratio, scales[l], aligned};
  }
  if (P == 0 || B == 0 || C == 0) {
    return out;
  }
  const at::Tensor grad = grad_in.contiguous(), box_batch = box_batch_in.contiguous();
  const at::Tensor pairs = pairs_in.contiguous();
  const int64_t K = boxes_in.size(0);
  AT_DISPATCH_FLOATING_TYPES(dt, "union_tap_pool_backward", [&] {
    using T = scalar_t;
    const at::Tensor boxes = boxes_in.to(dt).contiguous();
    const T* bx = boxes.const_data_ptr<T>();
    const int64_t* bb = box_batch.const_data_ptr<int64_t>();
    const int64_t* pr = pairs.const_data_ptr<int64_t>();
    // rois[l * P + p]: pair p's weights at level l.
    std::vector<RoiWeights<T>> rois(L * P);
    at::parallel_for(0, P, grain_for(64 * L * pooled), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        for (int64_t l = 0; l < L; ++l) {
          roi_weights(p, bx, bb, pr, K, prm[l], rois[l * P + p]);
        }
      }
    });
    // The valid pairs of each image, in index order: order[start[b] .. start[b + 1]).
    std::vector<int64_t> start, order;
    image_order(P, B, [&](int64_t p) { return rois[p].batch; }, start, order);
    const T* g = grad.const_data_ptr<T>();
    constexpr int kBwdVecs = 8;  // channels per task: 8 64-byte vectors (128 floats, 64 doubles)
    constexpr int64_t kBwdLanes = kBwdVecs * static_cast<int64_t>(64 / sizeof(T));
    const int64_t blocks = (C + kBwdLanes - 1) / kBwdLanes;
    at::parallel_for(0, L * B * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> gt(bins * kBwdLanes);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t l = task / (B * blocks), b = task / blocks % B, c0 = task % blocks * kBwdLanes;
        const int64_t cw = std::min(kBwdLanes, C - c0), H = prm[l].H, W = prm[l].W;
        T* dm = out[l].mutable_data_ptr<T>() + b * H * W * C + c0;
        // The pairs of image b in order; width: cw (kBwdLanes for full blocks: vector axpys).
        auto add_pairs = [&](int64_t width) {
          for (int64_t k = start[b]; k < start[b + 1]; ++k) {
            const int64_t p = order[k];
            const RoiWeights<T>& rw = rois[l * P + p];
            if (rw.empty()) {
              continue;
            }
            const T* gp = g + (p * C + c0) * bins;  // grad[p, c0 + c, q] -> gt[q, c]
            for (int64_t c = 0; c < width; ++c) {
              for (int64_t q = 0; q < bins; ++q) {
                gt[q * width + c] = gp[c * bins + q];
              }
            }
            for (int64_t q = 0; q < bins; ++q) {
              const T* gq = gt.data() + q * width;
              bin_taps(rw, q / pooled + dy, q % pooled + dx, pooled,
                       [&](int64_t y, int64_t x, T wt) {
                         T* d = dm + (y * W + x) * C;
                         if (width == kBwdLanes) {
                           axpy_block<kBwdVecs>(wt, gq, d);
                         } else {
                           axpy(width, wt, gq, d);
                         }
                       });
            }
          }
        };
        simd_dispatch([&] {
          if (cw == kBwdLanes) {
            add_pairs(kBwdLanes);
          } else {
            add_pairs(cw);
          }
        });
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// pairwise_edge_fusion (Eq. 12-14)
// ---------------------------------------------------------------------------------------------
namespace {

// Pairs per tile: the fused rows g are built for one tile at a time ([tile, D], never [P, D]).
constexpr int64_t kFusionTile = 256;
// Columns per task of the deterministic column-parallel scatter of the backward.
constexpr int64_t kFusionCols = 64;

// Row-strided views (stride(1) == 1, any row stride) are read in place; other layouts copied.
at::Tensor row_major(const at::Tensor& x) {
  return (x.size(1) <= 1 || x.stride(1) == 1) ? x : x.contiguous();
}

// The inputs of Eq. 12 as raw rows: subj[k] = subj + k * ss, obj[k] likewise, union[p] = uni + p * us.
template <typename scalar_t>
struct FusionRows {
  const scalar_t* subj;
  const scalar_t* obj;
  const scalar_t* uni;  // nullptr without union features (Du = 0)
  int64_t ss, os, us, Du, K, D;
  const int64_t* pairs;
};

template <typename scalar_t>
FusionRows<scalar_t> fusion_rows(const at::Tensor& subj, const at::Tensor& obj, const at::Tensor& uni,
                                 const at::Tensor& pairs) {
  const bool has_union = uni.defined();
  return {subj.const_data_ptr<scalar_t>(),
          obj.const_data_ptr<scalar_t>(),
          has_union ? uni.const_data_ptr<scalar_t>() : nullptr,
          subj.stride(0),
          obj.stride(0),
          has_union ? uni.stride(0) : 0,
          has_union ? uni.size(1) : 0,
          subj.size(0),
          subj.size(1),
          pairs.const_data_ptr<int64_t>()};
}

// The two rows' combination of Eq. 12: their product, or with kSum (the sum form of
// Scene-Graph-Benchmark's predictors, reference/pairs.py) their sum.
template <bool kSum, typename acc_t>
inline acc_t combine(acc_t sv, acc_t ov) {
  if constexpr (kSum) {
    return sv + ov;
  } else {
    return sv * ov;
  }
}

// Eq. 12 for pairs [p0, p0 + n): g[i] = subj[s_p] * obj[o_p] * u_p (kSum: (subj[s_p] + obj[o_p]) * u_p;
// u = union on the first Du dims, 1 beyond), a zero row for an invalid pair. Parallel over rows.
template <bool kSum, typename scalar_t, typename acc_t>
void fused_tile(const FusionRows<scalar_t>& in, int64_t p0, int64_t n, acc_t* g) {
  const int64_t D = in.D, Du = in.Du;
  at::parallel_for(0, n, grain_for(D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = p0 + i;
      acc_t* gr = g + i * D;
      int64_t s, o;
      if (!pair_at(in.pairs, p, in.K, s, o)) {
        std::fill(gr, gr + D, acc_t(0));
        continue;
      }
      const scalar_t* sr = in.subj + s * in.ss;
      const scalar_t* orow = in.obj + o * in.os;
      const scalar_t* ur = in.uni + p * in.us;
      for (int64_t c = 0; c < Du; ++c) {
        gr[c] = combine<kSum>(static_cast<acc_t>(sr[c]), static_cast<acc_t>(orow[c])) * static_cast<acc_t>(ur[c]);
      }
      for (int64_t c = Du; c < D; ++c) {
        gr[c] = combine<kSum>(static_cast<acc_t>(sr[c]), static_cast<acc_t>(orow[c]));
      }
    }
  });
}

void check_fusion_args(const char* op, const at::Tensor& subj, const at::Tensor& obj,
                       const std::optional<at::Tensor>& uni, const at::Tensor& pairs, const at::Tensor& weight) {
  TORCH_CHECK(subj.dim() == 2 && at::isFloatingType(subj.scalar_type()), op, ": subj must be a float tensor [K, D], got ",
              subj.scalar_type(), " ", subj.sizes());
  const int64_t K = subj.size(0), D = subj.size(1);
  TORCH_CHECK(obj.dim() == 2 && obj.size(0) == K && obj.size(1) == D, op, ": obj must be [K, D] = [", K, ", ", D,
              "] like subj, got ", obj.sizes());
  check_pairs(op, pairs);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == D, op, ": weight must be [C, D] with D = ", D, ", got ",
              weight.sizes());
  const at::ScalarType dt = subj.scalar_type();
  TORCH_CHECK(obj.scalar_type() == dt && weight.scalar_type() == dt, op, ": subj, obj and weight must share a dtype, got ",
              dt, ", ", obj.scalar_type(), ", ", weight.scalar_type());
  if (uni.has_value()) {
    TORCH_CHECK(uni->dim() == 2 && uni->size(0) == pairs.size(0) && uni->size(1) <= D, op,
                ": union_feats must be [P, Du] with P = ", pairs.size(0), " and Du <= D = ", D, ", got ", uni->sizes());
    TORCH_CHECK(uni->scalar_type() == dt, op, ": union_feats is ", uni->scalar_type(), " but subj is ", dt);
  }
}

}  // namespace

// Eq. 12-14: logits_p = (subj[s_p] * obj[o_p] * u_p) W^T + bias, [P, C] (sum_mode: the sum form,
// ((subj[s_p] + obj[o_p]) * u_p) W^T + bias). Per tile of pairs: the fused rows g (prologue,
// parallel over rows), then out_tile = g W^T (+ bias) with ATen's GEMM (in float32 for
// half/bfloat16, the result cast).
at::Tensor pairwise_edge_fusion(const at::Tensor& subj_in, const at::Tensor& obj_in,
                                const std::optional<at::Tensor>& union_in, const at::Tensor& pairs_in,
                                const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
                                bool sum_mode) {
  check_fusion_args("pairwise_edge_fusion", subj_in, obj_in, union_in, pairs_in, weight_in);
  const int64_t D = subj_in.size(1), P = pairs_in.size(0), C = weight_in.size(0);
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == C && bias_in->scalar_type() == subj_in.scalar_type(),
                "pairwise_edge_fusion: bias must be [C] = [", C, "] of the dtype of subj, got ", bias_in->scalar_type(),
                " ", bias_in->sizes());
  }
  at::Tensor out = at::empty({P, C}, subj_in.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor subj = row_major(subj_in), obj = row_major(obj_in);
  const at::Tensor uni = union_in.has_value() ? row_major(*union_in) : at::Tensor();
  const at::Tensor pairs = pairs_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, subj.scalar_type(), "pairwise_edge_fusion", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
    const at::TensorOptions acc_options = subj.options().dtype(acc_dtype<scalar_t>());
    const at::Tensor wt = weight_in.to(acc_dtype<scalar_t>()).t();  // [D, C] view of W
    const at::Tensor bias = bias_in.has_value() ? bias_in->to(acc_dtype<scalar_t>()) : at::Tensor();
    const FusionRows<scalar_t> in = fusion_rows<scalar_t>(subj, obj, uni, pairs);
    const int64_t tile = std::min(P, kFusionTile);
    at::Tensor g_buf = at::empty({tile, D}, acc_options);
    for (int64_t p0 = 0; p0 < P; p0 += tile) {
      const int64_t n = std::min(tile, P - p0);
      at::Tensor g = g_buf.narrow(0, 0, n);
      if (sum_mode) {  // Eq. 12
        fused_tile<true>(in, p0, n, g.mutable_data_ptr<acc_t>());
      } else {
        fused_tile<false>(in, p0, n, g.mutable_data_ptr<acc_t>());
      }
      at::Tensor o = out.narrow(0, p0, n);
      if constexpr (kSame) {  // Eq. 14 (without the geometry term of Eq. 13)
        bias.defined() ? at::addmm_out(o, bias, g, wt) : at::mm_out(o, g, wt);
      } else {
        o.copy_(bias.defined() ? at::addmm(bias, g, wt) : at::mm(g, wt));
      }
    }
  });
  return out;
}

// Backward of Eq. 12-14, G = grad with invalid pairs' rows zeroed, per tile of pairs:
//   dg = G W (GEMM); d union_p = (dg_p * subj[s_p] * obj[o_p])[:Du];
//   d subj[k] += dg_p * obj[o_p] * u_p (s_p = k), d obj[k] += dg_p * subj[s_p] * u_p (o_p = k):
//     parallel over column blocks, each block adding the pairs in order (deterministic);
//   d W += G_tile^T g_tile (tiles in order); d bias = sum_p grad_p (invalid pairs included: their
//   logits are the bias alone).
// sum_mode (g = (subj[s_p] + obj[o_p]) * u_p): d union_p = (dg_p * (subj[s_p] + obj[o_p]))[:Du],
//   d subj[k] += dg_p * u_p (s_p = k), d obj[k] += dg_p * u_p (o_p = k); d W, d bias as above.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairwise_edge_fusion_backward(
    const at::Tensor& grad_in, const at::Tensor& subj_in, const at::Tensor& obj_in,
    const std::optional<at::Tensor>& union_in, const at::Tensor& pairs_in, const at::Tensor& weight_in,
    bool has_bias, bool sum_mode) {
  check_fusion_args("pairwise_edge_fusion_backward", subj_in, obj_in, union_in, pairs_in, weight_in);
  const int64_t K = subj_in.size(0), D = subj_in.size(1), P = pairs_in.size(0), C = weight_in.size(0);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == P && grad_in.size(1) == C,
              "pairwise_edge_fusion_backward: grad must be [P, C] = [", P, ", ", C, "], got ", grad_in.sizes());
  const bool has_union = union_in.has_value();
  const int64_t Du = has_union ? union_in->size(1) : 0;
  const at::TensorOptions options = subj_in.options();
  at::Tensor d_union = has_union ? at::empty({P, Du}, union_in->options()) : at::empty({0}, options);
  at::Tensor d_subj, d_obj, d_weight;
  at::Tensor d_bias = has_bias ? at::empty({C}, weight_in.options()) : at::empty({0}, options);
  const at::Tensor subj = row_major(subj_in), obj = row_major(obj_in);
  const at::Tensor uni = has_union ? row_major(*union_in) : at::Tensor();
  const at::Tensor pairs = pairs_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, subj.scalar_type(), "pairwise_edge_fusion_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
    const at::TensorOptions acc_options = options.dtype(acc_dtype<scalar_t>());
    const FusionRows<scalar_t> in = fusion_rows<scalar_t>(subj, obj, uni, pairs);
    // Accumulators: the outputs themselves for float/double, acc buffers cast at the end otherwise.
    at::Tensor ds = at::zeros({K, D}, acc_options), dob = at::zeros({K, D}, acc_options);
    at::Tensor dw = at::zeros({C, D}, acc_options);
    const at::Tensor w = weight_in.to(acc_dtype<scalar_t>()).contiguous();
    // G: grad in acc with the rows of invalid pairs zeroed ([P, C], as the output).
    at::Tensor G = at::empty({P, C}, acc_options);
    {
      const at::Tensor grad = grad_in.contiguous();
      const scalar_t* gi = grad.const_data_ptr<scalar_t>();
      acc_t* go = G.mutable_data_ptr<acc_t>();
      at::parallel_for(0, P, grain_for(C), [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          int64_t s, o;
          const bool valid = pair_at(in.pairs, p, K, s, o);
          for (int64_t c = 0; c < C; ++c) {
            go[p * C + c] = valid ? static_cast<acc_t>(gi[p * C + c]) : acc_t(0);
          }
        }
      });
    }
    if (has_bias) {  // d bias = sum_p grad_p over every pair, pairs in order (an invalid pair's
                     // logits are the bias alone, so its gradient still reaches the bias)
      std::vector<acc_t> sum(C, acc_t(0));
      const at::Tensor grad = grad_in.contiguous();
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      for (int64_t p = 0; p < P; ++p) {
        for (int64_t c = 0; c < C; ++c) {
          sum[c] += static_cast<acc_t>(gp[p * C + c]);
        }
      }
      scalar_t* db = d_bias.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        db[c] = static_cast<scalar_t>(sum[c]);
      }
    }
    if (P > 0 && D > 0) {
      const int64_t tile = std::min(P, kFusionTile);
      at::Tensor g_buf = at::empty({tile, D}, acc_options), dg_buf = at::empty({tile, D}, acc_options);
      acc_t* ds_p = ds.mutable_data_ptr<acc_t>();
      acc_t* do_p = dob.mutable_data_ptr<acc_t>();
      scalar_t* du_p = has_union ? d_union.mutable_data_ptr<scalar_t>() : nullptr;
      const int64_t blocks = (D + kFusionCols - 1) / kFusionCols;
      for (int64_t p0 = 0; p0 < P; p0 += tile) {
        const int64_t n = std::min(tile, P - p0);
        at::Tensor g = g_buf.narrow(0, 0, n), dg = dg_buf.narrow(0, 0, n);
        const at::Tensor Gt = G.narrow(0, p0, n);
        at::mm_out(dg, Gt, w);  // dg = G W, [n, D]
        acc_t* gp = g.mutable_data_ptr<acc_t>();
        const acc_t* dgp = dg.const_data_ptr<acc_t>();
        // One column-block body for both forms, kSum a compile-time flag (the product form's loop
        // is the one it always was).
        auto column_blocks = [&](auto sum_tag, int64_t b0, int64_t b1) {
          constexpr bool kSum = decltype(sum_tag)::value;
          const int64_t c0 = b0 * kFusionCols, c1 = std::min(D, b1 * kFusionCols);
          const int64_t cu = std::clamp(Du, c0, c1);  // [c0, cu): union dims, [cu, c1): u = 1
          for (int64_t i = 0; i < n; ++i) {
            const int64_t p = p0 + i;
            acc_t* gr = gp + i * D;
            const acc_t* dr = dgp + i * D;
            int64_t s, o;
            if (!pair_at(in.pairs, p, K, s, o)) {
              std::fill(gr + c0, gr + c1, acc_t(0));
              if (du_p != nullptr) {
                std::fill(du_p + p * Du + c0, du_p + p * Du + cu, scalar_t(0));
              }
              continue;
            }
            const scalar_t* sr = in.subj + s * in.ss;
            const scalar_t* orow = in.obj + o * in.os;
            const scalar_t* ur = in.uni + p * in.us;
            acc_t* dsr = ds_p + s * D;
            acc_t* dor = do_p + o * D;
            scalar_t* dur = du_p + p * Du;
            for (int64_t c = c0; c < cu; ++c) {
              const acc_t sv = static_cast<acc_t>(sr[c]), ov = static_cast<acc_t>(orow[c]);
              const acc_t uv = static_cast<acc_t>(ur[c]), dv = dr[c];
              if constexpr (kSum) {
                const acc_t rv = sv + ov, du = dv * uv;
                gr[c] = rv * uv;              // sum form, recomputed
                dsr[c] += du;                 // d subj
                dor[c] += du;                 // d obj
                dur[c] = static_cast<scalar_t>(dv * rv);  // d union
              } else {
                gr[c] = sv * ov * uv;         // Eq. 12, recomputed
                dsr[c] += dv * ov * uv;       // d subj
                dor[c] += dv * sv * uv;       // d obj
                dur[c] = static_cast<scalar_t>(dv * sv * ov);  // d union
              }
            }
            for (int64_t c = cu; c < c1; ++c) {
              const acc_t sv = static_cast<acc_t>(sr[c]), ov = static_cast<acc_t>(orow[c]), dv = dr[c];
              if constexpr (kSum) {
                gr[c] = sv + ov;
                dsr[c] += dv;
                dor[c] += dv;
              } else {
                gr[c] = sv * ov;
                dsr[c] += dv * ov;
                dor[c] += dv * sv;
              }
            }
          }
        };
        at::parallel_for(0, blocks, grain_for(4 * n * kFusionCols), [&](int64_t b0, int64_t b1) {
          if (sum_mode) {
            column_blocks(std::true_type{}, b0, b1);
          } else {
            column_blocks(std::false_type{}, b0, b1);
          }
        });
        dw.addmm_(Gt.t(), g);  // d W += G_tile^T g_tile
      }
    } else if (has_union) {
      d_union.zero_();
    }
    if constexpr (kSame) {
      d_subj = ds;
      d_obj = dob;
      d_weight = dw;
    } else {
      d_subj = ds.to(subj_in.scalar_type());
      d_obj = dob.to(obj_in.scalar_type());
      d_weight = dw.to(weight_in.scalar_type());
    }
  });
  return {d_subj, d_obj, d_union, d_weight, d_bias};
}

}  // namespace pairs_cpu

TORCH_LIBRARY_IMPL(sgg_kernels, CPU, m) {
  m.impl("_union_boxes", &pairs_cpu::union_boxes);
  m.impl("_union_boxes_backward", &pairs_cpu::union_boxes_backward);
  m.impl("_pair_geometry", &pairs_cpu::pair_geometry);
  m.impl("_pair_geometry_backward", &pairs_cpu::pair_geometry_backward);
  m.impl("_roi_align", &pairs_cpu::roi_align);
  m.impl("_roi_align_backward", &pairs_cpu::roi_align_backward);
  m.impl("_union_tap_pool", &pairs_cpu::union_tap_pool);
  m.impl("_union_tap_pool_backward", &pairs_cpu::union_tap_pool_backward);
  m.impl("_pairwise_edge_fusion", &pairs_cpu::pairwise_edge_fusion);
  m.impl("_pairwise_edge_fusion_backward", &pairs_cpu::pairwise_edge_fusion_backward);
}

}  // namespace sgg_kernels
