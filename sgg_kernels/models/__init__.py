"""Thin ``nn.Module``s over the fused ops, one file per paper (DESIGN.md).

    from sgg_kernels.models import LinkNetHead, GaussianPairMasks, SILBlock, RDE
"""
from .linknet import (
    GeometricLayoutEncoding,
    GlobalContextEncoding,
    LinkNetHead,
    RelationalEmbedding,
    linknet_losses,
)
from .seg_grounding import EdgeGrounding, GaussianPairMasks, MaskRefinement, MaskTransfer, ObjectGrounding
from .sil import SILBlock, SILNetwork
from .rde import (
    FDVAE,
    RDE,
    information_loss,
    prototype_loss,
    prototype_separation_loss,
    reconstruction_loss,
)

__all__ = [
    "RelationalEmbedding", "GlobalContextEncoding", "GeometricLayoutEncoding", "LinkNetHead", "linknet_losses",
    "MaskTransfer", "ObjectGrounding", "GaussianPairMasks", "EdgeGrounding", "MaskRefinement",
    "SILBlock", "SILNetwork",
    "FDVAE", "RDE", "prototype_loss", "prototype_separation_loss", "information_loss", "reconstruction_loss",
]
