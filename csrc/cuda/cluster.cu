// CUDA kernels of the cluster family (SIL, MM'23, Sec. 3.2), Eq. 1 only:
//   _knn_index            KNN(T_j): the k points nearest to each center, nearest first
//   _gather_mean          Eq. 1: F^c_j = 1/n_k sum_{Q_i in KNN(T_j)} F_i
//   _gather_mean_backward grad feats[b,m] = sum_{(c,t): index[b,c,t]=m} G[b,c] / k
// The math (and the spec every backend matches) is sgg_kernels/reference/cluster.py.
// Eq. 2, 3 and 9 run in Triton on CUDA (sgg_kernels/triton/cluster.py).
//
// Everything here is deterministic: no floating-point atomics; the only atomics count into
// shared memory (integers) or hand out slots whose order is undone by a total order afterwards.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "cuda/common.cuh"

namespace sgg_kernels {
namespace {

constexpr int64_t kMaxGrid = std::numeric_limits<int32_t>::max();  // gridDim.x limit

// ---------------------------------------------------------------------------------------------
// knn_index
// ---------------------------------------------------------------------------------------------
// One block per (b, c). Every point i gets the key (d2_i, i), compared lexicographically; keys are
// unique, so "the k nearest, ties to the lower index" is "the k smallest keys", and their order
// is the order of the keys: exactly torch.sort(d2, stable=True) of the reference.
//   1. Radix select (8-bit digits, most significant first, shared-memory histogram) finds the
//      shortest key prefix P such that exactly k keys have prefix <= P.
//   2. Those k keys are compacted into global scratch (slot order arbitrary).
//   3. Each one's rank = number of the k keys smaller than it (O(k^2 / threads), keys staged
//      through shared memory in tiles); index written at out[rank].
// Key digits: the bits of d2 (4 bytes for float, 8 for double; d2 >= 0, so its IEEE bits order
// like its value, and NaN is made the one canonical quiet NaN, which sorts last as torch.sort
// puts NaN last), then the bytes of the point index actually needed to tell M points apart.
constexpr int kKnnThreads = 256;  // whole warps (__match_any_sync); warp 0 scans the histogram
constexpr int kRankTile = 1024;   // keys per shared-memory tile in the ranking step
constexpr unsigned int kNoDigit = 256;  // "no digit": outside [0, 256)
static_assert(kKnnThreads % 32 == 0, "knn_index_kernel needs whole warps (__match_any_sync, warp-0 scan)");

template <typename scalar_t>
struct DistBits;

template <>
struct DistBits<float> {
  static constexpr int kDigits = 4;
  // d2 = dx*dx + dy*dy with each operation rounded separately (no FMA): bitwise the reference.
  static __device__ __forceinline__ unsigned long long key(float cx, float cy, float px, float py) {
    const float dx = __fsub_rn(cx, px);
    const float dy = __fsub_rn(cy, py);
    const float d2 = __fadd_rn(__fmul_rn(dx, dx), __fmul_rn(dy, dy));
    return isnan(d2) ? 0x7fc00000ull : static_cast<unsigned long long>(__float_as_uint(d2));
  }
};

template <>
struct DistBits<double> {
  static constexpr int kDigits = 8;
  static __device__ __forceinline__ unsigned long long key(double cx, double cy, double px, double py) {
    const double dx = __dsub_rn(cx, px);
    const double dy = __dsub_rn(cy, py);
    const double d2 = __dadd_rn(__dmul_rn(dx, dx), __dmul_rn(dy, dy));
    return isnan(d2) ? 0x7ff8000000000000ull : static_cast<unsigned long long>(__double_as_longlong(d2));
  }
};

__device__ __forceinline__ bool key_less(unsigned long long a_hi, unsigned int a_lo, unsigned long long b_hi,
                                         unsigned int b_lo) {
  return a_hi < b_hi || (a_hi == b_hi && a_lo < b_lo);
}

// points [B, M, 2], centers [B, C, 2] contiguous; out [B, C, k]; scratch_hi/lo [B*C*k].
// Requires 1 <= k <= M <= INT32_MAX and idx_digits bytes enough for M - 1.
template <typename scalar_t>
__global__ void __launch_bounds__(kKnnThreads)
    knn_index_kernel(const scalar_t* __restrict__ points, const scalar_t* __restrict__ centers, int64_t C,
                     int64_t M, int64_t k, int idx_digits, unsigned long long* __restrict__ scratch_hi,
                     unsigned int* __restrict__ scratch_lo, int64_t* __restrict__ out) {
  using Bits = DistBits<scalar_t>;
  constexpr int kDist = Bits::kDigits;

  __shared__ unsigned int hist[256];
  __shared__ unsigned int s_digit, s_kk, s_done, s_count;
  __shared__ unsigned long long tile_hi[kRankTile];
  __shared__ unsigned int tile_lo[kRankTile];

  const int tid = threadIdx.x;
  const int64_t bc = blockIdx.x;  // b * C + c
  const int64_t b = bc / C;
  const scalar_t* pts = points + b * M * 2;
  const scalar_t cx = centers[bc * 2];
  const scalar_t cy = centers[bc * 2 + 1];
  unsigned long long* sel_hi = scratch_hi + bc * k;
  unsigned int* sel_lo = scratch_lo + bc * k;
  int64_t* out_bc = out + bc * k;

  if (tid == 0) s_count = 0;  // read only after the syncs of step 1

  // ---- 1. radix select ------------------------------------------------------------------
  // Invariant: kk (1-based) is the rank of the k-th smallest key among the keys matching the
  // prefix (p_hi, p_lo) under the masks, and at least kk keys match.
  unsigned long long p_hi = 0, m_hi = 0;
  unsigned int p_lo = 0, m_lo = 0;
  unsigned int kk = static_cast<unsigned int>(k);
  const int levels = kDist + idx_digits;
  for (int level = 0; level < levels; ++level) {
    // Where this level's digit sits: in the d2 bits (hi) or in the index bits (lo).
    const bool in_hi = level < kDist;
    const int shift = in_hi ? 8 * (kDist - 1 - level) : 8 * (idx_digits - 1 - (level - kDist));

    for (int j = tid; j < 256; j += kKnnThreads) hist[j] = 0;
    __syncthreads();  // (a) hist zeroed; every thread has read last level's s_* values
    if (tid == 0) {   // defaults, overwritten by the scan below; they end the loop if the invariant broke
      s_digit = 0;
      s_kk = 1;
      s_done = 1;
    }
    // Same trip count for every thread, so whole warps reach __match_any_sync together.
    for (int64_t i0 = 0; i0 < M; i0 += kKnnThreads) {
      const int64_t i = i0 + tid;
      unsigned int digit = kNoDigit;  // point absent or not matching the prefix
      if (i < M) {
        const unsigned long long hi = Bits::key(cx, cy, pts[2 * i], pts[2 * i + 1]);
        const unsigned int lo = static_cast<unsigned int>(i);
        if ((hi & m_hi) == p_hi && (lo & m_lo) == p_lo) {
          digit = in_hi ? static_cast<unsigned int>((hi >> shift) & 0xffull) : ((lo >> shift) & 0xffu);
        }
      }
      // Warp-aggregated count: one shared atomic per distinct digit in the warp (on a grid most
      // points fall in a few bins of the top digits, which would serialize per-lane atomics).
      const unsigned int peers = __match_any_sync(0xffffffffu, digit);
      if (digit != kNoDigit && (tid & 31) == __ffs(static_cast<int>(peers)) - 1) {
        atomicAdd(&hist[digit], static_cast<unsigned int>(__popc(peers)));
      }
    }
    __syncthreads();  // (b) histogram complete
    if (tid < 32) {
      // Warp 0: lane l owns digits [8l, 8l + 8); an inclusive scan of the lane sums finds the
      // one lane whose range (excl, incl] holds kk, which then walks its 8 digits.
      const int lane = tid;
      unsigned int local = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) local += hist[lane * 8 + j];
      unsigned int incl = local;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const unsigned int v = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += v;
      }
      const unsigned int excl = incl - local;
      if (excl < kk && kk <= incl) {
        unsigned int cum = excl;
        for (int j = 0; j < 8; ++j) {
          const unsigned int h = hist[lane * 8 + j];
          if (cum + h >= kk) {
            s_digit = static_cast<unsigned int>(lane * 8 + j);
            s_kk = kk - cum;
            s_done = (h == kk - cum) ? 1u : 0u;  // every key with this prefix is selected
            break;
          }
          cum += h;
        }
      }
    }
    __syncthreads();  // (c) s_* written; the next write to them comes after the next (a)
    const unsigned int digit = s_digit;
    kk = s_kk;
    if (in_hi) {
      m_hi |= 0xffull << shift;
      p_hi |= static_cast<unsigned long long>(digit) << shift;
    } else {
      m_lo |= 0xffu << shift;
      p_lo |= digit << shift;
    }
    if (s_done) break;  // uniform: all threads read the same shared value
  }
  // Now exactly k keys have (hi & m_hi, lo & m_lo) <= (p_hi, p_lo): those with a smaller prefix
  // (k - kk of them) and the kk with prefix equal to P. At the last level the prefix is the whole
  // (unique) key, so the loop always ends with s_done.

  // ---- 2. compact the selected keys -------------------------------------------------------
  for (int64_t i = tid; i < M; i += kKnnThreads) {
    const unsigned long long hi = Bits::key(cx, cy, pts[2 * i], pts[2 * i + 1]);
    const unsigned int lo = static_cast<unsigned int>(i);
    const unsigned long long hm = hi & m_hi;
    const unsigned int lm = lo & m_lo;
    if (hm < p_hi || (hm == p_hi && lm <= p_lo)) {
      const unsigned int slot = atomicAdd(&s_count, 1u);
      if (static_cast<int64_t>(slot) < k) {  // always true; never write past this block's k slots
        sel_hi[slot] = hi;
        sel_lo[slot] = lo;
      }
    }
  }
  __syncthreads();  // scratch written by this block is visible to all its threads

  // ---- 3. rank = number of selected keys smaller; the output is sorted by key ----------------
  for (int64_t base = 0; base < k; base += kKnnThreads) {
    const int64_t item = base + tid;
    const bool active = item < k;
    unsigned long long my_hi = 0;
    unsigned int my_lo = 0;
    if (active) {
      my_hi = sel_hi[item];
      my_lo = sel_lo[item];
    }
    int64_t rank = 0;
    for (int64_t t0 = 0; t0 < k; t0 += kRankTile) {
      const int n = static_cast<int>(k - t0 < kRankTile ? k - t0 : kRankTile);
      __syncthreads();  // the previous tile is no longer read
      for (int j = tid; j < n; j += kKnnThreads) {
        tile_hi[j] = sel_hi[t0 + j];
        tile_lo[j] = sel_lo[t0 + j];
      }
      __syncthreads();
      if (active) {
        for (int j = 0; j < n; ++j) rank += key_less(tile_hi[j], tile_lo[j], my_hi, my_lo) ? 1 : 0;
      }
    }
    if (active && rank < k) out_bc[rank] = static_cast<int64_t>(my_lo);
  }
}

at::Tensor knn_index_cuda(const at::Tensor& points, const at::Tensor& centers, int64_t k) {
  TORCH_CHECK(points.is_cuda(), "knn_index: points must be a CUDA tensor, got one on ", points.device());
  TORCH_CHECK(centers.device() == points.device(), "knn_index: centers is on ", centers.device(),
              " but points is on ", points.device());
  TORCH_CHECK(points.dim() == 3 && points.size(2) == 2, "knn_index: points must have shape [B, M, 2], got ",
              points.sizes());
  TORCH_CHECK(centers.dim() == 3 && centers.size(2) == 2, "knn_index: centers must have shape [B, C, 2], got ",
              centers.sizes());
  TORCH_CHECK(centers.size(0) == points.size(0), "knn_index: points has batch ", points.size(0),
              " but centers has batch ", centers.size(0));
  TORCH_CHECK(points.scalar_type() == at::kFloat || points.scalar_type() == at::kDouble,
              "knn_index: points must be float32 or float64, got ", points.scalar_type());
  TORCH_CHECK(centers.scalar_type() == points.scalar_type(), "knn_index: centers is ", centers.scalar_type(),
              " but points is ", points.scalar_type(), "; pass one dtype");
  const int64_t B = points.size(0);
  const int64_t M = points.size(1);
  const int64_t C = centers.size(1);
  TORCH_CHECK(k >= 1 && k <= M, "knn_index: k must satisfy 1 <= k <= M (the number of points) = ", M, ", got k = ",
              k);
  TORCH_CHECK(M <= std::numeric_limits<int32_t>::max(), "knn_index: at most 2^31 - 1 points are supported, got M = ",
              M);

  c10::cuda::CUDAGuard device_guard(points.device());
  at::Tensor out = at::empty({B, C, k}, points.options().dtype(at::kLong));
  if (out.numel() == 0) return out;  // B = 0 or C = 0
  TORCH_CHECK(B * C <= kMaxGrid, "knn_index: B * C = ", B * C, " centers exceed the CUDA grid limit");

  const at::Tensor p = points.contiguous();
  const at::Tensor c = centers.contiguous();
  // Scratch for the selected keys: d2 bits and point index, k per center.
  at::Tensor scratch_hi = at::empty({B * C * k}, points.options().dtype(at::kLong));
  at::Tensor scratch_lo = at::empty({B * C * k}, points.options().dtype(at::kInt));
  int idx_digits = 0;  // bytes of the point index needed to tell M points apart (0 when M = 1)
  for (uint64_t v = static_cast<uint64_t>(M - 1); v != 0; v >>= 8) ++idx_digits;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "knn_index_cuda", [&] {
    knn_index_kernel<scalar_t><<<static_cast<unsigned int>(B * C), kKnnThreads, 0, stream>>>(
        p.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), C, M, k, idx_digits,
        reinterpret_cast<unsigned long long*>(scratch_hi.data_ptr<int64_t>()),
        reinterpret_cast<unsigned int*>(scratch_lo.data_ptr<int32_t>()), out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// gather_mean (Eq. 1) and its backward
// ---------------------------------------------------------------------------------------------
constexpr int kRowThreads = 256;

// Block shape (tx, ty) for work spread over a feature row of D values: tx threads along D
// (a multiple of 32, coalesced), ty = kRowThreads / tx along the other dimension.
inline dim3 row_block(int64_t D) {
  const int tx = D >= kRowThreads ? kRowThreads : static_cast<int>((D + 31) / 32 * 32);
  return dim3(tx, kRowThreads / tx);
}

// One block per (b, c): threadIdx.x walks D, threadIdx.y splits the k neighbours; the ty partial
// sums are then added in a fixed order (deterministic).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    gather_mean_kernel(const scalar_t* __restrict__ feats, const int64_t* __restrict__ index, int64_t C, int64_t M,
                       int64_t D, int64_t k, scalar_t* __restrict__ out) {
  __shared__ acc_t partial[kRowThreads];
  const int tx = blockDim.x;
  const int ty = blockDim.y;
  const int64_t bc = blockIdx.x;  // b * C + c
  const int64_t b = bc / C;
  const int64_t* idx = index + bc * k;
  const scalar_t* fb = feats + b * M * D;
  for (int64_t d0 = 0; d0 < D; d0 += tx) {  // same trip count for every thread
    const int64_t d = d0 + threadIdx.x;
    acc_t acc = 0;
    if (d < D) {
      for (int64_t t = threadIdx.y; t < k; t += ty) {
        const int64_t m = idx[t];
        if (m >= 0 && m < M) acc += static_cast<acc_t>(fb[m * D + d]);  // out-of-range: contributes 0
      }
    }
    partial[threadIdx.y * tx + threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && d < D) {
      acc_t sum = 0;
      for (int y = 0; y < ty; ++y) sum += partial[y * tx + threadIdx.x];
      // Eq. 1: F^c_j = 1/n_k sum_{Q_i in KNN(T_j)} F_i  (k = 0 gives 0/0 = NaN, as the reference)
      out[bc * D + d] = static_cast<scalar_t>(sum / static_cast<acc_t>(k));
    }
    __syncthreads();  // partial is rewritten by the next chunk
  }
}

at::Tensor gather_mean_cuda(const at::Tensor& feats, const at::Tensor& index) {
  TORCH_CHECK(feats.is_cuda(), "gather_mean: feats must be a CUDA tensor, got one on ", feats.device());
  TORCH_CHECK(index.device() == feats.device(), "gather_mean: index is on ", index.device(), " but feats is on ",
              feats.device());
  TORCH_CHECK(feats.dim() == 3, "gather_mean: feats must have shape [B, M, D], got ", feats.sizes());
  TORCH_CHECK(index.dim() == 3, "gather_mean: index must have shape [B, C, k], got ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, "gather_mean: index must be int64, got ", index.scalar_type());
  TORCH_CHECK(index.size(0) == feats.size(0), "gather_mean: feats has batch ", feats.size(0),
              " but index has batch ", index.size(0));
  TORCH_CHECK(at::isFloatingType(feats.scalar_type()), "gather_mean: feats must be floating, got ",
              feats.scalar_type());
  const int64_t B = feats.size(0);
  const int64_t M = feats.size(1);
  const int64_t D = feats.size(2);
  const int64_t C = index.size(1);
  const int64_t k = index.size(2);

  c10::cuda::CUDAGuard device_guard(feats.device());
  at::Tensor out = at::empty({B, C, D}, feats.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(B * C <= kMaxGrid, "gather_mean: B * C = ", B * C, " centers exceed the CUDA grid limit");

  const at::Tensor f = feats.contiguous();
  const at::Tensor idx = index.contiguous();
  const dim3 block = row_block(D);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "gather_mean_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gather_mean_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(B * C), block, 0, stream>>>(
        f.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), C, M, D, k, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// One row (b, m) per threadIdx.y, threadIdx.x walks D. Row r's entries are perm[offsets[r] ..
// offsets[r + 1]) of the key sort below (offsets: one searchsorted over the sorted keys, computed
// once on the device by the launcher instead of two binary searches by each of the row's threads);
// the stable sort keeps each row's entries in ascending (c, t) order, so every row is summed in a
// fixed order (deterministic, and the order of the reference's scatter_add). grad_row[e] =
// perm[e] / k, the grad row of entry e (also precomputed: no int64 division in the D loop).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    gather_mean_backward_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ offsets,
                                const int64_t* __restrict__ grad_row, int64_t R, int64_t D, int64_t k,
                                scalar_t* __restrict__ out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;  // b * M + m
  if (r >= R) return;  // no block-wide sync below
  const int64_t begin = offsets[r];
  const int64_t end = offsets[r + 1];
  const acc_t kf = static_cast<acc_t>(k);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    // grad feats[b,m] = sum_{(c,t): index[b,c,t]=m} G[b,c] / k
    acc_t acc = 0;
    for (int64_t e = begin; e < end; ++e) {
      acc += static_cast<acc_t>(grad[grad_row[e] * D + d]) / kf;
    }
    out[r * D + d] = static_cast<scalar_t>(acc);
  }
}

at::Tensor gather_mean_backward_cuda(const at::Tensor& grad, const at::Tensor& index, int64_t M) {
  TORCH_CHECK(grad.is_cuda(), "gather_mean_backward: grad must be a CUDA tensor, got one on ", grad.device());
  TORCH_CHECK(index.device() == grad.device(), "gather_mean_backward: index is on ", index.device(),
              " but grad is on ", grad.device());
  TORCH_CHECK(grad.dim() == 3, "gather_mean_backward: grad must have shape [B, C, D], got ", grad.sizes());
  TORCH_CHECK(index.dim() == 3, "gather_mean_backward: index must have shape [B, C, k], got ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, "gather_mean_backward: index must be int64, got ",
              index.scalar_type());
  TORCH_CHECK(index.size(0) == grad.size(0) && index.size(1) == grad.size(1),
              "gather_mean_backward: index [B, C, k] must match grad [B, C, D] in B and C, got index ", index.sizes(),
              " and grad ", grad.sizes());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), "gather_mean_backward: grad must be floating, got ",
              grad.scalar_type());
  TORCH_CHECK(M >= 0, "gather_mean_backward: M (the number of points) must be >= 0, got ", M);
  const int64_t B = grad.size(0);
  const int64_t C = grad.size(1);
  const int64_t D = grad.size(2);
  const int64_t k = index.size(2);

  c10::cuda::CUDAGuard device_guard(grad.device());
  at::Tensor out = at::empty({B, M, D}, grad.options());
  if (out.numel() == 0) return out;
  if (C == 0 || k == 0) return out.zero_();  // no entries: every gradient is 0

  // CSR of the inverse map point -> entries: key of entry (b, c, t) = b*M + index[b,c,t], or B*M
  // when the index is outside [0, M) (dropped); a stable sort groups each point's entries.
  const int64_t R = B * M;
  const at::Tensor idx = index.contiguous().view({B, C * k});
  const at::Tensor valid = idx.ge(0).logical_and_(idx.lt(M));
  const at::Tensor row_base = at::arange(B, idx.options()).mul_(M).unsqueeze(1);  // [B, 1]: b*M
  const at::Tensor keys = at::where(valid, idx.clamp(0, M - 1).add(row_base), at::Scalar(R)).reshape({-1});
  auto sorted = at::sort(keys, std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
  const at::Tensor& sorted_keys = std::get<0>(sorted);
  // offsets[r] = first e with sorted_keys[e] >= r (r = 0 .. R; the invalid entries, key R, lie at
  // and after offsets[R]): row r's entries are [offsets[r], offsets[r + 1]). One searchsorted on
  // the device, no host sync.
  const at::Tensor offsets =
      at::searchsorted(sorted_keys, at::arange(R + 1, keys.options()), /*out_int32=*/false, /*right=*/false)
          .contiguous();
  // entry p = (b*C + c)*k + t belongs to grad row b*C + c = p / k
  const at::Tensor grad_row = at::div(std::get<1>(sorted), k, "floor").contiguous();

  const at::Tensor g = grad.contiguous();
  const dim3 block = row_block(D);
  const int64_t blocks = (R + block.y - 1) / block.y;
  TORCH_CHECK(blocks <= kMaxGrid, "gather_mean_backward: B * M = ", R, " points exceed the CUDA grid limit");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gather_mean_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gather_mean_backward_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(blocks), block, 0, stream>>>(
        g.data_ptr<scalar_t>(), offsets.data_ptr<int64_t>(), grad_row.data_ptr<int64_t>(), R, D, k,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sgg_kernels, CUDA, m) {
  m.impl("_knn_index", &knn_index_cuda);
  m.impl("_gather_mean", &gather_mean_cuda);
  m.impl("_gather_mean_backward", &gather_mean_backward_cuda);
}

}  // namespace sgg_kernels
