// Host-side argument checks of the masks family (segmentation-grounded SGG, Eq. 6), shared by the
// CPU kernels (csrc/cpu/masks.cpp) and the CUDA kernels (csrc/cuda/masks.cu). The Python op layer
// checks first with friendlier messages; these guard direct calls of the private ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <optional>

namespace sgg_kernels {
namespace masks_common {

struct MaskArgs {
  int64_t K, C, m, P, d, R;
  bool per_pair;  // kernels [P, 2, d, d] (per pair and role) or [K, d, d] (per object)
};

// Checks shared by the forward and the backward on a backend of device type `device_type`: every
// tensor on masks' device, shapes and dtypes; returns the sizes.
inline MaskArgs check_mask_inputs(const char* op, c10::DeviceType device_type, const at::Tensor& masks,
                                  const at::Tensor& pairs, const at::Tensor& kernels,
                                  const std::optional<at::Tensor>& boxes, int64_t out_size) {
  TORCH_CHECK(masks.device().type() == device_type, op, ": masks must be a ", c10::DeviceTypeName(device_type),
              " tensor, got one on ", masks.device());
  TORCH_CHECK(pairs.device() == masks.device(), op, ": pairs is on ", pairs.device(), " but masks is on ",
              masks.device());
  TORCH_CHECK(kernels.device() == masks.device(), op, ": kernels is on ", kernels.device(), " but masks is on ",
              masks.device());
  TORCH_CHECK(masks.dim() == 4 && masks.size(2) == masks.size(3), op,
              ": masks must have shape [K, C, m, m] (square masks), got ", masks.sizes());
  const at::ScalarType dt = masks.scalar_type();
  TORCH_CHECK(at::isFloatingType(dt), op, ": masks must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(pairs.dim() == 2 && pairs.size(1) == 2 && pairs.scalar_type() == at::kLong, op,
              ": pairs must be int64 [P, 2] (subject, object), got ", pairs.scalar_type(), " ", pairs.sizes());
  TORCH_CHECK(kernels.scalar_type() == dt, op, ": kernels is ", kernels.scalar_type(), " but masks is ", dt,
              "; pass one dtype");
  TORCH_CHECK(kernels.dim() == 4 || kernels.dim() == 3, op,
              ": kernels must have shape [P, 2, d, d] (per pair and role) or [K, d, d] (per object), got ",
              kernels.sizes());
  MaskArgs a;
  a.K = masks.size(0);
  a.C = masks.size(1);
  a.m = masks.size(2);
  a.P = pairs.size(0);
  a.per_pair = kernels.dim() == 4;
  a.d = kernels.size(-1);
  TORCH_CHECK(kernels.size(-2) == a.d && a.d % 2 == 1, op, ": kernels must be square with an odd size d, got ",
              kernels.sizes());
  if (a.per_pair) {
    TORCH_CHECK(kernels.size(0) == a.P && kernels.size(1) == 2, op, ": per-pair kernels must have shape [P, 2, d, d] = [",
                a.P, ", 2, ", a.d, ", ", a.d, "], got ", kernels.sizes());
  } else {
    TORCH_CHECK(kernels.size(0) == a.K, op, ": per-object kernels must have shape [K, d, d] = [", a.K, ", ", a.d, ", ",
                a.d, "], got ", kernels.sizes());
  }
  TORCH_CHECK(out_size >= 0, op, ": out_size must be >= 0, got ", out_size);
  TORCH_CHECK(boxes.has_value() == (out_size > 0), op,
              ": pass boxes with out_size > 0 (the union frame) or neither (boxes None, out_size 0: the own "
              "frames), got boxes ",
              boxes.has_value() ? "given" : "None", " and out_size ", out_size);
  a.R = out_size;
  if (boxes.has_value()) {
    const at::Tensor& bx = *boxes;
    TORCH_CHECK(bx.device() == masks.device(), op, ": boxes is on ", bx.device(), " but masks is on ", masks.device());
    TORCH_CHECK(bx.dim() == 2 && bx.size(0) == a.K && bx.size(1) == 4, op, ": boxes must have shape [K, 4] = [", a.K,
                ", 4] (x1, y1, x2, y2), got ", bx.sizes());
    const at::ScalarType box_type = at::toOpMathType(dt);
    TORCH_CHECK(bx.scalar_type() == box_type, op, ": boxes must be ", box_type, " for ", dt,
                " masks (float64 for float64, else float32), got ", bx.scalar_type());
  }
  return a;
}

// The backward's incoming gradient: [P, C, R, R] (union frame) or [P, C, m, m], masks' dtype and
// device. Returns the side of its planes.
inline int64_t check_mask_grad(const char* op, const at::Tensor& grad, const at::Tensor& masks, const MaskArgs& a) {
  const int64_t side = a.R > 0 ? a.R : a.m;
  TORCH_CHECK(grad.device() == masks.device(), op, ": grad is on ", grad.device(), " but masks is on ",
              masks.device());
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == a.P && grad.size(1) == a.C && grad.size(2) == side &&
                  grad.size(3) == side,
              op, ": grad must have shape [P, C, ", side, ", ", side, "] = [", a.P, ", ", a.C, ", ", side, ", ", side,
              "], got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == masks.scalar_type(), op, ": grad is ", grad.scalar_type(), " but masks is ",
              masks.scalar_type(), "; pass one dtype");
  return side;
}

}  // namespace masks_common
}  // namespace sgg_kernels
