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
//   forward            at::parallel_for over (pair, channel) planes
//   backward           one pass, parallel over the objects k: channel by channel, k's pairs in both
//                      roles come from a CSR (counting sort, subject role first, ascending p); each
//                      pair's g for k's role is recomputed, conv_transpose(K_role, g) is accumulated
//                      in a padded plane (d masks) and the correlation of k's padded mask with g
//                      into that (pair, role)'s kernel partial (d kernels); per-object kernels
//                      [K, d, d] then add the (pair, role) partials serially, subjects first then
//                      objects, each in ascending p (the reference's two index_adds)
// Every convolution runs on zero-padded planes ((m + 2h)^2, h = d // 2), so the inner loops are
// branch-free axpy / dot products over a contiguous row of x, which the compiler vectorises.
//
// Determinism: no atomics, every sum in a fixed order, results independent of the thread count.
// Numerics: half/bfloat16 accumulate in float32, float64 in float64. Union-frame sample positions
// are computed in that accumulation type from the boxes as given (float32, float64 for float64
// masks), one operation at a time (no FMA contraction under -std=c++17), as the reference does.
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
// Plane operations. A padded plane has side mp = m + 2h, the m x m plane at offset (h, h), zeros
// around it.
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct Planes {
  int64_t m, d, h, mp, R;
  explicit Planes(const MaskArgs& a) : m(a.m), d(a.d), h(a.d / 2), mp(a.m + 2 * (a.d / 2)), R(a.R) {}
  int64_t padded() const { return mp * mp; }
};

// pad[h + y][h + x] = src[y][x] (in acc_t); the border must already be zero and stays so.
template <typename scalar_t, typename acc_t>
inline void load_padded(acc_t* pad, const scalar_t* src, const Planes<acc_t>& g) {
  for (int64_t y = 0; y < g.m; ++y) {
    acc_t* row = pad + (y + g.h) * g.mp + g.h;
    const scalar_t* s = src + y * g.m;
    for (int64_t x = 0; x < g.m; ++x) {
      row[x] = static_cast<acc_t>(s[x]);
    }
  }
}

template <typename scalar_t, typename acc_t>
inline void load_kernel(acc_t* dst, const scalar_t* src, int64_t dd) {
  for (int64_t e = 0; e < dd; ++e) {
    dst[e] = static_cast<acc_t>(src[e]);
  }
}

// Eq. 6's smoothing, F.conv2d with zero padding h (cross-correlation), from a padded plane:
//   dst[y][x] = sum_{r, c} K[r][c] pad[y + r][x + c]
template <typename acc_t>
inline void smooth(acc_t* dst, const acc_t* pad, const acc_t* ker, const Planes<acc_t>& g) {
  const int64_t m = g.m, d = g.d, mp = g.mp;
  for (int64_t y = 0; y < m; ++y) {
    acc_t* out = dst + y * m;
    std::fill(out, out + m, acc_t(0));
    for (int64_t r = 0; r < d; ++r) {
      const acc_t* row = pad + (y + r) * mp;
      for (int64_t c = 0; c < d; ++c) {
        const acc_t k = ker[r * d + c];
        const acc_t* in = row + c;
        for (int64_t x = 0; x < m; ++x) {
          out[x] += k * in[x];
        }
      }
    }
  }
}

// Its adjoint, F.conv_transpose2d with padding h, accumulated into a padded plane (the border
// collects what falls outside the mask and is dropped):
//   dpad[y + r][x + c] += K[r][c] g[y][x]
template <typename acc_t>
inline void conv_transpose_add(acc_t* dpad, const acc_t* grad, const acc_t* ker, const Planes<acc_t>& g) {
  const int64_t m = g.m, d = g.d, mp = g.mp;
  for (int64_t y = 0; y < m; ++y) {
    const acc_t* gy = grad + y * m;
    for (int64_t r = 0; r < d; ++r) {
      acc_t* row = dpad + (y + r) * mp;
      for (int64_t c = 0; c < d; ++c) {
        const acc_t k = ker[r * d + c];
        acc_t* out = row + c;
        for (int64_t x = 0; x < m; ++x) {
          out[x] += k * gy[x];
        }
      }
    }
  }
}

// The kernel's gradient (zero outside the mask, hence the padded plane):
//   dk[r][c] += sum_{y, x} g[y][x] pad[y + r][x + c]
template <typename acc_t>
inline void kernel_grad_add(acc_t* dk, const acc_t* pad, const acc_t* grad, const Planes<acc_t>& g) {
  const int64_t m = g.m, d = g.d, mp = g.mp;
  for (int64_t r = 0; r < d; ++r) {
    for (int64_t c = 0; c < d; ++c) {
      acc_t sum = 0;
      for (int64_t y = 0; y < m; ++y) {
        const acc_t* gy = grad + y * m;
        const acc_t* in = pad + (y + r) * mp + c;
        sum += lane_sum<acc_t>(m, [&](int64_t x) { return gy[x] * in[x]; });
      }
      dk[r * d + c] += sum;
    }
  }
}

// The gradient g of one role's smoothed plane (reference pair_mask_conv_backward):
//   own frame:   g_S = G . O                                 (g_O = G . S)
//   union frame: g_S = A_s^T(G . A_o(O)) = wy_s^T (G . A_o(O)) wx_s
// G: the grad plane (R x R or m x m), other_s: the other role's smoothed plane, taps: the pair's.
template <typename scalar_t, typename acc_t>
inline void role_grad(acc_t* out, const scalar_t* G, const acc_t* other_s, const Tap<acc_t>* taps, int role,
                      const Planes<acc_t>& g) {
  const int64_t m = g.m, R = g.R;
  if (R == 0) {
    for (int64_t q = 0; q < m * m; ++q) {
      out[q] = static_cast<acc_t>(G[q]) * other_s[q];
    }
    return;
  }
  std::fill(out, out + m * m, acc_t(0));
  const Tap<acc_t>* oy = taps + (2 * (1 - role)) * R;
  const Tap<acc_t>* ox = oy + R;
  const Tap<acc_t>* ry = taps + (2 * role) * R;
  const Tap<acc_t>* rx = ry + R;
  for (int64_t i = 0; i < R; ++i) {
    const Tap<acc_t>& ty = ry[i];
    acc_t* lo = out + ty.lo * m;
    acc_t* hi = out + ty.hi * m;
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

// The [d, d] kernel of a role (0 subject, 1 object) of pair p whose object in that role is obj.
template <typename scalar_t>
inline const scalar_t* role_kernel(const scalar_t* kernels, bool per_pair, int64_t p, int role, int64_t obj,
                                   int64_t dd) {
  return kernels + (per_pair ? 2 * p + role : obj) * dd;
}

// Thread-local buffers of one parallel chunk.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> pad_s, pad_o, sm_s, sm_o, ks, ko, g, dpad;
  explicit Scratch(const Planes<acc_t>& g_)
      : pad_s(g_.padded(), acc_t(0)),
        pad_o(g_.padded(), acc_t(0)),
        sm_s(g_.m * g_.m),
        sm_o(g_.m * g_.m),
        ks(g_.d * g_.d),
        ko(g_.d * g_.d),
        g(g_.m * g_.m),
        dpad(g_.padded()) {}
};

// CSR of the pairs by (role, object): for key = role * K + k, the pairs are
// pair_of[offset[key] .. offset[key + 1]) in ascending p. Invalid pairs are left out.
struct PairCsr {
  std::vector<int64_t> offset, pair_of;
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
    const int64_t work = 2 * mm * dd + out_hw;
    at::parallel_for(0, a.P * a.C, grain_for(work), [&](int64_t begin, int64_t end) {
      Scratch<acc_t> w(geo);
      int64_t last_p = -1;
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t p = plane / a.C, c = plane % a.C;
        scalar_t* dst = dst_all + plane * out_hw;
        int64_t s, o;
        if (!pair_at(pr, p, a.K, s, o)) {  // invalid pair: output 0
          std::fill(dst, dst + out_hw, scalar_t(0));
          continue;
        }
        if (p != last_p) {  // the pair's kernels, once per run of its channels
          load_kernel(w.ks.data(), role_kernel(kn, a.per_pair, p, 0, s, dd), dd);
          load_kernel(w.ko.data(), role_kernel(kn, a.per_pair, p, 1, o, dd), dd);
          last_p = p;
        }
        load_padded(w.pad_s.data(), mk + (s * a.C + c) * mm, geo);
        load_padded(w.pad_o.data(), mk + (o * a.C + c) * mm, geo);
        smooth(w.sm_s.data(), w.pad_s.data(), w.ks.data(), geo);  // S = K_s (*) m_s
        smooth(w.sm_o.data(), w.pad_o.data(), w.ko.data(), geo);  // O = K_o (*) m_o
        if (a.R == 0) {
          for (int64_t q = 0; q < mm; ++q) {
            dst[q] = static_cast<scalar_t>(w.sm_s[q] * w.sm_o[q]);  // S . O
          }
        } else {
          const Tap<acc_t>* sy = taps.data() + p * 4 * a.R;
          const Tap<acc_t>* sx = sy + a.R;
          const Tap<acc_t>* oy = sy + 2 * a.R;
          const Tap<acc_t>* ox = sy + 3 * a.R;
          for (int64_t i = 0; i < a.R; ++i) {  // A_s(S) . A_o(O)
            for (int64_t j = 0; j < a.R; ++j) {
              dst[i * a.R + j] = static_cast<scalar_t>(resample_at(sy[i], sx[j], w.sm_s.data(), a.m) *
                                                       resample_at(oy[i], ox[j], w.sm_o.data(), a.m));
            }
          }
        }
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Backward
//   d m[k] = sum_{p: s_p = k} K_s (*)^T g_S + sum_{p: o_p = k} K_o (*)^T g_O     ((*)^T: conv_transpose2d)
//   d K_role[r][c] = sum_{channel, y, x} g_role[y][x] m_role[y + r - h][x + c - h]   (0 outside)
// One pass, parallel over the objects: object k visits, channel by channel, every pair it is in
// (CSR: subject role first, ascending p), recomputes the other role's smoothed mask and k's g, and
// adds both k's mask gradient (conv_transpose) and the (pair, role) kernel partial. A (pair, role)
// belongs to exactly one object, so every partial is written by one thread, over the channels in
// order.
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
    std::vector<acc_t> part(need_kernels ? 2 * a.P * dd : 0, acc_t(0));  // d K per (pair, role)
    scalar_t* dm_all = need_masks ? d_masks.mutable_data_ptr<scalar_t>() : nullptr;
    // ~3 convolutions per (pair, role, channel)
    const int64_t per_object = std::max<int64_t>(1, static_cast<int64_t>(csr.pair_of.size()) / a.K) * a.C;
    at::parallel_for(0, a.K, grain_for(per_object * (3 * mm * dd + 2 * out_hw)), [&](int64_t begin, int64_t end) {
      Scratch<acc_t> w(geo);
      for (int64_t k = begin; k < end; ++k) {
        for (int64_t c = 0; c < a.C; ++c) {
          if (need_masks) std::fill(w.dpad.begin(), w.dpad.end(), acc_t(0));
          if (need_kernels) load_padded(w.pad_s.data(), mk + (k * a.C + c) * mm, geo);  // k's own mask
          for (int role = 0; role < 2; ++role) {
            const int64_t key = role * a.K + k;
            for (int64_t e = csr.offset[key]; e < csr.offset[key + 1]; ++e) {
              const int64_t p = csr.pair_of[e];
              const int64_t other = role == 0 ? pr[2 * p + 1] : pr[2 * p];  // valid: the CSR holds valid pairs
              load_kernel(w.ks.data(), role_kernel(kn, a.per_pair, p, role, k, dd), dd);
              load_kernel(w.ko.data(), role_kernel(kn, a.per_pair, p, 1 - role, other, dd), dd);
              load_padded(w.pad_o.data(), mk + (other * a.C + c) * mm, geo);
              smooth(w.sm_o.data(), w.pad_o.data(), w.ko.data(), geo);  // the other role's smoothed mask
              role_grad(w.g.data(), gr + (p * a.C + c) * out_hw, w.sm_o.data(), taps.data() + p * 4 * a.R, role,
                        geo);                                             // g for k's role
              if (need_masks) conv_transpose_add(w.dpad.data(), w.g.data(), w.ks.data(), geo);
              if (need_kernels) kernel_grad_add(part.data() + (2 * p + role) * dd, w.pad_s.data(), w.g.data(), geo);
            }
          }
          if (need_masks) {
            scalar_t* dst = dm_all + (k * a.C + c) * mm;
            for (int64_t y = 0; y < a.m; ++y) {
              const acc_t* row = w.dpad.data() + (y + geo.h) * geo.mp + geo.h;
              for (int64_t x = 0; x < a.m; ++x) {
                dst[y * a.m + x] = static_cast<scalar_t>(row[x]);
              }
            }
          }
        }
      }
    });

    if (need_kernels) {
      scalar_t* dk = d_kernels.mutable_data_ptr<scalar_t>();
      if (a.per_pair) {  // invalid pairs' partials stayed 0
        for (int64_t e = 0; e < 2 * a.P * dd; ++e) {
          dk[e] = static_cast<scalar_t>(part[e]);
        }
      } else {  // the reference's index_add over the subjects, then over the objects
        std::vector<acc_t> sum(a.K * dd, acc_t(0));
        for (int role = 0; role < 2; ++role) {
          for (int64_t p = 0; p < a.P; ++p) {
            int64_t s, o;
            if (!pair_at(pr, p, a.K, s, o)) continue;
            const int64_t k = role == 0 ? s : o;
            const acc_t* src = part.data() + (2 * p + role) * dd;
            for (int64_t e = 0; e < dd; ++e) {
              sum[k * dd + e] += src[e];
            }
          }
        }
        for (int64_t e = 0; e < a.K * dd; ++e) {
          dk[e] = static_cast<scalar_t>(sum[e]);
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
