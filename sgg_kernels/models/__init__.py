"""Thin ``nn.Module``s over the fused ops, one file per paper (DESIGN.md).

    from sgg_kernels.models import LinkNetHead
"""
from .linknet import (
    GeometricLayoutEncoding,
    GlobalContextEncoding,
    LinkNetHead,
    RelationalEmbedding,
    linknet_losses,
)

__all__ = [
    "RelationalEmbedding", "GlobalContextEncoding", "GeometricLayoutEncoding", "LinkNetHead", "linknet_losses",
]
