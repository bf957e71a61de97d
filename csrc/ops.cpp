// The schemas of every C++ op of sgg_kernels, declared once. Kernels live in cpu/<family>.cpp
// (TORCH_LIBRARY_IMPL(sgg_kernels, CPU, ...)) and cuda/<family>.cu (..., CUDA, ...).
//
// These are the *kernels* behind the public ops: the public ops (sgg_kernels::<name>, with
// autograd and fake kernels) are registered in Python (sgg_kernels/ops/<family>.py) and call these
// private ones (sgg_kernels::_<name>) when the "cpu" or "cuda" backend is selected. Optional
// gradient outputs come back undefined (None in Python).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty Python module: importing sgg_kernels._C loads this library, whose static
// initializers register the ops below. No pybind11, so the build fits Py_LIMITED_API.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace sgg_kernels {

bool built_with_cuda() {
#ifdef SGG_KERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(sgg_kernels, m) {
  m.def("_built_with_cuda() -> bool", &built_with_cuda);

  // family cluster (SIL, Eq. 1-3, 9); math and backward formulas: sgg_kernels/reference/cluster.py
  m.def("_knn_index(Tensor points, Tensor centers, int k) -> Tensor");
  m.def("_gather_mean(Tensor feats, Tensor index) -> Tensor");
  m.def("_gather_mean_backward(Tensor grad, Tensor index, int M) -> Tensor");
  m.def("_cosine_assign(Tensor feats, Tensor centers, Tensor? alpha, Tensor? beta) -> (Tensor, Tensor)");
  m.def(
      "_cosine_assign_backward(Tensor grad_sim, Tensor feats, Tensor centers, Tensor assign, Tensor sim, "
      "Tensor? alpha, Tensor? beta) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_cluster_aggregate(Tensor values, Tensor assign, Tensor sim, Tensor value_centers) -> (Tensor, Tensor)");
  m.def(
      "_cluster_aggregate_backward(Tensor grad_out, Tensor values, Tensor assign, Tensor sim, Tensor out, "
      "Tensor den) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_superpixel_cluster(Tensor feats, Tensor centers, Tensor values, Tensor value_centers, Tensor? alpha, "
      "Tensor? beta) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_cluster_dispatch(Tensor center_out, Tensor assign, Tensor sim, Tensor? residual) -> Tensor");
  m.def(
      "_cluster_dispatch_backward(Tensor grad_out, Tensor center_out, Tensor assign, Tensor sim, "
      "bool has_residual) -> (Tensor, Tensor, Tensor)");

  // family pairs (LinkNet, Eq. 12-14, 17; union-box RoIAlign); math: sgg_kernels/reference/pairs.py
  m.def("_union_boxes(Tensor boxes, Tensor pairs) -> Tensor");
  m.def("_union_boxes_backward(Tensor grad, Tensor boxes, Tensor pairs) -> Tensor");
  m.def("_pair_geometry(Tensor boxes, Tensor pairs) -> Tensor");
  m.def("_pair_geometry_backward(Tensor grad, Tensor boxes, Tensor pairs) -> Tensor");
  m.def(
      "_roi_align(Tensor features, Tensor boxes, Tensor box_batch, Tensor? pairs, int pooled_h, int pooled_w, "
      "float spatial_scale, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "_roi_align_backward(Tensor grad, Tensor boxes, Tensor box_batch, Tensor? pairs, int B, int H, int W, "
      "float spatial_scale, int sampling_ratio, bool aligned) -> Tensor");
  // One tap (dy, dx) of a 3x3 conv over the per-level union-box RoIAlign summed over the levels;
  // maps channels-last [B, H_l, W_l, C].
  m.def(
      "_union_tap_pool(Tensor[] maps, Tensor boxes, Tensor box_batch, Tensor pairs, int pooled, float[] scales, "
      "int sampling_ratio, bool aligned, int dy, int dx) -> Tensor");
  m.def(
      "_union_tap_pool_backward(Tensor grad, Tensor boxes, Tensor box_batch, Tensor pairs, int B, int[] heights, "
      "int[] widths, float[] scales, int sampling_ratio, bool aligned, int dy, int dx) -> Tensor[]");
  // sum_mode: the sum form g = (subj[s] + obj[o]) * u instead of the product subj[s] * obj[o] * u.
  m.def(
      "_pairwise_edge_fusion(Tensor subj, Tensor obj, Tensor? union_feats, Tensor pairs, Tensor weight, "
      "Tensor? bias, bool sum_mode=False) -> Tensor");
  m.def(
      "_pairwise_edge_fusion_backward(Tensor grad, Tensor subj, Tensor obj, Tensor? union_feats, Tensor pairs, "
      "Tensor weight, bool has_bias, bool sum_mode=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // family masks (segmentation-grounded SGG, Eq. 6); math and backward: sgg_kernels/reference/masks.py.
  // out_size = 0 (and boxes None): the objects' own frames, [P, C, m, m]; else the union frame [P, C, R, R].
  m.def("_pair_mask_conv(Tensor masks, Tensor pairs, Tensor kernels, Tensor? boxes, int out_size) -> Tensor");
  m.def(
      "_pair_mask_conv_backward(Tensor grad, Tensor masks, Tensor pairs, Tensor kernels, Tensor? boxes, "
      "int out_size, bool need_masks, bool need_kernels) -> (Tensor, Tensor)");

  // family prototypes (RDE, Eq. 4); math and backward: sgg_kernels/reference/prototypes.py.
  // A gradient not needed (need_x / need_protos false) comes back as an empty [0] tensor.
  m.def("_prototype_distance(Tensor x, Tensor protos) -> (Tensor, Tensor)");
  m.def(
      "_prototype_distance_backward(Tensor grad_cos, Tensor grad_dist, Tensor x, Tensor protos, bool need_x, "
      "bool need_protos) -> (Tensor, Tensor)");
}

}  // namespace sgg_kernels
