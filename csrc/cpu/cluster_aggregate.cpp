// CPU kernels of Eq. 3 (cluster_aggregate) and Eq. 9 (cluster_dispatch) of SIL, with backwards.
// Math and backward formulas: sgg_kernels/reference/cluster.py (the spec); registered in cluster.cpp.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cluster_common.h"

namespace sgg_kernels {
namespace cluster_cpu {

namespace {

void check_assignment(const char* op, const at::Tensor& assign, const at::Tensor& sim, int64_t B, int64_t M) {
  TORCH_CHECK(assign.scalar_type() == at::kLong && assign.dim() == 2 && assign.size(0) == B && assign.size(1) == M,
              op, ": assign must be int64 [B, M] = [", B, ", ", M, "], got ", assign.scalar_type(), " ",
              assign.sizes());
  TORCH_CHECK(sim.dim() == 2 && sim.size(0) == B && sim.size(1) == M, op, ": sim must be [B, M] = [", B, ", ", M,
              "], got ", sim.sizes());
}

}  // namespace

// Eq. 3 before H': den_j = 1 + sum_{i: a_i=j} s_i, out_j = (vc_j + sum_{i: a_i=j} s_i v_i) / den_j.
std::tuple<at::Tensor, at::Tensor> cluster_aggregate(const at::Tensor& values_in, const at::Tensor& assign_in,
                                                     const at::Tensor& sim_in, const at::Tensor& value_centers_in) {
  TORCH_CHECK(values_in.dim() == 3, "cluster_aggregate: values must be [B, M, D], got ", values_in.sizes());
  const int64_t B = values_in.size(0), M = values_in.size(1), D = values_in.size(2);
  TORCH_CHECK(value_centers_in.dim() == 3 && value_centers_in.size(0) == B && value_centers_in.size(2) == D,
              "cluster_aggregate: value_centers must be [B, C, D] with the B and D of values, got ",
              value_centers_in.sizes());
  check_assignment("cluster_aggregate", assign_in, sim_in, B, M);
  const int64_t C = value_centers_in.size(1);
  const at::ScalarType dtype = values_in.scalar_type();
  at::Tensor out = at::empty({B, C, D}, values_in.options());
  at::Tensor den = at::empty({B, C}, values_in.options());
  if (B * C == 0) {
    return {out, den};
  }
  const at::Tensor values = values_in.contiguous(), assign = assign_in.contiguous();
  const at::Tensor value_centers = contiguous_as(value_centers_in, dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "cluster_aggregate", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor sim = contiguous_as(sim_in, acc_dtype<scalar_t>());
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const scalar_t* vc = value_centers.const_data_ptr<scalar_t>();
    const acc_t* s = sim.const_data_ptr<acc_t>();
    const int64_t* as = assign.const_data_ptr<int64_t>();
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    scalar_t* den_p = den.mutable_data_ptr<scalar_t>();
    const int64_t W = D + 1;  // per cluster: sum s_i v_i (D values), then sum s_i
    cluster_reduce<acc_t>(
        B, M, C, W, values.options().dtype(acc_dtype<scalar_t>()),
        [&](int64_t b, int64_t, int64_t i0, int64_t i1, acc_t* part) {
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t p = b * M + i, j = as[p];
            if (!in_range(j, C)) {
              continue;  // belongs to no cluster
            }
            const acc_t w = s[p];
            const scalar_t* row = v + p * D;
            acc_t* sum = part + j * W;
            for (int64_t d = 0; d < D; ++d) {
              sum[d] += w * static_cast<acc_t>(row[d]);
            }
            sum[D] += w;
          }
        },
        [&](int64_t b, int64_t j, const acc_t* sum) {
          const int64_t r = b * C + j;
          const acc_t dj = acc_t(1) + sum[D];
          for (int64_t d = 0; d < D; ++d) {
            out_p[r * D + d] = static_cast<scalar_t>((static_cast<acc_t>(vc[r * D + d]) + sum[d]) / dj);
          }
          den_p[r] = static_cast<scalar_t>(dj);
        });
  });
  return {out, den};
}

// Backward of Eq. 3, G = grad_out, a = assign_i:
//   grad vc_j = G_j / den_j
//   grad v_i  = s_i G_a / den_a
//   grad s_i  = G_a . (v_i - out_a) / den_a
// A point with assign outside [0, C) gets zero gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_aggregate_backward(
    const at::Tensor& grad_out_in, const at::Tensor& values_in, const at::Tensor& assign_in, const at::Tensor& sim_in,
    const at::Tensor& out_in, const at::Tensor& den_in) {
  TORCH_CHECK(values_in.dim() == 3, "cluster_aggregate_backward: values must be [B, M, D], got ", values_in.sizes());
  const int64_t B = values_in.size(0), M = values_in.size(1), D = values_in.size(2);
  TORCH_CHECK(out_in.dim() == 3 && out_in.size(0) == B && out_in.size(2) == D && grad_out_in.sizes() == out_in.sizes(),
              "cluster_aggregate_backward: grad_out and out must be [B, C, D], got ", grad_out_in.sizes(), " and ",
              out_in.sizes());
  const int64_t C = out_in.size(1);
  TORCH_CHECK(den_in.dim() == 2 && den_in.size(0) == B && den_in.size(1) == C,
              "cluster_aggregate_backward: den must be [B, C], got ", den_in.sizes());
  check_assignment("cluster_aggregate_backward", assign_in, sim_in, B, M);
  const at::ScalarType dtype = values_in.scalar_type();
  at::Tensor grad_values = at::empty({B, M, D}, values_in.options());
  at::Tensor grad_sim, grad_value_centers;
  const at::Tensor values = values_in.contiguous(), assign = assign_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "cluster_aggregate_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::ScalarType acc = acc_dtype<scalar_t>();
    // G_j / den_j in acc_t: grad vc, and the rows every point of cluster j reads.
    const at::Tensor g_over_den = grad_out_in.to(acc).div(den_in.to(acc).unsqueeze(-1)).contiguous();
    grad_value_centers = g_over_den.to(out_in.scalar_type());
    const at::Tensor out = contiguous_as(out_in, acc);
    const at::Tensor sim = contiguous_as(sim_in, acc);
    at::Tensor grad_sim_acc = at::empty({B, M}, values.options().dtype(acc));
    const acc_t* god = g_over_den.const_data_ptr<acc_t>();
    const acc_t* o = out.const_data_ptr<acc_t>();
    const acc_t* s = sim.const_data_ptr<acc_t>();
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const int64_t* as = assign.const_data_ptr<int64_t>();
    scalar_t* gv = grad_values.mutable_data_ptr<scalar_t>();
    acc_t* gs = grad_sim_acc.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B * M, grain_for(2 * D), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t j = as[p];
        scalar_t* gv_row = gv + p * D;
        if (!in_range(j, C)) {
          std::fill(gv_row, gv_row + D, scalar_t(0));
          gs[p] = 0;
          continue;
        }
        const int64_t r = (p / M) * C + j;
        const acc_t* g_row = god + r * D;
        const acc_t* o_row = o + r * D;
        const scalar_t* v_row = v + p * D;
        const acc_t sp = s[p];
        for (int64_t d = 0; d < D; ++d) {
          gv_row[d] = static_cast<scalar_t>(sp * g_row[d]);  // grad v_i = s_i G_a / den_a
        }
        // grad s_i = G_a / den_a . (v_i - out_a)
        gs[p] = lane_sum<acc_t>(D, [&](int64_t d) { return g_row[d] * (static_cast<acc_t>(v_row[d]) - o_row[d]); });
      }
    });
    grad_sim = grad_sim_acc.to(sim_in.scalar_type());
  });
  return {grad_values, grad_sim, grad_value_centers};
}

// Eq. 9: out_i = r_i + s_i center_out_a (a = assign_i; r_i alone when a is outside [0, C)).
at::Tensor cluster_dispatch(const at::Tensor& center_out_in, const at::Tensor& assign_in, const at::Tensor& sim_in,
                            const std::optional<at::Tensor>& residual_in) {
  TORCH_CHECK(center_out_in.dim() == 3, "cluster_dispatch: center_out must be [B, C, D], got ",
              center_out_in.sizes());
  const int64_t B = center_out_in.size(0), C = center_out_in.size(1), D = center_out_in.size(2);
  TORCH_CHECK(assign_in.dim() == 2, "cluster_dispatch: assign must be [B, M], got ", assign_in.sizes());
  const int64_t M = assign_in.size(1);
  check_assignment("cluster_dispatch", assign_in, sim_in, B, M);
  const bool has_residual = residual_in.has_value();
  if (has_residual) {
    TORCH_CHECK(residual_in->dim() == 3 && residual_in->size(0) == B && residual_in->size(1) == M &&
                    residual_in->size(2) == D,
                "cluster_dispatch: residual must be [B, M, D] = [", B, ", ", M, ", ", D, "], got ",
                residual_in->sizes());
  }
  const at::ScalarType dtype = center_out_in.scalar_type();
  at::Tensor out = at::empty({B, M, D}, center_out_in.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor assign = assign_in.contiguous();
  const at::Tensor residual = has_residual ? contiguous_as(*residual_in, dtype) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "cluster_dispatch", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::ScalarType acc = acc_dtype<scalar_t>();
    const at::Tensor center_out = contiguous_as(center_out_in, acc);
    const at::Tensor sim = contiguous_as(sim_in, acc);
    const acc_t* co = center_out.const_data_ptr<acc_t>();
    const acc_t* s = sim.const_data_ptr<acc_t>();
    const int64_t* as = assign.const_data_ptr<int64_t>();
    const scalar_t* r = has_residual ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * M, grain_for(2 * D), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t j = as[p];
        scalar_t* o_row = o + p * D;
        const scalar_t* r_row = has_residual ? r + p * D : nullptr;
        if (!in_range(j, C)) {
          for (int64_t d = 0; d < D; ++d) {
            o_row[d] = has_residual ? r_row[d] : scalar_t(0);
          }
          continue;
        }
        const acc_t* c_row = co + ((p / M) * C + j) * D;
        const acc_t sp = s[p];
        if (has_residual) {
          for (int64_t d = 0; d < D; ++d) {
            o_row[d] = static_cast<scalar_t>(sp * c_row[d] + static_cast<acc_t>(r_row[d]));
          }
        } else {
          for (int64_t d = 0; d < D; ++d) {
            o_row[d] = static_cast<scalar_t>(sp * c_row[d]);
          }
        }
      }
    });
  });
  return out;
}

// Backward of Eq. 9, G = grad_out, a = assign_i:
//   grad center_out_j = sum_{i: a_i=j} s_i G_i,   grad s_i = G_i . center_out_a,   grad r_i = G_i
// A point with assign outside [0, C) gets grad s_i = 0 and adds nothing to any center.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_dispatch_backward(
    const at::Tensor& grad_out_in, const at::Tensor& center_out_in, const at::Tensor& assign_in,
    const at::Tensor& sim_in, bool has_residual) {
  TORCH_CHECK(center_out_in.dim() == 3, "cluster_dispatch_backward: center_out must be [B, C, D], got ",
              center_out_in.sizes());
  const int64_t B = center_out_in.size(0), C = center_out_in.size(1), D = center_out_in.size(2);
  TORCH_CHECK(assign_in.dim() == 2, "cluster_dispatch_backward: assign must be [B, M], got ", assign_in.sizes());
  const int64_t M = assign_in.size(1);
  check_assignment("cluster_dispatch_backward", assign_in, sim_in, B, M);
  TORCH_CHECK(grad_out_in.dim() == 3 && grad_out_in.size(0) == B && grad_out_in.size(1) == M &&
                  grad_out_in.size(2) == D,
              "cluster_dispatch_backward: grad_out must be [B, M, D] = [", B, ", ", M, ", ", D, "], got ",
              grad_out_in.sizes());
  const at::ScalarType dtype = center_out_in.scalar_type();
  at::Tensor grad_center_out = at::empty({B, C, D}, center_out_in.options());
  at::Tensor grad_sim;
  at::Tensor grad_residual = has_residual ? grad_out_in.clone() : at::Tensor();  // grad r_i = G_i
  const at::Tensor assign = assign_in.contiguous();
  const at::Tensor grad_out = contiguous_as(grad_out_in, dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "cluster_dispatch_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::ScalarType acc = acc_dtype<scalar_t>();
    const at::Tensor center_out = contiguous_as(center_out_in, acc);
    const at::Tensor sim = contiguous_as(sim_in, acc);
    at::Tensor grad_sim_acc = at::empty({B, M}, center_out.options());
    const acc_t* co = center_out.const_data_ptr<acc_t>();
    const acc_t* s = sim.const_data_ptr<acc_t>();
    const int64_t* as = assign.const_data_ptr<int64_t>();
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    acc_t* gs = grad_sim_acc.mutable_data_ptr<acc_t>();
    scalar_t* gco = grad_center_out.mutable_data_ptr<scalar_t>();
    cluster_reduce<acc_t>(
        B, M, C, D, center_out.options(),
        [&](int64_t b, int64_t, int64_t i0, int64_t i1, acc_t* part) {
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t p = b * M + i, j = as[p];
            if (!in_range(j, C)) {
              gs[p] = 0;
              continue;
            }
            const scalar_t* g_row = g + p * D;
            gs[p] = dot<acc_t>(g_row, co + (b * C + j) * D, D);  // grad s_i = G_i . center_out_a
            const acc_t sp = s[p];
            acc_t* sum = part + j * D;
            for (int64_t d = 0; d < D; ++d) {
              sum[d] += sp * static_cast<acc_t>(g_row[d]);  // grad center_out_j += s_i G_i
            }
          }
        },
        [&](int64_t b, int64_t j, const acc_t* sum) {
          scalar_t* out = gco + (b * C + j) * D;
          for (int64_t d = 0; d < D; ++d) {
            out[d] = static_cast<scalar_t>(sum[d]);
          }
        });
    grad_sim = grad_sim_acc.to(sim_in.scalar_type());
  });
  return {grad_center_out, grad_sim, grad_residual};
}

}  // namespace cluster_cpu
}  // namespace sgg_kernels
