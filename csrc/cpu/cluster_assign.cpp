// CPU kernels of Eq. 2 (SIL, Sec. 3.2): cosine_assign and its backward.
// Math and backward formulas: sgg_kernels/reference/cluster.py (the spec); registered in cluster.cpp.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cluster_common.h"

namespace sgg_kernels {
namespace cluster_cpu {

namespace {

// Points per tile of the similarity: [kSimTile, C] is all of the M x C matrix that exists at once.
constexpr int64_t kSimTile = 512;

// Index of the first maximum of x[0..n) as torch.max returns it: ties to the lower index, and the
// first NaN if there is one. The max and a NaN probe run in 8 lanes (vectorised); the exact
// scalar scan runs only when the probe sees a NaN (or an inf - inf).
template <typename acc_t>
int64_t first_argmax(const acc_t* x, int64_t n) {
  constexpr int kLanes = 8;
  if (n >= kLanes) {
    acc_t best[kLanes], probe[kLanes] = {};
    for (int l = 0; l < kLanes; ++l) {
      best[l] = x[l];
    }
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        best[l] = x[j + l] > best[l] ? x[j + l] : best[l];
        probe[l] += x[j + l];
      }
    }
    acc_t m = best[0], p = probe[0];
    for (int l = 1; l < kLanes; ++l) {
      m = best[l] > m ? best[l] : m;
      p += probe[l];
    }
    for (; j < n; ++j) {
      m = x[j] > m ? x[j] : m;
      p += x[j];
    }
    if (!std::isnan(p)) {
      int64_t first = 0;
      while (x[first] != m) {
        ++first;
      }
      return first;
    }
  }
  int64_t best_j = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(x[j])) {
      return j;
    }
    if (x[j] > x[best_j]) {
      best_j = j;
    }
  }
  return best_j;
}

void check_feats_centers(const char* op, const at::Tensor& feats, const at::Tensor& centers) {
  TORCH_CHECK(feats.dim() == 3, op, ": feats must be [B, M, D], got ", feats.sizes());
  TORCH_CHECK(centers.dim() == 3 && centers.size(0) == feats.size(0) && centers.size(2) == feats.size(2), op,
              ": centers must be [B, C, D] with the B and D of feats ", feats.sizes(), ", got ", centers.sizes());
  TORCH_CHECK(centers.scalar_type() == feats.scalar_type(), op, ": feats is ", feats.scalar_type(),
              " but centers is ", centers.scalar_type());
  TORCH_CHECK(centers.size(1) >= 1, op, ": centers must hold at least one center (C >= 1)");
}

void check_alpha_beta(const char* op, const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& beta) {
  TORCH_CHECK(alpha.has_value() == beta.has_value(), op, ": alpha and beta come together (both or neither)");
  if (alpha.has_value()) {
    TORCH_CHECK(alpha->numel() == 1 && beta->numel() == 1, op, ": alpha and beta must hold one element each, got ",
                alpha->sizes(), " and ", beta->sizes());
  }
}

}  // namespace

// Eq. 2: assign_i = argmax_j s_ij (ties to the lower j), sim_i = max_j s_ij, where
// s_ij = cos(f_i, c_j) = (f_i / max(|f_i|, eps)) . (c_j / max(|c_j|, eps)), or sigmoid(beta + alpha s_ij).
// Per tile of points: one GEMM of the raw features with the normalised centers (ATen/BLAS), each
// row scaled by 1 / max(|f_i|, eps); the sigmoid with ATen's vectorised kernel; then each row's
// first maximum.
std::tuple<at::Tensor, at::Tensor> cosine_assign(const at::Tensor& feats_in, const at::Tensor& centers_in,
                                                 const std::optional<at::Tensor>& alpha,
                                                 const std::optional<at::Tensor>& beta) {
  check_feats_centers("cosine_assign", feats_in, centers_in);
  check_alpha_beta("cosine_assign", alpha, beta);
  const int64_t B = feats_in.size(0), M = feats_in.size(1), D = feats_in.size(2), C = centers_in.size(1);
  at::Tensor assign = at::empty({B, M}, feats_in.options().dtype(at::kLong));
  at::Tensor sim = at::empty({B, M}, feats_in.options());
  if (B * M == 0) {
    return {assign, sim};
  }
  // Detached: the GEMM below is an ATen call made on worker threads, where autograd is not excluded
  // (at::parallel_for does not carry the caller's dispatch state) and mm_out refuses inputs that
  // require grad.
  const at::Tensor feats = feats_in.detach().contiguous(), centers = centers_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "cosine_assign", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;  // half/bf16: GEMM on a float copy
    const at::TensorOptions acc_options = feats.options().dtype(acc_dtype<scalar_t>());
    const at::Tensor c_hat = normalized_centers<scalar_t>(centers);  // [B, C, D]
    const bool learnable = alpha.has_value();
    const acc_t a = learnable ? read_scalar<acc_t>(*alpha) : acc_t(0);
    const acc_t bias = learnable ? read_scalar<acc_t>(*beta) : acc_t(0);
    const scalar_t* f = feats.const_data_ptr<scalar_t>();
    int64_t* assign_out = assign.mutable_data_ptr<int64_t>();
    scalar_t* sim_out = sim.mutable_data_ptr<scalar_t>();
    const int64_t tiles = (M + kSimTile - 1) / kSimTile;
    at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
      at::Tensor f_buf = kConvert ? at::empty({kSimTile, D}, acc_options) : at::Tensor();
      at::Tensor s_buf = at::empty({kSimTile, C}, acc_options);
      acc_t* s = s_buf.mutable_data_ptr<acc_t>();
      std::vector<acc_t> inv_n(kSimTile);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / tiles, i0 = (task % tiles) * kSimTile, rows = std::min(kSimTile, M - i0);
        const scalar_t* f_tile = f + (b * M + i0) * D;
        for (int64_t r = 0; r < rows; ++r) {  // 1 / max(|f_i|, eps)
          inv_n[r] = acc_t(1) / std::max(norm2<acc_t>(f_tile + r * D, D), static_cast<acc_t>(kEps));
        }
        at::Tensor s_tile = s_buf.narrow(0, 0, rows);
        at::Tensor f_mat;
        if constexpr (kConvert) {
          acc_t* fb = f_buf.mutable_data_ptr<acc_t>();
          for (int64_t q = 0; q < rows * D; ++q) {
            fb[q] = static_cast<acc_t>(f_tile[q]);
          }
          f_mat = f_buf.narrow(0, 0, rows);
        } else {
          f_mat = feats.select(0, b).narrow(0, i0, rows);
        }
        at::mm_out(s_tile, f_mat, c_hat.select(0, b).t());  // f_i . c_j / m_j, [rows, C]
        for (int64_t r = 0; r < rows; ++r) {  // cos_ij, or beta + alpha cos_ij
          acc_t* sr = s + r * C;
          const acc_t scale = inv_n[r];
          if (learnable) {
            for (int64_t j = 0; j < C; ++j) {
              sr[j] = bias + a * (sr[j] * scale);
            }
          } else {
            for (int64_t j = 0; j < C; ++j) {
              sr[j] *= scale;
            }
          }
        }
        if (learnable) {
          s_tile.sigmoid_();
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t j = first_argmax(s + r * C, C);
          assign_out[b * M + i0 + r] = j;
          sim_out[b * M + i0 + r] = static_cast<scalar_t>(s[r * C + j]);
        }
      }
    });
  });
  return {assign, sim};
}

// Backward of Eq. 2, for point i with a = assign_i, n_i = max(|f_i|, eps), m_a = max(|c_a|, eps),
// cos_i = f_i.c_a / (n_i m_a), s_i = cos_i or sigmoid(beta + alpha cos_i), g = grad_sim_i:
//   gc_i       = g * (alpha s_i (1 - s_i)  if sigmoid else 1)
//   grad f_i   = gc_i / n_i * (c_a / m_a - [|f_i| >= eps] cos_i f_i / n_i)
//   grad c_j   = 1/m_j * (sum_{i: a_i=j} gc_i f_i / n_i - [|c_j| >= eps] (sum_{i: a_i=j} gc_i cos_i) c_j / m_j)
//   grad alpha = sum_i g s_i (1 - s_i) cos_i,   grad beta = sum_i g s_i (1 - s_i)
// cos_i and s_i are recomputed from feats and centers (the saved sim is not read), as the reference
// does. A point with assign outside [0, C) gets zero gradient and adds nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cosine_assign_backward(
    const at::Tensor& grad_sim_in, const at::Tensor& feats_in, const at::Tensor& centers_in,
    const at::Tensor& assign_in, const at::Tensor& sim, const std::optional<at::Tensor>& alpha,
    const std::optional<at::Tensor>& beta) {
  check_feats_centers("cosine_assign_backward", feats_in, centers_in);
  check_alpha_beta("cosine_assign_backward", alpha, beta);
  const int64_t B = feats_in.size(0), M = feats_in.size(1), D = feats_in.size(2), C = centers_in.size(1);
  TORCH_CHECK(assign_in.scalar_type() == at::kLong && assign_in.dim() == 2 && assign_in.size(0) == B &&
                  assign_in.size(1) == M,
              "cosine_assign_backward: assign must be int64 [B, M] = [", B, ", ", M, "], got ",
              assign_in.scalar_type(), " ", assign_in.sizes());
  TORCH_CHECK(grad_sim_in.dim() == 2 && grad_sim_in.size(0) == B && grad_sim_in.size(1) == M,
              "cosine_assign_backward: grad_sim must be [B, M], got ", grad_sim_in.sizes());
  (void)sim;
  at::Tensor grad_feats = at::empty({B, M, D}, feats_in.options());
  at::Tensor grad_centers = at::empty({B, C, D}, centers_in.options());
  at::Tensor grad_alpha, grad_beta;  // undefined (None) without alpha/beta
  const at::Tensor feats = feats_in.contiguous(), centers = centers_in.contiguous();
  const at::Tensor assign = assign_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "cosine_assign_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::TensorOptions acc_options = feats.options().dtype(acc_dtype<scalar_t>());
    const at::Tensor c_hat_t = normalized_centers<scalar_t>(centers);  // c_j / m_j, [B, C, D]
    const at::Tensor grad_sim = contiguous_as(grad_sim_in, acc_dtype<scalar_t>());
    const bool learnable = alpha.has_value();
    const acc_t a = learnable ? read_scalar<acc_t>(*alpha) : acc_t(0);
    const acc_t bias = learnable ? read_scalar<acc_t>(*beta) : acc_t(0);
    const acc_t eps = static_cast<acc_t>(kEps);
    const scalar_t* f = feats.const_data_ptr<scalar_t>();
    const scalar_t* c = centers.const_data_ptr<scalar_t>();
    const acc_t* c_hat = c_hat_t.const_data_ptr<acc_t>();
    const acc_t* g = grad_sim.const_data_ptr<acc_t>();
    const int64_t* as = assign.const_data_ptr<int64_t>();
    scalar_t* gf = grad_feats.mutable_data_ptr<scalar_t>();
    scalar_t* gcen = grad_centers.mutable_data_ptr<scalar_t>();
    // grad alpha / grad beta: per tile in double, then added in tile order (deterministic).
    const int64_t tiles = point_tiles(M, C).count;
    std::vector<double> tile_ga(B * tiles, 0.0), tile_gb(B * tiles, 0.0);
    const int64_t W = D + 1;  // per cluster: sum gc_i f_i / n_i (D values), then sum gc_i cos_i
    cluster_reduce<acc_t>(
        B, M, C, W, acc_options,
        [&](int64_t b, int64_t t, int64_t i0, int64_t i1, acc_t* part) {
          std::vector<acc_t> f_hat(D);
          double ga = 0.0, gb = 0.0;
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t p = b * M + i, j = as[p];
            scalar_t* gf_row = gf + p * D;
            if (!in_range(j, C)) {
              std::fill(gf_row, gf_row + D, scalar_t(0));
              continue;
            }
            const scalar_t* f_row = f + p * D;
            const acc_t* c_row = c_hat + (b * C + j) * D;
            const acc_t n_raw = norm2<acc_t>(f_row, D);
            const acc_t n = std::max(n_raw, eps);
            for (int64_t d = 0; d < D; ++d) {
              f_hat[d] = static_cast<acc_t>(f_row[d]) / n;
            }
            const acc_t cos = dot<acc_t>(f_hat.data(), c_row, D);
            acc_t gc = g[p];
            if (learnable) {
              const acc_t s = acc_t(1) / (acc_t(1) + std::exp(-(bias + a * cos)));
              const acc_t ds = s * (acc_t(1) - s);
              ga += static_cast<double>(g[p] * ds * cos);  // grad alpha += g s (1 - s) cos
              gb += static_cast<double>(g[p] * ds);        // grad beta  += g s (1 - s)
              gc = g[p] * a * ds;                          // gc = g alpha s (1 - s)
            }
            // grad f_i = gc_i / n_i * (c_a / m_a - [|f_i| >= eps] cos_i f_i / n_i)
            const acc_t coef = gc / n;
            const acc_t masked_cos = n_raw >= eps ? cos : acc_t(0);
            for (int64_t d = 0; d < D; ++d) {
              gf_row[d] = static_cast<scalar_t>(coef * (c_row[d] - masked_cos * f_hat[d]));
            }
            // cluster sums for grad c_j: gc_i f_i / n_i and gc_i cos_i
            acc_t* sum = part + j * W;
            for (int64_t d = 0; d < D; ++d) {
              sum[d] += gc * f_hat[d];
            }
            sum[D] += gc * cos;
          }
          tile_ga[b * tiles + t] = ga;
          tile_gb[b * tiles + t] = gb;
        },
        [&](int64_t b, int64_t j, const acc_t* sum) {
          // grad c_j = (S_j - [|c_j| >= eps] T_j c_j / m_j) / m_j
          const scalar_t* c_row = c + (b * C + j) * D;
          const acc_t* c_hat_row = c_hat + (b * C + j) * D;
          const acc_t m_raw = norm2<acc_t>(c_row, D);
          const acc_t m = std::max(m_raw, eps);
          const acc_t masked_T = m_raw >= eps ? sum[D] : acc_t(0);
          scalar_t* out = gcen + (b * C + j) * D;
          for (int64_t d = 0; d < D; ++d) {
            out[d] = static_cast<scalar_t>((sum[d] - masked_T * c_hat_row[d]) / m);
          }
        });
    if (learnable) {
      double ga = 0.0, gb = 0.0;
      for (int64_t t = 0; t < B * tiles; ++t) {
        ga += tile_ga[t];
        gb += tile_gb[t];
      }
      // The reference sums in acc_t, then casts to the parameter's dtype, in its shape.
      grad_alpha = at::full(alpha->sizes(), static_cast<double>(static_cast<acc_t>(ga)), alpha->options());
      grad_beta = at::full(beta->sizes(), static_cast<double>(static_cast<acc_t>(gb)), beta->options());
    }
  });
  return {grad_feats, grad_centers, grad_alpha, grad_beta};
}

}  // namespace cluster_cpu
}  // namespace sgg_kernels
