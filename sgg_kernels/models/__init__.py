"""Thin ``nn.Module``s over the fused ops, one file per paper (DESIGN.md).

    from sgg_kernels.models import LinkNetHead, GaussianPairMasks
"""
from .linknet import (
    GeometricLayoutEncoding,
    GlobalContextEncoding,
    LinkNetHead,
    RelationalEmbedding,
    linknet_losses,
)
from .seg_grounding import EdgeGrounding, GaussianPairMasks, MaskRefinement, MaskTransfer, ObjectGrounding

__all__ = [
    "RelationalEmbedding", "GlobalContextEncoding", "GeometricLayoutEncoding", "LinkNetHead", "linknet_losses",
    "MaskTransfer", "ObjectGrounding", "GaussianPairMasks", "EdgeGrounding", "MaskRefinement",
]
