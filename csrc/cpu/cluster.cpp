// CPU kernels of family cluster (SIL, MM'23, Sec. 3.2): Eq. 1 (knn_index, gather_mean) here,
// Eq. 2 in cluster_assign.cpp, Eq. 3 and 9 in cluster_aggregate.cpp, the registration of all at
// the end of this file. Math and backward formulas: sgg_kernels/reference/cluster.py (the spec).
//
// Every kernel: any float dtype in (accumulation in at::opmath_type: float, or double for double),
// outputs in the input dtype; non-contiguous inputs accepted; at::parallel_for over independent
// work; deterministic (no atomics, results independent of the thread count); out-of-range indices
// are never read and contribute nothing, as in the reference.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "cluster_common.h"

namespace sgg_kernels {
namespace cluster_cpu {

namespace {

// (d2, point index) ordered as torch.sort(stable=True) orders d2: ascending, NaN last, ties (NaN
// included) to the lower point index.
template <typename acc_t>
inline bool nearer(const std::pair<acc_t, int64_t>& x, const std::pair<acc_t, int64_t>& y) {
  const bool x_nan = std::isnan(x.first), y_nan = std::isnan(y.first);
  if (x_nan != y_nan) {
    return y_nan;
  }
  if (!x_nan && x.first != y.first) {
    return x.first < y.first;
  }
  return x.second < y.second;
}

// d2 = dx*dx + dy*dy with each product and the sum rounded to acc_t, as the reference computes it
// tensor op by tensor op. The volatile stores forbid contracting a product and the sum into one
// fused multiply-add (gcc contracts across statements with -ffp-contract=fast, its default for
// GNU dialects and on targets with FMA), so the order of neighbours is bitwise the reference's.
template <typename acc_t>
inline acc_t squared_distance(acc_t dx, acc_t dy) {
  volatile acc_t xx = dx * dx;
  volatile acc_t yy = dy * dy;
  return xx + yy;
}

}  // namespace

// Eq. 1, KNN(T_j): the k points nearest to each center, nearest first, ties to the lower index.
at::Tensor knn_index(const at::Tensor& points_in, const at::Tensor& centers_in, int64_t k) {
  TORCH_CHECK(points_in.dim() == 3 && points_in.size(2) == 2, "knn_index: points must be [B, M, 2], got ",
              points_in.sizes());
  TORCH_CHECK(centers_in.dim() == 3 && centers_in.size(2) == 2 && centers_in.size(0) == points_in.size(0),
              "knn_index: centers must be [B, C, 2] with the batch of points, got ", centers_in.sizes());
  TORCH_CHECK(points_in.scalar_type() == centers_in.scalar_type(), "knn_index: points is ",
              points_in.scalar_type(), " but centers is ", centers_in.scalar_type());
  const int64_t B = points_in.size(0), M = points_in.size(1), C = centers_in.size(1);
  TORCH_CHECK(k >= 1 && k <= M, "knn_index: k must be in [1, M = ", M, "], got ", k);
  at::Tensor index = at::empty({B, C, k}, points_in.options().dtype(at::kLong));
  if (index.numel() == 0) {
    return index;
  }
  const at::Tensor points = points_in.contiguous(), centers = centers_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, points.scalar_type(), "knn_index", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* p = points.const_data_ptr<scalar_t>();
    const scalar_t* c = centers.const_data_ptr<scalar_t>();
    int64_t* out = index.mutable_data_ptr<int64_t>();
    at::parallel_for(0, B * C, grain_for(4 * M), [&](int64_t begin, int64_t end) {
      std::vector<std::pair<acc_t, int64_t>> order(M);
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / C;
        const acc_t cx = static_cast<acc_t>(c[bc * 2]), cy = static_cast<acc_t>(c[bc * 2 + 1]);
        const scalar_t* pb = p + b * M * 2;
        for (int64_t m = 0; m < M; ++m) {
          const acc_t dx = cx - static_cast<acc_t>(pb[m * 2]);
          const acc_t dy = cy - static_cast<acc_t>(pb[m * 2 + 1]);
          order[m] = {squared_distance(dx, dy), m};
        }
        // (d2, index) is a strict total order, so selecting then sorting the k first is exact.
        std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), nearer<acc_t>);
        std::sort(order.begin(), order.begin() + k, nearer<acc_t>);
        for (int64_t t = 0; t < k; ++t) {
          out[bc * k + t] = order[t].second;
        }
      }
    });
  });
  return index;
}

// Eq. 1: F^c_j = 1/n_k sum_{Q_i in KNN(T_j)} F_i; an index outside [0, M) adds nothing (still / k).
at::Tensor gather_mean(const at::Tensor& feats_in, const at::Tensor& index_in) {
  TORCH_CHECK(feats_in.dim() == 3, "gather_mean: feats must be [B, M, D], got ", feats_in.sizes());
  TORCH_CHECK(index_in.dim() == 3 && index_in.size(0) == feats_in.size(0) && index_in.scalar_type() == at::kLong,
              "gather_mean: index must be int64 [B, C, k] with the batch of feats, got ", index_in.scalar_type(),
              " ", index_in.sizes());
  const int64_t B = feats_in.size(0), M = feats_in.size(1), D = feats_in.size(2);
  const int64_t C = index_in.size(1), k = index_in.size(2);
  at::Tensor out = at::empty({B, C, D}, feats_in.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor feats = feats_in.contiguous(), index = index_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "gather_mean", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* f = feats.const_data_ptr<scalar_t>();
    const int64_t* idx = index.const_data_ptr<int64_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const acc_t kk = static_cast<acc_t>(k);
    at::parallel_for(0, B * C, grain_for(k * D), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(D);
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / C;
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t t = 0; t < k; ++t) {
          const int64_t m = idx[bc * k + t];
          if (!in_range(m, M)) {
            continue;
          }
          const scalar_t* row = f + (b * M + m) * D;
          for (int64_t d = 0; d < D; ++d) {
            sum[d] += static_cast<acc_t>(row[d]);
          }
        }
        for (int64_t d = 0; d < D; ++d) {
          o[bc * D + d] = static_cast<scalar_t>(sum[d] / kk);
        }
      }
    });
  });
  return out;
}

// d feats of gather_mean: grad feats[b, m] = sum_{(c, t): index[b, c, t] = m} G[b, c] / k.
// Deterministic scatter: per image, a counting sort of the (c, t) entries by point (CSR), then
// every point sums its entries in (c, t) order.
at::Tensor gather_mean_backward(const at::Tensor& grad_in, const at::Tensor& index_in, int64_t M) {
  TORCH_CHECK(grad_in.dim() == 3, "gather_mean_backward: grad must be [B, C, D], got ", grad_in.sizes());
  TORCH_CHECK(index_in.dim() == 3 && index_in.size(0) == grad_in.size(0) && index_in.size(1) == grad_in.size(1) &&
                  index_in.scalar_type() == at::kLong,
              "gather_mean_backward: index must be int64 [B, C, k] matching grad [B, C, D], got ",
              index_in.scalar_type(), " ", index_in.sizes());
  TORCH_CHECK(M >= 0, "gather_mean_backward: M must be >= 0, got ", M);
  const int64_t B = grad_in.size(0), C = grad_in.size(1), D = grad_in.size(2), k = index_in.size(2);
  const int64_t E = C * k;  // entries (c, t) per image
  at::Tensor grad_feats = at::empty({B, M, D}, grad_in.options());
  if (grad_feats.numel() == 0) {
    return grad_feats;
  }
  const at::Tensor grad = grad_in.contiguous(), index = index_in.contiguous();
  // CSR per image: the entries of point m are entry[b, start[b, m] .. start[b, m + 1]).
  std::vector<int64_t> start(B * (M + 1), 0), entry(B * E);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  at::parallel_for(0, B, grain_for(2 * E + M), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t* s = start.data() + b * (M + 1);
      const int64_t* ib = idx + b * E;
      for (int64_t e = 0; e < E; ++e) {
        if (in_range(ib[e], M)) {
          ++s[ib[e] + 1];
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        s[m + 1] += s[m];
      }
      std::vector<int64_t> fill(s, s + M);
      int64_t* eb = entry.data() + b * E;
      for (int64_t e = 0; e < E; ++e) {
        if (in_range(ib[e], M)) {
          eb[fill[ib[e]]++] = e;
        }
      }
    }
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gather_mean_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    // G[b, c] / k in acc_t, as the reference scales each entry before the sum.
    const at::Tensor scaled = grad.to(acc_dtype<scalar_t>()).div(static_cast<double>(k));
    const acc_t* g = scaled.const_data_ptr<acc_t>();
    scalar_t* out = grad_feats.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * M, grain_for(D), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(D);
      for (int64_t bm = begin; bm < end; ++bm) {
        const int64_t b = bm / M, m = bm % M;
        const int64_t* s = start.data() + b * (M + 1);
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t q = s[m]; q < s[m + 1]; ++q) {
          const acc_t* row = g + (b * C + entry[b * E + q] / k) * D;
          for (int64_t d = 0; d < D; ++d) {
            sum[d] += row[d];
          }
        }
        for (int64_t d = 0; d < D; ++d) {
          out[bm * D + d] = static_cast<scalar_t>(sum[d]);
        }
      }
    });
  });
  return grad_feats;
}

// Eq. 2 + Eq. 3 in one op: assign every point, then aggregate each cluster.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> superpixel_cluster(
    const at::Tensor& feats, const at::Tensor& centers, const at::Tensor& values, const at::Tensor& value_centers,
    const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& beta) {
  auto [assign, sim] = cosine_assign(feats, centers, alpha, beta);
  auto [out, den] = cluster_aggregate(values, assign, sim, value_centers);
  return {out, den, assign, sim};
}

}  // namespace cluster_cpu

TORCH_LIBRARY_IMPL(sgg_kernels, CPU, m) {
  m.impl("_knn_index", &cluster_cpu::knn_index);
  m.impl("_gather_mean", &cluster_cpu::gather_mean);
  m.impl("_gather_mean_backward", &cluster_cpu::gather_mean_backward);
  m.impl("_cosine_assign", &cluster_cpu::cosine_assign);
  m.impl("_cosine_assign_backward", &cluster_cpu::cosine_assign_backward);
  m.impl("_cluster_aggregate", &cluster_cpu::cluster_aggregate);
  m.impl("_cluster_aggregate_backward", &cluster_cpu::cluster_aggregate_backward);
  m.impl("_superpixel_cluster", &cluster_cpu::superpixel_cluster);
  m.impl("_cluster_dispatch", &cluster_cpu::cluster_dispatch);
  m.impl("_cluster_dispatch_backward", &cluster_cpu::cluster_dispatch_backward);
}

}  // namespace sgg_kernels
