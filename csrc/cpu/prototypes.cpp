// CPU kernels of family prototypes (RDE, Sec. 3.3, Eq. 4):
//   _prototype_distance           cos[n, q] = <x_n, p_q> / (max(|x_n|, eps) max(|p_q|, eps)),
//                                 dist[n, q] = sqrt(max(||x_n - p_q||^2, eps)), eps = 1e-12
//   _prototype_distance_backward  their gradients w.r.t. x and protos
// Math and every backward formula: sgg_kernels/reference/prototypes.py (the spec, module docstring).
//
// Work:
//   forward    at::parallel_for over blocks of kRows rows of x; each block runs over the Q
//              prototypes once, computing <x_n, p_q> and ||x_n - p_q||^2 together from direct
//              differences (one pass over D, 8 lanes per row, kRows rows sharing each load of
//              p_q). Nothing of size [N, Q, D] exists.
//   backward   pass 1, parallel over the same row blocks: cos and s = ||x - p||^2 recomputed as in
//              the forward; K[n, q] = G / (a_n b_q) - W ([N, Q], the size of the outputs), r_n,
//              and the per-(n, q) terms of c_q (summed over n in ascending order).
//              pass 2: grad x = K @ P + r x and grad P = K^T @ x + c P as ATen GEMMs (BLAS), in
//              fixed column chunks, one single-threaded GEMM per chunk.
//
// Determinism: no atomics; every hand-written sum runs in a fixed order that depends on the shapes
// only, and a row's arithmetic is the same whichever block (or thread) it lands in; the backward's
// GEMMs run one per fixed column chunk, single-threaded inside at::parallel_for, so no reduction is
// split by thread count (the tests check 1 vs 2 threads bitwise). Numerics: half/bfloat16 accumulate in float32, float64 in float64; the
// mask [s >= eps] reads s from direct differences, so x_n = p_q gives dist = 1e-6 and zero
// gradient through dist.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cluster_common.h"

namespace sgg_kernels {
namespace prototypes_cpu {

using cluster_cpu::acc_dtype;
using cluster_cpu::acc_type;
using cluster_cpu::grain_for;

namespace {

constexpr double kEps = 1e-12;    // F.normalize's eps for the norms, and the floor of ||x - p||^2
constexpr int kRows = 4;          // rows of x per block: they share each load of a prototype
constexpr int kLanes = 8;         // independent partial sums per row (vectorisable, no -ffast-math)
constexpr int64_t kChunkD = 128;  // columns per task of the backward's GEMMs

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& protos) {
  TORCH_CHECK(x.device().is_cpu() && protos.device().is_cpu(), op, ": x and protos must be CPU tensors, got ",
              x.device(), " and ", protos.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must have shape [N, D], got ", x.sizes());
  TORCH_CHECK(protos.dim() == 2 && protos.size(1) == x.size(1), op, ": protos must have shape [Q, D] with the D of x ",
              x.sizes(), ", got ", protos.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be float32, float64, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(protos.scalar_type() == x.scalar_type(), op, ": x is ", x.scalar_type(), " but protos is ",
              protos.scalar_type(), "; pass one dtype");
}

// For R rows x[0..R) and one prototype p (all acc_t, D contiguous values each):
//   dot[r] = <x_r, p>,  sq[r] = ||x_r - p||^2 = sum_d (x_rd - p_d)^2
// in kLanes interleaved partial sums per row, combined in a fixed order. Row r's arithmetic does
// not depend on R or on the other rows (determinism across blockings).
template <typename acc_t, int R>
inline void dot_and_sq(const acc_t* const* x, const acc_t* p, int64_t D, acc_t* dot, acc_t* sq) {
  acc_t ld[R][kLanes] = {}, ls[R][kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int r = 0; r < R; ++r) {
      for (int l = 0; l < kLanes; ++l) {
        const acc_t xv = x[r][d + l], pv = p[d + l];
        ld[r][l] += xv * pv;
        const acc_t diff = xv - pv;
        ls[r][l] += diff * diff;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    acc_t td = 0, ts = 0;
    for (int64_t e = d; e < D; ++e) {
      const acc_t xv = x[r][e], pv = p[e];
      td += xv * pv;
      const acc_t diff = xv - pv;
      ts += diff * diff;
    }
    const acc_t* a = ld[r];
    const acc_t* s = ls[r];
    dot[r] = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])) + td;
    sq[r] = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + ts;
  }
}

// dot and sq of the block's `rows` rows (1..kRows) against prototype p.
template <typename acc_t>
inline void block_dot_and_sq(const acc_t* const* x, int rows, const acc_t* p, int64_t D, acc_t* dot, acc_t* sq) {
  if (rows == kRows) {
    dot_and_sq<acc_t, kRows>(x, p, D, dot, sq);
    return;
  }
  for (int r = 0; r < rows; ++r) {
    dot_and_sq<acc_t, 1>(x + r, p, D, dot + r, sq + r);
  }
}

// |v| = sqrt(<v, v>) with the same lane structure as the distances.
template <typename acc_t>
inline acc_t row_norm(const acc_t* v, int64_t D) {
  acc_t dot, sq;
  const acc_t* rows[1] = {v};
  dot_and_sq<acc_t, 1>(rows, v, D, &dot, &sq);
  return std::sqrt(dot);
}

// The rows of x as acc_t pointers, block by block: float32/float64 point into x itself; half and
// bfloat16 rows are converted into a per-thread buffer.
template <typename scalar_t>
struct RowBlock {
  using acc_t = acc_type<scalar_t>;
  static constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const scalar_t* x;
  int64_t N, D;
  std::vector<acc_t> buf;
  const acc_t* ptr[kRows];
  int rows = 0;

  RowBlock(const scalar_t* x_, int64_t N_, int64_t D_) : x(x_), N(N_), D(D_), buf(kConvert ? kRows * D_ : 0) {}

  // Load block `blk` (rows [blk * kRows, ...)); returns the first row index.
  int64_t load(int64_t blk) {
    const int64_t n0 = blk * kRows;
    rows = static_cast<int>(std::min<int64_t>(kRows, N - n0));
    for (int r = 0; r < rows; ++r) {
      const scalar_t* src = x + (n0 + r) * D;
      if constexpr (kConvert) {
        acc_t* dst = buf.data() + r * D;
        for (int64_t d = 0; d < D; ++d) {
          dst[d] = static_cast<acc_t>(src[d]);
        }
        ptr[r] = dst;
      } else {
        ptr[r] = src;
      }
    }
    return n0;
  }
};

// protos as a contiguous acc_t [Q, D] tensor (no copy for float32/float64) and their raw norms |p_q|.
template <typename scalar_t>
std::tuple<at::Tensor, std::vector<acc_type<scalar_t>>> protos_acc(const at::Tensor& protos) {
  using acc_t = acc_type<scalar_t>;
  const at::Tensor p = protos.to(acc_dtype<scalar_t>()).contiguous();
  const int64_t Q = p.size(0), D = p.size(1);
  const acc_t* pp = p.const_data_ptr<acc_t>();
  std::vector<acc_t> norm(Q);
  at::parallel_for(0, Q, grain_for(D), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      norm[q] = row_norm(pp + q * D, D);
    }
  });
  return {p, norm};
}

}  // namespace

// Eq. 4, both terms for every (n, q): cos = <x_n, p_q> / (a_n b_q), dist = sqrt(max(s, eps)).
std::tuple<at::Tensor, at::Tensor> prototype_distance(const at::Tensor& x_in, const at::Tensor& protos_in) {
  check_inputs("prototype_distance", x_in, protos_in);
  const int64_t N = x_in.size(0), Q = protos_in.size(0), D = x_in.size(1);
  at::Tensor cos = at::empty({N, Q}, x_in.options());
  at::Tensor dist = at::empty({N, Q}, x_in.options());
  if (N == 0 || Q == 0) {
    return {cos, dist};
  }
  const at::Tensor x = x_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "prototype_distance", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t eps = static_cast<acc_t>(kEps);
    at::Tensor p_t;  // (no structured binding: a C++17 lambda cannot capture one)
    std::vector<acc_t> p_norm;
    std::tie(p_t, p_norm) = protos_acc<scalar_t>(protos_in);
    const acc_t* p = p_t.const_data_ptr<acc_t>();
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    scalar_t* cos_out = cos.mutable_data_ptr<scalar_t>();
    scalar_t* dist_out = dist.mutable_data_ptr<scalar_t>();
    const int64_t blocks = (N + kRows - 1) / kRows;
    at::parallel_for(0, blocks, grain_for(kRows * Q * D), [&](int64_t begin, int64_t end) {
      RowBlock<scalar_t> block(xs, N, D);
      acc_t dot[kRows], sq[kRows], a[kRows];
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t n0 = block.load(blk);
        for (int r = 0; r < block.rows; ++r) {
          a[r] = std::max(row_norm(block.ptr[r], D), eps);  // a_n = max(|x_n|, eps)
        }
        for (int64_t q = 0; q < Q; ++q) {
          block_dot_and_sq(block.ptr, block.rows, p + q * D, D, dot, sq);
          const acc_t b = std::max(p_norm[q], eps);  // b_q = max(|p_q|, eps)
          for (int r = 0; r < block.rows; ++r) {
            const int64_t o = (n0 + r) * Q + q;
            cos_out[o] = static_cast<scalar_t>(dot[r] / (a[r] * b));            // Eq. 4: L2(x) . L2(P)
            dist_out[o] = static_cast<scalar_t>(std::sqrt(std::max(sq[r], eps)));  // Eq. 4: ||x - P||_2
          }
        }
      }
    });
  });
  return {cos, dist};
}

// Backward of Eq. 4 (reference module docstring), G = grad_cos, H = grad_dist:
//   W[n, q] = H [s >= eps] / dist,   K[n, q] = G / (a_n b_q) - W
//   r_n = sum_q W - [|x_n| >= eps] sum_q G cos / a_n^2,  c_q = sum_n W - [|p_q| >= eps] sum_n G cos / b_q^2
//   grad x = K @ P + r x,   grad P = K^T @ x + c P
// A gradient not needed comes back as an empty [0] tensor.
std::tuple<at::Tensor, at::Tensor> prototype_distance_backward(const at::Tensor& grad_cos_in,
                                                               const at::Tensor& grad_dist_in, const at::Tensor& x_in,
                                                               const at::Tensor& protos_in, bool need_x,
                                                               bool need_protos) {
  check_inputs("prototype_distance_backward", x_in, protos_in);
  const int64_t N = x_in.size(0), Q = protos_in.size(0), D = x_in.size(1);
  for (const at::Tensor* g : {&grad_cos_in, &grad_dist_in}) {
    TORCH_CHECK(g->dim() == 2 && g->size(0) == N && g->size(1) == Q,
                "prototype_distance_backward: grad_cos and grad_dist must have shape [N, Q] = [", N, ", ", Q,
                "], got ", g->sizes());
  }
  at::Tensor grad_x = need_x ? at::empty({N, D}, x_in.options()) : at::empty({0}, x_in.options());
  at::Tensor grad_p = need_protos ? at::empty({Q, D}, protos_in.options()) : at::empty({0}, protos_in.options());
  if (N == 0 || Q == 0) {  // no pair: both gradients are 0
    grad_x.zero_();
    grad_p.zero_();
    return {grad_x, grad_p};
  }
  if (!need_x && !need_protos) {
    return {grad_x, grad_p};
  }
  const at::Tensor x = x_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "prototype_distance_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t eps = static_cast<acc_t>(kEps);
    const at::TensorOptions acc_options = x.options().dtype(acc_dtype<scalar_t>());
    at::Tensor p_t;  // (no structured binding: a C++17 lambda cannot capture one)
    std::vector<acc_t> p_norm;
    std::tie(p_t, p_norm) = protos_acc<scalar_t>(protos_in);
    const acc_t* p = p_t.const_data_ptr<acc_t>();
    const at::Tensor G_t = cluster_cpu::contiguous_as(grad_cos_in, acc_dtype<scalar_t>());
    const at::Tensor H_t = cluster_cpu::contiguous_as(grad_dist_in, acc_dtype<scalar_t>());
    const acc_t* G = G_t.const_data_ptr<acc_t>();
    const acc_t* H = H_t.const_data_ptr<acc_t>();
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    // K [N, Q] (both gradients are GEMMs of it), r [N] and the per-(n, q) terms of c_q.
    at::Tensor K_t = at::empty({N, Q}, acc_options);
    at::Tensor r_t = at::empty({N, 1}, acc_options);
    at::Tensor C_t = need_protos ? at::empty({N, Q}, acc_options) : at::Tensor();
    acc_t* Kmat = K_t.mutable_data_ptr<acc_t>();
    acc_t* rvec = r_t.mutable_data_ptr<acc_t>();
    acc_t* Cmat = need_protos ? C_t.mutable_data_ptr<acc_t>() : nullptr;

    // Pass 1: per row block, cos and s recomputed by direct differences, then K, r and C.
    const int64_t blocks = (N + kRows - 1) / kRows;
    at::parallel_for(0, blocks, grain_for(kRows * Q * D), [&](int64_t begin, int64_t end) {
      RowBlock<scalar_t> block(xs, N, D);
      acc_t dot[kRows], sq[kRows], a[kRows], x_norm[kRows], w_sum[kRows], gcos_sum[kRows];
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t n0 = block.load(blk);
        for (int r = 0; r < block.rows; ++r) {
          x_norm[r] = row_norm(block.ptr[r], D);
          a[r] = std::max(x_norm[r], eps);
          w_sum[r] = gcos_sum[r] = acc_t(0);
        }
        for (int64_t q = 0; q < Q; ++q) {
          block_dot_and_sq(block.ptr, block.rows, p + q * D, D, dot, sq);
          const acc_t b = std::max(p_norm[q], eps);
          const bool p_mask = p_norm[q] >= eps;
          for (int r = 0; r < block.rows; ++r) {
            const int64_t o = (n0 + r) * Q + q;
            const acc_t ab = a[r] * b;
            const acc_t cos = dot[r] / ab;
            const acc_t dist = std::sqrt(std::max(sq[r], eps));
            const acc_t w = sq[r] >= eps ? H[o] / dist : acc_t(0);  // W = H [s >= eps] / dist
            const acc_t gcos = G[o] * cos;
            Kmat[o] = G[o] / ab - w;  // K = G / (a b) - W
            w_sum[r] += w;
            gcos_sum[r] += gcos;
            if (Cmat != nullptr) {
              Cmat[o] = p_mask ? w - gcos / (b * b) : w;  // the (n, q) term of c_q
            }
          }
        }
        for (int r = 0; r < block.rows; ++r) {  // r_n = sum_q W - [|x_n| >= eps] sum_q G cos / a_n^2
          rvec[n0 + r] = x_norm[r] >= eps ? w_sum[r] - gcos_sum[r] / (a[r] * a[r]) : w_sum[r];
        }
      }
    });
    // Pass 2: both gradients as ATen GEMMs over the [N, Q] matrix K, in fixed chunks of kChunkD
    // columns run by at::parallel_for: BLAS then runs single-threaded inside each task and never
    // splits a reduction (over Q for grad x, over N for grad P), so the bits do not depend on the
    // thread count.
    // (detached: ATen's out= GEMMs refuse inputs that require grad, as the op's inputs may)
    const at::Tensor x_acc = x.detach().to(acc_dtype<scalar_t>());
    at::Tensor c_t;
    if (need_protos) {  // c_q = sum_n C[n, q], in ascending n
      c_t = at::zeros({Q, 1}, acc_options);
      acc_t* c = c_t.mutable_data_ptr<acc_t>();
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t q = 0; q < Q; ++q) {
          c[q] += Cmat[n * Q + q];
        }
      }
    }
    // float32 / float64: the GEMMs write the gradients in place; half / bfloat16: acc_t buffers
    constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
    at::Tensor gx = !need_x ? at::Tensor() : (kSame ? grad_x : at::empty({N, D}, acc_options));
    at::Tensor gp = !need_protos ? at::Tensor() : (kSame ? grad_p : at::empty({Q, D}, acc_options));
    const at::Tensor Kt = K_t.t();
    const at::Tensor P_acc = p_t.detach();
    const int64_t chunks = (D + kChunkD - 1) / kChunkD;
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t d0 = chunk * kChunkD, len = std::min(kChunkD, D - d0);
        if (need_x) {  // grad x = K @ P + r x
          at::Tensor o = gx.narrow(1, d0, len);
          at::mm_out(o, K_t, P_acc.narrow(1, d0, len));
          o.addcmul_(r_t, x_acc.narrow(1, d0, len));
        }
        if (need_protos) {  // grad P = K^T @ x + c P
          at::Tensor o = gp.narrow(1, d0, len);
          at::mm_out(o, Kt, x_acc.narrow(1, d0, len));
          o.addcmul_(c_t, P_acc.narrow(1, d0, len));
        }
      }
    });
    if constexpr (!kSame) {
      if (need_x) grad_x.copy_(gx);
      if (need_protos) grad_p.copy_(gp);
    }
  });
  return {grad_x, grad_p};
}

}  // namespace prototypes_cpu

TORCH_LIBRARY_IMPL(sgg_kernels, CPU, m) {
  m.impl("_prototype_distance", &prototypes_cpu::prototype_distance);
  m.impl("_prototype_distance_backward", &prototypes_cpu::prototype_distance_backward);
}

}  // namespace sgg_kernels
