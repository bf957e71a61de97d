// Shared pieces of the CPU kernels (first written for family cluster, SIL Eq. 1-3, 9; also used by
// pairs, masks and prototypes): dtype plumbing, index helpers, vector loops that compilers vectorize
// without -ffast-math, and the deterministic per-cluster reduction.
// Math and backward formulas: sgg_kernels/reference/cluster.py (the spec).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace sgg_kernels {
namespace cluster_cpu {

// The eps of F.normalize: cos uses max(|x|, kEps) norms.
constexpr double kEps = 1e-12;

// Scalars of points, ATen dtype of accumulation (float for half/bf16/float, double for double).
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

template <typename scalar_t>
inline at::ScalarType acc_dtype() {
  return c10::CppTypeToScalarType<acc_type<scalar_t>>::value;
}

// Items per at::parallel_for chunk when each item costs ~`work` element operations: chunks of at
// least ATen's GRAIN_SIZE (32768) elements, so small problems run on one thread.
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work));
}

inline bool in_range(int64_t v, int64_t n) {
  return v >= 0 && v < n;
}

// The (subject, object) of pair p of pairs [P, 2] when both lie in [0, K) (pairs and masks families).
inline bool pair_at(const int64_t* pairs, int64_t p, int64_t K, int64_t& s, int64_t& o) {
  s = pairs[2 * p];
  o = pairs[2 * p + 1];
  return in_range(s, K) && in_range(o, K);
}

// torch.minimum / torch.maximum: NaN if either operand is NaN.
template <typename T>
inline T nan_min(T a, T b) {
  return std::isnan(a) ? a : (std::isnan(b) ? b : std::min(a, b));
}
template <typename T>
inline T nan_max(T a, T b) {
  return std::isnan(a) ? a : (std::isnan(b) ? b : std::max(a, b));
}

// `t` as a contiguous tensor of dtype `dtype` (no copy when it already is one).
inline at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

// A 1-element tensor (alpha, beta) read as the accumulation type: the reference's `x.to(acc)`.
template <typename acc_t>
inline acc_t read_scalar(const at::Tensor& t) {
  return static_cast<acc_t>(t.item<double>());
}

// sum_{d < n} term(d) in 8 interleaved lanes: no loop-carried dependency on one accumulator, so
// gcc and clang vectorize it without -ffast-math. `term` returns acc_t.
template <typename acc_t, typename Term>
inline acc_t lane_sum(int64_t n, const Term& term) {
  constexpr int kLanes = 8;
  acc_t lane[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      lane[l] += term(d + l);
    }
  }
  acc_t tail = 0;
  for (; d < n; ++d) {
    tail += term(d);
  }
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7])) + tail;
}

// sum_d x_d * y_d, inputs of any dtype, products and sums in acc_t.
template <typename acc_t, typename X, typename Y>
inline acc_t dot(const X* x, const Y* y, int64_t n) {
  return lane_sum<acc_t>(n, [&](int64_t d) { return static_cast<acc_t>(x[d]) * static_cast<acc_t>(y[d]); });
}

// |x| as torch.linalg.vector_norm computes it (sqrt of the sum of squares), in acc_t.
template <typename acc_t, typename X>
inline acc_t norm2(const X* x, int64_t n) {
  return std::sqrt(dot<acc_t>(x, x, n));
}

// c_hat[b, j] = c[b, j] / max(|c[b, j]|, eps)  (F.normalize of the centers, Eq. 2), [B, C, D] acc.
template <typename scalar_t>
at::Tensor normalized_centers(const at::Tensor& centers) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = centers.size(0), C = centers.size(1), D = centers.size(2);
  at::Tensor c_hat = at::empty({B, C, D}, centers.options().dtype(acc_dtype<scalar_t>()));
  const scalar_t* c = centers.const_data_ptr<scalar_t>();
  acc_t* out = c_hat.mutable_data_ptr<acc_t>();
  at::parallel_for(0, B * C, grain_for(2 * D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = c + r * D;
      const acc_t m = std::max(norm2<acc_t>(row, D), static_cast<acc_t>(kEps));
      for (int64_t d = 0; d < D; ++d) {
        out[r * D + d] = static_cast<acc_t>(row[d]) / m;
      }
    }
  });
  return c_hat;
}

// ---------------------------------------------------------------------------------------------
// Deterministic per-cluster reduction. Sums over the points of a cluster (Eq. 3's numerator and
// denominator, the gradients w.r.t. centers) never use atomics and never depend on the thread
// count: the points of each image are cut into tiles of a size fixed by (M, C) alone; each tile
// sums its points, in index order, into its own partial [C, W]; then every (b, j) adds the tiles'
// partials in tile order.
// ---------------------------------------------------------------------------------------------
struct PointTiles {
  int64_t size;   // points per tile
  int64_t count;  // tiles per image
};

// A tile costs ~size*W to sum and ~C*W to clear and reduce: size >= 16 C keeps that overhead small.
inline PointTiles point_tiles(int64_t M, int64_t C) {
  const int64_t size = std::max<int64_t>(256, ((16 * C + 63) / 64) * 64);
  return {size, (M + size - 1) / size};
}

// tile_fn(b, tile, i0, i1, part): add the contributions of points [i0, i1) of image b into
//   part[a * W + w] (a zeroed [C, W] buffer); it may also write per-point outputs.
// finish_fn(b, j, sum): sum[w] = sum over the points of cluster j of image b (W values).
template <typename acc_t, typename TileFn, typename FinishFn>
void cluster_reduce(int64_t B, int64_t M, int64_t C, int64_t W, const at::TensorOptions& acc_options,
                    const TileFn& tile_fn, const FinishFn& finish_fn) {
  const PointTiles tiles = point_tiles(M, C);
  const int64_t part_size = C * W;
  at::Tensor parts = at::empty({B * tiles.count * part_size}, acc_options);
  acc_t* part = parts.mutable_data_ptr<acc_t>();
  at::parallel_for(0, B * tiles.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles.count, t = task % tiles.count;
      acc_t* p = part + task * part_size;
      std::fill(p, p + part_size, acc_t(0));
      tile_fn(b, t, t * tiles.size, std::min(M, (t + 1) * tiles.size), p);
    }
  });
  at::parallel_for(0, B * C, grain_for(W * tiles.count), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(W);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / C, j = r % C;
      const acc_t* first = part + (b * tiles.count * C + j) * W;
      if (tiles.count == 1) {
        finish_fn(b, j, first);  // one tile: its partial is the sum
        continue;
      }
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t t = 0; t < tiles.count; ++t) {
        const acc_t* src = first + t * part_size;
        for (int64_t w = 0; w < W; ++w) {
          sum[w] += src[w];
        }
      }
      finish_fn(b, j, sum.data());
    }
  });
}

// Forward and backward kernels, registered in cluster.cpp.
at::Tensor knn_index(const at::Tensor& points, const at::Tensor& centers, int64_t k);
at::Tensor gather_mean(const at::Tensor& feats, const at::Tensor& index);
at::Tensor gather_mean_backward(const at::Tensor& grad, const at::Tensor& index, int64_t M);
std::tuple<at::Tensor, at::Tensor> cosine_assign(const at::Tensor& feats, const at::Tensor& centers,
                                                 const std::optional<at::Tensor>& alpha,
                                                 const std::optional<at::Tensor>& beta);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cosine_assign_backward(
    const at::Tensor& grad_sim, const at::Tensor& feats, const at::Tensor& centers, const at::Tensor& assign,
    const at::Tensor& sim, const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& beta);
std::tuple<at::Tensor, at::Tensor> cluster_aggregate(const at::Tensor& values, const at::Tensor& assign,
                                                     const at::Tensor& sim, const at::Tensor& value_centers);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_aggregate_backward(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& assign, const at::Tensor& sim,
    const at::Tensor& out, const at::Tensor& den);
at::Tensor cluster_dispatch(const at::Tensor& center_out, const at::Tensor& assign, const at::Tensor& sim,
                            const std::optional<at::Tensor>& residual);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_dispatch_backward(
    const at::Tensor& grad_out, const at::Tensor& center_out, const at::Tensor& assign, const at::Tensor& sim,
    bool has_residual);

}  // namespace cluster_cpu
}  // namespace sgg_kernels
