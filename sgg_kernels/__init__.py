"""sgg_kernels: fused, differentiable PyTorch ops for fine-grained scene graph generation.

    import sgg_kernels as sk
    centers = sk.grid_centers(H, W, 7)
    center_feats, knn = sk.knn_center_features(feats, sk.grid_points(H, W), centers, k)
    out, assign, sim = sk.superpixel_cluster(feats, center_feats)

Every op is a ``torch.library`` op (``torch.ops.sgg_kernels.*``) with autograd and a fake kernel,
so it works under ``torch.compile(fullgraph=True)``. ``sk.use_backend(...)`` forces a backend;
``python -m sgg_kernels.info`` says which ones this build has.
"""
from ._backend import BACKENDS, PRECISIONS, checks_enabled, get_precision, precision, set_checks, set_precision, use_backend
from .ops.batch import all_pairs, pack_boxes, pack_pairs
from .ops.cluster import (
    cluster_aggregate,
    cluster_dispatch,
    cosine_assign,
    gather_mean,
    grid_centers,
    grid_points,
    knn_center_features,
    knn_index,
    superpixel_cluster,
)
from .ops.masks import gaussian_kernels, pair_mask_conv, transfer_masks
from .ops.pairs import pair_geometry, pairwise_edge_fusion, roi_align, union_boxes, union_roi_align
from .ops.prototypes import prototype_distance
from . import models  # noqa: E402  (thin nn.Modules over the ops above: sk.models.LinkNetHead, ...)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "use_backend", "set_checks", "checks_enabled",
    "PRECISIONS", "set_precision", "get_precision", "precision",
    "grid_points", "grid_centers", "knn_index", "knn_center_features", "gather_mean",
    "cosine_assign", "cluster_aggregate", "superpixel_cluster", "cluster_dispatch",
    "pack_boxes", "pack_pairs", "all_pairs",
    "gaussian_kernels", "pair_mask_conv", "transfer_masks",
    "union_boxes", "pair_geometry", "roi_align", "union_roi_align", "pairwise_edge_fusion",
    "prototype_distance",
]
