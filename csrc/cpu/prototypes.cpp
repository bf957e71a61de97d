// CPU kernels of family prototypes (RDE, Sec. 3.3, Eq. 4):
//   _prototype_distance           cos[n, q] = <x_n, p_q> / (max(|x_n|, eps) max(|p_q|, eps)),
//                                 dist[n, q] = sqrt(max(||x_n - p_q||^2, eps)), eps = 1e-12
//   _prototype_distance_backward  their gradients w.r.t. x and protos
// Math and every backward formula: sgg_kernels/reference/prototypes.py (the spec, module docstring).
//
// Formulation (GEMM): dot = x @ P^T by ATen GEMMs (BLAS) in acc_t, nx2[n] = |x_n|^2, np2[q] =
// |p_q|^2, s = nx2 + np2 - 2 dot. Where that cancels, s < kRecomputeTau (nx2 + np2) (and where
// nx2 + np2 = 0, or s is not finite), s is recomputed for the pair by direct differences
// sum_d (x_nd - p_qd)^2, so x_n = p_q exactly always gives s = 0: dist = 1e-6 and W = 0.
//
// Work:
//   forward    at::parallel_for over fixed chunks of kRowChunk rows of x; per chunk one
//              single-threaded GEMM dot[chunk, Q] = x_chunk @ P^T (written straight into cos for
//              float32/float64), then the epilogue: nx2, s (+ the recomputes), cos, dist written in
//              scalar_t. Half/bfloat16: the chunk of x (and protos, once) converted to float32 first.
//              Nothing of size [N, Q, D] exists.
//   backward   pass 1, over the same row chunks: dot by GEMM and s as in the forward (same
//              recomputes); K[n, q] = G / (a_n b_q) - W ([N, Q], the size of the outputs), r_n,
//              and the per-(n, q) terms of c_q (summed over n in ascending order).
//              pass 2: grad x = K @ P + r x and grad P = K^T @ x + c P as ATen GEMMs, in fixed
//              column chunks, one single-threaded GEMM per chunk.
//   floor      forward reads x once (N D) and protos once (Q D), writes 2 N Q; its GEMM is
//              2 N Q D FLOPs. backward: 3 GEMMs (dot, K @ P, K^T @ x) = 6 N Q D FLOPs.
//
// Determinism: no atomics; chunks depend on the shapes only, every hand-written sum runs in a
// fixed order, and every GEMM runs single-threaded inside an at::parallel_for task (at least two
// tasks are launched, so BLAS always runs in a parallel region even for one chunk) and never has
// a reduction split by thread count (the tests check 1 vs 2 threads bitwise). Numerics: half/
// bfloat16 accumulate in float32, float64 in float64.
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

constexpr double kEps = 1e-12;  // F.normalize's eps for the norms, and the floor of ||x - p||^2
// Recompute threshold: the relative error of the GEMM's dot in float32, ~u sqrt(D), is amplified
// by (nx2 + np2) / s in s = nx2 + np2 - 2 dot; below 1/64 the pair is recomputed by direct
// differences, so dist's relative error stays below ~64 u sqrt(D) / 2. The Triton backend uses
// the same constant (sgg_kernels/triton/prototypes.py, _TAU).
constexpr double kRecomputeTau = 1.0 / 64;
constexpr int kLanes = 8;             // independent partial sums (vectorisable, no -ffast-math)
constexpr int64_t kRowChunk = 64;     // rows of x per task (one GEMM each); a constant: determinism
constexpr int64_t kChunkD = 128;      // columns per task of the backward's pass-2 GEMMs

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

// Runs task(t) for t in [0, tasks) under at::parallel_for, at least two iterations launched (the
// extra ones empty): with more than one thread every task then runs inside a parallel region, where
// ATen's BLAS is single-threaded, so a GEMM's bits never depend on the thread count.
template <typename Task>
void run_tasks(int64_t tasks, const Task& task) {
  at::parallel_for(0, std::max<int64_t>(tasks, 2), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < std::min(end, tasks); ++t) {
      task(t);
    }
  });
}

// The direct sum s = ||x - p||^2 = sum_d (x_d - p_d)^2 (acc_t, D contiguous values each), in
// kLanes interleaved partial sums combined in a fixed order.
template <typename acc_t>
inline acc_t direct_sq(const acc_t* x, const acc_t* p, int64_t D) {
  acc_t ls[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t diff = x[d + l] - p[d + l];
      ls[l] += diff * diff;
    }
  }
  acc_t ts = 0;
  for (; d < D; ++d) {
    const acc_t diff = x[d] - p[d];
    ts += diff * diff;
  }
  return ((ls[0] + ls[4]) + (ls[1] + ls[5])) + ((ls[2] + ls[6]) + (ls[3] + ls[7])) + ts;
}

// s = ||x_n - p_q||^2 from the GEMM's dot and the squared norms, recomputed by direct differences
// where it cancels (s < kRecomputeTau (nx2 + np2)), where nx2 + np2 = 0 and where it is not finite
// (overflow, inf or NaN inputs: the direct sum then gives the reference's value).
template <typename acc_t>
inline acc_t pair_sq(acc_t nx2, acc_t np2, acc_t dot, const acc_t* x, const acc_t* p, int64_t D) {
  const acc_t sum = nx2 + np2;
  const acc_t s = sum - acc_t(2) * dot;
  if (s >= static_cast<acc_t>(kRecomputeTau) * sum && sum > acc_t(0) && !std::isinf(s)) {
    return s;  // s >= tau sum > 0: no clamp at 0 needed
  }
  return direct_sq(x, p, D);
}

// |v|^2 in acc_t (lane sums of cluster_common.h).
template <typename acc_t>
inline acc_t sq_norm(const acc_t* v, int64_t D) {
  return cluster_cpu::dot<acc_t>(v, v, D);
}

// protos as a contiguous, detached acc_t [Q, D] tensor (no copy for float32/float64) and their
// squared norms |p_q|^2.
template <typename scalar_t>
std::tuple<at::Tensor, std::vector<acc_type<scalar_t>>> protos_acc(const at::Tensor& protos) {
  using acc_t = acc_type<scalar_t>;
  const at::Tensor p = protos.detach().to(acc_dtype<scalar_t>()).contiguous();
  const int64_t Q = p.size(0), D = p.size(1);
  const acc_t* pp = p.const_data_ptr<acc_t>();
  std::vector<acc_t> np2(Q);
  at::parallel_for(0, Q, grain_for(D), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      np2[q] = sq_norm(pp + q * D, D);
    }
  });
  return {p, np2};
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
  // (detached: ATen's out= GEMMs refuse inputs that require grad, as the op's inputs may)
  const at::Tensor x = x_in.detach().contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "prototype_distance", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
    const acc_t eps = static_cast<acc_t>(kEps);
    const at::TensorOptions acc_options = x.options().dtype(acc_dtype<scalar_t>());
    at::Tensor p_t;  // (no structured binding: a C++17 lambda cannot capture one)
    std::vector<acc_t> np2;
    std::tie(p_t, np2) = protos_acc<scalar_t>(protos_in);
    const at::Tensor pT = p_t.t();
    const acc_t* p = p_t.const_data_ptr<acc_t>();
    std::vector<acc_t> b(Q);
    for (int64_t q = 0; q < Q; ++q) {
      b[q] = std::max(std::sqrt(np2[q]), eps);  // b_q = max(|p_q|, eps)
    }
    scalar_t* cos_out = cos.mutable_data_ptr<scalar_t>();
    scalar_t* dist_out = dist.mutable_data_ptr<scalar_t>();
    const int64_t chunks = (N + kRowChunk - 1) / kRowChunk;
    run_tasks(chunks, [&](int64_t chunk) {
      const int64_t n0 = chunk * kRowChunk, rows = std::min(kRowChunk, N - n0);
      // float32/float64: the GEMM reads x in place and writes dot into cos (overwritten below);
      // half/bfloat16: the chunk of x converted to float32, dot in a float32 buffer.
      at::Tensor xa, dot_t;
      if constexpr (kSame) {
        xa = x.narrow(0, n0, rows);
        dot_t = cos.narrow(0, n0, rows);
      } else {
        xa = x.narrow(0, n0, rows).to(acc_dtype<scalar_t>());
        dot_t = at::empty({rows, Q}, acc_options);
      }
      at::mm_out(dot_t, xa, pT);  // dot = x_chunk @ P^T
      const acc_t* xrows = xa.const_data_ptr<acc_t>();
      const acc_t* dot = dot_t.const_data_ptr<acc_t>();
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t* xr = xrows + r * D;
        const acc_t nx2 = sq_norm(xr, D);
        const acc_t a = std::max(std::sqrt(nx2), eps);  // a_n = max(|x_n|, eps)
        for (int64_t q = 0; q < Q; ++q) {
          const int64_t o = (n0 + r) * Q + q;
          const acc_t d = dot[r * Q + q];  // (read before cos_out[o], which it may alias, is written)
          const acc_t s = pair_sq(nx2, np2[q], d, xr, p + q * D, D);
          cos_out[o] = static_cast<scalar_t>(d / (a * b[q]));                // Eq. 4: L2(x) . L2(P)
          dist_out[o] = static_cast<scalar_t>(std::sqrt(std::max(s, eps)));  // Eq. 4: ||x - P||_2
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
  // (detached: ATen's out= GEMMs refuse inputs that require grad, as the op's inputs may)
  const at::Tensor x = x_in.detach().contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "prototype_distance_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
    const acc_t eps = static_cast<acc_t>(kEps);
    const at::TensorOptions acc_options = x.options().dtype(acc_dtype<scalar_t>());
    at::Tensor p_t;  // (no structured binding: a C++17 lambda cannot capture one)
    std::vector<acc_t> np2;
    std::tie(p_t, np2) = protos_acc<scalar_t>(protos_in);
    const at::Tensor pT = p_t.t();
    const acc_t* p = p_t.const_data_ptr<acc_t>();
    std::vector<acc_t> p_norm(Q);
    for (int64_t q = 0; q < Q; ++q) {
      p_norm[q] = std::sqrt(np2[q]);
    }
    const at::Tensor G_t = cluster_cpu::contiguous_as(grad_cos_in.detach(), acc_dtype<scalar_t>());
    const at::Tensor H_t = cluster_cpu::contiguous_as(grad_dist_in.detach(), acc_dtype<scalar_t>());
    const acc_t* G = G_t.const_data_ptr<acc_t>();
    const acc_t* H = H_t.const_data_ptr<acc_t>();
    const at::Tensor x_acc = x.to(acc_dtype<scalar_t>());  // (no copy for float32/float64)
    const acc_t* xa = x_acc.const_data_ptr<acc_t>();
    // K [N, Q] (both gradients are GEMMs of it), r [N] and the per-(n, q) terms of c_q.
    at::Tensor K_t = at::empty({N, Q}, acc_options);
    at::Tensor r_t = at::empty({N, 1}, acc_options);
    at::Tensor C_t = need_protos ? at::empty({N, Q}, acc_options) : at::Tensor();
    acc_t* Kmat = K_t.mutable_data_ptr<acc_t>();
    acc_t* rvec = r_t.mutable_data_ptr<acc_t>();
    acc_t* Cmat = need_protos ? C_t.mutable_data_ptr<acc_t>() : nullptr;

    // Pass 1, per row chunk: dot = x_chunk @ P^T by GEMM (written into K, overwritten below), s
    // with the forward's recomputes, then K, r and C.
    const int64_t row_chunks = (N + kRowChunk - 1) / kRowChunk;
    run_tasks(row_chunks, [&](int64_t chunk) {
      const int64_t n0 = chunk * kRowChunk, rows = std::min(kRowChunk, N - n0);
      at::Tensor dot_t = K_t.narrow(0, n0, rows);
      at::mm_out(dot_t, x_acc.narrow(0, n0, rows), pT);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = n0 + r;
        const acc_t* xr = xa + n * D;
        const acc_t nx2 = sq_norm(xr, D);
        const acc_t x_norm = std::sqrt(nx2);
        const acc_t a = std::max(x_norm, eps);
        acc_t w_sum = 0, gcos_sum = 0;
        for (int64_t q = 0; q < Q; ++q) {
          const int64_t o = n * Q + q;
          const acc_t d = Kmat[o];  // dot, before K overwrites it
          const acc_t s = pair_sq(nx2, np2[q], d, xr, p + q * D, D);
          const acc_t b = std::max(p_norm[q], eps);
          const acc_t ab = a * b;
          const acc_t cos = d / ab;
          const acc_t dist = std::sqrt(std::max(s, eps));
          const acc_t w = s >= eps ? H[o] / dist : acc_t(0);  // W = H [s >= eps] / dist
          const acc_t gcos = G[o] * cos;
          Kmat[o] = G[o] / ab - w;  // K = G / (a b) - W
          w_sum += w;
          gcos_sum += gcos;
          if (Cmat != nullptr) {
            Cmat[o] = p_norm[q] >= eps ? w - gcos / (b * b) : w;  // the (n, q) term of c_q
          }
        }
        // r_n = sum_q W - [|x_n| >= eps] sum_q G cos / a_n^2
        rvec[n] = x_norm >= eps ? w_sum - gcos_sum / (a * a) : w_sum;
      }
    });
    // Pass 2: both gradients as ATen GEMMs over the [N, Q] matrix K, in fixed chunks of kChunkD
    // columns (one single-threaded GEMM per chunk and task: no reduction, over Q for grad x or
    // over N for grad P, is split by thread count).
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
    at::Tensor gx = !need_x ? at::Tensor() : (kSame ? grad_x : at::empty({N, D}, acc_options));
    at::Tensor gp = !need_protos ? at::Tensor() : (kSame ? grad_p : at::empty({Q, D}, acc_options));
    const at::Tensor Kt = K_t.t();
    const int64_t col_chunks = (D + kChunkD - 1) / kChunkD;
    run_tasks(col_chunks, [&](int64_t chunk) {
      const int64_t d0 = chunk * kChunkD, len = std::min(kChunkD, D - d0);
      if (need_x) {  // grad x = K @ P + r x
        at::Tensor o = gx.narrow(1, d0, len);
        at::mm_out(o, K_t, p_t.narrow(1, d0, len));
        o.addcmul_(r_t, x_acc.narrow(1, d0, len));
      }
      if (need_protos) {  // grad P = K^T @ x + c P
        at::Tensor o = gp.narrow(1, d0, len);
        at::mm_out(o, Kt, x_acc.narrow(1, d0, len));
        o.addcmul_(c_t, p_t.narrow(1, d0, len));
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
